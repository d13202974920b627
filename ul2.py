"""UL2 pre-training data: a mixture of denoisers turns each document into an (inputs, targets) pair.

The big idea (UL2, Tay et al. 2022, "Unifying Language Learning Paradigms", sec. 3.1): instead of one
objective, sample one of several *denoisers* per example. Each is span corruption with a mean span length
mu and a noise density r (the fraction of tokens masked), or prefix-LM:

    mode  denoiser    mu   r      what it teaches                         prob (the seed write-up's 0.25/0.25/0.5)
    [R]   R(3,0.15)    3   0.15   T5-style fill-in-the-blank (NLU)        0.125
    [R]   R(8,0.15)    8   0.15                                           0.125
    [X]   X(3,0.5)     3   0.5    extreme: much masked / long spans       0.0625
    [X]   X(8,0.5)     8   0.5                                            0.0625
    [X]   X(64,0.15)  64   0.15                                           0.0625
    [X]   X(64,0.5)   64   0.5                                            0.0625
    [S]   S            -   -      prefix-LM: continue the text (NLG)      0.5

The seven denoisers are UL2's (sec. 3.1.2, "Mixture of Denoisers"); the mode split R/X/S = 0.25/0.25/0.5 is
the reference write-up's, shared evenly among the denoisers of a mode. Every input starts with its mode
token (UL2 sec. 3.1.3 "Mode Switching", there [NLU]/[NLG]/[S2S]) so that at inference a prompt can ask for
one behaviour. `mixture("t5")` is plain T5 span corruption (3, 0.15) alone, still prefixed with [R] so the
format is the same everywhere; `mixture("prefix_lm")` is pure prefix-LM as in T5Gemma.

Formats (a real TinyStories sentence, Mistral tokenizer; <extra_id_k> = sentinel k, </s> = eos):

    doc       One day, a little girl named Lily found a needle in her room.            (15 tokens)
    R(3,0.15): round(15 * 0.15) = 2 noise tokens, round(2 / 3) -> 1 span
      inputs  [R] One day, a little girl named Lily found a needle in her<extra_id_0></s>
      ids     32001 2387 1370 28725 264 1628 2746 5160 25492 1419 264 25710 297 559 32004 2
      targets <extra_id_0> room.</s>
      ids     32004 2003 28723 2
    X(3,0.5): round(7.5) = 8 noise tokens in round(8 / 3) = 3 spans
      inputs  [X] One day,<extra_id_0> Lily<extra_id_1> needle in her<extra_id_2></s>
      targets <extra_id_0> a little girl named<extra_id_1> found a<extra_id_2> room.</s>
    S: split point drawn uniformly from 1..L-1 (here 12)
      inputs  [S] One day, a little girl named Lily found a needle in</s>
      targets her room.</s>

Span corruption follows T5's `random_spans_noise_mask` (Raffel et al. 2020, sec. 3.1.4; t5/data/
preprocessors.py), in float64 like HF's port of it (T5's TensorFlow rounds L * r in float32, which differs on
some exact .5 ties, e.g. L = 190, r = 0.15: 28 noise tokens here, 29 there); everything but the span
lengths is a deterministic function of the length L:

    num_noise = clip(round(L * r), 1, L - 1)
    num_spans = clip(round(num_noise / mu), 1, L - num_noise)    (T5 has no upper clip; it never binds for
                                                                  UL2's denoisers, and keeps every r defined)
    spans alternate non-noise, noise, non-noise, ..., noise: the text starts with kept tokens and ends masked;
    both the noise and the non-noise lengths are a uniformly random composition of their count into
    num_spans positive parts (T5's _random_segmentation).

Each noise span becomes one sentinel in the inputs (<extra_id_0>, <extra_id_1>, ... in order); the targets
are, per span, its sentinel then its tokens, and finally eos. Documents of length 0 or 1 cannot hold a
noise span and a kept token (T5 gets "no noise" for them too): they pass through whole, inputs = [mode] +
doc + [eos], targets = [eos]. A 2-token document gets its last token masked. S-denoising of a 0/1-token
document puts it all in the targets. Note what the seed did differently and this file does not: it OR-ed
two X masks together and had no mode tokens.

`reconstruct(inputs, targets)` is the exact inverse; the tests check it on every denoiser.

Batches (`UL2Batches`): each step takes `batch_size` documents per rank from a per-epoch permutation
(every document exactly once per epoch over all ranks), draws a denoiser per example, crops long documents
to the largest window whose inputs fit `encoder_len` and targets fit `decoder_len` (exact, because the
counts above depend on L only), and lays the examples out in rows (`pack_examples`): several per row,
encoder and decoder sides packed apart (pack=True, what training and evaluation use), or one per row. All
randomness comes from np.random.default_rng([seed, step, rank]), so a resumed run or another DDP rank
reproduces its batches exactly; a validation set is just UL2Batches(val_docs, ..., seed=fixed).

Speed: the corruption is vectorised over the whole batch (no per-token Python; per document only the
crop/slice; the random segmentations of a batch share one row-wise sort): on one core, tens of thousands of
TinyStories documents per second (bench.py section d), ~1% of a GPU training step.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch

from batch import Batch, label_positions, shift_right


class Denoiser(NamedTuple):
    name: str
    mode: str                      # "R" | "X" | "S": which mode token starts the inputs
    mean_span: float | None        # mu (None for S)
    noise_density: float | None    # r (None for S)
    prob: float                    # probability in the mixture


def mixture(name: str = "ul2") -> tuple[Denoiser, ...]:
    """The denoiser mixtures: "ul2" (UL2 sec. 3.1.2 denoisers, R/X/S = 0.25/0.25/0.5), "t5" (span
    corruption 3/0.15 only, mode token [R]), "prefix_lm" (S only, as T5Gemma)."""
    if name == "ul2":
        r = [(3, 0.15), (8, 0.15)]
        x = [(3, 0.5), (8, 0.5), (64, 0.15), (64, 0.5)]
        return (*(Denoiser(f"R({m},{d})", "R", m, d, 0.25 / len(r)) for m, d in r),
                *(Denoiser(f"X({m},{d})", "X", m, d, 0.25 / len(x)) for m, d in x),
                Denoiser("S", "S", None, None, 0.5))
    if name == "t5":
        return (Denoiser("R(3,0.15)", "R", 3, 0.15, 1.0),)
    if name == "prefix_lm":
        return (Denoiser("S", "S", None, None, 1.0),)
    raise ValueError(f"unknown mixture {name!r}: use 'ul2', 't5' or 'prefix_lm'")


MIXTURE: tuple[Denoiser, ...] = mixture("ul2")
MIN_LEN = 8   # shortest encoder_len / decoder_len UL2Batches accepts
MODES = ("R", "X", "S")    # the mode tokens, in the order metrics report them
_mixture_named = mixture   # UL2Batches' `mixture` argument shadows the function


def span_counts(length, noise_density: float, mean_span: float) -> tuple[np.ndarray, np.ndarray]:
    """(num_noise, num_spans) for documents of `length` tokens: T5 random_spans_noise_mask's arithmetic.

    Deterministic in L, which is what lets UL2Batches crop to windows that fit exactly. 0 spans for L < 2.
    """
    L = np.asarray(length, dtype=np.int64)
    # np.round rounds half to even like tf.round in T5
    noise = np.minimum(np.maximum(np.round(L * noise_density).astype(np.int64), 1), np.maximum(L - 1, 1))
    spans = np.minimum(np.maximum(np.round(noise / mean_span).astype(np.int64), 1), L - noise)
    short = L < 2
    return np.where(short, 0, noise), np.where(short, 0, spans)


def corrupt(doc, denoiser: Denoiser, rng: np.random.Generator, tok) -> tuple[np.ndarray, np.ndarray]:
    """One document (token ids without eos) -> (inputs, targets), int64 arrays, as the module docstring shows.

    No cropping here: a span denoiser raises if the document needs more sentinels than the tokenizer has.
    """
    doc = np.asarray(doc, dtype=np.int64)
    L = len(doc)
    if denoiser.mode == "S":
        split = np.array([rng.integers(1, L) if L >= 2 else 0])
    else:
        _, spans = span_counts(L, denoiser.noise_density, denoiser.mean_span)
        if spans > len(tok.sentinel_ids):
            raise ValueError(f"{denoiser.name} on a {L}-token document needs {int(spans)} sentinels but the tokenizer "
                             f"has {len(tok.sentinel_ids)}: crop the document first (UL2Batches does)")
        split = np.array([-1])
    ins, in_len, tgt, tgt_len = _corrupt_flat(doc, np.array([L]), np.array([denoiser.mode != "S"]),
                                              np.array([denoiser.noise_density or 0.0]),
                                              np.array([denoiser.mean_span or 1.0]), split, rng, tok)
    return (np.concatenate([[tok.mode_ids[denoiser.mode]], ins, [tok.eos_id]]),
            np.concatenate([tgt, [tok.eos_id]]))


def reconstruct(inputs, targets, tok) -> np.ndarray:
    """The exact inverse of `corrupt`: (inputs, targets) -> doc. Accepts padded batch rows (pad and -100 are
    dropped: neither occurs in real content). Raises ValueError on a malformed pair."""
    inputs, targets = np.asarray(inputs, dtype=np.int64), np.asarray(targets, dtype=np.int64)
    inputs = inputs[inputs != tok.pad_id]
    targets = targets[(targets != -100) & (targets != tok.pad_id)]
    modes = set(tok.mode_ids.values())
    if len(inputs) < 2 or int(inputs[0]) not in modes or inputs[-1] != tok.eos_id:
        raise ValueError("inputs must be [mode token] + body + [eos]: these were not made by ul2.corrupt")
    if len(targets) < 1 or targets[-1] != tok.eos_id:
        raise ValueError("targets must end with eos: these were not made by ul2.corrupt")
    body, tgt = inputs[1:-1], targets[:-1]
    s0, n_sent = tok.sentinel_ids[0], len(tok.sentinel_ids)   # sentinel ids are contiguous (tokenizer.py)
    at_in = np.flatnonzero((body >= s0) & (body < s0 + n_sent))
    if len(at_in) == 0:                       # S-denoising, or a span denoiser on a 0/1-token document
        return np.concatenate([body, tgt])
    at_tgt = np.flatnonzero((tgt >= s0) & (tgt < s0 + n_sent))
    expected = s0 + np.arange(len(at_in))
    if (len(at_tgt) != len(at_in) or at_tgt[0] != 0 or (body[at_in] != expected).any()
            or (tgt[at_tgt] != expected).any()):
        raise ValueError("sentinels in inputs and targets do not match <extra_id_0>, <extra_id_1>, ... in order")
    kept = np.split(body, at_in)              # kept[0], then sentinel + kept run, per span
    spans = np.split(tgt, at_tgt[1:])         # sentinel + masked run, per span
    out = [kept[0]]
    for k, s in zip(kept[1:], spans):
        out += [s[1:], k[1:]]
    return np.concatenate(out)


def _random_segmentation(n: np.ndarray, k: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """For each row, n[i] items split into k[i] non-empty runs, all C(n-1, k-1) splits equally likely
    (T5 _random_segmentation). Needs 1 <= k <= n. Returns the run lengths, all rows concatenated (sum(k),).

    Choosing which k-1 of the n-1 gaps between items end a run = the k-1 smallest of n-1 iid uniform keys;
    one row-wise sort for the whole batch (SIMD in numpy) instead of a Python-level shuffle per document.
    """
    rows, width = len(n), int(n.max())
    keys = rng.random((rows, width))                           # (rows, width): key of the gap after item j
    keys[np.arange(width) >= (n - 1)[:, None]] = 2.0           # no gap after the last item (or past the end)
    kth = np.sort(keys, axis=1)[np.arange(rows), np.maximum(k - 2, 0)]
    ends = keys <= np.where(k >= 2, kth, -1.0)[:, None]        # float64 keys: ties have probability ~2^-53
    ends[np.arange(rows), n - 1] = True                        # the last item ends the last run
    row, col = np.nonzero(ends)                                # row-major: each row's run ends, in order
    lengths = col - np.concatenate([[-1], col[:-1]])
    first = np.cumsum(k) - k
    lengths[first] = col[first] + 1
    return lengths


def _corrupt_flat(tokens: np.ndarray, lengths: np.ndarray, is_span: np.ndarray, r: np.ndarray, mu: np.ndarray,
                  split: np.ndarray, rng: np.random.Generator, tok) -> tuple[np.ndarray, ...]:
    """Corrupt B documents at once. tokens: (N,) the documents concatenated; per row (B,): lengths, is_span
    (span corruption or S), r and mu (span rows), split = the prefix length (S rows).
    Returns (input bodies concatenated, their lengths (B,), target bodies concatenated, their lengths (B,));
    bodies exclude the mode token and eos.

    Every row is written as alternating runs keep, drop, keep, drop, ... (span rows: num_spans pairs from the
    random segmentation; S rows and span rows too short for noise: one pair (prefix, suffix)). A dropped run
    goes to the targets; for span rows each run's first token is also replaced by its sentinel on the
    other side, exactly T5's noise_span_to_unique_sentinel applied to the mask and to its complement.
    """
    noise, spans = span_counts(lengths, r, mu)
    spanned = is_span & (spans > 0)                          # rows that get sentinels
    split = np.where(is_span, lengths, split)                # span rows without noise: all kept
    pairs = np.where(spanned, spans, 1)                      # (B,) number of (keep, drop) run pairs
    first_pair = np.cumsum(pairs) - pairs
    run_len = np.zeros(2 * int(pairs.sum()), np.int64)       # (2P,) run lengths: keep, drop, keep, drop, ...
    keep_len, drop_len = run_len[0::2], run_len[1::2]        # (P,) views
    keep_len[first_pair[~spanned]] = split[~spanned]
    drop_len[first_pair[~spanned]] = (lengths - split)[~spanned]
    if spanned.any():
        n_noise, n_spans = noise[spanned], spans[spanned]
        seg = _random_segmentation(np.concatenate([lengths[spanned] - n_noise, n_noise]),
                                   np.concatenate([n_spans, n_spans]), rng)
        dst = np.repeat(first_pair[spanned], n_spans) + _ranks(n_spans)   # where each span row's pair goes
        keep_len[dst], drop_len[dst] = seg[:len(dst)], seg[len(dst):]
    run = np.repeat(np.arange(len(run_len)), run_len)                     # (N,) run of each token
    drop = (run & 1).astype(bool)
    pair = run >> 1
    sentinel = tok.sentinel_ids[0] + _ranks(pairs)                        # (P,) <extra_id_k> of pair k of its row
    starts = np.cumsum(run_len) - run_len
    pair_spanned = np.repeat(spanned, pairs)
    first_tok = np.zeros(len(tokens), bool)
    first_tok[starts[np.repeat(pair_spanned, 2)]] = True                 # first token of a run of a span row
    sent = sentinel[pair]                                                 # (N,)
    in_keep = ~drop | first_tok
    tgt_keep = drop | first_tok
    inputs = np.where(drop, sent, tokens)[in_keep]
    targets = np.where(drop, tokens, sent)[tgt_keep]
    in_len = np.where(spanned, lengths - noise + spans, split)           # kept tokens + one sentinel per span
    tgt_len = np.where(spanned, noise + spans, lengths - split)
    return inputs, in_len, targets, tgt_len


def _ranks(counts: np.ndarray) -> np.ndarray:
    """[0..c0-1, 0..c1-1, ...] without a Python loop."""
    total = int(counts.sum())
    return np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)


def _round_up_8(n: int) -> int:
    """Row lengths of a batch without fixed shapes: the longest row rounded up to a multiple of 8, so that
    batches reuse a few shapes (and matmul dimensions stay friendly to vector units and tensor cores)."""
    return -(-n // 8) * 8


_PERM_TAG, _EVAL_TAG = 0x5EED_0001, 0x5EED_0002   # keep permutation/eval streams apart from (seed, step, rank)


class UL2Batches:
    """Deterministic UL2 batches over a Sequence of documents (np int arrays without eos).

    batch(step): this rank's `batch_size` documents of global step `step` (documents
    [(step * world_size + rank) * batch_size, ... + batch_size) of the epoch stream, each epoch a permutation
    drawn from (seed, epoch)), corrupted with np.random.default_rng([seed, step, rank]).
    """

    def __init__(self, docs: Sequence, tok, mixture: str | Sequence[Denoiser] = "ul2", encoder_len: int = 512,
                 decoder_len: int = 256, batch_size: int = 8, seed: int = 0, rank: int = 0, world_size: int = 1,
                 static_shapes: bool = False, pack: bool = False):
        if len(docs) == 0:
            raise ValueError("UL2Batches got no documents: is the data split empty? (run prepare.py first)")
        if encoder_len < MIN_LEN or decoder_len < MIN_LEN:
            raise ValueError(f"encoder_len={encoder_len}, decoder_len={decoder_len}: both must be at least {MIN_LEN}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        self.docs, self.tok = docs, tok
        self.mixture = _mixture_named(mixture) if isinstance(mixture, str) else tuple(mixture)
        probs = np.array([d.prob for d in self.mixture])
        if abs(probs.sum() - 1) > 1e-6:
            raise ValueError(f"mixture probabilities sum to {probs.sum():.4f}, not 1")
        self.probs = probs / probs.sum()
        self.encoder_len, self.decoder_len, self.batch_size = encoder_len, decoder_len, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.static_shapes = static_shapes   # pad to exactly (encoder_len, decoder_len): fixed shapes for compile
        self.pack = pack                     # several examples per row (pack_examples); else one per row
        self.windows = np.array([self._max_window(d) for d in self.mixture])
        # per-denoiser columns, indexed by the denoiser drawn for each row
        self.cum_probs = np.cumsum(self.probs)
        self.mode_ids = np.array([tok.mode_ids[d.mode] for d in self.mixture])
        self.is_span = np.array([d.mode != "S" for d in self.mixture])
        self.noise_density = np.array([d.noise_density or 0.0 for d in self.mixture])
        self.mean_span = np.array([d.mean_span or 1.0 for d in self.mixture])
        self._perms: dict[int, np.ndarray] = {}

    def _max_window(self, d: Denoiser) -> int:
        """Largest document window whose corruption fits: inputs [mode] + kept + sentinels + [eos] <= encoder_len,
        targets sentinels + noise + [eos] <= decoder_len, spans <= number of sentinels. S: prefix/suffix are
        cut around the split point instead (prefix <= encoder_len - 2, suffix <= decoder_len - 1)."""
        if d.mode == "S":
            return self.encoder_len - 2 + self.decoder_len - 1
        L = np.arange(self.encoder_len + self.decoder_len + 1)    # kept + noise <= enc + dec bounds any fit
        noise, spans = span_counts(L, d.noise_density, d.mean_span)
        fits = ((L - noise + spans + 2 <= self.encoder_len) & (noise + spans + 1 <= self.decoder_len)
                & (spans <= len(self.tok.sentinel_ids)))
        window = int(np.argmin(fits)) - 1 if not fits.all() else len(L) - 1
        assert fits[:window + 1].all()   # counts grow with L, so the windows that fit are a prefix
        return window

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            perm = np.random.default_rng([self.seed, _PERM_TAG, epoch]).permutation(len(self.docs))
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}   # keep the epoch before
            self._perms[epoch] = perm
        return self._perms[epoch]

    def indices(self, step: int) -> np.ndarray:
        """Document indices of this rank's batch at `step`, in row order."""
        pos = (step * self.world_size + self.rank) * self.batch_size + np.arange(self.batch_size)
        epoch, i = np.divmod(pos, len(self.docs))
        return np.array([self._perm(int(e))[j] for e, j in zip(epoch, i)]) if epoch[0] != epoch[-1] \
            else self._perm(int(epoch[0]))[i]

    def batch(self, step: int) -> Batch:
        return self._make(self.indices(step), np.random.default_rng([self.seed, step, self.rank]))

    def eval_batches(self, n_docs: int | None = None) -> Iterator[Batch]:
        """The first n_docs documents (all by default) exactly once, in order, with the same corruption on every
        call (and whatever the world size); this rank yields batches i with i % world_size == rank."""
        n = len(self.docs) if n_docs is None else min(n_docs, len(self.docs))
        for i, start in enumerate(range(0, n, self.batch_size)):
            if i % self.world_size == self.rank:
                yield self._make(np.arange(start, min(start + self.batch_size, n)),
                                 np.random.default_rng([self.seed, _EVAL_TAG, i]))

    def _make(self, idx: np.ndarray, rng: np.random.Generator) -> Batch:
        B, tok = len(idx), self.tok
        u_which, u_split, u_crop = rng.random((3, B))
        which = np.minimum(np.searchsorted(self.cum_probs, u_which, side="right"), len(self.mixture) - 1)   # (B,)
        docs = [self.docs[i] for i in idx.tolist()]
        full = np.array([len(d) for d in docs])
        is_span = self.is_span[which]
        is_s = ~is_span
        # S: split uniformly in 1..L-1 over the whole document, then keep what fits around the split point
        split_full = np.where(full >= 2, 1 + (u_split * (full - 1)).astype(np.int64), 0)
        start = np.where(is_s, np.maximum(split_full - (self.encoder_len - 2), 0), 0)
        end = np.where(is_s, np.minimum(split_full + self.decoder_len - 1, full), full)
        # span denoisers: a uniformly placed window of the largest length that fits
        window = self.windows[which]
        crop = ~is_s & (full > window)
        start = np.where(crop, (u_crop * (full - window + 1)).astype(np.int64), start)
        end = np.where(crop, start + window, end)
        lengths = end - start
        tokens = np.concatenate([d[s:e] for d, s, e in zip(docs, start.tolist(), end.tolist())]).astype(np.int64)
        if len(tokens) and tokens.max() >= tok.pad_id:
            raise ValueError(f"a document holds id {int(tokens.max())} >= {tok.pad_id} (pad/mode/sentinel ids): "
                             f"documents must be plain text ids from the {tok.name!r} tokenizer")
        ins, in_len, tgt, tgt_len = _corrupt_flat(tokens, lengths, is_span, self.noise_density[which],
                                                  self.mean_span[which], split_full - start, rng, tok)
        eos = tok.eos_id
        enc_len, dec_len = in_len + 2, tgt_len + 1                   # [mode] + body + [eos]; body + [eos]
        enc0, dec0 = np.cumsum(enc_len) - enc_len, np.cumsum(dec_len) - dec_len   # each example's start
        inputs = np.empty(int(enc_len.sum()), np.int64)
        inputs[np.repeat(enc0 + 1, in_len) + _ranks(in_len)] = ins
        inputs[enc0], inputs[enc0 + enc_len - 1] = self.mode_ids[which], eos
        targets = np.full(int(dec_len.sum()), eos, np.int64)
        targets[np.repeat(dec0, tgt_len) + _ranks(tgt_len)] = tgt
        return pack_examples(inputs, enc_len, targets, dec_len, self.encoder_len, self.decoder_len, tok.pad_id,
                             self.static_shapes, self.pack)


def pack_examples(inputs: np.ndarray, input_lens: np.ndarray, targets: np.ndarray, target_lens: np.ndarray,
                  encoder_len: int, decoder_len: int, pad_id: int, static_shapes: bool, pack: bool = True) -> Batch:
    """(inputs, targets) examples -> the rows of a Batch. Example i, with its input_lens[i] encoder tokens
    (inputs: all examples concatenated) and its target_lens[i] labels (targets, likewise; eos included), is
    segment i + 1 of the batch on both sides, at enc_at[i] of encoder row enc_row[i] and at dec_at[i] of decoder
    row dec_row[i]. pack=True: several examples per row (T5's trim_and_pack, seqio, with the two sides packed
    apart: pack_rows), and cross_index tells every decoder row which encoder positions hold its examples'
    inputs, in its segment order (-1 after); pack=False: example i alone in row i of each side.
    Rows are encoder_len / decoder_len long with static_shapes, else as long as fit_rows finds best (one per row:
    the longest example), a multiple of 8 (cross_index: of 128, FlexAttention's key block, so that no key block
    is partial).
    One scatter per array: no per-token Python."""
    n = len(input_lens)
    if pack:
        (enc_row, enc_at, T_in), (dec_row, dec_at, T_out) = (fit_rows(input_lens, encoder_len, static_shapes),
                                                             fit_rows(target_lens, decoder_len, static_shapes))
    else:
        enc_row = dec_row = np.arange(n)
        enc_at = dec_at = np.zeros(n, np.int64)
        T_in, T_out = ((encoder_len, decoder_len) if static_shapes else
                       (min(encoder_len, _round_up_8(int(input_lens.max()))), min(decoder_len, _round_up_8(int(target_lens.max())))))
    seg = np.arange(1, n + 1)
    R_in, R_out = int(enc_row.max()) + 1, int(dec_row.max()) + 1
    at_in = np.repeat(enc_row * T_in + enc_at, input_lens) + _ranks(input_lens)       # (N_in,) flat destinations
    at_out = np.repeat(dec_row * T_out + dec_at, target_lens) + _ranks(target_lens)   # (N_out,)
    input_ids, segment_ids = np.full(R_in * T_in, pad_id, np.int64), np.zeros(R_in * T_in, np.int64)
    input_ids[at_in], segment_ids[at_in] = inputs, np.repeat(seg, input_lens)
    labels, decoder_segment_ids = np.full(R_out * T_out, -100, np.int64), np.zeros(R_out * T_out, np.int64)
    labels[at_out], decoder_segment_ids[at_out] = targets, np.repeat(seg, target_lens)
    enc = [torch.from_numpy(a.reshape(R_in, T_in)) for a in (input_ids, segment_ids)]
    labels, dseg = (torch.from_numpy(a.reshape(R_out, T_out)) for a in (labels, decoder_segment_ids))
    cross_index = None
    if pack:  # decoder row r reads its examples' encoder positions back to back, in decoder order
        order = np.lexsort((dec_at, dec_row))
        lens = input_lens[order]
        before = np.cumsum(lens) - lens                                  # encoder tokens of earlier examples
        row_start = np.r_[True, dec_row[order][1:] != dec_row[order][:-1]]
        key_at = before - np.maximum.accumulate(np.where(row_start, before, 0))   # ... in the same decoder row
        X = -(-int((key_at + lens).max()) // 128) * 128      # a whole number of FlexAttention's 128-key blocks
        index = np.full(R_out * X, -1, np.int64)
        index[np.repeat(dec_row[order] * X + key_at, lens) + _ranks(lens)] = \
            np.repeat((enc_row * T_in + enc_at)[order], lens) + _ranks(lens)
        cross_index = torch.from_numpy(index.reshape(R_out, X))
    return Batch(enc[0], enc[1], shift_right(labels, dseg, pad_id), dseg, labels, cross_index, label_positions(labels))


def fit_rows(lengths: np.ndarray, row_len: int, static_shapes: bool) -> tuple[np.ndarray, np.ndarray, int]:
    """pack_rows into rows of row_len (static_shapes: the fixed shapes a compiled step wants), or into the row
    length that leaves the fewest positions to padding, then computes the fewest attention pairs (R x T^2): a
    multiple of 8 from the longest item to row_len. A few examples fill long rows badly (4 stories in 256 /
    128 rows: 77% / 81% real); the best length fills them better (86% / 84%) for 0.3 ms of search.
    Returns per item its row and offset, and the row length."""
    if static_shapes:
        return *pack_rows(lengths, row_len), row_len
    best = None
    for T in [*range(_round_up_8(int(lengths.max())), row_len, 8), row_len]:
        row, at = pack_rows(lengths, T)
        used = min(row_len, _round_up_8(int((at + lengths).max())))   # (the fullest row may fall short of T)
        cost = ((int(row.max()) + 1) * used, (int(row.max()) + 1) * used ** 2)
        if best is None or cost < best[0]:
            best = cost, row, at, used
    return best[1], best[2], best[3]


def pack_rows(lengths: np.ndarray, row_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Pack items of lengths[i] tokens into as few rows of row_len as best-fit decreasing finds (at most
    11/9 of the fewest possible plus a few, Johnson 1973): the longest first, each into the fullest row it
    fits in, or a new row.
    The encoder and decoder sides are packed apart: UL2's mixture puts 1.6 input tokens per target token
    on the bundled sample (R-denoising 4.7, X 1.5, S 1.0), so rows that had to hold the same examples on
    both sides would fill the encoder to at most 1.6 / 2 of the decoder at 512 / 256, whatever the algorithm.
    Deterministic (stable order, first best row). Returns per item: row, offset in the row."""
    if len(lengths) and lengths.max() > row_len:
        raise ValueError(f"an example of {int(lengths.max())} tokens does not fit a row of {row_len}")
    row, at = np.zeros(len(lengths), np.int64), np.zeros(len(lengths), np.int64)
    used: list[int] = []                             # per row (plain Python: ~20 rows, faster than numpy calls)
    for i in np.argsort(-lengths, kind="stable").tolist():
        n = int(lengths[i])
        best, least = len(used), row_len - n + 1
        for r, u in enumerate(used):
            if 0 <= row_len - u - n < least:
                best, least = r, row_len - u - n
        if best == len(used):
            used.append(0)
        row[i], at[i] = best, used[best]
        used[best] += n
    return row, at


def continuation_batches(docs: Sequence, tok, batch_size: int, n_docs: int | None = None, rank: int = 0,
                         world_size: int = 1) -> Iterator[Batch]:
    """The continuation-loss evaluation: every document split at half its tokens, in the S-denoiser's format,

        inputs  [S] + doc[:L // 2] + [eos]        targets  doc[L // 2:] + [eos]

    so that the loss on the targets says how well the model continues a story it has read half of. Completing
    the beginnings of held-out stories is how TinyStories compares its models (Eldan & Li 2023, sec. 3, graded
    there by GPT-4); the likelihood of the true ending is the automatic form of it. Unlike eval_batches there
    is no randomness and no cropping: the first n_docs documents (all by default) whole, whatever windows the
    run trains with, so runs with different windows compare. They are batched in order of length, one per row:
    on the sample's 966 validation stories that leaves 6% of the positions to padding, and SDPA computes half
    the attention pairs that packing them (into 256 / 128 rows: 89% / 76% real) would. This rank yields
    batches i with i % world_size == rank. The mean over the targets does not depend on the batching."""
    n = len(docs) if n_docs is None else min(n_docs, len(docs))
    lengths = np.array([len(docs[i]) for i in range(n)], dtype=np.int64)
    order = np.argsort(lengths, kind="stable")
    for i, start in enumerate(range(0, n, batch_size)):
        if i % world_size != rank:
            continue
        rows = [np.asarray(docs[j], dtype=np.int64) for j in order[start:start + batch_size].tolist()]
        if any(len(d) and d.max() >= tok.pad_id for d in rows):
            raise ValueError(f"a document holds an id >= {tok.pad_id} (pad/mode/sentinel ids): documents must be "
                             f"plain text ids from the {tok.name!r} tokenizer")
        half = [len(d) // 2 for d in rows]
        inputs = [np.concatenate([[tok.mode_ids["S"]], d[:h], [tok.eos_id]]) for d, h in zip(rows, half)]
        targets = [np.concatenate([d[h:], [tok.eos_id]]) for d, h in zip(rows, half)]
        in_len, tgt_len = np.array([len(x) for x in inputs]), np.array([len(y) for y in targets])
        yield pack_examples(np.concatenate(inputs), in_len, np.concatenate(targets), tgt_len, int(in_len.max()),
                            int(tgt_len.max()), tok.pad_id, static_shapes=False, pack=False)
