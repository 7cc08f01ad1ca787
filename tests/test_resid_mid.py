"""``resid_mid`` (TL ``hook_resid_mid``) wherever a block has a residual between its attention and MLP branches, and
nowhere else: the rule that decides it (``unilens.hooks.points._residual_factor``, elementwise against the rounding
of the residual add) on hand-built tensors, on tiny zoo types that must keep it or must refuse it, and on SmolLM2's
30 layers against ``layers_input + attentions_output`` (an independent route: HF's own module outputs)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from unilens import StandardizedTransformer
from unilens.hooks.points import UnsupportedHookPoint, _residual_factor
from unilens.testing import tiny_model

PROMPT = "When Mary and John went to the store, John gave a drink to"


def _tiny(model_type: str, **overrides):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf, tok = tiny_model(model_type, **overrides)
        return StandardizedTransformer(hf, tokenizer=tok, check=False)


def _massive(dtype=torch.float32):
    """A residual like SmolLM2's from layer 12 on: one coordinate ~2.5e4, the rest O(1); an MLP output O(10)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 64, generator=g)
    x[..., 3] = 2.5e4
    o = torch.randn(2, 7, 64, generator=g) * 10
    return x.to(dtype), o.to(dtype)


def test_residual_factor_holds_under_large_residuals():
    x, o = _massive()
    y = x + o  # the model's own float32 add
    # the old test (y - x against o, tolerance scaled by the branch) fails here: cancellation costs ~eps * 2.5e4
    assert float((y - x - o).abs().max()) > 1e-5 * float(o.abs().max())
    assert _residual_factor(x, o, y) == 1.0
    xb, ob = _massive(torch.bfloat16)
    assert _residual_factor(xb, ob, xb + ob) == 1.0  # bfloat16 add: its own rounding
    c = _residual_factor(x, o, x + o * 0.22)  # Granite's residual_multiplier form
    assert c is not None and abs(c - 0.22) < 1e-6


def test_residual_factor_refuses_what_is_not_a_residual_add():
    x, o = _massive()
    y = x + o
    assert _residual_factor(x, o, F.layer_norm(y, (64,))) is None  # post-norm: a norm after the add
    assert _residual_factor(x, o, y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6)) is None  # RMS post-norm
    assert _residual_factor(x, o, x + F.layer_norm(o, (64,))) is None  # a norm on the branch that is not `o`
    # one element off by 1e-3 of the branch (far above the add's rounding there): refused
    off = y.clone()
    off[0, 0, 0] += 1e-3 * float(o[0, 0, 0].abs())
    assert _residual_factor(x, o, off) is None
    assert _residual_factor(x, o, x + 0.5 * o + 0.1 * o.pow(2)) is None  # not a constant factor


@pytest.mark.parametrize("model_type,overrides",
                         [("llama", {}), ("gpt2", {}), ("granite", {"residual_multiplier": 0.22})])
def test_resid_mid_kept_on_pre_norm_blocks(model_type, overrides):
    model = _tiny(model_type, **overrides)
    setup = model.__dict__["_hook_point_setup"]
    factors = [layer.parts["resid"].factor for layer in setup.layers]
    assert factors == pytest.approx([overrides.get("residual_multiplier", 1.0)] * model.num_layers, abs=1e-6)
    got = model.read(PROMPT, ["layers_resid_mid.*", "layers_input.*", "attentions_output.*"])
    m = overrides.get("residual_multiplier", 1.0)
    for i in range(model.num_layers):
        expected = got[f"layers_input.{i}"] + m * got[f"attentions_output.{i}"]
        torch.testing.assert_close(got[f"layers_resid_mid.{i}"], expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("model_type,overrides,reason", [
    ("opt", {"do_layer_norm_before": False}, "not the MLP branch's input plus the MLP branch"),  # post-norm
    ("bart", {}, "not the MLP branch's input plus the MLP branch"),  # post-norm decoder
    ("gptj", {}, "parallel block"),
])  # fmt: skip
def test_resid_mid_refused_where_no_residual_exists(model_type, overrides, reason):
    model = _tiny(model_type, **overrides)
    with pytest.raises(UnsupportedHookPoint, match=reason):
        model.read(PROMPT, ["layers_resid_mid.0"])
    with pytest.raises(KeyError, match="hook_resid_mid"):
        model.run_with_cache(PROMPT, names_filter=["blocks.0.hook_resid_mid"])


@pytest.mark.slow
def test_smollm2_resid_mid_on_every_layer():
    """All 30 layers: resid_mid == layers_input + attentions_output (relative 1e-6: the two sides are the same
    float32 add, so this is exact up to the read), through the standardized read and TL's names; an edit at a layer
    the old rule refused (20) equals the same edit made by a plain torch hook on HF's attention output."""
    from unilens import load_default

    model = load_default()
    n = model.num_layers
    ids = model.to_tokens(PROMPT)  # TL's tokens (BOS first), the same ids on every route below
    got = model.read(ids, ["layers_resid_mid.*", "layers_input.*", "attentions_output.*"])
    for i in range(n):
        expected = got[f"layers_input.{i}"] + got[f"attentions_output.{i}"]
        err = float((got[f"layers_resid_mid.{i}"] - expected).abs().max())
        assert err <= 1e-6 * float(expected.abs().max()), f"layer {i}: resid_mid off by {err:.3g}"

    _, cache = model.run_with_cache(ids, names_filter=lambda name: "resid" in name)
    assert sum(name.endswith("hook_resid_mid") for name in cache.keys()) == n
    stack, labels = cache.accumulated_resid(incl_mid=True, return_labels=True)
    assert len(labels) == 2 * n + 1 and labels[-2] == f"{n - 1}_mid"
    torch.testing.assert_close(stack[-2], got[f"layers_resid_mid.{n - 1}"], rtol=0, atol=0)

    delta = torch.randn(model.hidden_size, generator=torch.Generator().manual_seed(0)) * 0.5
    with torch.no_grad():
        edited = model.run_with_hooks(ids, fwd_hooks=[("blocks.20.hook_resid_mid", lambda x, hook: x + delta)])
    edited = getattr(edited, "logits", edited)
    hf = model.module_accessor.model
    handle = hf.model.layers[20].self_attn.register_forward_hook(lambda m, a, o: (o[0] + delta, *o[1:]))
    try:
        with torch.no_grad():
            expected = hf(input_ids=ids).logits
    finally:
        handle.remove()
    # the two routes add delta in a different order around the ~2.5e4 residual coordinate (rounding ~eps * 2.5e4
    # there), which the remaining layers carry to the logits: 1e-4 of the logits' size, as test_hook_points uses
    err = float((edited - expected).abs().max())
    assert err <= 1e-4 * float(expected.abs().max()), f"logits after the resid_mid edit off by {err:.3g}"
    with torch.no_grad():
        plain = model.run_with_hooks(ids)
    assert float((edited - getattr(plain, "logits", plain)).abs().max()) > 1e-2  # the edit does move the logits
