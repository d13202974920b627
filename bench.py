"""How fast is ROT5? Against Hugging Face transformers T5 on the same shapes, weights and inputs, and on a GPU.

The big idea: every comparison runs both implementations in ONE process, on the SAME token ids (real
TinyStories text from data/sample/stories.txt), with the same thread count, warm-up calls first and then
the median of several timed calls. The timed calls of the two sides alternate (A B A B ...) so that load
from other processes slows both alike and the ratio stays meaningful on a busy machine.

    a  training step (forward + backward + AdamW) on a UL2 batch:
         T5 baseline: hf_t5.from_hf_t5 of a random-init HF T5 -> same weights on both sides;
         rot5_mini (config/rot5_mini.py: RoPE + GQA) vs HF T5 with the same d_model/heads/d_ff/layers/vocab (MHA);
         the same examples, each side in its best layout: ROT5 packs them (as train.py), HF pads one per row
    b  greedy decoding, batch 1, 256-token input, exactly 64 new tokens (end of sequence never stops it)
    c  beam search, 4 beams, batch 8, 256-token inputs, exactly 64 new tokens
    d  UL2 batches (ul2.UL2Batches: sampling, cropping, corruption, padding) in documents/s on one core
    e  prepare.py tokenization (prepare.tokenize_file) vs raw SentencePiece on the same text, one core
    f  pre-training throughput (GPU mode): rot5_mini tokens/s and MFU, projected time of the seed's 1.37B-token
       Chinchilla pre-training, Switch MoE step time vs dense at equal active parameters, peak memory
    g  the data checks every train.py / finetune.py start makes (prepare.load_documents: sizes, index, ids in
       range, sha256) on a shard the size of TinyStories-Instruct's train split (real tokens, tiled), one core
    h  packed rows (ul2.pack_examples): the real-token fraction of rot5_mini's rows (512 / 256, fixed shapes as
       compiled) one example per row vs packed (and of the keys packed cross-attention gathers), and the real
       tokens/s of a rot5_mini training step on the same documents in both layouts (with --compile: compiled,
       and eager)
    i  one packed training step of rot5_mini's shape (tiny sizes): host syncs of the eager forward + backward
       (reads of a tensor's value on the host) and torch._dynamo.explain's graphs and graph breaks

Usage:
    python bench.py                          # a-e, g-i on the CPU, fp32, all cores (the table in BENCHMARKS.md)
    python bench.py --markdown               # the same, the table printed as markdown for BENCHMARKS.md
    python bench.py --quick                  # tiny shapes, seconds: checks that everything runs (the smoke test)
    python bench.py --only a,b --threads 2
    python bench.py --device cuda --dtype bfloat16 --compile     # GPU: a-f, bf16 autocast, torch.compile

Shapes. On the CPU the T5 baseline is T5-Small's shape (Raffel et al. 2020: d_model 512, 8 heads x 64,
d_ff 2048, 6 + 6 layers; 60M parameters with the 32,256-token vocabulary) with t5_base.py's architecture,
because T5-Base (223M) makes a 2-core benchmark take too long; on a GPU it is config/t5_base.py itself.
rot5_mini is config/rot5_mini.py everywhere. Tokens/s counts real (non-pad) encoder input tokens plus
target tokens for training, generated tokens (batch x 64) for decoding.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import fields
from typing import NamedTuple

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import prepare
import train
import ul2
from generate import generate
from hf_t5 import from_hf_t5
from batch import Batch
from model import ROT5, ROT5Config, segment_mask
from tokenizer import get_tokenizer, mistral_model_file

HERE = os.path.dirname(os.path.abspath(__file__))
STORIES = os.path.join(HERE, "data", "sample", "stories.txt")
SECTIONS = "abcdefghi"
SEED_PRETRAIN_TOKENS = 2 * 684_805_492  # the seed's Chinchilla run: 2 epochs of TinyStories-Instruct (1.37B)
TARGETS = {"train_t5": 1.3, "train_mini": 1.5, "greedy_t5": 3.0, "beam_t5": 2.0}  # ROT5 / HF speed, on the CPU


class Setup(NamedTuple):
    """Sizes of one run: the full benchmark, or --quick (tiny shapes, for the smoke test)."""
    t5_arch: dict          # ROT5Config fields of the T5 baseline
    mini_arch: dict        # ROT5Config fields of rot5_mini
    train_batch: int       # documents per training step
    encoder_len: int       # UL2Batches limits (batches pad to their longest row)
    decoder_len: int
    prompt_len: int        # generation input tokens
    new_tokens: int        # generated tokens, exactly
    beam_batch: int
    num_beams: int
    ul2_batch: int         # documents per UL2 batch
    prepare_bytes: int | None  # bytes of stories.txt to tokenize (None: all of it)
    check_tokens: int      # tokens (with eos) of section g's shard
    warmup: int
    iters: int


def full_setup(device: torch.device) -> Setup:
    t5 = read_arch("t5_base.py")
    if device.type == "cpu":  # T5-Small's shape with T5-Base's architecture (see the module docstring)
        t5 |= dict(d_model=512, n_heads=8, n_kv_heads=8, head_dim=64, d_ff=2048, n_encoder_layers=6, n_decoder_layers=6)
    train_batch = 8 if device.type == "cpu" else read_config("t5_base.py")["micro_batch_size"]
    return Setup(t5, read_arch("rot5_mini.py"), train_batch=train_batch, encoder_len=512,
                 decoder_len=256, prompt_len=256, new_tokens=64, beam_batch=8, num_beams=4, ul2_batch=64,
                 prepare_bytes=None, check_tokens=sum(prepare.SEED_COUNTS[("tinystories_instruct", "train")]),
                 warmup=1, iters=5 if device.type == "cpu" else 10)


def quick_setup() -> Setup:
    tiny = dict(d_model=64, n_heads=4, head_dim=16, n_kv_heads=4, d_ff=128, n_encoder_layers=2, n_decoder_layers=2)
    return Setup(read_arch("t5_base.py") | tiny, read_arch("rot5_mini.py") | tiny | dict(n_kv_heads=2),
                 train_batch=2, encoder_len=64, decoder_len=32, prompt_len=32, new_tokens=8, beam_batch=2,
                 num_beams=4, ul2_batch=16, prepare_bytes=200_000, check_tokens=1_000_000, warmup=1, iters=2)


def read_config(config_file: str) -> dict:
    """The assignments of a config/*.py file."""
    scope: dict = {}
    with open(os.path.join(HERE, "config", config_file), encoding="utf-8") as f:
        exec(f.read(), {}, scope)
    return scope


def read_arch(config_file: str) -> dict:
    """The ROT5Config fields a config file sets (the rest of it is training settings)."""
    names = {f.name for f in fields(ROT5Config)}
    return {k: v for k, v in read_config(config_file).items() if k in names}


# ----------------------------------------------------------------------------------------------------------
# Results


class Row(NamedTuple):
    section: str
    bench: str             # what is timed
    model: str             # on which models
    rot5: str              # ROT5's number, formatted
    ref: str               # the reference's number (HF transformers, raw SentencePiece, dense), or ""
    ratio: float | None    # ROT5 speed / reference speed
    target: float | None   # the target for the ratio (CPU, fp32, full shapes only)

    def status(self) -> str:
        if self.ratio is None or self.target is None:
            return ""
        return "met" if self.ratio >= self.target else f"not met ({self.ratio / self.target:.0%} of target)"


def render(rows: list[Row], notes: list[str], markdown: bool) -> str:
    """The table, then one note per line on the inputs (batch shapes, token counts)."""
    head = ["", "benchmark", "models", "ROT5", "reference", "ratio", "target", "status"]
    body = [[r.section, r.bench, r.model, r.rot5, r.ref, "" if r.ratio is None else f"{r.ratio:.2f}x",
             "" if r.target is None else f">= {r.target:g}x", r.status()] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(b) + " |" for b in body] + [""] + [f"- {n}" for n in notes]
    else:
        width = [max(len(x) for x in col) for col in zip(head, *body)]
        lines = ["  ".join(x.ljust(w) for x, w in zip(line, width)).rstrip() for line in [head, *body]]
        lines += [""] + notes
    return "\n".join(lines)


def machine(device: torch.device, threads: int) -> str:
    cpu = "unknown CPU"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    else:
        cpu = platform.processor() or cpu
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    import transformers

    load = " / ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return (f"{datetime.date.today()} | {cpu}, {usable_cores()} cores, {threads} torch threads | device {dev} | "
            f"torch {torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()} | "
            f"load average (1/5/15 min) {load}")


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# ----------------------------------------------------------------------------------------------------------
# Timing


def median_times(fns: dict[str, Callable[[], object]], warmup: int, iters: int,
                 device: torch.device) -> dict[str, float]:
    """Median seconds per call of each function. Calls alternate between the functions, so a burst of load
    from another process hits every side alike."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


@contextlib.contextmanager
def one_core():
    """Pin this process (and the threads it starts, e.g. SentencePiece's) to one core, torch to one thread."""
    threads = torch.get_num_threads()
    cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    if cores:
        os.sched_setaffinity(0, {min(cores)})
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if cores:
            os.sched_setaffinity(0, cores)


# ----------------------------------------------------------------------------------------------------------
# Models and inputs


def hf_t5(arch: dict, vocab_size: int, seed: int):
    """A random-init HF T5ForConditionalGeneration with the shape of `arch` (always multi-head, relative bias)."""
    from transformers import T5Config, T5ForConditionalGeneration

    c = ROT5Config(**arch)
    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=vocab_size, d_model=c.d_model, d_kv=c.head_dim, num_heads=c.n_heads, d_ff=c.d_ff,
                   num_layers=c.n_encoder_layers, num_decoder_layers=c.n_decoder_layers,
                   feed_forward_proj=c.ffn, tie_word_embeddings=c.tie_embeddings, dropout_rate=c.dropout,
                   pad_token_id=c.pad_token_id, eos_token_id=c.eos_token_id, decoder_start_token_id=c.pad_token_id)
    return T5ForConditionalGeneration(cfg)


def model_pair(kind: str, setup: Setup, vocab_size: int, device: torch.device) -> tuple[ROT5, torch.nn.Module, str]:
    """(ROT5, HF T5, description) for kind "t5" (same weights) or "mini" (same shape, HF without RoPE/GQA)."""
    arch = setup.t5_arch if kind == "t5" else setup.mini_arch
    hf = hf_t5(arch, vocab_size, seed=0)
    if kind == "t5":
        ours = from_hf_t5(hf)
        what = f"T5 baseline {n_params(ours)} (HF's weights)"
    else:
        torch.manual_seed(0)
        ours = ROT5(ROT5Config(**arch, vocab_size=vocab_size))
        what = f"rot5_mini {n_params(ours)} (RoPE, GQA) vs HF T5 {n_params(hf)} (MHA)"
    return ours.to(device), hf.to(device), what


def n_params(model: torch.nn.Module) -> str:
    n = sum(p.numel() for p in model.parameters())
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


def real_documents(tok, n_bytes: int | None = None) -> list[np.ndarray]:
    """The sample stories as token arrays (no eos), tokenized exactly as prepare.py does."""
    docs = []
    for c in prepare.tokenize_file(STORIES, tok, workers=1, stop=n_bytes):
        docs += np.split(c.tokens, np.cumsum(c.lengths + 1))[:-1]
    return [d[:-1] for d in docs]


def prompts(docs: list[np.ndarray], tok, batch: int, length: int) -> torch.Tensor:
    """(batch, length) continuation prompts as sample.py builds them, [S] + story start + eos, from the first
    stories long enough, so that no row needs padding."""
    rows = [np.concatenate([[tok.mode_ids["S"]], d[: length - 2], [tok.eos_id]]) for d in docs if len(d) >= length - 2]
    if len(rows) < batch:
        raise SystemExit(f"data/sample/stories.txt has only {len(rows)} stories of >= {length - 2} tokens, "
                         f"need {batch}: lower the prompt length")
    return torch.tensor(np.stack(rows[:batch]), dtype=torch.long)


def autocast(device: torch.device, dtype: torch.dtype):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def train_step_fn(model: torch.nn.Module, batch: Batch, hf: bool, device: torch.device, dtype: torch.dtype,
                  compile: bool) -> Callable[[], None]:
    """One optimizer step of `model` on `batch`: forward with the LM loss (+ MoE losses), backward, AdamW."""
    model.train()
    fwd = torch.compile(model) if compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    b = batch.to(device)

    def step() -> None:
        with autocast(device, dtype):
            if hf:
                out = fwd(input_ids=b.input_ids, attention_mask=(b.segment_ids > 0).long(),
                          decoder_input_ids=b.decoder_input_ids, labels=b.labels)
            else:
                out = fwd(b)
            loss = out.loss if hf else out.loss + out.aux_loss + out.z_loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def batch_tokens(batch: Batch) -> tuple[int, int]:
    """(real encoder input tokens, target tokens) of a batch."""
    return int((batch.segment_ids > 0).sum()), int((batch.labels != -100).sum())


# ----------------------------------------------------------------------------------------------------------
# The sections


def bench_train(args, setup: Setup, tok, docs, device, dtype, notes: list[str]) -> list[Row]:
    padded, packed = (ul2.UL2Batches(docs, tok, "ul2", setup.encoder_len, setup.decoder_len, setup.train_batch,
                                     static_shapes=args.compile, pack=pack).batch(0) for pack in (False, True))
    enc_tok, dec_tok = batch_tokens(packed)   # the same examples in both layouts
    notes.append(f"[a] one UL2 batch of {setup.train_batch} stories, {enc_tok} real encoder tokens and {dec_tok} targets: "
                 f"ROT5 packed, encoder {tuple(packed.input_ids.shape)}, decoder {tuple(packed.labels.shape)}; HF one "
                 f"per row, {tuple(padded.input_ids.shape)}, {tuple(padded.labels.shape)}; tok/s = (real encoder "
                 "tokens + targets) / step time; AdamW; dropout as each config sets it")
    rows = []
    for kind in ("t5", "mini"):
        ours, hf, models = model_pair(kind, setup, tok.vocab_size, device)
        t = median_times({"rot5": train_step_fn(ours, packed, False, device, dtype, args.compile),
                          "hf": train_step_fn(hf, padded, True, device, dtype, args.compile)},
                         setup.warmup, setup.iters, device)
        rows.append(report(Row("a", "train step", models, f"{(enc_tok + dec_tok) / t['rot5']:,.0f} tok/s",
                               f"{(enc_tok + dec_tok) / t['hf']:,.0f} tok/s", t["hf"] / t["rot5"],
                               target(args, f"train_{kind}"))))
        del ours, hf
    return rows


def bench_generate(args, setup: Setup, tok, docs, device, dtype, beams: bool, notes: list[str]) -> list[Row]:
    B, K, n = (setup.beam_batch, setup.num_beams, setup.new_tokens) if beams else (1, 1, setup.new_tokens)
    x = prompts(docs, tok, B, setup.prompt_len).to(device)
    mask = torch.ones_like(x)
    section = "c" if beams else "b"
    bench = f"beam search, {K} beams, batch {B}" if beams else "greedy, batch 1"
    notes.append(f"[{section}] {B} real story prompt(s) of {x.shape[1]} tokens ([S] + story + eos) -> exactly {n} new "
                 "tokens (ROT5: an eos id no token has; HF: min_new_tokens); tok/s = batch x new tokens / time"
                 + ("; HF default beam settings on both sides" if beams else ""))
    rows = []
    for kind in ("t5", "mini"):
        ours, hf, models = model_pair(kind, setup, tok.vocab_size, device)
        ours.eval(), hf.eval()
        out: dict[str, torch.Tensor] = {}

        def run_ours() -> None:
            with torch.no_grad(), autocast(device, dtype):
                out["rot5"] = generate(ours, x, mask, max_new_tokens=n, num_beams=K, eos_token_id=-1)

        def run_hf() -> None:
            with torch.no_grad(), autocast(device, dtype):
                out["hf"] = hf.generate(input_ids=x, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                        num_beams=K, do_sample=False)[:, 1:]  # drop the start token

        fns = {"rot5": run_ours, "hf": run_hf}
        if not beams:
            fns["floor"] = decode_floor_fn(ours, x, mask, n, device, dtype)
        t = median_times(fns, setup.warmup, setup.iters, device)
        if out["rot5"].shape != (B, n) or out["hf"].shape != (B, n):
            raise RuntimeError(f"expected ({B}, {n}) new tokens, got ROT5 {tuple(out['rot5'].shape)}, "
                               f"HF {tuple(out['hf'].shape)}")
        if kind == "t5":  # same weights: the same tokens, unless fp rounding flips a near-tie
            same = (out["rot5"] == out["hf"]).float().mean().item()
            notes.append(f"[{section}] T5 baseline: ROT5 and HF agree on {same:.0%} of the generated tokens")
        hf_speed = f"{B * n / t['hf']:,.1f} tok/s"
        rows.append(report(Row(section, bench, models, f"{B * n / t['rot5']:,.1f} tok/s", hf_speed,
                               t["hf"] / t["rot5"], target(args, f"{'beam' if beams else 'greedy'}_{kind}"))))
        if not beams:
            rows.append(report(Row(section, "greedy floor: weights read once per token", models.split(" vs ")[0],
                                   f"{n / t['floor']:,.1f} tok/s", hf_speed, t["hf"] / t["floor"], None)))
        del ours, hf
    if not beams:
        notes.append("[b] greedy floor: the same encoder pass, then per token one matrix-vector product with each "
                     "weight matrix a decoding step reads (decoder layers, output layer) and nothing else; its ratio "
                     "is the most any implementation could gain over HF here (batch 1 is memory-bandwidth bound)")
    return rows


def decode_floor_fn(model: ROT5, x: torch.Tensor, mask: torch.Tensor, n: int, device: torch.device,
                    dtype: torch.dtype) -> Callable[[], None]:
    """A lower bound on greedy decoding time for `model`: encode once, then n times stream every weight
    matrix of a decoding step through one matrix-vector product. No attention, norms, argmax or Python."""
    mats = [p for name, p in model.decoder.named_parameters()   # cross-attention K/V are cached: not read
            if p.dim() == 2 and "relative_bias" not in name and "cross_attn.kv" not in name]
    mats.append(model.embed.weight if model.lm_head is None else model.lm_head.weight)
    vec = {m.shape[1]: torch.randn(1, m.shape[1], device=device) for m in mats}

    def run() -> None:
        with torch.no_grad(), autocast(device, dtype):
            model.new_cache(model.encode(x, mask), mask, n)
            for _ in range(n):
                for m in mats:
                    torch.nn.functional.linear(vec[m.shape[1]], m)
    return run


def bench_ul2(args, setup: Setup, tok, docs, notes: list[str]) -> list[Row]:
    batches = ul2.UL2Batches(docs, tok, "ul2", 512, 256, setup.ul2_batch)
    steps = iter(range(10**9))  # a new step per call: other documents, other corruption
    with one_core():
        t = median_times({"ul2": lambda: batches.batch(next(steps))}, setup.warmup, max(setup.iters, 5),
                         torch.device("cpu"))
    notes.append(f"[d] UL2Batches.batch (denoiser sampling, cropping, corruption, padding, tensors), mixture ul2, "
                 f"encoder_len 512, decoder_len 256, {setup.ul2_batch} stories per batch, "
                 f"{np.mean([len(d) for d in docs]):.0f} tokens per story on average")
    return [report(Row("d", "UL2 batches, one core", "-", f"{setup.ul2_batch / t['ul2']:,.0f} docs/s", "", None, None))]


def bench_prepare(args, setup: Setup, tok, notes: list[str]) -> list[Row]:
    import sentencepiece as spm

    stop = setup.prepare_bytes
    with open(STORIES, "rb") as f:
        text = f.read(stop).decode("utf-8")
    records = [r for r in (r.strip() for r in text.split(prepare.EOT.decode())) if r]
    sp = spm.SentencePieceProcessor(model_file=mistral_model_file())
    counts: dict[str, int] = {}

    def run_prepare() -> None:  # file -> chunks -> records -> ids -> packed uint16, as `prepare.py` runs it
        chunks = prepare.tokenize_file(STORIES, tok, workers=1, stop=stop)
        counts["prepare"] = sum(len(c.tokens) - len(c.lengths) for c in chunks)  # without the eos per story

    def run_sp() -> None:  # the records already split in memory, one batched encode call
        counts["sp"] = sum(map(len, sp.encode(records)))

    with one_core():
        t = median_times({"prepare": run_prepare, "sp": run_sp}, setup.warmup, max(setup.iters, 3), torch.device("cpu"))
    if counts["prepare"] != counts["sp"]:
        raise RuntimeError(f"prepare.py made {counts['prepare']} tokens, SentencePiece {counts['sp']}: "
                           "they did not tokenize the same text")
    n = counts["sp"]
    notes.append(f"[e] {len(records):,} stories of data/sample/stories.txt, {n:,} tokens: prepare.tokenize_file (read, "
                 "split, encode, pack to uint16) vs SentencePiece encode of the records already split in memory")
    return [report(Row("e", "tokenization, one core", "prepare.py vs SentencePiece", f"{n / t['prepare']:,.0f} tok/s",
                       f"{n / t['sp']:,.0f} tok/s", t["sp"] / t["prepare"], None))]


def bench_checks(args, setup: Setup, tok, docs, notes: list[str]) -> list[Row]:
    """g: prepare.load_documents on a shard of setup.check_tokens real tokens (the sample's stories, tiled), with
    the meta.json prepare.py would write; the page cache is warm (the shard was just written)."""
    import tempfile

    one = np.concatenate([np.append(d, tok.eos_id) for d in docs]).astype(np.uint16)   # (tokens + eos,)
    lengths = np.array([len(d) for d in docs])
    reps = -(-setup.check_tokens // len(one))
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "train.bin"), "wb") as f:
            for _ in range(reps):
                f.write(one.tobytes())
        all_lengths = np.tile(lengths, reps)
        offsets = np.concatenate([[0], np.cumsum(all_lengths + 1)])
        np.save(os.path.join(d, "train.idx.npy"), offsets)
        meta = {"format": prepare.FORMAT, "tokenizer": tok.name, "pad_id": tok.pad_id, "eos_id": tok.eos_id,
                "splits": {"train": {"documents": len(all_lengths), "tokens": int(all_lengths.sum())}},
                "shard_sha256": {n: prepare.sha256_file(os.path.join(d, n)) for n in ("train.bin", "train.idx.npy")}}
        with open(os.path.join(d, "meta.json"), "w") as f:
            json.dump(meta, f)
        with one_core():
            t = median_times({"checks": lambda: prepare.load_documents(d, "train")}, setup.warmup, max(setup.iters, 3),
                             torch.device("cpu"))
    n = len(one) * reps
    notes.append(f"[g] a shard of {n:,} tokens ({n * 2 / 1e9:.2f} GB; the full TinyStories-Instruct train split is "
                 f"{setup.check_tokens:,} with eos): the sample's {len(docs):,} stories tiled {reps}x, page cache warm")
    return [report(Row("g", "start-up data checks, one core", "prepare.load_documents", f"{t['checks']:.2f} s", "",
                       None, None))]


def bench_pretrain(args, setup: Setup, tok, docs, device, dtype, notes: list[str]) -> list[Row]:
    """rot5_mini at its config's micro batch: tokens/s, MFU, the seed's pre-training time; MoE vs dense."""
    # the config's micro batch (64) on a GPU; on a CPU section a's batch (8): at 64 the fp32 step was killed
    # out of memory on a 24 GiB machine (attention dropout keeps every (T, T) probability map for backward)
    config_batch = read_config("rot5_mini.py")["micro_batch_size"]
    B = 2 if args.quick else config_batch if device.type == "cuda" else setup.train_batch
    batch = ul2.UL2Batches(docs, tok, "ul2", setup.encoder_len, setup.decoder_len, B,
                           static_shapes=args.compile, pack=True).batch(0)   # packed, as train.py
    enc_tok, dec_tok = batch_tokens(batch)
    peak = peak_flops(args, device)
    notes.append(f"[f] one UL2 batch of {B} stories{' (micro_batch_size of rot5_mini.py)' if B == config_batch else ''}, "
                 f"packed as train.py packs it: encoder {tuple(batch.input_ids.shape)}, "
                 f"decoder {tuple(batch.labels.shape)}; MFU = model.train_flops (real tokens) / step time / "
                 + (f"{peak / 1e12:g} TFLOP/s peak" if peak else "peak (unknown here: pass --peak-tflops)")
                 + f"; projected time = {SEED_PRETRAIN_TOKENS:,} tokens / tok/s on one device")
    # MoE vs dense, both compiled with --compile (the MoE step is one graph too: its expert counts are
    # symbolic sizes); with --compile the dense model is also timed eager
    moe = setup.mini_arch | dict(n_experts=8, moe_top_k=1)
    runs = [("dense", setup.mini_arch, args.compile)] + [("dense eager", setup.mini_arch, False)] * args.compile
    runs += [("moe", moe, args.compile)]
    models, fns, memory = {}, {}, {}
    for name, arch, compile in runs:
        base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        torch.manual_seed(0)
        models[name] = ROT5(ROT5Config(**arch, vocab_size=tok.vocab_size)).to(device)
        fns[name] = train_step_fn(models[name], batch, False, device, dtype, compile)
        fns[name]()  # the first step allocates the AdamW state (and compiles): its peak is this model's memory
        if device.type == "cuda":
            memory[name] = torch.cuda.max_memory_allocated(device) - base
    times = median_times(fns, setup.warmup, setup.iters, device)  # alternating, like every other section

    def extra(name: str) -> str:
        flops = models[name].train_flops(enc_tok, dec_tok, batch.input_ids.shape[1], batch.labels.shape[1])
        parts = [f"MFU {flops / times[name] / peak:.1%}"] if peak else []
        parts += [f"peak memory {memory[name] / 2**30:.1f} GiB"] if name in memory else []
        return f" ({', '.join(parts)})" if parts else ""

    how = "compiled" if args.compile else "eager"
    tps = (enc_tok + dec_tok) / times["dense"]
    # top-1: a token passes through the router and ONE expert, which has the dense FFN's shape
    active = sum(p.numel() for n, p in models["moe"].named_parameters() if not re.search(r"\.experts\.[1-9]", n))
    dense = times["dense"]
    rows = [report(Row("f", f"train step, {how}{extra('dense')}", f"rot5_mini {n_params(models['dense'])}",
                       f"{tps:,.0f} tok/s, {times['dense'] * 1e3:,.0f} ms", "", None, None)),
            report(Row("f", f"seed pre-training, {SEED_PRETRAIN_TOKENS / 1e9:.2f}B tokens", "rot5_mini",
                       f"{SEED_PRETRAIN_TOKENS / tps / 3600:,.1f} h", "", None, None)),
            report(Row("f", f"train step, MoE vs dense, {how}{extra('moe')}",
                       f"rot5_mini + Switch 8 experts top-1 ({n_params(models['moe'])}, {active / 1e6:.1f}M active)",
                       f"{times['moe'] * 1e3:,.0f} ms", f"{dense * 1e3:,.0f} ms (dense)", dense / times["moe"], None))]
    if args.compile:
        rows.append(report(Row("f", "train step, compiled vs eager", "rot5_mini", f"{times['dense'] * 1e3:,.0f} ms",
                               f"{times['dense eager'] * 1e3:,.0f} ms (eager)", times["dense eager"] / times["dense"],
                               None)))
    return rows


def bench_packing(args, setup: Setup, tok, docs, device, dtype, notes: list[str]) -> list[Row]:
    """Packed rows vs one example per row: how much of a fixed-shape batch is real tokens, and what that buys."""
    B = setup.ul2_batch
    layouts = {pack: ul2.UL2Batches(docs, tok, "ul2", setup.encoder_len, setup.decoder_len, B, static_shapes=True,
                                    pack=pack) for pack in (False, True)}
    rows, n = [], 4 if args.quick else 20
    for pack, batches in layouts.items():
        enc = dec = enc_pos = dec_pos = keys = 0
        for g in range(n):
            b = batches.batch(g)
            enc, dec = enc + int((b.segment_ids > 0).sum()), dec + int((b.labels != -100).sum())
            enc_pos, dec_pos = enc_pos + b.input_ids.numel(), dec_pos + b.labels.numel()
            keys += b.input_ids.numel() if b.cross_index is None else b.cross_index.numel()
        rows.append(report(Row("h", f"real tokens, {'packed' if pack else 'one example per row'}",
                               f"{n} UL2 batches of {B} stories, rows {setup.encoder_len} / {setup.decoder_len}",
                               f"{enc / enc_pos:.1%} enc, {dec / dec_pos:.1%} dec, "
                               f"{(enc + dec) / (enc_pos + dec_pos):.1%} all; cross keys {enc / keys:.1%}",
                               "", None, None)))
    # FlexAttention (compiled on a GPU) computes only the 128 x 128 blocks its block masks keep; SDPA computes
    # every (query, key) pair of its dense masks. What that is worth, in FLOPs of a whole rot5_mini step.
    blocks = {"encoder": [0, 0], "decoder": [0, 0], "cross": [0, 0]}
    mini = ROT5Config(**setup.mini_arch, vocab_size=tok.vocab_size)
    with torch.device("meta"):
        flops_of = ROT5(mini).train_flops
    matmul = 0.0
    for g in range(1 if args.quick else 4):
        b = layouts[True].batch(g)
        matmul += flops_of(b.input_ids.numel(), b.labels.numel(), 0, 0)    # every position is computed
        for name, (q, k, causal, index) in {"encoder": (b.segment_ids, b.segment_ids, False, None),
                                            "decoder": (b.decoder_segment_ids, b.decoder_segment_ids, True, None),
                                            "cross": (b.decoder_segment_ids, b.segment_ids, False, b.cross_index)}.items():
            mask = segment_mask(q, k, causal, None, True, torch.float32, index).block_mask
            kept = mask.kv_num_blocks.sum() + (0 if mask.full_kv_num_blocks is None else mask.full_kv_num_blocks.sum())
            Tk = k.shape[1] if index is None else index.shape[1]
            blocks[name][0] += int(kept) * 128 * 128
            blocks[name][1] += q.numel() * Tk
    rows.append(report(Row("h", "FlexAttention blocks computed, packed", f"{1 if args.quick else 4} of those batches",
                           ", ".join(f"{name} {kept / total:.0%}" for name, (kept, total) in blocks.items()),
                           "", None, None)))
    # attention FLOPs: 2 x 2 H Dh per (query, key) pair, x 3 for forward + backward (model.train_flops)
    per_pair = 12 * mini.n_heads * mini.head_dim
    layers = {"encoder": mini.n_encoder_layers, "decoder": mini.n_decoder_layers, "cross": mini.n_decoder_layers}
    sdpa = per_pair * sum(layers[n] * total for n, (_, total) in blocks.items())
    flex = per_pair * sum(layers[n] * kept for n, (kept, _) in blocks.items())
    rows.append(report(Row("h", "step FLOPs, FlexAttention vs SDPA, packed", "rot5_mini, the same batches",
                           f"attention {flex / (matmul + flex):.0%} of {(matmul + flex) / 1e12:.2f} TFLOP",
                           f"{sdpa / (matmul + sdpa):.0%} of {(matmul + sdpa) / 1e12:.2f} TFLOP (SDPA)",
                           (matmul + sdpa) / (matmul + flex), None)))
    # a training step: section a's batch size on a CPU (memory), the config's micro batch on a GPU
    B = 2 if args.quick else read_config("rot5_mini.py")["micro_batch_size"] if device.type == "cuda" \
        else setup.train_batch
    torch.manual_seed(0)
    model = ROT5(ROT5Config(**setup.mini_arch, vocab_size=tok.vocab_size)).to(device)
    batches = {pack: ul2.UL2Batches(docs, tok, "ul2", setup.encoder_len, setup.decoder_len, B,
                                    static_shapes=args.compile or not pack, pack=pack).batch(0) for pack in (False, True)}
    real = sum(batch_tokens(batches[True]))   # the same documents and corruption in both layouts
    fns = {f"{'packed' if pack else 'padded'} {how}": train_step_fn(model, batches[pack], False, device, dtype, compile)
           for pack in (False, True) for how, compile in ((("compiled", True),) if args.compile else ()) + (("eager", False),)}
    notes.append(f"[h] rows: one example per row {tuple(batches[False].input_ids.shape)} / "
                 f"{tuple(batches[False].labels.shape)}, packed {tuple(batches[True].input_ids.shape)} / "
                 f"{tuple(batches[True].labels.shape)} reading {tuple(batches[True].cross_index.shape)} gathered "
                 f"cross-attention keys, {real} real tokens")
    times = median_times(fns, setup.warmup, setup.iters, device)
    for how in ("compiled", "eager") if args.compile else ("eager",):
        rows.append(report(Row("h", f"train step, {how}, packed vs one example per row", f"rot5_mini, {B} stories",
                               f"{real / times[f'packed {how}']:,.0f} real tok/s",
                               f"{real / times[f'padded {how}']:,.0f} (padded)",
                               times[f"padded {how}"] / times[f"packed {how}"], None)))
    return rows


class HostReads(TorchDispatchMode):
    """Counts the operations that read a tensor's value back to the host: .item() / int() / bool() (aten's
    _local_scalar_dense), torch.equal, nonzero and boolean-mask indexing (output shapes that depend on values),
    and .tolist() (not an aten op: counted by wrapping it). On a GPU each one waits for the device to go idle."""
    READS = {"aten._local_scalar_dense.default", "aten.equal.default", "aten.nonzero.default",
             "aten.masked_select.default", "aten.is_nonzero.default"}

    def __init__(self):
        super().__init__()
        self.reads: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name in self.READS or (name == "aten.index.Tensor" and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])):
            self.reads[name] = self.reads.get(name, 0) + 1
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        tolist = self._tolist = torch.Tensor.tolist

        def counted(t, *a, **k):
            self.reads["tolist"] = self.reads.get("tolist", 0) + 1
            return tolist(t, *a, **k)

        torch.Tensor.tolist = counted
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)


def bench_syncs(args, setup: Setup, tok, docs, notes: list[str]) -> list[Row]:
    """i: host reads of one eager training step (forward + backward) on a packed batch, and the graphs
    torch._dynamo.explain finds in the forward. rot5_mini's layers and heads at a small width (the counts
    do not depend on the width), dense and with Switch MoE; on the CPU, fp32."""
    batch = ul2.UL2Batches(docs, tok, "ul2", setup.encoder_len, setup.decoder_len, 8, static_shapes=True,
                           pack=True).batch(0)
    small = setup.mini_arch | dict(d_model=64, head_dim=8, d_ff=128, vocab_size=tok.vocab_size)
    rows = []
    for name, arch in (("dense", small), ("MoE, 4 experts", small | dict(n_experts=4))):
        torch.manual_seed(0)
        model = ROT5(ROT5Config(**arch))
        with HostReads() as counter:
            out = model(batch)
            (out.loss + out.aux_loss + out.z_loss).backward()
        torch._dynamo.reset()
        explained = torch._dynamo.explain(model)(batch)
        reads = ", ".join(f"{n.removeprefix('aten.').removesuffix('.default')} {k}" for n, k in counter.reads.items())
        rows.append(report(Row("i", "host reads per eager step; graphs, graph breaks of the forward",
                               f"rot5_mini layers, {name}", f"{sum(counter.reads.values())} reads"
                               + (f" ({reads})" if reads else "") + f"; {explained.graph_count} graph(s), "
                               f"{explained.graph_break_count} break(s)", "", None, None)))
    notes.append(f"[i] one packed UL2 batch of 8 stories {tuple(batch.input_ids.shape)} / {tuple(batch.labels.shape)}; "
                 "rot5_mini's 10 + 10 layers, 16 heads, 4 K/V heads at d_model 64; torch._dynamo.explain traces the "
                 "forward (no kernels compiled)")
    return rows


def peak_flops(args, device: torch.device) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    if args.dtype != "bfloat16":
        return None
    return train.device_peak_flops(device) or None  # the bf16 dense peak of a known GPU (train.PEAK_FLOPS)


def target(args, key: str) -> float | None:
    """The targets are for the CPU in fp32 with eager modules (the full shapes, not --quick)."""
    on_cpu = args.device == "cpu" and args.dtype == "float32" and not args.compile and not args.quick
    return TARGETS.get(key) if on_cpu else None


def report(row: Row) -> Row:
    """Print a result as soon as it is measured (a full CPU run takes minutes)."""
    ratio = "" if row.ratio is None else f" = {row.ratio:.2f}x"
    ref = f" vs {row.ref}{ratio}" if row.ref else ""
    print(f"[{row.section}] {row.bench}, {row.model}: {row.rot5}{ref}", flush=True)
    return row


# ----------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> list[Row]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes and few iterations: runs in seconds")
    p.add_argument("--only", default=None, help="comma-separated sections, e.g. a,b (default: a-e, g-i; all on cuda)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="bfloat16: autocast")
    p.add_argument("--compile", action="store_true", help="torch.compile both models for the training steps")
    p.add_argument("--threads", type=int, default=usable_cores(), help="torch threads (default: all cores)")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: known GPUs)")
    p.add_argument("--markdown", action="store_true", help="print the final table as markdown")
    args = p.parse_args(argv)

    device = train.resolve_device(args.device)
    default = "abcdefghi" if device.type == "cuda" or args.quick else "abcdeghi"
    sections = args.only.replace(",", "") if args.only else default
    if not sections or set(sections) - set(SECTIONS):
        raise SystemExit(f"--only {args.only!r}: choose sections among {','.join(SECTIONS)}")
    if args.threads < 1:
        raise SystemExit(f"--threads {args.threads}: must be >= 1")
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    import transformers

    transformers.logging.set_verbosity_error()

    setup = quick_setup() if args.quick else full_setup(device)
    tok = get_tokenizer("mistral")
    print(machine(device, args.threads), flush=True)
    docs = real_documents(tok, setup.prepare_bytes) if set(sections) & set("abcdfghi") else []
    rows: list[Row] = []
    notes: list[str] = []
    if "a" in sections:
        rows += bench_train(args, setup, tok, docs, device, dtype, notes)
    if "b" in sections:
        rows += bench_generate(args, setup, tok, docs, device, dtype, False, notes)
    if "c" in sections:
        rows += bench_generate(args, setup, tok, docs, device, dtype, True, notes)
    if "d" in sections:
        rows += bench_ul2(args, setup, tok, docs, notes)
    if "e" in sections:
        rows += bench_prepare(args, setup, tok, notes)
    if "f" in sections:
        rows += bench_pretrain(args, setup, tok, docs, device, dtype, notes)
    if "g" in sections:
        rows += bench_checks(args, setup, tok, docs, notes)
    if "h" in sections:
        rows += bench_packing(args, setup, tok, docs, device, dtype, notes)
    if "i" in sections:
        rows += bench_syncs(args, setup, tok, docs, notes)
    mode = (f"{args.dtype}{' autocast' if dtype != torch.float32 else ''}, "
            f"{'torch.compile (training steps)' if args.compile else 'eager'}")
    print(f"\n{machine(device, args.threads)}\n{mode}; median of {setup.iters} timed calls after {setup.warmup} "
          "warm-up; ratio = ROT5 speed / reference speed\n")
    print(render(rows, notes, args.markdown), flush=True)
    return rows


if __name__ == "__main__":
    main()
