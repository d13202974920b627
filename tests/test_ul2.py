"""ul2.py on real TinyStories from data/sample/stories.txt, tokenized with the real (Mistral) tokenizer."""
from __future__ import annotations

import os
import sys
from collections import Counter
from functools import lru_cache

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ul2  # noqa: E402
from batch import Batch  # noqa: E402
from tokenizer import get_tokenizer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPAN_DENOISERS = [d for d in ul2.MIXTURE if d.mode != "S"]


@lru_cache(maxsize=None)
def stories() -> tuple[np.ndarray, ...]:
    with open(os.path.join(ROOT, "data", "sample", "stories.txt"), encoding="utf-8") as f:
        texts = [t.strip() for t in f.read().split("<|endoftext|>") if t.strip()]
    return tuple(np.array(ids, dtype=np.uint16) for ids in get_tokenizer().encode(texts))


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer()


@pytest.fixture(scope="module")
def docs():
    return stories()


def long_text(docs, length: int, rng: np.random.Generator) -> np.ndarray:
    """A window of `length` tokens of real stories laid end to end, starting at a random story."""
    start = int(rng.integers(len(docs)))
    out = np.concatenate(docs[start:start + 4 * length // 100 + 2] + docs[:4 * length // 100 + 2])
    return out[:length]


def check_format(inputs, targets, denoiser, tok):
    sentinels = set(tok.sentinel_ids)
    assert inputs[0] == tok.mode_ids[denoiser.mode] and inputs[-1] == tok.eos_id and targets[-1] == tok.eos_id
    in_sent = [int(t) for t in inputs if t in sentinels]
    tgt_sent = [int(t) for t in targets if t in sentinels]
    assert in_sent == tgt_sent == tok.sentinel_ids[:len(in_sent)]   # <extra_id_0>, <extra_id_1>, ... in order
    if in_sent:
        assert inputs[1] not in sentinels        # T5 mask: starts with kept tokens ...
        assert inputs[-2] in sentinels           # ... and ends with a noise span
        assert targets[0] == tok.sentinel_ids[0]
    return len(in_sent)


def test_mixture_definitions():
    mix = {d.name: d for d in ul2.mixture("ul2")}
    assert ul2.MIXTURE == ul2.mixture("ul2")
    assert {(d.mean_span, d.noise_density) for d in mix.values() if d.mode == "R"} == {(3, 0.15), (8, 0.15)}
    assert {(d.mean_span, d.noise_density) for d in mix.values() if d.mode == "X"} == \
        {(3, 0.5), (8, 0.5), (64, 0.15), (64, 0.5)}
    assert mix["S"].mean_span is None and mix["S"].noise_density is None
    by_mode = Counter()
    for d in ul2.MIXTURE:
        by_mode[d.mode] += d.prob
    assert by_mode == pytest.approx({"R": 0.25, "X": 0.25, "S": 0.5})
    assert [(d.mode, d.mean_span, d.noise_density, d.prob) for d in ul2.mixture("t5")] == [("R", 3, 0.15, 1.0)]
    assert [(d.mode, d.prob) for d in ul2.mixture("prefix_lm")] == [("S", 1.0)]
    with pytest.raises(ValueError, match="unknown mixture"):
        ul2.mixture("bert")


@pytest.mark.parametrize("denoiser", ul2.MIXTURE, ids=lambda d: d.name)
def test_round_trip_every_denoiser(denoiser, docs, tok):
    rng = np.random.default_rng(0)
    for i in rng.choice(len(docs), 300, replace=False):
        doc = docs[i]
        inputs, targets = ul2.corrupt(doc, denoiser, np.random.default_rng(int(rng.integers(1 << 30))), tok)
        n_spans = check_format(inputs, targets, denoiser, tok)
        if denoiser.mode == "S":
            assert n_spans == 0 and len(inputs) >= 3 and len(targets) >= 2   # both sides non-empty
        else:
            noise, spans = ul2.span_counts(len(doc), denoiser.noise_density, denoiser.mean_span)
            assert n_spans == spans and len(targets) == noise + spans + 1
        np.testing.assert_array_equal(ul2.reconstruct(inputs, targets, tok), doc)


@pytest.mark.parametrize("denoiser", SPAN_DENOISERS, ids=lambda d: d.name)
def test_noise_density_and_mean_span(denoiser, docs, tok):
    """Over many real windows the masked fraction is r and the mean span mu (10%); windows long enough that
    rounding num_spans doesn't dominate: 512 tokens, 4096 for mu = 64."""
    L = 4096 if denoiser.mean_span == 64 else 512
    rng = np.random.default_rng(1)
    noise = spans = 0
    span_lengths = []
    for _ in range(100):
        doc = long_text(docs, L, rng)
        inputs, targets = ul2.corrupt(doc, denoiser, rng, tok)
        is_sent = np.isin(targets[:-1], tok.sentinel_ids)
        starts = np.flatnonzero(is_sent)
        span_lengths += list(np.diff(np.append(starts, len(targets) - 1)) - 1)
        spans += len(starts)
        noise += len(targets) - 1 - len(starts)
    assert noise / (100 * L) == pytest.approx(denoiser.noise_density, rel=0.1)
    assert noise / spans == pytest.approx(denoiser.mean_span, rel=0.1)
    assert min(span_lengths) >= 1 and np.std(span_lengths) > 0   # random lengths, never an empty span


def test_random_segmentation_is_uniform():
    """All C(n-1, k-1) ways to cut n items into k non-empty runs are equally likely (T5 _random_segmentation)."""
    rng = np.random.default_rng(2)
    rows = 20000
    lengths = ul2._random_segmentation(np.full(rows, 6), np.full(rows, 3), rng).reshape(rows, 3)
    assert (lengths.sum(1) == 6).all() and (lengths >= 1).all()
    counts = Counter(map(tuple, lengths))
    assert len(counts) == 10                                    # C(5, 2)
    for c in counts.values():
        assert c == pytest.approx(rows / 10, rel=0.1)
    # mixed rows in one call, with k = 1 and k = n as edge cases
    n, k = np.array([1, 7, 5, 9, 4]), np.array([1, 1, 5, 3, 2])
    out = ul2._random_segmentation(n, k, rng)
    parts = np.split(out, np.cumsum(k)[:-1])
    assert [p.sum() for p in parts] == n.tolist() and [len(p) for p in parts] == k.tolist()
    assert parts[1].tolist() == [7] and parts[2].tolist() == [1] * 5


@pytest.mark.parametrize("denoiser", ul2.MIXTURE, ids=lambda d: d.name)
def test_short_documents(denoiser, docs, tok):
    """Lengths 0, 1, 2 and documents shorter than one mean span: defined output, exact round trip."""
    doc = docs[0]
    mode, eos, s0 = tok.mode_ids[denoiser.mode], tok.eos_id, tok.sentinel_ids[0]
    for L in [0, 1, 2, 3, 5, 7, 20]:
        for seed in range(20):
            inputs, targets = ul2.corrupt(doc[:L], denoiser, np.random.default_rng(seed), tok)
            check_format(inputs, targets, denoiser, tok)
            np.testing.assert_array_equal(ul2.reconstruct(inputs, targets, tok), doc[:L])
    d = [int(t) for t in doc[:2]]
    run = lambda L: [a.tolist() for a in ul2.corrupt(doc[:L], denoiser, np.random.default_rng(0), tok)]  # noqa: E731
    if denoiser.mode == "S":
        assert run(0) == [[mode, eos], [eos]]
        assert run(1) == [[mode, eos], [d[0], eos]]
        assert run(2) == [[mode, d[0], eos], [d[1], eos]]
    else:   # no room for noise and kept tokens below 2 tokens (as in T5): passes through whole
        assert run(0) == [[mode, eos], [eos]]
        assert run(1) == [[mode, d[0], eos], [eos]]
        assert run(2) == [[mode, d[0], s0, eos], [s0, d[1], eos]]


def test_prefix_lm_split_is_uniform(docs, tok):
    """S-denoising: the prefix length is uniform on 1..L-1, in corrupt and in batches (where documents this
    short are never cropped)."""
    s = ul2.mixture("prefix_lm")[0]
    rng = np.random.default_rng(5)
    doc = docs[0][:101]
    prefix = np.array([len(ul2.corrupt(doc, s, rng, tok)[0]) - 2 for _ in range(8000)])
    assert prefix.min() == 1 and prefix.max() == 100
    assert np.histogram(prefix, bins=4, range=(0.5, 100.5))[0] / 8000 == pytest.approx([0.25] * 4, abs=0.025)
    batches = ul2.UL2Batches(docs, tok, mixture="prefix_lm", batch_size=64)
    frac = []
    for step in range(40):
        b, idx = batches.batch(step), batches.indices(step)
        L = np.array([len(docs[i]) for i in idx])
        frac += list(((b.segment_ids > 0).sum(1).numpy() - 2 - 0.5) / (L - 1))   # prefix of 1..L-1 -> (0, 1)
    assert np.histogram(frac, bins=4, range=(0, 1))[0] / len(frac) == pytest.approx([0.25] * 4, abs=0.03)


def test_corrupt_refuses_more_spans_than_sentinels(docs, tok):
    x3 = next(d for d in ul2.MIXTURE if d.name == "X(3,0.5)")
    doc = long_text(docs, 2000, np.random.default_rng(3))      # round(1000 / 3) = 333 spans > 252 sentinels
    with pytest.raises(ValueError, match="sentinels"):
        ul2.corrupt(doc, x3, np.random.default_rng(0), tok)


def test_reconstruct_rejects_malformed(docs, tok):
    inputs, targets = ul2.corrupt(docs[5], SPAN_DENOISERS[0], np.random.default_rng(0), tok)
    with pytest.raises(ValueError, match="mode token"):
        ul2.reconstruct(inputs[1:], targets, tok)
    with pytest.raises(ValueError, match="eos"):
        ul2.reconstruct(inputs, targets[:-1], tok)
    with pytest.raises(ValueError, match="sentinels"):
        ul2.reconstruct(inputs, targets[1:], tok)


@pytest.mark.parametrize("lengths", [(512, 256), (512, 512), (64, 32), (4096, 4096)])
def test_windows_fit_exactly(lengths, docs, tok):
    """The crop window of each span denoiser is the largest whose inputs fit encoder_len, targets fit
    decoder_len and spans fit the sentinels; one more token would not fit."""
    enc, dec = lengths
    batches = ul2.UL2Batches(docs, tok, encoder_len=enc, decoder_len=dec)
    text = long_text(docs, enc + dec + 2, np.random.default_rng(4))
    for d, w in zip(batches.mixture, batches.windows):
        if d.mode == "S":
            continue
        inputs, targets = ul2.corrupt(text[:w], d, np.random.default_rng(0), tok)
        assert len(inputs) <= enc and len(targets) <= dec
        noise, spans = ul2.span_counts(w + 1, d.noise_density, d.mean_span)
        assert (w + 1 - noise + spans + 2 > enc) or (noise + spans + 1 > dec) or spans > len(tok.sentinel_ids)
        assert ul2.span_counts(w, d.noise_density, d.mean_span)[1] <= len(tok.sentinel_ids)


def test_sentinels_suffice_at_configured_lengths(docs, tok):
    """At encoder_len 512 no denoiser's window needs more sentinels than the tokenizer has, whatever the
    decoder length (the most: X(3,0.5), 2 + L/2 + L/6 <= 512 -> 128 spans)."""
    for dec in (128, 256, 512, 1024):
        b = ul2.UL2Batches(docs, tok, encoder_len=512, decoder_len=dec)
        for d, w in zip(b.mixture, b.windows):
            if d.mode != "S":
                assert ul2.span_counts(w, d.noise_density, d.mean_span)[1] <= min(128, len(tok.sentinel_ids))


def same(a: Batch, b: Batch) -> bool:
    return all(p is q if p is None or q is None else torch.equal(p, q) for p, q in zip(a, b))


def check_rows(batch: Batch, batches: ul2.UL2Batches, idx: np.ndarray, docs, tok):
    """One example per row (pack=False): example r in row r of each side, as segment r + 1."""
    enc, dec = batches.encoder_len, batches.decoder_len
    ids, seg, dec_in, dseg, labels = batch[:5]
    assert batch.cross_index is None and all(t.dtype == torch.long for t in batch[:5])
    B = len(idx)
    assert ids.shape[0] == labels.shape[0] == B and ids.shape == seg.shape and dec_in.shape == labels.shape == dseg.shape
    assert ids.shape[1] <= enc and labels.shape[1] <= dec
    if not batches.static_shapes:
        assert ids.shape[1] % 8 == 0 or ids.shape[1] == enc
        assert labels.shape[1] % 8 == 0 or labels.shape[1] == dec
    assert torch.isin(ids[:, 0], torch.tensor(list(tok.mode_ids.values()))).all()
    assert torch.equal(seg > 0, ids != tok.pad_id) and torch.equal(dseg > 0, labels != -100)
    assert torch.equal(seg.max(1).values, torch.arange(1, B + 1)) and torch.equal(dseg.max(1).values, torch.arange(1, B + 1))
    # pad only after the content; eos last
    in_len, tgt_len = (seg > 0).sum(1), (labels != -100).sum(1)
    pos_in, pos_out = torch.arange(ids.shape[1]), torch.arange(labels.shape[1])
    assert torch.equal(seg > 0, pos_in < in_len[:, None])
    assert torch.equal(labels != -100, pos_out < tgt_len[:, None])
    assert (ids[torch.arange(B), in_len - 1] == tok.eos_id).all()
    assert (labels[torch.arange(B), tgt_len - 1] == tok.eos_id).all()
    assert not torch.isin(labels[labels != -100], torch.tensor([tok.pad_id])).any()
    # decoder inputs = the labels one step right, after the start token (pad); pad after the targets
    for r, n in enumerate(tgt_len.tolist()):
        assert dec_in[r, 0] == tok.pad_id and torch.equal(dec_in[r, 1:n], labels[r, :n - 1])
        assert (dec_in[r, n:] == tok.pad_id).all()
    # every row is the corruption of a contiguous window of the document it was drawn from
    for row, i in enumerate(idx):
        window = ul2.reconstruct(ids[row].numpy(), labels[row].numpy(), tok)
        doc = np.asarray(docs[i], dtype=np.int64)
        assert 0 < len(window) <= len(doc) or len(doc) == 0
        starts = np.flatnonzero(doc[:len(doc) - len(window) + 1] == window[0]) if len(window) else [0]
        assert any(np.array_equal(doc[s:s + len(window)], window) for s in starts)
        if len(doc) <= min(enc, dec) - 2:          # short enough for every denoiser: never cropped
            assert len(window) == len(doc)


@pytest.mark.parametrize("lengths", [(512, 256), (64, 32), (48, 128)])
def test_batches_respect_lengths_and_format(lengths, docs, tok):
    enc, dec = lengths
    for static in (False, True):
        batches = ul2.UL2Batches(docs, tok, encoder_len=enc, decoder_len=dec, batch_size=16, seed=7,
                                 static_shapes=static)
        for step in range(12):
            batch = batches.batch(step)
            if static:
                assert batch.input_ids.shape == (16, enc) and batch.labels.shape == (16, dec)
            check_rows(batch, batches, batches.indices(step), docs, tok)


def test_mixture_frequencies_in_batches(docs, tok):
    batches = ul2.UL2Batches(docs, tok, batch_size=64, seed=3)
    first = torch.cat([batches.batch(s).input_ids[:, 0] for s in range(100)])   # 6400 draws
    freq = {m: (first == i).float().mean().item() for m, i in tok.mode_ids.items()}
    assert freq == pytest.approx({"R": 0.25, "X": 0.25, "S": 0.5}, abs=0.03)
    for name, mode in [("t5", "R"), ("prefix_lm", "S")]:
        b = ul2.UL2Batches(docs, tok, mixture=name, batch_size=32)
        assert (b.batch(0).input_ids[:, 0] == tok.mode_ids[mode]).all()


def test_determinism_and_ranks(docs, tok):
    kw = dict(encoder_len=128, decoder_len=64, batch_size=8, seed=11)
    a, b = ul2.UL2Batches(docs, tok, **kw), ul2.UL2Batches(docs, tok, **kw)
    for step in (0, 3, 1000):
        assert same(a.batch(step), b.batch(step))
        assert same(a.batch(step), a.batch(step))
    assert not torch.equal(a.batch(0).input_ids[:, :8], a.batch(1).input_ids[:, :8])
    other_seed = ul2.UL2Batches(docs, tok, **{**kw, "seed": 12})
    assert not np.array_equal(other_seed.indices(0), a.indices(0))
    r0 = ul2.UL2Batches(docs, tok, **kw, rank=0, world_size=2)
    r1 = ul2.UL2Batches(docs, tok, **kw, rank=1, world_size=2)
    for step in range(5):
        assert not set(r0.indices(step)) & set(r1.indices(step))       # ranks see different documents
        check_rows(r1.batch(step), r1, r1.indices(step), docs, tok)


def test_epochs_cover_every_document_once(docs, tok):
    subset = docs[:100]
    world, bs = 3, 8                       # 24 documents per step: epochs end mid-step
    ranks = [ul2.UL2Batches(subset, tok, batch_size=bs, rank=r, world_size=world) for r in range(world)]
    seen = np.concatenate([b.indices(s) for s in range(25) for b in ranks])   # 600 documents = 6 epochs
    epochs = seen.reshape(6, 100)
    for e in epochs:
        assert sorted(e.tolist()) == list(range(100))
    assert not np.array_equal(epochs[0], epochs[1])   # a fresh permutation each epoch


def test_eval_batches_fixed_and_in_order(docs, tok):
    batches = ul2.UL2Batches(docs, tok, encoder_len=128, decoder_len=64, batch_size=8, seed=1234)
    first = list(batches.eval_batches(20))
    again = list(ul2.UL2Batches(docs, tok, encoder_len=128, decoder_len=64, batch_size=8, seed=1234).eval_batches(20))
    assert [len(b.input_ids) for b in first] == [8, 8, 4]
    for x, y in zip(first, again):
        assert same(x, y)
    for k, batch in enumerate(first):
        check_rows(batch, batches, np.arange(8 * k, min(8 * k + 8, 20)), docs, tok)
    # two ranks split the batches between them and together see the same ones
    split = [list(ul2.UL2Batches(docs, tok, encoder_len=128, decoder_len=64, batch_size=8, seed=1234, rank=r,
                                 world_size=2).eval_batches(20)) for r in range(2)]
    assert [len(s) for s in split] == [2, 1]
    for x, y in zip([split[0][0], split[1][0], split[0][1]], first):
        assert same(x, y)


def test_bad_inputs_raise_clear_errors(docs, tok):
    with pytest.raises(ValueError, match="no documents"):
        ul2.UL2Batches([], tok)
    with pytest.raises(ValueError, match="at least 8"):
        ul2.UL2Batches(docs, tok, encoder_len=4)
    with pytest.raises(ValueError, match="rank"):
        ul2.UL2Batches(docs, tok, rank=2, world_size=2)
    bad = [np.concatenate([docs[0], [tok.sentinel_ids[0]]])]
    with pytest.raises(ValueError, match="plain text ids"):
        ul2.UL2Batches(bad, tok, batch_size=1).batch(0)


@lru_cache(maxsize=None)
def validation_stories() -> tuple[np.ndarray, ...]:
    """The first 100 genuine validation stories (data/sample/valid.txt)."""
    with open(os.path.join(ROOT, "data", "sample", "valid.txt"), encoding="utf-8") as f:
        texts = [t.strip() for t in f.read().split("<|endoftext|>") if t.strip()][:100]
    return tuple(np.array(ids, dtype=np.uint16) for ids in get_tokenizer().encode(texts))


def test_continuation_batches_reconstruct_the_stories(tok):
    """[S] + first half + eos -> second half + eos, every story exactly once and whole (no cropping), one per
    row, in order of length, whatever the batch size; the 0-, 1- and 2-token prefixes of a real story too."""
    val = validation_stories()
    docs = list(val[:37]) + [val[37][:0], val[38][:1], val[39][:2]]
    seen = []
    lengths = []
    for batch in ul2.continuation_batches(docs, tok, batch_size=8):
        seg, dseg = batch.segment_ids, batch.decoder_segment_ids
        assert batch.cross_index is None and len(seg) == int(seg.max()) - int(seg[seg > 0].min()) + 1  # one per row
        lengths += (seg > 0).sum(1).tolist()
        assert torch.equal(seg > 0, batch.input_ids != tok.pad_id) and torch.equal(dseg > 0, batch.labels != -100)
        for k in range(1, int(seg.max()) + 1):
            inputs, labels, dec_in = batch.input_ids[seg == k], batch.labels[dseg == k], batch.decoder_input_ids[dseg == k]
            doc = ul2.reconstruct(inputs.numpy(), labels.numpy(), tok)
            assert inputs[0] == tok.mode_ids["S"] and inputs[-1] == tok.eos_id and len(inputs) == len(doc) // 2 + 2
            assert len(labels) == len(doc) - len(doc) // 2 + 1   # the second half and eos
            assert dec_in[0] == tok.pad_id and torch.equal(dec_in[1:], labels[:-1])
            seen.append(tuple(doc.tolist()))
    assert sorted(seen) == sorted(tuple(d.tolist()) for d in docs)
    assert lengths == sorted(lengths) and max(len(d) for d in docs) > 300   # in order; long stories stay whole
    # a prefix of the documents, split between two ranks: together the same batches as one rank
    one = list(ul2.continuation_batches(docs, tok, 8, n_docs=30))
    two = [list(ul2.continuation_batches(docs, tok, 8, n_docs=30, rank=r, world_size=2)) for r in range(2)]
    assert [len(one), len(two[0]), len(two[1])] == [4, 2, 2]
    for x, y in zip([two[0][0], two[1][0], two[0][1], two[1][1]], one):
        assert same(x, y)
    assert sum(int(b.segment_ids.max()) for b in one) == 30
    bad = [np.concatenate([docs[0], [tok.sentinel_ids[0]]])]
    with pytest.raises(ValueError, match="plain text ids"):
        next(ul2.continuation_batches(bad, tok, 1))
