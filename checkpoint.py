"""Checkpoints: an atomic save, loading with one-line errors, and load_model for the scripts downstream; the
run directory of train.py and finetune.py (check_start, resume_run, the metrics log, stale temp files).

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
import glob
import json
import os
from collections.abc import Callable
import random

import numpy as np
import torch

from diskio import append_line, atomic_write, remove_stale_temps

REQUIRED_KEYS = ("kind", "model", "model_config", "tokenizer", "config", "step")


def save_checkpoint(path: str, obj: dict) -> None:
    """torch.save(obj, path) so that path always holds a whole checkpoint, the old one or the new one
    (diskio.atomic_write: a crash, a kill -9 or a full disk at any point leaves the old file intact). Lack of
    space ends the run with one line (diskio.WriteFailed) that says how to resume from the old checkpoint."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path, "wb", needed=_tensor_bytes(obj), then=resume_hint(path)) as f:
        torch.save(obj, f)


def _tensor_bytes(obj) -> int:
    """Bytes of the tensors in a nested dict/list: what a checkpoint needs on disk, give or take its metadata."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


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


def restart_log(metrics_path: str, resumed_step: int | None, say: Callable[[str], None] = print) -> None:
    """A run's metrics.jsonl at its start: empty for a new run (resumed_step None); for a resumed one, the
    events up to its checkpoint's step (a crashed run may have logged steps past it). A run killed mid-append
    leaves a last line without its newline: it is dropped, with a note. Rewritten atomically, so a crash
    here cannot lose the log either."""
    events: list[bytes] = []
    if resumed_step is not None and os.path.exists(metrics_path):
        with open(metrics_path, "rb") as f:
            *lines, torn = f.read().split(b"\n")  # every append ends in a newline: torn is b"" unless cut short
        if torn:
            say(f"note: dropped the last line of {metrics_path} ({len(torn)} bytes without a newline: the run was "
                "stopped while writing it)")
        for number, line in enumerate(lines, 1):
            try:
                keep = json.loads(line)["step"] <= resumed_step
            except (ValueError, TypeError, KeyError):  # (UnicodeDecodeError is a ValueError)
                raise SystemExit(f"{metrics_path} line {number} is not a metrics event ({line[:60]!r}): delete that "
                                 "line, then resume again") from None
            if keep:
                events.append(line + b"\n")
    with atomic_write(metrics_path, "wb", then=resume_hint(os.path.join(os.path.dirname(metrics_path), "ckpt.pt"))) as f:
        f.writelines(events)


def log_event(metrics_path: str, event: dict) -> None:
    """Append one event to a run's metrics.jsonl; lack of space is one line that says how to resume."""
    append_line(metrics_path, json.dumps(event) + "\n",
                then=resume_hint(os.path.join(os.path.dirname(metrics_path), "ckpt.pt")))


def resume_hint(ckpt_path: str) -> str:
    """What a run that cannot write any more keeps, and how to go on: for the one-line error of diskio."""
    if os.path.exists(ckpt_path):
        return (f"the last checkpoint, {ckpt_path}, is intact: free some space, then continue the run with the same "
                "command and --resume=True")
    return "no checkpoint was written yet: free some space, then run the same command again"


# the files a run writes in its out_dir with diskio.atomic_write: their temp files are the run's own
RUN_FILES = ["ckpt.pt", "metrics.jsonl", "predictions.jsonl"]


def remove_run_temps(out_dir: str, say: Callable[[str], None] = print) -> None:
    """At a run's start in out_dir: delete the temp files of writes that a kill interrupted (a checkpoint-sized
    one per kill; before diskio, checkpoints used ckpt.pt.tmp<pid>, removed too)."""
    remove_stale_temps(out_dir, RUN_FILES, say)
    for legacy in glob.glob(os.path.join(glob.escape(out_dir), "ckpt.pt.tmp*")):
        os.unlink(legacy)
        say(f"removed {legacy}, left by an interrupted checkpoint save")


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
