"""The TransformerLens-style surface (unilens.tl) against independent oracles: a separate HF copy of the same
weights (eager attention, output_hidden_states / output_attentions), plain torch hooks on it, hand computations."""

from __future__ import annotations

import pytest
import torch

from unilens import StandardizedTransformer, load_default
from unilens.arch.loading import default_model_path, load_hf_model
from unilens.compat import tl
from unilens.testing import tiny_model

PROMPT = "The capital of France is"
_MODELS: dict[str, tuple] = {}


def _get(kind: str):
    """(unilens model, separate eager HF copy of the same weights); loaded once per test session."""
    if kind not in _MODELS:
        if kind == "smollm2":
            model = load_default()
            ref, _ = load_hf_model(default_model_path(), dtype=torch.float32, attn_implementation="eager")
        else:
            hf, tok = tiny_model(kind)
            model = StandardizedTransformer(hf, tokenizer=tok)
            ref, _ = tiny_model(kind, attn_implementation="eager")
        _MODELS[kind] = (model, ref.eval())
    return _MODELS[kind]


def _ids(model, text=PROMPT):
    """TL's tokenization, built by hand: BOS (except where TL 4.3's bridge adapter sets default_prepend_bos=False:
    Qwen 2 / 3 here), then the text's own tokens."""
    tok = model.tokenizer
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    first = [] if model.architecture.model_type in ("qwen2", "qwen3") else [bos]
    return torch.tensor([first + tok(text, add_special_tokens=False)["input_ids"]])


def _ref(ref, ids, hooks=()):
    """HF forward of the reference copy, with optional plain torch hooks [(module, kind, fn)]."""
    handles = []
    for module, kind, fn in hooks:
        handles.append(module.register_forward_pre_hook(fn) if kind == "pre" else module.register_forward_hook(fn))
    try:
        with torch.no_grad():
            return ref(input_ids=ids, output_hidden_states=True, output_attentions=True)
    finally:
        for h in handles:
            h.remove()


def _layers(ref):
    return ref.model.layers if hasattr(ref, "model") and hasattr(ref.model, "layers") else ref.transformer.h


KINDS = ["llama", "gpt2", "gptj", "qwen3", "smollm2"]


@pytest.mark.parametrize("kind", KINDS)
def test_cache_equals_hf_outputs_and_torch_hooks(kind):
    model, ref = _get(kind)
    ids = _ids(model)
    # names in reverse forward order, as a list: one forward serves them all
    names = [n for n in reversed(tl.hook_names(model))]
    logits, cache = model.run_with_cache(PROMPT, names_filter=names)
    assert torch.equal(model.to_tokens(PROMPT).cpu(), ids)
    z_seen, last_out = {}, {}
    layers = _layers(ref)
    n = model.num_layers
    hooks = [(layers[-1], "fwd", lambda m, a, o: last_out.update(x=(o[0] if isinstance(o, tuple) else o)))]
    if hasattr(layers[0], "self_attn"):  # llama-like: z is o_proj's input
        for i, layer in enumerate(layers):
            hooks.append((layer.self_attn.o_proj, "pre", lambda m, a, i=i: z_seen.update({i: a[0]})))
    out = _ref(ref, ids, hooks)
    torch.testing.assert_close(logits, out.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cache["hook_unembed"], out.logits, atol=1e-4, rtol=1e-4)
    for i in range(n):
        torch.testing.assert_close(cache["resid_pre", i], out.hidden_states[i], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(cache[f"blocks.{i}.attn.hook_pattern"], out.attentions[i], atol=1e-5, rtol=1e-4)
        assert cache["pattern", i].shape == (1, model.num_heads, ids.shape[1], ids.shape[1])
    torch.testing.assert_close(cache["resid_post", -1], last_out["x"], atol=1e-4, rtol=1e-4)
    # TL's per-head attention inputs: copies of the residual before ln1 (hand: resid_pre expanded per head)
    for key, heads in (("hook_attn_in", model.num_heads), ("hook_q_input", model.num_heads),
                       ("hook_k_input", model.num_kv_heads)):
        if f"blocks.1.{key}" in cache:
            copies = cache[f"blocks.1.{key}"]
            assert copies.shape == (1, ids.shape[1], heads, model.hidden_size)
            torch.testing.assert_close(copies, out.hidden_states[1][:, :, None].expand_as(copies), atol=1e-4, rtol=1e-4)
    # the final norm's scale by hand: sqrt(mean(xc^2) + eps), xc centred for LayerNorm only
    x = last_out["x"]
    norm = tl.final_norm_affine(model)
    xc = x - x.mean(-1, keepdim=True) if norm.centers else x
    eps = norm.plan.eps
    torch.testing.assert_close(cache["ln_final.hook_scale"], (xc.pow(2).mean(-1, keepdim=True) + eps).sqrt(),
                               atol=1e-5, rtol=1e-4)
    if z_seen:
        hd = model.head_dim
        for i, layer in enumerate(layers):
            z = cache["z", i]  # (batch, pos, head_index, d_head)
            torch.testing.assert_close(z, z_seen[i].view(*z.shape), atol=1e-5, rtol=1e-4)
            w = layer.self_attn.o_proj.weight  # (d_model, heads * d_head)
            result = cache["result", i]
            for h in range(model.num_heads):
                torch.testing.assert_close(result[:, :, h], z_seen[i][..., h * hd:(h + 1) * hd] @ w[:, h * hd:(h + 1) * hd].T,
                                           atol=1e-5, rtol=1e-4)
            # v: the value projection of the attention input, per kv head (batch, pos, kv_head, d_head)
            with torch.no_grad():
                v = layer.self_attn.v_proj(cache[f"blocks.{i}.attn.hook_in"])
            torch.testing.assert_close(cache["v", i], v.view(*cache["v", i].shape), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "gptj", "smollm2"])
def test_analysis_methods_against_hand_computations(kind):
    model, ref = _get(kind)
    ids = _ids(model)
    _, cache = model.run_with_cache(ids)
    n = model.num_layers
    last = {}
    out = _ref(ref, ids, [(_layers(ref)[-1], "fwd", lambda m, a, o: last.update(x=o[0] if isinstance(o, tuple) else o))])

    resid, labels = cache.accumulated_resid(return_labels=True)
    assert labels == [f"{i}_pre" for i in range(n)] + ["final_post"]
    torch.testing.assert_close(resid[:n], torch.stack(out.hidden_states[:n]), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(resid[-1], last["x"], atol=1e-4, rtol=1e-4)
    # the final entry through the final norm is HF's last hidden state (which HF returns normalized)
    lens = cache.accumulated_resid(apply_ln=True)
    torch.testing.assert_close(lens[-1], out.hidden_states[-1], atol=1e-4, rtol=1e-4)

    parts, labels = cache.decompose_resid(return_labels=True)
    assert parts.shape == (1 + 2 * n, *last["x"].shape)
    assert labels[:3] == ["embed", "0_attn_out", "0_mlp_out"]
    torch.testing.assert_close(parts.sum(0), last["x"], atol=1e-4, rtol=1e-4)
    up_to_1 = cache.decompose_resid(layer=1, mlp_input=True)  # embed, 0_attn, 0_mlp, 1_attn = MLP 1's residual
    if not model.architecture.parallel:
        mid = out.hidden_states[1] + cache["attn_out", 1]
        torch.testing.assert_close(up_to_1.sum(0), mid, atol=1e-4, rtol=1e-4)

    heads, labels = cache.stack_head_results(incl_remainder=True, return_labels=True)
    assert heads.shape[0] == n * model.num_heads + 1 and labels[0] == "L0H0" and labels[-1] == "remainder"
    torch.testing.assert_close(heads.sum(0), last["x"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "smollm2"])
def test_logit_attrs_sum_to_the_logit_difference(kind):
    model, ref = _get(kind)
    ids = _ids(model)
    _, cache = model.run_with_cache(ids)
    out = _ref(ref, ids)
    t_good, t_bad = 5, 7
    diff = out.logits[0, :, t_good] - out.logits[0, :, t_bad]  # (pos,)
    # hand computation of the terms TL's logit_attrs leaves out: the final norm's bias and the unembedding bias
    norm = tl.final_norm_affine(model)
    W_U = ref.get_output_embeddings().weight  # (vocab, d_model)
    left_out = (norm.bias * (W_U[t_good] - W_U[t_bad])).sum()
    b_U = ref.get_output_embeddings().bias
    if b_U is not None:
        left_out = left_out + b_U[t_good] - b_U[t_bad]
    attrs = cache.logit_attrs(cache.decompose_resid(), torch.tensor([t_good]), torch.tensor([t_bad]))
    assert attrs.shape == (1 + 2 * model.num_layers, 1, ids.shape[1])
    torch.testing.assert_close(attrs.sum(0)[0] + left_out, diff, atol=1e-3, rtol=1e-4)
    # apply_ln_to_stack: the cached scale, by hand (centred for LayerNorm)
    stack = cache.decompose_resid()
    x = cache["resid_post", -1]
    centred = (x - x.mean(-1, keepdim=True)) if norm.centers else x
    torch.testing.assert_close(cache.apply_ln_to_stack(stack).sum(0), centred / cache["ln_final.hook_scale"],
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["llama", "smollm2"])
def test_run_with_hooks_equals_torch_hook_edits(kind):
    model, ref = _get(kind)
    ids = _ids(model)
    layers = _layers(ref)
    hd = model.head_dim

    def zero_head(z, hook):  # TL shape (batch, pos, head_index, d_head); in-place, returns None
        assert hook.name == "blocks.1.attn.hook_z" and hook.layer() == 1
        z[:, :, 0] = 0.0

    def double(resid, hook):
        return resid * 2.0

    def scale_v(v, hook):  # (batch, pos, kv_head, d_head)
        v = v.clone()
        v[:, :, 0] *= 3.0
        return v

    # later names first: the order of fwd_hooks does not matter
    logits = model.run_with_hooks(ids, fwd_hooks=[("blocks.1.attn.hook_z", zero_head), ("blocks.0.attn.hook_v", scale_v),
                                                  ("blocks.0.hook_resid_post", double)])

    def zero_pre(m, args):
        x = args[0].clone()
        x[..., 0:hd] = 0.0
        return (x,)

    def v_edit(m, a, o):
        o = o.clone()
        o[..., 0:hd] *= 3.0
        return o

    def double_out(m, a, o):
        return (o[0] * 2.0, *o[1:]) if isinstance(o, tuple) else o * 2.0

    out = _ref(ref, ids, [(layers[1].self_attn.o_proj, "pre", zero_pre), (layers[0].self_attn.v_proj, "fwd", v_edit),
                          (layers[0], "fwd", double_out)])
    torch.testing.assert_close(logits, out.logits, atol=1e-4, rtol=1e-4)
    plain = _ref(ref, ids).logits
    assert (logits - plain).abs().max() > 1e-2  # the edits changed something

    # TL's per-head input copies and hook_mlp_in are taken BEFORE the norm; an edit reaches that branch only:
    # zeroing head 0's query input zeroes its query (RMSNorm(0) = 0, no q bias), halving the MLP's input
    # residual halves the MLP norm's input, the skip connection unchanged
    def zero_copy(x, hook):
        x[:, :, 0] = 0.0
        return x

    logits3 = model.run_with_hooks(ids, fwd_hooks=[("blocks.1.hook_mlp_in", lambda x, hook: x * 0.5),
                                                   ("blocks.1.hook_q_input", zero_copy)])

    def q_zero(m, a, o):
        o = o.clone()
        o[..., 0:hd] = 0.0
        return o

    def half_in(m, args):
        return (args[0] * 0.5,)

    out3 = _ref(ref, ids, [(layers[1].self_attn.q_proj, "fwd", q_zero),
                           (layers[1].post_attention_layernorm, "pre", half_in)])
    torch.testing.assert_close(logits3, out3.logits, atol=1e-4, rtol=1e-4)

    # a name filter selects several names; the cache of the same run shows the edited values
    logits2 = model.run_with_hooks(ids, fwd_hooks=[(lambda name: name.endswith("hook_resid_post"), double)])
    hooks = [(layer, "fwd", double_out) for layer in layers]
    torch.testing.assert_close(logits2, _ref(ref, ids, hooks).logits, atol=1e-3, rtol=1e-4)


def test_sdpa_kept_unless_attention_internals_are_read(monkeypatch):
    model, _ = _get("llama")
    calls = []
    original = torch.nn.functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    model.run_with_cache(PROMPT, names_filter=lambda n: "resid" in n or "mlp" in n or n.endswith("attn_out"))
    assert len(calls) == model.num_layers  # every layer ran its own sdpa kernel
    calls.clear()
    model.run_with_cache(PROMPT, names_filter=["blocks.1.attn.hook_pattern"])
    assert len(calls) == model.num_layers - 1  # layer 1 ran the hookable path (to give the pattern), layer 0 sdpa


def test_cache_indexing_and_dict_methods():
    model, _ = _get("llama")
    _, cache = model.run_with_cache(PROMPT, names_filter=["blocks.0.attn.hook_rot_q", "blocks.1.hook_resid_post",
                                                          "blocks.1.attn.hook_pattern"])
    assert list(cache.keys()) == ["blocks.0.attn.hook_rot_q", "blocks.1.hook_resid_post", "blocks.1.attn.hook_pattern"]
    assert len(cache) == 3 and "blocks.1.hook_resid_post" in cache and ("pattern", 1) in cache
    assert cache["pattern", 1] is cache["blocks.1.attn.hook_pattern"] is cache["pattern1"]
    assert cache["resid_post", -1] is cache["blocks.1.hook_resid_post"]
    assert cache["rot_q", 0, "attn"].shape == (1, 6, model.num_heads, model.head_dim)  # (batch, pos, head, d_head)
    assert dict(cache.items()).keys() == cache.keys()
    with pytest.raises(KeyError, match="not cached: add it to names_filter"):
        cache["resid_pre", 0]
    cache.remove_batch_dim()
    assert cache["pattern", 1].shape == (model.num_heads, 6, 6)
    assert cache.to("cpu") is cache
    _, batch = model.run_with_cache(["a b", "c d e"], names_filter="blocks.0.hook_resid_post")
    with pytest.raises(ValueError, match="batch has 2 rows"):
        batch.remove_batch_dim()


def test_refused_names_say_why():
    model, _ = _get("llama")
    with pytest.raises(KeyError, match="no learned absolute position embedding"):  # rotary: no hook_pos_embed
        model.run_with_cache(PROMPT, names_filter=["hook_pos_embed"])
    with pytest.raises(KeyError, match="unknown TransformerLens hook name 'blocks.0.hook_nonsense'"):
        model.run_with_hooks(PROMPT, fwd_hooks=[("blocks.0.hook_nonsense", lambda x, hook: x)])
    with pytest.raises(KeyError, match="block 5 out of range"):
        model.run_with_cache(PROMPT, names_filter=["blocks.5.hook_resid_post"])
    gptj, _ = _get("gptj")
    with pytest.raises(KeyError, match="blocks.0.hook_resid_mid .layers_resid_mid. is not available on this gptj"):
        gptj.run_with_cache(PROMPT, names_filter=["blocks.0.hook_resid_mid"])
    with pytest.raises(KeyError, match="pre_linear"):
        gptj.run_with_cache(PROMPT, names_filter=["blocks.0.mlp.hook_pre_linear"])
    # a callable filter picks among the names the model has: no error, the refused names are absent
    _, cache = gptj.run_with_cache(PROMPT, names_filter=lambda n: n.endswith(("resid_mid", "resid_post")))
    assert list(cache) == [f"blocks.{i}.hook_resid_post" for i in range(gptj.num_layers)]


def test_tokens_helpers_match_the_tokenizer_by_hand():
    model, _ = _get("smollm2")
    tok = model.tokenizer
    own = tok("Hello world", add_special_tokens=False)["input_ids"]
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    assert model.to_tokens("Hello world").tolist() == [[bos] + own]
    assert model.to_tokens("Hello world", prepend_bos=False).tolist() == [own]
    assert model.to_str_tokens("Hello world", prepend_bos=False) == [tok.decode([i]) for i in own]
    assert model.to_string(torch.tensor(own)) == "Hello world"
    batch = model.to_tokens(["Hi", "Hello world"], prepend_bos=False)
    short = tok("Hi", add_special_tokens=False)["input_ids"]
    assert batch[0, : len(short)].tolist() == short and batch.shape == (2, len(own))  # right padding
    left = model.to_tokens(["Hi", "Hello world"], prepend_bos=False, padding_side="left")
    assert left[0, -len(short):].tolist() == short
    assert model.to_string(batch)[1] == "Hello world"
    assert model.to_single_token(" Paris") == tok(" Paris", add_special_tokens=False)["input_ids"][0]
