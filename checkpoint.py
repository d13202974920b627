"""Checkpoints: an atomic save, loading with one-line errors, and load_model for the scripts downstream.

A checkpoint is a dict (torch.save) with the keys
    kind          "pretrain" (train.py) | "finetune" (finetune.py)
    model         the model's state_dict
    model_config  dataclasses.asdict(ROT5Config): enough to rebuild the model without the run's config
    tokenizer     the tokenizer's name (tokenizer.get_tokenizer)
    config        the run's flat config dict (configurator.configure)
    step          optimizer steps done
    optimizer     the optimizer's state_dict
    rng           random_states(): python, numpy, torch (and cuda) generators
    metrics       the last evaluation, tokens seen, ...
Everything in it is a tensor or a plain Python value, so it loads with torch.load(weights_only=True):
opening a checkpoint never runs code from it.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
import random

import numpy as np
import torch

REQUIRED_KEYS = ("kind", "model", "model_config", "tokenizer", "config", "step")


def save_checkpoint(path: str, obj: dict) -> None:
    """torch.save(obj, path) so that path always holds a whole checkpoint, the old one or the new one.

    Write a temporary file in the same directory (os.replace is atomic only within one file system), fsync it
    so its bytes are on disk before the rename makes it visible, rename it over path, then fsync the
    directory so the rename itself survives a power cut. A crash at any point leaves the old file intact.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    if os.name == "posix":  # directories cannot be opened for fsync on Windows
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """The checkpoint dict at path; one clear line if it is missing, unreadable or not a ROT5 checkpoint."""
    if not os.path.isfile(path):
        raise SystemExit(f"no checkpoint at {path}: train one with `python train.py CONFIG` (it writes out_dir/ckpt.pt) or fix the path")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated file, a foreign pickle, not a torch file at all, ...
        raise SystemExit(f"{path} is not a readable checkpoint ({first_line(e)[:200]}); was it cut short or written by another program?") from None
    missing = [k for k in REQUIRED_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise SystemExit(f"{path} is not a ROT5 checkpoint: it lacks {', '.join(missing)} "
                         "(train.py and finetune.py write ROT5 checkpoints; HF T5 weights go through ROT5.from_hf_t5)")
    return ckpt


def load_model(path: str, device: str | torch.device = "cpu"):
    """(model in eval mode on device, tokenizer, checkpoint dict) from a train.py / finetune.py checkpoint."""
    from model import ROT5, ROT5Config
    from tokenizer import get_tokenizer

    ckpt = load_checkpoint(path)
    known = {f.name for f in dataclasses.fields(ROT5Config)}
    unknown = sorted(set(ckpt["model_config"]) - known)
    if unknown:
        raise SystemExit(f"{path} has model_config fields {unknown} that this model.py does not know: "
                         "it was written by another ROT5 version; load it with that version")
    try:
        cfg = ROT5Config(**ckpt["model_config"])
        model = ROT5(cfg)
        model.load_state_dict(ckpt["model"])
    except (ValueError, RuntimeError) as e:
        raise SystemExit(f"{path}: the weights do not fit its model_config ({first_line(e)[:300]})") from None
    tok = get_tokenizer(ckpt["tokenizer"])
    if tok.vocab_size != cfg.vocab_size:
        raise SystemExit(f"{path}: tokenizer {tok.name!r} has {tok.vocab_size} ids but the model has vocab_size={cfg.vocab_size}")
    return model.to(device).eval(), tok, ckpt


# -- starting and resuming a run (train.py and finetune.py) ---------------------------------------------------

RESUMED_WITH = {"pretrain": "pre-training from a train.py one", "finetune": "fine-tuning from a finetune.py one"}


def check_start(ckpt_path: str, resume: bool) -> None:
    """A new run never overwrites a run's checkpoint; resuming needs one. One line each, before any work."""
    if not resume and os.path.exists(ckpt_path):
        raise SystemExit(f"{ckpt_path} exists: continue that run with --resume=True, or start a new one with "
                         "another --out_dir (or delete it)")
    if resume and not os.path.exists(ckpt_path):
        raise SystemExit(f"--resume=True but {ckpt_path} does not exist: nothing to resume; run without --resume "
                         "(or fix --out_dir)")


def resume_run(ckpt_path: str, kind: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: dict,
               run_keys: tuple[str, ...], warn: Callable[[str], None]) -> tuple[int, dict]:
    """Load a checkpoint of `kind` into model and optimizer and restore every random generator, so that the run
    continues as an uninterrupted one would. Refuses another kind of checkpoint or another model; warns
    (through `warn`) when any of the run's run_keys changed. Returns (the checkpoint's step, its metrics)."""
    ckpt = load_checkpoint(ckpt_path)  # on the CPU: RNG states must stay there; load_state_dict copies
    if ckpt["kind"] != kind:
        raise SystemExit(f"{ckpt_path} is a {ckpt['kind']} checkpoint: resume {RESUMED_WITH[kind]}")
    model_config = dataclasses.asdict(model.cfg)
    if ckpt["model_config"] != model_config:
        diff = sorted(k for k, v in model_config.items() if ckpt["model_config"].get(k) != v)
        raise SystemExit(f"{ckpt_path} was trained with other model keys ({', '.join(diff)}): resume with the "
                         "config that wrote it, or use a new out_dir")
    changed = sorted(k for k in run_keys if ckpt["config"].get(k) != config[k])
    if changed:
        warn(f"warning: resuming with changed {', '.join(changed)}: the run will not match an uninterrupted one")
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    set_random_states(ckpt["rng"])
    return ckpt["step"], ckpt["metrics"]


def restart_log(metrics_path: str, resumed_step: int | None) -> None:
    """A run's metrics.jsonl at its start: empty for a new run (resumed_step None); for a resumed one, the
    events up to its checkpoint's step (a crashed run may have logged steps past it)."""
    events = [line for line in open(metrics_path) if json.loads(line)["step"] <= resumed_step] \
        if resumed_step is not None and os.path.exists(metrics_path) else []
    with open(metrics_path, "w") as f:
        f.writelines(events)


def first_line(e: BaseException) -> str:
    """An exception's message for a one-line error: its first line (its type's name if it has none)."""
    return (str(e).strip() or type(e).__name__).splitlines()[0]


def random_states() -> dict:
    """Every generator a run draws from, as tensors and plain values (weights_only-loadable)."""
    np_state = np.random.get_state(legacy=False)
    np_state["state"]["key"] = np_state["state"]["key"].tolist()
    return {"python": random.getstate(), "numpy": np_state, "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_random_states(states: dict) -> None:
    random.setstate(states["python"])
    np_state = dict(states["numpy"], state=dict(states["numpy"]["state"]))
    np_state["state"]["key"] = np.array(np_state["state"]["key"], dtype=np.uint32)
    np.random.set_state(np_state)
    torch.set_rng_state(states["torch"])
    # one state per GPU of the machine that saved it; this one may have fewer (resuming on other hardware)
    for i, state in enumerate(states["cuda"][:torch.cuda.device_count()]):
        torch.cuda.set_rng_state(state, i)
