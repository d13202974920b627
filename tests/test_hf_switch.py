"""hf_switch.from_hf_switch reproduces Hugging Face SwitchTransformers where no token is dropped (expert_capacity
at least the rows' length): logits, loss and greedy decoding, with a Switch FFN in every layer, every other layer
and every fourth (moe_step 1, 2, 4); with a capacity that drops tokens the two differ, as documented. Then the
Switch recipe end to end: finetune.py from the save_pretrained directory, sample.py from the result. Random tiny
HF models with T5's stand-in spiece.model (conftest), real story lines: no hub access."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import shutil

import pytest
import torch

import finetune
import prepare
import sample
from batch import padded_batch, shift_right
from checkpoint import load_model
from generate import generate
from hf_switch import from_hf_switch
from tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_NEW = 16


def hf_switch(vocab: int, sparse_layers: int, capacity: int = 64, seed: int = 0):
    """A tiny random Switch Transformer: 4 + 4 layers, `sparse_layers` of them sparse per stack (HF's sparse_step =
    4 // sparse_layers), 4 experts. Layer outputs scaled up (as tests/test_hf_parity.py does for T5) so that the
    decoder does not just echo its input embedding and routing differs from token to token."""
    torch.manual_seed(seed)
    cfg = transformers.SwitchTransformersConfig(
        vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_heads=4, num_layers=4, num_decoder_layers=4,
        num_sparse_encoder_layers=sparse_layers, num_sparse_decoder_layers=sparse_layers, num_experts=4,
        expert_capacity=capacity, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    hf = transformers.SwitchTransformersForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith(("o.weight", "wo.weight")):
                p.mul_(4.0)
    return hf


def story_batch(tok, n: int = 12, src_len: int = 24, tgt_len: int = 12):
    """n real story lines (+ eos) as right-padded encoder inputs, the following lines as labels."""
    lines = [l for l in open(os.path.join(ROOT, "data", "sample", "stories.txt"), encoding="utf-8").read().splitlines()
             if l.strip() and "<|endoftext|>" not in l]
    src = [s[:src_len - i] + [tok.eos_id] for i, s in enumerate(tok.encode(lines[:n]))]
    tgt = [s[:tgt_len] + [tok.eos_id] for s in tok.encode(lines[1:n + 1])]
    x, labels = torch.full((n, max(map(len, src))), tok.pad_id), torch.full((n, max(map(len, tgt))), -100)
    for i, (s, t) in enumerate(zip(src, tgt)):
        x[i, :len(s)], labels[i, :len(t)] = torch.tensor(s), torch.tensor(t)
    return x, (x != tok.pad_id).long(), labels


def compare(hf, model, x, am, labels) -> tuple[float, float, float]:
    """(max relative logit difference over the labels' positions, ROT5's loss, HF's loss)."""
    dec = shift_right(labels, torch.ones_like(labels), model.cfg.pad_token_id)
    with torch.no_grad():
        ref = hf(input_ids=x, attention_mask=am, labels=labels)
        ours = model(padded_batch(model.cfg, x, am, decoder_input_ids=dec)).logits
        loss = model(padded_batch(model.cfg, x, am, labels)).loss
    real = labels != -100
    return ((ours - ref.logits)[real].abs().max() / ref.logits[real].abs().max()).item(), loss.item(), ref.loss.item()


@pytest.mark.parametrize("sparse_layers,moe_step", [(4, 1), (2, 2), (1, 4)])
def test_switch_matches_hf_where_nothing_is_dropped(t5_spiece, sparse_layers, moe_step):
    """Capacity 64 >= every row's length: no expert of any row overflows. The same fp32 arithmetic in another order
    (fused projections, per-expert batches gathered differently): rounding only, 1e-5 of the logits' scale, as
    the T5 parity tests; the loss to 1e-5 relative."""
    tok = Tokenizer("t5:" + t5_spiece)
    hf = hf_switch(tok.vocab_size, sparse_layers)
    model = from_hf_switch(hf).eval()
    cfg = model.cfg
    moe_layers = [i for i in range(4) if cfg.moe_layer(i)]
    hf_sparse = [i for i, block in enumerate(hf.encoder.block) if block.is_sparse]
    assert cfg.moe_step == moe_step and moe_layers == hf_sparse and len(moe_layers) == sparse_layers
    assert (cfg.n_experts, cfg.moe_top_k, cfg.aux_loss_coef, cfg.z_loss_coef) == (4, 1, 1e-3, 1e-3)
    x, am, labels = story_batch(tok)
    assert x.shape[1] <= 64 and (am == 0).any()
    rel, loss, ref_loss = compare(hf, model, x, am, labels)
    print(f"Switch, MoE every {moe_step} layer(s): max relative logit difference {rel:.2e}")
    assert rel < 1e-5 and loss == pytest.approx(ref_loss, rel=1e-5)
    ref = hf.generate(input_ids=x, attention_mask=am, max_new_tokens=MAX_NEW, do_sample=False)[:, 1:]
    ours = generate(model, x, am, max_new_tokens=MAX_NEW)
    assert torch.equal(ours, ref)
    with torch.no_grad():  # the routing is not trivial: some MoE layer sends tokens to every expert
        load = model(padded_batch(cfg, x, am, labels)).expert_load
    assert load.shape == (2 * sparse_layers, 4) and (load > 0).all(1).any()


def test_dropped_tokens_are_what_differs(t5_spiece):
    """HF drops a row's tokens past expert_capacity per expert; ROT5 is dropless. At capacity 2 (rows of ~25
    tokens, 4 experts) HF drops many, and the logits differ by far more than rounding: the one difference between
    the two, which the test above rules out by its capacity."""
    tok = Tokenizer("t5:" + t5_spiece)
    x, am, labels = story_batch(tok)
    full, small = hf_switch(tok.vocab_size, 2, capacity=64), hf_switch(tok.vocab_size, 2, capacity=2)
    assert all(torch.equal(a, b) for a, b in zip(full.state_dict().values(), small.state_dict().values()))
    model = from_hf_switch(small).eval()
    assert compare(full, model, x, am, labels)[0] < 1e-5
    assert compare(small, model, x, am, labels)[0] > 1e-2


def test_the_switch_recipe_end_to_end(t5_spiece, tmp_path, monkeypatch):
    """A Switch save_pretrained directory with T5's spiece.model: load_model reads it, finetune.py fine-tunes it on
    the real Instruct pairs (tokenized with its tokenizer), sample.py summarizes with the result."""
    hf = hf_switch(Tokenizer("t5:" + t5_spiece).vocab_size, 2)
    hf.save_pretrained(str(tmp_path / "switch"))
    shutil.copy(t5_spiece, tmp_path / "switch" / "spiece.model")
    model, tok, ckpt = load_model(str(tmp_path / "switch"))
    assert ckpt["kind"] == "hf-switch" and tok.name == "t5:" + str(tmp_path / "switch") and model.cfg.n_experts == 4
    monkeypatch.chdir(tmp_path)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        prepare.prepare("sample_instruct", out_dir="data/sample_instruct_t5", workers=1, tokenizer=tok.name)
        final = finetune.main([os.path.join(ROOT, "config", "finetune_sample_cpu.py"), "--init_from=switch",
                               "--out_dir=ft", "--dataset=sample_instruct_t5", "--encoder_len=256", "--epochs=2",
                               "--eval_interval=2"])
        out = sample.main(["--ckpt", "ft/ckpt.pt", "--prompt", "Tom saw a big red ball in the park.", "--max-new-tokens", "6"])
    tuned, _, ckpt = load_model("ft/ckpt.pt")
    assert ckpt["kind"] == "finetune" and final["step"] == ckpt["step"] == 2
    assert tuned.cfg == dataclasses.replace(model.cfg, dropout=0.1, attention_dropout=0.1)  # fine-tuning's dropout
    assert not all(torch.equal(v, model.state_dict()[k]) for k, v in tuned.state_dict().items())
    assert len(out) == 1 and isinstance(out[0], str)
