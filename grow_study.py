"""
The CPU measurements of growing ROT5 from other checkpoints (BENCHMARKS.md, "Growing models"), on the bundled
sample, seed by seed, with ablation.py's paired Student-t intervals:

    python grow_study.py adapt   [--seeds 0,1,2]   the T5Gemma claim at this machine's scale: a Llama-architecture
                        decoder-only model (HF LlamaForCausalLM, the quick start's shape and token budget)
                        pre-trained here, adapted into ROT5 (train.py --init_from, hf_llama.py) and continued with
                        UL2, against ROT5 of the adapted model's very shape from scratch, at equal total training
                        FLOPs (decoder-only pre-training + continuation = the scratch run)
    python grow_study.py upcycle [--seeds 0,1,2]   the quick start's dense checkpoint (config/sample_cpu.py, seed 0)
                        continued dense, or upcycled to a top-2 MoE of 4 experts in every other layer, at equal
                        extra training FLOPs

Both compare the continuation loss of the 966 validation stories (ul2.continuation_batches: the second half
of each story from its first half, nats per token) and the UL2 validation loss, on identical tokens in both
arms. A seed fixes the data order, the UL2 corruption and the initial draws of both arms (the Llama's init and
the scratch model's; the upcycled routers), so the arms are compared seed by seed (ablation.paired).
FLOPs are counted as train.py counts them (ROT5.train_flops on the run's own UL2 batches; the decoder-only model
by the same PaLM formula, 6 N per token plus attention): `flops_per_token` measures ROT5's per raw document
token on the first 200 micro-batches, and the scratch (or MoE) run's max_tokens is set from it.

The adaptation needs the source model's tokenizer.json: Mistral's SentencePiece model (the quick start's
tokenizer) converted by transformers (offline) into out/grow_study/mistral_tokenizer; the sample tokenized with
it is data/sample_mistral_hf (99.3% of stories tokenize exactly as with --tokenizer mistral; the rest differ
where a story has two spaces in a row). Runs go to out/grow_study/; a finished run (its result.json) is not run
again. Writes out/grow_study/<study>.md: the tables BENCHMARKS.md quotes.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import os
import shutil
import statistics
import sys
import time

import numpy as np

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # (why: train.py)

import torch

import checkpoint
import prepare
import train
from ablation import cpu_name, paired, t_quantile
from model import ROT5, ROT5Config
from tokenizer import get_tokenizer, mistral_model_file
from ul2 import UL2Batches, continuation_batches

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "out", "grow_study")
DATA = "sample_mistral_hf"
QUICK_EPOCHS = 0.75       # the quick start's budget (config/sample_cpu.py): the decoder-only pre-training's
EXTRA_EPOCHS = 0.25       # the continuation (adapted) / extra training (upcycling) budget
# config/sample_cpu.py's training keys, for runs that take their model from init_from (its model keys would
# disagree with a Llama source)
TRAIN_KEYS = dict(device="cpu", encoder_len=256, decoder_len=128, batch_size=4, micro_batch_size=4,
                  learning_rate=1.4e-3, beta2=0.95, log_interval=50, eval_interval=400, eval_docs=50,
                  eval_batch_size=32)
# the decoder-only source: the quick start's shape (d_model 256, 4 heads x 64, 2 K/V heads, 2 layers per stack,
# its FFN width) as a Llama: SwiGLU, tied embedding; adapted, it is the ROT5 below
LLAMA = dict(hidden_size=256, intermediate_size=672, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=64, tie_word_embeddings=True, rms_norm_eps=1e-6, rope_theta=10000.0)
ROW = 256                 # decoder-only rows: documents back to back (BOS doc EOS ...), as GPT-style pre-training
ROWS_PER_STEP = 4
MOE = dict(n_experts=4, moe_top_k=2)   # upcycled: exact at step 0 (grow.py), 4 experts in every other layer
# the adapted model's continuation, as train.py --init_from adapts it by default (cross-attention a copy of
# self-attention, without RoPE), with the other ways its cross-attention can start, and with a peak learning
# rate 4.7x lower than the from-scratch recipe's (continued training usually takes a lower one): the same budget each
ADAPTED_ARMS = {"adapted": [], "adapted_rope": ["--cross_rope=True"], "adapted_zero": ["--cross_init=zero"],
                "adapted_low_lr": ["--learning_rate=0.0003"]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("study", choices=["adapt", "upcycle"])
    ap.add_argument("--seeds", default="0,1,2")
    a = ap.parse_args(argv)
    seeds = [int(s) for s in a.seeds.split(",")]
    os.makedirs(OUT, exist_ok=True)
    os.chdir(HERE)  # train.py reads data/<dataset> relative to the working directory
    report = adapt(seeds) if a.study == "adapt" else upcycle(seeds)
    path = os.path.join(OUT, f"{a.study}.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write(report)
    print(report)
    print(f"wrote {path}")


# -----------------------------------------------------------------------------
# the T5Gemma claim

def adapt(seeds: list[int]) -> str:
    tok_dir = mistral_tokenizer()
    tok = get_tokenizer("hf:" + tok_dir)
    with contextlib.redirect_stdout(io.StringIO()):
        prepare.prepare("sample", out_dir=os.path.join("data", DATA), tokenizer=tok, workers=1)
    meta = prepare.load_meta(os.path.join("data", DATA))
    quick_tokens = QUICK_EPOCHS * meta["splits"]["train"]["tokens"]
    extra_tokens = EXTRA_EPOCHS * meta["splits"]["train"]["tokens"]
    rows = {}
    for seed in seeds:
        src = os.path.join(OUT, f"seed{seed}", "llama")
        pre = once(src, lambda: pretrain_llama(os.path.join("data", DATA), tok_dir, src, seed, quick_tokens))
        step0 = once(os.path.join(OUT, f"seed{seed}", "adapted_step0"), lambda: adapted_step0(src))
        argv = [f"--{k}={v}" for k, v in TRAIN_KEYS.items()] + [f"--dataset={DATA}", f"--seed={seed}"]
        arms = {}
        for arm, keys in ADAPTED_ARMS.items():
            arm_dir = os.path.join(OUT, f"seed{seed}", arm)
            arms[arm] = once(arm_dir, lambda: run_train(argv + [f"--init_from={src}", *keys,
                                                                f"--max_tokens={extra_tokens!r}"], arm_dir))
        adapted = arms["adapted"]
        cfg = ROT5Config(**adapted["model_config"])
        f_rot5 = flops_per_token(cfg, os.path.join("data", DATA), seed)
        scratch_tokens = extra_tokens + pre["flops"] / f_rot5
        model_keys = [f"--{k}={v}" for k, v in dataclasses.asdict(cfg).items()]
        scratch = once(os.path.join(OUT, f"seed{seed}", "scratch"), lambda: run_train(
            argv + model_keys + [f"--max_tokens={scratch_tokens!r}"], os.path.join(OUT, f"seed{seed}", "scratch")))
        rows[seed] = {"pre": pre, "step0": step0, **arms, "scratch": scratch, "f_rot5": f_rot5}
    return adapt_report(rows, meta)


def mistral_tokenizer() -> str:
    """Mistral's SentencePiece model (tokenizer.py's "mistral") as a tokenizer.json directory, converted offline."""
    out = os.path.join(OUT, "mistral_tokenizer")
    if not os.path.isfile(os.path.join(out, "tokenizer.json")):
        import transformers

        src = os.path.join(OUT, "mistral_sentencepiece")
        os.makedirs(src, exist_ok=True)
        shutil.copy(mistral_model_file(), os.path.join(src, "tokenizer.model"))
        with open(os.path.join(src, "tokenizer_config.json"), "w") as f:
            json.dump({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
                       "unk_token": "<unk>", "legacy": False}, f)
        transformers.AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


def pretrain_llama(data_dir: str, tok_dir: str, out: str, seed: int, tokens: float) -> dict:
    """HF LlamaForCausalLM (LLAMA) pre-trained on `tokens` positions of data_dir's training documents, packed into
    rows of ROW (BOS doc EOS, in a seeded order), with train.py's optimizer and schedule (AdamW, lr and beta2 of
    config/sample_cpu.py, 1% warm-up, linear decay, clipping at 1, bf16 autocast where train.py uses it); saved
    with save_pretrained and the tokenizer files into `out`. Its continuation loss as a decoder-only model."""
    import transformers

    tok = get_tokenizer("hf:" + tok_dir)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=tok.base_vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
        max_position_embeddings=4096, **LLAMA))
    docs = prepare.load_documents(data_dir, "train")
    steps = math.ceil(tokens / (ROWS_PER_STEP * ROW))
    need, parts, have = steps * ROWS_PER_STEP * ROW + 1, [], 0
    for i in np.random.default_rng(seed).permutation(len(docs)):
        parts.append(np.concatenate([[tok.bos_id], np.asarray(docs[int(i)], dtype=np.int64), [tok.eos_id]]))
        have += len(parts[-1])
        if have >= need:
            break
    stream = torch.from_numpy(np.concatenate(parts)[:need].astype(np.int64))
    bf16 = train.resolve_dtype("auto", torch.device("cpu")) == torch.bfloat16
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    opt = torch.optim.AdamW(train.param_groups(model, 0.01), lr=TRAIN_KEYS["learning_rate"],
                            betas=(0.9, TRAIN_KEYS["beta2"]), eps=train.ADAM_EPS, fused=True)
    warmup, t0, losses = math.ceil(0.01 * steps), time.perf_counter(), []
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = TRAIN_KEYS["learning_rate"] * train.lr_factor(step, steps, warmup)
        chunk = stream[step * ROWS_PER_STEP * ROW: (step + 1) * ROWS_PER_STEP * ROW + 1]
        x, y = chunk[:-1].view(ROWS_PER_STEP, ROW), chunk[1:].view(ROWS_PER_STEP, ROW)
        with autocast:
            logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        train.guarded_step(model, opt, 1.0, loss.item())
        losses.append(loss.item())
        if (step + 1) % 200 == 0:
            print(f"[grow_study] llama seed {seed}: step {step + 1}/{steps} loss {statistics.fmean(losses[-50:]):.3f}",
                  flush=True)
    wall = time.perf_counter() - t0
    model.eval()
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tok_dir, name), os.path.join(out, name))
    c = model.config
    n_matmul = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n) \
        + c.hidden_size * c.vocab_size  # + the output layer (tied: the embedding, multiplied once more)
    attention = 12 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * ROW
    positions = steps * ROWS_PER_STEP * ROW
    return {"steps": steps, "tokens": positions, "flops": float((6 * n_matmul + attention) * positions),
            "wall_s": wall, "train_loss": statistics.fmean(losses[-50:]),
            "continuation_loss": decoder_only_continuation(model, tok, data_dir)}


@torch.no_grad()
def decoder_only_continuation(model, tok, data_dir: str, batch: int = 32) -> float:
    """The decoder-only model's continuation loss on the validation stories: [BOS] + the first half, scored on the
    second half + EOS, token-weighted: the targets ul2.continuation_batches scores ROT5 on."""
    docs = prepare.load_documents(data_dir, "val")
    total, count = 0.0, 0
    for start in range(0, len(docs), batch):
        rows = [np.asarray(docs[i], dtype=np.int64) for i in range(start, min(start + batch, len(docs)))]
        seqs = [np.concatenate([[tok.bos_id], d, [tok.eos_id]]) for d in rows]
        x = torch.full((len(seqs), max(map(len, seqs))), tok.eos_id)
        labels = torch.full_like(x, -100)
        for i, (d, s) in enumerate(zip(rows, seqs)):
            x[i, :len(s)] = torch.from_numpy(s)
            first = 1 + len(d) // 2          # the first target: the second half's first token
            labels[i, first - 1:len(s) - 1] = torch.from_numpy(s[first:])
        logits = model(input_ids=x).logits  # (right padding: after each row's tokens, which attend causally)
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="sum")
        total, count = total + loss.item(), count + int((labels != -100).sum())
    return total / count


def adapted_step0(src: str) -> dict:
    """The adapted model's continuation loss before any training, for the ways its cross-attention can start: a
    copy of self-attention without RoPE (the default, T5Gemma's), with ROT5's rotated cross-attention, and
    silenced (cross_init="zero": the decoder is the Llama and reads nothing of the input)."""
    out = {}
    for name, cross_init, cross_rope in (("self", "self", False), ("self_rope", "self", True), ("zero", "zero", False)):
        model, tok, _ = checkpoint.load_model(src, cross_init=cross_init)
        model.cfg.cross_rope = cross_rope
        bf16 = train.resolve_dtype("auto", torch.device("cpu")) == torch.bfloat16
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        docs = prepare.load_documents(os.path.join("data", DATA), "val")
        out[name] = train.validation_loss(model, continuation_batches(docs, tok, 32), torch.device("cpu"), autocast,
                                          False, tok.mode_ids)["val_loss"]
    return out


def adapt_report(rows: dict, meta: dict) -> str:
    seeds = sorted(rows)
    first = rows[seeds[0]]
    lines = [f"T5Gemma at the CPU scale: {cpu_name()}, {torch.get_num_threads()} thread(s), "
             f"{'bf16 autocast' if train.resolve_dtype('auto', torch.device('cpu')) == torch.bfloat16 else 'fp32'}; "
             f"data/{DATA} ({meta['splits']['train']['tokens']:,} training tokens, 966 validation stories); "
             f"seeds {', '.join(map(str, seeds))}.", "",
             f"Decoder-only source: LlamaForCausalLM, {first['pre']['steps']} steps of {ROWS_PER_STEP} x {ROW} tokens "
             f"({first['pre']['tokens']:,} tokens, {first['pre']['flops']:.3g} FLOPs). Adapted: + UL2 for "
             f"{first['adapted']['tokens']:,} tokens. Scratch: the adapted model's config from random weights for "
             f"{first['scratch']['tokens']:,} tokens: the same total FLOPs ({flops_per_token_text(first)}).", "",
             "| | " + " | ".join(f"seed {s}" for s in seeds) + " | mean +- sd |", "|---|" + "---|" * (len(seeds) + 1)]

    def row(label: str, values: list[float]) -> str:
        sd = f" +- {statistics.stdev(values):.3f}" if len(values) > 1 else ""
        return f"| {label} | " + " | ".join(f"{v:.3f}" for v in values) + f" | {statistics.fmean(values):.3f}{sd} |"

    r = [rows[s] for s in seeds]
    lines += [row("decoder-only Llama: continuation loss (as a decoder-only model)", [x["pre"]["continuation_loss"] for x in r]),
              row("adapted, step 0, cross-attention = self-attention without RoPE (default)", [x["step0"]["self"] for x in r]),
              row("adapted, step 0, cross-attention = self-attention with ROT5's RoPE", [x["step0"]["self_rope"] for x in r]),
              row("adapted, step 0, cross-attention silenced (cross_init=zero)", [x["step0"]["zero"] for x in r]),
              row("adapted + UL2: continuation loss", [x["adapted"]["full_continuation_loss"] for x in r]),
              row("adapted with RoPE in cross-attention + UL2: continuation loss",
                  [x["adapted_rope"]["full_continuation_loss"] for x in r]),
              row("adapted, cross_init=zero, + UL2: continuation loss", [x["adapted_zero"]["full_continuation_loss"] for x in r]),
              row("adapted, peak learning rate 3e-4, + UL2: continuation loss",
                  [x["adapted_low_lr"]["full_continuation_loss"] for x in r]),
              row("scratch: continuation loss", [x["scratch"]["full_continuation_loss"] for x in r]),
              row("adapted + UL2: UL2 validation loss", [x["adapted"]["full_val_loss"] for x in r]),
              row("adapted with RoPE in cross-attention + UL2: UL2 validation loss", [x["adapted_rope"]["full_val_loss"] for x in r]),
              row("adapted, cross_init=zero, + UL2: UL2 validation loss", [x["adapted_zero"]["full_val_loss"] for x in r]),
              row("adapted, peak learning rate 3e-4, + UL2: UL2 validation loss", [x["adapted_low_lr"]["full_val_loss"] for x in r]),
              row("scratch: UL2 validation loss", [x["scratch"]["full_val_loss"] for x in r])]

    def diff(a: str, b: str, metric: str) -> list[float]:
        return [x[a][metric] - x[b][metric] for x in r]

    lines += ["", paired_line("continuation loss, adapted - scratch", diff("adapted", "scratch", "full_continuation_loss")),
              paired_line("UL2 validation loss, adapted - scratch", diff("adapted", "scratch", "full_val_loss")),
              paired_line("continuation loss, adapted (cross_init=zero) - scratch",
                          diff("adapted_zero", "scratch", "full_continuation_loss")),
              paired_line("continuation loss, adapted (learning rate 3e-4) - scratch",
                          diff("adapted_low_lr", "scratch", "full_continuation_loss")),
              paired_line("step 0, RoPE in cross-attention - none", [x["step0"]["self_rope"] - x["step0"]["self"] for x in r]),
              paired_line("after UL2, RoPE in cross-attention - none: continuation loss",
                          diff("adapted_rope", "adapted", "full_continuation_loss")),
              paired_line("after UL2, RoPE in cross-attention - none: UL2 validation loss",
                          diff("adapted_rope", "adapted", "full_val_loss")),
              paired_line("after UL2, cross_init zero - self: continuation loss",
                          diff("adapted_zero", "adapted", "full_continuation_loss")),
              "", "Wall time per seed: " + "; ".join(
                  f"seed {s}: Llama {x['pre']['wall_s'] / 60:.1f} min, adapted {x['adapted']['wall_s'] / 60:.1f} min "
                  f"(each arm), "
                  f"scratch {x['scratch']['wall_s'] / 60:.1f} min" for s, x in zip(seeds, r)) + "."]
    return "\n".join(lines) + "\n"


def flops_per_token_text(x: dict) -> str:
    return (f"decoder-only {x['pre']['flops'] / x['pre']['tokens']:.3g} FLOPs per token, ROT5 {x['f_rot5']:.3g} "
            "per raw document token")


# -----------------------------------------------------------------------------
# sparse upcycling

def upcycle(seeds: list[int]) -> str:
    with contextlib.redirect_stdout(io.StringIO()):
        prepare.prepare("sample", out_dir=os.path.join("data", "sample"), workers=1)
    meta = prepare.load_meta(os.path.join("data", "sample"))
    extra_tokens = EXTRA_EPOCHS * meta["splits"]["train"]["tokens"]
    config = os.path.join(HERE, "config", "sample_cpu.py")
    base_dir = os.path.join(OUT, "upcycle", "dense_base")
    base = once(base_dir, lambda: run_train([config], base_dir))
    dense_cfg = ROT5Config(**base["model_config"])
    f_dense = flops_per_token(dense_cfg, os.path.join("data", "sample"), 0)
    f_moe = flops_per_token(dataclasses.replace(dense_cfg, **MOE), os.path.join("data", "sample"), 0)
    rows = {}
    for seed in seeds:
        argv = [config, f"--init_from={os.path.join(base_dir, 'ckpt.pt')}", f"--seed={seed}"]
        d_dir, m_dir = (os.path.join(OUT, "upcycle", f"seed{seed}", name) for name in ("dense", "moe"))
        dense = once(d_dir, lambda: run_train(argv + [f"--max_tokens={extra_tokens!r}"], d_dir))
        moe = once(m_dir, lambda: run_train(argv + [*(f"--{k}={v}" for k, v in MOE.items()),
                                                    f"--max_tokens={extra_tokens * f_dense / f_moe!r}"], m_dir))
        rows[seed] = {"dense": dense, "moe": moe}
    return upcycle_report(base, rows, f_dense, f_moe)


def upcycle_report(base: dict, rows: dict, f_dense: float, f_moe: float) -> str:
    seeds = sorted(rows)
    r = [rows[s] for s in seeds]
    lines = [f"Sparse upcycling at the CPU scale: {cpu_name()}, {torch.get_num_threads()} thread(s); data/sample; "
             f"seeds {', '.join(map(str, seeds))}.", "",
             f"Dense base: config/sample_cpu.py, seed 0, {base['tokens']:,} tokens: continuation loss "
             f"{base['full_continuation_loss']:.3f}, UL2 validation loss {base['full_val_loss']:.3f}. Then dense "
             f"for {r[0]['dense']['tokens']:,} more tokens, or upcycled (4 experts, top-2, every other layer) for "
             f"{r[0]['moe']['tokens']:,}: the same extra FLOPs ({f_dense:.3g} vs {f_moe:.3g} per raw document "
             "token).", "",
             "| | " + " | ".join(f"seed {s}" for s in seeds) + " | mean +- sd |", "|---|" + "---|" * (len(seeds) + 1)]

    def row(label: str, values: list[float]) -> str:
        sd = f" +- {statistics.stdev(values):.3f}" if len(values) > 1 else ""
        return f"| {label} | " + " | ".join(f"{v:.4f}" for v in values) + f" | {statistics.fmean(values):.4f}{sd} |"

    lines += [row("upcycled, step 0: continuation loss (subset of 50)", [x["moe"]["step0_continuation_loss"] for x in r]),
              row("dense, step 0: continuation loss (subset of 50)", [x["dense"]["step0_continuation_loss"] for x in r]),
              row("dense continued: continuation loss", [x["dense"]["full_continuation_loss"] for x in r]),
              row("upcycled MoE: continuation loss", [x["moe"]["full_continuation_loss"] for x in r]),
              row("dense continued: UL2 validation loss", [x["dense"]["full_val_loss"] for x in r]),
              row("upcycled MoE: UL2 validation loss", [x["moe"]["full_val_loss"] for x in r]),
              "", paired_line("continuation loss, upcycled - dense", [x["moe"]["full_continuation_loss"] -
                                                                      x["dense"]["full_continuation_loss"] for x in r]),
              paired_line("UL2 validation loss, upcycled - dense", [x["moe"]["full_val_loss"] -
                                                                    x["dense"]["full_val_loss"] for x in r]),
              "", "Wall time: " + "; ".join(f"seed {s}: dense {x['dense']['wall_s'] / 60:.1f} min, upcycled "
                                           f"{x['moe']['wall_s'] / 60:.1f} min" for s, x in zip(seeds, r))
              + f"; the dense base {base['wall_s'] / 60:.1f} min."]
    return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------
# helpers

def flops_per_token(cfg: ROT5Config, data_dir: str, seed: int, micro_batches: int = 200) -> float:
    """Training FLOPs per raw document token of a ROT5 config on data_dir, as train.py counts them
    (ROT5.train_flops on each UL2 micro-batch of TRAIN_KEYS' shape), over the first `micro_batches`."""
    tok, docs = prepare.load_tokenizer(data_dir), prepare.load_documents(data_dir, "train")
    batches = UL2Batches(docs, tok, "ul2", TRAIN_KEYS["encoder_len"], TRAIN_KEYS["decoder_len"],
                         TRAIN_KEYS["micro_batch_size"], seed=seed, pack=True)
    with torch.device("meta"):
        model = ROT5(cfg)
    flops = tokens = 0.0
    for g in range(micro_batches):
        b = batches.batch(g)
        flops += model.train_flops(int((b.segment_ids > 0).sum()), int((b.labels != -100).sum()),
                                   b.input_ids.shape[1], b.labels.shape[1])
        tokens += float(docs.lengths[batches.indices(g)].sum())
    return flops / tokens


def run_train(argv: list[str], out_dir: str) -> dict:
    """train.py with argv (resumed if an earlier invocation was cut short); its final metrics, the model config,
    the tokens trained on, the step-0 continuation loss and the wall time."""
    argv = argv + [f"--out_dir={out_dir}"] + (["--resume=True"] if os.path.exists(os.path.join(out_dir, "ckpt.pt")) else [])
    print(f"[grow_study] python train.py {' '.join(argv)}", flush=True)
    t0 = time.perf_counter()
    result = train.main(argv)
    wall = time.perf_counter() - t0
    events = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    ckpt = torch.load(os.path.join(out_dir, "ckpt.pt"), map_location="cpu", weights_only=True)
    return {**{k: v for k, v in result.items() if isinstance(v, (int, float))}, "wall_s": wall,
            "model_config": ckpt["model_config"], "tokens": events[-1]["tokens"],
            "step0_continuation_loss": next(e for e in events if e["event"] == "eval")["continuation_loss"]}


def once(run_dir: str, work) -> dict:
    """work()'s result, cached in run_dir/result.json: a finished run is not run again."""
    path = os.path.join(run_dir, "result.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    os.makedirs(run_dir, exist_ok=True)
    result = work()
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    return result


def paired_line(what: str, diffs: list[float]) -> str:
    d = paired(diffs)
    if d.low is None:
        return f"- {what}: {d.mean:+.3f} (one seed: no interval)"
    t = t_quantile(0.975, len(diffs) - 1)
    return (f"- {what}: {d.mean:+.3f}, 95% interval [{d.low:+.3f}, {d.high:+.3f}] ({len(diffs) - 1} degrees of freedom, "
            f"t = {t:.3f}): {'significant' if d.significant else 'not significant (within seed-to-seed noise)'}")


if __name__ == "__main__":
    main(sys.argv[1:])
