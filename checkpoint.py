"""Checkpoints: an atomic save that keeps the previous checkpoint too, loading with one-line errors (a damaged file
is caught by its checksum), load_model for the scripts downstream, and export; the run directory of train.py
and finetune.py (its lock, check_start, resume_run, the metrics log, stale temp files).

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
    sha256        content_sha256 of all the above, checked at every load: a byte changed on disk after the save
                  (a bad sector, a damaged copy) is one line, never a model that silently loads and is dead
Everything in it is a tensor or a plain Python value, so it loads with torch.load(weights_only=True):
opening a checkpoint never runs code from it.

Each save keeps the checkpoint it replaces as ckpt.prev.pt (previous_path; a hard link, renamed into place
before the new file is, so both names always hold a whole checkpoint). When ckpt.pt is damaged or missing,
resuming falls back to ckpt.prev.pt with a line (load_for_resume). The cost: two checkpoints on disk, three
while a save is being written.

Export, for the Hugging Face hub and every other safetensors loader:
    python checkpoint.py export --ckpt out/rot5_mini/ckpt.pt --out export/rot5_mini        # any ROT5 model
    python checkpoint.py export --ckpt out/t5_base/ckpt.pt --out export/t5_base_hf --hf    # the T5 baseline
The first writes model.safetensors (the weights), config.json (model_type "rot5": the checkpoint's other
keys but the optimizer and the RNG states), the tokenizer's model file (tokenizer.model, or T5's spiece.model;
pinned by its sha256 in config.json) and README.md, a model card (shape, data, training tokens, the last
losses); load_model (so sample.py and finetune.py) reads the directory as it reads the checkpoint, with the
tokenizer file it carries, so the directory needs nothing else on another machine. --hf writes a
T5ForConditionalGeneration.save_pretrained directory (hf_t5.to_hf_t5; with T5's spiece.model when the model
uses T5's tokenizer). A directory is written under a temporary name and
renamed into place when complete; an existing one is never written into.

load_model also reads Hugging Face models: "hf:HUB_ID" (downloaded with huggingface_hub into its cache) or a
save_pretrained directory, by model_type (grow.load_hf): T5 / T5 v1.1 / FLAN-T5 through hf_t5.from_hf_t5 and
Switch Transformers through hf_switch.from_hf_switch, with T5's own tokenizer (the spiece.model beside the
weights, tokenizer "t5:HUB_ID_OR_DIR"); Llama / Mistral causal LMs adapted into an encoder-decoder by
hf_llama.from_hf_llama, with their tokenizer.json ("hf:HUB_ID_OR_DIR"). That is how finetune.py fine-tunes FLAN-T5.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch

from diskio import (SPACE_ERRNOS, append_line, atomic_write, check_out_dir, first_line, fsync_directory, remove_stale_temps,
                    space_error, write_failed)
from grow import is_hf_source, load_hf
from hf_t5 import read_config_json, to_hf_t5

REQUIRED_KEYS = ("kind", "model", "model_config", "tokenizer", "config", "step")
EXPORT_KEYS = ("kind", "model_config", "tokenizer", "config", "step", "metrics")  # config.json of an export


def save_checkpoint(path: str, obj: dict) -> None:
    """torch.save(obj + its sha256, path) so that path always holds a whole checkpoint, the old one or the new
    one (diskio.atomic_write: a crash, a kill -9 or a full disk at any point leaves the old file intact), and
    the old one becomes previous_path(path). Lack of space ends the run with one line (diskio.WriteFailed)
    that says how to resume from the old checkpoint."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    obj = {**obj, "sha256": content_sha256(obj)}
    with atomic_write(path, "wb", needed=_tensor_bytes(obj), then=resume_hint(path),
                      keep_previous=previous_path(path)) as f:
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


def content_sha256(obj: dict) -> str:
    """sha256 over a checkpoint dict's contents, its "sha256" key left out: every tensor's dtype, shape and bytes,
    every plain value's repr, every key, in order. Computed from the dict rather than the file so that the
    dict saved and the dict torch.load returns give the same digest. Tensors are hashed on the CPU, one at a
    time; hashlib's sha256 measured 0.42 GB/s on a busy 2-core Intel Xeon, so a T5-Base checkpoint with its AdamW
    state (2.7 GB) adds ~6 s to each save and each load."""
    h = hashlib.sha256()

    def add(x) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"tensor {t.dtype} {tuple(t.shape)}\n".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy())
        elif isinstance(x, dict):
            h.update(f"dict {len(x)}\n".encode())
            for k, v in x.items():
                h.update(f"{k!r}\n".encode())
                add(v)
        elif isinstance(x, (list, tuple)):
            h.update(f"{type(x).__name__} {len(x)}\n".encode())
            for v in x:
                add(v)
        else:
            h.update(f"{x!r}\n".encode())

    add({k: v for k, v in obj.items() if k != "sha256"})
    return h.hexdigest()


def previous_path(path: str) -> str:
    """Where save_checkpoint keeps the checkpoint that `path` held before: out/run/ckpt.pt -> out/run/ckpt.prev.pt."""
    root, ext = os.path.splitext(path)
    return f"{root}.prev{ext}"


def checkpoint_exists(path: str) -> bool:
    """A run has a checkpoint to resume from: path, or the previous one kept beside it."""
    return os.path.exists(path) or os.path.exists(previous_path(path))


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """The checkpoint dict at path; one clear line if it is missing, unreadable, damaged (its sha256) or not a
    ROT5 checkpoint."""
    if not os.path.exists(path):
        raise SystemExit(f"no checkpoint at {path}: train one with `python train.py CONFIG` (it writes out_dir/ckpt.pt) or fix the path")
    if not os.path.isfile(path):
        raise SystemExit(f"{path} is a {'directory' if os.path.isdir(path) else 'special file'}, not a checkpoint "
                         "file: pass the path of a ckpt.pt (or an export directory to sample.py / finetune.py)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:  # torch's message advises weights_only=False: never quote it
        if "unsupported global" in str(e).lower():
            raise SystemExit(f"{path} is not a readable checkpoint: it holds Python objects other than tensors and "
                             "plain values, which a ROT5 checkpoint never does, so it was not loaded (nothing in it "
                             f"ran); {_instead(path)}") from None
        raise SystemExit(f"{path} is not a readable checkpoint: its contents are not a pickle PyTorch reads (cut short, "
                         f"damaged, or not a checkpoint); {_instead(path)}") from None
    except Exception as e:  # truncated file, not a torch file at all, a read error, ...
        raise SystemExit(f"{path} is not a readable checkpoint ({type(e).__name__}: {first_line(e)[:160]}): it was cut "
                         f"short, damaged, or written by another program; {_instead(path)}") from None
    missing = [k for k in REQUIRED_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise SystemExit(f"{path} is not a ROT5 checkpoint: it lacks {', '.join(missing)} "
                         "(train.py and finetune.py write ROT5 checkpoints; HF T5 weights go through hf_t5.from_hf_t5)")
    recorded = ckpt.pop("sha256", None)  # (checkpoints of ROT5 versions before the checksum have none)
    if recorded is not None and recorded != content_sha256(ckpt):
        raise SystemExit(f"{path} is damaged: its contents no longer match the sha256 recorded when it was saved "
                         f"(a byte changed on disk or in a copy); {_instead(path)}")
    return ckpt


# ROT5Config fields that say how to run a model, not what it computes: a run may resume with others
RUNTIME_FIELDS = ("attention",)


def model_config(ckpt: dict) -> dict:
    """A checkpoint's model_config as this model.py reads it. Checkpoints older than the attention_dropout and
    attention fields had one dropout rate for everything and no kernel choice; older than scale_output, moe_step
    and cross_rope, they computed what those fields' defaults compute (T5's scaled tied output, MoE in every other
    layer, RoPE in cross-attention)."""
    from model import ROT5Config

    config = dict(ckpt["model_config"])
    config.setdefault("attention_dropout", config.get("dropout", 0.1))
    config.setdefault("attention", "auto")
    for name in ("scale_output", "moe_step", "cross_rope"):
        config.setdefault(name, getattr(ROT5Config, name))
    return config


def _instead(path: str) -> str:
    """What to use instead of the unusable checkpoint at path."""
    prev = previous_path(path)
    if os.path.exists(prev):
        return f"use the previous checkpoint, {prev} (--resume=True falls back to it by itself)"
    return "restore it from a copy, or train again"


def load_model(path: str, device: str | torch.device = "cpu", cross_init: str = "self"):
    """(model in eval mode on device, tokenizer, checkpoint dict) from a train.py / finetune.py checkpoint, an
    export directory, or a Hugging Face model ("hf:HUB_ID" or a save_pretrained directory; its dict holds
    kind "hf-t5", "hf-llama" or "hf-switch", the source and an empty run config). cross_init: how a decoder-only
    source's cross-attention starts (grow.py)."""
    from model import ROT5Config
    from tokenizer import get_tokenizer

    if is_hf_source(path):
        model, tok, kind = load_hf(path, cross_init)
        return model.to(device).eval(), tok, {"kind": kind, "source": path, "config": {}}
    ckpt = load_export(path) if os.path.isdir(path) else load_checkpoint(path)
    known = {f.name for f in dataclasses.fields(ROT5Config)}
    unknown = sorted(set(ckpt["model_config"]) - known)
    if unknown:
        raise SystemExit(f"{path} has model_config fields {unknown} that this model.py does not know: "
                         "it was written by another ROT5 version; load it with that version")
    try:
        cfg = ROT5Config(**model_config(ckpt))
    except (ValueError, TypeError) as e:
        raise SystemExit(f"{path}: its model_config is not a valid ROT5Config ({first_line(e)[:300]})") from None
    model = new_model(cfg, torch.device(device))
    try:
        model.load_state_dict(ckpt["model"])
    except (ValueError, RuntimeError) as e:
        raise SystemExit(f"{path}: the weights do not fit its model_config ({first_line(e)[:300]})") from None
    try:
        tok = export_tokenizer(path, ckpt) if os.path.isdir(path) and ckpt.get("tokenizer_file") else \
            get_tokenizer(ckpt["tokenizer"])
    except ValueError as e:  # T5's tokenizer comes from the hub or a directory that may be gone
        raise SystemExit(f"{path}: {first_line(e)}") from None
    if tok.vocab_size != cfg.vocab_size:
        raise SystemExit(f"{path}: tokenizer {tok.name!r} has {tok.vocab_size} ids but the model has vocab_size={cfg.vocab_size}")
    return model.eval(), tok, ckpt


def new_model(cfg, device: torch.device):
    """ROT5(cfg) on device, or one line when its weights do not fit in the device's memory."""
    from model import ROT5

    try:
        return ROT5(cfg).to(device)
    except (RuntimeError, MemoryError) as e:  # CPU: "can't allocate memory"; CUDA: torch.OutOfMemoryError
        if not isinstance(e, (MemoryError, torch.OutOfMemoryError)) and "allocate" not in str(e):
            raise
        raise SystemExit(f"the model does not fit in {device} memory ({first_line(e)[:200]}): make it smaller "
                         "(d_model, d_ff, n_heads x head_dim, layers, vocab_size) or use a larger device") from None


# -- export, and Hugging Face T5 models ------------------------------------------------------------------------

def export(ckpt_path: str, out: str, hf: bool = False) -> None:
    """Write the model of ckpt_path (anything load_model reads) into the new directory `out`: model.safetensors +
    config.json, or with hf=True an HF T5ForConditionalGeneration directory (the T5 baseline only)."""
    check_new_directory(out)  # before the model is read
    model, tok, ckpt = load_model(ckpt_path)
    if hf:
        try:
            hf_model = to_hf_t5(model)
        except ValueError as e:
            raise SystemExit(f"{ckpt_path}: {first_line(e)}") from None
    with new_directory(out) as tmp:
        if hf:
            hf_model.save_pretrained(tmp)
            if tok.name.startswith("t5:"):  # a complete HF model directory: T5Tokenizer reads spiece.model
                shutil.copy(tok.model_file, os.path.join(tmp, "spiece.model"))
        else:
            from safetensors.torch import save

            with open(os.path.join(tmp, "model.safetensors"), "wb") as f:
                f.write(save(model.state_dict(), metadata={"format": "pt"}))
            config = {"model_type": "rot5", **{k: ckpt.get(k) for k in EXPORT_KEYS},
                      "model_config": dataclasses.asdict(model.cfg), "tokenizer": tok.name,
                      **copy_tokenizer(tok, tmp)}
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(config, f, indent=1)
        with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
            f.write(model_card(ckpt, model, tok, ckpt_path, out, hf))


# where an export keeps its tokenizer's model file, by kind of tokenizer (T5's: the name HF's T5Tokenizer reads)
TOKENIZER_FILES = {"mistral": "tokenizer.model", "t5": "spiece.model", "hf": "tokenizer.json"}


def copy_tokenizer(tok, directory: str) -> dict:
    """Copy the tokenizer's model file into an export directory, so that it loads on a machine without the
    package or the hub that provided it; returns the config.json keys that name it and pin it (sha256). A gpt2
    tokenizer is tiktoken's BPE table, which tiktoken downloads once on every machine: nothing to copy."""
    from prepare import sha256_file

    name = TOKENIZER_FILES.get(tok.name.split(":")[0])
    if name is None:
        return {}
    shutil.copy(tok.model_file, os.path.join(directory, name))
    if name == "tokenizer.json":  # and the file beside it that names its eos and bos (tokenizer.hf_special_ids)
        shutil.copy(os.path.join(os.path.dirname(tok.model_file), "tokenizer_config.json"), directory)
    return {"tokenizer_file": name, "tokenizer_sha256": sha256_file(tok.model_file)}


def export_tokenizer(directory: str, config: dict):
    """The tokenizer an export directory carries (copy_tokenizer): its own model file, checked against the
    sha256 recorded beside it."""
    from prepare import sha256_file
    from tokenizer import Tokenizer

    path = os.path.join(directory, config["tokenizer_file"])
    if not os.path.isfile(path) or sha256_file(path) != config.get("tokenizer_sha256"):
        raise SystemExit(f"{path} is {'missing' if not os.path.isfile(path) else 'not the file the export wrote'} "
                         "(its sha256 differs from config.json's): export the model again")
    return Tokenizer(config["tokenizer"], model_file=path)


def model_card(ckpt: dict, model, tok, source: str, out: str, hf: bool) -> str:
    """README.md of an export: what the model is, what it was trained on and how far, its last losses (the
    checkpoint's metrics), and how to use it. Only what the checkpoint records."""
    config, metrics, cfg = ckpt.get("config") or {}, ckpt.get("metrics") or {}, model.cfg
    what = {"pretrain": "pre-trained with UL2 by train.py", "finetune": "fine-tuned for summarization by finetune.py",
            "hf-t5": "a Hugging Face T5", "hf-switch": "a Hugging Face Switch Transformer",
            "hf-llama": "a Hugging Face Llama-family decoder adapted into an encoder-decoder (T5Gemma)"}.get(
        ckpt.get("kind"), ckpt.get("kind", "?"))
    attention = f"{cfg.n_heads} heads x {cfg.head_dim}" + (f", {cfg.n_kv_heads} K/V heads (GQA)"
                                                          if cfg.n_kv_heads < cfg.n_heads else "")
    rows = [("model", f"ROT5 encoder-decoder, {what}; {model.num_params():,} parameters "
                      f"({model.num_params(exclude_embeddings=True):,} without the embedding)"),
            ("shape", f"d_model {cfg.d_model}, {attention}, d_ff {cfg.d_ff} ({cfg.ffn}), {cfg.n_encoder_layers} + "
                      f"{cfg.n_decoder_layers} layers, position {cfg.position}"
                      + (f", {cfg.n_experts} experts (Switch MoE, top-{cfg.moe_top_k})" if cfg.n_experts else "")),
            ("tokenizer", f"{tok.name}, {tok.vocab_size:,} ids"),
            ("data", ", ".join(f"{k} {config[k]}" for k in ("dataset", "mixture", "encoder_len", "decoder_len")
                               if k in config) or "not recorded"),
            ("training", f"{ckpt.get('step', '?')} steps" + (f", {metrics['tokens']:,} training tokens"
                                                              if isinstance(metrics.get("tokens"), int) else "")
             + "".join(f", {k} {config[k]}" for k in ("batch_size", "learning_rate", "epochs") if k in config))]
    losses = [(k, f"{v:.4f}") for k, v in metrics.items()
              if isinstance(v, float) and ("loss" in k or "rouge" in k.lower())]
    lines = [f"# {os.path.basename(os.path.normpath(out))}", "",
             f"Exported by `python checkpoint.py export{' --hf' if hf else ''}` from `{source}`.", "",
             "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]
    if losses:
        lines += ["", "At the last evaluation (losses in nats per target token; `full_` ones on the whole validation "
                  "split, the others on the run's evaluation subset" + ("; ROUGE-L x 100" if "rougeL" in metrics else "")
                  + "):", "",
                  "| metric | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in losses)]
    lines += ["", "Use:", "", "```bash",
              f"python sample.py --ckpt {out} --prompt \"Once upon a time\""
              + ("   # or transformers.T5ForConditionalGeneration.from_pretrained" if hf else ""),
              "```", "", "config.json holds every model setting and the run's config."]
    return "\n".join(lines) + "\n"


@contextmanager
def new_directory(path: str, flag: str = "--out") -> Iterator[str]:
    """A temporary directory beside `path` to fill; when the block ends without an error, its files are synced
    and it is renamed to `path` (save_checkpoint's pattern, for a directory), so `path` never holds half of it.
    Refuses an existing path unless it is an empty directory, and a mount point (a rename cannot replace one).
    A write that fails (a full disk, a read-only file system, ...) is one line; nothing is left behind."""
    check_new_directory(path, flag)
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    except OSError as e:
        raise write_error(path, e) from None
    try:
        yield tmp
        for name in os.listdir(tmp):
            with open(os.path.join(tmp, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_directory(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the result should look like any other directory
        os.replace(tmp, path)  # onto nothing or an empty directory: atomic on POSIX
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        error = write_error(path, e)
        if error is None:
            raise
        raise error from None
    fsync_directory(parent)


def check_new_directory(path: str, flag: str = "--out") -> None:
    """What new_directory refuses, checked before any work (one line each)."""
    check_out_dir(path, flag)
    if os.path.exists(path) and os.listdir(path):
        raise SystemExit(f"{path} exists: write into a new directory, or delete it first")
    if os.path.ismount(path):
        raise SystemExit(f"{flag}={path} is a mount point, which a finished directory cannot be renamed onto: write into "
                         f"a new directory inside it, e.g. {flag}={os.path.join(path, 'export')}")


def write_error(path: str, e: BaseException) -> SystemExit | None:
    """The one line for a failed write of the directory `path` (nothing of it was left), or None when e is not a
    write error. safetensors (HF's save_pretrained) reports the OS error inside its own exception's text."""
    err = space_error(e)
    if err is None and type(e).__name__ == "SafetensorError" and (code := re.search(r"(?:os error|code:) (\d+)", str(e))):
        err = OSError(int(code.group(1)), os.strerror(int(code.group(1))))
    if err is None and isinstance(e, OSError):
        err = e
    if err is None:
        return None
    if err.errno in SPACE_ERRNOS:
        return write_failed(path, err, None, None, "nothing was left of it: free some space, then export again")
    return SystemExit(f"could not write {path}: {err.strerror or os.strerror(err.errno or 0)}: nothing was left of it; "
                      "export into a directory you can write")


def load_export(directory: str) -> dict:
    """An export directory as a checkpoint dict (its config.json, the weights under "model")."""
    from safetensors.torch import load_file

    config = read_config_json(directory)
    missing = [k for k in EXPORT_KEYS if k not in config]
    weights = os.path.join(directory, "model.safetensors")
    if missing or not os.path.isfile(weights):
        raise SystemExit(f"{directory} is not a whole ROT5 export (it lacks {', '.join(missing) or 'model.safetensors'}): "
                         "export it again with `python checkpoint.py export`")
    try:
        return {**config, "model": load_file(weights)}
    except Exception as e:  # noqa: BLE001 - truncated, or not a safetensors file: the same fix
        raise SystemExit(f"{weights} is not a readable safetensors file ({first_line(e)[:200]}): export it again") from None


# -- starting and resuming a run (train.py and finetune.py) ---------------------------------------------------

LOCK_FILE = "run.lock"  # in out_dir: who holds it (the lock itself is the kernel's, see RunLock)


class RunLock:
    """One train.py / finetune.py per out_dir: an exclusive fcntl.flock on out_dir/run.lock, held for the run's
    life. The kernel drops the lock when the holder's file is closed, which the process's end does however it
    ends (kill -9 too): a lock is never stale, and the file is left in place (deleting a lock file races with a
    process about to lock it). The file names the holder (pid, host, start, command) for the message that refuses
    a second run. Under torchrun rank 0 holds it (the other ranks write nothing in out_dir).
    On a file system without locks (some network mounts) the run goes on with a warning."""

    def __init__(self, say: Callable[[str], None] = print):
        self.file = None  # the open lock file while this process holds the lock
        self.say = say

    def claim(self, out_dir: str, make: bool = True) -> None:
        """Hold out_dir's lock, making out_dir first (make=True), or one line naming the process that holds it.
        make=False: only if out_dir exists already (a run in it may be going on: refuse at once, before any
        work); a directory not made yet is claimed when the run makes it. A lock this object holds: no-op."""
        if self.file is not None or not (make or os.path.isdir(out_dir)):
            return
        try:
            os.makedirs(out_dir, exist_ok=True)
            f = open(os.path.join(out_dir, LOCK_FILE), "a+", encoding="utf-8")  # "a+": erases nothing before we hold it
        except OSError as e:  # read-only file system, no permission, a path the kernel refuses (/proc/...), ...
            raise SystemExit(f"cannot write into --out_dir={out_dir} ({e.strerror or type(e).__name__}): pick another "
                             "--out_dir") from None
        try:
            import fcntl

            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "a process that has just started"
            f.close()
            raise SystemExit(f"{out_dir} is in use by another run ({holder}): wait for it to end or stop it, or use "
                             "another --out_dir") from None
        except (ImportError, OSError) as e:  # no fcntl (Windows), or no locks on this file system (ENOLCK, ...)
            f.close()
            self.say(f"warning: cannot lock {out_dir} ({type(e).__name__}: {first_line(e)}): a second run started on "
                     "it would not be refused")
            return
        self.file = f
        try:  # who holds it, for the message above (a full disk only costs the message its details)
            f.truncate(0)
            f.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                    f"{' '.join([os.path.basename(sys.argv[0]), *sys.argv[1:]])[:300]}\n")
            f.flush()
        except OSError:
            pass

    def release(self) -> None:
        if self.file is not None:
            self.file.close()  # closing the file drops the lock
            self.file = None


RESUMED_WITH = {"pretrain": "pre-training from a train.py one", "finetune": "fine-tuning from a finetune.py one"}


def check_start(ckpt_path: str, resume: bool) -> None:
    """A new run never overwrites a run's checkpoint; resuming needs one. One line each, before any work."""
    if not resume and checkpoint_exists(ckpt_path):
        found = ckpt_path if os.path.exists(ckpt_path) else previous_path(ckpt_path)
        raise SystemExit(f"{found} exists: continue that run with --resume=True, or start a new one with "
                         "another --out_dir (or delete it)")
    if resume and not checkpoint_exists(ckpt_path):
        raise SystemExit(f"--resume=True but {ckpt_path} does not exist: nothing to resume; run without --resume "
                         "(or fix --out_dir)")


def load_for_resume(ckpt_path: str, warn: Callable[[str], None], master: bool = True) -> dict:
    """The checkpoint a run resumes from: ckpt_path, or, when that one is damaged or missing, the previous one
    (previous_path), with a line through `warn`. The damaged file is moved aside (to ckpt.damaged.pt, by the
    master process) so that the next save does not keep it as the previous checkpoint."""
    try:
        return load_checkpoint(ckpt_path)
    except SystemExit as e:
        prev = previous_path(ckpt_path)
        if not os.path.exists(prev):
            raise
        try:
            ckpt = load_checkpoint(prev)
        except SystemExit as e_prev:
            raise SystemExit(f"{e.code}; and {e_prev.code}") from None
        root, ext = os.path.splitext(ckpt_path)
        moved = ""
        if master and os.path.exists(ckpt_path):
            os.replace(ckpt_path, f"{root}.damaged{ext}")
            moved = f" (moved it to {root}.damaged{ext})"
        warn(f"warning: {e.code}{moved}; resuming from {prev}, step {ckpt['step']}, instead")
        return ckpt


def resume_run(ckpt_path: str, kind: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: dict,
               run_keys: tuple[str, ...], warn: Callable[[str], None], master: bool = True) -> tuple[int, dict]:
    """Load a checkpoint of `kind` into model and optimizer and restore every random generator, so that the run
    continues as an uninterrupted one would. Refuses another kind of checkpoint or another model; warns
    (through `warn`) when any of the run's run_keys changed, or when it falls back to the previous checkpoint
    (load_for_resume). Returns (the checkpoint's step, its metrics)."""
    ckpt = load_for_resume(ckpt_path, warn, master)  # on the CPU: RNG states must stay there; load_state_dict copies
    if ckpt["kind"] != kind:
        raise SystemExit(f"{ckpt_path} is a {ckpt['kind']} checkpoint: resume {RESUMED_WITH[kind]}")
    ours, theirs = dataclasses.asdict(model.cfg), model_config(ckpt)
    diff = sorted(k for k, v in ours.items() if theirs.get(k) != v and k not in RUNTIME_FIELDS)
    if diff:
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
RUN_FILES = ["ckpt.pt", "ckpt.prev.pt", "metrics.jsonl", "predictions.jsonl", "curves.png"]


def remove_run_temps(out_dir: str, say: Callable[[str], None] = print) -> None:
    """At a run's start in out_dir: delete the temp files of writes that a kill interrupted (a checkpoint-sized
    one per kill; before diskio, checkpoints used ckpt.pt.tmp<pid>, removed too)."""
    remove_stale_temps(out_dir, RUN_FILES, say)
    for legacy in glob.glob(os.path.join(glob.escape(out_dir), "ckpt.pt.tmp*")):
        os.unlink(legacy)
        say(f"removed {legacy}, left by an interrupted checkpoint save")


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


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Export a ROT5 model as safetensors, or the T5 baseline as a "
                                             "Hugging Face T5 (see the module docstring).")
    commands = ap.add_subparsers(dest="command", required=True)
    ex = commands.add_parser("export", help="write model.safetensors + config.json (or, with --hf, an HF T5 directory)")
    ex.add_argument("--ckpt", required=True, help="a train.py / finetune.py checkpoint (or anything sample.py reads)")
    ex.add_argument("--out", required=True, help="the directory to write (must not exist, or be empty)")
    ex.add_argument("--hf", action="store_true", help="a T5ForConditionalGeneration.save_pretrained directory instead "
                                                      "(position='t5', multi-head, dense models only)")
    a = ap.parse_args(argv)
    export(a.ckpt, a.out, a.hf)
    print(f"wrote {a.out}" + (" (Hugging Face T5ForConditionalGeneration, README.md)" if a.hf else
                              f" ({', '.join(sorted(os.listdir(a.out)))})"))


if __name__ == "__main__":
    main()
