"""The TransformerLens model surface (``unilens.HookedTransformer`` / ``model.tl``) against independent oracles:
explicit matrix products, the per-layer weight views, torch's cross-entropy, torch.autograd, a separate HF copy of the
same weights and the standardized model's own reads. (Numbers against TL's bridge itself: bench/tl_surface_compare.py.)
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import unilens
from unilens import FactoredMatrix, HookedTransformer, StandardizedTransformer
from unilens.compat import tl
from unilens.testing import tiny_model

PROMPT = "The capital of France is"
KINDS = ["llama", "gpt2", "qwen2"]  # qwen2: grouped-query attention (2 kv heads for 4 query heads) and q/k/v biases
_VIEWS: dict[str, HookedTransformer] = {}


def _view(kind: str) -> HookedTransformer:
    if kind not in _VIEWS:
        hf, tok = tiny_model(kind)
        _VIEWS[kind] = HookedTransformer.from_pretrained(hf, tokenizer=tok)
    view = _VIEWS[kind]
    view.reset_hooks(including_permanent=True)
    return view


def _close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


# ----------------------------------------------------------------------------------------------------------------
# FactoredMatrix
# ----------------------------------------------------------------------------------------------------------------

dims = st.integers(min_value=1, max_value=6)


@settings(max_examples=40, deadline=None, derandomize=True)  # the same examples every run (a deterministic suite)
@given(lead=st.lists(st.integers(1, 3), max_size=2), l=dims, m=dims, r=dims, k=dims, seed=st.integers(0, 2**16))
def test_factored_matrix_products_equal_explicit_ones(lead, l, m, r, k, seed):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(*lead, l, m, generator=g, dtype=torch.float64)
    B = torch.randn(*lead, m, r, generator=g, dtype=torch.float64)
    fm = FactoredMatrix(A, B)
    M = A @ B
    assert fm.shape == M.shape and fm.ndim == M.ndim and (fm.ldim, fm.mdim, fm.rdim) == (l, m, r)
    _close(fm.AB, M)
    _close(fm.T.AB, M.transpose(-2, -1))
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    right, left = rand(r, k), rand(k, l)
    _close((fm @ right).AB, M @ right)
    _close((left @ fm).AB, left @ M)
    v, w = rand(r), rand(l)
    _close(fm @ v, M @ v)
    _close(w @ fm, w @ M)
    other = FactoredMatrix(rand(r, 2), rand(2, k))
    _close((fm @ other).AB, M @ other.AB)
    _close((other.T @ fm.T).AB, other.AB.T @ M.transpose(-2, -1))
    _close((fm * 3.0).AB, 3.0 * M)
    _close((2.0 * fm).AB, 2.0 * M)
    # SVD: M == U diag(S) V^T (TL's convention: V, not V^T), singular values those of M
    U, S, V = fm.svd()
    _close(U @ torch.diag_embed(S) @ V.transpose(-2, -1), M)
    rank = min(l, m, r)
    _close(S[..., :rank], torch.linalg.svdvals(M)[..., :rank])
    assert torch.equal(fm.Vh, fm.V)
    _close(fm.norm(), M.flatten(-2).norm(dim=-1))
    _close(fm.make_even().AB, M)
    _close(fm.U @ fm.collapse_l(), M)
    _close(fm.collapse_r() @ fm.V.transpose(-2, -1), M)
    _close(fm.get_corner(2), M[tuple(slice(0, 2) for _ in range(M.ndim))])
    if l == r:  # eigenvalues of BA: the non-zero eigenvalues of AB
        ev = fm.eigenvalues
        assert ev.shape == (*lead, m)
        _close(torch.sort(ev.abs()).values[..., -min(l, m):].to(torch.float64),
               torch.sort(torch.linalg.eigvals(M).abs()).values[..., -min(l, m):])
        _close(fm.BA, B @ A)


def test_factored_matrix_indexing_broadcasting_and_errors():
    A, B = torch.randn(3, 4, 6, 2), torch.randn(4, 2, 5)  # leading (3, 4) and (4,) broadcast
    fm = FactoredMatrix(A, B)
    M = A @ B
    assert fm.shape == (3, 4, 6, 5)
    _close(fm[1].AB, M[1])
    _close(fm[1, 2].AB, M[1, 2])
    _close(fm[1, 2, 3].AB, M[1, 2, 3:4])  # a row index keeps the factors 2D, as TL
    _close(fm[1, 2, 1:3, 4].AB, M[1, 2, 1:3, 4:5])
    _close(fm.unsqueeze(0).AB, M[None])
    assert fm.pair[0] is fm.A and len(fm) == 3
    assert "Hidden Dim(2)" in repr(fm)
    with pytest.raises(ValueError, match="inner|last dimension"):
        FactoredMatrix(torch.randn(3, 2), torch.randn(3, 4))
    with pytest.raises(ValueError, match="cannot multiply"):
        fm @ torch.randn(4, 4)
    with pytest.raises(ValueError, match="square"):
        FactoredMatrix(torch.randn(3, 2), torch.randn(2, 4)).BA


# ----------------------------------------------------------------------------------------------------------------
# cfg, modules, weights
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_cfg_fields_from_the_hf_config(kind):
    view = _view(kind)
    hf = view.model.module_accessor.model
    c, cfg = view.cfg, hf.config
    assert (c.n_layers, c.d_model, c.n_heads, c.d_vocab) == (cfg.num_hidden_layers, cfg.hidden_size,
                                                              cfg.num_attention_heads, cfg.vocab_size)
    assert c.d_head == c.d_model // c.n_heads and c.n_ctx == cfg.max_position_embeddings
    if kind == "gpt2":
        assert (c.normalization_type, c.positional_embedding_type, c.act_fn, c.gated_mlp) == ("LN", "standard",
                                                                                               "gelu_new", False)
        assert c.d_mlp == (cfg.n_inner or 4 * c.d_model) and c.n_key_value_heads is None
        assert c.eps == cfg.layer_norm_epsilon
    else:
        assert (c.normalization_type, c.positional_embedding_type, c.act_fn, c.gated_mlp) == ("RMS", "rotary",
                                                                                               "silu", True)
        assert c.d_mlp == cfg.intermediate_size and c.n_key_value_heads == cfg.num_key_value_heads
        assert c.final_rms and c.rotary_dim == c.d_head and c.eps == cfg.rms_norm_eps
    assert c.original_architecture == type(hf).__name__ and c.dtype == torch.float32
    assert view is not view.model.tl and view.model.tl is view.model.tl  # one cached view per model


@pytest.mark.parametrize("kind", KINDS)
def test_stacked_weights_are_the_per_layer_views(kind):
    view = _view(kind)
    model, n = view.model, view.cfg.n_layers
    for name in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O"):
        stacked = getattr(view, name)
        for i in range(n):
            assert torch.equal(stacked[i], getattr(model.weights[i], name)), (name, i)
            assert torch.equal(getattr(view.blocks[i].attn, name), stacked[i])
    c = view.cfg
    kv = c.n_key_value_heads or c.n_heads
    assert view.W_Q.shape == (n, c.n_heads, c.d_model, c.d_head)
    assert view.W_K.shape == (n, kv, c.d_model, c.d_head)
    assert view.W_O.shape == (n, c.n_heads, c.d_head, c.d_model)
    assert view.W_in.shape == (n, c.d_model, c.d_mlp) and view.W_out.shape == (n, c.d_mlp, c.d_model)
    assert view.b_in.shape == (n, c.d_mlp) and view.b_out.shape == (n, c.d_model)
    assert torch.equal(view.W_U, model.weights.W_U) and torch.equal(view.W_E, model.weights.W_E)
    assert view.b_U.shape == (c.d_vocab,)
    hf = model.module_accessor.model
    if kind == "gpt2":
        assert view.W_gate is None
        _close(view.W_in[1], hf.transformer.h[1].mlp.c_fc.weight)  # Conv1D stores (in, out): TL's orientation
        _close(view.W_pos, hf.transformer.wpe.weight)
        assert torch.equal(view.b_U, torch.zeros(c.d_vocab))  # GPT-2's head has no bias: zeros
    else:
        mlp = hf.model.layers[1].mlp
        _close(view.W_in[1], mlp.up_proj.weight.T)
        _close(view.W_gate[1], mlp.gate_proj.weight.T)
        _close(view.W_out[1], mlp.down_proj.weight.T)
        with pytest.raises(AttributeError, match="position"):
            view.W_pos


@pytest.mark.parametrize("kind", KINDS)
def test_ov_qk_circuits_equal_explicit_products(kind):
    view = _view(kind)
    c = view.cfg
    group = c.n_heads // (c.n_key_value_heads or c.n_heads)
    OV, QK = view.OV, view.QK
    assert OV.shape == QK.shape == (c.n_layers, c.n_heads, c.d_model, c.d_model)
    for i in range(c.n_layers):
        for h in range(c.n_heads):  # query head h reads kv head h // group (HF's repeat_kv)
            _close(OV[i, h].AB, view.W_V[i, h // group] @ view.W_O[i, h])
            _close(QK[i, h].AB, view.W_Q[i, h] @ view.W_K[i, h // group].T)
        _close(view.blocks[i].attn.OV.AB, OV.AB[i])


@pytest.mark.parametrize("kind", KINDS)
def test_embed_unembed_norm_modules(kind):
    view = _view(kind)
    ids = view.to_tokens(PROMPT)
    _, cache = view.run_with_cache(ids, names_filter=["hook_embed", "ln_final.hook_normalized"])
    _close(view.embed(ids), cache["hook_embed"])
    resid = torch.randn(2, 3, view.cfg.d_model)
    _close(view.unembed(resid), resid @ view.W_U + view.b_U)
    hf = view.model.module_accessor.model
    final = hf.transformer.ln_f if kind == "gpt2" else hf.model.norm
    assert view.ln_final.original_component is final and torch.equal(view.ln_final.w, final.weight)
    assert view.blocks[0].ln1.original_component is (hf.transformer.h[0].ln_1 if kind == "gpt2"
                                                     else hf.model.layers[0].input_layernorm)
    bias = view.accumulated_bias(2, mlp_input=False)
    _close(bias, view.b_O.sum(0) + view.b_out.sum(0))
    _close(view.accumulated_bias(1, mlp_input=True), view.b_O[0] + view.b_out[0] + view.b_O[1])
    assert view.all_head_labels[:2] == ["L0H0", "L0H1"] and view.all_head_labels() == view.all_head_labels
    tok = view.tokenizer
    target = ids[0, 3].item()
    assert view.get_token_position(target, ids) == (ids[0] == target).nonzero()[0].item()
    _close(view.tokens_to_residual_directions(ids[0]), view.W_U[:, ids[0]].T)
    _close(view.tokens_to_residual_directions(int(target)), view.W_U[:, target])
    assert view.to_single_str_token(target) == tok.decode([target])


# ----------------------------------------------------------------------------------------------------------------
# forward, loss, hooks
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_return_types_and_loss_against_torch_cross_entropy(kind):
    view = _view(kind)
    ids = view.to_tokens(PROMPT)
    ref, _ = tiny_model(kind)
    with torch.no_grad():
        hf_logits = ref(input_ids=ids).logits
        logits = view(PROMPT)
        _close(logits, hf_logits, 1e-4)
        ce = torch.nn.functional.cross_entropy(hf_logits[0, :-1], ids[0, 1:])
        _close(view(PROMPT, return_type="loss"), ce, 1e-4)
        per_token = view(ids, return_type="loss", loss_per_token=True)
        assert per_token.shape == (1, ids.shape[1] - 1)
        _close(per_token[0], torch.nn.functional.cross_entropy(hf_logits[0, :-1], ids[0, 1:], reduction="none"), 1e-4)
        both = view(ids, return_type="both")
        _close(both[0], logits)
        _close(both[1], ce, 1e-4)
        assert view(ids, return_type=None) is None
        # a masked mean over real tokens only
        mask = torch.ones_like(ids)
        mask[0, -2:] = 0
        masked = view.loss_fn(logits, ids, attention_mask=mask)
        _close(masked, torch.nn.functional.cross_entropy(hf_logits[0, :-3], ids[0, 1:-2]), 1e-4)
        # stop_at_layer: block k's input, the residual stream
        resid = view(ids, stop_at_layer=1)
        _, cache = view.run_with_cache(ids, names_filter="blocks.1.hook_resid_pre")
        _close(resid, cache["blocks.1.hook_resid_pre"])
        out, cache = view.run_with_cache(ids, stop_at_layer=-1)
        _close(out, resid)
        assert "blocks.0.hook_resid_post" in cache and not any(k.startswith("blocks.1.") for k in cache.keys())
        loss, _ = view.run_with_cache(ids, names_filter=[], return_type="loss")
        _close(loss, ce, 1e-4)
    with pytest.raises(ValueError, match="return_type"):
        view(ids, return_type="predictions")
    with pytest.raises(TypeError, match="unknown keyword"):
        view(ids, retrun_type="loss")


def test_hooks_persist_until_reset_and_perma_hooks_survive():
    view = _view("llama")
    ids = view.to_tokens(PROMPT)
    with torch.no_grad():
        clean = view(ids)
        seen = []
        view.blocks[1].attn.hook_z.add_hook(lambda z, hook: seen.append(hook.name))  # a read-only hook
        view.add_hook("blocks.0.hook_resid_post", lambda x, hook: x * 0.5)
        edited = view(ids)
        assert not torch.allclose(edited, clean) and seen == ["blocks.1.attn.hook_z"]
        _close(view(ids), edited)  # still there on the next forward
        assert seen == ["blocks.1.attn.hook_z"] * 2
        # the same edit by run_with_hooks on the standardized model
        _close(tl.run_with_hooks(view.model, ids, [("blocks.0.hook_resid_post", lambda x, hook: x * 0.5)]), edited)
        # run_with_cache sees the persistent hook's edit in its cache and its logits
        logits, cache = view.run_with_cache(ids, names_filter="blocks.0.hook_resid_post")
        _close(logits, edited)
        view.reset_hooks()
        _close(view(ids), clean)
        assert view.hook_dict["blocks.1.attn.hook_z"].fwd_hooks == []
        view.add_perma_hook("blocks.0.hook_resid_post", lambda x, hook: x * 0.5)
        view.reset_hooks()
        _close(view(ids), edited)
        view.reset_hooks(including_permanent=True)
        _close(view(ids), clean)
        # hooks(): removed at the end of the block; run_with_hooks: removed unless reset_hooks_end=False
        with view.hooks(fwd_hooks=[("blocks.0.hook_resid_post", lambda x, hook: x * 0.5)]):
            _close(view(ids), edited)
        _close(view(ids), clean)
        _close(view.run_with_hooks(ids, fwd_hooks=[(lambda n: n == "blocks.0.hook_resid_post",
                                                    lambda x, hook: x * 0.5)]), edited)
        _close(view(ids), clean)
        view.run_with_hooks(ids, fwd_hooks=[("blocks.0.hook_resid_post", lambda x, hook: x * 0.5)],
                            reset_hooks_end=False)
        _close(view(ids), edited)
        view.reset_hooks()
        # hook.ctx keeps state across forwards; reset_hooks clears it
        point = view.blocks[0].hook_resid_pre

        def count(x, hook):
            hook.ctx["n"] = hook.ctx.get("n", 0) + 1

        point.add_hook(count)
        view(ids), view(ids)
        assert point.ctx["n"] == 2
        view.reset_hooks()
        assert point.ctx == {}
    assert set(view.mod_dict) >= {"blocks.0", "blocks.0.attn", "blocks.0.mlp", "blocks.0.attn.hook_z", "unembed"}
    with pytest.raises(KeyError, match="unknown TransformerLens hook name"):
        view.add_hook("blocks.0.hook_nope", lambda x, hook: x)


def test_backward_hooks_give_autograd_gradients():
    view = _view("llama")
    ids = view.to_tokens(PROMPT)
    grads = {}
    view.add_hook("blocks.0.hook_resid_post", lambda g, hook: grads.update({hook.name: g.clone()}), dir="bwd")
    view.add_hook("blocks.1.attn.hook_z", lambda g, hook: grads.update({hook.name: g.clone()}), dir="bwd")
    resid = {}
    view.add_hook("blocks.0.hook_resid_post", lambda x, hook: resid.update(x=x))
    loss = view(ids, return_type="loss")
    loss.backward()
    view.reset_hooks()
    # oracle: run the forward again with the residual as a leaf, substituted in
    leaf = resid["x"].detach().requires_grad_(True)
    loss2 = view.run_with_hooks(ids, fwd_hooks=[("blocks.0.hook_resid_post", lambda x, hook: leaf)],
                                return_type="loss")
    (g,) = torch.autograd.grad(loss2, [leaf])
    _close(grads["blocks.0.hook_resid_post"], g)
    assert grads["blocks.1.attn.hook_z"].shape == (1, ids.shape[1], view.cfg.n_heads, view.cfg.d_head)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("name", ["blocks.1.attn.hook_q", "blocks.1.attn.hook_k", "blocks.1.ln1.hook_scale",
                                  "blocks.1.ln2.hook_normalized", "blocks.1.mlp.hook_pre", "blocks.1.mlp.hook_post",
                                  "blocks.1.hook_resid_mid"])
def test_backward_hooks_on_hook_points_see_the_gradient(kind, name):
    """Points the model never computes from (q split into heads, a norm's scale) get their gradient all the same
    (the forward runs through them under autograd), and the forward's numbers stay the model's bitwise."""
    view = _view(kind)
    ids = view.to_tokens(PROMPT)
    with torch.no_grad():
        plain = view(ids)
    seen, grads = {}, {}
    view.add_hook(name, lambda x, hook: seen.update(x=x.detach().clone()))
    view.add_hook(name, lambda g, hook: grads.update(g=g.clone()), dir="bwd")
    logits = view(ids)
    assert torch.equal(logits, plain)  # routing the gradient changes no number of the forward
    logits[0, -1].logsumexp(-1).backward()
    view.reset_hooks()
    assert "g" in grads, f"the backward hook on {name} never ran"
    # oracle: the same forward with the point's value replaced by a leaf, and autograd's gradient of that leaf
    leaf = seen["x"].clone().requires_grad_(True)
    out = view.run_with_hooks(ids, fwd_hooks=[(name, lambda x, hook: leaf)])
    (expect,) = torch.autograd.grad(out[0, -1].logsumexp(-1), [leaf])
    assert grads["g"].shape == expect.shape
    _close(grads["g"], expect)
    assert grads["g"].abs().sum() > 0


def test_backward_hooks_on_per_head_inputs_are_refused():
    view = _view("llama")
    with pytest.raises(KeyError, match="per-head attention inputs"):
        view.add_hook("blocks.0.hook_q_input", lambda g, hook: None, dir="bwd")


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_generate_text_in_text_out_greedy_equals_argmax_loop(kind):
    view = _view(kind)
    text = view.generate(PROMPT, max_new_tokens=4, do_sample=False, verbose=False, stop_at_eos=False)
    assert isinstance(text, str) and text.startswith(PROMPT)
    ids = view.to_tokens(PROMPT)
    ref, _ = tiny_model(kind)
    expect = ids
    with torch.no_grad():
        for _ in range(4):  # the oracle: argmax of a full HF forward, token by token
            expect = torch.cat([expect, ref(input_ids=expect).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    out = view.generate(ids, max_new_tokens=4, do_sample=False, stop_at_eos=False)
    assert torch.equal(out, expect)
    assert text == view.tokenizer.decode(expect[0], skip_special_tokens=True)
    no_cache = view.generate(ids, max_new_tokens=4, do_sample=False, stop_at_eos=False, use_past_kv_cache=False)
    assert torch.equal(no_cache, expect)
    # with a hook on the view, generation runs through it
    view.add_hook("blocks.0.hook_resid_post", lambda x, hook: x * 0)
    hooked = view.generate(ids, max_new_tokens=2, do_sample=False, stop_at_eos=False)
    view.reset_hooks()
    with torch.no_grad():
        zeroed = tl.run_with_hooks(view.model, ids, [("blocks.0.hook_resid_post", lambda x, hook: x * 0)])
    assert hooked[0, ids.shape[1]].item() == zeroed[0, -1].argmax().item()
    # a batch of texts: left-padded with a mask and position ids, each row generates what it generates alone
    texts = ["Hi there", PROMPT]
    batch = view.generate(texts, max_new_tokens=3, do_sample=False, stop_at_eos=False)
    assert batch == [view.generate(t, max_new_tokens=3, do_sample=False, stop_at_eos=False) for t in texts]
    torch.manual_seed(0)
    sampled = view.generate(ids, max_new_tokens=3, do_sample=True, top_k=5, temperature=0.7, stop_at_eos=False)
    assert sampled.shape == (1, ids.shape[1] + 3)


def test_from_pretrained_and_public_names():
    hf, tok = tiny_model("llama")
    with pytest.warns(UserWarning, match="fold_ln"):
        view = HookedTransformer.from_pretrained(hf, tokenizer=tok, fold_ln=True, center_writing_weights=False)
    assert unilens.HookedTransformer is HookedTransformer and isinstance(view.model, StandardizedTransformer)
    assert HookedTransformer(view).model is view.model and view.original_model is view.model.module_accessor.model
    assert view.to_str_tokens("Hi")[0] == view.model.to_str_tokens("Hi")[0]  # delegated
    with pytest.raises(TypeError, match="StandardizedTransformer"):
        HookedTransformer(hf)
    # the bridge's tl_parameters(): kv heads repeated to the query heads, absent biases as zeros
    params, c = view.tl_parameters(), view.cfg
    assert params["blocks.1.attn.W_K"].shape == (c.n_heads, c.d_model, c.d_head)
    assert torch.equal(params["blocks.1.attn.W_K"][1], view.W_K[1, 0])  # 4 heads on 2 kv heads: head 1 reads 0
    assert torch.equal(params["blocks.1.attn.W_V"][2], view.W_V[1, 1])
    assert torch.equal(params["blocks.0.attn.b_K"], torch.zeros(c.n_heads, c.d_head))
    assert torch.equal(params["blocks.0.mlp.W_gate"], view.W_gate[0])
    assert "pos_embed.W_pos" not in params and "blocks.0.mlp.b_gate" not in params  # rotary; no gate bias
    assert list(dict(view.tl_named_parameters())) == list(params)
    with pytest.warns(UserWarning, match="does not process weights"):
        view.enable_compatibility_mode()
    logits = view("Hi")
    view.enable_compatibility_mode(disable_warnings=True)
    assert torch.equal(view("Hi"), logits)


@pytest.mark.slow
def test_smollm2_view():
    model = unilens.load_default()
    view = model.tl
    c = view.cfg
    assert (c.n_layers, c.n_heads, c.n_key_value_heads, c.d_head, c.normalization_type) == (30, 9, 3, 64, "RMS")
    assert view.OV.shape == (30, 9, c.d_model, c.d_model) and view.W_K.shape == (30, 3, c.d_model, 64)
    loss = view("The capital of France is Paris", return_type="loss")
    assert 0 < float(loss) < 10
