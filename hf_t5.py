"""Hugging Face T5 in and out of ROT5: the T5 baseline *is* T5 (v1.0 and v1.1), weight for weight.

    from_hf_t5(hf_model)  HF T5ForConditionalGeneration (T5, T5 v1.1, FLAN-T5) -> ROT5, identical outputs
    to_hf_t5(model)       the inverse, for the T5 baseline (position "t5", multi-head, dense)
    load_hf_t5(source, config)  "hf:HUB_ID" (downloaded with huggingface_hub into its cache) or a save_pretrained
                          directory, and its config.json -> (ROT5, its T5 tokenizer), with one-line errors;
                          checkpoint.load_model reads HF T5 models through it (grow.load_hf picks it by
                          model_type), so sample.py and finetune.py --init_from=hf:... do too

Both directions read one name table (hf_t5_names): ROT5 fuses q|k|v, cross-attention k|v and v1.1's
wi_0|wi_1 into one matrix each, HF keeps them apart; HF keeps one relative-bias table per stack in its block 0.
"""
from __future__ import annotations

import json
import os

import torch
from torch import nn

from diskio import first_line
from model import ROT5, ROT5Config


def from_hf_t5(hf_model: nn.Module) -> ROT5:
    """Hugging Face T5ForConditionalGeneration (v1.0: relu + tied + scaled output; v1.1: gated-gelu +
    untied) -> ROT5 with position="t5", identical outputs (dropout where HF puts it, at HF's rate)."""
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
                     dropout=float(c.dropout_rate), attention_dropout=float(c.dropout_rate),
                     relative_attention_num_buckets=c.relative_attention_num_buckets,
                     relative_attention_max_distance=c.relative_attention_max_distance,
                     norm_eps=c.layer_norm_epsilon, pad_token_id=c.pad_token_id, eos_token_id=eos)
    model = ROT5(cfg)  # (cat copies, so the new model shares no storage with hf_model)
    model.load_state_dict({ours: torch.cat([sd[t] for t in theirs]) for ours, theirs in hf_t5_names(cfg).items()},
                          strict=True)
    return model


def to_hf_t5(model: ROT5) -> nn.Module:
    """The inverse of from_hf_t5: this T5 baseline (position="t5", multi-head, dense) as a Hugging Face
    T5ForConditionalGeneration with identical outputs, on this model's device, in its train/eval mode. (HF T5
    has one dropout rate: `dropout`; attention_dropout, a training setting, is not part of the export.)"""
    c = model.cfg
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
    sd = model.state_dict()
    new = {t: part.detach().clone() for ours, theirs in hf_t5_names(c).items()
           for t, part in zip(theirs, sd[ours].chunk(len(theirs)))}  # equal parts: q|k|v, k|v, wi_0|wi_1 (MHA)
    # HF keeps the embedding under three more names (the same tensor, or copies of it when untied in memory)
    new |= {k: new["shared.weight"] for k in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")}
    if c.tie_embeddings:
        new["lm_head.weight"] = new["shared.weight"]
    hf.load_state_dict(new, strict=True)
    return hf.to(model.embed.weight.device).train(model.training)


def hf_t5_names(cfg: ROT5Config) -> dict[str, tuple[str, ...]]:
    """ROT5 parameter -> the Hugging Face T5 parameters it is made of, concatenated along dim 0. One table for
    both directions: from_hf_t5 concatenates, to_hf_t5 splits."""
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


def load_hf_t5(source: str, config: dict):
    """(ROT5, Tokenizer) of a Hugging Face T5 / T5 v1.1 / FLAN-T5: "hf:HUB_ID" or a save_pretrained directory
    (config: its config.json, model_type "t5"), its weights through from_hf_t5, its spiece.model as the tokenizer
    "t5:HUB_ID_OR_DIR". One line on failure."""
    try:
        from transformers import T5ForConditionalGeneration
    except ImportError:
        raise SystemExit(f"{source}: reading Hugging Face T5 models needs transformers: pip install transformers") from None
    return load_t5_family(source, T5ForConditionalGeneration, from_hf_t5, "a T5 encoder-decoder")


def load_t5_family(source: str, model_class, convert, what: str):
    """(ROT5, Tokenizer) of an HF model of T5's family (T5, Switch Transformers): its weights read by
    model_class, converted by convert, T5's spiece.model as the tokenizer, which must be the model's. One line on
    failure."""
    from tokenizer import get_tokenizer

    try:
        tok = get_tokenizer(t5_tokenizer_name(source))
    except (OSError, ValueError) as e:
        raise SystemExit(f"{source}: {first_line(e)[:300]}") from None
    hf = read_hf_model(source, model_class, what)
    model = read_hf_weights(source, lambda: convert(hf))
    c = model.cfg
    if (tok.vocab_size, tok.pad_id, tok.eos_id) != (c.vocab_size, c.pad_token_id, c.eos_token_id):
        raise SystemExit(f"{source}: its spiece.model gives {tok.vocab_size} ids, pad {tok.pad_id}, eos {tok.eos_id} "
                         f"but the model has vocab_size={c.vocab_size}, pad {c.pad_token_id}, eos {c.eos_token_id}: "
                         "it is not this model's tokenizer")
    return model, tok


def read_hf_model(source: str, model_class, what: str, **kwargs):
    """model_class.from_pretrained of "hf:HUB_ID" or a directory, refused with one line when weights of `what` are
    missing (transformers would fill them with random weights)."""
    hf, info = read_hf_weights(source, lambda: model_class.from_pretrained(source.removeprefix("hf:"),
                                                                          output_loading_info=True, **kwargs))
    if info["missing_keys"]:
        raise SystemExit(f"{source} lacks {len(info['missing_keys'])} weights of {what} (e.g. "
                         f"{sorted(info['missing_keys'])[0]}): it is not a whole {model_class.__name__}")
    return hf


def read_hf_weights(source: str, read):
    """read() (a from_pretrained or a conversion of HF weights), or one line naming `source` on failure: the HF
    loaders of hf_t5.py, hf_switch.py and hf_llama.py all read their weights through it."""
    try:
        return read()
    except (OSError, ValueError) as e:  # no weights file, a config ROT5 or HF cannot build, ...: their own words
        raise SystemExit(f"{source}: {first_line(e)[:300]}") from None
    except Exception as e:  # noqa: BLE001 - a cut or foreign weights file (safetensors' SafetensorError, ...)
        raise SystemExit(f"{source}: its weights cannot be loaded ({type(e).__name__}: {first_line(e)[:200]}): save "
                         "or download the model again") from None


def t5_tokenizer_name(source: str) -> str:
    """The tokenizer (tokenizer.py) of the HF T5 `source` ("hf:HUB_ID" or a directory): its spiece.model."""
    return "t5:" + source.removeprefix("hf:")


def read_config_json(directory: str) -> dict:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise SystemExit(f"{directory} has no config.json: it is neither a ROT5 export (python checkpoint.py export) "
                         "nor a Hugging Face model (save_pretrained)")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise SystemExit(f"{path} is not valid JSON ({first_line(e)[:200]}): export or save the model again") from None
    if not isinstance(config, dict):
        raise SystemExit(f"{path} is not a model config (a JSON object): export or save the model again")
    return config
