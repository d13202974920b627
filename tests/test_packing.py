"""Packed rows (several UL2 examples per row, segment ids): the batch builder keeps every example once and
whole, the model keeps every attention inside its segment, and the loss and gradients are those of the same
examples run one per row -- for every variant, with SDPA and with FlexAttention, eager and compiled (one graph,
no host sync). Tiny fp32 models on the real bundled sample (data/sample, TinyStories)."""
import os

import numpy as np
import pytest
import torch

import prepare
import ul2
from bench import HostReads
from batch import Batch, check_batch, shift_right
from model import ROT5, segment_mask, segment_positions
from test_model import VARIANTS, tiny
from tokenizer import get_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def docs_tok():
    prepare.prepare("sample", workers=1)
    return prepare.load_documents(os.path.join(ROOT, "data", "sample"), "train"), get_tokenizer()


def pair(docs, tok, step: int = 0, n: int = 12, enc: int = 384, dec: int = 192, **kw) -> tuple[Batch, Batch]:
    """The same micro-batch (same documents, same corruption) one example per row and packed."""
    make = lambda pack: ul2.UL2Batches(docs, tok, "ul2", enc, dec, n, seed=5, pack=pack, **kw).batch(step)
    return make(False), make(True)


def examples(batch) -> list[tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """Every example of a batch as (inputs, decoder inputs, labels), sorted: comparable across layouts.
    Example k is segment k of the batch, in one encoder row and one decoder row."""
    seg, dseg = batch.segment_ids, batch.decoder_segment_ids
    parts = [(batch.input_ids[seg == k], batch.decoder_input_ids[dseg == k], batch.labels[dseg == k])
             for k in range(1, int(seg.max()) + 1)]
    return sorted(tuple(tuple(t.tolist()) for t in part) for part in parts)


def model_for(tok, attention: str = "auto", **kw) -> ROT5:
    """A tiny model for the sample's vocabulary, seeded: the same weights for every `attention` kernel."""
    torch.manual_seed(0)
    return ROT5(tiny(**kw, vocab_size=tok.vocab_size, pad_token_id=tok.pad_id, eos_token_id=tok.eos_id,
                     attention=attention))


# ---------------------------------------------------------------------------------------------------------
# The batch builder


@pytest.mark.parametrize("static_shapes", [False, True])
def test_packed_rows_hold_the_same_examples(docs_tok, static_shapes):
    docs, tok = docs_tok
    for step in range(4):
        plain, packed = pair(docs, tok, step, static_shapes=static_shapes)
        assert examples(packed) == examples(plain)     # each example once, whole, in the same format
        assert len(packed.input_ids) < len(plain.input_ids) and len(packed.labels) < len(plain.labels)
        seg, dseg, cross = packed.segment_ids, packed.decoder_segment_ids, packed.cross_index
        assert torch.equal(packed.labels != -100, dseg > 0) and plain.cross_index is None
        n = len(plain.input_ids)
        for s in (seg, dseg):  # segments 1 .. n, each in one row, contiguous from the row start, padding after
            assert set(s.unique().tolist()) - {0} == set(range(1, n + 1))
            assert ((s[:, :, None] == torch.arange(1, n + 1)).any(1).sum(0) == 1).all()
            starts = torch.cat([torch.ones_like(s[:, :1], dtype=torch.bool), s[:, 1:] != s[:, :-1]], 1)
            assert starts[s > 0].sum() == n
            assert ((s[:, 1:] > 0) <= (s[:, :-1] > 0)).all()
        # every segment reconstructs a window of one of the micro-batch's documents (ul2.reconstruct)
        for k in range(1, n + 1):
            assert len(ul2.reconstruct(packed.input_ids[seg == k].numpy(), packed.labels[dseg == k].numpy(), tok)) > 0
        # decoder row r reads exactly its examples' encoder positions, in its order, then -1
        read_rows = set()
        for r in range(len(dseg)):
            mine = dseg[r][dseg[r] > 0].unique_consecutive()
            at = cross[r][cross[r] >= 0]
            assert (cross[r][len(at):] == -1).all()
            assert torch.equal(at, torch.cat([(seg.flatten() == k).nonzero().squeeze(1) for k in mine]))
            read_rows.add(tuple((at // seg.shape[1]).unique().tolist()))
        assert any(len(rows) > 1 for rows in read_rows)   # decoder rows do read across encoder rows
        if static_shapes:
            assert packed.input_ids.shape[1] == 384 and packed.labels.shape[1] == 192
        assert cross.shape[1] % 128 == 0


def test_pack_rows_fits_every_item_and_fills_rows():
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 300, 200)
    row, at = ul2.pack_rows(lengths, 512)
    for r in range(row.max() + 1):
        mine = np.flatnonzero(row == r)
        order = mine[np.argsort(at[mine])]
        assert (at[order] == np.cumsum(lengths[order]) - lengths[order]).all()   # back to back from 0
        assert lengths[mine].sum() <= 512
    used = np.bincount(row, lengths)   # no two rows could be merged: not wasteful in the obvious way
    merge = used[:, None] + used[None] <= 512
    np.fill_diagonal(merge, False)
    assert not merge.any()
    assert len(used) <= np.ceil(11 / 9 * lengths.sum() / 512) + 4   # Johnson's bound, against the volume bound
    with pytest.raises(ValueError, match="does not fit a row of 512"):
        ul2.pack_rows(np.array([100, 513]), 512)


def test_packing_fills_rot5_mini_rows(docs_tok):
    """The real-token fraction at config/rot5_mini.py's row lengths (fixed shapes, as compiled): each side
    packed apart, best-fit decreasing leaves a few percent (bench.py section h reports 20 batches)."""
    docs, tok = docs_tok
    plain = ul2.UL2Batches(docs, tok, "ul2", 512, 256, 64, seed=0, static_shapes=True)
    packed = ul2.UL2Batches(docs, tok, "ul2", 512, 256, 64, seed=0, static_shapes=True, pack=True)
    fill = lambda b: ((b.labels != -100).float().mean().item(), (b.segment_ids > 0).float().mean().item())
    (dec_plain, enc_plain), (dec_packed, enc_packed) = (np.mean([fill(b.batch(s)) for s in range(4)], 0)
                                                        for b in (plain, packed))
    assert dec_packed > 0.94 and enc_packed > 0.94                          # (measured 0.951 / 0.956)
    assert dec_packed > 2 * dec_plain and enc_packed > 2 * enc_plain         # (from 0.33 / 0.26)


def test_segment_positions_restart_in_every_segment():
    seg = torch.tensor([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    assert segment_positions(seg).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1], list(range(8))]


def test_masks_keep_segments_and_padding_queries_read_one_key():
    """Queries attend their own segment; a padding query attends key 0 alone (no NaN softmax in SDPA, and
    FlexAttention keeps no other key block for it). Cross-attention reads through cross_index (-1: no key)."""
    q = torch.tensor([[2, 2, 5, 0]])
    k = torch.tensor([[5, 5, 2, 0], [0, 0, 0, 0]])
    index = torch.tensor([[2, 0, 1, -1]])                      # keys: segments 2, 5, 5, none
    allowed = segment_mask(q, k, False, None, False, torch.float32, index)[0, 0]
    assert allowed.int().tolist() == [[1, 0, 0, 0], [1, 0, 0, 0], [0, 1, 1, 0], [1, 0, 0, 0]]
    causal = segment_mask(q, q, True, None, False, torch.float32)[0, 0]
    assert causal.int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0]]
    row = (torch.arange(256) < 100).long()[None]               # one example, then 156 padding positions
    blocks = segment_mask(row, row, False, None, True, torch.float32).block_mask.to_dense()
    assert blocks[0, 0].tolist() == [[1, 0], [1, 0]]           # key block 1 (all padding) is never computed


# ---------------------------------------------------------------------------------------------------------
# The model


def grads_of(model, batch) -> tuple:
    model.zero_grad()
    out = model(batch)
    (out.loss + out.aux_loss + out.z_loss).backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("variant", VARIANTS)
def test_packed_loss_and_gradients_equal_one_example_per_row(docs_tok, variant):
    """One loss over the same label tokens, MoE statistics over the same real tokens: packing changes only the
    order of fp32 sums (other matmul shapes and attention row lengths). Each sum of n terms then moves by
    about sqrt(n) unit roundoffs (6e-8) relative to its terms' magnitude; through a few layers that stays
    near 1e-6 relative, so the loss is compared at 1e-5 and every gradient tensor by the norm of its
    difference at 1e-4 of its own norm (an elementwise bound would fail on entries that cancel to ~0). A
    token attending across segments, or one position or bias off, moves them by percent."""
    docs, tok = docs_tok
    plain, packed = pair(docs, tok)
    assert int(packed.segment_ids.max()) > 1                  # rows really hold several examples
    model = model_for(tok, **VARIANTS[variant])
    (ref, ref_grads), (out, grads) = grads_of(model, plain), grads_of(model, packed)
    assert out.loss.item() == pytest.approx(ref.loss.item(), rel=1e-5)
    for name in ("aux_loss", "z_loss"):
        assert getattr(out, name).item() == pytest.approx(getattr(ref, name).item(), rel=1e-5, abs=1e-9)
    if ref.expert_load is not None:  # fractions of the same tokens: counts, exact
        torch.testing.assert_close(out.expert_load, ref.expert_load, rtol=0, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for n, g in grads.items():
        assert (g - ref_grads[n]).norm() <= 1e-4 * ref_grads[n].norm() + 1e-12, n


def crowded_example(batch) -> int:
    """An example that shares its encoder row and its decoder row with others."""
    seg, dseg = batch.segment_ids, batch.decoder_segment_ids
    crowded = lambda s, k: len(s[(s == k).any(1)].unique()) > 2   # other ids than k and padding
    return next(k for k in range(1, int(seg.max()) + 1) if crowded(seg, k) and crowded(dseg, k))


def perturb_one_example(batch, seg: int):
    """The same batch with example `seg` given other (real, non-special) tokens on both sides."""
    g = torch.Generator().manual_seed(1)
    input_ids, dec = batch.input_ids.clone(), batch.decoder_input_ids.clone()
    for ids, s in ((input_ids, batch.segment_ids), (dec, batch.decoder_segment_ids)):
        at = (s.flatten() == seg).nonzero().squeeze(1)[1:]  # keep the mode / start token
        ids.view(-1)[at] = torch.randint(100, 30000, (len(at),), generator=g)
    return batch._replace(input_ids=input_ids, decoder_input_ids=dec)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("attention", ["sdpa", "flex"])
def test_no_token_attends_across_segments(docs_tok, variant, attention):
    """Change every token of one example: the logits of every other example stay put, those of its rows too
    (encoder self-, decoder self- and cross-attention all keep to their segment), its own change. SDPA (the eager path)
    and FlexAttention (the compiled GPU path; forward only: it has no CPU backward) agree on the packed batch.
    Masked scores add exact zeros; only MoE's re-sorted expert batches can round differently: 1e-5."""
    docs, tok = docs_tok
    _, packed = pair(docs, tok)
    k = crowded_example(packed)
    sdpa, model = model_for(tok, "sdpa", **VARIANTS[variant]).eval(), model_for(tok, attention, **VARIANTS[variant]).eval()
    logits = lambda m, b: m(b._replace(labels=None, label_index=None)).logits
    with torch.no_grad():
        sdpa = logits(sdpa, packed)
        a, b = logits(model, packed), logits(model, perturb_one_example(packed, k))
    torch.testing.assert_close(a, sdpa, rtol=1e-5, atol=1e-5)
    dseg = packed.decoder_segment_ids
    others, mine = (dseg > 0) & (dseg != k), dseg == k
    torch.testing.assert_close(a[others], b[others], rtol=1e-5, atol=1e-5)
    assert (a[mine] - b[mine]).abs().max() > 1e-2


def test_compiled_flex_attention_equals_eager_sdpa(docs_tok):
    """torch.compile's FlexAttention kernels (what a GPU run uses) on the CPU, forward: the T5 bias as a
    score_mod, GQA, the three segment masks -- the same logits as eager SDPA, and still no leak across
    segments. Compiling takes a minute on 2 cores: one variant, T5 bias + GQA (the score_mod path)."""
    docs, tok = docs_tok
    _, packed = pair(docs, tok, n=6, enc=256, dec=128)
    k = crowded_example(packed)
    eager, flex = model_for(tok, "sdpa", n_kv_heads=2).eval(), model_for(tok, "flex", n_kv_heads=2).eval()
    args = lambda b: b._replace(labels=None, label_index=None)
    with torch.no_grad():
        eager = eager(args(packed)).logits
        compiled = torch.compile(flex, fullgraph=True)
        a, b = compiled(args(packed)).logits, compiled(args(perturb_one_example(packed, k))).logits
    dseg = packed.decoder_segment_ids
    real = dseg > 0   # (padding positions' logits are no one's: only real ones are compared)
    torch.testing.assert_close(a[real], eager[real], rtol=1e-5, atol=1e-5)
    others = real & (dseg != k)
    torch.testing.assert_close(a[others], b[others], rtol=1e-5, atol=1e-5)


def test_compiled_training_equals_eager_on_packed_batches_of_varying_shape(docs_tok):
    """What a GPU run compiles (here inductor on the CPU, with SDPA masks), as ONE graph (fullgraph=True
    fails on any graph break): forward and backward of packed micro-batches whose row counts and gathered key
    width all differ, marked dynamic as train.py marks them. The same loss and gradients as eager: the
    compiled kernels only fuse and reorder fp32 sums (bounds as in
    test_packed_loss_and_gradients_equal_one_example_per_row). One variant, RoPE + GQA, one layer per stack:
    compiling the step takes most of a minute on 2 cores."""
    docs, tok = docs_tok
    batches = ul2.UL2Batches(docs, tok, "ul2", 256, 128, 8, seed=0, static_shapes=True, pack=True)
    model = model_for(tok, position="rope", n_kv_heads=2, n_encoder_layers=1, n_decoder_layers=1)
    compiled = torch.compile(model, fullgraph=True)

    def step(f, batch):
        model.zero_grad()
        loss = f(batch).loss
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    shapes = set()
    for g in range(3):
        batch = batches.batch(g).mark_dynamic()
        shapes.add((len(batch.input_ids), len(batch.labels), batch.cross_index.shape[1]))
        (ref, ref_grads), (loss, grads) = step(model, batch), step(compiled, batch)
        assert loss == pytest.approx(ref, rel=1e-5)
        assert grads.keys() == ref_grads.keys()
        for n, g_ in grads.items():
            assert (g_ - ref_grads[n]).norm() <= 1e-4 * ref_grads[n].norm() + 1e-12, n
    assert len(shapes) == 3                                  # three different (B_enc, B_dec, X)


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_training_step_is_one_graph_with_no_host_sync(docs_tok, variant):
    """The redesign's promise, for every variant: an eager training step (forward + backward) on a packed
    batch reads no tensor value back to the host -- on a GPU each read waits for the device to go idle --
    except the Switch FFN's expert counts, one read per MoE layer; and torch.compile traces the forward as
    one graph, with no break (MoE included: the counts become symbolic sizes)."""
    docs, tok = docs_tok
    _, packed = pair(docs, tok, n=6, enc=256, dec=128)
    model = model_for(tok, **VARIANTS[variant])
    with HostReads() as counter:
        out = model(packed)
        (out.loss + out.aux_loss + out.z_loss).backward()
    n_moe = sum(1 for m in model.modules() if type(m).__name__ == "SwitchFFN")
    assert counter.reads == ({"tolist": n_moe} if n_moe else {})
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(packed)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_host_reads_are_counted():
    """The counter above sees each kind of read (a counter that saw nothing would pass that test)."""
    x = torch.arange(10)
    with HostReads() as counter:
        x.sum().item(), bool((x > 3).any()), x.tolist(), x[x > 3], torch.equal(x, x), x.nonzero()
    assert sum(counter.reads.values()) == 6, counter.reads


def test_segment_inputs_are_checked(docs_tok):
    """check_batch, where batches enter: one line for each way a Batch can be inconsistent."""
    docs, tok = docs_tok
    plain, packed = pair(docs, tok, n=4)
    cfg = model_for(tok).cfg
    bad = packed.decoder_segment_ids.clone()
    bad[0, 0] = int(packed.segment_ids.max()) + 1
    with pytest.raises(ValueError, match="no encoder segment with its id where its row reads"):
        check_batch(packed._replace(decoder_segment_ids=bad), cfg)
    with pytest.raises(ValueError, match="shaped like its token ids"):
        check_batch(packed._replace(segment_ids=packed.segment_ids[:, :-1]), cfg)
    with pytest.raises(ValueError, match="must be >= 0"):
        check_batch(packed._replace(segment_ids=-packed.segment_ids), cfg)
    with pytest.raises(ValueError, match="one row per decoder row"):
        check_batch(packed._replace(cross_index=packed.cross_index[:-1]), cfg)
    with pytest.raises(ValueError, match=r"encoder positions in \[0, \d+\) or -1"):
        check_batch(packed._replace(cross_index=packed.cross_index + packed.segment_ids.numel()), cfg)
    with pytest.raises(ValueError, match="decoder rows read .* encoder rows: pass cross_index"):
        check_batch(packed._replace(cross_index=None), cfg)
    check_batch(plain, cfg)
    check_batch(packed, cfg)


def test_finetune_packs_pairs_with_the_same_loss(monkeypatch):
    """finetune.collate(pack=True): the same (story, summary) pairs, several per row, the same loss."""
    import finetune
    tok = get_tokenizer()
    lines = [l for l in open(os.path.join(ROOT, "data", "sample", "stories.txt")).read().splitlines() if l.strip()]
    pairs = [(np.array(tok.encode(lines[i])[:120]), np.array(tok.encode(lines[i + 1])[:30])) for i in range(0, 16, 2)]
    plain, _ = finetune.collate(pairs, tok, 512, 128, pack=False)
    packed, _ = finetune.collate(pairs, tok, 512, 128, pack=True)
    assert len(packed.input_ids) < len(plain.input_ids) and len(packed.labels) < len(plain.labels)
    model = model_for(tok, position="rope", n_kv_heads=2)
    a, b = model(plain), model(packed)
    assert a.loss.item() == pytest.approx(b.loss.item(), rel=1e-5)   # as in the UL2 test above
    assert torch.equal(packed.decoder_input_ids, shift_right(packed.labels, packed.decoder_segment_ids, tok.pad_id))


@pytest.mark.parametrize("variant", VARIANTS)
def test_flex_attention_on_one_example_per_row_equals_sdpa(docs_tok, variant):
    """FlexAttention also runs rows of one example each (pack=False): a padded row is one segment. Same
    logits as SDPA at the real positions."""
    docs, tok = docs_tok
    plain, _ = pair(docs, tok, n=4)
    with torch.no_grad():
        rows = plain._replace(labels=None, label_index=None)
        sdpa = model_for(tok, "sdpa", **VARIANTS[variant]).eval()(rows).logits
        flex = model_for(tok, "flex", **VARIANTS[variant]).eval()(rows).logits
    real = plain.labels != -100
    torch.testing.assert_close(flex[real], sdpa[real], rtol=1e-5, atol=1e-5)
