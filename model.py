"""ROT5, the Reincarnated Open T5: a T5 encoder-decoder (Raffel et al. 2020) that can be upgraded one
ablation at a time with rotary positions, grouped-query attention and Switch mixture-of-experts FFNs.

The big picture. The encoder reads the whole input bidirectionally; the decoder writes the output left to
right, attending causally to itself and fully to the encoder output (cross-attention). With the default
config ROT5 *is* T5 v1.0 (it loads Hugging Face T5 weights exactly, see `ROT5.from_hf_t5`); each config
field below then changes one thing:

    position="rope"      learned bucketed relative bias -> rotary embeddings in all three attentions
    n_kv_heads < n_heads multi-head -> grouped-query attention (Ainslie et al. 2023), smaller KV cache
    n_experts > 0        dense FFN -> Switch MoE FFN in every other layer (Fedus et al. 2021)
    ffn="gated-gelu", tie_embeddings=False   T5 v1.0 -> v1.1 (Shazeer 2020 GEGLU, untied output layer)

Map of the classes (top-down):

    ROT5                 embed -> Encoder -> Decoder -> lm_head; loss, generate, from_hf_t5 / to_hf_t5, train_flops
      Encoder            EncoderBlock x n_encoder_layers, one RelativePositionBias table, final RMSNorm
        EncoderBlock     RMSNorm -> EncoderSelfAttention (bidirectional, padding mask) ; RMSNorm -> FFN | SwitchFFN
      Decoder            DecoderBlock x n_decoder_layers, one RelativePositionBias table, final RMSNorm
        DecoderBlock     RMSNorm -> DecoderSelfAttention (causal, KV cache) ; RMSNorm -> CrossAttention ;
                         RMSNorm -> FFN | SwitchFFN
      KVCache            one preallocated tensor for decoder self-attention + encoder K/V computed once
                         (once per prompt: the beams of a prompt share it)
      Unpadded           where the real tokens of a padded batch are: the stacks skip padding, attention
                         alone works on padded (B, T) rows
      stack_masks        packed rows (several examples per row, segment ids): the three attentions keep
                         to their segment; SDPA masks, or FlexAttention block masks when compiled on CUDA

Speed (BENCHMARKS.md): training rows are packed with several examples (ul2.py), and eager runs skip the
remaining padding: everything but attention runs on real tokens only; generation encodes once, projects
the cross-attention K/V once per prompt, and writes one position per step into a preallocated cache.

Details that matter for exactness:
- Attention is softmax(q k^T + bias) v with NO 1/sqrt(head_dim): T5 folds that factor into the init of the
  query projection (std (d_model * head_dim)**-0.5). ROT5 keeps this convention for RoPE too, so that
  every ablation changes one thing only.
- Pre-norm residual blocks with T5's RMSNorm (no mean, no bias, variance in fp32), a final norm per stack,
  and dropout where HF T5 puts it: embeddings, attention probabilities, FFN hidden, each sublayer output,
  and after the final norm.
- Tied embeddings (v1.0) scale the decoder output by d_model**-0.5 before the shared output matrix.
- MoE layers are the odd-numbered ones, 1, 3, 5, ... (0-based), in both stacks; `expert_load` lists the
  encoder's MoE layers first, then the decoder's.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention


@dataclass
class ROT5Config:
    vocab_size: int = 32256
    d_model: int = 768
    n_heads: int = 12            # query heads
    head_dim: int = 64
    n_kv_heads: int = 12         # == n_heads: multi-head; < n_heads (divides it): grouped-query attention
    d_ff: int = 3072
    n_encoder_layers: int = 12
    n_decoder_layers: int = 12
    position: str = "t5"         # "t5": learned bucketed relative bias | "rope"
    ffn: str = "relu"            # "relu" (T5 v1.0) | "gated-gelu" (T5 v1.1)
    tie_embeddings: bool = True  # v1.0: shared in/out embedding, decoder output scaled by d_model**-0.5
    n_experts: int = 0           # 0: dense FFN; > 0: Switch MoE FFN in every other layer (Switch Transformer)
    moe_top_k: int = 1
    aux_loss_coef: float = 1e-2  # Switch eq. 4; 0 turns it off
    z_loss_coef: float = 1e-3    # ST-MoE router z-loss; 0 turns it off
    dropout: float = 0.1
    rope_theta: float = 10000.0
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    norm_eps: float = 1e-6
    pad_token_id: int = 32000    # decoder start token too (T5)
    eos_token_id: int = 2

    def __post_init__(self):
        kinds = {"int": int, "float": (int, float), "bool": bool, "str": str}
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, kinds[f.type]) or (f.type != "bool" and isinstance(v, bool)):
                raise ValueError(f"ROT5Config.{f.name} must be a {f.type}, got {v!r}")
        positive = ["vocab_size", "d_model", "n_heads", "head_dim", "n_kv_heads", "d_ff", "n_encoder_layers",
                    "n_decoder_layers", "moe_top_k", "rope_theta", "relative_attention_num_buckets",
                    "relative_attention_max_distance", "norm_eps"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"ROT5Config.{name} must be > 0, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads} "
                             "(grouped-query attention)")
        if self.position not in ("t5", "rope"):
            raise ValueError(f"position must be 't5' or 'rope', got {self.position!r}")
        if self.position == "rope" and self.head_dim % 2:
            raise ValueError(f"position='rope' rotates pairs of features: head_dim must be even, got {self.head_dim}")
        if self.ffn not in ("relu", "gated-gelu"):
            raise ValueError(f"ffn must be 'relu' or 'gated-gelu', got {self.ffn!r}")
        if self.n_experts < 0:
            raise ValueError(f"n_experts must be >= 0 (0 = dense FFN), got {self.n_experts}")
        if self.n_experts and self.moe_top_k > self.n_experts:
            raise ValueError(f"moe_top_k={self.moe_top_k} must be <= n_experts={self.n_experts}")
        for name in ("aux_loss_coef", "z_loss_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0 = off), got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        for name in ("pad_token_id", "eos_token_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, vocab_size={self.vocab_size})")


class ROT5Output(NamedTuple):
    loss: Tensor | None          # LM cross-entropy only, fp32, mean over labels != -100
    logits: Tensor | None        # (B, T, V); None when labels are given (loss computed on label positions only)
    aux_loss: Tensor             # coef-weighted load-balancing loss summed over MoE layers (0. if dense/off)
    z_loss: Tensor               # coef-weighted router z-loss summed over MoE layers (0. if dense/off)
    expert_load: Tensor | None   # (n_moe_layers, n_experts): fraction of (non-pad) tokens routed to each expert


class MoEStats(NamedTuple):
    aux_loss: Tensor             # () Switch eq. 4, coef-weighted
    z_loss: Tensor               # () ST-MoE eq. 5, coef-weighted
    load: Tensor                 # (n_experts,) f_i, sums to 1


# ----------------------------------------------------------------------------------------------------------
# Building blocks: norm, positions, attention kernel


class RMSNorm(nn.Module):
    """T5 LayerNorm = RMSNorm (Zhang & Sennrich 2019): x / rms(x) * g, no mean subtraction, no bias.
    The mean square is taken in fp32 because bf16 sums of squares lose the small components."""

    def __init__(self, d: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)


class RelativePositionBias(nn.Module):
    """T5's learned relative position bias (Raffel et al. 2020, sec. 2.1): a scalar per head and per bucket
    of the distance j - i, added to the attention logits. One table per stack, shared by all its layers
    (as in Mesh TF and HF). Distances are bucketed: exact below num_buckets/2 (per direction), then
    logarithmically wider buckets up to max_distance, beyond which all distances share the last bucket."""

    def __init__(self, cfg: ROT5Config, bidirectional: bool):
        super().__init__()
        self.bidirectional = bidirectional
        self.num_buckets, self.max_distance = cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance
        self.bias = nn.Embedding(self.num_buckets, cfg.n_heads)

    def bucket(self, rel: Tensor) -> Tensor:
        """rel = key position - query position (any shape) -> bucket ids; mirrors Mesh TF's
        _relative_position_bucket bit for bit so that HF checkpoints load exactly."""
        n, buckets = self.num_buckets, torch.zeros_like(rel)
        if self.bidirectional:
            n //= 2
            buckets += (rel > 0).long() * n  # keys to the right get their own half of the buckets
            rel = rel.abs()
        else:
            rel = -rel.clamp(max=0)  # causal: keys to the right are masked anyway; share bucket 0
        max_exact = n // 2
        log_bucket = max_exact + (torch.log(rel.float() / max_exact) / math.log(self.max_distance / max_exact)
                                  * (n - max_exact)).long()
        return buckets + torch.where(rel < max_exact, rel, log_bucket.clamp(max=n - 1))

    def forward(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        rel = k_pos[None, :] - q_pos[:, None]                     # (Tq, Tk)
        return self.bias(self.bucket(rel)).permute(2, 0, 1)[None]  # (1, H, Tq, Tk)


def rope_cos_sin(pos: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos/sin of the rotation angles pos * theta_i, theta_i = theta**(-2i/d) (RoFormer, Su et al. 2021, eq. 15).
    pos: (T,) -> cos, sin: (T, head_dim) in fp32 (angles of large positions need fp32); packed rows give
    per-token positions (B, T) -> (B, 1, T, head_dim), which broadcasts over the heads of (B, H, T, Dh)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float32) / head_dim)
    ang = pos.float()[..., None] * inv_freq
    ang = torch.cat([ang, ang], dim=-1)
    if pos.dim() == 2:
        ang = ang[:, None]
    return ang.cos(), ang.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoFormer eq. 34: rotate each feature pair of x (B, h, T, Dh) by its position's angle, so that
    <R_i q, R_j k> depends on positions only through i - j. Pairs are (f, f + Dh/2) rather than (2f, 2f+1):
    the same rotation up to a fixed permutation of the (learned) q/k features, and contiguous in memory."""
    x32 = x.float()
    x1, x2 = x32.chunk(2, dim=-1)
    return (x32 * cos + torch.cat([-x2, x1], dim=-1) * sin).type_as(x)


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | FlexMask | None, is_causal: bool,
           dropout: float) -> Tensor:
    """softmax(q k^T + mask) v with T5's scale = 1. q: (B, H, Tq, Dh); k, v: (B, Hkv, Tk, Dh), Hkv divides H;
    query head h reads K/V head h // (H / Hkv) (GQA, Ainslie et al. 2023). mask: additive float (bias and
    -inf-like entries) or bool (True = attend), broadcastable to (B, H, Tq, Tk), for SDPA; or a FlexMask
    (see `stack_masks`). Returns (B, Tq, H*Dh)."""
    B, H, Tq, Dh = q.shape
    if isinstance(mask, FlexMask):  # no attention dropout here: use_flex only picks Flex without it
        # (contiguous: inductor's CPU template reads q/k/v as 4-d buffers; on CUDA the copy fuses into rope)
        y = flex_attention(q.contiguous(), k.contiguous(), v.contiguous(), score_mod=mask.score_mod,
                           block_mask=mask.block_mask, scale=1.0, enable_gqa=H != k.shape[1])
        return y.transpose(1, 2).flatten(2)
    groups = H // k.shape[1]
    if groups > 1 and mask is not None:
        if mask.shape[1] == 1 and mask.shape[2] == 1 and not is_causal:
            # one mask row for all heads and queries (padding only): the `groups` query heads that share a
            # K/V head are just more queries of it, (B, H, Tq, Dh) -> (B, Hkv, groups * Tq, Dh); no K/V copy
            q = q.reshape(B, H // groups, groups * Tq, Dh)
        else:  # SDPA's enable_gqa is exact, but with a mask CUDA falls back to the slow math kernel: expand
            k = k[:, :, None].expand(-1, -1, groups, -1, -1).flatten(1, 2)
            v = v[:, :, None].expand(-1, -1, groups, -1, -1).flatten(1, 2)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal,
                                       scale=1.0, enable_gqa=q.shape[1] != k.shape[1])
    return y.reshape(B, H, Tq, Dh).transpose(1, 2).flatten(2)


def split_qkv(qkv: Tensor, cfg: ROT5Config) -> tuple[Tensor, Tensor, Tensor]:
    """fused projection (B, T, (H + 2 Hkv) Dh) -> q (B, H, T, Dh), k and v (B, Hkv, T, Dh)."""
    B, T, _ = qkv.shape
    H, Hkv, Dh = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    q, k, v = qkv.split([H * Dh, Hkv * Dh, Hkv * Dh], dim=-1)
    return (q.view(B, T, H, Dh).transpose(1, 2), k.view(B, T, Hkv, Dh).transpose(1, 2),
            v.view(B, T, Hkv, Dh).transpose(1, 2))


def mask_dtype(x: Tensor) -> torch.dtype:
    """dtype SDPA will see for q under autocast: float masks must match it."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


# ----------------------------------------------------------------------------------------------------------
# Packed rows. T5 never trains on padding: seqio's trim_and_pack puts several (inputs, targets) examples in
# one row. ROT5 packs the encoder rows and the decoder rows apart (UL2's inputs are ~1.6x its targets, and
# rows that held the same examples on both sides would fill one side to 1.6 / 2 of the other at 512 / 256),
# so an example is segment k of the micro-batch on both sides, in whichever rows it landed (ul2.py builds
# them). Every attention keeps to its segment -- encoder self: same segment; decoder self: same segment and
# causal; cross: decoder segment k reads encoder segment k only -- and positions restart at 0 in every
# segment. Cross-attention first gathers, for each decoder row, the encoder positions its examples read
# (cross_index): K/V rows of their own. Within one segment, row offsets differ by the same i - j as
# positions do, so T5's relative bias is the unpacked (1, H, T, T) table as it is; RoPE rotates with the
# per-segment positions (cross-attention compares decoder and encoder positions, in their own segments).
# The masks are built once per forward per stack, in one of two forms:
#   SDPA: a dense (B, 1, Tq, Tk) mask (bool, or the bias with -inf-like entries): eager runs, CPU, dropout;
#   FlexAttention (Dong et al. 2024): a BlockMask from the segment ids, so blocks of other segments are
#   skipped, not computed and masked, and the bias as a score_mod, so no (B, H, T, T) tensor exists. It
#   compiles to one fused kernel; eager it is a slow reference, and on the CPU it has no backward. So it is
#   used when compiling on CUDA without attention dropout (which Flex cannot apply), or when FLEX_ATTENTION
#   forces it (tests and bench.py compare the two).

FLEX_ATTENTION: bool | None = None   # None: automatic, as above; True / False: always / never


class FlexMask(NamedTuple):
    block_mask: BlockMask
    score_mod: Callable | None   # (score, b, h, q, k) -> score + bias[h, q, k]; None without a bias


def segment_positions(segment_ids: Tensor) -> Tensor:
    """(B, T) segment ids (0 = padding, examples contiguous) -> each token's position in its segment,
    0, 1, 2, ... restarting wherever the id changes."""
    col = torch.arange(segment_ids.shape[1], device=segment_ids.device).expand_as(segment_ids)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return col - torch.where(starts, col, 0).cummax(1).values


def same_segment(q_seg: Tensor, k_seg: Tensor, k: Tensor) -> Tensor:
    """The rule of every packed attention, on segment ids and key positions k that broadcast (whole tensors
    for SDPA, one (query, key) pair at a time in FlexAttention's mask_mod): a query attends the keys of its
    own segment. A padding query (segment 0) attends key 0 alone: its output is never used, a softmax over
    no key would be NaN in SDPA, and more keys would make FlexAttention compute every key block for the
    query blocks that end the rows."""
    return torch.where(q_seg > 0, q_seg == k_seg, k == 0)


def read_segments(seg: Tensor, index: Tensor) -> Tensor:
    """The segment ids at the flat positions `index` of seg (B, S), 0 where index is -1 (cross_index: what a
    packed decoder row reads). On whole tensors, and on one index at a time in FlexAttention's mask_mod."""
    return torch.where(index >= 0, seg.flatten()[index.clamp(min=0)], 0)


def segment_allowed(q_seg: Tensor, k_seg: Tensor, causal: bool) -> Tensor:
    """(B, Tq), (B, Tk) segment ids -> (B, 1, Tq, Tk) bool: query may attend key (same_segment, and not a
    later key if causal)."""
    k = torch.arange(k_seg.shape[1], device=k_seg.device)
    allowed = same_segment(q_seg[:, :, None], k_seg[:, None, :], k)
    if causal:
        allowed &= torch.ones(q_seg.shape[1], k_seg.shape[1], dtype=torch.bool, device=q_seg.device).tril()
    return allowed[:, None]


def stack_masks(q_seg: Tensor, k_seg: Tensor, causal: bool, bias: Tensor | None, flex: bool,
                dtype: torch.dtype, k_index: Tensor | None = None) -> Tensor | FlexMask:
    """The attention mask of one stack's layers for packed rows (or any rows, as FlexAttention): SDPA's dense
    mask, the bias (1, H, Tq, Tk) added when given; or FlexAttention's block mask and score_mod. k_index
    (B, Tk): the keys are the positions k_index of k_seg (read_segments; cross-attention of packed rows).
    FlexAttention's mask_mod reads through it: inductor's CPU kernel takes only stored id tensors."""
    if not flex:
        allowed = segment_allowed(q_seg, k_seg if k_index is None else read_segments(k_seg, k_index), causal)
        return allowed if bias is None else bias.to(dtype).masked_fill(~allowed, torch.finfo(dtype).min)

    def mask_mod(b, h, q, k):
        key_seg = k_seg[b, k] if k_index is None else read_segments(k_seg, k_index[b, k])
        allowed = same_segment(q_seg[b, q], key_seg, k)
        return allowed & (k <= q) if causal else allowed

    score_mod = None if bias is None else (lambda score, b, h, q, k: score + bias[0, h, q, k])
    Tk = k_seg.shape[1] if k_index is None else k_index.shape[1]
    block_mask = create_block_mask(mask_mod, q_seg.shape[0], None, q_seg.shape[1], Tk, device=q_seg.device)
    return FlexMask(block_mask, score_mod)


def use_flex(x: Tensor, training: bool, dropout: float) -> bool:
    if FLEX_ATTENTION is not None:
        return FLEX_ATTENTION
    return x.is_cuda and torch.compiler.is_compiling() and not (training and dropout > 0)


class Unpadded(NamedTuple):
    """Where the real tokens of a padded (B, T) batch are. Everything in a block but attention works token by
    token, so the stacks can carry the (N, d) real tokens alone and skip the padding (about half of a UL2
    batch); each attention puts them back into (B, T) rows around SDPA (`pad`) and takes them out after."""
    index: Tensor   # (N,) flat positions b * T + t of the real tokens, in order
    B: int
    T: int

    @staticmethod
    def of(keep: Tensor) -> Unpadded | None:
        """keep: (B, T) bool, True at the tokens to keep. None when nothing would be skipped."""
        index = keep.flatten().nonzero().squeeze(1)
        return None if len(index) == keep.numel() else Unpadded(index, *keep.shape)

    def pad(self, x: Tensor) -> Tensor:
        """(N, C) -> (B, T, C), zeros at padding."""
        return x.new_zeros(self.B * self.T, x.shape[-1]).index_copy(0, self.index, x).view(self.B, self.T, -1)

    def unpad(self, x: Tensor) -> Tensor:
        """(B, T, ...) -> (N, ...)."""
        return x.flatten(0, 1)[self.index]


# ----------------------------------------------------------------------------------------------------------
# The three attentions. Deliberately three small modules rather than one with modes: they differ in
# masking (padding / causal / padding), in positions (both sides from one sequence vs. decoder query and
# encoder key) and in caching (none / grows one token per step / computed once per sequence).


class EncoderSelfAttention(nn.Module):
    """Bidirectional: every input token attends to every non-pad input token. Runs once; no cache."""

    def __init__(self, cfg: ROT5Config):
        super().__init__()
        self.cfg = cfg
        self.qkv = nn.Linear(cfg.d_model, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, bias=False)
        self.o = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def forward(self, x: Tensor, mask: Tensor | None, rope: tuple[Tensor, Tensor] | None,
                unpadded: Unpadded | None = None) -> Tensor:
        """x: (B, T, d), or the (N, d) real tokens of a batch that `unpadded` describes (output alike)."""
        qkv = self.qkv(x)
        q, k, v = split_qkv(qkv if unpadded is None else unpadded.pad(qkv), self.cfg)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        y = attend(q, k, v, mask, False, self.cfg.dropout if self.training else 0.0)
        return self.o(y if unpadded is None else unpadded.unpad(y))


class DecoderSelfAttention(nn.Module):
    """Causal: output token i attends to output tokens <= i. When generating, the keys/values of earlier
    tokens come from the cache (B, Hkv, max_len, Dh); only the new token's K/V are computed and written in."""

    def __init__(self, cfg: ROT5Config):
        super().__init__()
        self.cfg = cfg
        self.qkv = nn.Linear(cfg.d_model, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, bias=False)
        self.o = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def forward(self, x: Tensor, mask: Tensor | None, is_causal: bool, rope: tuple[Tensor, Tensor] | None,
                cache: Tensor | None, start: int, unpadded: Unpadded | None = None) -> Tensor:
        """x: (B, T, d), or (N, d) real tokens with `unpadded` (training only: never with a cache)."""
        qkv = self.qkv(x)
        q, k, v = split_qkv(qkv if unpadded is None else unpadded.pad(qkv), self.cfg)
        if rope is not None:  # keys are cached already rotated: their absolute position never changes
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:  # cache: (2, B, Hkv, max_len, Dh), this layer's slice of KVCache.self_kv
            end = start + x.shape[1]
            cache[0, :, :, start:end], cache[1, :, :, start:end] = k, v
            k, v = cache[0, :, :, :end], cache[1, :, :, :end]
        y = attend(q, k, v, mask, is_causal, self.cfg.dropout if self.training else 0.0)
        return self.o(y if unpadded is None else unpadded.unpad(y))


class CrossAttention(nn.Module):
    """Decoder queries attend to the encoder output. K/V depend only on the encoder output, so generation
    computes them once per sequence (`project_kv`). With RoPE the query is rotated with its decoder
    position i and the key with its encoder position j, so the score depends on i - j (as T5's relative
    bias would; T5 itself has no position signal in cross-attention)."""

    def __init__(self, cfg: ROT5Config):
        super().__init__()
        self.cfg = cfg
        self.q = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.kv = nn.Linear(cfg.d_model, 2 * cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def project_kv(self, enc: Tensor, rope: tuple[Tensor, Tensor] | None, unpadded: Unpadded | None = None,
                   cross_index: Tensor | None = None) -> Tensor:
        """enc: (B, S, d_model), or (N, d_model) real tokens with `unpadded` -> (2, B, Hkv, S, Dh), keys rotated
        with encoder positions. Packed rows: cross_index (B_dec, X) picks each decoder row's encoder positions
        -> (2, B_dec, Hkv, X, Dh) (projected once per encoder token, then gathered: X counts padding)."""
        kv = self.kv(enc)
        kv = kv if unpadded is None else unpadded.pad(kv)
        if cross_index is not None:  # (B, S, C) -> (B_dec, X, C); -1 reads position 0, which the mask hides
            kv = kv.flatten(0, 1)[cross_index.clamp(min=0)]
        B, S, _ = kv.shape
        k, v = kv.view(B, S, 2, self.cfg.n_kv_heads, self.cfg.head_dim).permute(2, 0, 3, 1, 4)
        if rope is not None:
            k = apply_rope(k, *rope)
        return torch.stack([k, v])

    def forward(self, x: Tensor, kv: Tensor, mask: Tensor | None, rope: tuple[Tensor, Tensor] | None,
                unpadded: Unpadded | None = None) -> Tensor:
        """x: (B, T, d), or (N, d) real tokens with `unpadded`; kv: (2, B', Hkv, S, Dh) from project_kv, where B'
        may be B / K in beam search: the K beams of a prompt (rows b*K .. b*K+K-1) share one copy."""
        q = self.q(x)
        q = q if unpadded is None else unpadded.pad(q)
        B, T, _ = q.shape
        q = q.view(B, T, self.cfg.n_heads, self.cfg.head_dim).transpose(1, 2)
        if rope is not None:
            q = apply_rope(q, *rope)
        prompts = kv.shape[1]
        if prompts != B:  # beams of one prompt = more queries of that prompt: (B, H, T, Dh) -> (B', H, K T, Dh)
            q = q.view(prompts, B // prompts, *q.shape[1:]).transpose(1, 2).flatten(2, 3)
        y = attend(q, kv[0], kv[1], mask, False, self.cfg.dropout if self.training else 0.0)
        y = y.reshape(B, T, -1)  # (B', K T, H Dh) -> (B, T, H Dh); a no-op without beams
        return self.o(y if unpadded is None else unpadded.unpad(y))


# ----------------------------------------------------------------------------------------------------------
# Feed-forward: dense, and the Switch mixture of experts


class FFN(nn.Module):
    """T5 v1.0: wo(relu(wi x)). v1.1: wo(gelu(wi_0 x) * wi_1 x) (GEGLU, Shazeer 2020), with the tanh gelu
    approximation HF calls gelu_new; wi_0 and wi_1 are fused into one (2 d_ff, d_model) matrix."""

    def __init__(self, cfg: ROT5Config):
        super().__init__()
        self.gated = cfg.ffn == "gated-gelu"
        self.wi = nn.Linear(cfg.d_model, (2 if self.gated else 1) * cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        if self.gated:
            gate, lin = self.wi(x).chunk(2, dim=-1)
            h = F.gelu(gate, approximate="tanh") * lin
        else:
            h = F.relu(self.wi(x))
        return self.wo(self.dropout(h))


class SwitchFFN(nn.Module):
    """Switch Transformer FFN (Fedus et al. 2021, sec. 2.1): a router picks, per token, the top-k of
    n_experts FFNs; the output is the gate-weighted sum of their outputs. Dropless: every token is processed
    (no capacity factor); assignments are sorted by expert so that each expert runs one batched matmul.
    Load balancing uses f_i = share of the k * n_tokens assignments that go to expert i (Switch's
    fraction of tokens for k = 1); it is minimal, = aux_loss_coef, under uniform routing for any k."""

    def __init__(self, cfg: ROT5Config):
        super().__init__()
        self.cfg = cfg
        self.router = nn.Linear(cfg.d_model, cfg.n_experts, bias=False)
        self.experts = nn.ModuleList(FFN(cfg) for _ in range(cfg.n_experts))

    def forward(self, x: Tensor, token_mask: Tensor | None) -> tuple[Tensor, MoEStats]:
        """x: (B, T, d) or (N, d); token_mask: x's shape without d, bool, False for pad tokens (routed, but left
        out of the router statistics) or None."""
        cfg, shape = self.cfg, x.shape
        E, k = cfg.n_experts, cfg.moe_top_k
        x = x.reshape(-1, shape[-1])
        # router in fp32: bf16 logits make the softmax and z-loss unstable (Switch sec. 2.4)
        logits = F.linear(x.float(), self.router.weight.float())          # (N, E)
        probs = logits.softmax(dim=-1)
        gate, expert = probs.topk(k, dim=-1)                               # (N, k)
        if k > 1:  # top-k: renormalised; top-1 keeps the raw p_i(x), so the router gets a gradient (sec. 2.1)
            gate = gate / gate.sum(dim=-1, keepdim=True)

        flat_expert = expert.flatten()                                     # (N k,) assignment a -> expert
        order = flat_expert.argsort(stable=True)
        counts = torch.bincount(flat_expert, minlength=E).tolist()         # one host sync per layer
        y = torch.zeros_like(x)
        for e, tok, g in zip(self.experts, (order // k).split(counts), gate.flatten()[order].split(counts)):
            if len(tok):  # (n_e, d) rows of the tokens routed to expert e, weighted by their gate
                y.index_add_(0, tok, (e(x.index_select(0, tok)) * g[:, None]).to(y.dtype))

        # router statistics over real tokens only: weight w = 0 at padding
        w = torch.ones(len(x), device=x.device) if token_mask is None else token_mask.reshape(-1).float()
        n = w.sum().clamp(min=1.0)
        load = (F.one_hot(expert, E).sum(1).float() * w[:, None]).sum(0) / (n * k)  # f_i (E,), sums to 1
        aux = z = logits.new_zeros(())
        if cfg.aux_loss_coef:  # Switch eq. 4: alpha * E * sum_i f_i P_i, P_i = mean router probability of i
            aux = cfg.aux_loss_coef * E * (load * (probs * w[:, None]).sum(0) / n).sum()
        if cfg.z_loss_coef:    # ST-MoE eq. 5: beta * mean over tokens of logsumexp(router logits)^2
            z = cfg.z_loss_coef * (torch.logsumexp(logits, dim=-1).pow(2) * w).sum() / n
        return y.reshape(shape), MoEStats(aux, z, load)


# ----------------------------------------------------------------------------------------------------------
# Blocks and stacks


class EncoderBlock(nn.Module):
    def __init__(self, cfg: ROT5Config, moe: bool):
        super().__init__()
        self.attn_norm, self.attn = RMSNorm(cfg.d_model, cfg.norm_eps), EncoderSelfAttention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = SwitchFFN(cfg) if moe else FFN(cfg)
        self.moe, self.dropout = moe, nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, mask: Tensor | None, rope: tuple[Tensor, Tensor] | None,
                token_mask: Tensor | None, stats: list[MoEStats], unpadded: Unpadded | None) -> Tensor:
        x = x + self.dropout(self.attn(self.attn_norm(x), mask, rope, unpadded))
        return x + self.dropout(ffn_forward(self, self.ffn_norm(x), token_mask, stats))


class DecoderBlock(nn.Module):
    def __init__(self, cfg: ROT5Config, moe: bool):
        super().__init__()
        self.self_norm, self.self_attn = RMSNorm(cfg.d_model, cfg.norm_eps), DecoderSelfAttention(cfg)
        self.cross_norm, self.cross_attn = RMSNorm(cfg.d_model, cfg.norm_eps), CrossAttention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = SwitchFFN(cfg) if moe else FFN(cfg)
        self.moe, self.dropout = moe, nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, self_mask: Tensor | None, is_causal: bool, rope: tuple[Tensor, Tensor] | None,
                cache: Tensor | None, start: int, cross_kv: Tensor, cross_mask: Tensor | None,
                token_mask: Tensor | None, stats: list[MoEStats], unpadded: Unpadded | None) -> Tensor:
        x = x + self.dropout(self.self_attn(self.self_norm(x), self_mask, is_causal, rope, cache, start, unpadded))
        x = x + self.dropout(self.cross_attn(self.cross_norm(x), cross_kv, cross_mask, rope, unpadded))
        return x + self.dropout(ffn_forward(self, self.ffn_norm(x), token_mask, stats))


def ffn_forward(block: EncoderBlock | DecoderBlock, x: Tensor, token_mask: Tensor | None,
                stats: list[MoEStats]) -> Tensor:
    """The block's FFN; a MoE layer also appends its router statistics to the stack's `stats`."""
    if not block.moe:
        return block.ffn(x)
    y, s = block.ffn(x, token_mask)
    stats.append(s)
    return y


@dataclass
class KVCache:
    """Decoder state while generating. self_kv is allocated once and written in place, one position per
    step; cross_kv holds the encoder keys/values of every decoder layer, computed once per prompt (its beams
    share them). K/V keep n_kv_heads heads: GQA's memory saving is exactly here. Beam search trades memory
    for speed: `spare` doubles the self-attention cache."""
    self_kv: Tensor   # (n_decoder_layers, 2, B, n_kv_heads, max_len, head_dim)
    cross_kv: Tensor  # (n_decoder_layers, 2, B or B / beams, n_kv_heads, S, head_dim)
    length: int = 0   # decoder positions filled = position of the next decoder token
    spare: Tensor | None = None  # beam search: the buffer `reorder` gathers into

    def reorder(self, index: Tensor) -> None:
        """beam search: row b of the cache becomes row index[b] (beams of one prompt share cross_kv).
        Gathers into a spare buffer and swaps the two: no allocation and no copy back per step (3-4x
        faster on the CPU than an in-place gather of the filled positions)."""
        if self.spare is None:
            self.spare = torch.empty_like(self.self_kv)
        torch.index_select(self.self_kv, 2, index, out=self.spare)
        self.self_kv, self.spare = self.spare, self.self_kv


class Encoder(nn.Module):
    def __init__(self, cfg: ROT5Config):
        super().__init__()
        self.cfg = cfg
        self.relative_bias = RelativePositionBias(cfg, bidirectional=True) if cfg.position == "t5" else None
        self.layers = nn.ModuleList(EncoderBlock(cfg, moe=cfg.n_experts > 0 and i % 2 == 1)
                                    for i in range(cfg.n_encoder_layers))
        self.norm, self.dropout = RMSNorm(cfg.d_model, cfg.norm_eps), nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, attention_mask: Tensor | None, stats: list[MoEStats],
                unpadded: Unpadded | None = None, segment_ids: Tensor | None = None, flex: bool = False) -> Tensor:
        """x: (B, S, d) embedded input, or its (N, d) real tokens with `unpadded` (output alike);
        attention_mask: (B, S) bool, False at padding, or None; segment_ids: (B, S) for packed rows, or None."""
        S = x.shape[1] if unpadded is None else unpadded.T
        pos = torch.arange(S, device=x.device)
        bias = None if self.relative_bias is None else self.relative_bias(pos, pos)  # (1, H, S, S), all layers
        rope = None if bias is not None else rope_cos_sin(pos if segment_ids is None else segment_positions(segment_ids),
                                                          self.cfg.head_dim, self.cfg.rope_theta)
        if segment_ids is not None:  # packed rows (or FlexAttention, to which a padded row is one segment)
            mask = stack_masks(segment_ids, segment_ids, False, bias, flex, mask_dtype(x))
        else:  # one example per row: a key padding mask (B, 1, 1, S), broadcast over the queries
            mask = None if attention_mask is None else attention_mask[:, None, None, :]
            if bias is not None:
                dt = mask_dtype(x)
                mask = bias.to(dt) if mask is None else bias.to(dt).masked_fill(~mask, torch.finfo(dt).min)
        x = self.dropout(x)
        token_mask = attention_mask if unpadded is None else None  # unpadded: all real
        for layer in self.layers:
            x = layer(x, mask, rope, token_mask, stats, unpadded)
        return self.dropout(self.norm(x))


class Decoder(nn.Module):
    def __init__(self, cfg: ROT5Config):
        super().__init__()
        self.cfg = cfg
        self.relative_bias = RelativePositionBias(cfg, bidirectional=False) if cfg.position == "t5" else None
        self.layers = nn.ModuleList(DecoderBlock(cfg, moe=cfg.n_experts > 0 and i % 2 == 1)
                                    for i in range(cfg.n_decoder_layers))
        self.norm, self.dropout = RMSNorm(cfg.d_model, cfg.norm_eps), nn.Dropout(cfg.dropout)

    def encoder_rope(self, S: int, device: torch.device, segment_ids: Tensor | None = None,
                     cross_index: Tensor | None = None) -> tuple[Tensor, Tensor] | None:
        """Rotations of the cross-attention keys: encoder positions (per segment in packed rows, gathered like
        the keys with cross_index)."""
        if self.relative_bias is not None:
            return None
        pos = torch.arange(S, device=device) if segment_ids is None else segment_positions(segment_ids)
        if cross_index is not None:
            pos = pos.flatten()[cross_index.clamp(min=0)]
        return rope_cos_sin(pos, self.cfg.head_dim, self.cfg.rope_theta)

    def cross_kv(self, enc: Tensor) -> Tensor:
        """encoder output (B, S, d) -> K/V of every layer (L, 2, B, Hkv, S, Dh)."""
        rope = self.encoder_rope(enc.shape[1], enc.device)
        return torch.stack([layer.cross_attn.project_kv(enc, rope) for layer in self.layers])

    def forward(self, x: Tensor, enc: Tensor | None, enc_mask: Tensor | None, token_mask: Tensor | None,
                stats: list[MoEStats], cache: KVCache | None = None, unpadded: Unpadded | None = None,
                enc_unpadded: Unpadded | None = None, segment_ids: Tensor | None = None,
                enc_segment_ids: Tensor | None = None, cross_index: Tensor | None = None, flex: bool = False) -> Tensor:
        """x: (B, T, d) embedded decoder input at positions cache.length + [0, T) (0 without a cache), or its
        (N, d) real tokens with `unpadded` (output alike); enc: (B, S, d) encoder output, or (N_enc, d) with
        `enc_unpadded` (unused when the cache holds its K/V); enc_mask: (B, S) bool or None; token_mask: x's
        shape without d, False at tokens the router statistics skip, or None; segment_ids (B, T),
        enc_segment_ids (B_enc, S) and cross_index (B, X) or None (then B_enc = B: row b reads encoder row b):
        packed rows (training and scoring only, never with a cache)."""
        T, dev = (x.shape[1] if unpadded is None else unpadded.T), x.device
        start = 0 if cache is None else cache.length
        if cache is not None and start + T > cache.self_kv.shape[4]:
            raise ValueError(f"KV cache holds {cache.self_kv.shape[4]} positions, decoding needs {start + T}")
        q_pos, k_pos = torch.arange(start, start + T, device=dev), torch.arange(start + T, device=dev)
        bias = None if self.relative_bias is None else self.relative_bias(q_pos, k_pos)  # (1, H, T, start + T)
        rope = None if bias is not None else rope_cos_sin(q_pos if segment_ids is None else segment_positions(segment_ids),
                                                          self.cfg.head_dim, self.cfg.rope_theta)
        is_causal = False
        if segment_ids is not None:  # packed rows (or FlexAttention, to which a padded row is one segment)
            self_mask = stack_masks(segment_ids, segment_ids, True, bias, flex, mask_dtype(x))
            cross_mask = stack_masks(segment_ids, enc_segment_ids, False, None, flex, mask_dtype(x), cross_index)
        else:  # one example per row: causal self-attention, a key padding mask (B, 1, 1, S) for cross-attention
            future = k_pos[None, :] > q_pos[:, None]                                 # (T, start + T)
            if bias is not None:
                dt = mask_dtype(x)
                self_mask = bias.to(dt).masked_fill(future, torch.finfo(dt).min)
            else:
                is_causal = cache is None                     # lets SDPA pick a fused causal kernel
                self_mask = None if is_causal or T == 1 else ~future
            cross_mask = None if enc_mask is None else enc_mask[:, None, None, :]
        enc_rope = None if cache is not None else self.encoder_rope(  # cached K/V are rotated already
            enc.shape[1] if enc_unpadded is None else enc_unpadded.T, dev, enc_segment_ids, cross_index)
        x = self.dropout(x)
        for i, layer in enumerate(self.layers):
            kv = layer.cross_attn.project_kv(enc, enc_rope, enc_unpadded, cross_index) if cache is None \
                else cache.cross_kv[i]
            x = layer(x, self_mask, is_causal, rope, None if cache is None else cache.self_kv[i], start,
                      kv, cross_mask, token_mask, stats, unpadded)
        if cache is not None:
            cache.length += T
        return self.dropout(self.norm(x))


# ----------------------------------------------------------------------------------------------------------
# The model


class ROT5(nn.Module):
    """The encoder-decoder: shared token embedding, Encoder, Decoder, output layer (tied or not)."""

    def __init__(self, cfg: ROT5Config):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)  # shared by encoder and decoder (as T5)
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)

    @torch.no_grad()
    def _init_weights(self, m: nn.Module) -> None:
        """Mesh TF / HF T5 init: every std is fan_in**-0.5 except the query, whose extra head_dim**-0.5 is
        the attention's missing 1/sqrt(head_dim); embeddings N(0, 1) (the tied output is rescaled instead)."""
        cfg = self.cfg
        d, inner, q_std = cfg.d_model, cfg.n_heads * cfg.head_dim, (cfg.d_model * cfg.head_dim) ** -0.5
        if isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=1.0 if m is self.embed else d ** -0.5)  # else: relative bias table
        elif isinstance(m, (EncoderSelfAttention, DecoderSelfAttention)):
            nn.init.normal_(m.qkv.weight, std=d ** -0.5)
            nn.init.normal_(m.qkv.weight[:inner], std=q_std)
            nn.init.normal_(m.o.weight, std=inner ** -0.5)
        elif isinstance(m, CrossAttention):
            nn.init.normal_(m.q.weight, std=q_std)
            nn.init.normal_(m.kv.weight, std=d ** -0.5)
            nn.init.normal_(m.o.weight, std=inner ** -0.5)
        elif isinstance(m, FFN):
            nn.init.normal_(m.wi.weight, std=d ** -0.5)
            nn.init.normal_(m.wo.weight, std=cfg.d_ff ** -0.5)
        elif isinstance(m, SwitchFFN):  # Switch sec. 2.4: small init (scale 0.1) keeps early routing soft
            std = (0.1 / d) ** 0.5
            nn.init.trunc_normal_(m.router.weight, std=std, a=-2 * std, b=2 * std)
        elif m is self.lm_head:
            nn.init.normal_(m.weight, std=d ** -0.5)

    # -- forward ----------------------------------------------------------------------------------------

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                decoder_input_ids: Tensor | None = None, labels: Tensor | None = None,
                segment_ids: Tensor | None = None, decoder_segment_ids: Tensor | None = None,
                cross_index: Tensor | None = None) -> ROT5Output:
        """input_ids: (B, S); attention_mask: (B, S), 1/True at real tokens; decoder_input_ids: (B, T),
        default labels shifted right after the start token (pad); labels: (B, T), -100 = ignore.
        With labels, only positions with a label reach the lm_head and `logits` is None.
        Packed rows (several examples per row, ul2.py): segment_ids (B, S) and decoder_segment_ids (B_dec, T),
        0 at padding and k at the tokens of example k on both sides; attention_mask, if given, must be
        segment_ids > 0, and the default decoder inputs restart with the start token in every segment. Decoder
        row b reads encoder row b, or, with cross_index (B_dec, X), the flat encoder positions
        cross_index[b] = b' * S + s (-1: none; ul2.pack_examples lists each row's examples' inputs)."""
        packed = segment_ids is not None or decoder_segment_ids is not None
        if packed:
            attention_mask = self._check_segments(input_ids, attention_mask, segment_ids, decoder_segment_ids,
                                                  decoder_input_ids if labels is None else labels, cross_index)
        elif cross_index is not None:
            raise ValueError("cross_index is for packed rows: pass segment_ids and decoder_segment_ids with it")
        attention_mask = self._check_inputs(input_ids, attention_mask)
        if labels is not None:
            self._check_ids(labels, "labels", allow_ignore=True)
            if (labels == -100).all():  # the mean over no tokens is NaN
                raise ValueError("labels are all -100 (ignored): a batch needs at least one token to predict")
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("pass decoder_input_ids or labels (decoder inputs are labels shifted right)")
            decoder_input_ids = self.shift_right(labels, decoder_segment_ids)
        self._check_ids(decoder_input_ids, "decoder_input_ids")
        if labels is not None and labels.shape != decoder_input_ids.shape:
            raise ValueError(f"labels {tuple(labels.shape)} and decoder_input_ids {tuple(decoder_input_ids.shape)} "
                             "must have the same shape")
        if cross_index is None and decoder_input_ids.shape[0] != input_ids.shape[0]:  # (it would read as beams)
            raise ValueError(f"decoder batch {decoder_input_ids.shape[0]} != encoder batch {input_ids.shape[0]}: "
                             "pass one decoder row per input row")

        stats: list[MoEStats] = []
        flex = use_flex(input_ids, self.training, self.cfg.dropout)
        # Skip padding (Unpadded): the encoder never attends to it, and the decoder (causal) never attends to
        # positions after a row's last label. torch.compile wants fixed shapes: it keeps the padded layout.
        skip_pad = not torch.compiler.is_compiling()
        enc_unpadded = Unpadded.of(attention_mask) if skip_pad and attention_mask is not None else None
        enc_seg, dec_seg = segment_ids, decoder_segment_ids
        if flex and not packed:  # FlexAttention takes its masks from segment ids: a padded row is one segment
            enc_seg = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
            dec_seg = torch.ones_like(decoder_input_ids)   # (causal: a row's trailing padding is never attended)
        enc = self.encoder(self.embed(input_ids if enc_unpadded is None else enc_unpadded.unpad(input_ids)),
                           attention_mask, stats, enc_unpadded, enc_seg, flex)
        dec_unpadded = None
        if packed:  # decoder positions of the examples; the router statistics skip the rest
            dec_tokens = decoder_segment_ids > 0
            dec_unpadded = Unpadded.of(dec_tokens) if skip_pad else None
        elif labels is not None:
            dec_tokens = labels != -100
            up_to_last_label = dec_tokens.flip(1).cumsum(1).flip(1) > 0
            dec_unpadded = Unpadded.of(up_to_last_label) if skip_pad else None
        else:  # decoder pads: pad ids after the start token, which is a pad id too
            dec_tokens = decoder_input_ids != self.cfg.pad_token_id
            dec_tokens[:, 0] = True
        if dec_unpadded is not None:
            decoder_input_ids, dec_tokens = dec_unpadded.unpad(decoder_input_ids), dec_unpadded.unpad(dec_tokens)
        h = self.decoder(self.embed(decoder_input_ids), enc, attention_mask, dec_tokens, stats, None, dec_unpadded,
                         enc_unpadded, dec_seg, enc_seg, cross_index, flex)

        loss = logits = None
        if labels is not None:  # gather first: the (N, V) logits are the largest activation of the model
            label_at = labels != -100
            logits_sel = self.lm_logits(h[label_at if dec_unpadded is None else dec_unpadded.unpad(label_at)])
            loss = F.cross_entropy(logits_sel.float(), labels[label_at].long())
        else:
            logits = self.lm_logits(h)
            logits = logits if dec_unpadded is None else dec_unpadded.pad(logits)  # (B, T, V), 0 at padding
        zero = h.new_zeros((), dtype=torch.float32)
        return ROT5Output(loss, logits, sum((s.aux_loss for s in stats), zero), sum((s.z_loss for s in stats), zero),
                          torch.stack([s.load for s in stats]) if stats else None)

    def lm_logits(self, h: Tensor) -> Tensor:
        if self.lm_head is None:  # v1.0: the scale keeps logits O(1) with N(0, 1) embeddings (Mesh TF)
            return F.linear(h * self.cfg.d_model ** -0.5, self.embed.weight)
        return self.lm_head(h)

    def shift_right(self, labels: Tensor, segment_ids: Tensor | None = None) -> Tensor:
        """decoder inputs for teacher forcing: [start, y_0 .. y_{T-2}], start = pad, -100 -> pad; with
        segment_ids (packed rows), every segment starts with its own start token."""
        pad = self.cfg.pad_token_id
        dec = torch.cat([labels.new_full((labels.shape[0], 1), pad), labels[:, :-1]], dim=1)
        if segment_ids is not None:
            dec[:, 1:].masked_fill_(segment_ids[:, 1:] != segment_ids[:, :-1], pad)
        return dec.masked_fill(dec == -100, pad)

    def encode(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """(B, S) ids -> (B, S, d_model) encoder output (MoE statistics are dropped)."""
        return self._encode(input_ids, self._check_inputs(input_ids, attention_mask))

    def _encode(self, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        unpadded = None if attention_mask is None else Unpadded.of(attention_mask)  # skip the padding, as forward
        if unpadded is None:
            return self.encoder(self.embed(input_ids), attention_mask, [])
        return unpadded.pad(self.encoder(self.embed(unpadded.unpad(input_ids)), attention_mask, [], unpadded))

    def new_cache(self, enc: Tensor, max_len: int, beams: int = 1) -> KVCache:
        """KV cache for decoding up to max_len positions against encoder output enc (B, S, d), for B * beams
        sequences (rows b*beams .. b*beams+beams-1 decode against prompt b; they share its cross K/V)."""
        cross = self.decoder.cross_kv(enc)
        L, _, B, Hkv, _, Dh = cross.shape
        return KVCache(cross.new_zeros(L, 2, B * beams, Hkv, max_len, Dh), cross)

    def decode_step(self, decoder_input_ids: Tensor, attention_mask: Tensor | None, cache: KVCache) -> Tensor:
        """Feed (B, T) decoder tokens at positions cache.length.. (T = 1 when generating); returns their
        logits (B, T, V) in fp32 and advances the cache. attention_mask: the encoder's (B, S) mask."""
        if attention_mask is not None:
            attention_mask = attention_mask.bool()
        h = self.decoder(self.embed(decoder_input_ids), None, attention_mask, None, [], cache)
        return self.lm_logits(h).float()

    # -- input checks -----------------------------------------------------------------------------------

    def _check_ids(self, ids: Tensor, name: str, allow_ignore: bool = False) -> None:
        if not isinstance(ids, Tensor) or ids.dtype not in (torch.int64, torch.int32):
            what = ids.dtype if isinstance(ids, Tensor) else type(ids).__name__
            raise ValueError(f"{name} must be an int64 tensor of token ids, got {what}")
        if ids.dim() != 2 or ids.numel() == 0:
            raise ValueError(f"{name} must have shape (batch, length) with length > 0, got {tuple(ids.shape)}")
        valid = (ids >= 0) & (ids < self.cfg.vocab_size)
        if allow_ignore:
            valid |= ids == -100
        if not valid.all():
            bad = ids[~valid][0].item()
            raise ValueError(f"{name} contains id {bad}, outside the vocabulary [0, {self.cfg.vocab_size})"
                             f"{' (or -100 = ignore)' if allow_ignore else ''}: tokenizer and model config disagree")

    def _check_segments(self, input_ids: Tensor, attention_mask: Tensor | None, segment_ids: Tensor | None,
                        decoder_segment_ids: Tensor | None, decoder_ids: Tensor | None,
                        cross_index: Tensor | None) -> Tensor:
        """Packed rows: both segment id tensors, non-negative ints shaped like their ids, cross_index (if given)
        one row per decoder row of encoder positions or -1, and every decoder segment finds the encoder segment
        of its id where its row reads (else its cross-attention would have nothing to read).
        Returns the attention mask they imply."""
        if segment_ids is None or decoder_segment_ids is None:
            raise ValueError("packed rows need both segment_ids and decoder_segment_ids (ul2.UL2Batches(pack=True) "
                             "makes both)")
        for name, seg, ids in (("segment_ids", segment_ids, input_ids),
                               ("decoder_segment_ids", decoder_segment_ids, decoder_ids)):
            shape = None if not isinstance(ids, Tensor) else tuple(ids.shape)
            if not isinstance(seg, Tensor) or seg.dtype not in (torch.int64, torch.int32) or tuple(seg.shape) != shape:
                raise ValueError(f"{name} must be an int tensor shaped like its token ids {shape}")
            if (seg < 0).any():
                raise ValueError(f"{name} must be >= 0 (0 = padding, k = example k of the batch)")
        implied = segment_ids > 0
        if attention_mask is not None and not torch.equal(attention_mask.bool(), implied):
            raise ValueError("attention_mask must be segment_ids > 0 for packed rows (or leave it out)")
        read = segment_ids                                   # the encoder segment ids each decoder row reads
        if cross_index is not None:
            if (not isinstance(cross_index, Tensor) or cross_index.dtype not in (torch.int64, torch.int32)
                    or cross_index.dim() != 2 or len(cross_index) != len(decoder_segment_ids)):
                raise ValueError("cross_index must be an int tensor with one row per decoder row "
                                 f"({len(decoder_segment_ids)})")
            if ((cross_index < -1) | (cross_index >= segment_ids.numel())).any():
                raise ValueError(f"cross_index must hold encoder positions in [0, {segment_ids.numel()}) or -1")
            read = read_segments(segment_ids, cross_index)
        elif len(segment_ids) != len(decoder_segment_ids):
            raise ValueError(f"{len(decoder_segment_ids)} decoder rows read {len(segment_ids)} encoder rows: "
                             "pass cross_index (ul2.pack_examples makes it) or one decoder row per encoder row")
        n = int(torch.maximum(read.max(), decoder_segment_ids.max())) + 1
        present = torch.zeros(len(read), n, dtype=torch.bool, device=read.device)
        present.scatter_(1, read.long(), True)
        present[:, 0] = True   # decoder padding
        if not present.gather(1, decoder_segment_ids.long()).all():
            raise ValueError("a decoder segment has no encoder segment with its id where its row reads: example k "
                             "must be segment k on both sides, and cross_index must list its encoder positions")
        return implied

    def _check_inputs(self, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor | None:
        self._check_ids(input_ids, "input_ids")
        if attention_mask is None:
            return None
        if not isinstance(attention_mask, Tensor) or attention_mask.shape != input_ids.shape:
            got = tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else type(attention_mask).__name__
            raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, got {got}")
        attention_mask = attention_mask.bool()
        empty = ~attention_mask.any(1)
        if empty.any():  # its cross-attention would have nothing to attend to: no defined output
            raise ValueError(f"input row {int(empty.nonzero()[0])} is all padding (attention_mask all 0): every "
                             "input needs at least one real token; drop empty rows")
        return attention_mask

    # -- generation -------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None, max_new_tokens: int = 64,
                 num_beams: int = 1, do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, eos_token_id: int | None = None,
                 generator: torch.Generator | None = None, suppress_tokens: list[int] | Tensor | None = None) -> Tensor:
        """Greedy (default), sampling (do_sample, with temperature -> top_k -> top_p filtering, as HF) or beam
        search (num_beams > 1, HF's algorithm and defaults). Returns (B, <= max_new_tokens) ids without the
        start token: eos, then pad for sequences that finished early. suppress_tokens: ids never generated
        (HF's SuppressTokensLogitsProcessor), e.g. sentinels when continuing a story. Call model.eval() first."""
        eos = self.cfg.eos_token_id if eos_token_id is None else eos_token_id
        suppress = None if suppress_tokens is None or len(suppress_tokens) == 0 else \
            torch.as_tensor(suppress_tokens, dtype=torch.long, device=input_ids.device)
        if suppress is not None:
            self._check_ids(suppress[None], "suppress_tokens")
        if max_new_tokens < 1 or num_beams < 1 or temperature <= 0:
            raise ValueError(f"need max_new_tokens >= 1, num_beams >= 1, temperature > 0; got {max_new_tokens}, "
                             f"{num_beams}, {temperature}")
        if num_beams > 1 and do_sample:
            raise ValueError("beam search is deterministic here: use num_beams=1 with do_sample=True")
        attention_mask = self._check_inputs(input_ids, attention_mask)
        enc = self._encode(input_ids, attention_mask)
        if num_beams > 1:
            return self._beam_search(enc, attention_mask, max_new_tokens, num_beams, eos, suppress)

        B, pad = input_ids.shape[0], self.cfg.pad_token_id
        cache = self.new_cache(enc, max_new_tokens)
        out = input_ids.new_full((B, max_new_tokens), pad)
        tok = input_ids.new_full((B, 1), pad)  # decoder start token
        done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        for t in range(max_new_tokens):
            logits = self.decode_step(tok, attention_mask, cache)[:, -1]  # (B, V)
            if suppress is not None:
                logits[:, suppress] = -math.inf
            if do_sample:
                nxt = torch.multinomial(filter_logits(logits / temperature, top_k, top_p).softmax(-1), 1,
                                        generator=generator)[:, 0]
            else:
                nxt = logits.argmax(-1)
            nxt = nxt.masked_fill(done, pad)
            out[:, t] = nxt
            done |= nxt == eos
            if done.all():
                return out[:, : t + 1]
            tok = nxt[:, None]
        return out

    def _beam_search(self, enc: Tensor, attention_mask: Tensor | None, max_new_tokens: int, K: int,
                     eos: int, suppress: Tensor | None) -> Tensor:
        """HF transformers' beam search (generation/utils.py `_beam_search`) with its defaults
        (length_penalty=1, early_stopping=False), step for step:
        - each step keeps the top 2K (beam, token) continuations by summed log-prob over all K beams;
        - continuations that end (eos, or the length limit) and rank in the top K become finished
          hypotheses scored sum_logprobs / n_generated (length_penalty = 1; n counts eos); the best K are kept;
        - the best K continuations that did not end are the next beams (cache reordered to follow them);
        - a prompt stops once K hypotheses are finished and its best running beam, scored with its
          current length, cannot beat the worst of them; the search stops when every prompt has."""
        B = enc.shape[0]
        V, pad, dev, NEG = self.cfg.vocab_size, self.cfg.pad_token_id, enc.device, -1.0e9
        cache = self.new_cache(enc, max_new_tokens, beams=K)  # rows b*K .. b*K+K-1 are the beams of prompt b

        seqs = torch.full((B, K, max_new_tokens), pad, dtype=torch.long, device=dev)   # running beams
        scores = torch.zeros(B, K, device=dev)
        scores[:, 1:] = NEG                    # all beams start identical: only expand the first one
        fin_seqs, fin_scores = seqs.clone(), torch.full((B, K), NEG, device=dev)
        fin_done = torch.zeros(B, K, dtype=torch.bool, device=dev)
        fin_len = torch.zeros(B, K, dtype=torch.long, device=dev)
        improvable = torch.ones(B, 1, dtype=torch.bool, device=dev)
        top_k_mask = torch.arange(2 * K, device=dev) < K
        offsets = torch.arange(B, device=dev)[:, None] * K
        tok = torch.full((B * K, 1), pad, dtype=torch.long, device=dev)
        for t in range(max_new_tokens):
            logits = self.decode_step(tok, attention_mask, cache)[:, -1]          # (B K, V)
            logp = logits.log_softmax(-1)
            if suppress is not None:  # after the softmax, as HF applies logits processors in beam search
                logp[:, suppress] = -math.inf
            logp = logp.view(B, K, V) + scores[..., None]
            cand_scores, idx = logp.view(B, K * V).topk(2 * K)                 # (B, 2K)
            beam, token = idx // V, idx % V
            cand = seqs.gather(1, beam[..., None].expand(-1, -1, max_new_tokens))   # (B, 2K, max_new_tokens)
            cand[:, :, t] = token
            ends = (token == eos) | (t + 1 == max_new_tokens)

            # next running beams: the best K continuations that did not end
            run_scores = cand_scores + ends.float() * NEG
            keep = run_scores.topk(K).indices
            seqs = cand.gather(1, keep[..., None].expand(-1, -1, max_new_tokens))
            scores, src = run_scores.gather(1, keep), beam.gather(1, keep)

            # finished hypotheses: merge the newly ended top-K continuations into the best K so far
            new_fin = ends & top_k_mask
            fin_cand = cand_scores / (t + 1) + (~improvable).float() * NEG + (~new_fin).float() * NEG
            all_scores = torch.cat([fin_scores, fin_cand], 1)
            best = all_scores.topk(K).indices
            fin_scores = all_scores.gather(1, best)
            fin_seqs = torch.cat([fin_seqs, cand], 1).gather(1, best[..., None].expand(-1, -1, max_new_tokens))
            fin_done = torch.cat([fin_done, new_fin], 1).gather(1, best)
            fin_len = torch.cat([fin_len, torch.full_like(cand_scores, t + 1, dtype=torch.long)], 1).gather(1, best)

            cache.reorder((src + offsets).flatten())
            tok = seqs[:, :, t].reshape(B * K, 1)
            worst_fin = torch.where(fin_done, fin_scores.min(1, keepdim=True).values, NEG)
            improvable &= (scores[:, :1] / (t + 1) > worst_fin).any(1, keepdim=True)
            if not improvable.any() or ends.all():
                break
        best_seqs = fin_seqs[:, 0]
        return best_seqs[:, : int(fin_len[:, 0].max())]

    # -- conversion and accounting ----------------------------------------------------------------------

    @classmethod
    def from_hf_t5(cls, hf_model: nn.Module) -> ROT5:
        """Hugging Face T5ForConditionalGeneration (v1.0: relu + tied + scaled output; v1.1: gated-gelu +
        untied) -> ROT5 with position="t5", identical outputs."""
        c = hf_model.config
        ffn = {"relu": "relu", "gated-gelu": "gated-gelu"}.get(c.feed_forward_proj)
        if ffn is None:
            raise ValueError(f"feed_forward_proj={c.feed_forward_proj!r}: ROT5 supports 'relu' and 'gated-gelu'")
        sd = {k: v.detach() for k, v in hf_model.state_dict().items()}
        tied_weights = torch.equal(sd["lm_head.weight"], sd["shared.weight"])
        scaled = getattr(c, "scale_decoder_outputs", c.tie_word_embeddings)  # transformers 5 vs 4
        if scaled and not tied_weights:
            raise ValueError("HF model scales decoder outputs but has an untied lm_head: not a T5 v1.0/v1.1 layout")
        eos = c.eos_token_id[0] if isinstance(c.eos_token_id, (list, tuple)) else c.eos_token_id
        cfg = ROT5Config(vocab_size=c.vocab_size, d_model=c.d_model, n_heads=c.num_heads, head_dim=c.d_kv,
                         n_kv_heads=c.num_heads, d_ff=c.d_ff, n_encoder_layers=c.num_layers,
                         n_decoder_layers=c.num_decoder_layers, position="t5", ffn=ffn, tie_embeddings=bool(scaled),
                         dropout=float(c.dropout_rate),
                         relative_attention_num_buckets=c.relative_attention_num_buckets,
                         relative_attention_max_distance=c.relative_attention_max_distance,
                         norm_eps=c.layer_norm_epsilon, pad_token_id=c.pad_token_id, eos_token_id=eos)
        model = cls(cfg)  # (cat copies, so the new model shares no storage with hf_model)
        model.load_state_dict({ours: torch.cat([sd[t] for t in theirs]) for ours, theirs in hf_t5_names(cfg).items()},
                              strict=True)
        return model

    def to_hf_t5(self) -> nn.Module:
        """The inverse of from_hf_t5: this T5 baseline (position="t5", multi-head, dense) as a Hugging Face
        T5ForConditionalGeneration with identical outputs, on this model's device, in its train/eval mode."""
        c = self.cfg
        if c.position != "t5" or c.n_kv_heads != c.n_heads or c.n_experts:
            raise ValueError(f"only the T5 baseline (position='t5', n_kv_heads=n_heads, n_experts=0) is an HF T5 model; "
                             f"this one has position={c.position!r}, n_kv_heads={c.n_kv_heads} of n_heads={c.n_heads}, "
                             f"n_experts={c.n_experts}: export it as safetensors instead (checkpoint.py export, no --hf)")
        from transformers import T5Config, T5ForConditionalGeneration

        hf = T5ForConditionalGeneration(T5Config(
            vocab_size=c.vocab_size, d_model=c.d_model, d_kv=c.head_dim, d_ff=c.d_ff, num_layers=c.n_encoder_layers,
            num_decoder_layers=c.n_decoder_layers, num_heads=c.n_heads, feed_forward_proj=c.ffn,
            relative_attention_num_buckets=c.relative_attention_num_buckets,
            relative_attention_max_distance=c.relative_attention_max_distance, dropout_rate=c.dropout,
            layer_norm_epsilon=c.norm_eps, tie_word_embeddings=c.tie_embeddings, pad_token_id=c.pad_token_id,
            eos_token_id=c.eos_token_id, decoder_start_token_id=c.pad_token_id))
        if not c.tie_embeddings and hf.lm_head.weight is hf.shared.weight:  # transformers 5 ties them even for v1.1
            hf.lm_head.weight = nn.Parameter(torch.empty_like(hf.lm_head.weight))
        sd = self.state_dict()
        new = {t: part.detach().clone() for ours, theirs in hf_t5_names(c).items()
               for t, part in zip(theirs, sd[ours].chunk(len(theirs)))}  # equal parts: q|k|v, k|v, wi_0|wi_1 (MHA)
        # HF keeps the embedding under three more names (the same tensor, or copies of it when untied in memory)
        new |= {k: new["shared.weight"] for k in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")}
        if c.tie_embeddings:
            new["lm_head.weight"] = new["shared.weight"]
        hf.load_state_dict(new, strict=True)
        return hf.to(self.embed.weight.device).train(self.training)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Total parameters (the tied output matrix counted once); optionally without the input embedding."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if exclude_embeddings else n

    def train_flops(self, encoder_tokens: int, decoder_tokens: int, encoder_len: int, decoder_len: int) -> float:
        """FLOPs of one training step (forward + backward) over `encoder_tokens` input tokens in sequences of
        `encoder_len` and `decoder_tokens` target tokens in sequences of `decoder_len` (PaLM, Chowdhery et al.
        2022, appendix B, extended to encoder-decoders):

            C = 6 N_enc encoder_tokens + 6 N_dec decoder_tokens
              + 12 H Dh (L_enc S encoder_tokens + L_dec (T + S) decoder_tokens)

        6 = 2 FLOPs per multiply-add x 3 (forward, and twice that backward). N_enc = matmul parameters each
        input token passes through: the encoder plus every decoder layer's cross-attention K/V projection.
        N_dec = the rest of the decoder (self-attention, cross-attention Q/O, FFN) plus the output layer
        (d_model x vocab, tied or not; the embedding lookup is free). MoE layers count the router and only
        top_k experts (active parameters). The attention term counts q k^T and attn @ v (2 x 2 H Dh FLOPs per
        query-key pair) x 3: S keys per encoder query, T self + S cross keys per decoder query (causality
        is not discounted, as in PaLM). Norm weights and biases are negligible and not counted."""
        c = self.cfg
        d, H, Hkv, Dh = c.d_model, c.n_heads, c.n_kv_heads, c.head_dim
        q_o, kv = 2 * d * H * Dh, 2 * d * Hkv * Dh
        dense = d * c.d_ff * (3 if c.ffn == "gated-gelu" else 2)
        moe = d * c.n_experts + c.moe_top_k * dense

        def ffn_total(n_layers: int) -> int:
            n_moe = n_layers // 2 if c.n_experts else 0
            return n_moe * moe + (n_layers - n_moe) * dense

        n_enc = c.n_encoder_layers * (q_o + kv) + ffn_total(c.n_encoder_layers) + c.n_decoder_layers * kv
        n_dec = c.n_decoder_layers * (q_o + kv + q_o) + ffn_total(c.n_decoder_layers) + d * c.vocab_size
        attn = 12 * H * Dh * (c.n_encoder_layers * encoder_len * encoder_tokens
                              + c.n_decoder_layers * (decoder_len + encoder_len) * decoder_tokens)
        return float(6 * n_enc * encoder_tokens + 6 * n_dec * decoder_tokens + attn)


def hf_t5_names(cfg: ROT5Config) -> dict[str, tuple[str, ...]]:
    """ROT5 parameter -> the Hugging Face T5 parameters it is made of, concatenated along dim 0 (ROT5 fuses
    q|k|v, cross-attention k|v, and v1.1's wi_0|wi_1). One table for both directions: from_hf_t5 concatenates,
    to_hf_t5 splits. HF T5 keeps one relative-bias table per stack, in its block 0."""
    wi = ("wi_0", "wi_1") if cfg.ffn == "gated-gelu" else ("wi",)

    def ffn(ours: str, theirs: str) -> dict[str, tuple[str, ...]]:
        return {f"{ours}.ffn.wi.weight": tuple(f"{theirs}.DenseReluDense.{w}.weight" for w in wi),
                f"{ours}.ffn.wo.weight": (f"{theirs}.DenseReluDense.wo.weight",)}

    def attn(ours: str, theirs: str, fused: str, parts: str) -> dict[str, tuple[str, ...]]:
        return {f"{ours}.{fused}.weight": tuple(f"{theirs}.{p}.weight" for p in parts),
                f"{ours}.o.weight": (f"{theirs}.o.weight",)}

    names = {"embed.weight": ("shared.weight",),
             "encoder.norm.weight": ("encoder.final_layer_norm.weight",),
             "decoder.norm.weight": ("decoder.final_layer_norm.weight",),
             "encoder.relative_bias.bias.weight": ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",),
             "decoder.relative_bias.bias.weight": ("decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",)}
    if not cfg.tie_embeddings:
        names["lm_head.weight"] = ("lm_head.weight",)
    for i in range(cfg.n_encoder_layers):
        ours, theirs = f"encoder.layers.{i}", f"encoder.block.{i}.layer"
        names |= {f"{ours}.attn_norm.weight": (f"{theirs}.0.layer_norm.weight",),
                  f"{ours}.ffn_norm.weight": (f"{theirs}.1.layer_norm.weight",)}
        names |= attn(f"{ours}.attn", f"{theirs}.0.SelfAttention", "qkv", "qkv") | ffn(ours, f"{theirs}.1")
    for i in range(cfg.n_decoder_layers):
        ours, theirs = f"decoder.layers.{i}", f"decoder.block.{i}.layer"
        names |= {f"{ours}.self_norm.weight": (f"{theirs}.0.layer_norm.weight",),
                  f"{ours}.cross_norm.weight": (f"{theirs}.1.layer_norm.weight",),
                  f"{ours}.ffn_norm.weight": (f"{theirs}.2.layer_norm.weight",),
                  f"{ours}.cross_attn.q.weight": (f"{theirs}.1.EncDecAttention.q.weight",)}
        names |= attn(f"{ours}.self_attn", f"{theirs}.0.SelfAttention", "qkv", "qkv")
        names |= attn(f"{ours}.cross_attn", f"{theirs}.1.EncDecAttention", "kv", "kv") | ffn(ours, f"{theirs}.2")
    return names


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
