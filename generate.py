"""Generation with a ROT5 model: greedy decoding, sampling (temperature, top-k, top-p) and beam search.

The big idea: the encoder runs once per prompt; the decoder then writes one token per step against a KV cache
(model.KVCache): its self-attention keys/values are written into a preallocated tensor, one position per step,
and the cross-attention keys/values of the encoder output are projected once per prompt and shared by its
beams. Each step is `model.decode_step`: embed the new token, run the decoder on it alone, return its logits.

    from generate import generate
    out = generate(model, input_ids, attention_mask, max_new_tokens=64)             # greedy
    out = generate(model, input_ids, attention_mask, do_sample=True, top_p=0.9)     # nucleus sampling
    out = generate(model, input_ids, attention_mask, num_beams=4)                   # HF's beam search
    out = generate(model, input_ids, attention_mask, repetition_penalty=1.2, no_repeat_ngram_size=3)

Every step's scores pass through one function, `process_scores`, which applies the controls with the
semantics and in the order of Hugging Face's logits processors (repetition penalty, no-repeat n-gram size,
min new tokens, suppressed tokens), for greedy decoding, sampling and beam search alike. Greedy, sampling
and beam search reproduce Hugging Face transformers' `generate` with the same settings token for token on
T5 checkpoints (tests/test_hf_parity.py). Returned ids exclude the start token: eos, then pad for sequences
that ended early.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from torch import Tensor

from batch import check_ids, prompt_segments
from model import ROT5


@dataclass(frozen=True)
class Controls:
    """What process_scores does to a step's scores, each as the Hugging Face logits processor of that name.
    repetition_penalty: > 1 makes tokens already in the decoder's sequence less likely (1: off);
    no_repeat_ngram_size: n > 0 forbids any n-gram to occur twice in it (0: off);
    min_new_tokens: eos is forbidden until this many tokens are generated (0: off);
    suppress: ids never generated (None: none)."""
    eos: int
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    min_new_tokens: int = 0
    suppress: Tensor | None = None


@torch.no_grad()
def generate(model: ROT5, input_ids: Tensor, attention_mask: Tensor | None = None, max_new_tokens: int = 64,
             num_beams: int = 1, do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, eos_token_id: int | None = None, generator: torch.Generator | None = None,
             suppress_tokens: list[int] | Tensor | None = None, repetition_penalty: float = 1.0,
             no_repeat_ngram_size: int = 0, min_new_tokens: int = 0) -> Tensor:
    """Greedy (default), sampling (do_sample, with temperature -> top_k -> top_p filtering, as HF) or beam
    search (num_beams > 1, HF's algorithm and defaults) from right-padded prompts (B, S). Returns
    (B, <= max_new_tokens) ids. suppress_tokens: ids never generated (HF's SuppressTokensLogitsProcessor),
    e.g. sentinels when continuing a story; repetition_penalty, no_repeat_ngram_size, min_new_tokens: as
    HF's generate arguments of these names (Controls, process_scores). Call model.eval() first."""
    cfg = model.cfg
    eos = cfg.eos_token_id if eos_token_id is None else eos_token_id
    segment_ids = prompt_segments(input_ids, attention_mask, cfg.vocab_size)
    suppress = None if suppress_tokens is None or len(suppress_tokens) == 0 else \
        torch.as_tensor(suppress_tokens, dtype=torch.long, device=input_ids.device)
    if suppress is not None:
        check_ids(suppress[None], "suppress_tokens", cfg.vocab_size)
    if max_new_tokens < 1 or num_beams < 1 or temperature <= 0:
        raise ValueError(f"need max_new_tokens >= 1, num_beams >= 1, temperature > 0; got {max_new_tokens}, "
                         f"{num_beams}, {temperature}")
    if not repetition_penalty > 0 or no_repeat_ngram_size < 0 or min_new_tokens < 0:
        raise ValueError(f"need repetition_penalty > 0, no_repeat_ngram_size >= 0, min_new_tokens >= 0; got "
                         f"{repetition_penalty}, {no_repeat_ngram_size}, {min_new_tokens}")
    if num_beams > 1 and do_sample:
        raise ValueError("beam search is deterministic here: use num_beams=1 with do_sample=True")
    controls = Controls(eos, float(repetition_penalty), int(no_repeat_ngram_size), int(min_new_tokens), suppress)

    enc = model.encode(input_ids, segment_ids)
    if num_beams > 1:
        return beam_search(model, model.new_cache(enc, segment_ids, max_new_tokens, num_beams), max_new_tokens,
                           num_beams, controls)
    cache = model.new_cache(enc, segment_ids, max_new_tokens)
    B, pad = input_ids.shape[0], cfg.pad_token_id
    seqs = input_ids.new_full((B, max_new_tokens + 1), pad)  # the decoder's sequence: start token (pad), then out
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    for t in range(max_new_tokens):
        logits = model.decode_step(seqs[:, t:t + 1], cache)[:, -1]  # (B, V)
        scores = process_scores(logits, seqs[:, :t + 1], controls)
        if do_sample:
            probs = filter_logits(scores / temperature, top_k, top_p).softmax(-1)
            nxt = torch.multinomial(probs, 1, generator=generator)[:, 0]
        else:
            nxt = scores.argmax(-1)
        nxt = nxt.masked_fill(done, pad)
        seqs[:, t + 1] = nxt
        done |= nxt == eos
        if done.all():
            return seqs[:, 1:t + 2]
    return seqs[:, 1:]


def process_scores(scores: Tensor, seqs: Tensor, c: Controls) -> Tensor:
    """A step's (N, V) scores -> the scores to choose from, given each row's decoder sequence so far (N, 1 + t):
    the start token, then the t generated tokens. Hugging Face's logits processors, in the order its
    GenerationMixin._get_logits_processor builds them: repetition penalty, no-repeat n-gram, min new tokens,
    suppress tokens. The caller decides what the scores are, as HF does: greedy decoding and sampling pass the
    logits (sampling then divides by the temperature and filters, filter_logits: HF's warpers come after these
    processors), beam search passes the log-softmax. For an encoder-decoder HF hands the processors the
    decoder's ids, start token included; so does this, so that the same tokens count. Works in place: the
    step's scores are the caller's own, and a copy of N x V floats per control would add to generation's peak
    memory (generation_bytes)."""
    if c.repetition_penalty != 1.0:
        repetition_penalty_(scores, seqs, c.repetition_penalty)
    if c.no_repeat_ngram_size > 0:
        no_repeat_ngram_(scores, seqs, c.no_repeat_ngram_size)
    if seqs.shape[1] - 1 < c.min_new_tokens:  # MinNewTokensLengthLogitsProcessor: no eos before n new tokens
        scores[:, c.eos] = -math.inf
    if c.suppress is not None:  # SuppressTokensLogitsProcessor
        scores.index_fill_(1, c.suppress, -math.inf)
    return scores


def repetition_penalty_(scores: Tensor, seqs: Tensor, penalty: float) -> None:
    """HF's RepetitionPenaltyLogitsProcessor (CTRL, Keskar et al. 2019, eq. 1, with HF's sign rule), in place:
    the score of every token in the row's sequence is divided by penalty if positive, multiplied by it if
    negative (so that penalty > 1 always lowers it), once however often the token occurs."""
    seen = scores.gather(1, seqs)
    scores.scatter_(1, seqs, torch.where(seen < 0, seen * penalty, seen / penalty))


def no_repeat_ngram_(scores: Tensor, seqs: Tensor, n: int) -> None:
    """HF's NoRepeatNGramLogitsProcessor (fairseq's --no-repeat-ngram-size), in place: a token that would
    complete an n-gram already in the row's sequence gets -inf. Each window of n tokens whose first n - 1 are
    the sequence's last n - 1 bans its last token."""
    N, L = seqs.shape
    V = scores.shape[1]
    if L < n:  # no complete n-gram yet
        return
    windows = seqs.unfold(1, n, 1)                                          # (N, L - n + 1, n)
    matches = (windows[..., :-1] == seqs[:, None, L - n + 1:]).all(-1)     # (N, L - n + 1)
    banned = torch.zeros(N, V + 1, dtype=torch.bool, device=scores.device)  # column V: windows that ban nothing
    banned.scatter_(1, torch.where(matches, windows[..., -1], V), True)
    scores.masked_fill_(banned[:, :V], -math.inf)


def pad_prompts(prompts: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Token id lists -> right-padded (B, S) input_ids and their attention mask (1 on tokens), for generate."""
    S = max(map(len, prompts))
    input_ids = torch.tensor([p + [pad_id] * (S - len(p)) for p in prompts], dtype=torch.long)
    attention_mask = torch.tensor([[1] * len(p) + [0] * (S - len(p)) for p in prompts], dtype=torch.long)
    return input_ids, attention_mask


def beam_search(model: ROT5, cache, max_new_tokens: int, K: int, controls: Controls) -> Tensor:
    """HF transformers' beam search (generation/utils.py `_beam_search`) with its defaults
    (length_penalty=1, early_stopping=False), step for step, on a cache of B * K rows (rows b*K .. b*K+K-1
    are the beams of prompt b):
    - each step keeps the top 2K (beam, token) continuations by summed log-prob over all K beams;
    - continuations that end (eos, or the length limit) and rank in the top K become finished
      hypotheses scored sum_logprobs / n_generated (length_penalty = 1; n counts eos); the best K are kept;
    - the best K continuations that did not end are the next beams (cache reordered to follow them);
    - a prompt stops once K hypotheses are finished and its best running beam, scored with its
      current length, cannot beat the worst of them; the search stops when every prompt has.
    The controls apply to each step's log-probabilities, after the log-softmax, as HF applies its logits
    processors in beam search; a beam's sequence (start token first) is what they look back at."""
    B = cache.cross_kv.shape[2]
    V, pad, dev, NEG = model.cfg.vocab_size, model.cfg.pad_token_id, cache.self_kv.device, -1.0e9
    eos, T = controls.eos, max_new_tokens + 1  # sequences hold the start token (pad), then the new tokens
    seqs = torch.full((B, K, T), pad, dtype=torch.long, device=dev)   # running beams
    scores = torch.zeros(B, K, device=dev)
    scores[:, 1:] = NEG                    # all beams start identical: only expand the first one
    fin_seqs, fin_scores = seqs.clone(), torch.full((B, K), NEG, device=dev)
    fin_done = torch.zeros(B, K, dtype=torch.bool, device=dev)
    fin_len = torch.zeros(B, K, dtype=torch.long, device=dev)
    improvable = torch.ones(B, 1, dtype=torch.bool, device=dev)
    top_k_mask = torch.arange(2 * K, device=dev) < K
    offsets = torch.arange(B, device=dev)[:, None] * K
    for t in range(max_new_tokens):
        running = seqs.view(B * K, T)[:, :t + 1]
        logp = model.decode_step(running[:, t:], cache)[:, -1].log_softmax(-1)   # (B K, V)
        logp = process_scores(logp, running, controls).view(B, K, V) + scores[..., None]
        cand_scores, idx = logp.view(B, K * V).topk(2 * K)                 # (B, 2K)
        beam, token = idx // V, idx % V
        cand = seqs.gather(1, beam[..., None].expand(-1, -1, T))           # (B, 2K, T)
        cand[:, :, t + 1] = token
        ends = (token == eos) | (t + 1 == max_new_tokens)

        # next running beams: the best K continuations that did not end
        run_scores = cand_scores + ends.float() * NEG
        keep = run_scores.topk(K).indices
        seqs = cand.gather(1, keep[..., None].expand(-1, -1, T))
        scores, src = run_scores.gather(1, keep), beam.gather(1, keep)

        # finished hypotheses: merge the newly ended top-K continuations into the best K so far
        new_fin = ends & top_k_mask
        fin_cand = cand_scores / (t + 1) + (~improvable).float() * NEG + (~new_fin).float() * NEG
        all_scores = torch.cat([fin_scores, fin_cand], 1)
        best = all_scores.topk(K).indices
        fin_scores = all_scores.gather(1, best)
        fin_seqs = torch.cat([fin_seqs, cand], 1).gather(1, best[..., None].expand(-1, -1, T))
        fin_done = torch.cat([fin_done, new_fin], 1).gather(1, best)
        fin_len = torch.cat([fin_len, torch.full_like(cand_scores, t + 1, dtype=torch.long)], 1).gather(1, best)

        cache.reorder((src + offsets).flatten())
        worst_fin = torch.where(fin_done, fin_scores.min(1, keepdim=True).values, NEG)
        improvable &= (scores[:, :1] / (t + 1) > worst_fin).any(1, keepdim=True)
        if not improvable.any() or ends.all():
            break
    return fin_seqs[:, 0, 1:1 + int(fin_len[:, 0].max())]


def filter_logits(logits: Tensor, top_k: int | None, top_p: float | None) -> Tensor:
    """Top-k then nucleus (top-p, Holtzman et al. 2020) filtering of (B, V) logits: removed entries -> -inf.
    top-p keeps the smallest set of most likely tokens whose probability reaches top_p (at least one)."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        p = sorted_logits.softmax(-1)
        drop_sorted = p.cumsum(-1) - p >= top_p  # the more likely tokens before this one already reach top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return logits


# -- memory: what generate() allocates, to refuse a generation that cannot fit before it starts ---------------

def generation_bytes(cfg, rows: int, prompt_len: int, beams: int, new_tokens: int, sampling: bool = False,
                     threads: int = 1, repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0) -> int:
    """Peak bytes generate.generate allocates for `rows` prompts of prompt_len tokens (fp32: 4 bytes a value, ids
    int64; on a GPU under bf16 autocast the caches take half, so the estimate errs on the safe side). With
    N = rows x beams sequences decoding at once, V the vocabulary and T = new_tokens:
    kept through the decoding
      the encoder output (rows x S x d_model) and every decoder layer's cross-attention K/V of it;
      the self-attention KV cache, allocated for all T positions up front (n_decoder_layers x 2 x n_kv_heads x
      head_dim per sequence and position); beam search keeps a spare as large to reorder into (KVCache.reorder);
      beam search's token tables (running, finished, 2K candidates, their concatenation): ~8K int64 per position;
    plus the larger of two transients
      the encoder pass, per layer: its hidden states, q/k/v, attention scores (S x S per head), FFN activations;
      a decoding step: the step's logits (N x V) and, alive at once with them,
        greedy: the previous step's logits, still referenced while the next are computed (2 N V in all),
        and the copy of the output layer's weights (V x d_model) the CPU's GEMM packs to compute them;
        sampling: those plus filter_logits' copies (temperature, top-k's (value, index) pairs, the sort's values
        and int64 indices, softmax, cumsum, the masks): 12 N V, counted generously (N is small here);
        beam search, the larger of: the previous step's log-probabilities with the new logits (2 N V, and the
        GEMM's packed weights), and the logits plus the scored K x V continuations of a prompt (log-softmax plus
        beam score, and topk's working copies: 12 bytes each, measured) for as many prompts at once as topk has
        threads;
      and the step's activations (N tokens through one layer); with T5's relative bias and GQA, attend() copies
      K/V to every query head for the masked SDPA: 2 x N x n_heads x T x head_dim per layer;
      and the controls' temporaries (generate.process_scores works in place on the logits): the repetition
      penalty's gathered scores and their penalized copies (4 x N x T floats), the no-repeat n-gram mask
      (N x (V + 1) bools) and its window comparisons (N x T x (n + 8) bytes).
    The test checks this against the peak RSS generate adds, at several sizes (tests/test_faults.py)."""
    f32, i64 = 4, 8
    S, T, N, V = prompt_len, new_tokens, rows * beams, cfg.vocab_size
    H, Hkv, Dh, d, L = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_model, cfg.n_decoder_layers
    ffn = cfg.d_ff * (2 if cfg.ffn == "relu" else 4)  # wi's output (gated: both halves), activation, product
    kv_per_position = L * 2 * Hkv * Dh * f32
    kept = rows * S * (d * f32 + kv_per_position)
    kept += N * T * kv_per_position * (2 if beams > 1 else 1)
    kept += rows * T * i64 * (8 * beams if beams > 1 else 1)
    # The encoder pass, per input token: the larger of a layer's attention (its input and norm, q/k/v, rotated
    # q and k, output) and its FFN (input, norm, the FFN's activations), and the stacked cross-attention K/V;
    # the encoder's memory is one layer's at a time. T5's relative bias (H x S x S, once) is a float mask, which
    # sends SDPA down its math path: scores and their softmax, S per head each, and with GQA attend() copies
    # K/V to every query head.
    attention = 2 * d + (3 * H + 3 * Hkv) * Dh
    bias = 0
    if cfg.position == "t5":
        attention += 2 * H * S + (2 * H * Dh if Hkv < H else 0)
        bias = H * S * S * f32
    encoder = rows * S * (max(attention, 2 * d + ffn) * f32 + kv_per_position) + bias
    # A decoding step, per sequence: one layer's activations, counted as alive at once (the allocator keeps the
    # freed blocks for the next layer's, so they stay in RSS: measured): residual stream, norms and projections
    # back (9 d_model), self-attention q/k/v, rotated q and k, output ((3 H + 3 Hkv) Dh), cross-attention q,
    # rotated, regrouped by K/V head, output, reshaped (5 H Dh), the FFN, the cross-attention scores (H S).
    per_sequence = (9 * d + (8 * H + 3 * Hkv) * Dh + ffn + H * S) * f32
    packed = V * d * f32  # the output layer's weights, packed by the CPU GEMM that computes the logits (measured)
    if beams > 1:
        logits = max(2 * N * V * f32 + packed, 2 * N * V * f32 + 12 * beams * V * min(rows, threads))
    else:
        logits = (12 if sampling else 2) * N * V * f32 + packed
    if repetition_penalty != 1.0:
        logits += 4 * N * T * f32
    if no_repeat_ngram_size > 0:
        logits += N * (V + 1) + N * T * (no_repeat_ngram_size + i64)
    decoding = logits + N * per_sequence
    if cfg.position == "t5" and Hkv < H:
        decoding += 2 * N * H * T * Dh * f32
    return kept + max(encoder, decoding)


def available_memory(device: torch.device) -> int:
    """Bytes free for this process on device: the GPU's free memory, or the machine's available RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
