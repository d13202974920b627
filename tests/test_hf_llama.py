"""hf_llama.from_hf_llama adapts a Llama-family decoder-only model into ROT5 (T5Gemma), exactly where it should be
exact: with its cross-attention silenced (cross_init="zero") the decoder is the source model (logits, greedy
decoding from the start token and from prompts, LlamaForCausalLM and MistralForCausalLM); the encoder is the
same layers (run causally, the source's hidden states); cross_init="self" copies what it should; a changed
RoPE base does not match (a controlled negative); what ROT5 cannot compute is one line. The "hf:" tokenizer kind
reads a tokenizer.json: ROT5's ids after the source's, round trips, export. Random tiny HF models and
stand-in tokenizers trained on the bundled real stories (conftest): no hub access."""
from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

import checkpoint
import prepare
from batch import padded_batch
from checkpoint import load_model
from conftest import STORIES, save_hf_llama
from generate import generate
from hf_llama import check_llama, from_hf_llama
from model import Attn, rope_cos_sin, segment_mask, segment_positions
from tokenizer import Tokenizer, get_tokenizer

transformers = pytest.importorskip("transformers")
N_ROWS, MAX_NEW = 8, 20
MODELS = {"llama": dict(), "mistral": dict(sliding_window=128)}   # sliding window longer than any row here


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert msg and "\n" not in msg, msg
    return msg


@pytest.fixture(scope="module", params=list(MODELS))
def source(request, hf_tokenizer_dirs, tmp_path_factory):
    """(HF causal LM, its directory, its tokenizer): Llama tied (SmolLM2's layout), Mistral untied (Mistral-7B's),
    both with grouped-query attention. Random init at std 0.1 (HF's 0.02 gives logits within +-0.2, where greedy
    decoding would compare near-ties)."""
    d = save_hf_llama(tmp_path_factory.mktemp(request.param), hf_tokenizer_dirs["metaspace"], request.param,
                      initializer_range=0.1, **MODELS[request.param])
    hf = getattr(transformers, f"{request.param.capitalize()}ForCausalLM").from_pretrained(d).eval()
    return hf, d, get_tokenizer("hf:" + d)


def story_rows(tok, n: int = N_ROWS, length: int = 40, equal: bool = False):
    """The first n real stories' first tokens, right-padded (B, T) with their attention mask; equal: all cut to
    the shortest, so that HF's generate needs no padding."""
    with open(STORIES, encoding="utf-8") as f:
        stories = [s.strip() for s in f.read().split("<|endoftext|>") if s.strip()][:n]
    ids = [s[:length - 3 * i] for i, s in enumerate(tok.encode(stories))]
    if equal:
        ids = [s[:min(map(len, ids))] for s in ids]
    # (padded with eos, an id HF's model embeds: ROT5's pad is beyond its vocabulary; padding is masked or after
    # the row's real tokens, which attend causally)
    x, am = torch.full((n, max(map(len, ids))), tok.eos_id), torch.zeros(n, max(map(len, ids)), dtype=torch.long)
    for i, s in enumerate(ids):
        x[i, :len(s)], am[i, :len(s)] = torch.tensor(s), 1
    return x, am


def decoder_logits(model, tok, x):
    """ROT5's decoder logits on [start, x...] (any encoder input: cross-attention is silenced or compared)."""
    dec = torch.cat([torch.full((len(x), 1), tok.pad_id), x], 1)
    enc = torch.full((len(x), 3), tok.mode_ids["S"])
    with torch.no_grad():
        return model(padded_batch(model.cfg, enc, decoder_input_ids=dec)).logits


def llama_logits(hf, tok, x, am):
    """HF's logits on [BOS, x...]."""
    with torch.no_grad():
        return hf(input_ids=torch.cat([torch.full((len(x), 1), tok.bos_id), x], 1),
                  attention_mask=torch.cat([torch.ones(len(x), 1, dtype=torch.long), am], 1)).logits


def relative_difference(ours, ref, mask) -> float:
    """max |ours - ref| over real positions, relative to the logits' scale max |ref|. The two compute the same fp32
    arithmetic in another order (fused projections, the attention scale folded into q, SDPA kernels, RoPE's
    frequencies from another formula): a few ulp (2**-23 = 1.2e-7) per operation, compounded over two layers.
    1e-5 of the scale leaves room for that and none for a misplaced weight, which moves logits by O(1)."""
    return ((ours - ref)[mask].abs().max() / ref[mask].abs().max()).item()


# -----------------------------------------------------------------------------
# the adapted decoder is the source model

def test_adapted_decoder_computes_the_source_model(source):
    hf, _, tok = source
    model = from_hf_llama(hf, tok, cross_init="zero").eval()
    x, am = story_rows(tok)
    assert (am == 0).any()
    n = tok.base_vocab_size
    ref = llama_logits(hf, tok, x, am)
    ours = decoder_logits(model, tok, x)
    mask = torch.cat([torch.ones(len(x), 1, dtype=torch.bool), am.bool()], 1)
    rel = relative_difference(ours[..., :n], ref, mask)
    print(f"{hf.config.model_type}: adapted decoder vs HF, max relative logit difference {rel:.2e} "
          f"(|logit| up to {ref[mask].abs().max():.1f})")
    assert rel < 1e-5
    # the appended ids: pad (start) and the mode tokens never beat the text, sentinels start at the mean row
    assert (ours[..., n:].max(-1).values < ours[..., :n].max(-1).values).all()


def test_adapted_greedy_decoding_is_the_source_models(source):
    """generate() from the start token = HF's generate from BOS; the cached decoding step fed a prompt, then greedy
    = HF's generate from BOS + the prompt (equal-length prompts: HF's would need left padding)."""
    hf, _, tok = source
    model = from_hf_llama(hf, tok, cross_init="zero").eval()
    eos = tok.eos_id
    ref = hf.generate(input_ids=torch.full((1, 1), tok.bos_id), max_new_tokens=MAX_NEW, do_sample=False,
                      eos_token_id=eos, pad_token_id=eos)[:, 1:]
    ours = generate(model, torch.full((1, 3), tok.mode_ids["S"]), max_new_tokens=MAX_NEW,
                    suppress_tokens=tok.non_text_ids())
    assert ours.tolist() == ref.tolist()
    x, _ = story_rows(tok, equal=True)
    ref = hf.generate(input_ids=torch.cat([torch.full((len(x), 1), tok.bos_id), x], 1), max_new_tokens=MAX_NEW,
                      do_sample=False, eos_token_id=-1, pad_token_id=eos)[:, x.shape[1] + 1:]
    with torch.no_grad():
        enc = torch.full((len(x), 3), tok.mode_ids["S"])
        cache = model.new_cache(model.encode(enc, torch.ones_like(enc)), torch.ones_like(enc), x.shape[1] + 1 + MAX_NEW)
        logits = model.decode_step(torch.cat([torch.full((len(x), 1), tok.pad_id), x], 1), cache)[:, -1]
        out = []
        for _ in range(MAX_NEW):
            out.append(logits[:, :tok.base_vocab_size].argmax(-1))
            logits = model.decode_step(out[-1][:, None], cache)[:, -1]
    assert torch.equal(torch.stack(out, 1), ref)
    assert len(set(map(tuple, ref.tolist()))) == len(x)  # every prompt its own continuation: not a constant


def test_encoder_is_the_source_layers(source):
    """The encoder's layers run causally (the mask the source was trained with) give the source's last hidden
    states: each encoder layer is its layer. (Bidirectional, as the encoder runs, they see the future too.)"""
    hf, _, tok = source
    model = from_hf_llama(hf, tok).eval()
    x, am = story_rows(tok, equal=True)
    ids = torch.cat([torch.full((len(x), 1), tok.bos_id), x], 1)
    seg = torch.ones_like(ids)
    with torch.no_grad():
        ref = hf.model(input_ids=ids).last_hidden_state
        h = model.embed(ids)
        attn = Attn(segment_mask(seg, seg, True, None, False, h.dtype),
                    rope_cos_sin(segment_positions(seg), model.cfg.head_dim, model.cfg.rope_theta))
        for layer in model.encoder.layers:
            h = layer(h, attn)
        ours = model.encoder.norm(h)
        bidirectional = model.encode(ids, seg)
    rel = ((ours - ref).abs().max() / ref.abs().max()).item()
    print(f"{hf.config.model_type}: encoder run causally vs HF hidden states, max relative difference {rel:.2e}")
    assert rel < 1e-5
    assert ((bidirectional - ref).abs().max() / ref.abs().max()).item() > 1e-2


def test_cross_init_self_copies_the_self_attention(source):
    """cross_init="self": each decoder layer's cross-attention q | k, v | o and its norm are the layer's
    self-attention ones; both stacks are the source's layers; queries carry 1/sqrt(head_dim); the new vocabulary
    rows are BOS (start, mode tokens) or the mean row (sentinels). cross_init="zero" differs only in cross o."""
    hf, _, tok = source
    model, silent = from_hf_llama(hf, tok, "self"), from_hf_llama(hf, tok, "zero")
    cfg, sd = model.cfg, hf.state_dict()
    inner, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    assert (cfg.ffn, cfg.position, cfg.cross_rope, cfg.scale_output) == ("gated-silu", "rope", False, False)
    assert cfg.tie_embeddings == hf.config.tie_word_embeddings and cfg.n_kv_heads < cfg.n_heads
    for i in range(cfg.n_decoder_layers):
        dec, enc, src = model.decoder.layers[i], model.encoder.layers[i], f"model.layers.{i}.self_attn"
        assert torch.equal(dec.cross_attn.q.weight, dec.self_attn.qkv.weight[:inner])
        assert torch.equal(dec.cross_attn.kv.weight, dec.self_attn.qkv.weight[inner:])
        assert torch.equal(dec.cross_attn.o.weight, dec.self_attn.o.weight)
        assert torch.equal(dec.cross_norm.weight, dec.self_norm.weight)
        assert torch.equal(enc.attn.qkv.weight, dec.self_attn.qkv.weight) and torch.equal(enc.ffn.wi.weight, dec.ffn.wi.weight)
        assert torch.equal(dec.self_attn.qkv.weight[:inner], sd[f"{src}.q_proj.weight"] * cfg.head_dim ** -0.5)
        assert torch.equal(dec.self_attn.qkv.weight[inner + kv:], sd[f"{src}.v_proj.weight"])
        assert not silent.decoder.layers[i].cross_attn.o.weight.any()
    others = {k: v for k, v in silent.state_dict().items() if ".cross_attn.o." not in k}
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in others.items())
    n, emb, src_emb = tok.base_vocab_size, model.embed.weight, sd["model.embed_tokens.weight"]
    assert torch.equal(emb[:n], src_emb) and emb.shape[0] == tok.vocab_size
    for i in [tok.pad_id, *tok.mode_ids.values()]:
        assert torch.equal(emb[i], src_emb[tok.bos_id])
    assert torch.allclose(emb[tok.sentinel_ids], src_emb.mean(0).expand(len(tok.sentinel_ids), -1))


def test_a_different_rope_base_does_not_match(source):
    """Controlled negatives: the comparison above can fail. RoPE's base 10x off, or the cross-attention left open
    (cross_init="self" reads the encoder), move the logits by far more than the tolerance."""
    hf, _, tok = source
    x, am = story_rows(tok)
    ref = llama_logits(hf, tok, x, am)
    mask = torch.cat([torch.ones(len(x), 1, dtype=torch.bool), am.bool()], 1)
    model = from_hf_llama(hf, tok, cross_init="zero").eval()
    model.cfg.rope_theta *= 10
    assert relative_difference(decoder_logits(model, tok, x)[..., :tok.base_vocab_size], ref, mask) > 1e-2
    model = from_hf_llama(hf, tok, cross_init="self").eval()
    assert relative_difference(decoder_logits(model, tok, x)[..., :tok.base_vocab_size], ref, mask) > 1e-2


# -----------------------------------------------------------------------------
# loading, and what is refused

def test_load_model_reads_the_directory(source, tmp_path):
    """checkpoint.load_model (so sample.py and finetune.py) reads the HF directory as an adapted model, and an export
    of it carries the tokenizer files: the same weights and tokenizer back."""
    hf, d, tok = source
    model, tok2, ckpt = load_model(d)
    assert ckpt["kind"] == "hf-llama" and tok2.name == "hf:" + d and tok2.vocab_size == model.cfg.vocab_size
    assert all(torch.equal(v, from_hf_llama(hf, tok).state_dict()[k]) for k, v in model.state_dict().items())
    checkpoint.export(d, str(tmp_path / "exp"))
    assert sorted(os.listdir(tmp_path / "exp")) == ["README.md", "config.json", "model.safetensors", "tokenizer.json",
                                                    "tokenizer_config.json"]
    again, tok3, _ = load_model(str(tmp_path / "exp"))
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())
    assert tok3.model_file == str(tmp_path / "exp" / "tokenizer.json") and tok3.encode("Tom ran.") == tok.encode("Tom ran.")


def test_what_rot5_cannot_compute_is_one_line(hf_tokenizer_dirs, tmp_path):
    for config, message in [(dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope_type 'linear' (RoPE scaling)"),
                            (dict(attention_bias=True), "attention_bias=True: ROT5's projections have no biases"),
                            (dict(mlp_bias=True), "mlp_bias=True"),
                            (dict(hidden_act="gelu"), "hidden_act='gelu'")]:
        with pytest.raises(ValueError) as e:
            check_llama(transformers.LlamaConfig(**config))
        assert message in one_line(e)
        d = save_hf_llama(tmp_path / next(iter(config)), hf_tokenizer_dirs["metaspace"], num_hidden_layers=1, **config)
        with pytest.raises(SystemExit) as e:
            load_model(d)
        assert message in one_line(e) and one_line(e).startswith(d)
    # the tokenizer beside the weights must be the model's: its vocabulary size, and a bos for the start row
    d = save_hf_llama(tmp_path / "other_vocab", hf_tokenizer_dirs["metaspace"], num_hidden_layers=1, vocab_size=1200)
    with pytest.raises(SystemExit) as e:
        load_model(d)
    assert "the model embeds 1200 ids but its tokenizer" in one_line(e)
    d = save_hf_llama(tmp_path / "no_tokenizer", hf_tokenizer_dirs["metaspace"], num_hidden_layers=1)
    os.remove(os.path.join(d, "tokenizer.json"))
    with pytest.raises(SystemExit) as e:
        load_model(d)
    assert "has no tokenizer.json" in one_line(e)
    for kind, config, message in [("gemma2", transformers.Gemma2Config(), "soft-capping"),
                                  ("qwen2", transformers.Qwen2Config(), "biases"),
                                  ("gpt2", transformers.GPT2Config(), "not T5, Llama / Mistral or Switch Transformers")]:
        config.save_pretrained(str(tmp_path / kind))
        with pytest.raises(SystemExit) as e:
            load_model(str(tmp_path / kind))
        assert f"is a '{kind}' model" in one_line(e) and message in one_line(e)


# -----------------------------------------------------------------------------
# the "hf:" tokenizer kind

@pytest.mark.parametrize("kind", ["metaspace", "byte-level"])
def test_hf_tokenizer_layout_and_round_trip(hf_tokenizer_dirs, kind):
    d = hf_tokenizer_dirs[kind]
    tok = get_tokenizer("hf:" + d)
    n = tok.base_vocab_size
    config = json.load(open(os.path.join(d, "tokenizer_config.json")))
    assert n == 1000 and tok._hf.token_to_id(config["eos_token"]) == tok.eos_id
    assert (tok.pad_id, tok.mode_ids) == (n, {"R": n + 1, "X": n + 2, "S": n + 3})
    assert tok.sentinel_ids == list(range(n + 4, tok.vocab_size)) and tok.vocab_size == 1280 and not tok.unused_ids
    with open(STORIES, encoding="utf-8") as f:
        stories = [s.strip() for s in f.read().split("<|endoftext|>") if s.strip()][2000:2050]  # not trained on
    ids = tok.encode(stories)
    # byte-level BPE reads any text; the SentencePiece-style one maps characters it was not trained on to <unk>
    # (as a tokenizer.json without byte fallback does), so its round trip holds for the stories without them
    known = [i for i, row in enumerate(ids) if tok._hf.token_to_id("<unk>") not in row]
    assert len(known) >= (50 if kind == "byte-level" else 40)
    assert [tok.decode(ids[i]) for i in known] == [stories[i] for i in known]
    assert all(0 <= i < n and i not in (tok.eos_id, tok.bos_id) for row in ids for i in row)  # no bos / eos added
    assert tok.decode([*ids[0], tok.eos_id, tok.pad_id]) == stories[0]
    text = "Once upon a time, Lily <extra_id_0> to the park. <extra_id_1>"
    filled = tok.encode(text, allow_sentinels=True)
    assert filled[-1] == tok.sentinel_ids[1] and tok.sentinel_ids[0] in filled
    assert tok.decode(filled) == "Once upon a time, Lily<extra_id_0> to the park.<extra_id_1>"
    # a run after a special token: SentencePiece-style pieces carry their word-start space, byte-level ones have none
    assert tok.decode([tok.mode_ids["S"], *tok.encode("Tom ran.")]) == {"metaspace": "[S] Tom ran.",
                                                                          "byte-level": "[S]Tom ran."}[kind]
    again = pickle.loads(pickle.dumps(tok))
    assert again.name == tok.name == "hf:" + os.path.abspath(d) and again.encode(stories[:3]) == ids[:3]


def test_hf_tokenizer_errors_are_one_line(hf_tokenizer_dirs, tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import WordLevel

    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError) as e:
        Tokenizer("hf:" + str(tmp_path / "empty"))
    assert "has no tokenizer.json" in one_line(e)
    only_json = tmp_path / "only_json"
    only_json.mkdir()
    (only_json / "tokenizer.json").write_bytes(open(os.path.join(hf_tokenizer_dirs["metaspace"], "tokenizer.json"), "rb").read())
    with pytest.raises(ValueError) as e:
        Tokenizer("hf:" + str(only_json))
    assert "tokenizer_config.json is missing: it names the tokenizer's eos" in one_line(e)
    (only_json / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos_not_there>"}))
    with pytest.raises(ValueError) as e:
        Tokenizer("hf:" + str(only_json))
    assert "names eos_token '<eos_not_there>', which is not in" in one_line(e)
    # uint16 shards hold at most 65,536 ids: a source vocabulary of 65,400 + ROT5's 254 does not fit (a size, not data)
    big = tmp_path / "big"
    big.mkdir()
    HFTokenizer(WordLevel({f"<w{i}>": i for i in range(65_400)}, unk_token="<w0>")).save(str(big / "tokenizer.json"))
    (big / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<w1>"}))
    with pytest.raises(ValueError) as e:
        prepare.prepare("sample", out_dir=str(tmp_path / "data"), workers=1, tokenizer="hf:" + str(big))
    assert "has 65,664 ids but shards store uint16 (at most 65,536 ids)" in one_line(e)
    assert not (tmp_path / "data").exists()
