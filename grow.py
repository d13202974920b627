"""Grow ROT5 from other checkpoints: the models `init_from` starts from, and sparse upcycling.

    load_hf(source)        a Hugging Face model ("hf:HUB_ID" or a save_pretrained directory) as ROT5, by its
                           model_type -- T5 (hf_t5.py), Llama / Mistral adapted into an encoder-decoder (hf_llama.py,
                           T5Gemma), Switch Transformers (hf_switch.py); checkpoint.load_model reads every source
                           train.py --init_from can start from through it
    init_config(...)       the model of a run that starts from a source: every model key the run does not set comes
                           from the source; the keys it sets must agree with the source's where they define what its
                           weights compute (training-time keys aside, and the MoE keys when upcycling a dense source)
    init_weights(model, source)   the source's weights into the run's model, upcycled when the run is MoE and the
                           source dense (`upcycle`)

Sparse upcycling (Komatsuzaki et al. 2022, "Sparse Upcycling: Training Mixture-of-Experts from Dense
Checkpoints"; T5X's UpcycleCheckpointer): each Switch FFN's experts start as copies of that layer's dense FFN,
its router starts new (ROT5's init, from the run's seed), every other weight is copied. With moe_top_k >= 2 the
gates of a token are renormalised to sum to 1 (model.SwitchFFN), so sum_i g_i FFN_i(x) = FFN(x): the upcycled
model computes the dense model's function at step 0, and training breaks the experts' symmetry from there. With
top-1 the gate is the router's raw probability p(x) (Switch keeps it so the router gets a gradient), so the
layer outputs p(x) FFN(x), with 1/E <= p(x) <= 1: the upcycled model starts as the dense one with each MoE
layer's FFN output scaled by p(x); for a zero router exactly by 1/E (tests/test_grow.py checks both).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re

import torch

from diskio import first_line
from hf_t5 import read_config_json
from model import ROT5, ROT5Config

# ROT5Config keys that say how a model trains or runs, not what its weights compute: a run may set them freely
TRAINING_KEYS = ("dropout", "attention_dropout", "attention", "aux_loss_coef", "z_loss_coef")
MOE_KEYS = ("n_experts", "moe_top_k", "moe_step")   # a run sets them freely when it upcycles a dense source
ADAPTATION_KEYS = ("cross_rope",)                    # ... and these when it adapts a decoder-only source, which has no
                                                     # cross-attention of its own
CROSS_INITS = ("self", "zero")                       # hf_llama.from_hf_llama's cross_init

# Hugging Face model_types ROT5 cannot compute, each with why (one line each); a model_type in neither table is
# refused with the list of those it reads
REFUSED = {
    "gemma": "Gemma scales its RMSNorm by (1 + weight) and its embeddings by sqrt(d_model), which ROT5's layers lack",
    "gemma2": "Gemma 2's norms ((1 + weight), post-norms around every sublayer) and its logit soft-capping are not "
              "ROT5's layers",
    "gemma3_text": "Gemma 3's norms ((1 + weight), post-norms, q/k norms) are not ROT5's layers",
    "qwen2": "Qwen2's q/k/v projections have biases, which ROT5's attention lacks",
}


def is_hf_source(path: str) -> bool:
    """A Hugging Face model rather than a ROT5 checkpoint or export: "hf:..." or a directory whose config.json is
    not a ROT5 export's."""
    return path.startswith("hf:") or (os.path.isdir(path) and read_config_json(path).get("model_type") != "rot5")


def load_hf(source: str, cross_init: str = "self"):
    """(ROT5, Tokenizer, kind) of a Hugging Face model, "hf:HUB_ID" or a save_pretrained directory, read by the
    converter of its model_type. One line on failure."""
    from hf_llama import load_hf_llama
    from hf_switch import load_hf_switch
    from hf_t5 import load_hf_t5

    config = hf_config(source)
    model_type = config.get("model_type")
    if model_type == "t5":
        return (*load_hf_t5(source, config), "hf-t5")
    if model_type in ("llama", "mistral"):
        return (*load_hf_llama(source, config, cross_init), "hf-llama")
    if model_type == "switch_transformers":
        return (*load_hf_switch(source, config), "hf-switch")
    if model_type in REFUSED:
        raise SystemExit(f"{source} is a {model_type!r} model: {REFUSED[model_type]}")
    raise SystemExit(f"{source} is a {model_type!r} model, not T5, Llama / Mistral or Switch Transformers: ROT5 reads "
                     "model_type 't5', 'llama', 'mistral' and 'switch_transformers'")


def hf_config(source: str) -> dict:
    """config.json of "hf:HUB_ID" (downloaded with huggingface_hub into its cache) or of a directory."""
    where = source.removeprefix("hf:")  # a hub id or a directory
    if os.path.isdir(where):
        return read_config_json(where)
    try:
        from huggingface_hub import hf_hub_download

        with open(hf_hub_download(repo_id=where, filename="config.json"), encoding="utf-8") as f:
            return json.load(f)
    except Exception as e:  # noqa: BLE001 - offline, DNS, 404, auth: one line, the same fix
        raise SystemExit(f"could not download {where}/config.json from the Hugging Face hub ({type(e).__name__}: "
                         f"{first_line(e)[:160]}); offline, pass a local save_pretrained directory instead") from None


# -- a run that starts from a source ---------------------------------------------------------------------------

def init_config(source_cfg: ROT5Config, config: dict, given: set[str], source: str, adapted: bool = False) -> ROT5Config:
    """The run's ROT5Config: the source's, with the run's training-time keys (TRAINING_KEYS), its MoE keys when it
    upcycles a dense source, and its ADAPTATION_KEYS when the source is a decoder-only model adapted by hf_llama
    (adapted). Any other model key the run sets (in `given`) must equal the source's."""
    merged = dataclasses.asdict(source_cfg)
    free = set(TRAINING_KEYS) | (set(MOE_KEYS) if not source_cfg.n_experts else set()) | \
        (set(ADAPTATION_KEYS) if adapted else set())
    wrong = sorted(k for k in given if k in merged and k not in free and config[k] != merged[k])
    if wrong:
        keys = " ".join(f"--{k}={config[k]!r}" for k in wrong)
        raise SystemExit(f"{keys} {'disagrees' if len(wrong) == 1 else 'disagree'} with {source}, whose weights have "
                         f"{', '.join(f'{k}={merged[k]!r}' for k in wrong)}: drop {'it' if len(wrong) == 1 else 'them'} "
                         "(unset model keys come from the source)"
                         + ("" if source_cfg.n_experts else "; n_experts, moe_top_k and moe_step may upcycle it"))
    merged.update({k: config[k] for k in given if k in free})
    try:
        return ROT5Config(**merged)
    except ValueError as e:
        raise SystemExit(f"--init_from={source}: {e}") from None


@torch.no_grad()
def init_weights(model: ROT5, source: ROT5) -> None:
    """The source's weights into `model` (built from init_config): copied, or upcycled into its Switch FFNs."""
    if source.cfg.n_experts == model.cfg.n_experts:
        model.load_state_dict(source.state_dict())
    else:
        upcycle(source, model)


EXPERT = re.compile(r"(?P<layer>(encoder|decoder)\.layers\.\d+\.ffn)\.experts\.\d+\.(?P<weight>w[io]\.weight)")


@torch.no_grad()
def upcycle(dense: ROT5, moe: ROT5) -> None:
    """Sparse upcycling (module docstring): the dense model's weights into `moe`, a ROT5 with Switch FFNs in some
    layers and the dense model's shape otherwise: expert e of layer i = layer i's dense FFN, routers as moe has
    them (freshly initialised), everything else copied."""
    if dense.cfg.n_experts or not moe.cfg.n_experts:
        raise ValueError("upcycle takes a dense model into an MoE one")
    theirs, state = dense.state_dict(), {}
    for name, ours in moe.state_dict().items():
        expert = EXPERT.fullmatch(name)
        if expert:
            state[name] = theirs[f"{expert['layer']}.{expert['weight']}"]
        elif name.endswith(".ffn.router.weight"):
            state[name] = ours
        else:
            state[name] = theirs[name]
    moe.load_state_dict(state)
