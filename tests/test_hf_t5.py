"""Hugging Face T5 in and out of ROT5, offline: hf_t5.to_hf_t5 inverts from_hf_t5 exactly; every checkpoint exports
to safetensors and loads back to identical outputs; the T5 baseline exports to an HF T5 directory; finetune.py
fine-tunes an HF T5 save_pretrained directory with T5's own tokenizer layout; one-line errors for what cannot
work. The HF models are random tiny T5s (conftest.save_hf_t5) and T5's spiece.model is a stand-in trained on the
bundled real stories (conftest.t5_spiece): no hub access."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch

import checkpoint
import finetune
import prepare
import sample
import train
from checkpoint import load_model, save_checkpoint
from generate import generate
from hf_t5 import from_hf_t5, to_hf_t5
from batch import padded_batch, shift_right
from model import ROT5, ROT5Config
from tokenizer import get_tokenizer

transformers = pytest.importorskip("transformers")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FT_CONFIG = os.path.join(ROOT, "config", "finetune_sample_cpu.py")


def real_batch(tok, n: int = 6, src_len: int = 40, tgt_len: int = 12):
    """n real story openings of different lengths as right-padded encoder inputs (+ eos), the text after them as
    labels."""
    with open(os.path.join(ROOT, "data", "sample", "stories.txt"), encoding="utf-8") as f:
        stories = [s.strip() for s in f.read().split("<|endoftext|>") if s.strip()][:n]
    src = [ids[:src_len - 4 * i] + [tok.eos_id] for i, ids in enumerate(tok.encode([s[:300] for s in stories]))]
    tgt = [ids[:tgt_len] + [tok.eos_id] for ids in tok.encode([s[300:600] for s in stories])]
    x = torch.full((n, max(map(len, src))), tok.pad_id)
    labels = torch.full((n, max(map(len, tgt))), -100)
    for i, (s, t) in enumerate(zip(src, tgt)):
        x[i, :len(s)], labels[i, :len(t)] = torch.tensor(s), torch.tensor(t)
    return x, (x != tok.pad_id).long(), labels


def rot5_logits(model: ROT5, x, am, labels) -> torch.Tensor:
    """At every decoder position, as HF computes them: decoder inputs shifted HF's way (one segment a row)."""
    dec = shift_right(labels, torch.ones_like(labels), model.cfg.pad_token_id)
    with torch.no_grad():
        return model(padded_batch(model.cfg, x, am, decoder_input_ids=dec)).logits


def hf_logits(hf, x, am, labels) -> torch.Tensor:
    with torch.no_grad():
        return hf(input_ids=x, attention_mask=am, labels=labels).logits


def assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    """ROT5 vs HF T5: the same fp32 arithmetic in another order (fused projections, another attention kernel), so
    they differ by rounding only: a few ulp (2**-23 = 1.2e-7) per operation, compounded over a few layers; 1e-5 of
    the logit scale leaves room for that and none for a misplaced weight (which moves logits by O(1))."""
    assert (ours - ref).abs().max() <= 1e-5 * ref.abs().max()


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert msg and "\n" not in msg, msg
    return msg


# -----------------------------------------------------------------------------
# to_hf_t5 is the inverse of from_hf_t5

@pytest.mark.parametrize("ffn", ["relu", "gated-gelu"])
def test_to_hf_t5_inverts_from_hf_t5_exactly(ffn, hf_t5_dirs, t5_spiece):
    """v1.0 (relu, tied, scaled output) and v1.1 (gated-gelu, untied): HF -> ROT5 -> HF gives back every tensor
    bit for bit, so the exported model computes exactly what the original computes; ROT5 <- ROT5 too."""
    hf = transformers.T5ForConditionalGeneration.from_pretrained(hf_t5_dirs[ffn]).eval()
    model = from_hf_t5(hf).eval()
    back = to_hf_t5(model).eval()
    ref, got = hf.state_dict(), back.state_dict()
    assert ref.keys() == got.keys()
    assert all(torch.equal(ref[k], got[k]) for k in ref), [k for k in ref if not torch.equal(ref[k], got[k])]
    assert (back.lm_head.weight is back.shared.weight) == (ffn == "relu")  # tied stays tied, untied stays untied
    assert back.config.scale_decoder_outputs == (ffn == "relu") if hasattr(back.config, "scale_decoder_outputs") \
        else back.config.tie_word_embeddings == (ffn == "relu")
    x, am, labels = real_batch(get_tokenizer("t5:" + t5_spiece))
    assert (am == 0).any()
    assert torch.equal(hf_logits(back, x, am, labels), hf_logits(hf, x, am, labels))
    assert_close(rot5_logits(model, x, am, labels), hf_logits(back, x, am, labels))
    again = from_hf_t5(back)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("ffn,tie", [("relu", True), ("gated-gelu", False)])
def test_a_rot5_t5_baseline_becomes_an_hf_t5(ffn, tie):
    """A T5 baseline made by ROT5 itself (its own init, the Mistral vocabulary's pad/eos ids) -> HF T5 -> ROT5:
    the same tensors; HF's logits are ROT5's."""
    tok = get_tokenizer("mistral")
    torch.manual_seed(0)
    model = ROT5(ROT5Config(vocab_size=tok.vocab_size, d_model=32, n_heads=4, head_dim=8, n_kv_heads=4, d_ff=64,
                            n_encoder_layers=2, n_decoder_layers=3, ffn=ffn, tie_embeddings=tie, dropout=0.0, attention_dropout=0.0,
                            pad_token_id=tok.pad_id, eos_token_id=tok.eos_id)).eval()
    hf = to_hf_t5(model).eval()
    c = hf.config
    assert (c.pad_token_id, c.decoder_start_token_id, c.eos_token_id) == (tok.pad_id, tok.pad_id, tok.eos_id)
    back = from_hf_t5(hf)
    assert back.cfg == model.cfg
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())
    x, am, labels = real_batch(tok)
    assert_close(rot5_logits(model, x, am, labels), hf_logits(hf, x, am, labels))


@pytest.mark.parametrize("change", [dict(position="rope"), dict(n_kv_heads=2), dict(n_experts=2)])
def test_to_hf_t5_refuses_what_t5_cannot_express(change):
    model = ROT5(ROT5Config(**{**dict(vocab_size=256, d_model=32, n_heads=4, head_dim=8, n_kv_heads=4, d_ff=64,
                                      n_encoder_layers=2, n_decoder_layers=2, pad_token_id=0, eos_token_id=1), **change}))
    with pytest.raises(ValueError) as e:
        to_hf_t5(model)
    assert "only the T5 baseline" in one_line(e) and "safetensors" in str(e.value)


# -----------------------------------------------------------------------------
# export: safetensors for every model, an HF T5 directory for the T5 baseline

def write_ckpt(path, cfg: ROT5Config, tokenizer: str, seed: int = 0) -> ROT5:
    torch.manual_seed(seed)
    model = ROT5(cfg)
    save_checkpoint(str(path), {"kind": "pretrain", "model": model.state_dict(), "model_config": dataclasses.asdict(cfg),
                                "tokenizer": tokenizer, "config": {"encoder_len": 128, "seed": seed}, "step": 7,
                                "optimizer": {}, "rng": {}, "metrics": {"val_loss": 5.5, "tokens": 1000}})
    return model


def test_safetensors_export_loads_back_to_identical_outputs(tmp_path):
    """RoPE + GQA + MoE (what no HF T5 can hold): export, load the directory, the same logits bit for bit, and
    the same greedy generation; config.json keeps the checkpoint's keys; sample.py reads the directory."""
    tok = get_tokenizer("mistral")
    cfg = ROT5Config(vocab_size=tok.vocab_size, d_model=32, n_heads=4, head_dim=8, n_kv_heads=2, d_ff=64,
                     n_encoder_layers=2, n_decoder_layers=2, position="rope", n_experts=2, dropout=0.0,
                     pad_token_id=tok.pad_id, eos_token_id=tok.eos_id)
    write_ckpt(tmp_path / "ckpt.pt", cfg, "mistral")
    with contextlib.redirect_stdout(io.StringIO()):
        checkpoint.main(["export", "--ckpt", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "exp")])
    assert sorted(os.listdir(tmp_path / "exp")) == ["README.md", "config.json", "model.safetensors", "tokenizer.model"]
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", "exp"]  # no temporary directory left behind
    config = json.loads((tmp_path / "exp" / "config.json").read_text())
    assert config["model_type"] == "rot5" and config["step"] == 7 and config["model_config"] == dataclasses.asdict(cfg)
    from safetensors.torch import load_file
    a, tok_a, ckpt_a = load_model(str(tmp_path / "ckpt.pt"))
    b, tok_b, ckpt_b = load_model(str(tmp_path / "exp"))
    assert tok_b.name == tok_a.name and prepare.tokenizer_sha256(tok_b) == prepare.tokenizer_sha256(tok_a)
    assert ckpt_b["config"] == ckpt_a["config"] and ckpt_b["metrics"] == ckpt_a["metrics"]
    weights = load_file(str(tmp_path / "exp" / "model.safetensors"))
    assert weights.keys() == a.state_dict().keys() and all(torch.equal(weights[k], v) for k, v in a.state_dict().items())
    x, am, labels = real_batch(tok)
    assert torch.equal(rot5_logits(a, x, am, labels), rot5_logits(b, x, am, labels))
    assert torch.equal(generate(a, x, am, max_new_tokens=8), generate(b, x, am, max_new_tokens=8))
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert sample.main(["--ckpt", str(tmp_path / "exp"), "--prompt", "Once upon a time", "--max-new-tokens", "4"]) \
            == sample.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--prompt", "Once upon a time", "--max-new-tokens", "4"])


def test_hf_export_of_the_t5_baseline(tmp_path):
    tok = get_tokenizer("mistral")
    cfg = ROT5Config(vocab_size=tok.vocab_size, d_model=32, n_heads=4, head_dim=8, n_kv_heads=4, d_ff=64,
                     n_encoder_layers=2, n_decoder_layers=2, ffn="gated-gelu", tie_embeddings=False, dropout=0.0,
                     pad_token_id=tok.pad_id, eos_token_id=tok.eos_id)
    model = write_ckpt(tmp_path / "ckpt.pt", cfg, "mistral").eval()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        checkpoint.main(["export", "--ckpt", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "hf"), "--hf"])
    hf = transformers.T5ForConditionalGeneration.from_pretrained(str(tmp_path / "hf")).eval()
    x, am, labels = real_batch(tok)
    assert_close(rot5_logits(model, x, am, labels), hf_logits(hf, x, am, labels))
    assert "spiece.model" not in os.listdir(tmp_path / "hf")  # the Mistral vocabulary is not T5's tokenizer


def test_export_errors_are_one_line_and_write_nothing(tmp_path):
    tok = get_tokenizer("mistral")
    cfg = ROT5Config(vocab_size=tok.vocab_size, d_model=32, n_heads=4, head_dim=8, n_kv_heads=2, d_ff=64,
                     n_encoder_layers=1, n_decoder_layers=1, position="rope", pad_token_id=tok.pad_id,
                     eos_token_id=tok.eos_id)
    write_ckpt(tmp_path / "ckpt.pt", cfg, "mistral")
    with pytest.raises(SystemExit) as e:  # RoPE + GQA is no HF T5
        checkpoint.export(str(tmp_path / "ckpt.pt"), str(tmp_path / "hf"), hf=True)
    assert "only the T5 baseline" in one_line(e) and not (tmp_path / "hf").exists()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit) as e:  # never writes into a directory that holds something
        checkpoint.export(str(tmp_path / "ckpt.pt"), str(tmp_path / "taken"))
    assert "exists" in one_line(e) and os.listdir(tmp_path / "taken") == ["notes.txt"]
    (tmp_path / "exp").mkdir()  # an empty one is fine
    checkpoint.export(str(tmp_path / "ckpt.pt"), str(tmp_path / "exp"))
    (tmp_path / "exp" / "model.safetensors").write_bytes(b"cut short")
    with pytest.raises(SystemExit) as e:
        load_model(str(tmp_path / "exp"))
    assert "not a readable safetensors file" in one_line(e)
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", "exp", "taken"]


# -----------------------------------------------------------------------------
# T5's tokenizer layout, and loading HF T5 models

def test_t5_tokenizer_layout(t5_spiece):
    """HF T5Tokenizer's layout: pad 0 (the decoder start), eos 1, unk 2, <extra_id_k> = n + 99 - k, the vocabulary
    rounded up to a multiple of 128 (T5's 32,100 -> 32,128) with the unused top ids never generated."""
    tok = get_tokenizer("t5:" + t5_spiece)
    n = tok.base_vocab_size
    assert (tok.pad_id, tok.eos_id, tok._sp.unk_id(), n) == (0, 1, 2, 800)
    assert tok.sentinel_ids[0] == n + 99 and tok.sentinel_ids[99] == n and len(tok.sentinel_ids) == 100
    assert tok.vocab_size == 1024 and tok.unused_ids == list(range(n + 100, 1024))
    assert tok.mode_ids == {} and tok.mode_prefix("S") == [] and set(tok.unused_ids) <= set(tok.non_text_ids())
    ids = tok.encode("One day, Lily <extra_id_0> to the park. <extra_id_1>", allow_sentinels=True)
    assert tok.sentinel_ids[0] in ids and tok.sentinel_ids[1] == ids[-1]
    assert tok.decode(ids) == "One day, Lily<extra_id_0> to the park.<extra_id_1>"
    assert tok.decode([0, *tok.encode("Tom ran."), 1, 0]) == "Tom ran."  # pad and eos are not text
    assert pickle.loads(pickle.dumps(tok)).name == tok.name == "t5:" + os.path.abspath(t5_spiece)
    with pytest.raises(ValueError, match="is not T5's SentencePiece model"):
        get_tokenizer("t5:" + get_tokenizer("mistral").model_file)  # Mistral's: pad -1, eos 2


def test_hf_t5_loading_errors_are_one_line(tmp_path, hf_t5_dirs, t5_spiece):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as e:
        load_model(str(tmp_path / "empty"))
    assert "has no config.json" in one_line(e)
    transformers.BartConfig(vocab_size=64, d_model=16).save_pretrained(str(tmp_path / "bart"))
    with pytest.raises(SystemExit) as e:
        load_model(str(tmp_path / "bart"))
    assert "is a 'bart' model, not T5" in one_line(e)
    transformers.T5EncoderModel(transformers.T5Config(vocab_size=1024, d_model=16, d_kv=4, d_ff=32, num_heads=4,
                                                      num_layers=1)).save_pretrained(str(tmp_path / "encoder"))
    (tmp_path / "encoder" / "spiece.model").write_bytes(open(t5_spiece, "rb").read())
    with contextlib.redirect_stderr(io.StringIO()), pytest.raises(SystemExit) as e:
        load_model(str(tmp_path / "encoder"))
    assert "not a whole T5ForConditionalGeneration" in one_line(e)
    os.makedirs(tmp_path / "no_spiece")
    for name in ("config.json", "model.safetensors"):
        (tmp_path / "no_spiece" / name).write_bytes(open(os.path.join(hf_t5_dirs["relu"], name), "rb").read())
    with pytest.raises(SystemExit) as e:
        load_model(str(tmp_path / "no_spiece"))
    assert "has no spiece.model" in one_line(e)


def test_unknown_hub_id_offline_is_one_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "finetune.py"), "--init_from=hf:nobody/no-such-t5",
                        f"--out_dir={tmp_path / 'ft'}"], env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1, r.stderr
    assert "could not download nobody/no-such-t5/config.json" in lines[0] and "local save_pretrained directory" in lines[0]


# -----------------------------------------------------------------------------
# fine-tuning an HF T5 with finetune.py

@pytest.fixture(scope="module")
def flan_run(tmp_path_factory, hf_t5_dirs):
    """The real Instruct pairs tokenized with the stand-in T5 tokenizer, and the sample fine-tuning config run on
    the v1.1 (FLAN-T5's layout) directory."""
    work = tmp_path_factory.mktemp("flan")
    cwd = os.getcwd()
    os.chdir(work)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            prepare.prepare("sample_instruct", out_dir="data/sample_instruct_t5", workers=1,
                            tokenizer="t5:" + hf_t5_dirs["gated-gelu"])
            prepare.prepare("sample_instruct", out_dir="data/sample_instruct", workers=1)
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            final = finetune.main([FT_CONFIG, f"--init_from={hf_t5_dirs['gated-gelu']}", "--out_dir=ft",
                                   "--dataset=sample_instruct_t5", "--encoder_len=256"])
        yield {"dir": work, "final": final, "stdout": out.getvalue()}
    finally:
        os.chdir(cwd)


def test_finetune_from_an_hf_t5_directory(flan_run, hf_t5_dirs):
    events = [json.loads(line) for line in open(flan_run["dir"] / "ft" / "metrics.jsonl")]
    losses = [e["loss"] for e in events if e["event"] == "train"]
    assert len(losses) == 10 and sum(losses[-3:]) < sum(losses[:3])  # 10 steps on 2 pairs: the loss falls
    evals = [e for e in events if e["event"] == "eval"]
    assert [e["step"] for e in evals] == [0, 5, 10] and evals[-1] == flan_run["final"]
    assert 0.0 <= flan_run["final"]["rougeL"] <= 100.0 and flan_run["final"]["lead1_rougeL"] > 0.0
    model, tok, ckpt = load_model(str(flan_run["dir"] / "ft" / "ckpt.pt"))
    assert tok.name == "t5:" + hf_t5_dirs["gated-gelu"] and ckpt["kind"] == "finetune"
    assert (model.cfg.position, model.cfg.ffn, model.cfg.pad_token_id, model.cfg.eos_token_id) == ("t5", "gated-gelu", 0, 1)
    # the T5 input format without a mode token: "Summarize:" story </s>
    pair = prepare.load_pairs("data/sample_instruct_t5", "val")[0]
    ids, _ = finetune.summarize_input(pair[0], tok, 10_000)
    assert ids == tok.encode(finetune.TASK_PREFIX) + [int(i) for i in pair[0]] + [1]
    row = json.loads(open(flan_run["dir"] / "ft" / "predictions.jsonl").readline())
    assert row["reference"] == tok.decode(pair[1]) and "<extra_id" not in row["prediction"]


def test_sample_and_hf_export_of_the_finetuned_hf_t5(flan_run, tmp_path, monkeypatch):
    """The fine-tuned model summarizes with sample.py, and goes back to HF with its spiece.model: the same logits."""
    monkeypatch.chdir(flan_run["dir"])
    model, tok, _ = load_model("ft/ckpt.pt")
    story = tok.decode(prepare.load_pairs("data/sample_instruct_t5", "val")[0][0])[:400]  # fits encoder_len=256
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        out = sample.main(["--ckpt", "ft/ckpt.pt", "--prompt", story, "--max-new-tokens", "8"])
        checkpoint.main(["export", "--ckpt", "ft/ckpt.pt", "--out", str(tmp_path / "hf"), "--hf"])
    ids, cut = finetune.summarize_input(tok.encode(story), tok, 256)
    assert not cut
    expected = generate(model, torch.tensor([ids]), max_new_tokens=8, eos_token_id=1, suppress_tokens=tok.non_text_ids())
    assert out == [tok.decode(finetune.until_eos(expected[0].tolist(), 1))]
    assert sorted(os.listdir(tmp_path / "hf")) == ["README.md", "config.json", "generation_config.json",
                                                   "model.safetensors", "spiece.model"]
    hf = transformers.T5ForConditionalGeneration.from_pretrained(str(tmp_path / "hf")).eval()
    x, am, labels = real_batch(tok)
    assert_close(rot5_logits(model, x, am, labels), hf_logits(hf, x, am, labels))
    # and the export is itself a model finetune.py and sample.py take: the same weights, the same tokenizer file
    again, tok2, _ = load_model(str(tmp_path / "hf"))
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())
    assert prepare.tokenizer_sha256(tok2) == prepare.tokenizer_sha256(tok)


def test_tokenizer_mismatch_is_one_line(flan_run, hf_t5_dirs, monkeypatch):
    """The HF T5 on Mistral-tokenized pairs, and UL2 pre-training on T5-tokenized text: refused, with the fix."""
    monkeypatch.chdir(flan_run["dir"])
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
            pytest.raises(SystemExit) as e:
        finetune.main([FT_CONFIG, f"--init_from={hf_t5_dirs['gated-gelu']}", "--out_dir=ft_mistral_data"])
    assert f"was tokenized with 'mistral' but {hf_t5_dirs['gated-gelu']} uses 't5:" in one_line(e)
    assert f"python prepare.py sample_instruct --tokenizer t5:{hf_t5_dirs['gated-gelu']}" in str(e.value)
    with contextlib.redirect_stdout(io.StringIO()), pytest.raises(SystemExit) as e:
        train.main(["--dataset=sample_instruct_t5", "--out_dir=pre_t5", "--device=cpu"])
    assert "has no UL2 mode tokens" in one_line(e)


def test_the_same_t5_tokenizer_from_another_path_is_accepted(flan_run, hf_t5_dirs, tmp_path, monkeypatch):
    """A T5 tokenizer's name says where its spiece.model came from; the data check pins the file itself
    (sha256), so a copy of the model directory fine-tunes on pairs tokenized from the original."""
    copy = tmp_path / "same_model_elsewhere"
    shutil.copytree(hf_t5_dirs["gated-gelu"], copy)
    monkeypatch.chdir(flan_run["dir"])
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        final = finetune.main([FT_CONFIG, f"--init_from={copy}", f"--out_dir={tmp_path / 'ft'}",
                               "--dataset=sample_instruct_t5", "--encoder_len=256"])
    assert final["step"] == flan_run["final"]["step"]
