"""ROT5, the Reincarnated Open T5: a T5 encoder-decoder (Raffel et al. 2020) that can be upgraded one
ablation at a time with rotary positions, grouped-query attention and Switch mixture-of-experts FFNs.

The big picture. The encoder reads the whole input bidirectionally; the decoder writes the output left to
right, attending causally to itself and fully to the encoder output (cross-attention). With the default
config ROT5 *is* T5 v1.0 (it loads Hugging Face T5 weights exactly: hf_t5.py); each config field below
then changes one thing:

    position="rope"      learned bucketed relative bias -> rotary embeddings in all three attentions
    n_kv_heads < n_heads multi-head -> grouped-query attention (Ainslie et al. 2023), smaller KV cache
    n_experts > 0        dense FFN -> Switch MoE FFN in every other layer (Fedus et al. 2021; moe_step)
    ffn="gated-gelu", tie_embeddings=False   T5 v1.0 -> v1.1 (Shazeer 2020 GEGLU, untied output layer)
    ffn="gated-silu", scale_output=False, cross_rope=False   a Llama-family decoder's layers (SwiGLU, tied output
                         without T5's scale): an encoder-decoder adapted from one (T5Gemma; hf_llama.py)

One input layout. Every teacher-forced forward (training, evaluation, scoring) takes a `batch.Batch` of rows
with segment ids: a row holds one example (a padded row is one segment) or several (packed rows, ul2.py).
Each attention keeps to its segment, positions restart in every segment. The cached decoding step
(generate.py) is the only other path. Masks are built once per forward per stack, by the stack, and handed
to its layers with the RoPE rotations (`Attn`); the kernel -- SDPA's dense masks, or FlexAttention's block
masks -- is chosen from the config (`attention`), in one place (`use_flex`). Input checks
(`batch.check_batch`) run where batches enter, not in the forward, so that a compiled training step is one
graph with no host sync.

Map of the classes (top-down):

    ROT5             embed -> Encoder -> Decoder -> output layer; loss, router statistics, decode_step
      Encoder        EncoderBlock x n_encoder_layers: RMSNorm -> EncoderSelfAttention ; RMSNorm -> FFN | SwitchFFN
      Decoder        DecoderBlock x n_decoder_layers: RMSNorm -> DecoderSelfAttention (causal, KV cache) ;
                     RMSNorm -> CrossAttention ; RMSNorm -> FFN | SwitchFFN
      KVCache        decoder self-attention K/V written in place + encoder K/V computed once per prompt

Details that matter for exactness:
- Attention is softmax(q k^T + bias) v with NO 1/sqrt(head_dim): T5 folds that factor into the init of the
  query projection (std (d_model * head_dim)**-0.5). ROT5 keeps this convention for RoPE too, so that
  every ablation changes one thing only.
- Pre-norm residual blocks with T5's RMSNorm (no mean, no bias, variance in fp32), a final norm per stack,
  and dropout where HF T5 puts it: embeddings, FFN hidden, each sublayer output, after the final norm
  (`dropout`), and on the attention probabilities (`attention_dropout`, its own key: FlexAttention cannot
  apply it, and T5 v1.1 pre-trained without dropout).
- Tied embeddings (v1.0) scale the decoder output by d_model**-0.5 before the shared output matrix (Llama's tied
  output does not: scale_output=False).
- MoE layers are the odd-numbered ones, 1, 3, 5, ... (0-based), in both stacks (moe_step = 2; ROT5Config.moe_layer);
  `expert_load` lists the encoder's MoE layers first, then the decoder's.
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

from batch import Batch, read_segments


@dataclass
class ROT5Config:
    vocab_size: int = 32256      # ids the model embeds: the tokenizer's vocab_size (prepare.py's meta.json)
    d_model: int = 768           # width of the residual stream
    n_heads: int = 12            # query heads
    head_dim: int = 64           # width of one attention head
    n_kv_heads: int = 12         # == n_heads: multi-head; < n_heads (divides it): grouped-query attention
    d_ff: int = 3072             # hidden width of the feed-forward layers (of each expert, for MoE)
    n_encoder_layers: int = 12   # encoder blocks
    n_decoder_layers: int = 12   # decoder blocks
    position: str = "t5"         # "t5": learned bucketed relative bias | "rope"
    ffn: str = "relu"            # "relu" (T5 v1.0) | "gated-gelu" (T5 v1.1) | "gated-silu" (SwiGLU: Llama, Mistral)
    tie_embeddings: bool = True  # v1.0: shared in/out embedding, decoder output scaled by d_model**-0.5
    scale_output: bool = True    # tie_embeddings: that d_model**-0.5 scale (T5); False: none (Llama's tied output)
    n_experts: int = 0           # 0: dense FFN; > 0: Switch MoE FFN in every moe_step-th layer (Switch Transformer)
    moe_step: int = 2            # MoE layers: i % moe_step == 1 (1, 3, 5, ... for 2), every layer for 1 (HF Switch's
                                 # sparse_step)
    moe_top_k: int = 1           # experts each token is routed to (MoE)
    aux_loss_coef: float = 1e-2  # Switch eq. 4; 0 turns it off
    z_loss_coef: float = 1e-3    # ST-MoE router z-loss; 0 turns it off
    dropout: float = 0.1         # embeddings, FFN hidden, sublayer outputs, final norms (T5: 0.1)
    attention_dropout: float = 0.0  # attention probabilities (HF T5: at dropout_rate, which from_hf_t5 keeps);
                                 # 0 lets compiled CUDA runs use FlexAttention, which cannot drop them
    attention: str = "auto"      # kernel: "sdpa" | "flex" | "auto" (flex when compiled on CUDA: use_flex)
    rope_theta: float = 10000.0  # RoPE's base (position = "rope")
    cross_rope: bool = True      # position = "rope": rotate cross-attention by decoder and encoder positions;
                                 # False: no position signal there, as T5 and T5Gemma (adapted models)
    relative_attention_num_buckets: int = 32     # T5's relative-position buckets (position = "t5")
    relative_attention_max_distance: int = 128   # distance from which T5's buckets are shared (position = "t5")
    norm_eps: float = 1e-6       # RMSNorm's epsilon
    pad_token_id: int = 32000    # decoder start token too (T5)
    eos_token_id: int = 2        # end-of-sequence id: the tokenizer's

    def __post_init__(self):
        kinds = {"int": int, "float": (int, float), "bool": bool, "str": str}
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, kinds[f.type]) or (f.type != "bool" and isinstance(v, bool)):
                raise ValueError(f"ROT5Config.{f.name} must be a {f.type}, got {v!r}")
        positive = ["vocab_size", "d_model", "n_heads", "head_dim", "n_kv_heads", "d_ff", "n_encoder_layers",
                    "n_decoder_layers", "moe_top_k", "moe_step", "rope_theta", "relative_attention_num_buckets",
                    "relative_attention_max_distance", "norm_eps"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"ROT5Config.{name} must be > 0, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads} "
                             "(grouped-query attention)")
        choices = {"position": ("t5", "rope"), "ffn": ("relu", "gated-gelu", "gated-silu"),
                   "attention": ("auto", "sdpa", "flex")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be {' or '.join(map(repr, allowed))}, got {getattr(self, name)!r}")
        if self.position == "rope" and self.head_dim % 2:
            raise ValueError(f"position='rope' rotates pairs of features: head_dim must be even, got {self.head_dim}")
        if self.n_experts < 0:
            raise ValueError(f"n_experts must be >= 0 (0 = dense FFN), got {self.n_experts}")
        if self.n_experts and self.moe_top_k > self.n_experts:
            raise ValueError(f"moe_top_k={self.moe_top_k} must be <= n_experts={self.n_experts}")
        for name in ("aux_loss_coef", "z_loss_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0 = off), got {getattr(self, name)}")
        for name in ("dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.attention == "flex" and self.attention_dropout:
            raise ValueError(f"attention='flex' cannot apply attention_dropout={self.attention_dropout}: set "
                             "attention_dropout=0, or attention='auto' (SDPA where dropout is on)")
        for name in ("pad_token_id", "eos_token_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, vocab_size={self.vocab_size})")

    def moe_layer(self, i: int) -> bool:
        """Whether layer i (0-based, in either stack) is a Switch FFN: every moe_step-th layer from layer 1, or every
        layer for moe_step 1 -- HF SwitchTransformers' rule (i % sparse_step == 1), so its checkpoints load as they are."""
        return self.n_experts > 0 and (self.moe_step == 1 or i % self.moe_step == 1)


# ----------------------------------------------------------------------------------------------------------
# Building blocks: norm, positions


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
    pos: (T,) -> cos, sin: (T, head_dim) in fp32 (angles of large positions need fp32); per-token positions
    (B, T) -> (B, 1, T, head_dim), which broadcasts over the heads of (B, H, T, Dh)."""
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


def segment_positions(segment_ids: Tensor) -> Tensor:
    """(B, T) segment ids (examples contiguous) -> each token's position in its segment, 0, 1, 2, ...
    restarting wherever the id changes. Within one segment, row offsets differ by the same i - j as positions
    do, so T5's relative bias needs only the row offsets; RoPE rotates with these."""
    col = torch.arange(segment_ids.shape[1], device=segment_ids.device).expand_as(segment_ids)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return col - torch.where(starts, col, 0).cummax(1).values


# ----------------------------------------------------------------------------------------------------------
# Masks and the attention kernel. Every attention keeps to its segment -- encoder self: same segment; decoder
# self: same segment and causal; cross: decoder segment k reads encoder segment k only. A stack builds its
# masks once per forward, in the form its kernel takes:
#   SDPA: a dense (B, 1, Tq, Tk) mask (bool, or the T5 bias with -inf-like entries): eager, CPU, dropout;
#   FlexAttention (Dong et al. 2024): a BlockMask from the segment ids, so blocks of other segments are
#   skipped, not computed and masked, and the bias as a score_mod, so no (B, H, T, T) tensor exists. It
#   compiles to one fused kernel; eager it is a slow reference, and on the CPU it has no backward.


class FlexMask(NamedTuple):
    block_mask: BlockMask
    score_mod: Callable | None   # (score, b, h, q, k) -> score + bias[h, q, k]; None without a bias


class Attn(NamedTuple):
    """What one attention needs besides its input, built once per forward by its stack (the caller builds
    the masks, as in nai-t5) and shared by all of the stack's layers."""
    mask: Tensor | FlexMask | None    # SDPA: bool (True = attend) or additive float, broadcastable to
                                      # (B, H, Tq, Tk); FlexAttention: block mask + score_mod; None: attend all
    rope: tuple[Tensor, Tensor] | None   # cos, sin of the query positions (and of the keys, in self-attention)


def use_flex(cfg: ROT5Config, x: Tensor, training: bool) -> bool:
    """The kernel the config asks for. "auto": FlexAttention where it is fast and exact -- compiled on CUDA,
    without attention dropout (which it cannot apply) -- else SDPA. (is_compiling is a constant when traced.)"""
    if cfg.attention != "auto":
        return cfg.attention == "flex"
    return x.is_cuda and torch.compiler.is_compiling() and not (training and cfg.attention_dropout > 0)


def same_segment(q_seg: Tensor, k_seg: Tensor, k: Tensor) -> Tensor:
    """The rule of every teacher-forced attention, on segment ids and key positions k that broadcast (whole
    tensors for SDPA, one (query, key) pair at a time in FlexAttention's mask_mod): a query attends the keys
    of its own segment. A padding query (segment 0) attends key 0 alone: its output is never used, a softmax
    over no key would be NaN in SDPA, and more keys would make FlexAttention compute every key block for the
    query blocks that end the rows."""
    return torch.where(q_seg > 0, q_seg == k_seg, k == 0)


def segment_mask(q_seg: Tensor, k_seg: Tensor, causal: bool, bias: Tensor | None, flex: bool,
                 dtype: torch.dtype, k_index: Tensor | None = None) -> Tensor | FlexMask:
    """The mask of one stack's attentions: SDPA's dense mask (the bias (1, H, Tq, Tk) added when given), or
    FlexAttention's block mask and score_mod. k_index (B, Tk): the keys are the positions k_index of k_seg
    (cross-attention of packed rows); FlexAttention's mask_mod reads through it, as inductor's CPU kernel
    takes only stored id tensors."""
    if not flex:
        k_ids = k_seg if k_index is None else read_segments(k_seg, k_index)
        allowed = same_segment(q_seg[:, :, None], k_ids[:, None, :], torch.arange(k_ids.shape[1], device=k_ids.device))
        if causal:
            allowed &= torch.ones(q_seg.shape[1], k_ids.shape[1], dtype=torch.bool, device=q_seg.device).tril()
        allowed = allowed[:, None]
        return allowed if bias is None else bias.to(dtype).masked_fill(~allowed, torch.finfo(dtype).min)

    def mask_mod(b, h, q, k):
        key_seg = k_seg[b, k] if k_index is None else read_segments(k_seg, k_index[b, k])
        allowed = same_segment(q_seg[b, q], key_seg, k)
        return allowed & (k <= q) if causal else allowed

    score_mod = None if bias is None else (lambda score, b, h, q, k: score + bias[0, h, q, k])
    Tk = k_seg.shape[1] if k_index is None else k_index.shape[1]
    block_mask = create_block_mask(mask_mod, q_seg.shape[0], None, q_seg.shape[1], Tk, device=q_seg.device)
    return FlexMask(block_mask, score_mod)


def mask_dtype(x: Tensor) -> torch.dtype:
    """dtype SDPA will see for q under autocast: float masks must match it."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | FlexMask | None, dropout: float) -> Tensor:
    """softmax(q k^T + mask) v with T5's scale = 1. q: (B, H, Tq, Dh); k, v: (B, Hkv, Tk, Dh), Hkv divides H;
    query head h reads K/V head h // (H / Hkv) (GQA, Ainslie et al. 2023). Returns (B, Tq, H*Dh)."""
    B, H, Tq, Dh = q.shape
    if isinstance(mask, FlexMask):  # (no dropout: ROT5Config and use_flex never pick Flex with it)
        # (contiguous: inductor's CPU template reads q/k/v as 4-d buffers; on CUDA the copy fuses into rope)
        y = flex_attention(q.contiguous(), k.contiguous(), v.contiguous(), score_mod=mask.score_mod,
                           block_mask=mask.block_mask, scale=1.0, enable_gqa=H != k.shape[1])
        return y.transpose(1, 2).flatten(2)
    groups = H // k.shape[1]
    if groups > 1 and mask is not None:
        if mask.shape[1] == 1 and mask.shape[2] == 1:
            # one mask row for all heads and queries (the prompts' padding, when decoding): the `groups` query
            # heads that share a K/V head are just more queries of it, (B, H, Tq, Dh) -> (B, Hkv, groups Tq, Dh)
            q = q.reshape(B, H // groups, groups * Tq, Dh)
        else:  # SDPA's enable_gqa is exact, but with a mask CUDA falls back to the slow math kernel: expand
            k = k[:, :, None].expand(-1, -1, groups, -1, -1).flatten(1, 2)
            v = v[:, :, None].expand(-1, -1, groups, -1, -1).flatten(1, 2)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=1.0,
                                       enable_gqa=q.shape[1] != k.shape[1])
    return y.reshape(B, H, Tq, Dh).transpose(1, 2).flatten(2)


def split_heads(x: Tensor, *heads: int) -> list[Tensor]:
    """Fused projection (B, T, (h1 + h2 + ...) Dh) -> (B, h1, T, Dh), (B, h2, T, Dh), ..."""
    B, T, C = x.shape
    Dh = C // sum(heads)
    return [part.view(B, T, h, Dh).transpose(1, 2) for part, h in zip(x.split([h * Dh for h in heads], -1), heads)]


# ----------------------------------------------------------------------------------------------------------
# The three attentions. Deliberately three small modules rather than one with modes: they differ in
# masking (segment / causal segment / segment across sides), in positions (both sides from one sequence vs.
# decoder query and encoder key) and in caching (none / grows one token per step / computed once per prompt).


class EncoderSelfAttention(nn.Module):
    """Bidirectional: every input token attends to every token of its example."""

    def __init__(self, cfg: ROT5Config):
        super().__init__()
        self.cfg = cfg
        self.qkv = nn.Linear(cfg.d_model, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, bias=False)
        self.o = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def forward(self, x: Tensor, attn: Attn) -> Tensor:
        q, k, v = split_heads(self.qkv(x), self.cfg.n_heads, self.cfg.n_kv_heads, self.cfg.n_kv_heads)
        if attn.rope is not None:
            q, k = apply_rope(q, *attn.rope), apply_rope(k, *attn.rope)
        return self.o(attend(q, k, v, attn.mask, self.cfg.attention_dropout if self.training else 0.0))


class DecoderSelfAttention(nn.Module):
    """Causal: output token i attends to output tokens <= i. When generating, the keys/values of earlier
    tokens come from the cache; only the new tokens' K/V are computed and written in (KVCache.update)."""

    def __init__(self, cfg: ROT5Config, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.qkv = nn.Linear(cfg.d_model, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, bias=False)
        self.o = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def forward(self, x: Tensor, attn: Attn, cache: KVCache | None) -> Tensor:
        q, k, v = split_heads(self.qkv(x), self.cfg.n_heads, self.cfg.n_kv_heads, self.cfg.n_kv_heads)
        if attn.rope is not None:  # keys are cached already rotated: their position never changes
            q, k = apply_rope(q, *attn.rope), apply_rope(k, *attn.rope)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        return self.o(attend(q, k, v, attn.mask, self.cfg.attention_dropout if self.training else 0.0))


class CrossAttention(nn.Module):
    """Decoder queries attend to the encoder output. K/V depend only on the encoder output, so they are
    projected once per forward (or per prompt, when generating: `project_kv`). With RoPE the query is
    rotated with its decoder position i and the key with its encoder position j, so the score depends on
    i - j (as T5's relative bias would; T5 itself has no position signal in cross-attention). cross_rope=False
    drops that rotation (T5Gemma): a cross-attention copied from a causal LM's self-attention has only ever
    seen keys at offsets i - j >= 0, which its rotation would place at every offset to the right instead."""

    def __init__(self, cfg: ROT5Config):
        super().__init__()
        self.cfg = cfg
        self.q = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.kv = nn.Linear(cfg.d_model, 2 * cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def project_kv(self, enc: Tensor, rope: tuple[Tensor, Tensor] | None, cross_index: Tensor | None) -> Tensor:
        """enc: (B, S, d_model) -> (2, B, Hkv, S, Dh), keys rotated with their encoder positions. Packed rows:
        cross_index (B_dec, X) picks each decoder row's encoder positions -> (2, B_dec, Hkv, X, Dh), projected
        once per encoder token, then gathered (-1 reads position 0, which the mask hides)."""
        kv = self.kv(enc)
        if cross_index is not None:
            kv = kv.flatten(0, 1)[cross_index.clamp(min=0)]
        k, v = split_heads(kv, self.cfg.n_kv_heads, self.cfg.n_kv_heads)
        return torch.stack([k if rope is None else apply_rope(k, *rope), v])

    def forward(self, x: Tensor, kv: Tensor, attn: Attn) -> Tensor:
        """kv: (2, B', Hkv, S, Dh) from project_kv, where B' may be B / K in beam search: the K beams of a
        prompt (rows b*K .. b*K+K-1) share one copy."""
        (q,) = split_heads(self.q(x), self.cfg.n_heads)
        if attn.rope is not None:
            q = apply_rope(q, *attn.rope)
        B, H, T, Dh = q.shape
        prompts = kv.shape[1]
        if prompts != B:  # beams of one prompt = more queries of that prompt: (B, H, T, Dh) -> (B', H, K T, Dh)
            q = q.view(prompts, B // prompts, H, T, Dh).transpose(1, 2).flatten(2, 3)
        y = attend(q, kv[0], kv[1], attn.mask, self.cfg.attention_dropout if self.training else 0.0)
        return self.o(y.reshape(B, T, -1))  # (B', K T, H Dh) -> (B, T, H Dh); a no-op without beams


# ----------------------------------------------------------------------------------------------------------
# Feed-forward: dense, and the Switch mixture of experts

# The Switch FFN reads how many tokens each expert got (one host read per MoE layer) to give each expert one
# batched matmul. This lets torch.compile trace those counts as symbolic sizes, so the MoE step is one graph
# too, instead of breaking the graph at each MoE layer. (It only matters where a compiled graph reads a
# tensor's value, which nothing else in ROT5 does.)
torch._dynamo.config.capture_scalar_outputs = True


class FFN(nn.Module):
    """T5 v1.0: wo(relu(wi x)). v1.1: wo(gelu(wi_0 x) * wi_1 x) (GEGLU, Shazeer 2020), with the tanh gelu
    approximation HF calls gelu_new; wi_0 and wi_1 are fused into one (2 d_ff, d_model) matrix. "gated-silu":
    wo(silu(wi_0 x) * wi_1 x) (SwiGLU, Shazeer 2020), Llama's gate_proj | up_proj and down_proj."""

    def __init__(self, cfg: ROT5Config):
        super().__init__()
        self.gated, self.silu = cfg.ffn != "relu", cfg.ffn == "gated-silu"
        self.wi = nn.Linear(cfg.d_model, (2 if self.gated else 1) * cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        if self.gated:
            gate, lin = self.wi(x).chunk(2, dim=-1)
            h = (F.silu(gate) if self.silu else F.gelu(gate, approximate="tanh")) * lin
        else:
            h = F.relu(self.wi(x))
        return self.wo(self.dropout(h))


class MoEStats(NamedTuple):
    aux_loss: Tensor             # () Switch eq. 4, coef-weighted
    z_loss: Tensor               # () ST-MoE eq. 5, coef-weighted
    load: Tensor                 # (n_experts,) f_i, sums to 1


class SwitchFFN(nn.Module):
    """Switch Transformer FFN (Fedus et al. 2021, sec. 2.1): a router picks, per token, the top-k of
    n_experts FFNs; the output is the gate-weighted sum of their outputs. Dropless: every token is processed
    (no capacity factor); assignments are sorted by expert so that each expert runs one batched matmul.
    The router's logits and choices are kept (`routing`) for `stats`, which the model computes over the real
    tokens once the stacks have run."""

    def __init__(self, cfg: ROT5Config):
        super().__init__()
        self.cfg = cfg
        self.router = nn.Linear(cfg.d_model, cfg.n_experts, bias=False)
        self.experts = nn.ModuleList(FFN(cfg) for _ in range(cfg.n_experts))
        self.routing: tuple[Tensor, Tensor] | None = None   # the last forward's (logits (N, E), experts (N, k))

    def forward(self, x: Tensor) -> Tensor:
        E, k = self.cfg.n_experts, self.cfg.moe_top_k
        flat = x.reshape(-1, x.shape[-1])
        # router in fp32: bf16 logits make the softmax and z-loss unstable (Switch sec. 2.4)
        logits = F.linear(flat.float(), self.router.weight.float())        # (N, E)
        gate, expert = logits.softmax(dim=-1).topk(k, dim=-1)              # (N, k)
        if k > 1:  # top-k: renormalised; top-1 keeps the raw p_i(x), so the router gets a gradient (sec. 2.1)
            gate = gate / gate.sum(dim=-1, keepdim=True)
        self.routing = (logits, expert)

        assignment = expert.flatten()                                      # (N k,) assignment a -> expert
        order = assignment.argsort(stable=True)
        counts = torch.zeros(E, dtype=torch.long, device=x.device).scatter_add_(0, assignment,
                                                                              torch.ones_like(assignment))
        sizes = counts.tolist()                                            # one host read per layer
        y = torch.zeros_like(flat)
        for e, tok, g in zip(self.experts, (order // k).split(sizes), gate.flatten()[order].split(sizes)):
            # (n_e, d) rows of the tokens routed to expert e, weighted by their gate
            y = y.index_add(0, tok, (e(flat.index_select(0, tok)) * g[:, None]).to(y.dtype))
        return y.view_as(x)

    def stats(self, tokens: Tensor) -> MoEStats:
        """Router statistics of the last forward over its real tokens (tokens: x's shape without d, True at real
        ones). Load balancing uses f_i = share of the k * n_tokens assignments that go to expert i (Switch's
        fraction of tokens for k = 1); it is minimal, = aux_loss_coef, under uniform routing for any k."""
        cfg, (logits, expert) = self.cfg, self.routing
        E, k = cfg.n_experts, cfg.moe_top_k
        w = tokens.reshape(-1).float()
        n = w.sum().clamp(min=1.0)
        # f_i (E,), sums to 1 (a scatter, not one_hot: one_hot reads the ids' range back to the host)
        load = torch.zeros(E, device=w.device).scatter_add_(0, expert.flatten(), w.repeat_interleave(k)) / (n * k)
        aux = z = logits.new_zeros(())
        if cfg.aux_loss_coef:  # Switch eq. 4: alpha * E * sum_i f_i P_i, P_i = mean router probability of i
            aux = cfg.aux_loss_coef * E * (load * (logits.softmax(-1) * w[:, None]).sum(0) / n).sum()
        if cfg.z_loss_coef:    # ST-MoE eq. 5: beta * mean over tokens of logsumexp(router logits)^2
            z = cfg.z_loss_coef * (torch.logsumexp(logits, dim=-1).pow(2) * w).sum() / n
        return MoEStats(aux, z, load)


# ----------------------------------------------------------------------------------------------------------
# Blocks, the KV cache, the stacks


class EncoderBlock(nn.Module):
    def __init__(self, cfg: ROT5Config, moe: bool):
        super().__init__()
        self.attn_norm, self.attn = RMSNorm(cfg.d_model, cfg.norm_eps), EncoderSelfAttention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = SwitchFFN(cfg) if moe else FFN(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, attn: Attn) -> Tensor:
        x = x + self.dropout(self.attn(self.attn_norm(x), attn))
        return x + self.dropout(self.ffn(self.ffn_norm(x)))


class DecoderBlock(nn.Module):
    def __init__(self, cfg: ROT5Config, moe: bool, layer: int):
        super().__init__()
        self.self_norm, self.self_attn = RMSNorm(cfg.d_model, cfg.norm_eps), DecoderSelfAttention(cfg, layer)
        self.cross_norm, self.cross_attn = RMSNorm(cfg.d_model, cfg.norm_eps), CrossAttention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = SwitchFFN(cfg) if moe else FFN(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, self_attn: Attn, cross_kv: Tensor, cross_attn: Attn, cache: KVCache | None) -> Tensor:
        x = x + self.dropout(self.self_attn(self.self_norm(x), self_attn, cache))
        x = x + self.dropout(self.cross_attn(self.cross_norm(x), cross_kv, cross_attn))
        return x + self.dropout(self.ffn(self.ffn_norm(x)))


@dataclass
class KVCache:
    """Decoder state while generating (gpt-fast's KVCache, for an encoder-decoder). self_kv is allocated once
    and written in place, one position per step; cross_kv holds the encoder keys/values of every decoder
    layer, computed once per prompt (its beams share them). K/V keep n_kv_heads heads: GQA's memory saving
    is exactly here. Beam search trades memory for speed: `spare` doubles the self-attention cache."""
    self_kv: Tensor                 # (n_decoder_layers, 2, B, n_kv_heads, max_len, head_dim)
    cross_kv: Tensor                # (n_decoder_layers, 2, B or B / beams, n_kv_heads, S, head_dim)
    cross_mask: Tensor              # (B or B / beams, 1, 1, S) bool: the prompts' real tokens
    length: int = 0                 # decoder positions filled = position of the next decoder token
    spare: Tensor | None = None     # beam search: the buffer `reorder` gathers into

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write the new positions' K/V (B, Hkv, T, Dh) of `layer` at self.length..; all filled positions' K/V."""
        end = self.length + k.shape[2]
        if end > self.self_kv.shape[4]:
            raise ValueError(f"KV cache holds {self.self_kv.shape[4]} positions, decoding needs {end}")
        kv = self.self_kv[layer]
        kv[0, :, :, self.length:end], kv[1, :, :, self.length:end] = k, v
        return kv[0, :, :, :end], kv[1, :, :, :end]

    def reorder(self, index: Tensor) -> None:
        """Beam search: row b of the cache becomes row index[b] (beams of one prompt share cross_kv).
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
        self.layers = nn.ModuleList(EncoderBlock(cfg, moe=cfg.moe_layer(i))
                                    for i in range(cfg.n_encoder_layers))
        self.norm, self.dropout = RMSNorm(cfg.d_model, cfg.norm_eps), nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, segment_ids: Tensor, flex: bool) -> Tensor:
        """x: (B, S, d) embedded input rows with their (B, S) segment ids."""
        pos = torch.arange(x.shape[1], device=x.device)
        bias = None if self.relative_bias is None else self.relative_bias(pos, pos)  # (1, H, S, S)
        rope = None if bias is not None else rope_cos_sin(segment_positions(segment_ids), self.cfg.head_dim,
                                                          self.cfg.rope_theta)
        attn = Attn(segment_mask(segment_ids, segment_ids, False, bias, flex, mask_dtype(x)), rope)
        x = self.dropout(x)
        for layer in self.layers:
            x = layer(x, attn)
        return self.dropout(self.norm(x))


class Decoder(nn.Module):
    def __init__(self, cfg: ROT5Config):
        super().__init__()
        self.cfg = cfg
        self.relative_bias = RelativePositionBias(cfg, bidirectional=False) if cfg.position == "t5" else None
        self.layers = nn.ModuleList(DecoderBlock(cfg, moe=cfg.moe_layer(i), layer=i)
                                    for i in range(cfg.n_decoder_layers))
        self.norm, self.dropout = RMSNorm(cfg.d_model, cfg.norm_eps), nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, self_attn: Attn, cross_kv: Tensor | list[Tensor], cross_attn: Attn,
                cache: KVCache | None = None) -> Tensor:
        """x: (B, T, d) embedded decoder inputs; cross_kv[i]: layer i's encoder K/V (project_kv)."""
        x = self.dropout(x)
        for layer, kv in zip(self.layers, cross_kv):
            x = layer(x, self_attn, kv, cross_attn, cache)
        return self.dropout(self.norm(x))

    def project_kv(self, enc: Tensor, segment_ids: Tensor, cross_index: Tensor | None = None) -> list[Tensor]:
        """Every layer's cross-attention K/V of the encoder output (B, S, d), keys rotated with their positions
        in their segments and gathered like them (cross_index)."""
        rope = None
        if self.relative_bias is None and self.cfg.cross_rope:
            pos = segment_positions(segment_ids)
            rope = rope_cos_sin(pos if cross_index is None else pos.flatten()[cross_index.clamp(min=0)],
                                self.cfg.head_dim, self.cfg.rope_theta)
        return [layer.cross_attn.project_kv(enc, rope, cross_index) for layer in self.layers]

    def masks(self, segment_ids: Tensor, enc_segment_ids: Tensor, cross_index: Tensor | None, flex: bool,
              dtype: torch.dtype) -> tuple[Attn, Attn]:
        """Teacher forcing: the self- and cross-attention of (B, T) decoder rows with their segment ids,
        reading encoder rows with theirs (row b, or the positions cross_index[b])."""
        pos = torch.arange(segment_ids.shape[1], device=segment_ids.device)
        bias = None if self.relative_bias is None else self.relative_bias(pos, pos)  # (1, H, T, T)
        rope = None if bias is not None else rope_cos_sin(segment_positions(segment_ids), self.cfg.head_dim,
                                                          self.cfg.rope_theta)
        return (Attn(segment_mask(segment_ids, segment_ids, True, bias, flex, dtype), rope),
                Attn(segment_mask(segment_ids, enc_segment_ids, False, None, flex, dtype, cross_index),
                     rope if self.cfg.cross_rope else None))

    def decode_masks(self, start: int, T: int, cache: KVCache, dtype: torch.dtype) -> tuple[Attn, Attn]:
        """Cached decoding: T new positions start.. attend the filled ones causally, and the prompts' tokens."""
        dev = cache.self_kv.device
        q_pos, k_pos = torch.arange(start, start + T, device=dev), torch.arange(start + T, device=dev)
        future = k_pos[None, :] > q_pos[:, None]                                   # (T, start + T)
        if self.relative_bias is not None:
            mask = self.relative_bias(q_pos, k_pos).to(dtype).masked_fill(future, torch.finfo(dtype).min)
            return Attn(mask, None), Attn(cache.cross_mask, None)
        rope = rope_cos_sin(q_pos, self.cfg.head_dim, self.cfg.rope_theta)
        return Attn(None if T == 1 else ~future, rope), Attn(cache.cross_mask, rope if self.cfg.cross_rope else None)


# ----------------------------------------------------------------------------------------------------------
# The model


class ROT5Output(NamedTuple):
    loss: Tensor | None          # LM cross-entropy in fp32, the mean over the labels (None without labels)
    logits: Tensor | None        # (B_dec, T, V) without labels; None with them (computed at labels only)
    aux_loss: Tensor             # coef-weighted load-balancing loss summed over MoE layers (0. if dense/off)
    z_loss: Tensor               # coef-weighted router z-loss summed over MoE layers (0. if dense/off)
    expert_load: Tensor | None   # (n_moe_layers, n_experts): fraction of real tokens routed to each expert


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
        the attention's missing 1/sqrt(head_dim); embeddings N(0, 1) (the tied output is rescaled instead, unless
        scale_output=False)."""
        cfg = self.cfg
        d, inner, q_std = cfg.d_model, cfg.n_heads * cfg.head_dim, (cfg.d_model * cfg.head_dim) ** -0.5
        if isinstance(m, nn.Embedding):  # (else: the relative bias table) A tied output without its scale
            # (scale_output=False) multiplies by the embedding itself: std d**-0.5 keeps those logits O(1) instead
            unscaled_output = cfg.tie_embeddings and not cfg.scale_output
            nn.init.normal_(m.weight, std=1.0 if m is self.embed and not unscaled_output else d ** -0.5)
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

    def forward(self, batch: Batch) -> ROT5Output:
        """Teacher forcing on a Batch (checked where it was made: check_batch): the loss when it has labels (the
        output layer then runs at their positions alone: at 32k words it is most of a small model's decoder),
        else the logits of every position."""
        flex = use_flex(self.cfg, batch.input_ids, self.training)
        enc = self.encoder(self.embed(batch.input_ids), batch.segment_ids, flex)
        x = self.embed(batch.decoder_input_ids)
        self_attn, cross_attn = self.decoder.masks(batch.decoder_segment_ids, batch.segment_ids, batch.cross_index,
                                                   flex, mask_dtype(x))
        cross_kv = self.decoder.project_kv(enc, batch.segment_ids, batch.cross_index)
        h = self.decoder(x, self_attn, cross_kv, cross_attn)
        loss = logits = None
        if batch.labels is None:
            logits = self.lm_logits(h)
        else:
            at = batch.label_index
            loss = F.cross_entropy(self.lm_logits(h.flatten(0, 1)[at]).float(), batch.labels.flatten()[at].long())
        return ROT5Output(loss, logits, *self.router_stats(batch.segment_ids > 0, batch.decoder_segment_ids > 0))

    def lm_logits(self, h: Tensor) -> Tensor:
        if self.lm_head is None:  # v1.0: the scale keeps logits O(1) with N(0, 1) embeddings (Mesh TF)
            return F.linear(h * self.cfg.d_model ** -0.5 if self.cfg.scale_output else h, self.embed.weight)
        return self.lm_head(h)

    def router_stats(self, enc_tokens: Tensor, dec_tokens: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """(aux_loss, z_loss) summed over the MoE layers of the last forward, and their expert loads (encoder
        layers first), over the real tokens only; zeros and None for a dense model."""
        stats = [layer.ffn.stats(tokens) for stack, tokens in ((self.encoder, enc_tokens), (self.decoder, dec_tokens))
                 for layer in stack.layers if isinstance(layer.ffn, SwitchFFN)]
        zero = enc_tokens.new_zeros((), dtype=torch.float32)
        return (sum((s.aux_loss for s in stats), zero), sum((s.z_loss for s in stats), zero),
                torch.stack([s.load for s in stats]) if stats else None)

    # -- generation (generate.py): encode once, then decode step by step against a KV cache ----------------

    def encode(self, input_ids: Tensor, segment_ids: Tensor) -> Tensor:
        """(B, S) ids (padded prompts: segment ids = attention mask) -> (B, S, d_model) encoder output."""
        return self.encoder(self.embed(input_ids), segment_ids, use_flex(self.cfg, input_ids, self.training))

    def new_cache(self, enc: Tensor, segment_ids: Tensor, max_len: int, beams: int = 1) -> KVCache:
        """KV cache for decoding up to max_len positions against encoder output enc (B, S, d) of prompts with
        segment ids (B, S) (each row one segment; 0 at padding), for B * beams sequences (rows b*beams ..
        b*beams+beams-1 decode against prompt b; they share its cross K/V)."""
        cross = torch.stack(self.decoder.project_kv(enc, segment_ids))
        L, _, B, Hkv, _, Dh = cross.shape
        return KVCache(cross.new_zeros(L, 2, B * beams, Hkv, max_len, Dh), cross, (segment_ids > 0)[:, None, None, :])

    def decode_step(self, decoder_input_ids: Tensor, cache: KVCache) -> Tensor:
        """Feed (B, T) decoder tokens at positions cache.length.. (T = 1 when generating); returns their
        logits (B, T, V) in fp32 and advances the cache."""
        x = self.embed(decoder_input_ids)
        self_attn, cross_attn = self.decoder.decode_masks(cache.length, x.shape[1], cache, mask_dtype(x))
        h = self.decoder(x, self_attn, cache.cross_kv, cross_attn, cache)
        cache.length += x.shape[1]
        return self.lm_logits(h).float()

    # -- accounting ---------------------------------------------------------------------------------------

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
        dense = d * c.d_ff * (2 if c.ffn == "relu" else 3)
        moe = d * c.n_experts + c.moe_top_k * dense

        def ffn_total(n_layers: int) -> int:
            n_moe = sum(map(c.moe_layer, range(n_layers)))
            return n_moe * moe + (n_layers - n_moe) * dense

        n_enc = c.n_encoder_layers * (q_o + kv) + ffn_total(c.n_encoder_layers) + c.n_decoder_layers * kv
        n_dec = c.n_decoder_layers * (q_o + kv + q_o) + ffn_total(c.n_decoder_layers) + d * c.vocab_size
        attn = 12 * H * Dh * (c.n_encoder_layers * encoder_len * encoder_tokens
                              + c.n_decoder_layers * (decoder_len + encoder_len) * decoder_tokens)
        return float(6 * n_enc * encoder_tokens + 6 * n_dec * decoder_tokens + attn)
