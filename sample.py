"""
Generate text with a ROT5 checkpoint (pre-trained or fine-tuned): continue a story, fill gaps, or summarize.

Usage:
    python sample.py --prompt "Once upon a time, there was a little cherry tree."      # the quick start's model
    python sample.py --ckpt out/rot5_mini/ckpt.pt --prompt "Once upon a time" --repetition-penalty 1.2
    python sample.py --ckpt out/rot5_mini/ckpt.pt --mode fill \\
        --prompt "One day, a little fish named Fin <extra_id_0> near the shore. He saw a big <extra_id_1>."
    python sample.py --ckpt out/rot5_mini_summary/ckpt.pt --mode summarize --prompt-file stories.txt --num-beams 4
    echo "Once upon a time" | python sample.py --prompt - --do-sample --temperature 0.8 --top-p 0.9 --seed 7

Modes and the encoder input each one builds (the formats the model was trained on):
    continue   [S] prompt </s>           S-denoising (prefix LM) as ul2.py builds it; the decoder writes what follows
    fill       [R] prompt </s>           the prompt marks gaps with <extra_id_0>, <extra_id_1>, ...; the decoder writes
               ([X] with --denoiser X)   "<extra_id_0> span <extra_id_1> span ...", which is spliced back into the text,
                                         each inserted span between [[ and ]]
    summarize  [S] Summarize: story </s> the fine-tuning format of finetune.py (summarize_input)
The default mode is summarize for a fine-tuned checkpoint and continue for a pre-trained one; any mode runs
on any ROT5 checkpoint (a fine-tuned model asked to fill gaps may have partly forgotten how). --ckpt also takes
an export directory (checkpoint.py export) or a Hugging Face T5 (hf:HUB_ID or a save_pretrained directory); a
model with T5's own tokenizer (e.g. FLAN-T5 fine-tuned by finetune.py) has no mode tokens: the same inputs
without [S] / [R] / [X].

Decoding: greedy by default; --do-sample with --temperature / --top-k / --top-p (and --seed); or beam search
with --num-beams N. With any of them, Hugging Face's controls of the same names: --repetition-penalty,
--no-repeat-ngram-size, --min-new-tokens (generate.process_scores). Tokens that are never text (pad, mode tokens, and sentinels except in fill mode) are
never generated, so a half-trained model cannot print "<extra_id_12>" into a story. Prompts come from
--prompt (repeatable; "-" reads stdin) or --prompt-file, one prompt per line, or separated by <|endoftext|>
lines when the text holds any; they are generated --batch-size at a time.
An input longer than the checkpoint's encoder_len (from its training config; 512, T5's input length, if the
config has none) is an error, not silently cut. So is a --max-new-tokens x --num-beams x --batch-size whose
generation (the decoder cache, allocated for the whole budget up front, and each step's logits and their
copies for every beam: generation_bytes) would not fit in half of the free memory: the message gives the
largest budget that fits (check_budget).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from contextlib import nullcontext

import torch

from checkpoint import first_line, load_model
from configurator import read_config_file
from diskio import human
from finetune import summarize_input, until_eos
from generate import available_memory, generate, generation_bytes, pad_prompts
from tokenizer import Tokenizer
from train import resolve_device

QUICK_START_CONFIG = "config/sample_cpu.py"  # the README's first command trains it; --ckpt defaults to its checkpoint
FILL_MARKS = ("[[", "]]")  # around each span fill mode inserted: plain text, so it survives a pipe or a file
DEFAULT_ENCODER_LEN = 512  # T5's pre-training input length, for checkpoints whose config does not say
# Sampling divides the fp32 logits by the temperature: with logits below 3e8 in size (a model's are far
# smaller) this keeps them under fp32's largest value, 3.4e38; inf there would make every probability NaN.
TEMPERATURE_MIN = 1e-30


def main(argv: list[str] | None = None) -> list[str]:
    args = parse_args(argv)
    check_args(args)
    prompts = read_prompts(args)
    device = resolve_device(args.device)
    if args.ckpt == quick_start_ckpt() and not os.path.exists(args.ckpt):
        raise SystemExit(f"error: no --ckpt given, and the quick start's checkpoint {args.ckpt} does not exist: train "
                         f"it with `python train.py {QUICK_START_CONFIG}`, or pass --ckpt PATH")
    try:
        model, tok, ckpt = load_model(args.ckpt, device)
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as e:  # one line, no traceback
        raise SystemExit(f"error: cannot load {args.ckpt!r} as a ROT5 checkpoint: {first_line(e)}") from None
    kind = ckpt.get("kind", "pretrain")
    mode = args.mode or ("summarize" if kind == "finetune" else "continue")
    if mode == "summarize" and kind != "finetune":
        print(f"warning: {args.ckpt} is a {kind} checkpoint, not fine-tuned to summarize; expect a story, "
              "not a summary", file=sys.stderr)
    if args.denoiser and mode != "fill":
        raise SystemExit(f"error: --denoiser picks the mode token of --mode fill; this is --mode {mode}")
    encoder_len = int(ckpt.get("config", {}).get("encoder_len", DEFAULT_ENCODER_LEN))
    inputs = [build_input(mode, p, k, tok, encoder_len, args.denoiser or "R") for k, p in enumerate(prompts)]
    check_budget(args, model, device, rows=min(args.batch_size, len(inputs)), prompt_len=max(map(len, inputs)))

    torch.manual_seed(args.seed)
    autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    outputs: list[str] = []
    n_generated, seconds = 0, 0.0
    for start in range(0, len(inputs), args.batch_size):
        batch = inputs[start:start + args.batch_size]
        # right-pad to the longest input; the attention mask hides the pad from the encoder and cross-attention
        input_ids, attention_mask = (t.to(device) for t in pad_prompts(batch, tok.pad_id))
        t0 = time.perf_counter()
        with torch.no_grad(), autocast:
            generated = generate(model, input_ids, attention_mask, max_new_tokens=args.max_new_tokens,
                                 num_beams=args.num_beams, do_sample=args.do_sample, temperature=args.temperature,
                                 top_k=args.top_k, top_p=args.top_p, eos_token_id=tok.eos_id,
                                 suppress_tokens=tok.non_text_ids(mode != "fill"),
                                 repetition_penalty=args.repetition_penalty,
                                 no_repeat_ngram_size=args.no_repeat_ngram_size, min_new_tokens=args.min_new_tokens)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - t0
        for x, ids in zip(batch, generated.tolist()):
            text_ids = until_eos(ids, tok.eos_id)
            n_generated += len(text_ids) + (len(text_ids) < len(ids))  # + the eos, when one was generated
            outputs.append(render(mode, x, text_ids, tok))

    print(("\n" + "-" * 40 + "\n").join(outputs))
    print(f"{mode}: {len(outputs)} prompt(s), {n_generated} tokens in {seconds:.2f}s "
          f"({n_generated / max(seconds, 1e-9):,.1f} tokens/s) on {device}", file=sys.stderr)
    return outputs


# -----------------------------------------------------------------------------
# command line

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each option's default, except options whose default means "not given" (None, or a flag)."""

    def _get_help_string(self, action):
        return action.help if action.default in (None, False) else super()._get_help_string(action)


def quick_start_ckpt() -> str:
    """The checkpoint the README's quick start writes: out_dir of its config, read from the file so they agree."""
    config = read_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), QUICK_START_CONFIG))
    return os.path.join(config["out_dir"], "ckpt.pt")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Generate with a ROT5 checkpoint: continue, fill gaps, or summarize.",
                                formatter_class=HelpFormatter)
    p.add_argument("--ckpt", default=quick_start_ckpt(),
                   help="a train.py / finetune.py checkpoint, an export directory, or an HF model (hf:HUB_ID or a "
                        f"directory); the default is what `python train.py {QUICK_START_CONFIG}` writes")
    p.add_argument("--mode", choices=["continue", "fill", "summarize"],
                   help="continue a story, fill its <extra_id_N> gaps, or summarize it (default: summarize for a "
                        "fine-tuned checkpoint, else continue)")
    p.add_argument("--denoiser", choices=["R", "X"],
                   help="fill mode's mode token: R (default; short gaps, T5 span corruption) or X (long gaps / many of them)")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable); '-' reads prompts from stdin")
    p.add_argument("--prompt-file", help="prompts, one per line or separated by <|endoftext|> lines")
    p.add_argument("--batch-size", type=int, default=8, help="prompts generated together")
    p.add_argument("--max-new-tokens", type=int, default=128, help="the most tokens generated per prompt (eos included)")
    p.add_argument("--num-beams", type=int, default=1, help="> 1: beam search with this many beams")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, help="sampling temperature: < 1 sharper, > 1 flatter (default 1.0)")
    p.add_argument("--top-k", type=int, help="sample from the k most likely tokens only")
    p.add_argument("--top-p", type=float, help="sample from the smallest set of tokens with probability >= p (nucleus)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="> 1 makes tokens already generated less likely (HF's repetition_penalty; 1.2 is CTRL's "
                        "suggestion); 1: off")
    p.add_argument("--no-repeat-ngram-size", type=int, default=0,
                   help="n > 0: no n-gram of generated tokens occurs twice (HF's no_repeat_ngram_size; 3 is common); 0: off")
    p.add_argument("--min-new-tokens", type=int, default=0,
                   help="no eos before this many tokens are generated (HF's min_new_tokens)")
    p.add_argument("--seed", type=int, default=1337, help="the random seed of --do-sample")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda or cuda:N")
    return p


def check_args(args: argparse.Namespace) -> None:
    """Reject flag combinations that would silently do something else than asked."""
    sampling_knobs = [f"--{n.replace('_', '-')}" for n in ("temperature", "top_k", "top_p") if getattr(args, n) is not None]
    if sampling_knobs and not args.do_sample:
        raise SystemExit(f"error: {', '.join(sampling_knobs)} apply only when sampling: add --do-sample")
    if args.do_sample and args.num_beams > 1:
        raise SystemExit("error: --do-sample and --num-beams > 1 do not combine: beam search is deterministic; pick one")
    if args.prompt and args.prompt_file:
        raise SystemExit("error: give prompts with --prompt or --prompt-file, not both")
    if not args.prompt and not args.prompt_file:
        raise SystemExit("error: no prompt: pass --prompt TEXT, --prompt - (stdin) or --prompt-file FILE")
    if args.temperature is not None and not TEMPERATURE_MIN <= args.temperature < math.inf:
        raise SystemExit(f"error: --temperature must be > 0: a finite number from {TEMPERATURE_MIN:g} up (got "
                         f"{args.temperature}); for greedy decoding drop --do-sample")
    if args.top_k is not None and args.top_k < 1:
        raise SystemExit(f"error: --top-k must be >= 1 (got {args.top_k})")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise SystemExit(f"error: --top-p must be in (0, 1] (got {args.top_p})")
    if not -2 ** 63 <= args.seed < 2 ** 64:  # what torch.manual_seed takes
        raise SystemExit(f"error: --seed must be in [-2**63, 2**64) (got {args.seed})")
    for name in ("max_new_tokens", "num_beams", "batch_size"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be >= 1 (got {getattr(args, name)})")
    if not 0 < args.repetition_penalty < math.inf:
        raise SystemExit(f"error: --repetition-penalty must be a finite number > 0 (got {args.repetition_penalty}): "
                         "> 1 discourages repeats, 1 is off")
    if args.no_repeat_ngram_size < 0:
        raise SystemExit(f"error: --no-repeat-ngram-size must be >= 0 (got {args.no_repeat_ngram_size}); 0 is off")
    if not 0 <= args.min_new_tokens <= args.max_new_tokens:
        raise SystemExit(f"error: --min-new-tokens must be in [0, --max-new-tokens={args.max_new_tokens}] (got "
                         f"{args.min_new_tokens}): raise --max-new-tokens or lower it")
    if args.temperature is None:
        args.temperature = 1.0


def check_budget(args: argparse.Namespace, model, device: torch.device, rows: int, prompt_len: int) -> None:
    """Refuse a generation whose memory (generation_bytes) would not fit in half of the free memory, with the
    largest --max-new-tokens and --num-beams that do (each found with the same estimate, so the advice fits)."""
    free = available_memory(device) // 2  # the other half: other processes, the allocator's fragmentation
    threads = torch.get_num_threads() if device.type == "cpu" else 1  # CPU topk works on this many prompts at once

    def need(tokens: int, beams: int) -> int:
        return generation_bytes(model.cfg, rows, prompt_len, beams, tokens, args.do_sample, threads,
                                args.repetition_penalty, args.no_repeat_ngram_size)

    if need(args.max_new_tokens, args.num_beams) <= free:
        return
    tokens = largest(lambda t: need(t, args.num_beams) <= free, args.max_new_tokens)
    beams = largest(lambda k: need(args.max_new_tokens, k) <= free, args.num_beams)
    fewer_beams = (f", or at most {beams:,} beams at this length" if beams > 1 else
                   ", or greedy decoding (--num-beams 1) at this length" if beams == 1 else "")
    raise SystemExit(f"error: --max-new-tokens={args.max_new_tokens:,} with --num-beams={args.num_beams:,} for {rows} "
                     f"prompt(s) at a time needs {human(need(args.max_new_tokens, args.num_beams))} for generation, "
                     f"over half of the {human(2 * free)} free on {device}: at most {tokens:,} new tokens at this beam "
                     f"count{fewer_beams} (or a smaller --batch-size)")


def largest(fits, above: int) -> int:
    """The largest n in [1, above) with fits(n), for a fits that holds up to some n and not beyond; 0 if none."""
    lo, hi = 0, above  # fits(lo) (or lo = 0), not fits(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def read_prompts(args: argparse.Namespace) -> list[str]:
    # Bytes that are not UTF-8 become U+FFFD, as prepare.py reads its data (argv and stdin hold them as
    # surrogate escapes, which the tokenizer would reject).
    if args.prompt_file:
        try:
            with open(args.prompt_file, encoding="utf-8", errors="replace") as f:
                return split_prompts(f.read(), args.prompt_file)
        except OSError as e:
            raise SystemExit(f"error: cannot read --prompt-file {args.prompt_file!r}: {e.strerror}") from None
    prompts: list[str] = []
    for p in args.prompt:
        prompts += split_prompts(sys.stdin.read(), "stdin") if p == "-" else [p]
    prompts = [p.encode("utf-8", "surrogateescape").decode("utf-8", "replace") for p in prompts]
    if any(not p.strip() for p in prompts):
        raise SystemExit("error: an empty --prompt: give it some text")
    return prompts


def split_prompts(text: str, source: str) -> list[str]:
    """<|endoftext|>-separated records when the text has any (like data/sample/stories.txt), else one per line."""
    parts = text.split("<|endoftext|>") if "<|endoftext|>" in text else text.splitlines()
    prompts = [p.strip() for p in parts if p.strip()]
    if not prompts:
        raise SystemExit(f"error: {source} holds no prompt")
    return prompts


# -----------------------------------------------------------------------------
# the encoder inputs of each mode, and how the generated ids become text

def build_input(mode: str, prompt: str, k: int, tok: Tokenizer, encoder_len: int, denoiser: str) -> list[int]:
    if mode == "fill":
        try:
            body = tok.encode(prompt, allow_sentinels=True)
        except ValueError as e:
            raise SystemExit(f"error: prompt {k + 1}: {e}") from None
        gaps = [i for i in body if i in set(tok.sentinel_ids)]
        if not gaps:
            raise SystemExit(f"error: prompt {k + 1} has no gap: mark each with <extra_id_0>, <extra_id_1>, ... "
                             "(or use --mode continue)")
        if gaps != tok.sentinel_ids[:len(gaps)]:  # the only order span corruption ever showed the model
            raise SystemExit(f"error: prompt {k + 1}: number its gaps <extra_id_0>, <extra_id_1>, ... in order, "
                             "each once")
        ids = tok.mode_prefix(denoiser) + body + [tok.eos_id]
    elif mode == "continue":
        ids = tok.mode_prefix("S") + tok.encode(prompt) + [tok.eos_id]
    else:
        ids, cut = summarize_input(tok.encode(prompt), tok, encoder_len)
        if cut:  # the story did not fit: measure how far over it is
            ids = summarize_input(tok.encode(prompt), tok, 1 << 30)[0]
    if len(ids) > encoder_len:
        raise SystemExit(f"error: prompt {k + 1} is {len(ids)} tokens with the {mode} format tokens, over this "
                         f"checkpoint's encoder_len={encoder_len}: shorten it")
    return ids


def render(mode: str, inputs: list[int], generated: list[int], tok: Tokenizer) -> str:
    body = inputs[len(tok.mode_prefix("S")):-1]  # the prompt: drop the mode token (if any) and eos
    if mode == "continue":  # the prompt, then what the decoder wrote after it, decoded as one text
        return tok.decode(body + generated)
    if mode == "fill":
        return marked_fill(body, generated, tok)
    return tok.decode(generated)


def marked_fill(body: list[int], generated: list[int], tok: Tokenizer) -> str:
    """The filled text (fill_gaps) with each inserted span between FILL_MARKS: "her [[ball]] in the park". The
    text is decoded whole, as without marks, and the marks go at the character offsets of the spans' ends: the
    decoding of the ids before a point is the start of the whole decoding (a word-start space belongs to the
    text outside the marks). A gap the model left out stays visible as its sentinel, unmarked."""
    ids, inserted = fill_gaps(body, generated, tok, with_spans=True)
    text = tok.decode(ids)
    cuts = sorted({offset for a, b in inserted for offset in (a, b)})
    at = {k: len(os.path.commonprefix([text, tok.decode(ids[:k])])) for k in cuts}  # (common prefix: a character
    out, prev = [], 0                                                             # split across pieces stays whole)
    for a, b in inserted:
        start, end = at[a], at[b]
        start += len(text[start:end]) - len(text[start:end].lstrip(" "))
        out += [text[prev:start], FILL_MARKS[0], text[start:end], FILL_MARKS[1]]
        prev = end
    return "".join(out + [text[prev:]])


def fill_gaps(body: list[int], generated: list[int], tok: Tokenizer, with_spans: bool = False):
    """Splice "<extra_id_0> span0 <extra_id_1> span1 ..." into the body's gaps (the inverse of span corruption,
    T5 sec. 3.1.4). On a well-formed answer this is ul2.reconstruct (the tests check they agree); unlike it, a
    malformed answer is no error: a gap the model left out stays visible as its sentinel, extra spans are
    dropped, so a half-trained model's answer still prints. with_spans: also return where each inserted span
    lies in the result, as (start, end) index pairs."""
    sentinels = set(tok.sentinel_ids)
    spans: dict[int, list[int]] = {}
    current: int | None = None
    for i in generated:
        if i in sentinels:  # a sentinel the model repeats starts nothing: its first span stands
            current = None if i in spans else i
            spans.setdefault(i, [])
        elif current is not None:
            spans[current].append(i)
    out: list[int] = []
    inserted: list[tuple[int, int]] = []
    for i in body:
        if i in spans:
            inserted.append((len(out), len(out) + len(spans[i])))
        out += spans.get(i, [i]) if i in sentinels else [i]
    return (out, inserted) if with_spans else out


if __name__ == "__main__":
    main()
