"""
Fine-tune a pre-trained ROT5 checkpoint on summarization (story -> summary) and score it with ROUGE-L.

This is the seed's "Summarization Tuning" stage: the pre-trained model reads a TinyStories-Instruct story
and writes its one- or two-sentence summary. Following the seed, 1M (story, summary) pairs, effective
batch 32, learning rate 1e-4, and otherwise the pre-training recipe: AdamW (weight decay 0.01), linear
warm-up over the first 1% of steps then linear decay to 0, gradient clipping at 1, bf16 autocast on CUDA.

Usage:
    python prepare.py tinystories_instruct              # once: download + tokenize the (story, summary) pairs
    python finetune.py config/finetune_summary.py       # init_from = "out/rot5_mini/ckpt.pt"
    python finetune.py config/finetune_summary.py --init_from=out/rot5_base_gqa/ckpt.pt --num_beams=4
    python finetune.py config/finetune_summary.py --resume=True     # continue an interrupted run from out_dir

    # FLAN-T5 (or any HF T5 / T5 v1.1: hf:HUB_ID, or a save_pretrained directory), with T5's own tokenizer:
    python prepare.py tinystories_instruct --tokenizer t5:google/flan-t5-base --out-dir data/tinystories_instruct_t5
    python finetune.py config/finetune_summary.py --init_from=hf:google/flan-t5-base --dataset=tinystories_instruct_t5 \
        --out_dir=out/flan_t5_summary

    python prepare.py sample && python prepare.py sample_instruct
    python train.py config/sample_cpu.py                # a small model pre-trained on the bundled sample (CPU)
    python finetune.py config/finetune_sample_cpu.py    # the bundled 3-record sample, on a CPU in seconds

The bundled sample (data/sample_instruct) holds only 3 real Instruct records (prepare.py puts 2 in train,
1 in val), so a run on it is an end-to-end exercise of this script, not a score: real numbers need the
downloaded TinyStories-Instruct. The script says so in its output when it sees such a small dataset.

Encoder input:  [S] "Summarize:" story </s>     (story cut to fit encoder_len; the count of cut stories is reported;
                                                 T5's own tokenizer has no [S]: "Summarize:" story </s>)
Decoder labels: summary </s>                    (cut to decoder_len)
Why this format: every pre-training input began with a UL2 mode token, and UL2 (Tay et al. 2022, sec. 3.1.2)
switches modes at fine-tuning time by prefixing the downstream task with the paradigm token that fits it.
Summarization has the shape of S-denoising (prefix LM): the whole input is visible and the target is
free text generated left to right, with no sentinels, so [S]. The short T5-style task prefix (Raffel et al.
2020, sec. 2.4) follows the mode token so a summarize input never looks like a plain story to continue:
the same checkpoint can still be asked (by sample.py) to continue a story, and other tasks can be added later.

Outputs in out_dir: ckpt.pt (kind "finetune", written atomically after every evaluation, every save_interval
steps and when a signal stops the run: SIGTERM, SIGUSR1 or Ctrl-C finish the current step first), ckpt.prev.pt
(the checkpoint before it, which --resume=True falls back to when ckpt.pt is damaged), run.lock (a second run on
the same out_dir is refused while this one goes on), metrics.jsonl (one JSON object per log/eval event; eval
events carry val_loss, rougeL and lead1_rougeL), predictions.jsonl (story, reference, prediction of the last
evaluation) and curves.png (plot.py, redrawn at every evaluation; wandb_log / tensorboard_log send the events to
those trackers too). A new run refuses an out_dir that holds a checkpoint; `--resume=True` continues it from its last
checkpoint and trains exactly as an uninterrupted run would (weights, AdamW state, random generators, pair
order); a log interval that straddles the checkpoint averages only its steps after it. Train events log "loss" (what is optimized: the LM loss plus
any MoE losses), "lm_loss" (comparable with val_loss) and grad_norm, averaged over the updates since the last one,
and "enc_real" / "dec_real", the fraction of row positions that hold real tokens: training packs several pairs
per row (pack=True; ul2.pack_examples), with the same loss over the same tokens as one pair per row.
ROUGE-L is the rouge-score package's F-measure x 100 (stemming on), averaged over validation pairs; the
lead-1 baseline (the story's first sentence as its summary) is reported beside it for context.
Single process (the fine-tuning set is small next to pre-training); config keys as in train.py:
`python finetune.py [config file] [--key=value ...]`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from collections.abc import Sequence
from contextlib import nullcontext

import numpy as np

# CPU: transparent huge pages for tensors of 2 MB and more, set before `import torch` (why: train.py)
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch
from rouge_score import rouge_scorer

import preempt
import prepare
from batch import Batch, check_batch
from checkpoint import (RunLock, check_start, load_model, log_event, random_states, remove_run_temps, restart_log,
                        resume_hint, resume_run, save_checkpoint)
from configurator import check_ranges, configure, documented_keys, help_text, wants_help
from diskio import check_out_dir, human
from generate import available_memory, generate, generation_bytes, pad_prompts
from plot import Tracker, check_trackers
from tokenizer import Tokenizer
from train import ADAM_EPS, exclude_pause, finished_line, guarded_step, lr_factor, param_groups, resolve_device, step_bar
from ul2 import pack_examples

# -----------------------------------------------------------------------------
# defaults: the seed's summarization fine-tuning of ROT5-mini; a config file / --key=value override them.
# `python finetune.py --help` lists these keys under the group comments below, each with its trailing comment.
DEFAULTS: dict = dict(
    # data
    dataset="tinystories_instruct",     # data/<dataset>/ from `python prepare.py <dataset>`
    train_pairs=1_000_000,              # use the first N training pairs (the seed: 1M); 0 = all
    encoder_len=512,                    # longer stories are cut (and counted)
    decoder_len=128,                    # summary tokens incl. eos; also the generation budget
    pack=True,                          # several pairs per training row (ul2.pack_examples): no compute on padding
    # model
    init_from="out/rot5_mini/ckpt.pt",  # a pre-trained (or fine-tuned) ROT5 checkpoint, or an HF model (T5, Switch, a
                                        # Llama / Mistral adapted): hf:HUB_ID / a directory
    dropout=0.1,                        # T5 fine-tunes with dropout 0.1, whatever pre-training used
    # optimization: AdamW (betas 0.9, 0.999), as pre-training
    batch_size=32,                      # pairs per optimizer step
    micro_batch_size=32,                # pairs per forward; gradient accumulation = batch_size / micro_batch_size
    learning_rate=1e-4,                 # peak learning rate
    weight_decay=0.01,                  # on matrices only (train.param_groups)
    grad_clip=1.0,                      # max global gradient norm (0: no clipping)
    max_bad_steps=5,                    # stop after this many non-finite steps in a row (each one is skipped)
    # schedule: the budget, the learning rate, logging and evaluation
    epochs=1.0,                         # passes over the training pairs (fractional is fine)
    warmup_frac=0.01,                   # linear warm-up over the first 1% of steps, then linear decay to 0
    log_interval=50,                    # steps between "train" events
    eval_interval=1000,                 # steps between evaluations (also at step 0 and at the end)
    save_interval=0,                    # steps between checkpoints besides the evaluations' (0: none)
    eval_pairs=500,                     # validation pairs for val_loss and ROUGE-L (the seed: a 500-entry subset)
    eval_batch_size=64,                 # pairs per evaluation forward and generation
    num_beams=1,                        # 1: greedy decoding; > 1: beam search for the ROUGE-L predictions
    # system
    out_dir="out/rot5_mini_summary",    # the run's directory: ckpt.pt, metrics.jsonl, predictions.jsonl, curves.png
    seed=1337,                          # the pairs' order and dropout
    resume=False,                       # continue out_dir/ckpt.pt (written at every evaluation)
    device="auto",                      # "auto": cuda if available, else cpu; or "cpu", "cuda", "cuda:N"
    wandb_log=False,                    # send the metrics to Weights & Biases (pip install wandb; WANDB_MODE=offline: on disk)
    wandb_project="rot5",               # its W&B project
    wandb_run_name="",                  # its W&B run name ("": W&B picks one)
    tensorboard_log=False,              # write TensorBoard events to out_dir/tensorboard (pip install tensorboard)
)
# what makes a run that run: resuming with any of these changed warns that it will not match an uninterrupted one
RUN_KEYS = ("init_from", "dataset", "train_pairs", "epochs", "batch_size", "learning_rate", "warmup_frac",
            "encoder_len", "decoder_len", "pack", "seed")
TASK_PREFIX = "Summarize:"
SMALL_DATASET = 1000  # fewer training pairs than this: the run is a pipeline exercise, not a measurement


def main(argv: list[str]) -> dict:
    """Fine-tune with the config from argv; returns the last evaluation. SIGTERM / SIGUSR1 / Ctrl-C stop the run
    after its current step with a checkpoint (preempt.py); out_dir is locked while it runs (checkpoint.RunLock)."""
    if wants_help(argv):
        print(help_text("usage: python finetune.py [CONFIG_FILE ...] [--key=value ...]",
                        "Fine-tune a ROT5 checkpoint (or an HF T5) on story -> summary pairs and score it with ROUGE-L "
                        "(the top of finetune.py has the details).",
                        documented_keys(__file__, DEFAULTS, scope="DEFAULTS"), DEFAULTS, argv))
        return {}
    lock = RunLock()
    try:
        with preempt.handled() as stop:
            return run(argv, stop, lock)
    finally:
        lock.release()


def run(argv: list[str], stop: preempt.Stop, lock: RunLock) -> dict:
    cfg = configure(DEFAULTS, argv)
    check_ranges(cfg, positive=("epochs", "batch_size", "micro_batch_size", "learning_rate", "encoder_len", "decoder_len",
                                "eval_interval", "eval_pairs", "eval_batch_size", "num_beams", "log_interval",
                                "max_bad_steps"),
                 non_negative=("train_pairs", "weight_decay", "grad_clip", "save_interval"),
                 fractions=("warmup_frac", "dropout"))
    check_trackers(cfg)
    check_out_dir(cfg["out_dir"])
    if cfg["decoder_len"] < 2:  # 1 would train the model to answer every story with eos alone
        raise SystemExit(f"--decoder_len={cfg['decoder_len']} leaves no room for a summary before the eos: it must be >= 2")
    device = resolve_device(cfg["device"])
    # bf16 autocast on CUDA as in pre-training; fp32 on CPU, where bf16 matmuls are slow and inexact.
    autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    torch.manual_seed(cfg["seed"])
    ckpt_path = os.path.join(cfg["out_dir"], "ckpt.pt")
    lock.claim(cfg["out_dir"], make=False)  # a run going on in out_dir already: refused at once
    check_start(ckpt_path, cfg["resume"])  # never overwrite a fine-tuned model by starting again

    model, tok, init_ckpt = load_model(cfg["init_from"], device)
    try:  # the input format must fit encoder_len with room for a story (else: the first evaluation fails)
        summarize_input([], tok, cfg["encoder_len"])
    except ValueError as e:
        raise SystemExit(f"--encoder_len={cfg['encoder_len']}: {e}") from None
    set_dropout(model, cfg["dropout"])
    data_dir = os.path.join("data", cfg["dataset"])  # as train.py: relative to the working directory
    try:
        meta = prepare.load_meta(data_dir)
        train_pairs, val_pairs = prepare.load_pairs(data_dir, "train"), prepare.load_pairs(data_dir, "val")
    except ValueError as e:
        raise SystemExit(str(e)) from None
    # the same kind of tokenizer (T5's spiece.model may come from the hub or a directory); check_tokenizer then
    # pins the model file (sha256) and the special ids
    if meta["tokenizer"].split(":")[0] != tok.name.split(":")[0]:
        raise SystemExit(f"{data_dir} was tokenized with {meta['tokenizer']!r} but {cfg['init_from']} uses {tok.name!r}: "
                         f"run `python prepare.py {meta.get('dataset', 'DATASET')} --tokenizer {tok.name} --out-dir DIR` into another "
                         "directory and pass its name as --dataset")
    try:
        prepare.check_tokenizer(data_dir, tok)  # and the same special ids and vocabulary
    except ValueError as e:
        raise SystemExit(str(e)) from None
    n_train = min(cfg["train_pairs"], len(train_pairs)) if cfg["train_pairs"] else len(train_pairs)
    n_val = min(cfg["eval_pairs"], len(val_pairs))
    check_eval_memory(model, cfg, n_val, device)
    if cfg["batch_size"] % cfg["micro_batch_size"]:
        raise SystemExit(f"batch_size={cfg['batch_size']} is not a multiple of micro_batch_size={cfg['micro_batch_size']}: "
                         "change one of them")
    accum = cfg["batch_size"] // cfg["micro_batch_size"]  # gradient accumulation steps
    steps = max(1, math.ceil(cfg["epochs"] * n_train / cfg["batch_size"]))
    warmup = math.ceil(cfg["warmup_frac"] * steps)  # HF Trainer rounds warmup_ratio * steps up, as train.py
    print(f"fine-tuning {cfg['init_from']} ({init_ckpt.get('kind', '?')}, step {init_ckpt.get('step', '?')}, "
          f"{model.num_params() / 1e6:.1f}M params) on {n_train:,} pairs of {data_dir} for {steps:,} steps "
          f"(batch {cfg['batch_size']} = {cfg['micro_batch_size']} x {accum} accumulation), {n_val} validation pairs")
    if len(train_pairs) < SMALL_DATASET:
        print(f"NOTE: {data_dir} has only {len(train_pairs)} training and {len(val_pairs)} validation pairs: this run "
              "exercises the pipeline end to end; its loss and ROUGE-L are not a real score. "
              "Real scores need `python prepare.py tinystories_instruct`.")

    optimizer = torch.optim.AdamW(param_groups(model, cfg["weight_decay"]), lr=cfg["learning_rate"],
                                  betas=(0.9, 0.999), eps=ADAM_EPS, fused=True)  # HF defaults, as train.py
    # Training order: a fresh permutation of the first n_train pairs per epoch, fixed by the seed.
    rng = np.random.default_rng(cfg["seed"])
    order = np.concatenate([rng.permutation(n_train) for _ in range(math.ceil(cfg["epochs"]))])

    # every setting and input checked: only now is out_dir made (a mistake above leaves nothing behind)
    lock.claim(cfg["out_dir"])  # (makes out_dir)
    remove_run_temps(cfg["out_dir"])
    metrics_path = os.path.join(cfg["out_dir"], "metrics.jsonl")
    start_step, truncated, last_eval = 0, 0, {}  # truncated: training stories cut to encoder_len so far
    if cfg["resume"]:  # the pair order depends on the seed alone: restoring the state is enough
        start_step, last_eval = resume_run(ckpt_path, "finetune", model, optimizer, cfg, RUN_KEYS, print)
        truncated = last_eval["train_truncated"]
        if start_step >= steps:  # nothing is written: the finished run stays as it is
            print(finished_line(ckpt_path, start_step, steps, budget="epochs"))
            return last_eval
        print(f"resuming {ckpt_path} at step {start_step}")
    restart_log(metrics_path, start_step if cfg["resume"] else None)
    tracker = Tracker(cfg, metrics_path)  # curves.png, W&B, TensorBoard (plot.py)
    bad_in_a_row = 0  # non-finite steps in a row

    def save(step: int) -> None:
        save_checkpoint(ckpt_path, {
            "kind": "finetune", "model": model.state_dict(), "model_config": dataclasses.asdict(model.cfg),
            "tokenizer": tok.name, "config": cfg, "step": step, "optimizer": optimizer.state_dict(),
            "rng": random_states(), "metrics": {**last_eval, "train_truncated": truncated}})

    since_log = dict.fromkeys(("loss", "lm_loss", "grad_norm", "tokens", "steps"), 0.0)  # sums over updates
    positions = [0, 0, 0, 0]  # encoder real tokens, encoder positions, decoder likewise, since the last log
    t_log = time.perf_counter()
    stop.defer()  # from here on a signal stops the run after its current step, with a checkpoint at that step
    model.train()
    bar = step_bar(steps, start_step)  # as train.py's; lines below go above it (bar.write)
    for step in range(start_step, steps + 1):  # step = optimizer updates done so far
        # evaluate the pre-trained model (step 0), every eval_interval updates, and after the last one
        # (unless this step's checkpoint, which a resumed run starts from, holds its evaluation)
        if (step % cfg["eval_interval"] == 0 or step == steps) and last_eval.get("step") != step:
            t_eval = time.perf_counter()
            metrics, rows = evaluate(model, tok, val_pairs, n_val, cfg, device, autocast)
            last_eval = {"event": "eval", "step": step, **metrics, "train_truncated": truncated}
            log_event(metrics_path, last_eval)
            tracker.log(last_eval)
            write_predictions(os.path.join(cfg["out_dir"], "predictions.jsonl"), rows)
            bar.write(f"eval step {step}: val_loss {last_eval['val_loss']:.4f} | ROUGE-L {last_eval['rougeL']:.2f} "
                  f"(lead-1 baseline {last_eval['lead1_rougeL']:.2f}) on {n_val} pairs, "
                  f"{last_eval['val_truncated']} stories cut to encoder_len={cfg['encoder_len']}")
            save(step)
            paused = time.perf_counter() - t_eval  # evaluation and saving are not training throughput (nor the ETA)
            t_log += paused
            exclude_pause(bar, paused)
        if step == steps:
            break

        lr = cfg["learning_rate"] * lr_factor(step, steps, warmup)  # pre-training's schedule (HF linear)
        for group in optimizer.param_groups:
            group["lr"] = lr
        idx = order[step * cfg["batch_size"]:(step + 1) * cfg["batch_size"]]  # (<= batch_size,) pair indices
        micro_batches = [idx[i:i + cfg["micro_batch_size"]] for i in range(0, len(idx), cfg["micro_batch_size"])]
        step_loss, step_lm_loss, step_tokens = 0.0, 0.0, 0
        for micro_idx in micro_batches:  # fewer than accum only on the last step of a fractional epoch
            batch, cut = collate([train_pairs[int(i)] for i in micro_idx], tok, cfg["encoder_len"], cfg["decoder_len"],
                                 cfg["pack"])
            truncated += cut
            check_batch(batch, model.cfg)  # on the CPU, before the device sees it
            enc_real, dec_real = int((batch.segment_ids > 0).sum()), int((batch.labels != -100).sum())
            positions = [positions[0] + enc_real, positions[1] + batch.input_ids.numel(),
                         positions[2] + dec_real, positions[3] + batch.labels.numel()]
            with autocast:
                out = model(batch.to(device))
                loss = out.loss + out.aux_loss + out.z_loss  # plus the MoE balancing / z-losses (0 if dense)
            (loss / len(micro_batches)).backward()
            # (one host sync for both; lm is comparable with val_loss: for MoE, without the aux / z losses)
            total, lm = (torch.stack([loss, out.loss]).detach().float() / len(micro_batches)).tolist()
            step_loss, step_lm_loss, step_tokens = step_loss + total, step_lm_loss + lm, step_tokens + enc_real + dec_real
        grad_norm, updated = guarded_step(model, optimizer, cfg["grad_clip"], step_loss)  # as train.py
        if updated:
            bad_in_a_row = 0
            for key, value in (("loss", step_loss), ("lm_loss", step_lm_loss), ("grad_norm", grad_norm),
                               ("tokens", step_tokens), ("steps", 1)):
                since_log[key] += value
        else:
            bad_in_a_row += 1
            log_event(metrics_path, {"event": "skip", "step": step + 1, "loss": step_loss, "grad_norm": grad_norm})
            bar.write(f"step {step + 1}: non-finite loss {step_loss} / grad norm {grad_norm}: update skipped")
            if bad_in_a_row >= cfg["max_bad_steps"]:
                raise SystemExit(f"{bad_in_a_row} non-finite steps in a row (up to step {step + 1}): stopping; "
                                 f"{ckpt_path} holds the last saved state. Lower learning_rate "
                                 "or check the data")
        bar.update(1)

        if ((step + 1) % cfg["log_interval"] == 0 or step + 1 == steps) and since_log["steps"]:
            dt = time.perf_counter() - t_log
            n = since_log["steps"]  # updates made since the last log (skipped steps are not averaged in)
            event = {"event": "train", "step": step + 1, "loss": since_log["loss"] / n, "lm_loss": since_log["lm_loss"] / n,
                     "lr": lr, "grad_norm": since_log["grad_norm"] / n, "tok_per_s": since_log["tokens"] / dt,
                     "train_truncated": truncated, "enc_real": positions[0] / positions[1],
                     "dec_real": positions[2] / positions[3]}
            log_event(metrics_path, event)
            tracker.log(event)
            bar.set_postfix(loss=f"{event['loss']:.4f}", lr=f"{lr:.2e}")
            bar.write(f"step {step + 1}/{steps} | loss {event['loss']:.4f} | lr {lr:.2e} | {event['tok_per_s']:,.0f} tok/s"
                  f" | real tokens {event['enc_real']:.0%} enc, {event['dec_real']:.0%} dec")
            since_log, t_log, positions = dict.fromkeys(since_log, 0.0), time.perf_counter(), [0, 0, 0, 0]

        # a signal or save_interval: a checkpoint at this step, unless the next pass evaluates and saves it anyway
        done = step + 1
        stopping = done < steps and stop.requested()
        evaluated = done % cfg["eval_interval"] == 0 or done == steps
        if stopping or (cfg["save_interval"] and done % cfg["save_interval"] == 0 and not evaluated):
            save(done)
        if stopping:
            bar.close()
            tracker.close()
            raise stop.stopped(done, f"saved {ckpt_path} at that step", "continue with the same command and --resume=True")

    bar.close()
    tracker.close()
    print(f"done: {steps} steps, {truncated} training stories cut to encoder_len={cfg['encoder_len']}; "
          f"final ROUGE-L {last_eval['rougeL']:.2f} vs lead-1 {last_eval['lead1_rougeL']:.2f}; "
          f"wrote {cfg['out_dir']}/ckpt.pt, metrics.jsonl, predictions.jsonl")
    return last_eval


# -----------------------------------------------------------------------------
# the summarization format, shared with sample.py

def summarize_input(story: Sequence[int], tok: Tokenizer, encoder_len: int) -> tuple[list[int], bool]:
    """[S] Summarize: <story> </s> -> (ids, whether the story was cut to fit encoder_len)."""
    prefix = tok.mode_prefix("S") + tok.encode(TASK_PREFIX)
    room = encoder_len - len(prefix) - 1
    if room < 1:
        raise ValueError(f"encoder_len={encoder_len} leaves no room for a story after the {len(prefix) + 1} "
                         "format tokens: raise encoder_len")
    story = [int(i) for i in story]
    return prefix + story[:room] + [tok.eos_id], len(story) > room


def collate(pairs: list[tuple[np.ndarray, np.ndarray]], tok: Tokenizer, encoder_len: int,
            decoder_len: int, pack: bool = True) -> tuple[Batch, int]:
    """(story, summary) pairs -> a Batch of packed rows (several pairs per row, no compute on padding), or one
    pair per row (pack=False), and the number of stories cut to fit encoder_len."""
    inputs, cuts = zip(*(summarize_input(story, tok, encoder_len) for story, _ in pairs))
    targets = [[int(i) for i in summary[:decoder_len - 1]] + [tok.eos_id] for _, summary in pairs]
    batch = pack_examples(np.concatenate(inputs), np.array([len(x) for x in inputs]), np.concatenate(targets),
                          np.array([len(y) for y in targets]), encoder_len, decoder_len, tok.pad_id, False, pack)
    return batch, sum(cuts)


# -----------------------------------------------------------------------------
# evaluation: validation loss, generated summaries, ROUGE-L and the lead-1 baseline

@torch.no_grad()
def evaluate(model: torch.nn.Module, tok: Tokenizer, val_pairs: Sequence, n: int, cfg: dict,
             device: torch.device, autocast) -> tuple[dict, list[dict]]:
    """Token-weighted val loss and ROUGE-L of generated summaries over the first n validation pairs, and those rows."""
    model.eval()
    loss_sum, n_labels, cut, rows = 0.0, 0, 0, []  # rows: {story, reference, prediction} per pair
    bs = cfg["eval_batch_size"]
    for start in range(0, n, bs):
        pairs = [val_pairs[i] for i in range(start, min(start + bs, n))]
        batch, c = collate(pairs, tok, cfg["encoder_len"], cfg["decoder_len"])
        cut += c
        input_ids, attention_mask = pad_prompts([summarize_input(story, tok, cfg["encoder_len"])[0]
                                                 for story, _ in pairs], tok.pad_id)
        with autocast:
            out = model(batch.to(device))
            generated = generate(model, input_ids.to(device), attention_mask.to(device),
                                 max_new_tokens=cfg["decoder_len"], num_beams=cfg["num_beams"],
                                 eos_token_id=tok.eos_id, suppress_tokens=tok.non_text_ids())
        k = int((batch.labels != -100).sum())
        loss_sum, n_labels = loss_sum + out.loss.item() * k, n_labels + k
        for (story, summary), ids in zip(pairs, generated.tolist()):
            rows.append({"story": tok.decode(story), "reference": tok.decode(summary),
                         "prediction": tok.decode(until_eos(ids, tok.eos_id))})
    model.train()
    refs = [r["reference"] for r in rows]
    metrics = {"val_loss": loss_sum / max(n_labels, 1),
               "rougeL": rouge_l([r["prediction"] for r in rows], refs),
               "lead1_rougeL": rouge_l([lead_sentence(r["story"]) for r in rows], refs),
               "num_beams": cfg["num_beams"], "n_eval": len(rows), "val_truncated": cut}
    return metrics, rows


def check_eval_memory(model: torch.nn.Module, cfg: dict, n_val: int, device: torch.device) -> None:
    """The evaluation generates summaries of eval_batch_size stories at a time with num_beams beams for up to
    decoder_len tokens: one line, before any training, if that cannot fit (sample.py's estimate and rule)."""
    rows = max(1, min(cfg["eval_batch_size"], n_val))
    need = generation_bytes(model.cfg, rows, cfg["encoder_len"], cfg["num_beams"], cfg["decoder_len"])
    free = available_memory(device)
    if need > free // 2:
        raise SystemExit(f"--num_beams={cfg['num_beams']} x --eval_batch_size={rows} x --decoder_len={cfg['decoder_len']} "
                         f"needs {human(need)} to generate the evaluation's summaries, over half of the {human(free)} "
                         f"free on {device}: lower --eval_batch_size or --num_beams")


def rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F-measure x 100 (Lin 2004; the rouge-score package with Porter stemming, as the seed's HF setup)."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references, strict=True)]
    return 100.0 * sum(scores) / max(len(scores), 1)


# a sentence ends at . ! or ?, maybe followed by closing quotes, then whitespace; a line break ends one too
SENTENCE_END = re.compile(r"(?<=[.!?])[\"'”’]*(?=\s)|\n")


def lead_sentence(story: str) -> str:
    """The lead-1 baseline: the story's first sentence, as its summary (See et al. 2017's lead-3, for one-line summaries)."""
    story = story.strip()
    m = SENTENCE_END.search(story)
    return story if m is None else story[:m.end()].strip()


def until_eos(ids: list[int], eos_id: int) -> list[int]:
    return ids[:ids.index(eos_id)] if eos_id in ids else ids


# -----------------------------------------------------------------------------
# small helpers

def set_dropout(model: torch.nn.Module, p: float) -> None:
    """Fine-tuning's dropout, whatever pre-training used, everywhere HF T5 puts it (attention probabilities
    too): attention reads the (shared) config, the rest are modules. Fine-tuning runs eager, on SDPA."""
    if not 0.0 <= p < 1.0:
        raise SystemExit(f"dropout={p} must be in [0, 1)")
    model.cfg.dropout = model.cfg.attention_dropout = p
    if model.cfg.attention == "flex" and p:  # FlexAttention cannot apply attention dropout
        model.cfg.attention = "auto"
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = p


def write_predictions(path: str, rows: list[dict]) -> None:
    with prepare.atomic_write(path, "w", then=resume_hint(os.path.join(os.path.dirname(path), "ckpt.pt"))) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
