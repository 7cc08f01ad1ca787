"""TransformerLens 4.3's ActivationCache methods on unilens's cache, each against an independent computation: HF's
own module weights and outputs (down_proj / c_proj, o_proj), sums that must rebuild the residual stream, the
model's own logits. (The same methods against TL's bridge: bench/tl_cache_compare.py.)"""

from __future__ import annotations

import logging
import warnings

import pytest
import torch

from unilens import StandardizedTransformer
from unilens.testing import tiny_model

PROMPTS = ["The capital of France is", "Hello there my good friend"]
KINDS = ["llama", "gpt2"]
_CACHE: dict[str, tuple] = {}


def _get(kind: str):
    """(model, logits, full cache of two prompts), once per kind."""
    if kind not in _CACHE:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = StandardizedTransformer(*tiny_model(kind), check=False)
        logits, cache = model.run_with_cache(PROMPTS)
        _CACHE[kind] = (model, getattr(logits, "logits", logits), cache)
    return _CACHE[kind]


def _hf_mlp_out_proj(model, layer):
    """HF's own MLP output projection of ``layer`` (llama: down_proj, GPT-2: c_proj Conv1D)."""
    block = model.module_accessor.get_layer(layer)
    return block.mlp.down_proj if hasattr(block.mlp, "down_proj") else block.mlp.c_proj


def _weight_in_out(module) -> torch.Tensor:
    """``(in, out)``: a Linear's weight transposed, a Conv1D's as stored."""
    return module.weight.t() if isinstance(module, torch.nn.Linear) else module.weight


def _close(a, b, what, rel=1e-5):
    a, b = a.detach(), b.detach()
    err = float((a - b).abs().max())
    assert err <= rel * max(1.0, float(b.abs().max())), f"{what}: off by {err:.3g}"


@pytest.mark.parametrize("kind", KINDS)
def test_neuron_results_sum_to_the_mlp_output(kind):
    model, _, cache = _get(kind)
    for layer in range(model.num_layers):
        proj = _hf_mlp_out_proj(model, layer)
        results = cache.get_neuron_results(layer)  # (batch, pos, d_mlp, d_model)
        assert results.shape[-2:] == _weight_in_out(proj).shape
        bias = proj.bias if proj.bias is not None else 0.0
        _close(results.sum(-2) + bias, cache["mlp_out", layer], f"layer {layer}: neurons + b_out vs hook_mlp_out")
        # one neuron by hand: its activation times its row of HF's own out-projection weight
        by_hand = cache["post", layer][..., 5, None] * _weight_in_out(proj)[5]
        torch.testing.assert_close(results[..., 5, :], by_hand)
        sliced = cache.get_neuron_results(layer, neuron_slice=[1, 5], pos_slice=-1)
        torch.testing.assert_close(sliced, results[:, -1, [1, 5]])
        direction = torch.randn(model.hidden_size, generator=torch.Generator().manual_seed(layer))
        _close(cache.get_neuron_results(layer, project_output_onto=direction), results @ direction, "projected")


@pytest.mark.parametrize("kind", KINDS)
def test_head_results_from_z_sum_to_attn_out(kind):
    model, _, cache = _get(kind)
    native = {k: v for k, v in cache.cache_dict.items() if k.endswith("attn.hook_result")}
    assert len(native) == model.num_layers  # run_with_cache serves hook_result itself
    for key in native:
        del cache.cache_dict[key]
    try:
        cache.compute_head_results()  # from hook_z and W_O
        for layer in range(model.num_layers):
            computed = cache["result", layer]
            torch.testing.assert_close(computed, native[f"blocks.{layer}.attn.hook_result"], rtol=1e-5, atol=1e-6)
            o_proj = model.module_accessor.get_attention(layer)
            o_proj = o_proj.o_proj if hasattr(o_proj, "o_proj") else o_proj.c_proj
            bias = o_proj.bias if o_proj.bias is not None else 0.0
            _close(computed.sum(-2) + bias, cache["attn_out", layer], f"layer {layer}: heads + b_O vs hook_attn_out")
    finally:
        cache.cache_dict.update(native)


@pytest.mark.parametrize("kind", KINDS)
def test_full_resid_decomposition_rebuilds_the_residual_stream(kind):
    model, _, cache = _get(kind)
    n, heads = model.num_layers, model.num_heads
    d_mlp = cache["post", 0].shape[-1]
    stack, labels = cache.get_full_resid_decomposition(return_labels=True)
    expected_labels = ([f"L{l}H{h}" for l in range(n) for h in range(heads)]
                       + [f"L{l}N{i}" for l in range(n) for i in range(d_mlp)]
                       + ["embed"] + (["pos_embed"] if kind == "gpt2" else []) + ["bias"])
    assert labels == expected_labels
    _close(stack.sum(0), cache["resid_post", -1], "full decomposition vs final resid_post")
    # the bias row: every b_O and b_out of HF's modules (zero on llama)
    by_hand = sum(_hf_mlp_out_proj(model, l).bias if kind == "gpt2" else torch.zeros(model.hidden_size)
                  for l in range(n))
    if kind == "gpt2":
        by_hand = by_hand + sum(model.module_accessor.get_attention(l).c_proj.bias for l in range(n))
    torch.testing.assert_close(stack[-1, 0, 0], by_hand.float())
    # into layer 1's attention / MLP
    _close(cache.get_full_resid_decomposition(layer=1).sum(0), cache["resid_pre", 1], "into layer 1")
    _close(cache.get_full_resid_decomposition(layer=1, mlp_input=True).sum(0), cache["resid_mid", 1], "mlp_input")
    mlps, mlp_labels = cache.get_full_resid_decomposition(expand_neurons=False, return_labels=True)
    assert mlp_labels[n * heads:n * heads + n] == [f"{l}_mlp_out" for l in range(n)]
    _close(mlps.sum(0), cache["resid_post", -1], "expand_neurons=False")
    one = cache.get_full_resid_decomposition(pos_slice=-1)
    torch.testing.assert_close(one, stack[:, :, -1])


@pytest.mark.parametrize("kind", KINDS)
def test_apply_ln_and_projection(kind):
    model, _, cache = _get(kind)
    direction = torch.randn(model.hidden_size, generator=torch.Generator().manual_seed(0))
    ln = cache.get_full_resid_decomposition(apply_ln=True)
    assert torch.equal(ln, cache.apply_ln_to_stack(cache.get_full_resid_decomposition(), None))
    # the folded path (the norm's scale and centring applied analytically per neuron) equals the plain one
    folded = cache.get_full_resid_decomposition(apply_ln=True, project_output_onto=direction)
    _close(folded, ln @ direction, "apply_ln + project_output_onto", rel=1e-5)
    both = cache.get_full_resid_decomposition(apply_ln=True, project_output_onto=torch.stack([direction] * 2, -1))
    assert both.shape == (*folded.shape, 2)
    # the final norm's cached scale applied to the full stack, summed, is the normalized residual before w / b
    normalized = cache["ln_final.hook_normalized"]
    _close(ln.sum(0), normalized, "sum of the ln-applied stack vs ln_final.hook_normalized", rel=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_stack_neuron_results_and_stack_activation(kind):
    model, _, cache = _get(kind)
    d_mlp = cache["post", 0].shape[-1]
    stack, labels = cache.stack_neuron_results(1, neuron_slice=3, return_labels=True, incl_remainder=True)
    assert labels == ["L0N3", "remainder"] and stack.shape[0] == 2  # an int neuron keeps its dimension
    torch.testing.assert_close(stack.sum(0), cache["resid_pre", 1])
    all_, labels = cache.stack_neuron_results(-1, return_labels=True)
    assert all_.shape[0] == len(labels) == model.num_layers * d_mlp
    mid, _ = cache.stack_neuron_results(1, mlp_input=True, incl_remainder=True, return_labels=True)
    _close(mid.sum(0), cache["resid_mid", 1], "remainder up to resid_mid")
    patterns = cache.stack_activation("pattern")
    assert torch.equal(patterns, torch.stack([cache["pattern", l] for l in range(model.num_layers)]))
    assert cache.stack_activation("resid_post", layer=1).shape[0] == 1


@pytest.mark.parametrize("kind", KINDS)
def test_logit_lens(kind):
    model, logits, cache = _get(kind)
    token = model.to_single_token(" Paris")
    lens = cache.logit_lens(targets=" Paris")
    assert lens.labels == [f"{l}_pre" for l in range(model.num_layers)] + ["final_post"]
    assert lens.values.shape == (model.num_layers + 1, len(PROMPTS), 1)
    _close(lens.values[-1, :, 0], logits[:, -1, token], "final entry vs the model's logit")
    ranks = (logits[:, -1] > logits[:, -1, token, None]).sum(-1)
    assert torch.equal(lens.rank_trajectory(" Paris")[-1], ranks)
    # an entry by hand: layer 1's residual through HF's own final norm and lm_head
    hf = model.module_accessor
    by_hand = hf.get_unembed()(hf.get_unembed_norm()(cache["resid_pre", 1][:, -1]))
    _close(cache.logit_lens(layers=[1]).values[0], by_hand, "entry 1 by hand")
    top = cache.logit_lens(top_k=3, positions=None)
    assert torch.equal(top.readout.top_ids[-1], logits.topk(3, dim=-1).indices)
    probs = cache.logit_lens(return_type="probs", batch_slice=0)
    assert not probs.has_batch_dim and probs.values.shape == (model.num_layers + 1, model.vocab_size)
    torch.testing.assert_close(probs.values.sum(-1), torch.ones(model.num_layers + 1))
    with pytest.raises(ValueError, match="at most one of"):
        cache.logit_lens(top_k=3, targets=" Paris")


def test_batch_slicing_autodiff_and_ssm_refusal(caplog):
    model, _, cache = _get("llama")
    first = cache.apply_slice_to_batch_dim(0)
    assert not first.has_batch_dim and torch.equal(first["resid_post", 0], cache["resid_post", 0][0])
    rows = cache.apply_slice_to_batch_dim([1])
    assert rows.has_batch_dim and torch.equal(rows["pattern", 1], cache["pattern", 1][[1]])
    with pytest.raises(ValueError, match="batch has 2 rows"):
        cache.apply_slice_to_batch_dim(slice(None)).remove_batch_dim()
    single = cache.apply_slice_to_batch_dim((0, 1)).remove_batch_dim()
    assert single["resid_post", 0].shape == cache["resid_post", 0].shape[1:]
    # the analysis methods work without the batch dimension too
    _close(single.get_full_resid_decomposition().sum(0), single["resid_post", -1], "batchless decomposition")
    with caplog.at_level(logging.WARNING):
        single.remove_batch_dim()
    assert "already" in caplog.text
    before = torch.is_grad_enabled()
    try:
        cache.toggle_autodiff(False)
        assert not torch.is_grad_enabled()
        cache.toggle_autodiff(True)
        assert torch.is_grad_enabled()
    finally:
        torch.set_grad_enabled(before)
    assert cache.ssm_layers() == []
    with pytest.raises(RuntimeError, match="No SSM mixer layers"):
        cache.compute_ssm_state()
