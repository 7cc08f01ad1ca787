"""Tests for the hookable attention (unilens.attention) and the weight views (unilens.weights).

Oracles: HF's own eager attention (`output_attentions=True`, a separate eager copy with the same weights), HF's
sdpa forward, the models' own q/k/v splitting code, and a manual eager forward written here from the weights.
Tolerances: fp32 throughout; 1e-5 follows torch.testing's fp32 atol (see numerics.md), 1e-4 against sdpa
follows the brief (different kernel summation order).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from unilens.arch.discovery import ModuleMap, discover
from unilens.arch.weights import LayerWeights
from unilens.hooks.attention import (
    AttentionHookAccessor,
    AttentionHooks,
    find_output_projection,
    install_attention_hooks,
    request_materialize,
)
from unilens.model.transformer import StandardizedTransformer
from unilens.testing import tiny_model

# Add a model type here to cover it by the probability / logit / fast-path checks.
VERIFIED_TYPES = [
    "llama",
    "mistral",  # sliding window
    "gemma2",  # sliding window (eager-only); softcap exercised by "gemma2-softcap" below
    "gpt_oss",  # learned sinks + sliding window (eager-only)
    "qwen2_moe",
    "deepseek_v3",  # MLA
    "deepseek_v4",  # sinks; grouped low-rank output (z not split per head: heads refused, probabilities fine)
    "gpt2",  # Conv1D
    "gptj",  # inline attention: softmax route
    "bloom",  # inline attention, alibi
    "falcon",  # inline attention with its own sdpa branch
    "phi",
    "gpt_neox",
    "opt",
    "gemma2-softcap",
    "xglm",  # inline BART-style attention: 3D (batch * heads, query, key) softmax
    "trocr",  # same, decoder-only TrOCR
    "mvp",  # same, causal decoder of an encoder-decoder
    "whisper",  # attention interface, queries pre-scaled (scaling=1.0)
    "bert",  # interface; no output projection inside BertSelfAttention (its dense is a sibling)
    "bert-generation",
    "jetmoe",  # mixture-of-attention: queries and output from experts, only kv_proj inside
    "granite_swa",  # sinks applied as an output scale: probabilities sum to 1
    "granitemoe_swa",
    "inkling2_text",  # per-query sinks and a relative position bias passed as kwargs; gated output projection
    "deepseek_v32",  # DSA: top-k key selection passed as `indices` (applied by the model only for eager / sdpa)
    "minimax_m3_vl_text",  # block-sparse key selection passed as `block_indices`
    "kimi_linear",  # hybrid: delta-rule linear attention layers are not attention layers
    "minimax",  # hybrid: lightning (linear) attention layers
    "bailing_hybrid",  # hybrid: delta attention layers
]
# Variants: (model type, config overrides, factor on q_proj weights). Random-init scores are ~1e-4, where
# tanh(s / cap) * cap == s to fp32 precision; a small cap and larger queries make softcapping change the output.
_VARIANTS = {"gemma2-softcap": ("gemma2", {"attn_logit_softcapping": 0.5}, 200.0)}

SEQ = 9


def _pair(name: str):
    """(model with its default attention, eager copy with the same weights, tokenizer)."""
    model_type, overrides, q_scale = _VARIANTS.get(name, (name, {}, 1.0))
    model, tok = tiny_model(model_type, **overrides)
    if q_scale != 1.0:
        with torch.no_grad():
            for attn in _attention_modules(model):
                attn.q_proj.weight.mul_(q_scale)
    eager, _ = tiny_model(model_type, attn_implementation="eager", **overrides)
    eager.load_state_dict(model.state_dict())
    return model, eager, tok


def _attention_modules(hf_model) -> list[nn.Module | None]:
    arch = discover(hf_model)
    acc = ModuleMap(hf_model, arch)
    return [acc.get_attention(i) if parts.attention else None for i, parts in enumerate(arch.layers)]


def _ids(vocab: int, batch: int = 2, seq: int = SEQ, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, min(vocab, 200), (batch, seq), generator=g)


def _vocab(hf_model) -> int:
    return hf_model.get_input_embeddings().weight.shape[0]


# ------------------------------------------------------------------------------------------------------------
# Probabilities and logits, every type
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", VERIFIED_TYPES)
def test_probabilities_and_logits_match_eager(model_type):
    model, eager, tok = _pair(model_type)
    ids = _ids(_vocab(model))
    with torch.no_grad():
        ref = eager(ids, output_attentions=True)
        native = model(ids).logits  # the model's own default backend (sdpa where supported)
    std = StandardizedTransformer(model, tokenizer=tok, check=False)
    layers = [i for i, m in enumerate(std._attention_modules) if m is not None]
    assert layers, "no attention layer found"

    # 1. fast path: nothing requested -> no hook point runs, logits identical to the unmodified model
    fired = []
    handles = [
        m.unilens_hooks.probabilities.register_forward_hook(lambda *a: fired.append(1))
        for m in std._attention_modules
        if m is not None
    ]
    with std.trace(ids):
        fast = std.logits.save()
    assert not fired, "hook points ran although nothing was requested"
    assert torch.allclose(fast, native, atol=1e-6, rtol=0)

    # 2. every layer's probabilities through the nnsight accessor, and the logits of that materialized forward
    probs = []
    with std.trace(ids):
        for i in layers:  # a plain loop: nnsight 0.8 does not capture names bound inside comprehensions
            probs.append(std.attention_probabilities[i].save())
        logits = std.logits.save()
    for h in handles:
        h.remove()
    assert len(fired) == len(layers)
    # HF returns one map per layer, or (some hybrids, e.g. Kimi-Linear) one per softmax-attention layer only
    expected = ref.attentions if len(ref.attentions) == len(layers) else [ref.attentions[i] for i in layers]
    for i, p, want in zip(layers, probs, expected):
        assert p.shape == want.shape
        err = (p - want).abs().max().item()
        assert err < 1e-5, f"{model_type} layer {i}: probabilities differ from eager by {err:.2e}"
    assert (logits - ref.logits).abs().max().item() < 1e-5
    assert (logits - native).abs().max().item() < 1e-4
    # one request serves one forward
    assert not any(m.unilens_hooks.materialize for m in std._attention_modules if m is not None)


@pytest.mark.parametrize("model_type", VERIFIED_TYPES)
def test_always_materialize_logits(model_type):
    model, eager, _ = _pair(model_type)
    ids = _ids(_vocab(model), seed=1)
    with torch.no_grad():
        native = model(ids).logits
        ref = eager(ids).logits
    mods = _attention_modules(model)
    install_attention_hooks(model, mods, always_materialize=True)
    seen = []
    for m in mods:
        if m is not None:
            m.unilens_hooks.probabilities.register_forward_hook(lambda *a: seen.append(1))
    with torch.no_grad():
        logits = model(ids).logits
    assert len(seen) == sum(m is not None for m in mods)
    assert (logits - ref).abs().max().item() < 1e-5
    assert (logits - native).abs().max().item() < 1e-4


def test_gpt_oss_sink_mass_and_sliding_window():
    """Sinks: rows over real keys sum to < 1 (1 - p_sink); sliding window: keys outside the window get 0."""
    model, _ = tiny_model("gpt_oss")
    mods = _attention_modules(model)
    install_attention_hooks(model, mods, always_materialize=True)
    out = {}
    for i, m in enumerate(mods):
        m.unilens_hooks.probabilities.register_forward_hook(lambda mod, a, o, i=i: out.__setitem__(i, o))
    with torch.no_grad():
        model(_ids(_vocab(model)))
    p_sink = 1 - out[0].sum(-1)
    assert (p_sink > 1e-4).all() and (p_sink < 1).all()
    window = model.config.sliding_window
    sliding = [i for i, t in enumerate(model.config.layer_types) if t == "sliding_attention"]
    assert sliding and window < SEQ
    assert out[sliding[0]][:, :, -1, : SEQ - window].abs().max() == 0


# ------------------------------------------------------------------------------------------------------------
# Editing, checked against a manual eager forward written from the weights
# ------------------------------------------------------------------------------------------------------------


def _edit(p: torch.Tensor) -> torch.Tensor:
    """Zero attention to the first key (queries 1.. only; query 0 sees only key 0) and renormalize."""
    p = p.clone()
    p[:, :, 1:, 0] = 0
    return p / p.sum(-1, keepdim=True)


def _manual_attention(q, k, v, scale):
    """q (b, h, s, d), k / v (b, kv, s, d): causal eager attention with the edit applied. -> (b, s, h*d)"""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = q.shape[2]
    scores = q @ k.transpose(-1, -2) * scale
    scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    p = _edit(scores.softmax(-1))
    return (p @ v).transpose(1, 2).reshape(q.shape[0], s, -1)


def _manual_llama(hf, ids):
    cfg = hf.config
    h, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = cfg.hidden_size // h
    x = hf.model.embed_tokens.weight[ids]
    pos = torch.arange(ids.shape[1])
    inv = 1.0 / (cfg.rope_parameters["rope_theta"] ** (torch.arange(0, d, 2).float() / d))
    ang = pos[:, None].float() * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()

    def rope(t):
        t1, t2 = t[..., : d // 2], t[..., d // 2 :]
        return t * cos + torch.cat([-t2, t1], -1) * sin

    def rms(t, w):
        return w * (t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps))

    b, s = ids.shape
    for layer in hf.model.layers:
        a = layer.self_attn
        n = rms(x, layer.input_layernorm.weight)
        q = (n @ a.q_proj.weight.T).view(b, s, h, d).transpose(1, 2)
        k = (n @ a.k_proj.weight.T).view(b, s, kv, d).transpose(1, 2)
        v = (n @ a.v_proj.weight.T).view(b, s, kv, d).transpose(1, 2)
        x = x + _manual_attention(rope(q), rope(k), v, d**-0.5) @ a.o_proj.weight.T
        n = rms(x, layer.post_attention_layernorm.weight)
        mlp = layer.mlp
        x = x + (nn.functional.silu(n @ mlp.gate_proj.weight.T) * (n @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T
    return rms(x, hf.model.norm.weight) @ hf.lm_head.weight.T


def _manual_gpt2(hf, ids):
    cfg = hf.config
    h, e = cfg.n_head, cfg.n_embd
    d = e // h
    tr = hf.transformer
    b, s = ids.shape
    x = tr.wte.weight[ids] + tr.wpe.weight[torch.arange(s)]

    def ln(t, mod):
        return nn.functional.layer_norm(t, (e,), mod.weight, mod.bias, mod.eps)

    for block in tr.h:
        a = block.attn
        qkv = ln(x, block.ln_1) @ a.c_attn.weight + a.c_attn.bias  # Conv1D weight is (in, out)
        q, k, v = (t.view(b, s, h, d).transpose(1, 2) for t in qkv.split(e, -1))
        x = x + _manual_attention(q, k, v, d**-0.5) @ a.c_proj.weight + a.c_proj.bias
        n = ln(x, block.ln_2)
        hid = nn.functional.gelu(n @ block.mlp.c_fc.weight + block.mlp.c_fc.bias, approximate="tanh")
        x = x + hid @ block.mlp.c_proj.weight + block.mlp.c_proj.bias
    return ln(x, tr.ln_f) @ hf.lm_head.weight.T


@pytest.mark.parametrize("model_type,manual", [("llama", _manual_llama), ("gpt2", _manual_gpt2)])
def test_edit_probabilities_matches_manual_forward(model_type, manual):
    hf, tok = tiny_model(model_type)
    ids = _ids(_vocab(hf), seed=2)
    with torch.no_grad():
        expected = manual(hf, ids)
        unedited = hf(ids).logits
    assert (expected - unedited).abs().max() > 1e-2, "the edit must matter for this test to mean anything"
    std = StandardizedTransformer(hf, tokenizer=tok, check=False)
    with std.trace(ids):
        for i in range(std.num_layers):
            std.attention_probabilities[i] = _edit(std.attention_probabilities[i])
        logits = std.logits.save()
    assert (logits - expected).abs().max().item() < 1e-5


# ------------------------------------------------------------------------------------------------------------
# Values, z, per-head results and the weight views
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gpt_neox", "qwen2_moe", "opt", "gpt_oss"])
def test_values_z_head_results_against_weights(model_type):
    hf, tok = tiny_model(model_type)
    std = StandardizedTransformer(hf, tokenizer=tok, check=False)
    ids = _ids(_vocab(hf), seed=3)
    i = std.num_layers - 1
    with std.trace(ids):
        x = std.attentions_input[i].save()
        values = std.attention_values[i].save()
        z = std.attention_heads[i].save()
        results = std.attention_head_results[i].save()
        out = std.attentions_output[i].save()
    w = std.weights[i]
    expected_v = torch.einsum("bsm,kmd->bksd", x, w.W_V) + w.b_V[None, :, None]
    assert (values - expected_v).abs().max().item() < 1e-5
    assert z.shape[-2:] == (w.n_heads, w.head_dim)
    assert (torch.einsum("bshd,hdm->bsm", z, w.W_O) + w.b_O - out).abs().max().item() < 1e-5
    assert results.shape == (*z.shape[:2], w.n_heads, out.shape[-1])
    assert (results.sum(-2) + w.b_O - out).abs().max().item() < 1e-5


def _qkv_through_interface(attn, x):
    """q, k, v as the module's own forward hands them to the attention function, with rotary made the identity
    (cos 1, sin 0): its own splitting code, wherever it lives."""
    from transformers import AttentionInterface

    captured = {}

    def capture(module, q, k, v, mask, **kwargs):
        captured.update(q=q, k=k, v=v)
        return torch.zeros(q.shape[0], q.shape[2], q.shape[1], q.shape[3]), None  # (batch, seq, heads, head_dim)

    AttentionInterface.register("unilens_test_capture", capture)
    previous = attn.config._attn_implementation
    attn.config._attn_implementation = "unilens_test_capture"
    try:
        ones = torch.ones(x.shape[0], x.shape[1], attn.head_dim)
        attn(x, attention_mask=None, position_embeddings=(ones, torch.zeros_like(ones)))
    finally:
        attn.config._attn_implementation = previous
    return captured["q"], captured["k"], captured["v"]


def _qkv_by_model_code(attn, x):
    """q, k, v `(batch, heads, seq, head_dim)` before rotary, produced by each model's own splitting code."""
    name = type(attn).__name__
    if name == "FalconAttention" and hasattr(attn, "_split_heads"):  # transformers <= 5.24
        q, k, v = attn._split_heads(attn.query_key_value(x))  # (batch, seq, heads, head_dim)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if name == "FalconAttention":  # >= 5.25: split inside forward; what it hands the attention function
        return _qkv_through_interface(attn, x)
    if name == "BloomAttention":
        return attn._reshape(attn.query_key_value(x))
    if name == "GPTNeoXAttention":
        qkv = attn.query_key_value(x).view(*x.shape[:-1], -1, 3 * attn.head_size).transpose(1, 2)
        return qkv.chunk(3, dim=-1)
    if name == "GPT2Attention":
        q, k, v = attn.c_attn(x).split(attn.split_size, dim=2)
        return (t.view(*x.shape[:-1], -1, attn.head_dim).transpose(1, 2) for t in (q, k, v))
    if name == "Phi3Attention":
        qkv = attn.qkv_proj(x)
        qp, kp = attn.config.num_attention_heads * attn.head_dim, attn.num_key_value_heads * attn.head_dim
        parts = (qkv[..., :qp], qkv[..., qp : qp + kp], qkv[..., qp + kp :])
        return (t.view(*x.shape[:-1], -1, attn.head_dim).transpose(1, 2) for t in parts)
    raise AssertionError(name)


@pytest.mark.parametrize(
    "model_type,overrides",
    [
        ("falcon", {}),  # multi-query
        ("falcon", {"multi_query": False}),  # per-head interleave
        ("falcon", {"new_decoder_architecture": True, "num_kv_heads": 2}),  # grouped
        ("bloom", {}),
        ("gpt_neox", {}),
        ("gpt2", {}),
        ("phi3", {}),
    ],
)
def test_fused_qkv_weight_views(model_type, overrides):
    hf, _ = tiny_model(model_type, **overrides)
    attn = _attention_modules(hf)[0]
    w = LayerWeights(attn, hf.config, 0)
    x = torch.randn(2, 5, hf.config.hidden_size, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        q, k, v = _qkv_by_model_code(attn, x)
        for got_w, got_b, want in ((w.W_Q, w.b_Q, q), (w.W_K, w.b_K, k), (w.W_V, w.b_V, v)):
            mine = torch.einsum("bsm,hmd->bhsd", x, got_w) + got_b[None, :, None]
            if mine.shape[1] != want.shape[1]:  # Falcon broadcasts its kv heads over the query heads
                mine = mine.repeat_interleave(want.shape[1] // mine.shape[1], 1)
            assert (mine - want).abs().max().item() < 1e-5
    assert w.W_O.shape == (w.n_heads, w.head_dim, hf.config.hidden_size)


def test_unembed_embed_views_and_mla_refusal():
    hf, tok = tiny_model("llama")
    std = StandardizedTransformer(hf, tokenizer=tok, check=False)
    assert torch.equal(std.weights.W_U, hf.lm_head.weight.T)
    assert torch.equal(std.weights.W_E, hf.model.embed_tokens.weight)
    mla, _ = tiny_model("deepseek_v3")
    with pytest.raises(NotImplementedError, match="multi-head latent attention"):
        LayerWeights(_attention_modules(mla)[0], mla.config, 0).W_Q


# ------------------------------------------------------------------------------------------------------------
# Padding, errors, dispatch
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "gpt_oss", "bloom", "gpt2", "xglm", "granite_swa"])
def test_left_padding_rows_equal_prompt_alone(model_type):
    hf, tok = tiny_model(model_type)
    std = StandardizedTransformer(hf, tokenizer=tok, check=False)
    long_ids, short_ids = _ids(_vocab(hf), batch=1, seq=SEQ, seed=5), _ids(_vocab(hf), batch=1, seq=4, seed=6)
    pad = SEQ - 4
    ids = torch.cat([long_ids, torch.cat([torch.full((1, pad), tok.pad_token_id), short_ids], 1)])
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    layer = std.num_layers - 1
    with std.trace({"input_ids": ids, "attention_mask": mask}):
        probs = std.attention_probabilities[layer].save()
        logits = std.logits.save()
    for row, alone_ids, start in ((0, long_ids, 0), (1, short_ids, pad)):
        with std.trace({"input_ids": alone_ids, "attention_mask": torch.ones_like(alone_ids)}):
            p_alone = std.attention_probabilities[layer].save()
            l_alone = std.logits.save()
        assert (probs[row, :, start:, start:] - p_alone[0]).abs().max().item() < 1e-5
        assert (logits[row, start:] - l_alone[0]).abs().max().item() < 1e-5


def test_softmax_route_refuses_queries_and_hybrid_layers_are_named():
    # Bloom computes its attention inline (GPT-J did too until transformers 5.24 moved it to the interface)
    hf, tok = tiny_model("bloom")
    std = StandardizedTransformer(hf, tokenizer=tok, check=False)
    assert std._attention_modules[0].unilens_hooks.route == "softmax"
    with pytest.raises(NotImplementedError, match="BloomAttention"):
        std.attention_queries[0]

    class Fake:  # a hybrid model as the accessor sees it
        _attention_modules = [None, std._attention_modules[0]]
        architecture_name = "hybrid-test"

    with pytest.raises(IndexError, match=r"layer 0 of hybrid-test.*\[1\]"):
        AttentionHookAccessor(Fake(), "probabilities")[0]


def test_request_resets_after_one_forward_and_fast_path_uses_original():
    hf, _ = tiny_model("llama")
    ids = _ids(_vocab(hf))
    mods = _attention_modules(hf)
    install_attention_hooks(hf, mods)
    assert hf.config._attn_implementation == "unilens"
    calls = []
    mods[0].unilens_hooks.scores.register_forward_hook(lambda *a: calls.append(1))
    request_materialize(mods[0])
    with torch.no_grad():
        hf(ids)
        hf(ids)
    assert calls == [1]
    assert isinstance(mods[0].unilens_hooks, AttentionHooks)
    assert mods[0].unilens_hooks.original_implementation == "sdpa"


def test_scores_are_scaled_masked_logits():
    """scores = q k^T * scaling + mask; softmax(scores) = probabilities."""
    hf, tok = tiny_model("llama")
    std = StandardizedTransformer(hf, tokenizer=tok, check=False)
    ids = _ids(_vocab(hf), seed=7)
    with std.trace(ids):
        q = std.attention_queries[0].save()
        k = std.attention_keys[0].save()
        scores = std.attention_scores[0].save()
        probs = std.attention_probabilities[0].save()
    k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
    raw = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    causal = torch.ones(SEQ, SEQ, dtype=torch.bool).tril()
    assert (scores[..., causal] - raw[..., causal]).abs().max().item() < 1e-5
    assert (scores[..., ~causal] < -1e30).all()
    assert (scores.softmax(-1) - probs).abs().max().item() < 1e-6


def test_linear_attention_layers_are_not_attention_layers():
    """Hybrids: the attention layers are exactly the config's softmax ("full_attention") layers (oracle: layer_types)."""
    for model_type in ("kimi_linear", "minimax", "bailing_hybrid"):
        hf, _ = tiny_model(model_type)
        expected = [i for i, t in enumerate(hf.config.layer_types) if t == "full_attention"]
        assert 0 < len(expected) < len(hf.config.layer_types)
        assert discover(hf).attention_layers == expected, model_type


def test_output_projection_is_never_an_input_projection():
    """BERT's self-attention owns only query / key / value and JetMoE's only kv_proj: no output projection, so
    heads are refused; DeepSeek-V4's last Linear (o_b_proj) is not fed by z: heads are refused at run time."""
    for model_type, cls in (("bert", "BertSelfAttention"), ("jetmoe", "JetMoeAttention")):
        hf, tok = tiny_model(model_type)
        with pytest.raises(ValueError, match=cls):
            find_output_projection(_attention_modules(hf)[0])
        std = StandardizedTransformer(hf, tokenizer=tok, check=False)
        with pytest.raises(NotImplementedError, match="no output projection"):
            std.attention_heads[0]
    hf, tok = tiny_model("deepseek_v4")
    std = StandardizedTransformer(hf, tokenizer=tok, check=False)
    with pytest.raises(RuntimeError, match="not fed by the per-head outputs"):
        with std.trace(_ids(_vocab(hf), batch=1)):
            std.attention_heads[0].save()


def test_bart_style_heads_match_out_proj_input():
    """XGLM (3D softmax route): z is the out_proj input viewed per head (oracle: a torch hook on out_proj)."""
    hf, tok = tiny_model("xglm")
    seen = []
    std = StandardizedTransformer(hf, tokenizer=tok, check=False)
    attn = std._attention_modules[0]
    attn.out_proj.register_forward_hook(lambda mod, args, out: seen.append(args[0].detach().clone()))
    with std.trace(_ids(_vocab(hf), seed=8)):
        z = std.attention_heads[0].save()
    assert z.shape == (2, SEQ, attn.num_heads, attn.head_dim)
    assert torch.equal(z.reshape(2, SEQ, -1), seen[-1])


def test_unknown_attention_keyword_is_refused_not_ignored():
    """A keyword no model passes today reaches the attention function (Llama hands **kwargs down): refused on both
    paths, while HF's own sdpa would silently drop it; given by the caller, it is reported as the caller's
    (``UnknownForwardKeyword``; an architecture passing one: tests/test_forward_keywords.py). A None value carries
    nothing and is accepted."""
    from unilens.hooks.attention import UnknownForwardKeyword

    hf, tok = tiny_model("llama")
    ids = _ids(_vocab(hf))
    bias = torch.zeros(1, 1, SEQ, SEQ)
    with torch.no_grad():
        plain = hf(ids, future_attention_bias=bias).logits  # transformers' sdpa ignores it
    std = StandardizedTransformer(hf, tokenizer=tok, check=False)
    with pytest.raises(UnknownForwardKeyword, match="future_attention_bias= is not an argument of LlamaForCausalLM"):
        with torch.no_grad():
            hf(ids, future_attention_bias=bias)  # fast path
    with pytest.raises(UnknownForwardKeyword, match="future_attention_bias="):
        with std.trace(ids, future_attention_bias=bias):
            std.attention_probabilities[0].save()  # hookable path
    with torch.no_grad():
        assert torch.equal(hf(ids, future_attention_bias=None).logits, plain)


@pytest.mark.parametrize("model_type", ["deepseek_v32", "minimax_m3_vl_text"])
def test_sparse_selection_binds_and_load_check_sees_it(model_type, monkeypatch):
    """The zoo's sparse-attention configs select fewer keys than the prompt has, so the selection changes the output;
    dropping it (what an implementation name other than eager / sdpa did before) fails the load-time check."""
    import unilens.attention as attention

    from unilens.model.validation import ValidationError, validate_model

    hf, tok = tiny_model(model_type)
    dense, _ = tiny_model(model_type, index_topk=10_000, index_topk_blocks=10_000)
    dense.load_state_dict(hf.state_dict())
    ids = _ids(_vocab(hf))
    with torch.no_grad():
        assert (hf(ids).logits - dense(ids).logits).abs().max() > 1e-4  # the selection binds
    std = StandardizedTransformer(hf, tokenizer=tok)  # load check passes
    monkeypatch.setattr(attention, "_apply_selection", lambda m, q, k, mask, kw: (mask, {**kw, "indices": None,
                                                                                          "block_indices": None}))
    with pytest.raises(ValidationError, match="logits vs HF logits"):
        validate_model(std)
