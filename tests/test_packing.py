"""Packed rows (several UL2 examples per row, segment ids): the batch builder keeps every example once and
whole, the model keeps every attention inside its segment, and the loss and gradients are those of the same
examples run one per row -- for every variant, with SDPA and with FlexAttention. Tiny fp32 models on the real
bundled sample (data/sample, TinyStories)."""
import os

import numpy as np
import pytest
import torch

import model as model_py
import prepare
import ul2
from model import ROT5, segment_positions
from test_model import VARIANTS, tiny
from tokenizer import get_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def docs_tok():
    prepare.prepare("sample", workers=1)
    return prepare.load_documents(os.path.join(ROOT, "data", "sample"), "train"), get_tokenizer()


def pair(docs, tok, step: int = 0, n: int = 12, enc: int = 384, dec: int = 192, **kw) -> tuple[ul2.Batch, ul2.Batch]:
    """The same micro-batch (same documents, same corruption) one example per row and packed."""
    make = lambda pack: ul2.UL2Batches(docs, tok, "ul2", enc, dec, n, seed=5, pack=pack, **kw).batch(step)
    return make(False), make(True)


def examples(batch: ul2.Batch) -> list[tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """Every example of a batch as (inputs, decoder inputs, labels), sorted: comparable across layouts."""
    out = []
    for r in range(len(batch.input_ids)):
        if batch.segment_ids is None:
            enc, dec = [batch.attention_mask[r] > 0], [batch.labels[r] != -100]
        else:
            n = int(batch.segment_ids[r].max())
            enc = [batch.segment_ids[r] == k for k in range(1, n + 1)]
            dec = [batch.decoder_segment_ids[r] == k for k in range(1, n + 1)]
        for e, d in zip(enc, dec):
            out.append(tuple(tuple(t[m].tolist()) for t, m in
                             ((batch.input_ids[r], e), (batch.decoder_input_ids[r], d), (batch.labels[r], d))))
    return sorted(out)


# ---------------------------------------------------------------------------------------------------------
# The batch builder


@pytest.mark.parametrize("static_shapes", [False, True])
def test_packed_rows_hold_the_same_examples(docs_tok, static_shapes):
    docs, tok = docs_tok
    for step in range(4):
        plain, packed = pair(docs, tok, step, static_shapes=static_shapes)
        assert examples(packed) == examples(plain)     # each example once, whole, in the same format
        assert len(packed.input_ids) < len(plain.input_ids)
        seg, dseg = packed.segment_ids, packed.decoder_segment_ids
        assert torch.equal(packed.attention_mask, (seg > 0).long()) and torch.equal(packed.labels != -100, dseg > 0)
        for s in (seg, dseg):  # segments 1, 2, ... contiguous from the row start, padding after
            ends = torch.cat([s[:, 1:] != s[:, :-1], torch.ones_like(s[:, :1], dtype=torch.bool)], 1)
            assert (ends.sum(1) == s.max(1).values + (s[:, -1] == 0)).all()
            assert (s[:, 1:] >= s[:, :-1]).logical_or(s[:, 1:] == 0).all()
        # every segment reconstructs a window of one of the micro-batch's documents (ul2.reconstruct)
        for r in range(len(seg)):
            for k in range(1, int(seg[r].max()) + 1):
                doc = ul2.reconstruct(packed.input_ids[r][seg[r] == k].numpy(),
                                      packed.labels[r][dseg[r] == k].numpy(), tok)
                assert len(doc) > 0
        if static_shapes:
            assert packed.input_ids.shape[1] == 384 and packed.labels.shape[1] == 192


def test_pack_rows_respects_both_lengths_and_fills_rows():
    rng = np.random.default_rng(0)
    enc, dec = rng.integers(2, 300, 200), rng.integers(2, 150, 200)
    row, enc_at, dec_at, seg = ul2.pack_rows(enc, dec, 512, 256)
    for r in range(row.max() + 1):
        mine = np.flatnonzero(row == r)
        order = mine[np.argsort(seg[mine])]
        assert (seg[order] == np.arange(1, len(mine) + 1)).all()
        assert (enc_at[order] == np.cumsum(enc[order]) - enc[order]).all()   # back to back, in segment order
        assert (dec_at[order] == np.cumsum(dec[order]) - dec[order]).all()
        assert enc[mine].sum() <= 512 and dec[mine].sum() <= 256
    # no two rows could be merged: the packing is not wasteful in the obvious way
    used_e, used_d = np.bincount(row, enc), np.bincount(row, dec)
    merge = (used_e[:, None] + used_e[None] <= 512) & (used_d[:, None] + used_d[None] <= 256)
    np.fill_diagonal(merge, False)
    assert not merge.any()


def test_packing_fills_rot5_mini_rows(docs_tok):
    """The real-token fraction at config/rot5_mini.py's row lengths (fixed shapes, as compiled). The decoder
    side binds: UL2's targets are ~2/3 as long as its inputs, the rows 1/2 (bench.py section g reports it)."""
    docs, tok = docs_tok
    plain = ul2.UL2Batches(docs, tok, "ul2", 512, 256, 64, seed=0, static_shapes=True)
    packed = ul2.UL2Batches(docs, tok, "ul2", 512, 256, 64, seed=0, static_shapes=True, pack=True)
    fill = lambda b: ((b.labels != -100).float().mean().item(), b.attention_mask.float().mean().item())
    (dec_plain, enc_plain), (dec_packed, enc_packed) = (np.mean([fill(b.batch(s)) for s in range(4)], 0)
                                                        for b in (plain, packed))
    assert dec_packed > 0.8 and enc_packed > 0.6                            # (measured 0.87 / 0.69)
    assert dec_packed > 2 * dec_plain and enc_packed > 2 * enc_plain         # (from 0.33 / 0.26)


def test_segment_positions_restart_in_every_segment():
    seg = torch.tensor([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    assert segment_positions(seg).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1], list(range(8))]


# ---------------------------------------------------------------------------------------------------------
# The model


def grads_of(model, batch, padded_layout: bool, monkeypatch) -> tuple:
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: padded_layout)  # the layout compile keeps
    model.zero_grad()
    out = model(*batch)
    (out.loss + out.aux_loss + out.z_loss).backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("variant", VARIANTS)
def test_packed_loss_and_gradients_equal_one_example_per_row(docs_tok, variant, monkeypatch):
    """One loss over the same label tokens, MoE statistics over the same real tokens: packing changes only the
    order of fp32 sums (other matmul shapes and attention row lengths). Each sum of n terms then moves by
    about sqrt(n) unit roundoffs (6e-8) relative to its terms' magnitude; through a few layers that stays
    near 1e-6 relative, so the loss is compared at 1e-5 and every gradient tensor by the norm of its
    difference at 1e-4 of its own norm (an elementwise bound would fail on entries that cancel to ~0). A
    token attending across segments, or one position or bias off, moves them by percent."""
    docs, tok = docs_tok
    plain, packed = pair(docs, tok)
    assert int(packed.segment_ids.max()) > 1                  # rows really hold several examples
    torch.manual_seed(0)
    model = ROT5(tiny(**VARIANTS[variant], vocab_size=tok.vocab_size, pad_token_id=tok.pad_id,
                      eos_token_id=tok.eos_id))
    ref, ref_grads = grads_of(model, plain, False, monkeypatch)
    for padded_layout in (False, True):
        out, grads = grads_of(model, packed, padded_layout, monkeypatch)
        assert out.loss.item() == pytest.approx(ref.loss.item(), rel=1e-5)
        for name in ("aux_loss", "z_loss"):
            assert getattr(out, name).item() == pytest.approx(getattr(ref, name).item(), rel=1e-5, abs=1e-9)
        if ref.expert_load is not None:  # fractions of the same tokens: counts, exact
            torch.testing.assert_close(out.expert_load, ref.expert_load, rtol=0, atol=1e-6)
        assert grads.keys() == ref_grads.keys()
        for n, g in grads.items():
            assert (g - ref_grads[n]).norm() <= 1e-4 * ref_grads[n].norm() + 1e-12, n


def perturb_one_example(batch: ul2.Batch, tok, row: int, seg: int) -> ul2.Batch:
    """The same batch with example `seg` of `row` given other (real, non-special) tokens on both sides."""
    g = torch.Generator().manual_seed(1)
    input_ids, dec = batch.input_ids.clone(), batch.decoder_input_ids.clone()
    for ids, s in ((input_ids, batch.segment_ids), (dec, batch.decoder_segment_ids)):
        at = (s[row] == seg).nonzero().squeeze(1)[1:]  # keep the mode / start token
        ids[row, at] = torch.randint(100, 30000, (len(at),), generator=g)
    return batch._replace(input_ids=input_ids, decoder_input_ids=dec)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("flex", [False, True])
def test_no_token_attends_across_segments(docs_tok, variant, flex, monkeypatch):
    """Change every token of one example: the logits of every other example of its row stay put (encoder
    self-, decoder self- and cross-attention all keep to their segment), its own change. SDPA (the eager path)
    and FlexAttention (the compiled GPU path; forward only: it has no CPU backward) agree on the packed batch.
    Masked scores add exact zeros; only MoE's re-sorted expert batches can round differently: 1e-5."""
    docs, tok = docs_tok
    _, packed = pair(docs, tok)
    row = int(packed.segment_ids.max(1).values.argmax())      # a row with several examples
    torch.manual_seed(0)
    model = ROT5(tiny(**VARIANTS[variant], vocab_size=tok.vocab_size, pad_token_id=tok.pad_id,
                      eos_token_id=tok.eos_id)).eval()
    logits = lambda b: model(b.input_ids, b.attention_mask, b.decoder_input_ids, None, b.segment_ids,
                             b.decoder_segment_ids).logits
    with torch.no_grad():
        sdpa = logits(packed)
        monkeypatch.setattr(model_py, "FLEX_ATTENTION", flex)
        a, b = logits(packed), logits(perturb_one_example(packed, tok, row, 1))
    torch.testing.assert_close(a, sdpa, rtol=1e-5, atol=1e-5)
    dseg = packed.decoder_segment_ids
    others, mine = (dseg > 0) & ~((dseg == 1) & (torch.arange(len(dseg)) == row)[:, None]), dseg[row] == 1
    torch.testing.assert_close(a[others], b[others], rtol=1e-5, atol=1e-5)
    assert (a[row][mine] - b[row][mine]).abs().max() > 1e-2


def test_compiled_flex_attention_equals_eager_sdpa(docs_tok, monkeypatch):
    """torch.compile's FlexAttention kernels (what a GPU run uses) on the CPU, forward: the T5 bias as a
    score_mod, GQA, the three segment masks -- the same logits as eager SDPA, and still no leak across
    segments. Compiling takes a minute on 2 cores: one variant, T5 bias + GQA (the score_mod path)."""
    docs, tok = docs_tok
    _, packed = pair(docs, tok, n=6, enc=256, dec=128)
    row = int(packed.segment_ids.max(1).values.argmax())
    torch.manual_seed(0)
    model = ROT5(tiny(n_kv_heads=2, vocab_size=tok.vocab_size, pad_token_id=tok.pad_id,
                      eos_token_id=tok.eos_id)).eval()
    args = lambda b: (b.input_ids, b.attention_mask, b.decoder_input_ids, None, b.segment_ids, b.decoder_segment_ids)
    with torch.no_grad():
        eager = model(*args(packed)).logits
        monkeypatch.setattr(model_py, "FLEX_ATTENTION", True)
        compiled = torch.compile(model)
        a, b = compiled(*args(packed)).logits, compiled(*args(perturb_one_example(packed, tok, row, 1))).logits
    dseg = packed.decoder_segment_ids
    real = dseg > 0   # (compiled, the padded layout computes logits at padding too; eager leaves them 0)
    torch.testing.assert_close(a[real], eager[real], rtol=1e-5, atol=1e-5)
    others = real & ~((dseg == 1) & (torch.arange(len(dseg)) == row)[:, None])
    torch.testing.assert_close(a[others], b[others], rtol=1e-5, atol=1e-5)


def test_segment_inputs_are_checked(docs_tok):
    docs, tok = docs_tok
    _, packed = pair(docs, tok, n=4)
    model = ROT5(tiny(vocab_size=tok.vocab_size, pad_token_id=tok.pad_id, eos_token_id=tok.eos_id))
    with pytest.raises(ValueError, match="need both segment_ids and decoder_segment_ids"):
        model(*packed[:5])
    with pytest.raises(ValueError, match="attention_mask must be segment_ids > 0"):
        model(*packed._replace(attention_mask=torch.ones_like(packed.attention_mask)))
    bad = packed.decoder_segment_ids.clone()
    bad[0, 0] = int(packed.segment_ids[0].max()) + 1
    with pytest.raises(ValueError, match="no encoder segment with its id in its row"):
        model(*packed._replace(decoder_segment_ids=bad))
    with pytest.raises(ValueError, match="shaped like its token ids"):
        model(*packed._replace(segment_ids=packed.segment_ids[:, :-1]))


def test_finetune_packs_pairs_with_the_same_loss(monkeypatch):
    """finetune.collate(pack=True): the same (story, summary) pairs, several per row, the same loss."""
    import finetune
    tok = get_tokenizer()
    lines = [l for l in open(os.path.join(ROOT, "data", "sample", "stories.txt")).read().splitlines() if l.strip()]
    pairs = [(np.array(tok.encode(lines[i])[:120]), np.array(tok.encode(lines[i + 1])[:30])) for i in range(0, 16, 2)]
    plain, _ = finetune.collate(pairs, tok, 512, 128)
    packed, _ = finetune.collate(pairs, tok, 512, 128, pack=True)
    assert len(packed["input_ids"]) < len(plain["input_ids"]) and int(packed["segment_ids"].max()) > 1
    torch.manual_seed(0)
    model = ROT5(tiny(position="rope", n_kv_heads=2, vocab_size=tok.vocab_size, pad_token_id=tok.pad_id,
                      eos_token_id=tok.eos_id))
    a, b = model(**plain), model(**packed)
    assert a.loss.item() == pytest.approx(b.loss.item(), rel=1e-5)   # as in the UL2 test above
    assert torch.equal(packed["decoder_input_ids"], model.shift_right(packed["labels"], packed["decoder_segment_ids"]))


@pytest.mark.parametrize("variant", VARIANTS)
def test_flex_attention_on_one_example_per_row_equals_sdpa(docs_tok, variant, monkeypatch):
    """Compiled on CUDA, FlexAttention also runs batches of one example per row (pack=False, evaluation): a
    padded row is then one segment. Same logits as SDPA's padding masks at the real positions."""
    docs, tok = docs_tok
    plain, _ = pair(docs, tok, n=4)
    torch.manual_seed(0)
    model = ROT5(tiny(**VARIANTS[variant], vocab_size=tok.vocab_size, pad_token_id=tok.pad_id,
                      eos_token_id=tok.eos_id)).eval()
    with torch.no_grad():
        sdpa = model(*plain[:3]).logits
        monkeypatch.setattr(model_py, "FLEX_ATTENTION", True)
        flex = model(*plain[:3]).logits
    real = plain.labels != -100
    torch.testing.assert_close(flex[real], sdpa[real], rtol=1e-5, atol=1e-5)
