"""The input of ROT5.forward, in one layout: rows with segment ids.

A row holds one example (a padded row is one segment) or several (packed rows, ul2.pack_examples); example k
(k >= 1) is segment k on both sides, in whichever encoder row and decoder row it lands, and 0 marks padding.
T5 packs several examples per row so that no compute goes to padding (seqio's trim_and_pack); ROT5 packs the
encoder and decoder rows apart, so decoder rows say where their examples' inputs are (cross_index).

    Batch          the rows: ids, segment ids, labels, cross_index, label_index
    shift_right    teacher forcing's decoder inputs from the labels: the one rule, used by every batch builder
    padded_batch   Hugging Face's layout (one example per row, right-padded, attention_mask) as a Batch
    check_batch    every one-line error a bad batch gets, run where batches enter (not in the forward)
    prompt_segments  padded prompts (for generate.py) checked, as segment ids
"""
from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

if TYPE_CHECKING:
    from model import ROT5Config




class Batch(NamedTuple):
    """Teacher-forced rows holding one or several examples each (ul2.pack_examples builds them)."""
    input_ids: Tensor                   # (B_enc, S)
    segment_ids: Tensor                 # (B_enc, S)
    decoder_input_ids: Tensor           # (B_dec, T): each example's labels shifted right (shift_right)
    decoder_segment_ids: Tensor         # (B_dec, T)
    labels: Tensor | None = None        # (B_dec, T): targets, -100 where there is none; None: no loss
    cross_index: Tensor | None = None   # (B_dec, X): the flat encoder positions b' * S + s decoder row b reads,
                                        # its examples' inputs back to back, -1 after; None: row b reads row b
    label_index: Tensor | None = None   # (N,) the flat positions b * T + t of the labels (label_positions): the
                                        # output layer runs there alone, without a host sync to find them

    def to(self, device, non_blocking: bool = True) -> Batch:
        return Batch(*(None if t is None else t.to(device, non_blocking=non_blocking) for t in self))

    def mark_dynamic(self) -> Batch:
        """For torch.compile: packed batches' row counts and gathered key width vary from one micro-batch to
        the next. Marked dynamic, the step compiles once with symbolic sizes instead of at each new size."""
        for t in self:
            if t is not None:
                torch._dynamo.maybe_mark_dynamic(t, 0)   # (label_index: the number of labels varies too)
        if self.cross_index is not None:
            torch._dynamo.maybe_mark_dynamic(self.cross_index, 1)
        return self


def shift_right(labels: Tensor, segment_ids: Tensor, pad_id: int) -> Tensor:
    """Teacher forcing's decoder inputs: each segment's labels one step right after the start token, which is
    T5's pad: [pad, y_0, .., y_{n-2}] per segment; pad where labels are -100."""
    dec = torch.cat([labels.new_full((len(labels), 1), pad_id), labels[:, :-1]], dim=1)
    dec[:, 1:].masked_fill_(segment_ids[:, 1:] != segment_ids[:, :-1], pad_id)
    return dec.masked_fill(dec == -100, pad_id)


def label_positions(labels: Tensor) -> Tensor:
    """The flat positions of the labels that count (not -100), in order: Batch.label_index."""
    return (labels.flatten() != -100).nonzero().squeeze(1)


def padded_batch(cfg: ROT5Config, input_ids: Tensor, attention_mask: Tensor | None = None, labels: Tensor | None = None,
                 decoder_input_ids: Tensor | None = None) -> Batch:
    """Hugging Face's layout -- one example per row, right-padded -- as a checked Batch: a row is one segment,
    on the decoder side up to its last label (decoder_input_ids alone: the whole row)."""
    segment_ids = prompt_segments(input_ids, attention_mask, cfg.vocab_size)
    if labels is None and decoder_input_ids is None:
        raise ValueError("pass decoder_input_ids or labels (decoder inputs are labels shifted right)")
    if labels is not None:
        check_ids(labels, "labels", cfg.vocab_size, allow_ignore=True)
        decoder_segment_ids = ((labels != -100).flip(1).cumsum(1).flip(1) > 0).long()   # up to the last label
    else:
        decoder_segment_ids = torch.ones_like(decoder_input_ids)
    if decoder_input_ids is None:
        decoder_input_ids = shift_right(labels, decoder_segment_ids, cfg.pad_token_id)
    batch = Batch(input_ids, segment_ids, decoder_input_ids, decoder_segment_ids, labels, None,
                  None if labels is None else label_positions(labels))
    check_batch(batch, cfg)
    return batch


def prompt_segments(input_ids: Tensor, attention_mask: Tensor | None, vocab_size: int) -> Tensor:
    """Checked right-padded inputs (B, S) and their attention mask (1 on tokens; None: no padding) -> their
    segment ids: each row one segment."""
    check_ids(input_ids, "input_ids", vocab_size)
    if attention_mask is not None and (not isinstance(attention_mask, Tensor) or attention_mask.shape != input_ids.shape):
        got = tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else type(attention_mask).__name__
        raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, got {got}")
    segment_ids = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
    check_not_empty(segment_ids)
    return segment_ids


def check_not_empty(segment_ids: Tensor) -> None:
    """An input row of padding alone has nothing for cross-attention to attend to: no defined output."""
    empty = segment_ids.max(1).values == 0
    if empty.any():
        raise ValueError(f"input row {int(empty.nonzero()[0])} is all padding: every input needs at least one real "
                         "token; drop empty rows")


def check_ids(ids: Tensor, name: str, vocab_size: int, allow_ignore: bool = False) -> None:
    if not isinstance(ids, Tensor) or ids.dtype not in (torch.int64, torch.int32):
        what = ids.dtype if isinstance(ids, Tensor) else type(ids).__name__
        raise ValueError(f"{name} must be an int64 tensor of token ids, got {what}")
    if ids.dim() != 2 or ids.numel() == 0:
        raise ValueError(f"{name} must have shape (batch, length) with length > 0, got {tuple(ids.shape)}")
    valid = (ids >= 0) & (ids < vocab_size)
    if allow_ignore:
        valid |= ids == -100
    if not valid.all():
        bad = ids[~valid][0].item()
        raise ValueError(f"{name} contains id {bad}, outside the vocabulary [0, {vocab_size})"
                         f"{' (or -100 = ignore)' if allow_ignore else ''}: tokenizer and model config disagree")


def check_batch(batch: Batch, cfg: ROT5Config) -> None:
    """Every one-line error a bad Batch gets. ROT5.forward does not run these: each reads a value back to the
    host, which on a GPU waits for the device to go idle, and under torch.compile splits the graph. They run
    where batches enter instead: train.py and finetune.py check each micro-batch on the CPU before moving it,
    padded_batch and generate.py check theirs."""
    check_ids(batch.input_ids, "input_ids", cfg.vocab_size)
    check_ids(batch.decoder_input_ids, "decoder_input_ids", cfg.vocab_size)
    labels, seg, dseg, cross = batch.labels, batch.segment_ids, batch.decoder_segment_ids, batch.cross_index
    if labels is not None:
        check_ids(labels, "labels", cfg.vocab_size, allow_ignore=True)
        if labels.shape != batch.decoder_input_ids.shape:
            raise ValueError(f"labels {tuple(labels.shape)} and decoder_input_ids "
                             f"{tuple(batch.decoder_input_ids.shape)} must have the same shape")
        if (labels == -100).all():  # the mean over no tokens is NaN
            raise ValueError("labels are all -100 (ignored): a batch needs at least one token to predict")
        if batch.label_index is None or not torch.equal(batch.label_index, label_positions(labels)):
            raise ValueError("label_index must be label_positions(labels), the flat positions of the labels")
    elif batch.label_index is not None:
        raise ValueError("label_index without labels: pass both, or neither")
    for name, s, ids in (("segment_ids", seg, batch.input_ids), ("decoder_segment_ids", dseg, batch.decoder_input_ids)):
        if not isinstance(s, Tensor) or s.dtype not in (torch.int64, torch.int32) or s.shape != ids.shape:
            raise ValueError(f"{name} must be an int tensor shaped like its token ids {tuple(ids.shape)}")
        if (s < 0).any():
            raise ValueError(f"{name} must be >= 0 (0 = padding, k = example k of the batch)")
    check_not_empty(seg)
    read = seg                                       # the encoder segment ids each decoder row reads
    if cross is not None:
        if (not isinstance(cross, Tensor) or cross.dtype not in (torch.int64, torch.int32) or cross.dim() != 2
                or len(cross) != len(dseg)):
            raise ValueError(f"cross_index must be an int tensor with one row per decoder row ({len(dseg)})")
        if ((cross < -1) | (cross >= seg.numel())).any():
            raise ValueError(f"cross_index must hold encoder positions in [0, {seg.numel()}) or -1")
        read = read_segments(seg, cross)
    elif len(seg) != len(dseg):
        raise ValueError(f"{len(dseg)} decoder rows read {len(seg)} encoder rows: pass cross_index "
                         "(ul2.pack_examples makes it) or one decoder row per encoder row")
    n = int(torch.maximum(read.max(), dseg.max())) + 1
    present = torch.zeros(len(read), n, dtype=torch.bool, device=read.device)
    present.scatter_(1, read.long(), True)
    present[:, 0] = True   # decoder padding
    if not present.gather(1, dseg.long()).all():
        raise ValueError("a decoder segment has no encoder segment with its id where its row reads: example k "
                         "must be segment k on both sides, and cross_index must list its encoder positions")


def read_segments(seg: Tensor, index: Tensor) -> Tensor:
    """The segment ids at the flat positions `index` of seg (B, S), 0 where index is -1 (cross_index: what a
    packed decoder row reads). On whole tensors, and on one index at a time in FlexAttention's mask_mod."""
    return torch.where(index >= 0, seg.flatten()[index.clamp(min=0)], 0)
