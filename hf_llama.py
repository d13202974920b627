"""A Llama-family decoder-only model adapted into a ROT5 encoder-decoder (T5Gemma: Zhang et al. 2025,
"Encoder-Decoder Gemma: Improving the Quality-Efficiency Trade-Off via Adaptation", arXiv 2504.06225).

    from_hf_llama(hf_model, tok, cross_init)   LlamaForCausalLM / MistralForCausalLM (SmolLM / SmolLM2, TinyLlama,
                                               Llama 2, Mistral-7B-v0.1) + its tokenizer ("hf:...") -> ROT5
    llama_names(cfg)                           the name table: ROT5 parameter -> the HF parameters it is made of
    load_hf_llama(source, config, cross_init)  "hf:HUB_ID" or a save_pretrained directory -> (ROT5, tokenizer)

The recipe: the encoder and the decoder are both the source model's layers (a balanced model, 2B-2B in T5Gemma's
terms); the encoder attends bidirectionally (ROT5's encoder always does), the decoder causally, as the source.
Each decoder layer gains a cross-attention, with its own pre-norm, initialised from that layer's self-attention
and input norm (cross_init="self", T5Gemma's choice for balanced models), or the same with its output projection
zeroed (cross_init="zero": the decoder then computes the source model exactly until training opens the
cross-attention, whose q/k/v get gradients from the first step). The embedding and the output layer are copied.
Continued pre-training (train.py --init_from, UL2 or PrefixLM) then teaches the two halves their new roles.

What makes the decoder the source model, exactly (tests/test_hf_llama.py checks logits and greedy decoding):
- ffn = "gated-silu": Llama's MLP is down(silu(gate x) * up x), SwiGLU; gate|up fuse into ROT5's wi.
- Llama divides q k^T by sqrt(head_dim), ROT5 (T5's convention) does not: that factor is folded into the query
  weights, which is exact because RoPE is linear (R(s q) = s R(q)). RoPE pairs features (f, f + head_dim/2) in
  both (HF's rotate_half), so q and k need no permutation.
- A tied output layer is Llama's: the embedding itself, without T5's d_model**-0.5 (scale_output=False); an untied
  lm_head is copied.
- The vocabulary (tokenizer.py, "hf:"): the source's n ids keep their rows; pad (the decoder start token), the
  three UL2 mode tokens and the sentinels are appended after them. The start row is a copy of BOS's, so the
  decoder reads [BOS, y_0, y_1, ...] as the source model did; the mode tokens, which begin every encoder input
  where the source saw BOS, start as BOS too; the sentinels (and, untied, every new output row) start as the
  mean of the source's rows (Hewitt 2021, "Initializing New Word Embeddings for Pretrained Language Models").
- Cross-attention has no RoPE (cross_rope=False), as in T5Gemma: a head copied from a causal self-attention has
  only seen keys at offsets i - j >= 0 from its query; ROT5's rotated cross-attention would put every encoder key
  at an offset to the right (decoder and encoder positions both start at 0), where it never looked. Without a
  rotation every key sits at offset 0, which it has seen. (BENCHMARKS.md measures the two at step 0.)

Refused, one line each: RoPE scaling (rope_scaling / rope_type other than the default: Llama 3's "llama3", YaRN,
linear, dynamic), attention or MLP biases, activations other than SiLU; other families (Qwen2's biases, Gemma's
norms and soft-capping) are refused by model_type in grow.load_hf. Mistral's sliding window: ROT5 attends whole
rows, the same as Mistral for rows up to sliding_window tokens (Mistral-7B-v0.1: 4,096, longer than ROT5's
windows); longer ones would see further back than Mistral did.
"""
from __future__ import annotations

import torch
from torch import nn

from hf_t5 import read_hf_model, read_hf_weights
from diskio import first_line
from model import ROT5, ROT5Config


def from_hf_llama(hf_model: nn.Module, tok, cross_init: str = "self") -> ROT5:
    """HF LlamaForCausalLM / MistralForCausalLM and its tokenizer (tokenizer.py "hf:" kind) -> the adapted ROT5
    (module docstring). Raises ValueError (one line) for what ROT5 cannot compute."""
    c = hf_model.config
    theta = check_llama(c)
    if cross_init not in ("self", "zero"):
        raise ValueError(f"cross_init={cross_init!r}: use 'self' (copy of the self-attention, T5Gemma) or 'zero'")
    n = tok.base_vocab_size
    if c.vocab_size != n:
        raise ValueError(f"the model embeds {c.vocab_size} ids but its tokenizer {tok.name!r} has {n}: ROT5 appends its "
                         "pad, mode tokens and sentinels right after the tokenizer's ids, so the two must agree")
    if tok.bos_id is None:
        raise ValueError(f"tokenizer {tok.name!r} names no bos_token: the decoder start row is initialised from BOS")
    layers = c.num_hidden_layers
    cfg = ROT5Config(vocab_size=tok.vocab_size, d_model=c.hidden_size, n_heads=c.num_attention_heads,
                     head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
                     n_kv_heads=c.num_key_value_heads, d_ff=c.intermediate_size, n_encoder_layers=layers,
                     n_decoder_layers=layers, position="rope", ffn="gated-silu",
                     tie_embeddings=bool(c.tie_word_embeddings), scale_output=False, dropout=0.0,
                     attention_dropout=float(c.attention_dropout), rope_theta=theta, cross_rope=False,
                     norm_eps=float(c.rms_norm_eps), pad_token_id=tok.pad_id, eos_token_id=tok.eos_id)
    sd = {k: v.detach().float() for k, v in hf_model.state_dict().items()}
    q_scale = cfg.head_dim ** -0.5  # Llama's attention scale, folded into the query weights

    def part(name: str) -> torch.Tensor:
        return sd[name] * q_scale if name.endswith("q_proj.weight") else sd[name]

    state = {ours: torch.cat([part(t) for t in theirs]) for ours, theirs in llama_names(cfg).items()}
    state["embed.weight"] = grown_vocabulary(state["embed.weight"], tok, bos_rows=True)
    if not cfg.tie_embeddings:
        state["lm_head.weight"] = grown_vocabulary(state["lm_head.weight"], tok, bos_rows=False)
    if cross_init == "zero":
        for i in range(cfg.n_decoder_layers):
            state[f"decoder.layers.{i}.cross_attn.o.weight"].zero_()
    model = ROT5(cfg)
    model.load_state_dict(state, strict=True)
    return model


def grown_vocabulary(rows: torch.Tensor, tok, bos_rows: bool) -> torch.Tensor:
    """The source's (n, d) embedding (or output) rows, with ROT5's added ids after them: pad and the mode tokens as
    BOS (bos_rows; the input embedding), the rest the mean of the source rows (module docstring)."""
    n, grown = tok.base_vocab_size, rows.mean(0).repeat(tok.vocab_size, 1)
    grown[:n] = rows
    if bos_rows:
        grown[[tok.pad_id, *tok.mode_ids.values()]] = rows[tok.bos_id]
    return grown


def check_llama(c) -> float:
    """What ROT5 cannot compute of an HF Llama / Mistral config, one line each (ValueError); its RoPE theta."""
    if getattr(c, "hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={c.hidden_act!r}: ROT5's gated FFN for Llama models is SwiGLU (silu)")
    for name in ("attention_bias", "mlp_bias"):
        if getattr(c, name, False):
            raise ValueError(f"{name}=True: ROT5's projections have no biases")
    # transformers 5 keeps RoPE's settings in rope_parameters; 4.x in rope_theta and rope_scaling
    params = getattr(c, "rope_parameters", None) or {"rope_theta": c.rope_theta, **(c.rope_scaling or {})}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        raise ValueError(f"rope_type {kind!r} (RoPE scaling): ROT5's RoPE is unscaled, rope_theta alone; it reads "
                         "models with rope_scaling null")
    return float(params["rope_theta"])


def llama_names(cfg: ROT5Config) -> dict[str, tuple[str, ...]]:
    """ROT5 parameter -> the HF Llama parameters it is made of, concatenated along dim 0. Both stacks read the
    same source layers; a decoder layer's cross-attention reads its self-attention (q, then k|v) and input norm.
    The embedding and output rows here are the source's n; from_hf_llama appends ROT5's ids."""
    names = {"embed.weight": ("model.embed_tokens.weight",),
             "encoder.norm.weight": ("model.norm.weight",), "decoder.norm.weight": ("model.norm.weight",)}
    if not cfg.tie_embeddings:
        names["lm_head.weight"] = ("lm_head.weight",)
    for stack, sublayers in (("encoder", {"attn": ("q", "k", "v")}),
                             ("decoder", {"self_attn": ("q", "k", "v"), "cross_attn": ("q",)})):
        for i in range(getattr(cfg, f"n_{stack}_layers")):
            ours, theirs = f"{stack}.layers.{i}", f"model.layers.{i}"
            names |= {f"{ours}.ffn_norm.weight": (f"{theirs}.post_attention_layernorm.weight",),
                      f"{ours}.ffn.wi.weight": (f"{theirs}.mlp.gate_proj.weight", f"{theirs}.mlp.up_proj.weight"),
                      f"{ours}.ffn.wo.weight": (f"{theirs}.mlp.down_proj.weight",)}
            for sub, projections in sublayers.items():
                fused = f"{ours}.{sub}.{'qkv' if len(projections) == 3 else 'q'}.weight"
                names[fused] = tuple(f"{theirs}.self_attn.{p}_proj.weight" for p in projections)
                names[f"{ours}.{sub}.o.weight"] = (f"{theirs}.self_attn.o_proj.weight",)
            norms = ("attn_norm",) if stack == "encoder" else ("self_norm", "cross_norm")
            names |= {f"{ours}.{norm}.weight": (f"{theirs}.input_layernorm.weight",) for norm in norms}
            if stack == "decoder":
                names[f"{ours}.cross_attn.kv.weight"] = (f"{theirs}.self_attn.k_proj.weight",
                                                         f"{theirs}.self_attn.v_proj.weight")
    return names


def load_hf_llama(source: str, config: dict, cross_init: str = "self"):
    """(ROT5, Tokenizer) of a Hugging Face Llama / Mistral causal LM: "hf:HUB_ID" or a save_pretrained directory
    (config: its config.json), adapted by from_hf_llama, with its tokenizer.json as the tokenizer "hf:HUB_ID_OR_DIR".
    The config is checked before any weight is read. One line on failure."""
    from tokenizer import get_tokenizer

    try:
        import transformers
    except ImportError:
        raise SystemExit(f"{source}: reading Hugging Face models needs transformers: pip install transformers") from None
    where = source.removeprefix("hf:")  # a hub id or a directory
    model_class = {"llama": transformers.LlamaForCausalLM, "mistral": transformers.MistralForCausalLM}[config["model_type"]]
    try:
        hf_config = transformers.AutoConfig.from_pretrained(where)
        check_llama(hf_config)
        tok = get_tokenizer("hf:" + where)
    except (OSError, ValueError) as e:
        raise SystemExit(f"{source}: {first_line(e)[:300]}") from None
    hf = read_hf_model(source, model_class, "a causal LM", config=hf_config)
    return read_hf_weights(source, lambda: from_hf_llama(hf, tok, cross_init)), tok
