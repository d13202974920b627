"""
Pre-train ROT5 with the UL2 mixture of denoisers, as the seed write-up did: AdamW at 5e-4, linear warm-up
over the first 1% of steps then linear decay to 0, weight decay 0.01, bf16, a fixed global batch of
documents. One file, top-down: config, distributed setup, data, model, optimizer, the loop.

Usage
    python prepare.py sample && python train.py config/sample_cpu.py        # CPU, bundled sample, minutes
    OMP_NUM_THREADS=1 python train.py config/sample_cpu.py    # faster on a busy CPU (no threads waiting on each other)
    python train.py config/rot5_mini.py                                     # one GPU
    torchrun --standalone --nproc_per_node=8 train.py config/rot5_mini.py   # one node, 8 GPUs (DDP)
    # several nodes: the same command on every node; torchrun's c10d rendezvous finds the others
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
             --rdzv_id=rot5_mini train.py config/rot5_mini.py
    # survive crashes: restarted workers resume from out_dir/ckpt.pt by themselves (several nodes: put
    # out_dir on a file system they share, as rank 0 alone writes the checkpoint)
    torchrun --standalone --nproc_per_node=8 --max-restarts=3 train.py config/rot5_mini.py
    python train.py config/rot5_mini.py --micro_batch_size=32 --compile=True   # override any key
    python train.py config/rot5_mini.py --resume=True                         # continue out_dir/ckpt.pt
    # preemption: SIGTERM, SIGUSR1 or Ctrl-C finish the current step, save it and stop with one line (preempt.py);
    # --save_interval=N also saves every N steps between evaluations
    python train.py --chinchilla=1.37e9      # Chinchilla-optimal model size for a budget of D tokens
    python train.py config/sample_cpu.py --help   # every key, its value (here: after the config) and what it does
    # start from other weights (grow.py): a ROT5 checkpoint or export (continued training: a fresh optimizer and
    # schedule, this run's data), a dense one upcycled into MoE, or an HF model; model keys come from the source
    python train.py config/sample_cpu.py --init_from=out/sample_cpu/ckpt.pt --n_experts=4 --moe_top_k=2 --out_dir=out/moe
    python train.py --dataset=smol --init_from=hf:HuggingFaceTB/SmolLM2-135M   # Llama-family, adapted (T5Gemma)

Config: the defaults below, then config files, then --key=value (configurator.py: type-checked, unknown
keys are errors). The model keys are ROT5Config's fields (model.py) with its defaults: T5-Base.

Batches: batch_size documents per optimizer step = micro_batch_size x accumulation x world_size. Every
micro-batch is a pure function of (seed, g), its global index g = (step * accumulation + micro) * world_size
+ rank: documents [g * micro_batch_size, ...) of the epoch stream and their corruption (ul2.UL2Batches),
and dropout masks too (torch is seeded per micro-batch). So 1 process x 4 accumulation steps and 4
processes x 1 step see the same examples and make the same update, and a resumed run (the checkpoint's
step is its data position) makes the very updates of an uninterrupted one (a log interval that straddles
the checkpoint averages only its steps after it). A new run refuses an out_dir that holds a checkpoint.
With pack=True (the default) a micro-batch's examples are packed several to a row (ul2.pack_examples):
encoder rows of encoder_len and decoder rows of decoder_len, each side packed apart, in numbers that vary a
little from one micro-batch to the next; the loss is the same token-weighted mean over the same examples, so
pack=False (one example per row) trains the same model, slower. The UL2 evaluation packs its rows too; the
continuation loss reads whole stories one per row, in order of length (ul2.continuation_batches says why).
--compile: the training step is one graph (the model reads nothing back to the host but a Switch FFN's
expert counts; batches are checked on the CPU before they move: batch.check_batch), compiled once with
symbolic row counts (Batch.mark_dynamic); on a GPU its attention is FlexAttention (model.use_flex). The one
wait for the device per optimizer step is the read of the step's losses (the non-finite check).
A full disk, a damaged shard, a damaged checkpoint, a second run on the same out_dir or a bad setting ends the run
with one line and the last checkpoint intact (README.md, "What survives what").

Outputs in out_dir:
    ckpt.pt        checkpoint.py's format, kind "pretrain"; written (atomically) at every evaluation, every
                   save_interval steps, and when a signal stops the run (preempt.py)
    ckpt.prev.pt   the checkpoint before it (resuming falls back to it when ckpt.pt is damaged)
    run.lock       held while the run goes on (a second run on this out_dir is refused; checkpoint.RunLock)
    curves.png     the loss curves, learning rate and tokens/s, redrawn at every evaluation (plot.py; needs
                   matplotlib); wandb_log / tensorboard_log send every event to those trackers too
    metrics.jsonl  one JSON object per event, for plots:
        {"event": "train", "step", "tokens", "loss", "lm_loss", "aux_loss", "z_loss", "lr", "grad_norm",
         "tok_per_s", "mfu" (null if the peak is unknown), "enc_real" / "dec_real" (the fraction of encoder /
         decoder positions that hold real tokens, not padding: rank 0's batches), "expert_load" (MoE: per
         layer, per expert)}
        {"event": "eval" | "eval_full", "step", "tokens", "val_loss", "val_aux_loss", "val_z_loss",
         "val_loss_R", "val_loss_X", "val_loss_S", "continuation_loss", "docs"}
        {"event": "skip", "step", "loss", "grad_norm"}      (a non-finite loss or gradient: no update)
    Losses are means over the steps since the last "train" event; "tokens" counts raw document tokens
    (before corruption), the unit of the seed's token counts and of `max_tokens`. val_loss is the LM
    cross-entropy alone, so dense and MoE variants compare; "eval" uses the fixed first eval_docs
    validation documents with a fixed corruption, "eval_full" (at the end) the whole validation split.
    val_loss_R/X/S: val_loss over the examples of each UL2 mode (null for a mode the mixture lacks), as UL2
    reports its denoisers apart; val_loss is their token-weighted mean. continuation_loss: the same documents
    cut at half their tokens, [S] + first half -> second half (ul2.continuation_batches), nats per target
    token: the quality number of a story model, which does not depend on the mixture or the windows.
"""
from __future__ import annotations

import inspect
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict
from types import SimpleNamespace

# CPU: back tensors of 2 MB and more with transparent huge pages. The (tokens x 32k) logits and their
# gradients are allocated and freed every step, and with 4 KB pages the kernel faulted them in again each
# time: with it, 13x fewer page faults and half the system time of a quick-start step on a 2-core EPYC
# (BENCHMARKS.md). PyTorch reads this once, at its first tensor allocation: set it before anything allocates
# (`import torch` allocates nothing, so ablation.py, which imports torch first, gets it too: checked with
# AnonHugePages in /proc/self/smaps_rollup; after any allocation, even a small one, it is ignored).
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import grow
import preempt
import prepare
import ul2
from batch import Batch, check_batch
from checkpoint import (RunLock, check_start, checkpoint_exists, load_model, log_event, new_model, random_states,
                        remove_run_temps, restart_log, resume_run, save_checkpoint)
from configurator import check_ranges, configure, documented_keys, given_keys, help_text, wants_help
from diskio import check_out_dir
from model import ROT5, ROT5Config, RelativePositionBias, SwitchFFN
from plot import Tracker, check_trackers
from ul2 import MODES, UL2Batches, continuation_batches

# -----------------------------------------------------------------------------------------------------------
# default config: the seed's T5-Base run (UL2 on 1 epoch of TinyStories, batch 300); config/*.py change it.
# `python train.py --help` lists these keys under the group comments below, each with its trailing comment.
# data
dataset = "tinystories"   # data/<dataset>/ from prepare.py
mixture = "ul2"           # ul2.mixture(): "ul2" | "t5" | "prefix_lm"
encoder_len = 512         # longest input (T5's 512); longer documents are cropped to fit (ul2.py)
decoder_len = 256         # longest target
pack = True               # several examples per row, no compute on padding (T5's packing; ul2.pack_examples)
# optimization: AdamW with HF Trainer's defaults for the rest, as the seed (transformers 4.36)
batch_size = 300          # documents per optimizer step, over all processes and accumulation steps
micro_batch_size = 30     # documents per forward pass per process
learning_rate = 5e-4      # peak learning rate
weight_decay = 0.01       # on matrices only (see param_groups)
beta1 = 0.9               # AdamW's decay rate of the gradient's running mean
beta2 = 0.999             # AdamW's decay rate of the squared gradient's running mean
grad_clip = 1.0           # max global gradient norm (0: no clipping)
max_bad_steps = 5         # stop after this many non-finite steps in a row
# schedule: the budget (max_tokens > 0 wins over epochs), the learning rate, logging and evaluation
epochs = 1.0              # passes over the training documents (fractional is fine)
max_tokens = 0.0          # raw document tokens to train on, e.g. 1.37e9 (0: use epochs)
warmup_frac = 0.01        # linear warm-up over this fraction of the steps, then linear decay to 0
log_interval = 10         # steps between "train" events
eval_interval = 500       # steps between evaluations on the fixed validation subset (and checkpoints)
save_interval = 0         # steps between checkpoints besides the evaluations' (0: none): bounds what a crash costs
eval_docs = 500           # that subset: the first eval_docs validation documents (the seed: 500)
eval_batch_size = 32      # documents per eval forward; the subset's corruption is drawn per eval batch,
                          # so keep it equal across the variants you compare
# model: where its weights start (the model's own keys are ROT5Config's, below)
init_from = ""            # "": random | a ROT5 checkpoint or export | hf:HUB_ID or a directory (T5, Llama / Mistral,
                          # Switch): unset model keys come from it; set ones must agree (grow.py)
cross_init = "self"       # init_from a Llama / Mistral: cross-attention copied from self-attention ("self", T5Gemma)
                          # or that with its output zeroed ("zero": the decoder starts as the source model)
# system
out_dir = "out/pretrain"  # the run's directory: ckpt.pt, metrics.jsonl, curves.png
resume = False            # continue from out_dir/ckpt.pt (automatic after a torchrun --max-restarts restart)
device = "auto"           # "auto": cuda if available, else cpu; or "cpu", "cuda", "cuda:N" (one process)
compile = False           # torch.compile the training step: one graph (rows padded to encoder_len / decoder_len)
dtype = "auto"            # "float32" | "bfloat16" (autocast) | "auto": bfloat16 where it is faster (resolve_dtype)
seed = 0                  # the documents' order, their corruption, the initial weights and dropout
peak_flops = 0.0          # device peak FLOP/s for MFU; 0: the GPU's bf16 dense peak from PEAK_FLOPS
wandb_log = False         # send the metrics to Weights & Biases (pip install wandb; WANDB_MODE=offline: on disk)
wandb_project = "rot5"    # its W&B project
wandb_run_name = ""       # its W&B run name ("": W&B picks one)
tensorboard_log = False   # write TensorBoard events to out_dir/tensorboard (pip install tensorboard)
# -----------------------------------------------------------------------------------------------------------
TRAIN_DEFAULTS = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (bool, int, float, str))}
USAGE = """usage: python train.py [CONFIG_FILE ...] [--key=value ...]
       torchrun --standalone --nproc_per_node=N train.py [CONFIG_FILE ...] [--key=value ...]
       python train.py --chinchilla=TOKENS     (the Chinchilla-optimal model size for a budget of TOKENS tokens)"""

# Dense bf16 tensor-core peaks (vendor datasheets, without sparsity), matched against the device name in order.
PEAK_FLOPS = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12),
              ("RTX 3090", 71e12), ("RTX 4090", 165e12))
# what makes a run that run: resuming with any of these changed warns that it will not match an uninterrupted one
RUN_KEYS = ("dataset", "mixture", "encoder_len", "decoder_len", "pack", "epochs", "max_tokens", "batch_size",
            "learning_rate", "warmup_frac", "seed", "dtype", "init_from", "cross_init")
EVAL_SEED = 0             # the eval subset's corruption: fixed, whatever the run's seed
ADAM_EPS = 1e-8           # HF Trainer's default


def main(argv: list[str] | None = None) -> dict:
    """Train with the config from argv (sys.argv[1:] by default); returns the last evaluation."""
    argv = sys.argv[1:] if argv is None else argv
    if wants_help(argv):
        print(config_help(argv))
        return {}
    at = next((i for i, a in enumerate(argv) if a == "--chinchilla" or a.startswith("--chinchilla=")), None)
    if at is not None:  # anywhere on the command line; the other arguments do not matter to it
        value = argv[at].partition("=")[2] or (argv[at + 1] if at + 1 < len(argv) else "")
        try:
            tokens = float(value)
        except ValueError:
            tokens = 0.0
        if not 0 < tokens < math.inf:
            raise SystemExit("usage: python train.py --chinchilla=TOKENS  (a data budget > 0, finite, e.g. 1.37e9)")
        print_chinchilla(tokens)
        return {}
    model_defaults = asdict(ROT5Config())
    assert not set(model_defaults) & set(TRAIN_DEFAULTS), "a training key shadows a ROT5Config field"
    config = configure({**TRAIN_DEFAULTS, **model_defaults}, argv)
    check_ranges(config, positive=("log_interval", "eval_interval", "eval_docs", "eval_batch_size", "encoder_len",
                                   "decoder_len", "batch_size", "micro_batch_size", "learning_rate", "max_bad_steps"),
                 non_negative=("save_interval", "epochs", "max_tokens", "weight_decay", "grad_clip", "peak_flops"),
                 fractions=("warmup_frac", "beta1", "beta2"))
    if not 0 <= config["seed"] < 2 ** 31:  # torch seeds are (seed << 32) + micro-batch index: 64 bits
        raise SystemExit(f"--seed={config['seed']} must be in [0, 2**31)")
    check_data_settings(config)
    check_trackers(config)
    if config["cross_init"] not in grow.CROSS_INITS:
        raise SystemExit(f"--cross_init={config['cross_init']!r}: use {' or '.join(map(repr, grow.CROSS_INITS))}")
    source = load_model(config["init_from"], cross_init=config["cross_init"]) if config["init_from"] else None
    model_cfg = run_model_config(config, source, given_keys(argv))

    # torchrun sets RANK / LOCAL_RANK / WORLD_SIZE (and MASTER_ADDR/PORT after its rendezvous).
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and ":" in config["device"]:
        raise SystemExit(f"--device={config['device']!r} under torchrun: use --device=cuda (process LOCAL_RANK "
                         "takes GPU LOCAL_RANK)")
    device = resolve_device(config["device"], local_rank)
    resolve_dtype(config["dtype"], device)  # a wrong value is one line here, before any work
    check_out_dir(config["out_dir"])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # SIGTERM / SIGUSR1 / Ctrl-C: a checkpoint after the current step, then stop (preempt.py). One run per
    # out_dir (checkpoint.RunLock, held by rank 0): a run going on in it already is refused here, at once.
    lock = RunLock(tqdm.write)
    with preempt.handled(say_on_signal=rank == 0) as stop:
        try:
            if rank == 0:
                lock.claim(config["out_dir"], make=False)
            if world > 1:
                init_process_group("nccl" if device.type == "cuda" else "gloo", rank, world)
            return train(config, model_cfg, rank, world, device, stop, lock, source)
        finally:
            lock.release()
            if world > 1 and dist.is_initialized():
                dist.destroy_process_group()


def train(config: dict, model_cfg: ROT5Config, rank: int, world: int, device: torch.device, stop: preempt.Stop,
          lock: RunLock, source=None) -> dict:
    """source: (model, tokenizer, checkpoint dict) of init_from (checkpoint.load_model), or None: random weights."""
    cfg = SimpleNamespace(**config)  # cfg.batch_size reads better than config["batch_size"]
    ddp, master = world > 1, rank == 0
    say = tqdm.write if master else (lambda *args: None)
    # bf16 autocast (no loss scaling needed: fp32's exponent range) where `dtype` asks for it or, with "auto",
    # where it is faster (resolve_dtype). TF32 for the matmuls left in fp32 on GPU.
    bf16 = resolve_dtype(cfg.dtype, device) == torch.bfloat16
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if cfg.batch_size % (cfg.micro_batch_size * world):
        raise SystemExit(f"batch_size={cfg.batch_size} must be a multiple of micro_batch_size x processes = "
                         f"{cfg.micro_batch_size} x {world}: change micro_batch_size or the number of processes")
    accum = cfg.batch_size // (cfg.micro_batch_size * world)

    # -- data -------------------------------------------------------------------------------------------
    data_dir = os.path.join("data", cfg.dataset)
    try:
        meta = prepare.load_meta(data_dir)
        tok = prepare.load_tokenizer(data_dir)  # the one meta.json names, checked against what it recorded
        # (also checks every shard: sizes, index, checksum, ids in range; prepare.py's docstring)
        train_docs, val_docs = prepare.load_documents(data_dir, "train"), prepare.load_documents(data_dir, "val")
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if not tok.mode_ids:  # T5's own vocabulary (tokenizer.py)
        raise SystemExit(f"{data_dir} was tokenized with T5's {tok.name!r}, which has no UL2 mode tokens: pre-train on "
                         "data prepared with --tokenizer mistral or gpt2 (T5's is for fine-tuning HF T5 models)")
    if source is not None:  # the source's ids must mean what the data's do
        try:
            prepare.check_tokenizer(data_dir, source[1])
        except ValueError:
            raise SystemExit(f"{data_dir} was tokenized with {meta['tokenizer']!r} ({meta['vocab_size']:,} ids) but "
                             f"{cfg.init_from} uses {source[1].name!r} ({source[1].vocab_size:,} ids): run `python "
                             f"prepare.py {meta['dataset']} --tokenizer {source[1].name} --out-dir DIR` and pass DIR's "
                             "name as --dataset") from None
    wanted = {"vocab_size": tok.vocab_size, "pad_token_id": tok.pad_id, "eos_token_id": tok.eos_id}
    wrong = {k: v for k, v in wanted.items() if getattr(model_cfg, k) != v}
    if wrong:
        raise SystemExit(f"{data_dir} was tokenized with {tok.name!r} but the model has "
                         f"{', '.join(f'{k}={getattr(model_cfg, k)}' for k in wrong)}: set "
                         f"{' '.join(f'--{k}={v}' for k, v in wrong.items())}")
    doc_lengths = train_docs.lengths                   # (n_docs,) raw tokens per document, for token counts
    n_train_tokens = meta["splits"]["train"]["tokens"]
    tokens_per_doc = n_train_tokens / len(train_docs)
    # A world-size-1 view of the document stream indexed by the global micro-batch index g (see docstring).
    batches = UL2Batches(train_docs, tok, cfg.mixture, cfg.encoder_len, cfg.decoder_len, cfg.micro_batch_size,
                         seed=cfg.seed, static_shapes=cfg.compile, pack=cfg.pack)
    # Validation: every rank takes every world-th eval batch; the corruption depends on neither.
    val_batches = UL2Batches(val_docs, tok, cfg.mixture, cfg.encoder_len, cfg.decoder_len, cfg.eval_batch_size,
                             seed=EVAL_SEED, rank=rank, world_size=world, static_shapes=cfg.compile, pack=True)
    n_eval = min(cfg.eval_docs, len(val_docs))

    # -- budget: the LR schedule needs the number of steps up front -------------------------------------
    if cfg.max_tokens > 0:
        budget = cfg.max_tokens
        max_steps = math.ceil(cfg.max_tokens / (tokens_per_doc * cfg.batch_size))
    elif cfg.epochs > 0:
        budget = cfg.epochs * n_train_tokens
        max_steps = math.ceil(cfg.epochs * len(train_docs) / cfg.batch_size)
    else:
        raise SystemExit(f"no budget: set epochs > 0 (got {cfg.epochs}) or max_tokens > 0 (got {cfg.max_tokens})")
    warmup_steps = math.ceil(cfg.warmup_frac * max_steps)  # HF Trainer rounds warmup_ratio * steps up too

    # -- model and optimizer ----------------------------------------------------------------------------
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    raw_model = new_model(model_cfg, device)
    if source is not None:  # (an upcycled model's routers keep the seeded init above)
        grow.init_weights(raw_model, source[0])
    # (one graph per step: the model reads no value back to the host, except the Switch FFN's expert counts)
    model = torch.compile(raw_model) if cfg.compile else raw_model
    # MoE: an expert that no token of a micro-batch picked gets no gradient; DDP must be told to expect that.
    train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                      find_unused_parameters=model_cfg.n_experts > 0) if ddp else model
    optimizer = torch.optim.AdamW(param_groups(raw_model, cfg.weight_decay), lr=cfg.learning_rate,
                                  betas=(cfg.beta1, cfg.beta2), eps=ADAM_EPS, fused=True)  # one kernel, CPU or GPU
    peak = cfg.peak_flops or device_peak_flops(device)

    # -- resume -----------------------------------------------------------------------------------------
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0 and checkpoint_exists(ckpt_path)
    resuming = [cfg.resume or restarted]
    if ddp:  # rank 0 decides; a rank that cannot see its checkpoint (no shared out_dir) then fails clearly
        dist.broadcast_object_list(resuming, src=0)
    # Never overwrite a run by starting another in its out_dir: and a crash of the new run before its first
    # checkpoint would otherwise make a torchrun restart resume the old one.
    check_start(ckpt_path, resuming[0])
    start_step, tokens_seen, last_eval, saved_step = 0, 0, {}, None
    if resuming[0]:
        start_step, last_eval = resume_run(ckpt_path, "pretrain", raw_model, optimizer, config, RUN_KEYS, say, master)
        tokens_seen, saved_step = last_eval["tokens"], start_step
        if start_step >= max_steps:  # nothing is written: the finished run stays as it is
            say(finished_line(ckpt_path, start_step, max_steps))
            return {**last_eval, "max_steps": max_steps}
        if last_eval.get("max_steps", max_steps) != max_steps:
            say(schedule_change_line(last_eval["max_steps"], max_steps, warmup_steps, start_step,
                                     optimizer.param_groups[0]["lr"], cfg.learning_rate))
    if master:
        lock.claim(cfg.out_dir)  # (makes out_dir)
        remove_run_temps(cfg.out_dir, say)
        restart_log(metrics_path, start_step if resuming[0] else None, say)

    tracker = Tracker(config, metrics_path, say) if master else None  # curves.png, W&B, TensorBoard (plot.py)

    def log(event: dict) -> None:
        if master:
            log_event(metrics_path, event)
            tracker.log(event)

    def save(step: int) -> None:
        nonlocal saved_step
        saved_step = step
        if master:
            save_checkpoint(ckpt_path, {
                "kind": "pretrain", "model": raw_model.state_dict(), "model_config": asdict(model_cfg),
                "tokenizer": tok.name, "config": config, "step": step, "optimizer": optimizer.state_dict(),
                "rng": random_states(), "metrics": {**last_eval, "tokens": tokens_seen, "max_steps": max_steps}})

    def evaluate(n_docs: int | None) -> dict:
        def run(batches) -> dict:
            return validation_loss(model, batches, device, autocast, ddp, tok.mode_ids, cfg.compile)

        cont = continuation_batches(val_docs, tok, cfg.eval_batch_size, n_docs, rank, world)
        return {**run(val_batches.eval_batches(n_docs)), "continuation_loss": run(cont)["val_loss"]}

    c, n_opt, _ = chinchilla(budget)
    if source is not None:
        kind, step = source[2]["kind"], source[2].get("step")
        upcycled = model_cfg.n_experts and not source[0].cfg.n_experts
        say(f"init_from {cfg.init_from} ({kind}{'' if step is None else f', step {step}'})"
            + (f": upcycled to {model_cfg.n_experts} experts, top-{model_cfg.moe_top_k}" if upcycled else ""))
    say(f"model: {raw_model.num_params() / 1e6:.1f}M parameters ({raw_model.num_params(exclude_embeddings=True) / 1e6:.1f}M "
        f"without the embedding) | Chinchilla (Hoffmann et al. 2022) for D = {budget:.3g} tokens: C = {c:.3g} FLOPs, "
        f"N_opt = {n_opt / 1e6:.3g}M parameters")
    say(f"data: {data_dir}, {len(train_docs):,} documents, {n_train_tokens:,} tokens | {max_steps:,} steps of "
        f"{cfg.batch_size} documents = {cfg.micro_batch_size} x {accum} accumulation x {world} processes | "
        f"warm-up {warmup_steps} steps | {device} {'bf16' if bf16 else 'fp32'}"
        f"{f' | resuming at step {start_step}' if start_step else ''}")

    if start_step == 0:
        last_eval = {"step": 0, "tokens": 0, **evaluate(n_eval), "docs": n_eval}
        log({"event": "eval", **last_eval})
        say(f"step 0: {eval_line(last_eval)}")

    # -- the loop ---------------------------------------------------------------------------------------
    stop.defer()  # from here on a signal stops the run after its current step, with a checkpoint at that step
    train_model.train()
    bar = step_bar(max_steps, start_step, disable=not master)
    n_moe = sum(isinstance(m, SwitchFFN) for m in raw_model.modules())
    interval = Interval(n_moe, model_cfg.n_experts)   # sums since the last "train" event
    bad_in_a_row = 0
    for step in range(start_step, max_steps):
        lr = cfg.learning_rate * lr_factor(step, max_steps, warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # on the device, read once per step: the LM, aux and z losses and the expert loads, summed over micro-batches
        losses = torch.zeros(3, dtype=torch.float64, device=device)
        load = torch.zeros(n_moe, model_cfg.n_experts, dtype=torch.float64, device=device)
        work = torch.zeros(2, dtype=torch.float64)   # this rank's raw document tokens (max_tokens' unit), FLOPs
        for micro in range(accum):
            g = (step * accum + micro) * world + rank
            # Built and checked here on the CPU (no device sync), not prefetched: the corruption is vectorised
            # numpy, ~1% of a GPU step (ul2.py), and the device is still busy with the previous micro-batch.
            batch = batches.batch(g)
            check_batch(batch, model_cfg)
            enc_real, dec_real = interval.count(batch)
            work += torch.tensor([float(doc_lengths[batches.indices(g)].sum()), raw_model.train_flops(
                enc_real, dec_real, batch.input_ids.shape[1], batch.labels.shape[1])], dtype=torch.float64)
            batch = batch.to(device)
            if cfg.compile:
                batch.mark_dynamic()      # row counts and gathered key width vary: compile the step once
            torch.manual_seed((cfg.seed << 32) + g)  # dropout masks, like the data, depend on (seed, g) only
            # DDP: all-reduce the gradients only after the last micro-batch (no_sync covers forward+backward)
            sync = nullcontext() if not ddp or micro == accum - 1 else train_model.no_sync()
            with sync:
                with autocast:
                    out = train_model(batch)
                    loss = out.loss + out.aux_loss + out.z_loss  # the LM loss plus the MoE losses, optimized together
                (loss / accum).backward()
            losses += torch.stack([out.loss, out.aux_loss, out.z_loss]).detach()
            if out.expert_load is not None:
                load += out.expert_load.detach()
        signals = torch.tensor(stop.flags(), dtype=torch.float64)  # a signal on any rank stops all (preempt.py)
        losses, load, work, signals = sum_over_ranks([losses, load, work.to(device), signals.to(device)], ddp)
        # the step's one wait for the device
        lm, aux, z, tokens, flops, *signalled = torch.cat([losses / (accum * world), work, signals]).tolist()
        step_loss = lm + aux + z
        interval.tokens, interval.flops = interval.tokens + tokens, interval.flops + flops
        tokens_seen += int(tokens)
        # (the loss and the gradients are identical on every rank after the all-reduces: all skip or none)
        grad_norm, updated = guarded_step(raw_model, optimizer, cfg.grad_clip, step_loss)
        if updated:
            bad_in_a_row = 0
            interval.add_step(lm, aux, z, grad_norm, load / (accum * world))
        else:
            bad_in_a_row += 1
            log({"event": "skip", "step": step + 1, "loss": step_loss, "grad_norm": grad_norm})
            say(f"step {step + 1}: non-finite loss {step_loss} / grad norm {grad_norm}: update skipped")
            if bad_in_a_row >= cfg.max_bad_steps:
                kept = f"{ckpt_path} holds the last good state (step {saved_step})" if saved_step is not None \
                    else "no checkpoint was written yet"
                raise SystemExit(f"{bad_in_a_row} non-finite steps in a row (up to step {step + 1}): stopping; {kept}. "
                                 "Lower learning_rate or check the data before resuming")
        bar.update(1)
        done = step + 1

        if (done % cfg.log_interval == 0 or done == max_steps) and interval.steps:
            event = {"event": "train", "step": done, "tokens": tokens_seen, **interval.means(), "lr": lr}
            event["mfu"] = event.pop("flop_per_s") / (peak * world) if peak else None
            log(event)
            bar.set_postfix(loss=f"{event['loss']:.4f}", lr=f"{lr:.2e}")
            say(f"step {done}: loss {event['loss']:.4f} (lm {event['lm_loss']:.4f} aux {event['aux_loss']:.4f} "
                f"z {event['z_loss']:.4f}) | lr {lr:.2e} | grad norm {event['grad_norm']:.2f} | "
                f"{event['tok_per_s']:,.0f} tok/s" + (f" | mfu {event['mfu']:.1%}" if peak else "")
                + f" | real tokens {event['enc_real']:.0%} enc, {event['dec_real']:.0%} dec"
                # load x n_experts: 1.0 = perfectly balanced; the busiest expert of the worst layer
                + (f" | max expert load {max(map(max, event['expert_load'])) * model_cfg.n_experts:.2f}x" if n_moe else ""))
            interval = Interval(n_moe, model_cfg.n_experts)

        if done % cfg.eval_interval == 0 or done == max_steps:
            t_eval = time.perf_counter()
            last_eval = {"step": done, "tokens": tokens_seen, **evaluate(n_eval), "docs": n_eval}
            log({"event": "eval", **last_eval})
            say(f"step {done}: {eval_line(last_eval)} on {n_eval} documents")
            if done == max_steps:  # (the subset may be the whole split: then its numbers are the full ones)
                full = {**last_eval, "docs": len(val_docs)} if n_eval == len(val_docs) else \
                    {"step": done, "tokens": tokens_seen, **evaluate(None), "docs": len(val_docs)}
                log({"event": "eval_full", **full})
                last_eval = {**last_eval, **{f"full_{k}": v for k, v in full.items() if k not in ("step", "tokens", "docs")}}
                say(f"final: {eval_line(full)} on the full validation split ({len(val_docs):,} documents)")
            save(done)
            paused = time.perf_counter() - t_eval  # evaluation and saving are not training throughput
            interval.t0 += paused
            exclude_pause(bar, paused)

        # a signal (on any rank) or save_interval: a checkpoint at this step, unless the evaluation wrote it
        stopping = done < max_steps and stop.requested(signalled)
        if saved_step != done and (stopping or cfg.save_interval and done % cfg.save_interval == 0):
            save(done)
        if stopping:
            bar.close()
            if ddp:
                dist.barrier()  # every rank waits for rank 0's save: torchrun stops the others when one exits
            raise stop.stopped(done, f"saved {ckpt_path} at that step",
                               "continue with the same command and --resume=True")
    bar.close()
    if master:
        tracker.close()
    return {**last_eval, "max_steps": max_steps}


def run_model_config(config: dict, source, given: set[str]) -> ROT5Config:
    """The run's model: its model keys, or with init_from its source's (grow.init_config checks the keys set)."""
    model_keys = asdict(ROT5Config()).keys()
    if source is None:
        if "cross_init" in given:
            raise SystemExit("--cross_init says how to adapt a Llama / Mistral --init_from; there is none here")
        try:
            return ROT5Config(**{k: config[k] for k in model_keys})
        except ValueError as e:  # e.g. n_kv_heads does not divide n_heads
            raise SystemExit(str(e)) from None
    model, tok, ckpt = source
    if not tok.mode_ids:  # T5's own vocabulary
        raise SystemExit(f"{config['init_from']} uses T5's vocabulary ({tok.name!r}), which has no UL2 mode tokens: "
                         f"train.py pre-trains with UL2; fine-tune it with finetune.py --init_from={config['init_from']}")
    if "cross_init" in given and ckpt["kind"] != "hf-llama":
        raise SystemExit(f"--cross_init says how to adapt a Llama / Mistral model; {config['init_from']} is not one "
                         f"(a {ckpt['kind']} checkpoint)")
    return grow.init_config(model.cfg, config, given & model_keys, config["init_from"], ckpt["kind"] == "hf-llama")


def config_help(argv: list[str]) -> str:
    """`python train.py --help`: every key (the training keys above, then ROT5Config's) with its value and its
    line, read off the comments of the defaults (configurator.documented_keys)."""
    model_defaults = asdict(ROT5Config())
    keys = documented_keys(__file__, TRAIN_DEFAULTS) + documented_keys(
        inspect.getsourcefile(ROT5Config), model_defaults, scope=ROT5Config.__name__,
        group="model: ROT5Config's fields (model.py); T5-Base by default")
    return help_text(USAGE, "Pre-train ROT5 with the UL2 mixture of denoisers (the top of train.py has the details).",
                     keys, {**TRAIN_DEFAULTS, **model_defaults}, argv)


def init_process_group(backend: str, rank: int, world: int) -> None:
    """dist.init_process_group on torchrun's store, under a key prefix of its own per restart attempt.

    torchrun keeps ONE TCPStore for every attempt of a job, holding the keys the last attempt wrote. When a
    worker dies before the process group is up (a kill in the first seconds), its peers' addresses stay there:
    the restarted workers read them, connect to processes that no longer exist and fail in gloo's
    connectFullMesh ("Connection refused"), using up --max-restarts (reproduced with torch 2.13, 2 CPU
    workers, --max-restarts=1, one worker killed before init_process_group). A prefix per attempt
    (TORCHELASTIC_RESTART_COUNT) never sees the old keys.

    torch.distributed.nn is imported first: its functions take `group=group.WORLD` as a default argument,
    evaluated when the module is imported, and DDP's constructor imports it (through torch._dynamo). Imported
    after the group exists, those defaults hold the group for good: destroy_process_group() cannot free it,
    and gloo's worker and network threads (pt_gloo_runloop, gloo_tcp_loop) run on while the interpreter shuts
    down, the state in which a finished run's worker was seen to abort on a loaded machine ("terminate called
    without an active exception", SIGABRT). Checked with torch 2.13: those threads outlive
    destroy_process_group unless this import comes first."""
    import torch.distributed.nn  # noqa: F401 - before the group exists (above)

    store, _, _ = next(dist.rendezvous("env://", rank, world))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(backend, store=dist.PrefixStore(f"rot5/attempt_{attempt}", store), rank=rank,
                            world_size=world)


def check_data_settings(config: dict) -> None:
    """The data settings that UL2Batches would reject only after the data is read: one line, before anything."""
    try:
        ul2.mixture(config["mixture"])
    except ValueError as e:
        raise SystemExit(f"--mixture={config['mixture']!r}: {e}") from None
    short = [f"--{k}={config[k]}" for k in ("encoder_len", "decoder_len") if config[k] < ul2.MIN_LEN]
    if short:
        raise SystemExit(f"{', '.join(short)}: encoder_len and decoder_len must be at least {ul2.MIN_LEN} (the mode token, "
                         "sentinels, spans and eos of a UL2 example must fit)")


def step_bar(total: int, initial: int, disable: bool = False) -> tqdm:
    """The progress bar of train.py and finetune.py: optimizer steps, their rate and the time left."""
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, disable=disable)


def exclude_pause(bar: tqdm, seconds: float) -> None:
    """Leave a pause (an evaluation, a checkpoint) out of the bar's rate and ETA, so that both come from the
    steps alone: shift its clocks (start and last print) past it. tqdm's unpause() restarts them from the last
    print instead, which would also drop the time of the steps made since that print."""
    if not bar.disable:  # (a disabled bar has no clocks)
        bar.start_t += seconds
        bar.last_print_t += seconds


def finished_line(ckpt_path: str, step: int, max_steps: int, budget: str = "epochs or max_tokens") -> str:
    """What resuming a run that has done its budget says (instead of an empty progress bar); budget: the keys
    that set it."""
    done = f"already finished its {max_steps:,} steps" if step == max_steps else \
        f"is at step {step:,}, past this budget's {max_steps:,} steps"
    return (f"{ckpt_path} {done}: nothing to do; to train further raise {budget} with --resume=True "
            "(the learning-rate schedule is then recomputed for the larger budget)")


def schedule_change_line(old_steps: int, max_steps: int, warmup_steps: int, step: int, lr_now: float,
                         peak_lr: float) -> str:
    """What a resume with another budget does to the learning rate: lr_factor is a function of max_steps, so the
    schedule is recomputed for the new budget; say where the rate goes from the one the run stopped at."""
    lr_next = peak_lr * lr_factor(step, max_steps, warmup_steps)
    path = (f"warms up again to {peak_lr:.2e} by step {warmup_steps:,}, then decays" if step < warmup_steps else
            "decays from there")
    return (f"warning: the budget changed from {old_steps:,} to {max_steps:,} steps: the learning-rate schedule (warm-up "
            f"{warmup_steps:,} steps, linear decay) is recomputed for {max_steps:,} steps, so at step {step:,} the rate "
            f"goes from {lr_now:.2e} (where the run stopped) to {lr_next:.2e} and {path} linearly to 0 at step "
            f"{max_steps:,}")


def lr_factor(step: int, max_steps: int, warmup_steps: int) -> float:
    """HF get_linear_schedule_with_warmup: step / warmup up to warmup, then linear decay to 0 at max_steps.
    (As there, the first update has lr 0 when warmup_steps > 0.)"""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    return max(0.0, (max_steps - step) / max(1, max_steps - warmup_steps))


def param_groups(model: ROT5, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on matrices (linear layers, MoE routers, the token embedding), none on RMSNorm
    gains or T5's relative-position bias tables (a bias per head and distance bucket, stored as a matrix).

    The token embedding is decayed: with tie_embeddings it is also the output layer, a matrix like any
    other, and the seed's HF Trainer decayed it too (it exempts only biases and norm weights). Decoupled
    decay (AdamW) shrinks rows of rare tokens slowly, lr * wd per step, which is negligible over a run."""
    tables = {id(p) for m in model.modules() if isinstance(m, RelativePositionBias) for p in m.parameters()}
    decay = [p for p in model.parameters() if p.dim() >= 2 and id(p) not in tables]
    no_decay = [p for p in model.parameters() if p.dim() < 2 or id(p) in tables]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def guarded_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float,
                 loss: float) -> tuple[float, bool]:
    """Clip the global gradient norm to grad_clip (0: no clipping) and update, unless the loss or the gradient
    is not finite: then drop the gradients and skip the update, so one bad batch (or a bf16 overflow) cannot
    turn every weight into NaN. Returns (the gradient norm before clipping, whether the update was made)."""
    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or math.inf))
    updated = math.isfinite(loss) and math.isfinite(grad_norm)
    if updated:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, updated


def sum_over_ranks(tensors: list[torch.Tensor], ddp: bool) -> list[torch.Tensor]:
    """Sums over this rank's micro-batches -> sums over every rank's, with one all-reduce for all of them."""
    flat = torch.cat([t.flatten() for t in tensors])
    if ddp:
        dist.all_reduce(flat)  # (the gradients were all-reduced by DDP during the last backward)
    return [part.view_as(t) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


class Interval:
    """What a "train" event reports, summed since the last one: the losses of the updates made, the tokens and
    FLOPs of every step (all ranks; a skipped step's time and work count for the throughput), and the real
    tokens of this rank's rows (counted from the batches on the CPU)."""

    def __init__(self, n_moe: int, n_experts: int):
        self.steps, self.t0 = 0, time.perf_counter()
        self.lm = self.aux = self.z = self.grad_norm = self.flops = 0.0
        self.tokens = 0.0   # raw document tokens
        self.enc_real = self.enc_positions = self.dec_real = self.dec_positions = 0
        self.load = torch.zeros(n_moe, n_experts, dtype=torch.float64)

    def count(self, batch: Batch) -> tuple[int, int]:
        """A micro-batch of this rank: its real encoder and decoder tokens, counted against its row positions."""
        enc_real, dec_real = int((batch.segment_ids > 0).sum()), int((batch.labels != -100).sum())
        self.enc_real, self.enc_positions = self.enc_real + enc_real, self.enc_positions + batch.input_ids.numel()
        self.dec_real, self.dec_positions = self.dec_real + dec_real, self.dec_positions + batch.labels.numel()
        return enc_real, dec_real

    def add_step(self, lm: float, aux: float, z: float, grad_norm: float, load: torch.Tensor) -> None:
        """An update was made, with these losses (means over the step's micro-batches and ranks)."""
        self.steps += 1
        self.lm, self.aux, self.z, self.grad_norm = self.lm + lm, self.aux + aux, self.z + z, self.grad_norm + grad_norm
        self.load += load.cpu()

    def means(self) -> dict:
        dt, n = time.perf_counter() - self.t0, self.steps
        event = {"loss": (self.lm + self.aux + self.z) / n, "lm_loss": self.lm / n, "aux_loss": self.aux / n,
                 "z_loss": self.z / n, "grad_norm": self.grad_norm / n, "tok_per_s": self.tokens / dt,
                 "flop_per_s": self.flops / dt, "enc_real": self.enc_real / self.enc_positions,
                 "dec_real": self.dec_real / self.dec_positions}
        if self.load.numel():
            event["expert_load"] = [[round(x, 4) for x in row] for row in (self.load / n).tolist()]
        return event


@torch.no_grad()
def validation_loss(model: torch.nn.Module, batches, device: torch.device, autocast, ddp: bool,
                    mode_ids: dict[str, int], compiled: bool = False) -> dict:
    """Token-weighted mean LM loss (and MoE losses) over this rank's eval batches, summed over ranks, and the LM
    loss of each UL2 mode (None for a mode no example has), as UL2 reports its denoisers apart (Tay et al. 2022,
    sec. 4). One forward per packed batch: each label's loss counts for the mode its example's input starts
    with. (MoE: the aux and z losses, batch statistics, are weighted by the batch's labels.)"""
    model.eval()
    modes = torch.tensor([mode_ids[m] for m in MODES], device=device)
    sums = torch.zeros(len(MODES), 2, dtype=torch.float64, device=device)  # per mode: loss, labels
    moe = torch.zeros(2, dtype=torch.float64, device=device)                # aux * labels, z * labels
    for batch in batches:
        mode = example_modes(batch)[batch.decoder_segment_ids]   # (B_dec, T) each label's mode, on the CPU
        batch, mode = batch.to(device), mode.to(device)
        if compiled:
            batch.mark_dynamic()
        with autocast:
            out = model(batch._replace(labels=None, label_index=None))            # the logits of every position
        token_loss = F.cross_entropy(out.logits.flatten(0, 1).float(), batch.labels.flatten(), ignore_index=-100,
                                     reduction="none").view(batch.labels.shape)  # (B_dec, T), 0 where ignored
        which = (mode[..., None] == modes) & (batch.labels != -100)[..., None]      # (B_dec, T, n_modes)
        sums[:, 0] += (which * token_loss[..., None]).sum((0, 1))
        sums[:, 1] += which.sum((0, 1))
        moe += torch.stack([out.aux_loss, out.z_loss]) * (batch.labels != -100).sum()
    if ddp:
        dist.all_reduce(sums)
        dist.all_reduce(moe)
    model.train()
    (per_mode, counts), total = sums.T.tolist(), float(sums[:, 1].sum())
    aux, z = (moe / total).tolist()
    return {"val_loss": sum(per_mode) / total, "val_aux_loss": aux, "val_z_loss": z,
            **{f"val_loss_{m}": loss / n if n else None for m, loss, n in zip(MODES, per_mode, counts)}}


def example_modes(batch: Batch) -> torch.Tensor:
    """(n_examples + 1,) the first input token of each example (UL2's mode token), by segment id; 0 for padding."""
    seg, ids = batch.segment_ids.flatten(), batch.input_ids.flatten()
    first = torch.ones_like(seg, dtype=torch.bool)
    first[1:] = seg[1:] != seg[:-1]
    first &= seg > 0
    return torch.zeros(int(seg.max()) + 1, dtype=ids.dtype).scatter(0, seg[first], ids[first])


def eval_line(e: dict) -> str:
    modes = " ".join(f"{m} {e[f'val_loss_{m}']:.3f}" for m in MODES if e[f"val_loss_{m}"] is not None)
    return f"val_loss {e['val_loss']:.4f} ({modes}) | continuation_loss {e['continuation_loss']:.4f}"


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """The device a `device` setting names, checked here so that a wrong one is one line, not a traceback
    from deep in the model: "auto" (cuda if this PyTorch sees a GPU, else cpu), "cpu", "cuda" (GPU local_rank:
    torchrun's LOCAL_RANK) or "cuda:N". Shared by train.py, finetune.py and sample.py."""
    fix = "use auto, cpu, cuda or cuda:N"
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"device {name!r} is not a device name: {fix}") from None
    if device.type not in ("cpu", "cuda"):  # mps, xpu, ...: parse, but this code is written for cpu and cuda
        raise SystemExit(f"device {name!r}: ROT5 runs on cpu or cuda; {fix}")
    if device.type == "cuda":
        device = torch.device("cuda", local_rank if device.index is None else device.index)
        if device.index >= torch.cuda.device_count():  # (under torchrun, "cuda" is GPU LOCAL_RANK)
            raise SystemExit(f"device {name!r} is {device}, but this PyTorch sees {torch.cuda.device_count()} CUDA "
                             f"GPU(s) (torch {torch.__version__}); use cpu, or a GPU that exists")
    return device


DTYPES = ("float32", "bfloat16", "auto")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The compute dtype a `dtype` setting names: float32, or bfloat16 (autocast: matmuls in bf16, weights,
    optimizer and reductions in fp32). "auto" is bfloat16 where it is the faster choice: a CUDA GPU with bf16,
    or a CPU with AMX (amx_bf16: Sapphire Rapids and later, where bf16 autocast measured 1.2x on a whole
    training step, BENCHMARKS.md); fp32 elsewhere, including CPUs with only AVX-512-BF16, where it was not
    measured, and AVX2 CPUs, where bf16 is emulated and slower (set "bfloat16" to try it anyway)."""
    if name not in DTYPES:
        raise SystemExit(f"--dtype={name!r} is not a dtype: use {', '.join(DTYPES)}")
    cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if name == "bfloat16" and device.type == "cuda" and not cuda_bf16:
        raise SystemExit(f"--dtype=bfloat16 but {torch.cuda.get_device_name(device)} has no bf16: use float32 or auto")
    if name == "auto":
        fast = cuda_bf16 if device.type == "cuda" else torch.cpu.get_capabilities().get("amx_bf16", False)
        return torch.bfloat16 if fast else torch.float32
    return torch.bfloat16 if name == "bfloat16" else torch.float32


def device_peak_flops(device: torch.device) -> float:
    """bf16 dense peak of a known GPU, else 0 (MFU not reported; set peak_flops to report it)."""
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_FLOPS if key in name), 0.0)


def chinchilla(tokens: float) -> tuple[float, float, float]:
    """Compute-optimal sizes for a data budget of D tokens (Hoffmann et al. 2022, with the fits the seed uses):
    D_opt = 0.3 C^0.55 solved for C, then N_opt = 0.6 C^0.45. Returns (C, N_opt, D_opt); D_opt = D."""
    c = (tokens / 0.3) ** (1 / 0.55)
    return c, 0.6 * c ** 0.45, 0.3 * c ** 0.55


def print_chinchilla(tokens: float) -> None:
    c, n_opt, d_opt = chinchilla(tokens)
    print(f"D = {tokens:.3g} tokens -> C = {c:.3g} FLOPs -> N_opt = {n_opt / 1e6:.1f}M parameters "
          f"(D_opt = {d_opt:.3g} tokens; Hoffmann et al. 2022, N_opt = 0.6 C^0.45, D_opt = 0.3 C^0.55)")


if __name__ == "__main__":
    main()
