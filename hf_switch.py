"""Hugging Face SwitchTransformers (google/switch-base-8 and its family, Fedus et al. 2021) into ROT5.

    from_hf_switch(hf_model)      SwitchTransformersForConditionalGeneration -> ROT5 (position "t5", relu, tied and
                                  scaled output, a Switch FFN in every sparse_step-th layer: moe_step)
    hf_switch_names(cfg)          the name table: hf_t5.hf_t5_names for attention, norms and embeddings (Switch is
                                  T5 v1.0 there), its own for the FFNs (mlp.wi / mlp.router.classifier / experts)
    load_hf_switch(source, config)  "hf:HUB_ID" or a save_pretrained directory -> (ROT5, T5's tokenizer "t5:")

Exact where HF's model and ROT5's compute the same thing; what cannot match, by design:
- Capacity. HF routes each sequence's tokens to experts in order and drops those past `expert_capacity` per
  expert (their FFN output is 0; the residual carries them); ROT5 is dropless. The two agree whenever no
  expert of any sequence gets more than expert_capacity tokens, e.g. whenever sequences are no longer than
  expert_capacity (switch-base-8: 64); tests/test_hf_switch.py compares them there, and shows that a capacity
  small enough to drop tokens makes them differ.
- Router losses are ROT5's (model.SwitchFFN.stats: Switch eq. 4 and ST-MoE's z-loss over the batch's real
  tokens), with the source's coefficients (router_aux_loss_coef, router_z_loss_coef); HF averages them per
  sequence, padding included.
- HF multiplies router inputs by noise in training (router_jitter_noise); ROT5 routes without it.
"""
from __future__ import annotations

import torch
from torch import nn

from hf_t5 import hf_t5_names, load_t5_family
from model import ROT5, ROT5Config


def from_hf_switch(hf_model: nn.Module) -> ROT5:
    """HF SwitchTransformersForConditionalGeneration -> ROT5 with identical outputs where no token is dropped
    (module docstring). Raises ValueError (one line) for what ROT5 cannot compute."""
    c = hf_model.config
    if c.encoder_sparse_step != c.decoder_sparse_step:
        raise ValueError(f"encoder_sparse_step={c.encoder_sparse_step} but decoder_sparse_step={c.decoder_sparse_step}: "
                         "ROT5 has one moe_step for both stacks")
    if c.dense_act_fn != "relu" or c.router_bias:
        raise ValueError("ROT5 reads Switch Transformers with relu experts and a router without bias "
                         f"(this one: dense_act_fn={c.dense_act_fn!r}, router_bias={c.router_bias})")
    eos = c.eos_token_id[0] if isinstance(c.eos_token_id, (list, tuple)) else c.eos_token_id
    cfg = ROT5Config(vocab_size=c.vocab_size, d_model=c.d_model, n_heads=c.num_heads, head_dim=c.d_kv,
                     n_kv_heads=c.num_heads, d_ff=c.d_ff, n_encoder_layers=c.num_layers,
                     n_decoder_layers=c.num_decoder_layers, position="t5", ffn="relu",
                     tie_embeddings=bool(c.tie_word_embeddings), n_experts=c.num_experts, moe_step=c.encoder_sparse_step,
                     moe_top_k=1, aux_loss_coef=float(c.router_aux_loss_coef), z_loss_coef=float(c.router_z_loss_coef),
                     dropout=float(c.dropout_rate), attention_dropout=float(c.dropout_rate),
                     relative_attention_num_buckets=c.relative_attention_num_buckets,
                     relative_attention_max_distance=c.relative_attention_max_distance,
                     norm_eps=c.layer_norm_epsilon, pad_token_id=c.pad_token_id, eos_token_id=eos)
    sd = {k: v.detach().float() for k, v in hf_model.state_dict().items()}
    model = ROT5(cfg)
    model.load_state_dict({ours: torch.cat([sd[t] for t in theirs]) for ours, theirs in hf_switch_names(cfg).items()},
                          strict=True)
    return model


def hf_switch_names(cfg: ROT5Config) -> dict[str, tuple[str, ...]]:
    """ROT5 parameter -> the HF SwitchTransformers parameters it is made of, concatenated along dim 0."""
    names = {ours: theirs for ours, theirs in hf_t5_names(cfg).items() if ".ffn." not in ours}
    for stack, sublayer, n_layers in (("encoder", 1, cfg.n_encoder_layers), ("decoder", 2, cfg.n_decoder_layers)):
        for i in range(n_layers):
            ours, theirs = f"{stack}.layers.{i}.ffn", f"{stack}.block.{i}.layer.{sublayer}.mlp"
            if cfg.moe_layer(i):
                names[f"{ours}.router.weight"] = (f"{theirs}.router.classifier.weight",)
                names |= {f"{ours}.experts.{e}.{w}.weight": (f"{theirs}.experts.expert_{e}.{w}.weight",)
                          for e in range(cfg.n_experts) for w in ("wi", "wo")}
            else:
                names |= {f"{ours}.{w}.weight": (f"{theirs}.{w}.weight",) for w in ("wi", "wo")}
    return names


def load_hf_switch(source: str, config: dict):
    """(ROT5, Tokenizer) of a Hugging Face Switch Transformer: "hf:HUB_ID" or a save_pretrained directory (config:
    its config.json), its weights through from_hf_switch, T5's spiece.model as the tokenizer "t5:HUB_ID_OR_DIR"."""
    try:
        from transformers import SwitchTransformersForConditionalGeneration
    except ImportError:
        raise SystemExit(f"{source}: reading Hugging Face models needs transformers: pip install transformers") from None
    return load_t5_family(source, SwitchTransformersForConditionalGeneration, from_hf_switch, "a Switch Transformer")
