"""
The ROT5 write-up's ablation study from one command: what each post-T5 idea does to a T5-Base-shaped
encoder-decoder pre-trained with UL2 on TinyStories, then what the best of them does for summarization.

The study (the seed's "Initial Pretraining" and "Initial Summarization Tuning"):
  1. Pre-train five variants, each the previous one plus one change (config/<name>.py presets):
         t5_base               T5 v1.0: learned relative position bias, multi-head attention, dense FFN
         rot5_base_rope        + rotary position embeddings (RoFormer)
         rot5_base_gqa         + grouped-query attention (Ainslie et al. 2023)
         rot5_base_moe         + Switch mixture of experts in every other FFN (Fedus et al. 2021), no aux losses
         rot5_base_moe_losses  + the load-balancing loss and the router z-loss (ST-MoE)
     at matched compute: every variant trains for the same steps on the same documents, in the same order,
     with the same UL2 corruption (train.py's batches are a function of (seed, step) only), and the same
     batch size (the seed lowered it to 256 for MoE to fit its GPUs; here MoE gets the dense batch too).
     MoE is compared at equal ACTIVE parameters per token: top-1 routing sends each token through one
     expert the size of the dense FFN, so it costs the dense model's FLOPs (plus a tiny router) while
     holding n_experts times the FFN parameters in its MoE layers.
  2. Fine-tune the T5 baseline and the best upgraded variant (lowest full validation loss, averaged over
     the seeds; the seed's was RoPE + GQA) on story -> summary pairs and score ROUGE-L (finetune.py).
  3. Do 1-2 once per seed (--seeds; 3 at the CPU scale). A seed fixes the documents' order, their UL2
     corruption, the initial weights and dropout, and it is the same for every variant, so a variant and the
     baseline trained with one seed differ only in the change under study. The statistics use that pairing:
     per variant the mean and standard deviation over seeds, and the PAIRED difference to the baseline
     (variant - baseline, seed by seed) with a 95% Student-t confidence interval over seeds; a difference
     whose interval excludes 0 is called significant (a two-sided paired t-test at the 5% level).
  4. Write results.md (the tables, and in words which of the write-up's orderings this run reproduces) and the
     seed's charts as PNGs with error bars (+-1 standard deviation over seeds): validation-loss curves per
     variant, final full-validation-loss bars, fine-tuning loss and ROUGE-L curves with final bars.
  Your own ablation: --variants a.py,b.py,... takes config files instead of preset names; each is a variant
     trained at matched compute (the same documents, steps and batch) against the first, the baseline.
  --flan adds the seed's calibration row: FLAN-T5-Base (a Hugging Face model, loaded through hf_t5.from_hf_t5)
     fine-tuned by the same finetune.py run on the same pairs, tokenized with T5's own tokenizer into
     data/<fine-tuning dataset>_t5 (the CPU scale prepares it; the full scale needs `python prepare.py
     tinystories_instruct --tokenizer t5:google/flan-t5-base --out-dir data/tinystories_instruct_t5`).
     `--flan=hf:HUB_ID` or `--flan=DIR` fine-tunes another HF T5 (a save_pretrained directory) instead.

Scales:
  --scale cpu   (default) config/ablation_cpu.py after each preset: d_model 256, 4 heads x 64, 2 + 2 layers,
                GQA with 2 K/V heads, MoE with 4 experts, half an epoch (226 steps of 16 documents) of the
                bundled sample (data/sample), then fine-tuning on the bundled 3 TinyStories-Instruct records
                (2 train, 1 validation: an end-to-end exercise, not a score); 3 seeds. README "Ablation study"
                has the results and the measured wall time.
  --scale full  the presets themselves (~223M parameters; 1 epoch of TinyStories, 7,066 steps of 300
                documents each), fine-tuning with config/finetune_summary.py (1M pairs of
                TinyStories-Instruct). Needs `python prepare.py tinystories` and `tinystories_instruct`
                and a GPU: `--plan` prints the runs and their cost estimated from FLOPs (~0.3 hours per
                pre-training, ~2 hours in all on one H100 at an ASSUMED 30% MFU; not measured). At the CPU
                scale `--plan` times a few training steps of each variant on this CPU instead. Either way it
                reads the prepared bundled sample (python prepare.py sample, sample_instruct) and writes nothing.

Usage:
    python ablation.py                                   # CPU scale, 3 seeds, out/ablation
    python ablation.py --seeds 0                         # one seed: a third of the time, no error bars
    python ablation.py --scale full --out out/ablation_full
    python ablation.py --scale full --out out/ablation_full --flan   # + the FLAN-T5-Base row (the seed's 55.71)
    python ablation.py --scale full --plan               # the runs, steps, FLOPs and GPU-hours; trains nothing
    python ablation.py --plan                            # the CPU scale: CPU time from a few steps timed here
    python ablation.py --steps 20                        # pre-train every variant for 20 steps instead
    python ablation.py --variants t5_base,rot5_base_gqa  # a subset (in the study's order)
    python ablation.py --variants config/t5_base.py,my_variant.py   # your own variants, each against the first
    python ablation.py --scale full --micro_batch_size=15  # any other --key=value goes to every train.py run

Re-running is resume-friendly: a run whose final metrics exist (its ablation.json holds a result) is
skipped; an interrupted run continues from its checkpoint (train.py or finetune.py --resume); a run directory
written with other settings is refused (use another --out). Each run's directory is exactly what train.py
or finetune.py writes (ckpt.pt, metrics.jsonl, predictions.jsonl), so every number here can be re-derived.

Outputs in --out: seed<k>/<variant>/ (pre-training), seed<k>/<variant>_summary/ (fine-tuning;
seed<k>/flan_t5_summary/ with --flan), results.md,
ablation_pretrain_val_loss.png, ablation_pretrain_final_val_loss.png, ablation_summary_val_loss.png,
ablation_summary_rougeL.png (matplotlib is optional: without it the runs and results.md still happen).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, fields
from typing import NamedTuple

import torch

import finetune
import preempt
import prepare
import train
from configurator import configure, read_config_file
from diskio import check_out_dir
from hf_t5 import t5_tokenizer_name
from model import ROT5, ROT5Config, SwitchFFN
from plot import TRACKING_KEYS
from tokenizer import get_tokenizer
from ul2 import UL2Batches

HERE = os.path.dirname(os.path.abspath(__file__))


class Variant(NamedTuple):
    name: str    # the run's directory under --out/seed<k>/
    label: str   # for tables and charts
    config: str  # its config file: a preset config/<name>.py, or the user's own


def preset(name: str, label: str) -> Variant:
    return Variant(name, label, os.path.join(HERE, "config", f"{name}.py"))


VARIANTS = (  # the seed's order: each one adds one change to the one before; the first is the baseline
    preset("t5_base", "T5"),
    preset("rot5_base_rope", "+RoPE"),
    preset("rot5_base_gqa", "+RoPE +GQA"),
    preset("rot5_base_moe", "+RoPE +GQA +MoE"),
    preset("rot5_base_moe_losses", "+MoE +aux/z losses"),
)

# The seed's results, read off its charts (1 epoch of TinyStories at T5-Base size on 2 RTX 3090s).
# Its MoE + losses bar lies between MoE and T5; the write-up gives no number for it.
SEED_FULL_VAL_LOSS = {"t5_base": 2.573, "rot5_base_rope": 2.117, "rot5_base_gqa": 2.074, "rot5_base_moe": 2.203}
SEED_RANKING = ("rot5_base_gqa", "rot5_base_rope", "rot5_base_moe", "rot5_base_moe_losses", "t5_base")  # best first
SEED_ROUGE_L = {"t5_base": 20.50, "rot5_base_gqa": 26.45, "flan_t5": 55.71}  # (ROT5-mini 46.41)
# --flan: the seed's calibration row, an HF model fine-tuned the same way ("hf_t5" when --flan names another one)
FLAN_MODEL, FLAN_LABEL = "hf:google/flan-t5-base", "FLAN-T5-Base"

DEFAULT_SEEDS = {"cpu": "0,1,2", "full": "0"}  # error bars where a seed costs minutes; one GPU study otherwise
CONFIDENCE = 0.95     # of the paired t intervals
# --scale cpu: what differs per variant at d_model 256 with 4 heads (the rest is config/ablation_cpu.py).
CPU_SCALE = os.path.join(HERE, "config", "ablation_cpu.py")
CPU_GQA_KV_HEADS = 2  # the presets' 12 query heads / 4 K/V heads = 3 per group does not divide 4 heads
CPU_EXPERTS = 4       # the presets' 8 experts, halved with the model
# --scale full: the seed's dense batch for every preset, MoE included (matched compute, see the docstring)
FULL_BATCH = ["--batch_size=300", "--micro_batch_size=30"]
# What every variant must share to be compared at matched compute: the same documents, steps and updates.
BUDGET_KEYS = ("dataset", "epochs", "max_tokens", "batch_size", "seed")
# The keys the presets differ in, and the keys this script sets itself: not overridable from the command line.
ABLATED_KEYS = ("position", "n_kv_heads", "n_experts", "moe_top_k", "aux_loss_coef", "z_loss_coef")
OWN_KEYS = ("out_dir", "resume", "seed")

# GPU cost estimate for --plan: FLOPs / (peak x MFU). The MFU is an ASSUMPTION, not a measurement: eager
# PyTorch encoder-decoders of this size typically reach 25-40% of the bf16 peak on one GPU.
ASSUMED_MFU = 0.30
GPUS = (("H100 SXM", dict(train.PEAK_FLOPS)["H100"]), ("RTX 3090", dict(train.PEAK_FLOPS)["RTX 3090"]))
PLAN_BATCHES = 8      # UL2 micro-batches of the bundled sample drawn to measure FLOPs per document

CHARTS = ("ablation_pretrain_val_loss.png", "ablation_pretrain_final_val_loss.png",
          "ablation_summary_val_loss.png", "ablation_summary_rougeL.png")


def main(argv: list[str] | None = None) -> dict:
    """study(argv), stopped by SIGTERM / SIGUSR1 / Ctrl-C with nothing lost (preempt.py): a run in progress saves a
    checkpoint after its current step; the line says to run the same command again."""
    with preempt.handled():
        try:
            return study(argv)
        except preempt.Stopped as e:
            raise preempt.Stopped(e.what, "run the same ablation.py command again to go on: finished runs are skipped "
                                          "and the interrupted one resumes from its checkpoint") from None


def study(argv: list[str] | None = None) -> dict:
    """Run (or resume) the study; returns {"pretrain": {name: row}, "finetune": {name: row}}, each row holding
    its per-seed rows ("seeds": {seed: row}) and the statistics over them (see aggregate)."""
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    variants, seeds = args.variants, args.seeds
    t_start = time.perf_counter()
    if args.scale == "cpu" and not args.plan:  # the bundled sample: cheap, idempotent ("up to date" when done)
        with contextlib.redirect_stdout(io.StringIO()):  # in one process: under a second, less than starting workers
            for name in ("sample", "sample_instruct"):
                prepare.prepare(name, out_dir=os.path.join("data", name), workers=1)

    # (seed, name) -> (argv, resolved config); a variant that would not train at matched compute is refused here
    runs = {(seed, v.name): pretrain_args(v, args, overrides, seed) for seed in seeds for v in variants}
    check_matched(variants, {v.name: runs[seeds[0], v.name][1] for v in variants})
    if args.plan:
        print_plan({v.name: runs[seeds[0], v.name] for v in variants}, args)
        return {}
    # Every dataset the study needs must exist before hours of pre-training, not after them.
    ft_dataset = configure(finetune.DEFAULTS, [finetune_preset(args.scale)])["dataset"]
    if args.flan:  # T5's own tokenizer: the same pairs, tokenized for the HF model
        flan_dataset = f"{ft_dataset}_t5"
        if args.scale == "cpu":
            with contextlib.redirect_stdout(io.StringIO()):
                try:
                    prepare.prepare(ft_dataset, out_dir=os.path.join("data", flan_dataset),
                                    tokenizer=t5_tokenizer_name(args.flan), workers=1)
                except ValueError as e:
                    raise SystemExit(f"--flan={args.flan}: {e}") from None
    for dataset in sorted({config["dataset"] for _, config in runs.values()} | {ft_dataset}):
        try:
            prepare.load_meta(os.path.join("data", dataset))
        except ValueError as e:
            raise SystemExit(str(e)) from None
    if args.flan and not os.path.exists(os.path.join("data", flan_dataset, "meta.json")):
        raise SystemExit(f"--flan needs the fine-tuning pairs tokenized with T5's tokenizer: run `python prepare.py "
                         f"{ft_dataset} --tokenizer {t5_tokenizer_name(args.flan)} --out-dir data/{flan_dataset}` first")

    say(f"{args.scale} scale: pre-training {len(variants)} variants x {len(seeds)} seed(s) into {args.out}")
    for seed in seeds:  # seed by seed: the first seed's whole study is done before the second starts
        for i, v in enumerate(variants, 1):
            argv, config = runs[seed, v.name]
            run_once(variant_dir(args.out, seed, v.name), config, train.main, argv,
                     what=f"seed {seed}: pre-training {v.name} ({i}/{len(variants)}): python train.py")

    baseline = variants[0].name
    rows = {v.name: {seed: pretrain_row(v, variant_dir(args.out, seed, v.name), runs[seed, v.name][1]) for seed in seeds}
            for v in variants}
    pre = {v.name: aggregate(rows[v.name], PRETRAIN_METRICS, rows[baseline]) for v in variants}

    labels = {v.name: v.label for v in variants}
    tuned = finetune_choice(pre, baseline)
    post_runs = {}  # name -> {seed: run directory}
    for name in tuned:
        post_runs[name] = {}
        for seed in seeds:
            ft_argv, config = finetune_args(name, args.scale, args.out, runs[seed, name][1], seed)
            post_runs[name][seed] = variant_dir(args.out, seed, f"{name}_summary")
            run_once(post_runs[name][seed], config, finetune.main, ft_argv,
                     what=f"seed {seed}: fine-tuning {name}: python finetune.py")
    if args.flan:
        name = "flan_t5" if args.flan == FLAN_MODEL else "hf_t5"
        labels[name] = FLAN_LABEL if name == "flan_t5" else f"HF T5 {args.flan}"
        post_runs[name] = {}
        for seed in seeds:
            post_runs[name][seed] = variant_dir(args.out, seed, f"{name}_summary")
            ft_argv = [finetune_preset(args.scale), f"--init_from={args.flan}", f"--dataset={flan_dataset}",
                       f"--seed={seed}", f"--out_dir={post_runs[name][seed]}"]
            run_once(post_runs[name][seed], configure(finetune.DEFAULTS, ft_argv), finetune.main, ft_argv,
                     what=f"seed {seed}: fine-tuning {labels[name]}: python finetune.py")
    rows = {name: {seed: finetune_row(d) for seed, d in dirs.items()} for name, dirs in post_runs.items()}
    post = {name: aggregate(rows[name], FINETUNE_METRICS, rows.get(baseline)) for name in rows}

    table = results_table(pre, post, labels, args.scale, seeds, variants)
    with prepare.atomic_write(os.path.join(args.out, "results.md"), "w", then=AGAIN) as f:
        f.write(table)
    print(table)
    draw_charts(args.out, pre, post, labels, variants)
    say(f"done in {time.perf_counter() - t_start:.0f} s (skipped runs not counted); {args.out}/results.md")
    return {"pretrain": pre, "finetune": post}


def variant_dir(out: str, seed: int, name: str) -> str:
    return os.path.join(out, f"seed{seed}", name)


# -----------------------------------------------------------------------------------------------------------
# the runs: argv for train.py / finetune.py, and running each once

def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    ap = argparse.ArgumentParser(description="ROT5 ablation study (see the module docstring)", allow_abbrev=False,
                                 epilog="other --key=value arguments are passed to every train.py run")
    ap.add_argument("--scale", choices=("cpu", "full"), default="cpu")
    ap.add_argument("--seeds", help="comma-separated seeds, each a whole study (default: 0,1,2 at the CPU scale, "
                                    "0 at full scale)")
    ap.add_argument("--steps", type=int, default=0, help="pre-training steps for every variant (default: the scale's)")
    ap.add_argument("--out", default="out/ablation", help="output directory")
    ap.add_argument("--variants", default=",".join(v.name for v in VARIANTS),
                    help="comma-separated preset names (a subset, run in the study's order) or your own config "
                         "files (run in the order given, each against the first)")
    ap.add_argument("--plan", action="store_true", help="print the runs and their estimated cost; train nothing")
    ap.add_argument("--flan", nargs="?", const=FLAN_MODEL, metavar="MODEL",
                    help=f"also fine-tune an HF T5 the same way: {FLAN_MODEL} (the seed's row) by default, or "
                         "hf:HUB_ID, or a save_pretrained directory")
    args, rest = ap.parse_known_args(argv)
    check_out_dir(args.out, "--out")
    args.variants = pick_variants(args.variants)
    seeds = args.seeds if args.seeds is not None else DEFAULT_SEEDS[args.scale]
    try:
        args.seeds = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        args.seeds = []
    if not args.seeds or len(set(args.seeds)) < len(args.seeds) or not all(0 <= s < 2 ** 31 for s in args.seeds):
        raise SystemExit(f"--seeds {seeds}: give distinct integers in [0, 2**31), comma-separated (e.g. --seeds 0,1,2)")
    if args.steps < 0:
        raise SystemExit(f"--steps={args.steps} must be >= 1 (or 0 for the scale's default)")
    for arg in rest:
        key = arg[2:].partition("=")[0]
        if args.steps and key in ("epochs", "max_tokens"):
            raise SystemExit(f"--steps and --{key} both set the pre-training budget: give one of them")
        if not arg.startswith("--") or "=" not in arg:
            raise SystemExit(f"cannot parse {arg!r}: pass train.py settings as --key=value (e.g. --micro_batch_size=8)")
        if key in ABLATED_KEYS + OWN_KEYS:
            why = {"seed": "use --seeds", "out_dir": "use --out", "resume": "re-running resumes by itself"}.get(
                key, "it is what the variants differ in")
            raise SystemExit(f"--{key} is set by the study itself ({why}): drop it, or run train.py directly")
    return args, rest


def pick_variants(spec: str) -> list[Variant]:
    """--variants: preset names only -> those presets in the study's order; otherwise the items in the order
    given, each a preset name or a config file (named and labelled by its file name)."""
    items = [s.strip() for s in spec.split(",") if s.strip()]
    presets = {v.name: v for v in VARIANTS}
    if items and all(s in presets for s in items):
        return [v for v in VARIANTS if v.name in items]
    variants = []
    for item in items:
        if item in presets:
            variants.append(presets[item])
        elif item.endswith(".py") and os.path.isfile(item):
            path = os.path.abspath(item)
            same = [v for v in VARIANTS if v.config == path]  # a preset named by its file
            name = os.path.splitext(os.path.basename(item))[0]
            variants.append(same[0] if same else Variant(name, name, path))
        else:
            raise SystemExit(f"--variants {item}: neither a preset ({', '.join(presets)}) nor an existing config "
                             "file (path/to/file.py)")
    names = [v.name for v in variants]
    if not variants or len(set(names)) < len(names):
        raise SystemExit(f"--variants {spec}: give at least one variant, each once (run directories are named "
                         f"after the files: {', '.join(names) or 'none'})")
    return variants


def check_matched(variants: list[Variant], configs: dict[str, dict]) -> None:
    """Every variant trains on the baseline's budget: otherwise a difference in loss measures the budget."""
    base = variants[0]
    for v in variants[1:]:
        for key in BUDGET_KEYS:
            if configs[v.name][key] != configs[base.name][key]:
                raise SystemExit(f"--variants: {shown(v.config)} trains with {key}={configs[v.name][key]!r}, the "
                                 f"baseline {shown(base.config)} with {configs[base.name][key]!r}; variants compare at "
                                 f"matched compute: remove {key} from {shown(v.config)} (or pass --{key}=... to all)")


def resolve_pretrain(argv: list[str]) -> dict:
    """train.py's config for argv (the same defaults and config files train.main reads)."""
    return configure({**train.TRAIN_DEFAULTS, **asdict(ROT5Config())}, argv)


def pretrain_args(v: Variant, args: argparse.Namespace, overrides: list[str], seed: int) -> tuple[list[str], dict]:
    """train.py argv for one variant and seed: its config file, then the scale's settings, then the user's
    overrides."""
    if args.scale == "cpu":
        own = resolve_pretrain([v.config])
        cpu_fixed(v, own, args.variants[0])
        deltas = ([f"--n_kv_heads={CPU_GQA_KV_HEADS}"] if own["n_kv_heads"] < own["n_heads"] else []) \
            + ([f"--n_experts={CPU_EXPERTS}"] if own["n_experts"] else [])
        argv = [v.config, CPU_SCALE, *deltas, *overrides]
    else:
        argv = [v.config, *(FULL_BATCH if v in VARIANTS else []), *overrides]
    if args.steps:
        # train.py takes a budget, not a step count: steps = ceil(epochs * documents / batch_size). Half a
        # document below N batches makes the ceiling exactly N whatever the float rounding.
        config = resolve_pretrain(argv)
        n_docs = train_documents(config["dataset"])
        argv += [f"--epochs={(args.steps * config['batch_size'] - 0.5) / n_docs!r}", "--max_tokens=0"]
    argv += [f"--seed={seed}", f"--out_dir={variant_dir(args.out, seed, v.name)}"]
    return argv, resolve_pretrain(argv)


def cpu_fixed(v: Variant, own: dict, baseline: Variant) -> None:
    """The CPU scale sets the model's shape and training for every variant (config/ablation_cpu.py), mapping
    only GQA and MoE to its 4 heads. A variant that differs from the baseline in another key the scale sets
    would silently lose its change: refuse it."""
    base = resolve_pretrain([baseline.config])
    # GQA's ratio; the budget, matched anyway; how it runs (the presets compile for the GPU), not what it trains
    mapped = ("n_kv_heads", "batch_size", "micro_batch_size", "out_dir", "compile")
    lost = [k for k in read_config_file(CPU_SCALE) if k not in mapped and own[k] != base[k]]
    if lost:
        what = ", ".join(f"{k}={own[k]!r} (baseline {base[k]!r})" for k in lost)
        raise SystemExit(f"--variants: {shown(v.config)} changes {what}, which the CPU scale sets for every variant "
                         f"(config/ablation_cpu.py): ablate it with --scale full, or ablate another key")


def finetune_preset(scale: str) -> str:
    return os.path.join(HERE, "config", "finetune_sample_cpu.py" if scale == "cpu" else "finetune_summary.py")


def finetune_args(name: str, scale: str, out: str, pre_config: dict, seed: int) -> tuple[list[str], dict]:
    """finetune.py argv: the scale's preset, this variant's checkpoint of this seed, pre-training's encoder_len
    so the model reads no position it was not pre-trained on, and the seed (the pairs' order, dropout)."""
    argv = [finetune_preset(scale), f"--init_from={os.path.join(variant_dir(out, seed, name), 'ckpt.pt')}",
            f"--encoder_len={pre_config['encoder_len']}", f"--seed={seed}",
            f"--out_dir={variant_dir(out, seed, f'{name}_summary')}"]
    return argv, configure(finetune.DEFAULTS, argv)


def run_once(run_dir: str, config: dict, script_main: Callable[[list[str]], dict], argv: list[str],
             what: str) -> None:
    """script_main(argv) (train.main or finetune.main) unless run_dir/ablation.json holds a result for this config;
    `what` and the equivalent command line are printed when it runs.

    ablation.json = {"config": the resolved config (but out_dir, resume and the tracking keys, which change where
    the numbers go, not what they are), "result": the script's return value (null while running), "wall_s"}.
    It is written before the run so that a changed setting is caught on the next invocation.
    An interrupted run continues from its last checkpoint (train.py and finetune.py check it is the same model
    and run). wall_s adds up every invocation that worked on the run: what it cost, including the steps redone
    after the last checkpoint."""
    state_path = os.path.join(run_dir, "ablation.json")
    comparable = {k: v for k, v in config.items() if k not in ("out_dir", "resume", "save_interval", *TRACKING_KEYS)}  # (no result depends on these)
    spent = 0.0  # seconds earlier, interrupted invocations spent on this run
    if os.path.exists(state_path):
        with open(state_path) as f:
            state = json.load(f)
        changed = sorted(k for k in comparable.keys() | state["config"].keys()
                         if comparable.get(k) != state["config"].get(k))
        if changed:
            diff = ", ".join(f"{k}: {state['config'].get(k)!r} -> {comparable.get(k)!r}" for k in changed)
            raise SystemExit(f"{run_dir} was run with other settings ({diff}): use another --out, or delete {run_dir}")
        if state["result"] is not None:
            say(f"{run_dir}: done before ({state['wall_s']:.0f} s), skipped")
            return
        spent = state.get("wall_s") or 0.0
    say(f"{what} {' '.join(map(shown, argv))}")
    os.makedirs(run_dir, exist_ok=True)
    resume = os.path.exists(os.path.join(run_dir, "ckpt.pt"))
    if resume:
        say(f"{run_dir}: resuming from its checkpoint")
    write_json(state_path, {"config": comparable, "result": None, "wall_s": spent})
    t0, result = time.perf_counter(), None
    try:
        result = script_main(argv + (["--resume=True"] if resume else []))
    finally:  # interrupted too (Ctrl-C, an error): the time is kept for the invocation that finishes the run
        write_json(state_path, {"config": comparable, "result": result, "wall_s": spent + time.perf_counter() - t0})


def finetune_choice(pre: dict[str, dict], baseline: str) -> list[str]:
    """The baseline and the upgraded variant with the lowest full validation loss, averaged over the seeds (the
    seed's: RoPE + GQA): the comparison the seed's summarization section makes."""
    upgrades = [name for name in pre if name != baseline]
    return [baseline] + ([min(upgrades, key=lambda n: pre[n]["full_val_loss"].mean)] if upgrades else [])


def train_documents(dataset: str) -> int:
    """Training documents of data/<dataset>; the seed's count for a full dataset not downloaded yet (--plan)."""
    try:
        return prepare.split_counts(os.path.join("data", dataset), "train")["documents"]
    except ValueError as e:
        if (dataset, "train") in prepare.SEED_COUNTS:
            return prepare.SEED_COUNTS[(dataset, "train")][1]
        raise SystemExit(str(e)) from None


# -----------------------------------------------------------------------------------------------------------
# results: rows from the metrics files, the tables, the charts

def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def pretrain_row(v: Variant, run_dir: str, config: dict) -> dict:
    """One seed's pre-training of one variant, read off its metrics.jsonl."""
    events = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    evals = [e for e in events if e["event"] == "eval"]
    full = [e for e in events if e["event"] == "eval_full"]
    if not full:
        raise SystemExit(f"{run_dir}/metrics.jsonl has no final (eval_full) event: delete {run_dir} and re-run")
    speeds = [e["tok_per_s"] for e in events if e["event"] == "train"]
    total, active = param_counts(config)
    with open(os.path.join(run_dir, "ablation.json")) as f:
        wall = json.load(f)["wall_s"]
    return {"label": v.label, "params": total, "active_params": active, "steps": full[-1]["step"],
            "tokens": full[-1]["tokens"], "val_loss": evals[-1]["val_loss"], "full_val_loss": full[-1]["val_loss"],
            "continuation_loss": full[-1]["continuation_loss"],
            "tok_per_s": statistics.median(speeds) if speeds else None, "wall_s": wall,
            "curve": [(e["tokens"], e["val_loss"]) for e in evals]}


def finetune_row(run_dir: str) -> dict:
    evals = [e for e in read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if e["event"] == "eval"]
    with open(os.path.join(run_dir, "ablation.json")) as f:
        wall = json.load(f)["wall_s"]
    return {"val_loss": evals[-1]["val_loss"], "rougeL": evals[-1]["rougeL"], "lead1_rougeL": evals[-1]["lead1_rougeL"],
            "n_eval": evals[-1]["n_eval"], "steps": evals[-1]["step"], "wall_s": wall,
            "curve": [(e["step"], e["val_loss"], e["rougeL"]) for e in evals]}


# -----------------------------------------------------------------------------------------------------------
# statistics over seeds

PRETRAIN_METRICS = ("full_val_loss", "continuation_loss")
FINETUNE_METRICS = ("val_loss", "rougeL")


class Spread(NamedTuple):
    """A metric over seeds."""
    mean: float
    sd: float | None  # sample standard deviation (n - 1 in the denominator); None for one seed


class Paired(NamedTuple):
    """variant - baseline, seed by seed: the same seed gives both the same documents, order, corruption and
    initial draws, so the difference is free of most seed-to-seed noise (a paired design)."""
    mean: float
    low: float | None   # the CONFIDENCE Student-t interval of the mean difference: mean +- t * sd / sqrt(n),
    high: float | None  # n - 1 degrees of freedom; None for one seed

    @property
    def significant(self) -> bool | None:
        """The interval excludes 0: a two-sided paired t-test rejects "no difference" at 1 - CONFIDENCE."""
        return None if self.low is None else self.low > 0 or self.high < 0


def aggregate(rows: dict[int, dict], metrics: tuple[str, ...], baseline_rows: dict[int, dict] | None) -> dict:
    """The first seed's row (its non-statistical fields: label, params, steps...), with each metric replaced by
    its Spread over seeds, "vs_baseline": {metric: Paired} (empty for the baseline itself), and "seeds": rows."""
    seeds = sorted(rows)
    agg = {**rows[seeds[0]], "seeds": rows, "vs_baseline": {}}
    for metric in metrics:
        values = [rows[s][metric] for s in seeds]
        agg[metric] = Spread(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None)
        if baseline_rows is not None and baseline_rows is not rows:
            agg["vs_baseline"][metric] = paired([rows[s][metric] - baseline_rows[s][metric] for s in seeds])
    return agg


def paired(diffs: list[float]) -> Paired:
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return Paired(mean, None, None)
    half = t_quantile((1 + CONFIDENCE) / 2, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return Paired(mean, mean - half, mean + half)


def t_quantile(p: float, df: int) -> float:
    """The p-quantile (p > 0.5) of Student's t with df degrees of freedom: bisection on its CDF, 0.5 + the
    integral of the density from 0 (Simpson's rule, 2,000 panels: exact to ~1e-9 for the few-seed t's here)."""
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(t: float, panels: int = 2000) -> float:
        h = t / panels
        pdf = [math.exp(log_norm - (df + 1) / 2 * math.log1p((i * h) ** 2 / df)) for i in range(panels + 1)]
        return 0.5 + h / 3 * (pdf[0] + pdf[-1] + 4 * sum(pdf[1:-1:2]) + 2 * sum(pdf[2:-1:2]))

    low, high = 0.0, 1.0
    while cdf(high) < p:
        low, high = high, 2 * high
    for _ in range(50):
        mid = (low + high) / 2
        low, high = (mid, high) if cdf(mid) < p else (low, mid)
    return (low + high) / 2


def meta_model(config: dict) -> ROT5:
    """The model of a config on the meta device: shapes and FLOP counts without memory or init time."""
    with torch.device("meta"):
        return ROT5(ROT5Config(**{f.name: config[f.name] for f in fields(ROT5Config)}))


def param_counts(config: dict) -> tuple[int, int]:
    """(total, active per token): a token passes through moe_top_k of the n_experts experts of a MoE layer."""
    model = meta_model(config)
    idle = sum((m.cfg.n_experts - m.cfg.moe_top_k) * sum(p.numel() for p in m.experts[0].parameters())
               for m in model.modules() if isinstance(m, SwitchFFN))
    return model.num_params(), model.num_params() - idle


def results_table(pre: dict, post: dict, labels: dict, scale: str, seeds: list[int], variants: list[Variant]) -> str:
    base = variants[0].name
    n = len(seeds)
    lines = [f"Pre-training ({scale} scale, {n} seed(s): {', '.join(map(str, seeds))}): the full validation loss "
             "(UL2 LM cross-entropy on the whole validation split) and the continuation loss (the second half of each "
             "validation story from its first half, nats/token); lower is better; mean +- standard deviation over "
             "seeds.", "",
             "| variant | params | active / token | steps | tokens | full val loss | continuation loss | "
             "write-up full val loss | tok/s | wall per seed |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in pre.items():
        seed = f"{SEED_FULL_VAL_LOSS[name]:.3f}" if is_preset(variants, name) and name in SEED_FULL_VAL_LOSS else \
            "(between MoE and T5)" if is_preset(variants, name) and name in SEED_RANKING else "-"
        speeds = [row["tok_per_s"] for row in r["seeds"].values() if row["tok_per_s"]]
        walls = [row["wall_s"] for row in r["seeds"].values() if row["wall_s"]]
        speed = f"{statistics.median(speeds):,.0f}" if speeds else "-"
        wall = f"{statistics.fmean(walls) / 60:.1f} min" if walls else "-"
        lines.append(f"| {r['label']} | {r['params'] / 1e6:.1f}M | {r['active_params'] / 1e6:.1f}M | {r['steps']} | "
                     f"{r['tokens']:,} | **{spread(r['full_val_loss'])}** | {spread(r['continuation_loss'])} | {seed} | "
                     f"{speed} | {wall} |")
    lines += ["", "Full validation loss per seed:", "", "| variant | " + " | ".join(f"seed {s}" for s in seeds) + " |",
              "|---|" + "---|" * n]
    for r in pre.values():
        lines.append(f"| {r['label']} | " + " | ".join(f"{r['seeds'][s]['full_val_loss']:.3f}" for s in seeds) + " |")
    if len(pre) > 1:
        how = (f"mean over the {n} seeds and its {CONFIDENCE:.0%} Student-t interval ({n - 1} degrees of freedom, "
               f"t = {t_quantile((1 + CONFIDENCE) / 2, n - 1):.3f}); significant: the interval excludes 0 (a two-sided "
               f"paired t-test at the {1 - CONFIDENCE:.0%} level)") if n > 1 else "one seed: no interval, no test"
        lines += ["", f"Paired differences to the baseline ({pre[base]['label']}): variant - baseline with the same "
                  f"seed (the same documents, order and corruption), {how}. Negative = better than the baseline.", "",
                  "| variant | full val loss | 95% interval | significant | continuation loss | 95% interval | significant |",
                  "|---|---|---|---|---|---|---|"]
        for name, r in pre.items():
            if name != base:
                cells = [c for metric in PRETRAIN_METRICS for c in paired_cells(r["vs_baseline"][metric])]
                lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    ranked = [name for name in SEED_RANKING if name in pre and is_preset(variants, name)]
    if len(ranked) > 1:
        lines += ["", "The write-up's orderings (full validation loss, better first), seed by seed at this scale:", ""]
        for better, worse in zip(ranked, ranked[1:]):
            d = paired([pre[better]["seeds"][s]["full_val_loss"] - pre[worse]["seeds"][s]["full_val_loss"]
                        for s in seeds])
            lines.append(f"- {pre[better]['label']} < {pre[worse]['label']}: {verdict(d)} (difference {d.mean:+.3f}"
                         + (f", {CONFIDENCE:.0%} interval [{d.low:+.3f}, {d.high:+.3f}])" if d.low is not None else ")"))
    if post:
        n_eval = next(iter(post.values()))["n_eval"]
        lines += ["", f"Summarization fine-tuning: ROUGE-L F x 100 on {n_eval} validation pair(s), mean +- standard "
                  "deviation over seeds", "",
                  "| fine-tuned from | steps | val loss | ROUGE-L | vs baseline: ROUGE-L | 95% interval | significant | "
                  "lead-1 ROUGE-L | write-up ROUGE-L | wall per seed |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for name, r in post.items():
            seed = f"{SEED_ROUGE_L[name]:.2f}" if name in SEED_ROUGE_L and (name not in pre or is_preset(variants, name)) \
                else "-"
            walls = [row["wall_s"] for row in r["seeds"].values() if row["wall_s"]]
            vs = paired_cells(r["vs_baseline"]["rougeL"], "+.2f") if "rougeL" in r["vs_baseline"] else ["-"] * 3
            lines.append(f"| {labels[name]} | {r['steps']} | {spread(r['val_loss'])} | **{spread(r['rougeL'], '.2f')}** | "
                         + " | ".join(vs) + f" | {r['lead1_rougeL']:.2f} | {seed} | "
                         + (f"{statistics.fmean(walls) / 60:.1f} min |" if walls else "- |"))
    walls = {s: sum(r["seeds"][s]["wall_s"] or 0.0 for r in (*pre.values(), *post.values())) for s in seeds}
    lines += ["", "Wall time of each seed's study (its pre-training and fine-tuning runs, as ablation.json records them): "
              + ", ".join(f"seed {s} {w / 60:.1f} min" for s, w in walls.items()) + "."]
    return "\n".join(lines) + "\n"


def is_preset(variants: list[Variant], name: str) -> bool:
    """The write-up's numbers belong to the presets, not to a user's file of the same name."""
    return any(v.name == name and v in VARIANTS for v in variants)


def spread(x: Spread, fmt: str = ".3f") -> str:
    return f"{x.mean:{fmt}}" if x.sd is None else f"{x.mean:{fmt}} +- {x.sd:{fmt}}"


def paired_cells(d: Paired, fmt: str = "+.3f") -> list[str]:
    if d.low is None:
        return [f"{d.mean:{fmt}}", "-", "- (one seed)"]
    return [f"{d.mean:{fmt}}", f"[{d.low:{fmt}}, {d.high:{fmt}}]", "**yes**" if d.significant else "no"]


def verdict(d: Paired) -> str:
    """For a difference the write-up says is negative (better - worse)."""
    if d.low is None:  # the sign of one difference is as likely noise as not (README: seed 0 alone misled)
        return "one seed: no statistics"
    if d.significant:
        return "**reproduced** (significant)" if d.mean < 0 else "**reversed** (significant)"
    return ("same direction, not significant" if d.mean < 0 else "reversed, not significant") + \
        " (within seed-to-seed noise)"


def mean_curve(rows: dict[int, dict], x: int, y: int) -> tuple[list[float], list[float], list[float]]:
    """(x, mean y, sd y) over seeds of curves evaluated at the same steps (the same eval_interval)."""
    curves = [row["curve"] for row in rows.values()]
    length = min(len(c) for c in curves)
    xs = [statistics.fmean(c[i][x] for c in curves) for i in range(length)]
    ys = [[c[i][y] for c in curves] for i in range(length)]
    return xs, [statistics.fmean(v) for v in ys], [statistics.stdev(v) if len(v) > 1 else 0.0 for v in ys]


def draw_charts(out: str, pre: dict, post: dict, labels: dict, variants: list[Variant]) -> None:
    """The seed's charts, from the rows read off the metrics files: means over seeds, +-1 standard deviation
    as bands and error bars."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        say(f"matplotlib is not installed: charts skipped (pip install matplotlib); the numbers are in {out}/results.md")
        return
    colors = {**{v.name: f"C{i}" for i, v in enumerate(variants)}, "flan_t5": f"C{len(variants)}",
              "hf_t5": f"C{len(variants)}"}
    n_seeds = len(next(iter(pre.values()))["seeds"])
    over = f"mean +- sd over {n_seeds} seeds" if n_seeds > 1 else "one seed"

    fig, ax = plt.subplots(figsize=(7, 4))
    later = []
    for name, r in pre.items():
        tokens, loss, sd = mean_curve(r["seeds"], 0, 1)
        millions = [t / 1e6 for t in tokens]
        ax.plot(millions, loss, marker=".", color=colors[name], label=r["label"])
        ax.fill_between(millions, [m - s for m, s in zip(loss, sd)], [m + s for m, s in zip(loss, sd)],
                        color=colors[name], alpha=0.15, linewidth=0)
        later += [m + s for m, s in zip(loss[1:], sd[1:])] + [m - s for m, s in zip(loss[1:], sd[1:])]
    ax.set(xlabel="training tokens (millions)", ylabel="validation loss (subset)",
           title=f"Pre-training: validation loss per variant ({over})")
    if later:  # step 0 sits near ln(vocab) = 10.4: zoom on the rest, where the variants differ
        ax.set_ylim(min(later) - 0.1, max(later) + 0.2)
        ax.set_xlim(left=0)
        first = next(iter(pre.values()))["seeds"]
        ax.text(0.01, 0.02, f"step 0: {statistics.fmean(r['curve'][0][1] for r in first.values()):.2f}, off the top",
                transform=ax.transAxes, fontsize=8, color="grey")
    ax.legend(), ax.grid(alpha=0.3)
    save_figure(fig, os.path.join(out, CHARTS[0]))

    fig, ax = plt.subplots(figsize=(7, 4))
    names = list(pre)
    means = [pre[n]["full_val_loss"].mean for n in names]
    sds = [pre[n]["full_val_loss"].sd or 0.0 for n in names]
    bars = ax.bar([pre[n]["label"] for n in names], means, yerr=sds, capsize=4, color=[colors[n] for n in names])
    ax.bar_label(bars, fmt="%.3f", label_type="center", color="white", fontsize=8)
    low, high = min(m - s for m, s in zip(means, sds)), max(m + s for m, s in zip(means, sds))
    ax.set_ylim(max(0.0, low - 2 * (high - low) - 0.05), high + (high - low) * 0.3 + 0.05)
    ax.set(ylabel="full validation loss", title=f"Pre-training: final loss on the whole validation split ({over})")
    ax.tick_params(axis="x", labelrotation=15)
    save_figure(fig, os.path.join(out, CHARTS[1]))

    if not post:
        return
    for filename, column, metric, ylabel, fmt in ((CHARTS[2], 1, "val_loss", "validation loss", "%.3f"),
                                                  (CHARTS[3], 2, "rougeL", "ROUGE-L", "%.2f")):
        fig, (left, right) = plt.subplots(1, 2, figsize=(9, 4), gridspec_kw={"width_ratios": [3, 2]})
        for name, r in post.items():
            steps, mean, sd = mean_curve(r["seeds"], 0, column)
            left.plot(steps, mean, marker=".", color=colors[name], label=labels[name])
            left.fill_between(steps, [m - s for m, s in zip(mean, sd)], [m + s for m, s in zip(mean, sd)],
                              color=colors[name], alpha=0.15, linewidth=0)
        left.set(xlabel="fine-tuning step", ylabel=ylabel, title=f"Summarization: {ylabel} ({over})")
        left.legend(), left.grid(alpha=0.3)
        bars = right.bar([labels[n] for n in post], [r[metric].mean for r in post.values()],
                         yerr=[r[metric].sd or 0.0 for r in post.values()], capsize=4, color=[colors[n] for n in post])
        right.bar_label(bars, fmt=fmt, label_type="center", color="white", fontsize=8)
        if column == 2:  # the lead-1 baseline (the story's first sentence) for scale
            right.axhline(next(iter(post.values()))["lead1_rougeL"], color="grey", linestyle="--", label="lead-1")
            right.legend()
        right.set(title="final")
        save_figure(fig, os.path.join(out, filename))


def save_figure(fig, path: str) -> None:
    import matplotlib.pyplot as plt  # only reached when draw_charts could import it

    fig.tight_layout()
    with prepare.atomic_write(path, then=AGAIN) as f:
        fig.savefig(f, format="png", dpi=100)  # 700 x 400 pixels: a few tens of KB
    plt.close(fig)
    say(f"wrote {path}")


# -----------------------------------------------------------------------------------------------------------
# --plan: the runs and their cost, from FLOPs

def flops_per_document(config: dict) -> float:
    """Training FLOPs (model.train_flops, forward + backward) per document, averaged over real UL2 micro-batches
    of the bundled sample (TinyStories) with this config's windows, batch and mixture: the padding and the
    corruption lengths are those train.py will see."""
    docs = prepare.load_documents(os.path.join("data", "sample"), "train")
    tok = get_tokenizer(prepare.load_meta(os.path.join("data", "sample"))["tokenizer"])
    batches = UL2Batches(docs, tok, config["mixture"], config["encoder_len"], config["decoder_len"],
                         config["micro_batch_size"], seed=config["seed"], pack=config["pack"])
    model = meta_model(config)
    total = 0.0
    for g in range(PLAN_BATCHES):
        b = batches.batch(g)
        total += model.train_flops(int((b.segment_ids > 0).sum()), int((b.labels != -100).sum()),
                                   b.input_ids.shape[1], b.labels.shape[1])
    return total / (PLAN_BATCHES * config["micro_batch_size"])


def flops_per_pair(pre_config: dict, ft_config: dict) -> float:
    """Fine-tuning FLOPs per (story, summary) pair, from the bundled Instruct pairs in finetune.py's format."""
    pairs = prepare.load_pairs(os.path.join("data", "sample_instruct"), "train")
    pairs = [pairs[i] for i in range(len(pairs))]
    batch, _ = finetune.collate(pairs, get_tokenizer(), ft_config["encoder_len"], ft_config["decoder_len"])
    return meta_model(pre_config).train_flops(int((batch.segment_ids > 0).sum()), int((batch.labels != -100).sum()),
                                              batch.input_ids.shape[1], batch.labels.shape[1]) / len(pairs)


def planned_steps(config: dict) -> int:
    """train.py's step count for a config (its budget rule: max_tokens wins over epochs)."""
    dataset = config["dataset"]
    n_docs = train_documents(dataset)
    if config["max_tokens"] > 0:
        try:
            tokens = prepare.split_counts(os.path.join("data", dataset), "train")["tokens"]
        except ValueError:
            tokens = prepare.SEED_COUNTS[(dataset, "train")][0]
        return math.ceil(config["max_tokens"] / (tokens / n_docs * config["batch_size"]))
    return math.ceil(config["epochs"] * n_docs / config["batch_size"])


def print_plan(runs: dict[str, tuple[list[str], dict]], args: argparse.Namespace) -> None:
    """The runs and their cost: at the full scale GPU hours from FLOPs (an assumed MFU); at the CPU scale CPU
    time from a few training steps measured here, and the wall time of the last run in --out where there is one.
    Reads the bundled sample's prepared documents (for real batch shapes); prepares and trains nothing."""
    try:  # the documents the plan measures on (and, at the CPU scale, the fine-tuning pairs it counts)
        for name in ("sample", "sample_instruct") if args.scale == "cpu" else ("sample",):
            prepare.load_meta(os.path.join("data", name))
        if args.scale == "cpu":
            print_cpu_plan(runs, args)
        else:
            print_gpu_plan(runs, args)
    except ValueError as e:  # data/sample not prepared: the plan measures on its documents
        raise SystemExit(f"--plan: {e}") from None
    for name, (argv, _) in runs.items():
        print(f"python train.py {' '.join(map(shown, argv))}")
    if len(args.seeds) > 1:
        print(f"(and the same with --seed=... --out_dir=... for the seeds {', '.join(map(str, args.seeds[1:]))})")


def print_gpu_plan(runs: dict[str, tuple[list[str], dict]], args: argparse.Namespace) -> None:
    hours = " | ".join(f"{gpu} h" for gpu, _ in GPUS)
    print(f"{args.scale} scale, into {args.out}. Cost ESTIMATED from FLOPs at an assumed {ASSUMED_MFU:.0%} MFU "
          f"(bf16 dense peaks: {', '.join(f'{g} {p / 1e12:.0f} TFLOP/s' for g, p in GPUS)}), not measured:\n")
    print(f"| run | params (active) | steps x batch | FLOPs | {hours} |")
    print("|---|---|---|---|" + "---|" * len(GPUS))
    total = 0.0
    for name, (argv, config) in runs.items():
        steps = planned_steps(config)
        flops = steps * config["batch_size"] * flops_per_document(config)
        total += flops
        params, active = param_counts(config)
        cost = " | ".join(f"{flops / (peak * ASSUMED_MFU) / 3600:.2f}" for _, peak in GPUS)
        print(f"| pre-train {name} | {params / 1e6:.1f}M ({active / 1e6:.1f}M) | {steps:,} x {config['batch_size']} "
              f"| {flops:.2e} | {cost} |")
    # fine-tuning: the baseline and the best upgrade, known only after pre-training: the seed's (RoPE + GQA) here
    for name, ft, steps in planned_finetunes(runs, args):
        flops = steps * ft["batch_size"] * flops_per_pair(runs[name][1], ft)
        total += flops
        cost = " | ".join(f"{flops / (peak * ASSUMED_MFU) / 3600:.2f}" for _, peak in GPUS)
        print(f"| fine-tune {name} (training only) | | {steps:,} x {ft['batch_size']} | {flops:.2e} | {cost} |")
    cost = " | ".join(f"{total / (peak * ASSUMED_MFU) / 3600:.1f}" for _, peak in GPUS)
    print(f"| one seed | | | {total:.2e} | {cost} |")
    n = len(args.seeds)
    cost = " | ".join(f"{n * total / (peak * ASSUMED_MFU) / 3600:.1f}" for _, peak in GPUS)
    print(f"| total: {n} seed(s) ({', '.join(map(str, args.seeds))}) | | | {n * total:.2e} | {cost} |")
    print("\nEvaluation (validation losses, greedy generation for ROUGE-L) is not included.")


def planned_finetunes(runs: dict, args: argparse.Namespace) -> list[tuple[str, dict, int]]:
    """(variant, finetune.py config, steps) of the fine-tunings: the baseline and, standing in for the best
    upgrade that only pre-training decides, the write-up's (RoPE + GQA) when it is among the variants."""
    baseline = args.variants[0].name
    planned = []
    for name in [baseline] + (["rot5_base_gqa"] if "rot5_base_gqa" in runs and baseline != "rot5_base_gqa" else []):
        _, ft = finetune_args(name, args.scale, args.out, runs[name][1], args.seeds[0])
        n_pairs = ft["train_pairs"] or len(prepare.load_pairs(os.path.join("data", "sample_instruct"), "train"))
        planned.append((name, ft, max(1, math.ceil(ft["epochs"] * n_pairs / ft["batch_size"]))))
    return planned


def print_cpu_plan(runs: dict[str, tuple[list[str], dict]], args: argparse.Namespace) -> None:
    """CPU time per pre-training: PLAN_STEPS training steps of the variant timed here on real UL2 batches of the
    bundled sample (after one warm-up step), times its steps; evaluation from one timed evaluation forward,
    times the validation batches the run evaluates. Beside it, the last run's measured wall time (ablation.json)."""
    print(f"cpu scale, into {args.out}, on {cpu_name()} ({torch.get_num_threads()} threads). CPU time ESTIMATED "
          f"from {PLAN_STEPS} training steps and one evaluation batch per variant, timed now (a busy machine "
          "times slower):\n")
    print("| run | params (active) | steps x batch | s / step | training | evaluation | estimate | last run "
          "(measured) |")
    print("|---|---|---|---|---|---|---|---|")
    total, measured = 0.0, []
    for name, (argv, config) in runs.items():
        steps = planned_steps(config)
        per_step, per_eval_batch = time_steps(config)
        evaluation = per_eval_batch * evaluated_batches(config, steps)
        total += steps * per_step + evaluation
        params, active = param_counts(config)
        last = last_wall(args.out, args.seeds[0], name)
        measured.append(last)
        print(f"| pre-train {name} | {params / 1e6:.1f}M ({active / 1e6:.1f}M) | {steps:,} x {config['batch_size']} | "
              f"{per_step:.2f} | {minutes(steps * per_step)} | {minutes(evaluation)} | "
              f"{minutes(steps * per_step + evaluation)} | {minutes(last) if last else '-'} |")
    for name, ft, steps in planned_finetunes(runs, args):
        last = last_wall(args.out, args.seeds[0], f"{name}_summary")
        measured.append(last)
        print(f"| fine-tune {name} | | {steps:,} x {ft['batch_size']} | | | | not estimated | "
              f"{minutes(last) if last else '-'} |")
    n = len(args.seeds)
    last = f"{minutes(sum(measured))} for seed {args.seeds[0]}" if all(measured) else "-"
    print(f"| one seed: pre-training | | | | | | {minutes(total)} | {last} |")
    print(f"| total: {n} seed(s) ({', '.join(map(str, args.seeds))}) | | | | | | {minutes(n * total)} | |")
    print("\nThe fine-tunings (2 pairs at this scale) are not estimated; 'last run' is the wall time the run in --out "
          "took (ablation.json), where there is one.")


PLAN_STEPS = 2        # timed training steps per variant for the CPU estimate (after one warm-up step)


def time_steps(config: dict) -> tuple[float, float]:
    """(seconds per optimizer step, seconds per evaluation batch) of config's model on this CPU: PLAN_STEPS
    training steps (forward, backward and AdamW over batch_size documents of the bundled sample, as train.py
    with one process) after a warm-up one, and one forward of an evaluation batch of validation documents."""
    docs = prepare.load_documents(os.path.join("data", "sample"), "train")
    val = prepare.load_documents(os.path.join("data", "sample"), "val")
    tok = prepare.load_tokenizer(os.path.join("data", "sample"))
    batches = UL2Batches(docs, tok, config["mixture"], config["encoder_len"], config["decoder_len"],
                         config["micro_batch_size"], seed=config["seed"], pack=config["pack"])
    model_cfg = ROT5Config(**{f.name: config[f.name] for f in fields(ROT5Config)})
    torch.manual_seed(config["seed"])
    model = ROT5(model_cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config["learning_rate"], fused=True)
    dtype = train.resolve_dtype(config["dtype"], torch.device("cpu"))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == torch.bfloat16 else contextlib.nullcontext()
    accum = config["batch_size"] // config["micro_batch_size"]
    times = []
    for step in range(PLAN_STEPS + 1):
        t0 = time.perf_counter()
        for micro in range(accum):
            with autocast:
                out = model(batches.batch(step * accum + micro))
            (out.loss + out.aux_loss + out.z_loss).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    model.eval()
    val_batches = UL2Batches(val, tok, config["mixture"], config["encoder_len"], config["decoder_len"],
                             config["eval_batch_size"], seed=train.EVAL_SEED, pack=True)
    batch = next(iter(val_batches.eval_batches(config["eval_batch_size"])))
    t0 = time.perf_counter()
    with torch.no_grad(), autocast:
        model(batch)
    return statistics.fmean(times[1:]), time.perf_counter() - t0


def evaluated_batches(config: dict, steps: int) -> int:
    """Evaluation forwards of a run (train.py): at step 0, every eval_interval steps and the last, eval_docs
    validation documents each; at the end the whole validation split; each once for the UL2 losses and once
    for the continuation loss."""
    n_val = prepare.load_meta(os.path.join("data", config["dataset"]))["splits"]["val"]["documents"]
    evaluations = 1 + steps // config["eval_interval"] + (steps % config["eval_interval"] > 0)
    per_eval = math.ceil(min(config["eval_docs"], n_val) / config["eval_batch_size"])
    return 2 * (evaluations * per_eval + math.ceil(n_val / config["eval_batch_size"]))


def last_wall(out: str, seed: int, name: str) -> float | None:
    """The wall time the finished run out/seed<seed>/<name> took (its ablation.json), or None."""
    try:
        with open(os.path.join(variant_dir(out, seed, name), "ablation.json")) as f:
            state = json.load(f)
    except (OSError, ValueError):
        return None
    return state.get("wall_s") if state.get("result") is not None else None


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def cpu_name() -> str:
    """The CPU's model name (as lscpu prints it), for a timing to say where it was measured."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine() or "an unknown CPU"


# -----------------------------------------------------------------------------------------------------------
# small helpers

def say(message: str) -> None:
    print(f"[ablation] {message}", flush=True)


def shown(arg: str) -> str:
    """An argv entry as a user would type it from the repository root."""
    return os.path.relpath(arg, HERE) if os.path.isabs(arg) and arg.startswith(HERE) else arg


# how to go on after a write failed for lack of space (diskio.WriteFailed)
AGAIN = ("free some space, then run the same ablation.py command again: finished runs are skipped and an interrupted "
         "one resumes from its checkpoint")


def write_json(path: str, obj: dict) -> None:
    with prepare.atomic_write(path, "w", then=AGAIN) as f:  # a crash never leaves half a state file
        json.dump(obj, f, indent=1)


if __name__ == "__main__":
    main()
