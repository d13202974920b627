"""grow.py: sparse upcycling and train.py --init_from. An upcycled top-2 MoE computes its dense source (logits, loss,
greedy decoding); top-1 computes p(x) FFN(x) (a zero router: the dense model with FFN outputs / E; a trained-like
router: not the dense model); init_config takes the model from the source and refuses disagreeing keys in one
line. End to end on the bundled real stories: continued training and upcycling from a train.py checkpoint (their
step-0 evaluation is the source's last), a Llama directory adapted by train.py and sampled by sample.py."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os

import pytest
import torch

import checkpoint
import configurator
import prepare
import sample
import train
from batch import padded_batch, shift_right
from conftest import STORIES, save_hf_llama
from generate import generate
from grow import init_config, upcycle
from model import ROT5, ROT5Config
from tokenizer import get_tokenizer

DENSE = ROT5Config(vocab_size=32256, d_model=64, n_heads=4, head_dim=16, n_kv_heads=2, d_ff=96, n_encoder_layers=2,
                   n_decoder_layers=3, position="rope", ffn="gated-gelu", tie_embeddings=False, dropout=0.0)
TINY_KEYS = dict(d_model=64, n_heads=2, head_dim=32, n_kv_heads=1, d_ff=128, n_encoder_layers=2, n_decoder_layers=2,
                 position="rope", dropout=0.0)   # the checkpoint of `work` below
TINY = [f"--{k}={v}" for k, v in TINY_KEYS.items()]


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert msg and "\n" not in msg, msg
    return msg


def dense_model(seed: int = 0) -> ROT5:
    """A random dense model whose sublayers matter: outputs scaled up, so the FFNs move the logits."""
    torch.manual_seed(seed)
    model = ROT5(DENSE)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o.weight", "wo.weight")):
                p.mul_(4.0)
    return model.eval()


def moe_model(dense: ROT5, seed: int = 1, **moe) -> ROT5:
    torch.manual_seed(seed)
    model = ROT5(dataclasses.replace(dense.cfg, **moe))
    upcycle(dense, model)
    return model.eval()


def story_batch(n: int = 10):
    tok = get_tokenizer()
    with open(STORIES, encoding="utf-8") as f:
        stories = [s.strip() for s in f.read().split("<|endoftext|>") if s.strip()][:n]
    src = [ids[:30 - 2 * i] + [tok.eos_id] for i, ids in enumerate(tok.encode([s[:300] for s in stories]))]
    tgt = [ids[:14] + [tok.eos_id] for ids in tok.encode([s[300:600] for s in stories])]
    x, labels = torch.full((n, max(map(len, src))), tok.pad_id), torch.full((n, max(map(len, tgt))), -100)
    for i, (s, t) in enumerate(zip(src, tgt)):
        x[i, :len(s)], labels[i, :len(t)] = torch.tensor(s), torch.tensor(t)
    return x, (x != tok.pad_id).long(), labels


def logits_and_loss(model: ROT5, x, am, labels):
    dec = shift_right(labels, torch.ones_like(labels), model.cfg.pad_token_id)
    with torch.no_grad():
        return (model(padded_batch(model.cfg, x, am, decoder_input_ids=dec)).logits,
                model(padded_batch(model.cfg, x, am, labels)).loss.item())


def relative(ours, ref, labels) -> float:
    """max |ours - ref| over the labels' positions, relative to the logits' scale. Rounding alone (each expert's
    batch is its own matmul; g_1 y + g_2 y with g_1 + g_2 = 1 in fp32 is y to a few ulp) stays far below 1e-5 of
    the scale; a wrong expert or an unnormalised gate moves logits by O(1)."""
    real = labels != -100
    return ((ours - ref)[real].abs().max() / ref[real].abs().max()).item()


# -----------------------------------------------------------------------------
# upcycling

@pytest.mark.parametrize("moe_step", [2, 1])
def test_upcycled_top2_computes_the_dense_model(moe_step):
    dense = dense_model()
    moe = moe_model(dense, n_experts=4, moe_top_k=2, moe_step=moe_step)
    x, am, labels = story_batch()
    (ref, ref_loss), (ours, loss) = logits_and_loss(dense, x, am, labels), logits_and_loss(moe, x, am, labels)
    rel = relative(ours, ref, labels)
    print(f"upcycled top-2, MoE every {moe_step} layer(s): max relative logit difference {rel:.2e}")
    assert rel < 1e-5 and loss == pytest.approx(ref_loss, rel=1e-6)
    assert torch.equal(generate(moe, x, am, max_new_tokens=16), generate(dense, x, am, max_new_tokens=16))
    with torch.no_grad():  # the new routers spread tokens over the experts: the equality is not one expert's
        load = moe(padded_batch(moe.cfg, x, am, labels)).expert_load
    n_moe = sum(map(moe.cfg.moe_layer, range(DENSE.n_encoder_layers))) + sum(map(moe.cfg.moe_layer, range(DENSE.n_decoder_layers)))
    assert (load > 0).sum() >= load.numel() - 2 and load.shape[0] == n_moe


def test_upcycle_copies_the_ffn_into_every_expert_and_keeps_the_new_router():
    dense = dense_model()
    moe = moe_model(dense, n_experts=4, moe_top_k=2, seed=7)
    torch.manual_seed(7)
    fresh = ROT5(moe.cfg)
    ours, theirs = moe.state_dict(), dense.state_dict()
    for name, value in ours.items():
        if ".experts." in name:
            layer, weight = name.split(".experts.")[0], name.rsplit(".", 2)[-2]
            assert torch.equal(value, theirs[f"{layer}.{weight}.weight"])
        elif name.endswith("router.weight"):
            assert torch.equal(value, fresh.state_dict()[name])
        else:
            assert torch.equal(value, theirs[name])
    with pytest.raises(ValueError, match="dense model into an MoE one"):
        upcycle(moe, moe_model(dense))


def test_upcycled_top1_scales_the_ffn_by_the_router_probability():
    """Top-1 keeps the raw router probability p(x) as the gate: output p(x) FFN(x). A zero router gives every
    expert p = 1/E, so the model is the dense one with each MoE layer's wo scaled by 1/E; the fresh router is not
    the dense model (the negative: top-1 upcycling does not preserve the function)."""
    dense = dense_model()
    x, am, labels = story_batch()
    moe = moe_model(dense, n_experts=4, moe_top_k=1)
    with torch.no_grad():
        for m in moe.modules():
            if hasattr(m, "router"):
                m.router.weight.zero_()
        scaled = dense_model()
        for i, layer in [*enumerate(scaled.encoder.layers), *enumerate(scaled.decoder.layers)]:
            if moe.cfg.moe_layer(i):
                layer.ffn.wo.weight.div_(4)
    ref, ours = logits_and_loss(scaled, x, am, labels)[0], logits_and_loss(moe, x, am, labels)[0]
    assert relative(ours, ref, labels) < 1e-5
    assert relative(logits_and_loss(moe_model(dense, n_experts=4, moe_top_k=1), x, am, labels)[0],
                    logits_and_loss(dense, x, am, labels)[0], labels) > 1e-2


def test_given_keys_are_the_ones_set_whatever_their_values(tmp_path):
    """A key set to its default value is still set (it must agree with the source); config files count too."""
    (tmp_path / "c.py").write_text("d_model = 768  # T5-Base's, the default\n_helper = 1\n")
    assert configurator.given_keys([str(tmp_path / "c.py"), "--dropout=0.1", "--init_from=x"]) == \
        {"d_model", "dropout", "init_from"}


def test_init_config_takes_the_source_and_refuses_what_disagrees():
    src = DENSE
    config = {**dataclasses.asdict(ROT5Config()), "d_model": 768, "dropout": 0.2, "n_experts": 8, "moe_top_k": 2}
    cfg = init_config(src, config, {"dropout", "n_experts", "moe_top_k"}, "src.pt")
    assert cfg == dataclasses.replace(src, dropout=0.2, n_experts=8, moe_top_k=2)  # d_model=768 was not given
    with pytest.raises(SystemExit) as e:
        init_config(src, config, {"d_model", "dropout"}, "src.pt")
    assert "--d_model=768 disagrees with src.pt, whose weights have d_model=64: drop it" in one_line(e)
    moe = dataclasses.replace(src, n_experts=4)
    with pytest.raises(SystemExit) as e:   # an MoE source's experts are its weights
        init_config(moe, config, {"n_experts"}, "moe.pt")
    assert "--n_experts=8 disagrees with moe.pt, whose weights have n_experts=4" in one_line(e)
    with pytest.raises(SystemExit) as e:   # cross_rope is the source's, unless the source is a decoder-only model
        init_config(src, {**config, "cross_rope": False}, {"cross_rope"}, "src.pt")
    assert "--cross_rope=False disagrees with src.pt" in one_line(e)
    assert not init_config(src, {**config, "cross_rope": False}, {"cross_rope"}, "llama", adapted=True).cross_rope
    with pytest.raises(SystemExit) as e:
        init_config(src, {**config, "moe_top_k": 9}, {"moe_top_k", "n_experts"}, "src.pt")
    assert "--init_from=src.pt: moe_top_k=9 must be <= n_experts=8" in one_line(e)


# -----------------------------------------------------------------------------
# train.py --init_from, end to end on the sample

@pytest.fixture(scope="module")
def work(tmp_path_factory, short_val_sample, hf_tokenizer_dirs):
    """A directory with data/sample (Mistral tokenizer), data/sample_hf (the Llama stand-in's tokenizer.json), a
    dense checkpoint of TINY's shape (dense/ckpt.pt: random, outputs scaled up as dense_model's) and a tiny Llama
    directory (llama/)."""
    d = tmp_path_factory.mktemp("grow")
    cwd = os.getcwd()
    os.chdir(d)
    try:
        llama = save_hf_llama(d / "llama", hf_tokenizer_dirs["metaspace"], initializer_range=0.1)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            prepare.prepare("sample", out_dir=os.path.join("data", "sample"), workers=1)
            prepare.prepare("sample", out_dir=os.path.join("data", "sample_hf"), workers=1, tokenizer="hf:" + llama)
        cfg = ROT5Config(**TINY_KEYS)
        torch.manual_seed(0)
        model = ROT5(cfg)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(("o.weight", "wo.weight")):
                    p.mul_(4.0)
        checkpoint.save_checkpoint("dense/ckpt.pt", {"kind": "pretrain", "model": model.state_dict(), "step": 0,
                                                     "model_config": dataclasses.asdict(cfg), "tokenizer": "mistral",
                                                     "config": {}})
        yield {"dir": d, "llama": llama, "cfg": cfg}
    finally:
        os.chdir(cwd)


def steps(n: int, batch: int = 8) -> str:
    documents = prepare.load_meta(os.path.join("data", "sample"))["splits"]["train"]["documents"]
    return f"--epochs={(n * batch - 0.5) / documents!r}"


def run(argv: list[str]) -> dict:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return train.main(argv)


def evals(out_dir: str) -> list[dict]:
    return [e for e in map(json.loads, open(os.path.join(out_dir, "metrics.jsonl"))) if e["event"] == "eval"]


def test_continued_and_upcycled_training_start_from_the_checkpoint(work):
    """--init_from a ROT5 checkpoint: continued training takes every model key from it (none given here); upcycled
    to top-2 MoE (the same keys given, they agree, plus the MoE ones), its step-0 evaluation is the continued
    run's (the same weights and evaluation batches) to fp32 rounding; it then trains its experts and samples."""
    os.chdir(work["dir"])
    common = ["--dataset=sample", "--device=cpu", "--dtype=float32", "--encoder_len=128", "--decoder_len=64",
              "--eval_docs=16", "--eval_batch_size=16", "--batch_size=8", "--micro_batch_size=8", "--log_interval=1",
              "--init_from=dense/ckpt.pt"]
    run(common + ["--out_dir=more", steps(1)])
    assert checkpoint.load_checkpoint("more/ckpt.pt")["model_config"] == dataclasses.asdict(work["cfg"])
    run(TINY + common + ["--out_dir=moe", "--n_experts=4", "--moe_top_k=2", steps(2)])
    dense, moe = evals("more")[0], evals("moe")[0]
    print(f"step 0: dense val_loss {dense['val_loss']:.6f}, upcycled top-2 {moe['val_loss']:.6f}")
    for key in ("val_loss", "continuation_loss"):
        assert moe[key] == pytest.approx(dense[key], rel=1e-6)
    ckpt = checkpoint.load_checkpoint("moe/ckpt.pt")
    assert ckpt["model_config"] == dataclasses.asdict(dataclasses.replace(work["cfg"], n_experts=4, moe_top_k=2))
    train_events = [e for e in map(json.loads, open("moe/metrics.jsonl")) if e["event"] == "train"]
    assert len(train_events) == 2 and all(len(e["expert_load"]) == 2 for e in train_events)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        out = sample.main(["--ckpt", "moe/ckpt.pt", "--prompt", "Once upon a time", "--max-new-tokens", "5"])
    assert len(out) == 1 and out[0].startswith("Once upon a time")


def test_init_from_errors_are_one_line(work):
    os.chdir(work["dir"])
    for argv, message in [
            (["--init_from=dense/ckpt.pt", "--d_model=128"],
             "--d_model=128 disagrees with dense/ckpt.pt, whose weights have d_model=64"),
            (["--init_from=missing/ckpt.pt"], "no checkpoint at missing/ckpt.pt"),
            (["--init_from=dense/ckpt.pt", "--cross_init=zero"], "dense/ckpt.pt is not one (a pretrain checkpoint)"),
            (["--cross_init=zero"], "--cross_init says how to adapt a Llama / Mistral --init_from; there is none here"),
            (["--init_from=dense/ckpt.pt", "--cross_init=copy"], "--cross_init='copy': use 'self' or 'zero'"),
            ([f"--init_from={work['llama']}"],   # the Llama's own vocabulary, on Mistral-tokenized data
             f"data/sample was tokenized with 'mistral' (32,256 ids) but {work['llama']} uses 'hf:{work['llama']}' "
             f"(1,280 ids): run `python prepare.py sample --tokenizer hf:{work['llama']} --out-dir DIR`")]:
        with contextlib.redirect_stdout(io.StringIO()), pytest.raises(SystemExit) as e:
            train.main(["--dataset=sample", "--device=cpu", "--out_dir=never", *argv])
        assert message in one_line(e)
        assert not os.path.exists("never")


def test_the_llama_recipe_end_to_end(work):
    """prepare.py --tokenizer hf:DIR, train.py --init_from=DIR (no model key given: all from the Llama), sample.py."""
    os.chdir(work["dir"])
    llama = work["llama"]
    run(["--dataset=sample_hf", "--device=cpu", "--dtype=float32", f"--init_from={llama}", "--out_dir=adapted",
         "--encoder_len=128", "--decoder_len=64", "--eval_docs=16", "--eval_batch_size=16", steps(2),
         "--batch_size=8", "--micro_batch_size=8", "--learning_rate=1e-3", "--log_interval=1"])
    ckpt = checkpoint.load_checkpoint("adapted/ckpt.pt")
    cfg = ckpt["model_config"]
    assert (cfg["ffn"], cfg["cross_rope"], cfg["scale_output"], cfg["vocab_size"], cfg["n_encoder_layers"]) == \
        ("gated-silu", False, False, 1280, 2)
    assert ckpt["tokenizer"] == "hf:" + llama and ckpt["config"]["init_from"] == llama
    trained = [e for e in map(json.loads, open("adapted/metrics.jsonl")) if e["event"] == "train"]
    assert len(trained) == 2 and all(torch.isfinite(torch.tensor(e["loss"])) for e in trained)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        out = sample.main(["--ckpt", "adapted/ckpt.pt", "--prompt", "Once upon a time", "--max-new-tokens", "5"])
    assert len(out) == 1 and out[0].startswith("Once upon a time")
