"""model.py: equivalences (KV cache vs full forward, GQA vs a reference einsum attention, one-expert MoE vs
dense FFN), invariances (RoPE cross-attention, padding), hand-computed MoE losses, preset sizes, input checks
and generation contracts (generate.py). Tiny fp32 models on real token ids from data/sample/stories.txt."""
import math
from dataclasses import fields
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from batch import check_batch, padded_batch, shift_right
from generate import generate
from model import ROT5, Attn, CrossAttention, EncoderSelfAttention, FFN, ROT5Config, SwitchFFN, apply_rope, rope_cos_sin
from tokenizer import get_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def tiny(**kw) -> ROT5Config:
    base = dict(d_model=32, n_heads=4, head_dim=8, n_kv_heads=4, d_ff=48, n_encoder_layers=2, n_decoder_layers=3,
                dropout=0.0, attention_dropout=0.0)
    return ROT5Config(**(base | kw))


def real_batch(B: int = 3, S: int = 12, T: int = 9, offset: int = 0):
    """Encoder inputs (right-padded, ragged lengths), decoder inputs and labels from real story lines."""
    tok = get_tokenizer()
    lines = [l for l in (ROOT / "data/sample/stories.txt").read_text().splitlines() if l.strip()]
    ids = tok.encode(lines[offset: offset + 2 * B])
    x = torch.full((B, S), tok.pad_id)
    am = torch.zeros(B, S, dtype=torch.long)
    labels = torch.full((B, T), -100)
    for b in range(B):
        src = ids[2 * b][: S - 2 * b]  # rows get shorter: padding in the batch
        x[b, : len(src)], am[b, : len(src)] = torch.tensor(src), 1
        tgt = ids[2 * b + 1][: T - 1 - b] + [tok.eos_id]
        labels[b, : len(tgt)] = torch.tensor(tgt)
    return x, am, labels


VARIANTS = {
    "t5-mha": {},
    "t5-gqa": dict(n_kv_heads=2),
    "rope-mha": dict(position="rope"),
    "rope-gqa": dict(position="rope", n_kv_heads=1),
    "rope-gqa-moe": dict(position="rope", n_kv_heads=2, n_experts=4),
    "t5-moe-top2": dict(n_experts=3, moe_top_k=2),
    "v1.1-gqa": dict(ffn="gated-gelu", tie_embeddings=False, n_kv_heads=2),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_kv_cache_decoding_equals_full_forward(variant):
    torch.manual_seed(0)
    model = ROT5(tiny(**VARIANTS[variant])).eval()
    x, am, labels = real_batch()
    dec = padded_batch(model.cfg, x, am, labels).decoder_input_ids
    with torch.no_grad():
        full = model(padded_batch(model.cfg, x, am, decoder_input_ids=dec)).logits     # (B, T, V)
        cache = model.new_cache(model.encode(x, am), am, dec.shape[1])
        steps = torch.stack([model.decode_step(dec[:, t: t + 1], cache)[:, 0] for t in range(dec.shape[1])], 1)
    assert cache.self_kv.shape[3] == model.cfg.n_kv_heads  # the cache stores K/V heads, not query heads
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-4)


def test_rope_cross_attention_depends_on_relative_position_only():
    torch.manual_seed(0)
    cfg = tiny(position="rope", n_kv_heads=2)
    attn = CrossAttention(cfg)
    ROT5(cfg)._init_weights(attn)
    x, enc = torch.randn(2, 5, cfg.d_model), torch.randn(2, 7, cfg.d_model)
    i, j = torch.arange(5), torch.arange(7)

    def out(q_shift: int, k_shift: int) -> torch.Tensor:
        kv = attn.project_kv(enc, rope_cos_sin(j + k_shift, cfg.head_dim, cfg.rope_theta), None)
        return attn(x, kv, Attn(None, rope_cos_sin(i + q_shift, cfg.head_dim, cfg.rope_theta)))

    with torch.no_grad():
        ref = out(0, 0)
        torch.testing.assert_close(out(13, 13), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out(300, 300), ref, atol=1e-5, rtol=1e-5)
        assert (out(13, 0) - ref).abs().max() > 1e-3   # shifting one side changes i - j, hence the scores
        assert (out(0, 13) - ref).abs().max() > 1e-3


def test_rope_scores_depend_on_i_minus_j():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    score = lambda i, j: (apply_rope(q, *rope_cos_sin(torch.tensor([i]), 16, 1e4))
                          * apply_rope(k, *rope_cos_sin(torch.tensor([j]), 16, 1e4))).sum()
    assert torch.allclose(score(3, 1), score(10, 8), atol=1e-5)
    assert not torch.allclose(score(3, 1), score(3, 8), atol=1e-3)


def reference_attention(attn: EncoderSelfAttention, cfg: ROT5Config, x, bias, pad_mask):
    """Textbook multi-head attention with einsum; query head h reads K/V head h // (n_heads / n_kv_heads)."""
    H, Hkv, Dh = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    Wq, Wk, Wv = attn.qkv.weight.split([H * Dh, Hkv * Dh, Hkv * Dh])
    B, T, _ = x.shape
    q = torch.einsum("btd,hkd->bhtk", x, Wq.view(H, Dh, -1))
    k = torch.einsum("btd,hkd->bhtk", x, Wk.view(Hkv, Dh, -1))[:, torch.arange(H) // (H // Hkv)]
    v = torch.einsum("btd,hkd->bhtk", x, Wv.view(Hkv, Dh, -1))[:, torch.arange(H) // (H // Hkv)]
    scores = torch.einsum("bhqk,bhsk->bhqs", q, k) + bias          # T5: no 1/sqrt(Dh)
    scores = scores.masked_fill(~pad_mask[:, None, None, :], float("-inf"))
    y = torch.einsum("bhqs,bhsk->bqhk", scores.softmax(-1), v).reshape(B, T, H * Dh)
    return y @ attn.o.weight.T


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_attention_matches_reference_mha_and_gqa(n_kv_heads):
    torch.manual_seed(0)
    cfg = tiny(n_kv_heads=n_kv_heads)
    attn = EncoderSelfAttention(cfg)
    ROT5(cfg)._init_weights(attn)
    x = torch.randn(2, 6, cfg.d_model)
    bias = torch.randn(1, cfg.n_heads, 6, 6)
    pad = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    mask = bias.masked_fill(~pad[:, None, None, :], torch.finfo(torch.float32).min)
    with torch.no_grad():
        torch.testing.assert_close(attn(x, Attn(mask, None)), reference_attention(attn, cfg, x, bias, pad),
                                   atol=1e-5, rtol=1e-4)
        rope_out = attn(x, Attn(pad[:, None, None, :], rope_cos_sin(torch.arange(6), cfg.head_dim, 1e4)))
    assert rope_out.isfinite().all()


def test_moe_with_one_expert_equals_dense_ffn():
    torch.manual_seed(0)
    dense = ROT5(tiny()).eval()
    moe = ROT5(tiny(n_experts=1)).eval()
    sd = {k.replace("ffn.experts.0.", "ffn."): v for k, v in moe.state_dict().items() if "router" not in k}
    dense.load_state_dict(sd)
    x, am, labels = real_batch()
    batch = padded_batch(dense.cfg, x, am, labels)
    with torch.no_grad():
        a, b = dense(batch), moe(batch)
    torch.testing.assert_close(a.loss, b.loss, atol=0, rtol=1e-6)
    assert b.expert_load.shape == (1 + 1, 1) and torch.all(b.expert_load == 1)  # enc layer 1, dec layer 1
    switch, ffn = moe.encoder.layers[1].ffn, FFN(moe.cfg)
    ffn.load_state_dict(switch.experts[0].state_dict())
    h = torch.randn(2, 5, 32)
    torch.testing.assert_close(switch(h), ffn(h), atol=0, rtol=0)  # gate = softmax of 1 logit = 1


def test_moe_losses_match_hand_computed_values_and_skip_pads():
    cfg = tiny(n_experts=2, aux_loss_coef=0.1, z_loss_coef=0.01)
    moe = SwitchFFN(cfg)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0, 0] = moe.router.weight[1, 1] = 1.0   # router logits = first two features
    x = torch.zeros(1, 4, cfg.d_model)
    ln3 = math.log(3)
    x[0, :, :2] = torch.tensor([[ln3, 0.0], [ln3, 0.0], [0.0, ln3], [0.0, 9.0]])  # last token: pad
    mask = torch.tensor([[True, True, True, False]])
    moe(x)
    s = moe.stats(mask)
    # probs: (3/4, 1/4), (3/4, 1/4), (1/4, 3/4) -> top-1 experts 0, 0, 1
    # f = (2/3, 1/3), P = (7/12, 5/12): aux = 0.1 * 2 * (2/3 * 7/12 + 1/3 * 5/12) = 0.1 * 19/18
    # logsumexp = log(3 + 1) for every real token: z = 0.01 * log(4)^2
    assert s.aux_loss.item() == pytest.approx(0.1 * 19 / 18, rel=1e-6)
    assert s.z_loss.item() == pytest.approx(0.01 * math.log(4) ** 2, rel=1e-6)
    assert s.load.tolist() == pytest.approx([2 / 3, 1 / 3])
    s_all = moe.stats(torch.ones_like(mask))  # counting the pad token changes all three: the mask excluded it
    assert s_all.load.tolist() == pytest.approx([2 / 4, 2 / 4])
    assert s_all.aux_loss.item() != pytest.approx(s.aux_loss.item())
    assert s_all.z_loss.item() != pytest.approx(s.z_loss.item())
    off = SwitchFFN(tiny(n_experts=2, aux_loss_coef=0.0, z_loss_coef=0.0))
    off(x)
    s_off = off.stats(mask)
    assert s_off.aux_loss.item() == 0.0 and s_off.z_loss.item() == 0.0


def test_model_router_statistics_ignore_padding():
    torch.manual_seed(0)
    model = ROT5(tiny(position="rope", n_experts=4)).eval()
    x, am, labels = real_batch()
    cfg = model.cfg
    dec = padded_batch(cfg, x, am, labels).decoder_input_ids
    x2, dec2 = x.clone(), dec.clone()
    x2[am == 0] = 1234                                  # junk under the encoder padding
    dec2[labels == -100] = 4321                         # and at decoder positions without a label
    with torch.no_grad():
        a, b = model(padded_batch(cfg, x, am, labels, dec)), model(padded_batch(cfg, x2, am, labels, dec2))
        c = model(padded_batch(cfg, x2, None, labels, dec2))
    torch.testing.assert_close(a.expert_load, b.expert_load)
    torch.testing.assert_close((a.aux_loss, a.z_loss), (b.aux_loss, b.z_loss))
    assert not torch.allclose(a.expert_load, c.expert_load)  # without the mask the pads count
    assert a.expert_load.shape == (2, 4) and torch.allclose(a.expert_load.sum(-1), torch.ones(2))


def test_moe_top2_gates_are_renormalised_and_router_gets_gradient():
    torch.manual_seed(0)
    cfg = tiny(n_experts=3, moe_top_k=2)
    moe = SwitchFFN(cfg)
    for e in moe.experts[1:]:
        e.load_state_dict(moe.experts[0].state_dict())  # identical experts: output = expert(x) iff gates sum to 1
    h = torch.randn(2, 5, cfg.d_model)
    torch.testing.assert_close(moe(h), moe.experts[0](h), atol=1e-6, rtol=1e-5)
    model = ROT5(tiny(n_experts=4, aux_loss_coef=0.0, z_loss_coef=0.0))
    x, am, labels = real_batch()
    out = model(padded_batch(model.cfg, x, am, labels))
    (out.loss + out.aux_loss + out.z_loss).backward()
    # top-1 gate = router probability (Switch sec. 2.1), so the LM loss alone trains the router
    assert model.encoder.layers[1].ffn.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("variant", VARIANTS)
def test_padding_changes_nothing(variant):
    """More padding -- the fixed shapes a compiled step pads to (ul2 static_shapes) -- and junk under it leave
    the loss, the router statistics and every gradient as they were: padding queries attend key 0 alone, no
    query attends a padding key, and the loss and router statistics skip padding. Only the lengths of sums
    over masked keys change (their terms are exact zeros), so the bounds are fp32 rounding's."""
    torch.manual_seed(0)
    model = ROT5(tiny(**VARIANTS[variant]))
    x, am, labels = real_batch()
    wide = (F.pad(x, (0, 5), value=1234), F.pad(am, (0, 5)), F.pad(labels, (0, 4), value=-100))

    def run(x, am, labels):
        model.zero_grad()
        out = model(padded_batch(model.cfg, x, am, labels))
        (out.loss + out.aux_loss + out.z_loss).backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    (a, a_grads), (b, b_grads) = run(x, am, labels), run(*wide)
    for name in ("loss", "aux_loss", "z_loss", "expert_load"):
        u, v = getattr(a, name), getattr(b, name)
        assert (u is None) == (v is None), name
        if u is not None:
            torch.testing.assert_close(u, v, atol=1e-6, rtol=1e-5, msg=name)
    assert a_grads.keys() == b_grads.keys()
    for n in a_grads:
        torch.testing.assert_close(a_grads[n], b_grads[n], atol=1e-6, rtol=1e-4, msg=n)


def test_loss_is_the_cross_entropy_of_the_label_positions():
    torch.manual_seed(0)
    model = ROT5(tiny(ffn="gated-gelu", tie_embeddings=False)).eval()
    x, am, labels = real_batch()
    batch = padded_batch(model.cfg, x, am, labels)
    with torch.no_grad():
        out, full = model(batch), model(batch._replace(labels=None, label_index=None))
    assert out.logits is None and out.expert_load is None and out.aux_loss.item() == 0.0
    assert torch.equal(batch.label_index, (labels.flatten() != -100).nonzero().squeeze(1))
    torch.testing.assert_close(out.loss, F.cross_entropy(full.logits.flatten(0, 1), labels.flatten(), ignore_index=-100))


def test_shift_right_starts_every_segment():
    """Teacher forcing: each segment reads its labels one step late after the start token (pad); -100 -> pad."""
    P = 7
    labels = torch.tensor([[10, 11, 12, 20, 21, -100], [30, 31, 32, 33, 34, 35]])
    seg = torch.tensor([[1, 1, 1, 2, 2, 0], [3, 3, 3, 3, 3, 3]])
    assert shift_right(labels, seg, P).tolist() == [[P, 10, 11, P, 20, P], [P, 30, 31, 32, 33, 34]]


def preset(name: str) -> ROT5Config:
    ns: dict = {}
    exec((ROOT / "config" / f"{name}.py").read_text(), ns)
    names = {f.name for f in fields(ROT5Config)}
    return ROT5Config(**{k: v for k, v in ns.items() if k in names})


@pytest.mark.parametrize("name,seed_params", [("t5_base", 223e6), ("rot5_base_rope", 223e6),
                                               ("rot5_base_gqa", 195e6), ("rot5_mini", 47e6)])
def test_preset_parameter_counts_match_the_seed(name, seed_params):
    cfg = preset(name)
    assert cfg.vocab_size == 32256
    with torch.device("meta"):
        n = ROT5(cfg).num_params()
    assert abs(n - seed_params) / seed_params < 0.03, n


def test_train_flops_counts_active_matmul_parameters():
    for cfg in (tiny(ffn="gated-gelu", tie_embeddings=False), tiny(n_experts=4, n_kv_heads=2)):
        model = ROT5(cfg)
        matmul = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "relative_bias" not in n
                     and n != "embed.weight") + (cfg.vocab_size * cfg.d_model if cfg.tie_embeddings else 0)
        inactive = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n and ".experts.0." not in n)
        assert model.train_flops(1, 1, 0, 0) == 6 * (matmul - inactive)
        attn = 12 * cfg.n_heads * cfg.head_dim * (cfg.n_encoder_layers * 10 * 5 + cfg.n_decoder_layers * (4 + 10) * 3)
        assert model.train_flops(5, 3, 10, 4) - model.train_flops(5, 3, 0, 0) == attn


@pytest.mark.parametrize("kw,msg", [
    (dict(n_kv_heads=3), "must divide n_heads"),
    (dict(position="alibi"), "position must be"),
    (dict(attention="flash"), "attention must be"),
    (dict(attention="flex", attention_dropout=0.1), "cannot apply attention_dropout"),
    (dict(attention_dropout=-0.1), "attention_dropout must be in"),
    (dict(ffn="swiglu"), "ffn must be"),
    (dict(n_experts=2, moe_top_k=3), "moe_top_k=3 must be <= n_experts=2"),
    (dict(n_experts=-1), "n_experts must be >= 0"),
    (dict(d_model=0), "d_model must be > 0"),
    (dict(dropout=1.0), "dropout must be in"),
    (dict(pad_token_id=32256), "pad_token_id=32256"),
    (dict(head_dim=7, position="rope"), "head_dim must be even"),
    (dict(d_model=32.0), "d_model must be a int"),
    (dict(aux_loss_coef=-1.0), "aux_loss_coef"),
])
def test_config_validation(kw, msg):
    with pytest.raises(ValueError, match=msg):
        tiny(**kw)


def test_bad_inputs_raise_one_line_errors():
    """Where batches enter (padded_batch, check_batch, generate): one line each, never a traceback from deep
    in the model or a silent wrong result."""
    model = ROT5(tiny())
    cfg = model.cfg
    x, am, labels = real_batch()
    bad = x.clone()
    bad[1, 2] = 40000
    with pytest.raises(ValueError, match=r"input_ids contains id 40000, outside the vocabulary \[0, 32256\)"):
        padded_batch(cfg, bad, am, labels)
    with pytest.raises(ValueError, match=r"labels contains id -5"):
        padded_batch(cfg, x, am, labels.masked_fill(labels == -100, -5))
    with pytest.raises(ValueError, match="int64 tensor"):
        padded_batch(cfg, x.float(), am, labels)
    with pytest.raises(ValueError, match=r"shape \(batch, length\)"):
        padded_batch(cfg, x[0], None, labels)
    with pytest.raises(ValueError, match="attention_mask must have the shape"):
        padded_batch(cfg, x, am[:, :-1], labels)
    with pytest.raises(ValueError, match="decoder_input_ids or labels"):
        padded_batch(cfg, x, am)
    with pytest.raises(ValueError, match="3 decoder rows read 1 encoder rows"):  # not silently read as 3 beams
        padded_batch(cfg, x[:1], am[:1], labels)
    empty_row = am.clone()
    empty_row[2] = 0  # nothing for cross-attention to attend to: refused, not a made-up output
    with pytest.raises(ValueError, match="input row 2 is all padding"):
        padded_batch(cfg, x, empty_row, labels)
    with pytest.raises(ValueError, match="input row 2 is all padding"):
        generate(model, x, empty_row, max_new_tokens=1)
    with pytest.raises(ValueError, match="labels are all -100"):  # (the mean over no tokens would be NaN)
        padded_batch(cfg, x, am, torch.full_like(labels, -100))
    batch = padded_batch(cfg, x, am, labels)
    with pytest.raises(ValueError, match="labels .* and decoder_input_ids .* must have the same shape"):
        check_batch(batch._replace(labels=labels[:, :-1]), cfg)
    with pytest.raises(ValueError, match="label_index must be label_positions"):
        check_batch(batch._replace(label_index=batch.label_index[1:]), cfg)
    with pytest.raises(ValueError, match="label_index without labels"):
        check_batch(batch._replace(labels=None), cfg)
    model.eval()  # int32 ids work like int64 ones, labels included
    assert model(padded_batch(cfg, x.int(), am, labels.int())).loss.item() == model(batch).loss.item()
    banned = [int(i) for i in generate(model, x, am, max_new_tokens=1)[:, 0]]
    out = generate(model, x, am, max_new_tokens=1, suppress_tokens=torch.tensor(banned))  # a tensor works too
    assert not torch.isin(out, torch.tensor(banned)).any()


def eos_prone_model(seed: int = 0) -> ROT5:
    torch.manual_seed(seed)
    model = ROT5(tiny(ffn="gated-gelu", tie_embeddings=False)).eval()
    with torch.no_grad():
        model.lm_head.weight[model.cfg.eos_token_id] *= 4  # make eos a frequent choice
    return model


def test_sampling_is_reproducible_with_a_generator():
    model = ROT5(tiny(position="rope", n_kv_heads=2)).eval()
    x, am, _ = real_batch()
    gen = lambda seed, **kw: generate(model, x, am, max_new_tokens=8, do_sample=True,
                                      generator=torch.Generator().manual_seed(seed), **kw)
    assert torch.equal(gen(1, temperature=2.0, top_p=0.9), gen(1, temperature=2.0, top_p=0.9))
    assert not torch.equal(gen(1, temperature=2.0), gen(2, temperature=2.0))
    assert torch.equal(gen(3, top_k=1), generate(model, x, am, max_new_tokens=8))  # top-1 sampling = greedy


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generate_returns_eos_then_pad(num_beams):
    model = eos_prone_model()
    x, am, _ = real_batch(B=6, offset=10)
    out = generate(model, x, am, max_new_tokens=12, num_beams=num_beams)
    eos, pad = model.cfg.eos_token_id, model.cfg.pad_token_id
    assert out.shape[0] == 6 and out.shape[1] <= 12
    ended = 0
    for row in out.tolist():
        if eos in row:
            k = row.index(eos)
            ended += k < len(row) - 1
            assert all(t == pad for t in row[k + 1:])
        else:
            assert len(row) == out.shape[1] and pad not in row
    assert ended > 0  # some sequence finished before the others: its tail is padding
