"""Self-contained exports: `checkpoint.py export` writes the tokenizer's model file and a model card beside the
weights, and load_model / sample.py read the directory with nothing else (the package or the hub that provided
the tokenizer gone, as on another machine)."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import checkpoint  # noqa: E402
import sample  # noqa: E402
import tokenizer  # noqa: E402
from model import ROT5, ROT5Config  # noqa: E402

METRICS = {"val_loss": 5.5, "continuation_loss": 5.25, "full_val_loss": 5.4, "tokens": 123_456, "step": 7}


def write_ckpt(path, tok, **shape) -> None:
    cfg = ROT5Config(vocab_size=tok.vocab_size, d_model=32, n_heads=4, head_dim=8, n_kv_heads=2, d_ff=64,
                     n_encoder_layers=1, n_decoder_layers=1, position="rope", dropout=0.0, pad_token_id=tok.pad_id,
                     eos_token_id=tok.eos_id, **shape)
    torch.manual_seed(0)
    checkpoint.save_checkpoint(str(path), {
        "kind": "pretrain", "model": ROT5(cfg).state_dict(), "model_config": dataclasses.asdict(cfg),
        "tokenizer": tok.name, "config": {"dataset": "sample", "mixture": "ul2", "encoder_len": 128, "batch_size": 4},
        "step": 7, "optimizer": {}, "rng": {}, "metrics": METRICS})


def generate(ckpt: str) -> list[str]:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return sample.main(["--ckpt", ckpt, "--prompt", "Once upon a time", "--max-new-tokens", "6", "--device", "cpu"])


def gone(monkeypatch, what: str) -> None:
    """As on a machine without the package (or the hub) the tokenizer came from."""
    def missing(*_):
        raise SystemExit(f"{what} is not here")

    monkeypatch.setattr(tokenizer, "mistral_model_file", missing)
    monkeypatch.setattr(tokenizer, "t5_model_file", missing)
    tokenizer.get_tokenizer.cache_clear()


def test_an_export_carries_its_tokenizer_and_a_model_card(tmp_path, monkeypatch):
    write_ckpt(tmp_path / "ckpt.pt", tokenizer.get_tokenizer("mistral"))
    with contextlib.redirect_stdout(io.StringIO()):
        checkpoint.main(["export", "--ckpt", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "exp")])
    assert sorted(os.listdir(tmp_path / "exp")) == ["README.md", "config.json", "model.safetensors", "tokenizer.model"]
    with open(tokenizer.mistral_model_file(), "rb") as a, open(tmp_path / "exp" / "tokenizer.model", "rb") as b:
        assert a.read() == b.read()
    card = (tmp_path / "exp" / "README.md").read_text()
    for fact in ("pre-trained with UL2 by train.py", "dataset sample", "7 steps, 123,456 training tokens",
                 "| full_val_loss | 5.4000 |", "| continuation_loss | 5.2500 |", "mistral, 32,256 ids",
                 f"python sample.py --ckpt {tmp_path / 'exp'}"):
        assert fact in card, fact
    expected = generate(str(tmp_path / "ckpt.pt"))
    gone(monkeypatch, "mistral-common")
    with pytest.raises(SystemExit, match="mistral-common is not here"):
        generate(str(tmp_path / "ckpt.pt"))  # the checkpoint needs the package ...
    assert generate(str(tmp_path / "exp")) == expected  # ... the export does not
    _, tok, _ = checkpoint.load_model(str(tmp_path / "exp"))
    assert tok.name == "mistral" and tok.model_file == str(tmp_path / "exp" / "tokenizer.model")
    # a replaced tokenizer file is one line, not other words
    (tmp_path / "exp" / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(SystemExit, match=r"tokenizer.model is not the file the export wrote .*export the model again"):
        checkpoint.load_model(str(tmp_path / "exp"))


def test_a_t5_tokenizer_travels_too(tmp_path, t5_spiece, monkeypatch):
    tok = tokenizer.Tokenizer("t5:" + t5_spiece)
    write_ckpt(tmp_path / "ckpt.pt", tok)
    with contextlib.redirect_stdout(io.StringIO()):
        checkpoint.main(["export", "--ckpt", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "exp")])
    assert json.loads((tmp_path / "exp" / "config.json").read_text())["tokenizer_file"] == "spiece.model"
    expected = generate(str(tmp_path / "ckpt.pt"))
    gone(monkeypatch, "the hub")
    assert generate(str(tmp_path / "exp")) == expected
