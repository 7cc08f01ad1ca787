"""Tests for unilens.conformance: the float64 reference, check_attention, planted faults, diff_models."""

import copy
import json
import math

import pytest
import torch
from torch import nn

from unilens.conformance import (
    AttentionCase,
    check_attention,
    diff_model_implementations,
    diff_models,
    reference_as_attention_fn,
    reference_attention,
    run_attn_check,
    visibility_mask,
)
from unilens.conformance.faults import FAULTS, correct

# ---------------------------------------------------------------------------------------------------------------
# Reference attention against hand-computed numbers
# ---------------------------------------------------------------------------------------------------------------

# One head, two tokens, head_dim 1: q = [1, 2], k = [1, 0], v = [1, 3], scaling 1.
Q = torch.tensor([1.0, 2.0]).reshape(1, 1, 2, 1)
K = torch.tensor([1.0, 0.0]).reshape(1, 1, 2, 1)
V = torch.tensor([1.0, 3.0]).reshape(1, 1, 2, 1)


def test_reference_hand_computed_causal():
    out, probs, scores = reference_attention(Q, K, V, scaling=1.0)
    # scores: q0.k0 = 1, q1.k0 = 2, q1.k1 = 0. Query 0 sees key 0 only; query 1: softmax([2, 0]).
    p10 = math.exp(2) / (math.exp(2) + 1)  # 0.8807970779778823
    assert scores[0, 0].tolist() == [[1.0, 0.0], [2.0, 0.0]]
    assert probs[0, 0].flatten().tolist() == pytest.approx([1.0, 0.0, p10, 1 - p10], abs=1e-15)
    assert out[0, :, 0, 0].tolist() == pytest.approx([1.0, p10 * 1 + (1 - p10) * 3], abs=1e-15)
    assert out[0, 1, 0, 0].item() == pytest.approx(1.2384058440, abs=1e-9)  # 0.88080 + 3 * 0.11920
    assert out.dtype == torch.float64 and out.shape == (1, 2, 1, 1)


def test_reference_hand_computed_sinks_softcap_window_padding():
    # Sink logit 0 is an extra column: query 0 -> [e^1, e^0], query 1 -> [e^2, e^0, e^0]; the sink column is dropped.
    out, probs, _ = reference_attention(Q, K, V, scaling=1.0, sinks=torch.tensor([0.0]))
    d1 = math.exp(2) + 2
    expected = [math.e / (math.e + 1), 0.0, math.exp(2) / d1, 1 / d1]
    assert probs[0, 0].flatten().tolist() == pytest.approx(expected, abs=1e-15)
    assert probs[0, 0, 1].sum().item() == pytest.approx(1 - 1 / d1, abs=1e-15)  # 1 - p_sink
    assert out[0, 1, 0, 0].item() == pytest.approx(math.exp(2) / d1 + 3 / d1, abs=1e-15)
    # Softcap 1: tanh(2) = 0.9640275800758169 replaces 2 before the softmax.
    _, probs, scores = reference_attention(Q, K, V, scaling=1.0, softcap=1.0)
    t = math.tanh(2.0)
    assert scores[0, 0, 1, 0].item() == pytest.approx(t, abs=1e-15)
    assert probs[0, 0, 1, 0].item() == pytest.approx(math.exp(t) / (math.exp(t) + 1), abs=1e-15)
    # Sliding window 1: query 1 sees key 1 only -> output v1 = 3.
    out, _, _ = reference_attention(Q, K, V, scaling=1.0, sliding_window=1)
    assert out[0, :, 0, 0].tolist() == [1.0, 3.0]
    # Non-default scaling 0.5: query 1 -> softmax([1, 0]).
    _, probs, _ = reference_attention(Q, K, V, scaling=0.5)
    assert probs[0, 0, 1, 0].item() == pytest.approx(math.e / (math.e + 1), abs=1e-15)
    # Left padding: key 0 is a pad, so query 0 sees nothing -> zeros, not NaN; query 1 sees key 1 only.
    out, probs, _ = reference_attention(Q, K, V, scaling=1.0, attention_mask_2d=torch.tensor([[0, 1]]))
    assert out[0, :, 0, 0].tolist() == [0.0, 3.0]
    assert probs[0, 0].tolist() == [[0.0, 0.0], [0.0, 1.0]]
    # Cross length: one query against both keys sits at position 1 (last), so it sees both keys.
    out, _, _ = reference_attention(Q[:, :, 1:], K, V, scaling=1.0)
    p10 = math.exp(2) / (math.exp(2) + 1)
    assert out[0, 0, 0, 0].item() == pytest.approx(p10 + 3 * (1 - p10), abs=1e-15)


def test_reference_gqa_blocked_mapping():
    # 4 query heads over 2 kv heads: heads 0,1 -> kv 0; heads 2,3 -> kv 1 (repeat_kv), checked head by head
    # against single-head attention.
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 3, 5, generator=g, dtype=torch.float64)
    k = torch.randn(1, 2, 3, 5, generator=g, dtype=torch.float64)
    v = torch.randn(1, 2, 3, 5, generator=g, dtype=torch.float64)
    out, _, _ = reference_attention(q, k, v, scaling=0.3)
    for h in range(4):
        single, _, _ = reference_attention(q[:, h : h + 1], k[:, h // 2 : h // 2 + 1], v[:, h // 2 : h // 2 + 1],
                                           scaling=0.3)
        assert torch.equal(out[:, :, h], single[:, :, 0])


# ---------------------------------------------------------------------------------------------------------------
# Reference against transformers' own masks and eager functions
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("q_len,kv_len", [(7, 7), (3, 7), (1, 7)])
def test_visibility_mask_matches_transformers_sdpa_mask(window, q_len, kv_len):
    from transformers.masking_utils import (
        causal_mask_function,
        sdpa_mask,
        sliding_window_causal_mask_function,
    )

    pad = torch.ones(3, kv_len, dtype=torch.bool)
    pad[1, :2] = False  # left padding
    pad[2, -2:] = False  # right padding
    fn = causal_mask_function if window is None else sliding_window_causal_mask_function(window)
    hf = sdpa_mask(batch_size=3, q_length=q_len, kv_length=kv_len, q_offset=kv_len - q_len, mask_function=fn,
                   attention_mask=pad, allow_is_causal_skip=False)
    ours = visibility_mask(3, q_len, kv_len, attention_mask_2d=pad, sliding_window=window)
    assert torch.equal(ours, hf)


def _fake_module(groups, sinks=None):
    m = nn.Module()
    m.num_key_value_groups = groups
    m.is_causal = True
    m.sinks = sinks
    m.eval()
    return m


def _hf_eager_mask(batch, q_len, kv_len, pad, window=None):
    from transformers.masking_utils import (
        causal_mask_function,
        eager_mask,
        sliding_window_causal_mask_function,
    )

    fn = causal_mask_function if window is None else sliding_window_causal_mask_function(window)
    return eager_mask(batch_size=batch, q_length=q_len, kv_length=kv_len, q_offset=kv_len - q_len,
                      mask_function=fn, attention_mask=pad.bool(), dtype=torch.float64)


def test_reference_equals_hf_llama_eager_gqa_float64():
    from transformers.models.llama.modeling_llama import eager_attention_forward

    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 6, 5, 8, generator=g, dtype=torch.float64)
    k = torch.randn(2, 2, 9, 8, generator=g, dtype=torch.float64)
    v = torch.randn(2, 2, 9, 8, generator=g, dtype=torch.float64)
    pad = torch.ones(2, 9, dtype=torch.long)
    pad[1, :3] = 0  # every query of row 1 still sees a real key
    mask = _hf_eager_mask(2, 5, 9, pad, window=4)
    hf_out, hf_probs = eager_attention_forward(_fake_module(3), q, k, v, mask, scaling=0.37)
    out, probs, _ = reference_attention(q, k, v, scaling=0.37, attention_mask_2d=pad, sliding_window=4)
    # Llama's eager runs its softmax in float32 even for float64 inputs (`dtype=torch.float32`), so agreement is
    # at float32 rounding of probabilities in [0, 1].
    torch.testing.assert_close(hf_probs, probs, atol=1e-7, rtol=0)
    torch.testing.assert_close(hf_out, out, atol=1e-6, rtol=0)


def test_reference_equals_hf_gpt_oss_eager_sinks_float64():
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    g = torch.Generator().manual_seed(2)
    q = torch.randn(3, 4, 6, 8, generator=g, dtype=torch.float64)
    k = torch.randn(3, 2, 6, 8, generator=g, dtype=torch.float64)
    v = torch.randn(3, 2, 6, 8, generator=g, dtype=torch.float64)
    sinks = torch.randn(4, generator=g, dtype=torch.float64)
    pad = torch.ones(3, 6, dtype=torch.long)
    pad[1, :2] = 0  # queries 0 and 1 of row 1 see no key: GPT-OSS eager puts all mass on the sink -> zeros
    pad[2, -1] = 0
    mask = _hf_eager_mask(3, 6, 6, pad, window=3)
    hf_out, hf_probs = eager_attention_forward(_fake_module(2, sinks), q, k, v, mask, scaling=0.35)
    out, probs, _ = reference_attention(q, k, v, scaling=0.35, attention_mask_2d=pad, sliding_window=3, sinks=sinks)
    # GPT-OSS eager computes its softmax in the input dtype, so float64 agrees to float64 rounding, masked rows too.
    torch.testing.assert_close(hf_probs, probs, atol=1e-14, rtol=0)
    torch.testing.assert_close(hf_out, out, atol=1e-14, rtol=0)
    assert (probs.sum(-1) < 1).all()  # probabilities over real keys sum to 1 - p_sink


def test_reference_as_attention_fn_in_a_tiny_llama():
    from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM

    AttentionInterface.register("conformance_reference", reference_as_attention_fn)
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=50)
    model = AutoModelForCausalLM.from_config(cfg).double().eval()
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 7, dtype=torch.long)
    # Right padding: with LEFT padding HF's float64 eager gives NaN for the whole padded row (eager_mask's
    # finfo(float64).min becomes -inf in Llama's float32 softmax, a fully masked row turns NaN, and 0 * NaN
    # poisons the real tokens in the next layer). The reference's fully masked rows are zeros, checked below.
    mask[1, -2:] = 0
    model.set_attn_implementation("eager")
    with torch.no_grad():
        eager_logits = model(input_ids=ids, attention_mask=mask).logits
    # A registered implementation without a mask function gets attention_mask=None and would ignore padding;
    # give it eager's mask like unilens does.
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionMaskInterface.register("conformance_reference", eager_mask)
    model.set_attn_implementation("conformance_reference")
    with torch.no_grad():
        ref_logits = model(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    # Eager's float32 softmax is the only difference (see the test above).
    torch.testing.assert_close(ref_logits[keep], eager_logits[keep], atol=1e-5, rtol=0)
    left = torch.ones(2, 7, dtype=torch.long)
    left[1, :2] = 0
    with torch.no_grad():
        left_logits = model(input_ids=ids, attention_mask=left).logits
    assert torch.isfinite(left_logits).all()


# ---------------------------------------------------------------------------------------------------------------
# check_attention on transformers' implementations
# ---------------------------------------------------------------------------------------------------------------


def test_eager_passes_every_case_in_every_dtype():
    report = run_attn_check("eager", dtypes=("float32", "bfloat16", "float16"))
    assert report.passed, str(report)
    assert {r.status for r in report.results} == {"pass"}  # eager supports every feature in the grid
    # Every case returned weights and they were checked.
    assert {r.weights for r in report.results} == {"pass"}
    # HF eager's fully masked rows (left padding, no sinks) are the uniform average, not zeros: reported, not failed.
    assert report.result("padding_left", "float32").masked_rows.startswith("finite")
    assert report.result("gpt_oss_like", "float32").masked_rows == "zeros"  # the sink takes all the mass
    # fp32 errors are rounding-level.
    assert max(r.max_abs for r in report.results if r.dtype == "float32") < 5e-6


def test_sdpa_passes_every_supported_case():
    report = run_attn_check("sdpa", dtypes=("float32", "bfloat16", "float16"))
    assert report.passed, str(report)
    statuses = {(r.case, r.status) for r in report.results}
    assert ("basic", "pass") in statuses and ("padding_left", "pass") in statuses
    unsupported = {r.case for r in report.results if r.status == "unsupported"}
    assert unsupported == {"sinks", "softcap", "gpt_oss_like", "gemma2_like", "decode_window_sinks", "decode_sinks",
                           "decode_softcap", "decode_gpt_oss_like", "decode_window_sinks_past_tile",
                           "chunked_window_sinks_past_tile"}
    assert report.result("padding_left", "bfloat16").masked_rows == "zeros"


def test_sdpa_on_sinks_fails_when_forced():
    # transformers' sdpa silently ignores s_aux: forcing the sinks case must fail and blame the sinks.
    report = check_attention("sdpa", cases=["basic", "sinks"], dtypes=["float32"], unsupported={})
    assert report.result("basic", "float32").status == "pass"
    sinks = report.result("sinks", "float32")
    assert sinks.status == "fail" and sinks.diagnosis.startswith("sinks")


def test_unilens_attention_passes():
    report = run_attn_check("unilens", dtypes=("float32", "bfloat16"))
    assert report.passed, str(report)


def test_report_outputs(tmp_path):
    report = check_attention("eager", cases=["basic", "gqa"], dtypes=["float32"])
    text = str(report)
    assert "basic" in text and "gqa" in text and "PASS" in text
    path = tmp_path / "r.json"
    report.to_json(str(path))
    data = json.loads(path.read_text())
    assert data["passed"] is True and len(data["results"]) == 2
    fig = report.heatmap("gqa", "float32")
    z = fig.data[0].z
    assert len(z) == 8 and len(z[0]) == 8  # (heads, query)


# ---------------------------------------------------------------------------------------------------------------
# Planted faults
# ---------------------------------------------------------------------------------------------------------------


def test_unfaulted_simple_implementation_passes():
    report = check_attention(correct)
    assert report.passed, str(report)


# fault -> (a case that must fail, dtype, the diagnosis it must start with, a case that must still pass)
FAULT_EXPECTATIONS = {
    "wrong_scale": ("scaling", "float32", "scaling", "basic"),
    "window_off_by_one": ("sliding_window", "float32", "masking (sliding window)", "basic"),
    "sinks_ignored": ("sinks", "float32", "sinks", "basic"),
    "causal_missing": ("basic", "float32", "masking (causal)", "bidirectional"),
    "padding_ignored": ("padding_left", "bfloat16", "masking (padding)", "basic"),
    "gqa_interleaved": ("gqa", "float32", "GQA/MQA head mapping", "mqa"),
    "softcap_skipped": ("softcap", "float32", "softcap", "basic"),
    "fp16_softmax_no_max": ("large_logits", "float16", "softmax numerics", "basic"),
}


@pytest.mark.parametrize("fault", sorted(FAULT_EXPECTATIONS))
def test_planted_fault_is_caught(fault):
    case, dtype, diagnosis, still_passing = FAULT_EXPECTATIONS[fault]
    report = check_attention(FAULTS[fault], cases=[still_passing, case], dtypes=[dtype])
    assert not report.passed
    failed = report.result(case, dtype)
    assert failed.status == "fail"
    assert failed.diagnosis.startswith(diagnosis), failed.diagnosis
    assert report.result(still_passing, dtype).status == "pass"
    assert [r.case for r in report.failures()] == [case]


def test_fp16_overflow_fault_reports_nan_and_passes_in_fp32():
    report = check_attention(FAULTS["fp16_softmax_no_max"], cases=["basic", "large_logits"],
                             dtypes=["float32", "float16"])
    bad = report.result("large_logits", "float16")
    assert bad.nonfinite > 0 and "non-finite" in bad.diagnosis
    assert report.result("large_logits", "float32").status == "pass"  # exp(40) fits in fp32


def test_diagnosis_separates_probabilities_from_output():
    # Values mapped to the wrong kv head while keys are right: probabilities (seen through the identity-values
    # probe, the function returns no weights) match, the output does not.
    report = check_attention(FAULTS["gqa_values_interleaved"], cases=["basic", "gqa"], dtypes=["float32"])
    r = report.result("gqa", "float32")
    assert r.status == "fail" and r.probe == "pass"
    assert r.diagnosis.startswith("GQA/MQA head mapping: probabilities match, output diverges")
    # The keys-wrong fault diverges already in the probabilities.
    r = check_attention(FAULTS["gqa_interleaved"], cases=["basic", "gqa"], dtypes=["float32"]).result("gqa", "float32")
    assert r.probe == "fail" and "probabilities diverge" in r.diagnosis


def test_custom_case_and_weights_checked():
    case = AttentionCase("tiny_custom", batch=1, heads=2, kv_heads=1, q_len=4, head_dim=8, sliding_window=2,
                         base="basic", adds=("sliding_window",))
    report = check_attention("eager", cases=[case], dtypes=["float32"])
    assert report.passed and report.results[0].weights == "pass"


# ---------------------------------------------------------------------------------------------------------------
# diff_models
# ---------------------------------------------------------------------------------------------------------------


def _tiny_llama():
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    return AutoModelForCausalLM.from_config(cfg).eval()


def test_diff_models_finds_perturbed_attention_layer():
    model_a = _tiny_llama()
    model_b = copy.deepcopy(model_a)
    with torch.no_grad():
        model_b.model.layers[2].self_attn.o_proj.weight.add_(0.05)
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    report = diff_models(model_a, model_b, {"input_ids": ids})
    first = report.first_divergence
    assert (first.layer, first.component) == (2, "attention"), str(report)
    assert all(r.max_abs == 0.0 for r in report.rows if r.layer < 2)  # identical weights, identical code path
    assert "first at layer 2 attention" in str(report)
    assert len(report.figure().data) == 1


def test_diff_models_eager_vs_sdpa_no_divergence_fp32():
    report = diff_model_implementations(_tiny_llama, "eager", "sdpa", "float32")
    assert not report.diverged, str(report)
    assert len(report.rows) == 12  # 4 layers x (attention, mlp, residual)
    assert max(r.max_abs for r in report.rows) < 1e-5


# ---------------------------------------------------------------------------------------------------------------
# Where real kernels break: tiles past the first, decode paths, low-precision accumulation, module attributes
# ---------------------------------------------------------------------------------------------------------------

from unilens.conformance.faults import TILED_FAULT_NAMES, tiled_correct

# fault -> a case of the default grid that must fail, the rule that must catch it
TILED_EXPECTATIONS = {
    "tile_no_rescale": ("decode_long", "absolute"),
    "tile_drop_partial": ("tiles_129", "absolute"),
    "tile_sinks_first_only": ("decode_sinks", "absolute"),
    "decode_window_dropped": ("decode_window", "absolute"),
    "decode_sinks_dropped": ("decode_sinks", "absolute"),
    "decode_padding_dropped": ("decode_padding_left", "absolute"),
    "decode_gqa_interleaved": ("decode_gqa", "absolute"),
    "low_precision_accumulation": ("decode_long", "relative"),
    "dropout_from_module": ("basic", "absolute|non-finite"),  # dropped mass can leave a zero denominator
    "tile_window_skip_sinks_lost": ("decode_window_sinks_past_tile", "absolute"),
}


def test_every_tiled_fault_has_an_expectation():
    assert set(TILED_EXPECTATIONS) == set(TILED_FAULT_NAMES)


@pytest.mark.parametrize("fault", sorted(TILED_EXPECTATIONS))
def test_default_grid_catches_kernel_faults(fault):
    """Each fault passes the short feature cases it does not touch and fails the default grid's case for it."""
    case, rule = TILED_EXPECTATIONS[fault]
    dtypes = ["bfloat16"] if rule == "relative" else ["float32", "bfloat16"]
    report = check_attention(FAULTS[fault], dtypes=dtypes)
    assert not report.passed
    failed = report.result(case, dtypes[0])
    assert failed.status == "fail" and failed.rule in rule.split("|"), (failed.rule, failed.message)
    if fault.startswith("decode_"):  # a decode-only fault: every multi-query case passes
        assert all(r.passed for r in report.results if default_case(r.case).q_len > 1)
    if fault.startswith("tile_"):  # a fault past the first tile: every case with <= 64 keys passes
        assert all(r.passed for r in report.results if default_case(r.case).keys <= 64)


def default_case(name: str):
    from unilens.conformance import default_cases

    return {c.name: c for c in default_cases("thorough")}[name]


@pytest.mark.parametrize("impl", ["correct_simple", "tiled_correct", "eager", "sdpa"])
def test_correct_kernels_pass_the_default_grid_over_ten_seeds(impl):
    """No false alarm: correct kernels (dense, tiled with a float32 online softmax, transformers' eager and sdpa)
    pass every case of the default grid in three dtypes for 10 seeds (the precision verdict included)."""
    kernel = {"correct_simple": correct, "tiled_correct": tiled_correct}.get(impl, impl)
    for seed in range(10):
        report = check_attention(kernel, seed=seed)
        assert report.passed, f"seed {seed}:\n{report}"


def test_correct_tiled_kernel_passes_the_thorough_grid():
    report = check_attention(tiled_correct, level="thorough", dtypes=["float32", "bfloat16"], seed=3)
    assert report.passed, str(report)
    assert {"decode_1031", "prefill_1031", "gpt_oss_layout", "qwen2_layout"} <= {r.case for r in report.results}


def test_precision_verdict_reports_relative_error_growth():
    """The low-precision-accumulation kernel's relative error grows with the number of keys; the report carries the
    ratio to a float32-accumulation kernel, which stays ~1 for a correct kernel."""
    bad = check_attention(FAULTS["low_precision_accumulation"], cases=["decode", "decode_long"], dtypes=["bfloat16"])
    good = check_attention(tiled_correct, cases=["decode", "decode_long"], dtypes=["bfloat16"])
    ratio = {r.case: r.rel_rms / r.yardstick_rel_rms for r in bad.results}
    assert ratio["decode_long"] > 2.0 and ratio["decode_long"] > ratio["decode"]
    assert all(r.rel_rms <= 2.0 * r.yardstick_rel_rms for r in good.results)


def test_padded_query_contract_flash_zeros():
    """A kernel with flash_attention_2's convention (zeros at padded query positions) conforms; padded_queries=
    'zeros' demands exactly that, so eager's averages there fail it while the flash-style kernel passes."""
    from unilens.conformance.faults import _simple_attention

    def flash_like(module, query, key, value, attention_mask, **kwargs):
        out, _ = _simple_attention(module, query, key, value, attention_mask, fault=None, **kwargs)
        if attention_mask is not None:  # zero every query that is a padding token
            real = attention_mask.bool()[:, -query.shape[2]:]  # (batch, query)
            out = out * real[:, :, None, None].to(out.dtype)
        return out, None

    flash_like.mask_format = "flash"
    cases = ["padding_left", "padding_right", "decode_padding_left"]
    assert check_attention(flash_like, cases=cases).passed
    assert check_attention(flash_like, cases=cases, padded_queries="zeros").passed
    strict = check_attention("eager", cases=["padding_right"], dtypes=["float32"], padded_queries="zeros")
    assert not strict.passed and strict.results[0].rule == "padded queries"


def test_cli_attn_check_takes_a_user_kernel(tmp_path):
    """`unilens attn-check --level thorough --kernel mypkg.mod:fn` from the shell: exit 1 on a fault, 0 without."""
    import os
    import subprocess
    import sys

    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "mod.py").write_text(
        "from unilens.conformance_faults import _tiled_attention\n"
        "def fn(module, q, k, v, mask, **kw):\n"
        "    return _tiled_attention(module, q, k, v, mask, fault='tile_drop_partial', **kw)\n"
        "fn.mask_format = 'flash'\n"
        "def good(module, q, k, v, mask, **kw):\n"
        "    return _tiled_attention(module, q, k, v, mask, fault=None, **kw)\n"
        "good.mask_format = 'flash'\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    cli = [sys.executable, "-m", "unilens.ui.cli", "attn-check", "--level", "thorough", "--dtype", "float32"]
    bad = subprocess.run([*cli, "--kernel", "mypkg.mod:fn"], capture_output=True, text=True, env=env)
    assert bad.returncode == 1, bad.stderr[-2000:]
    assert "FAIL" in bad.stdout and "tiles_129" in bad.stdout
    good = subprocess.run([*cli, "--kernel", "mypkg.mod:good"], capture_output=True, text=True, env=env)
    assert good.returncode == 0, good.stdout[-3000:] + good.stderr[-2000:]


# ---------------------------------------------------------------------------------------------------------------
# diff_models in low precision: per-layer isolation against a noise yardstick
# ---------------------------------------------------------------------------------------------------------------

from unilens.conformance.faults import plant_attention_fault


def _pair_and_inputs(dtype):
    from unilens.testing import tiny_model

    a, tok = tiny_model("llama", attn_implementation="eager", num_hidden_layers=4)
    b, _ = tiny_model("llama", num_hidden_layers=4)  # sdpa, same seeded weights
    enc = tok(["The capital of France is", "Hello there"], return_tensors="pt", padding=True)
    return a.to(dtype), b.to(dtype), {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_diff_models_isolation_localizes_a_planted_fault_in_every_dtype(dtype):
    a, b, inputs = _pair_and_inputs(dtype)
    clean = diff_models(a, b, inputs)
    assert not clean.faulty, str(clean)  # eager vs sdpa: no layer above its noise yardstick
    for fault in ("no_self", "padding_ignored"):
        faulty = plant_attention_fault(copy.deepcopy(b), 2, fault)
        report = diff_models(a, faulty, inputs)
        first = report.first_fault
        assert first is not None and (first.layer, first.component) == (2, "attention"), (fault, str(report))
        assert all(not r.exceeds for r in report.isolated if r.layer < 2)


def test_diff_models_accepts_standardized_models_and_copies_caches():
    """Two StandardizedTransformers of the same weights, a decode step with one cache object in the inputs: each
    model (and each replay) gets its own copy, so identical models do not 'diverge' at layer 0."""
    from unilens import StandardizedTransformer
    from unilens.analysis.sweep import cache_keyword, output_cache
    from unilens.testing import tiny_model

    hf_a, tok = tiny_model("llama")
    hf_b, _ = tiny_model("llama")
    a, b = StandardizedTransformer(hf_a, tokenizer=tok), StandardizedTransformer(hf_b, tokenizer=tok)
    ids = tok(["The capital of France is"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = hf_a(ids, use_cache=True)
    cache = output_cache(out)
    step = {"input_ids": out.logits[:, -1:].argmax(-1), "attention_mask": torch.ones(1, ids.shape[1] + 1,
            dtype=torch.long), cache_keyword(hf_a): cache, "use_cache": True}
    before = cache.get_seq_length()
    report = diff_models(a, b, step)
    assert not report.diverged and not report.faulty, str(report)
    assert all(r.max_abs == 0.0 for r in report.rows)
    assert cache.get_seq_length() == before  # the caller's cache is untouched


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_diff_models_localizes_faults_in_smollm2_half_precision(dtype):
    """SmolLM2 in bf16 / fp16: eager vs sdpa has no fault (the propagated rows alone would call rounding growth a
    divergence), and four planted attention faults in layer 17 (one only on the decode path) are each localized to
    layer 17's attention."""
    from unilens.analysis.sweep import cache_keyword, output_cache
    from unilens.arch.loading import default_model_path, load_hf_model

    def load(implementation):
        return load_hf_model(default_model_path(), dtype=dtype, attn_implementation=implementation)

    eager, tok = load("eager")
    tok.padding_side = "left"
    enc = tok(["The capital of France is", "Hello there"], return_tensors="pt", padding=True)
    prefill = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    with torch.no_grad():
        out = eager(**prefill, use_cache=True)
    decode = {"input_ids": out.logits[:, -1:].argmax(-1),
              "attention_mask": torch.cat([enc["attention_mask"], torch.ones(2, 1, dtype=torch.long)], dim=1),
              cache_keyword(eager): output_cache(out), "use_cache": True}
    sdpa, _ = load("sdpa")
    for inputs in (prefill, decode):
        clean = diff_models(eager, sdpa, inputs)
        assert not clean.faulty, str(clean)
    for fault, inputs in (("scale", prefill), ("no_self", prefill), ("padding_ignored", prefill),
                          ("decode_kv_heads_rolled", decode)):
        faulty = plant_attention_fault(load("sdpa")[0], 17, fault)
        report = diff_models(eager, faulty, inputs)
        first = report.first_fault
        assert first is not None and (first.layer, first.component) == (17, "attention"), (fault, str(report))
        assert first.op.startswith("attention function"), first.op  # q / k / v agree: the kernel is at fault
    # the decode-only fault leaves the prefill alone
    assert not diff_models(eager, plant_attention_fault(load("sdpa")[0], 17, "decode_kv_heads_rolled"),
                           prefill).faulty


def test_diff_models_names_the_op_inside_the_faulty_attention():
    """Per-op localization for attention classes that call transformers' attention interface: queries / keys /
    values, the attention function, or the output projection."""
    a, b, inputs = _pair_and_inputs(torch.float32)
    cases = {"attention function": plant_attention_fault(copy.deepcopy(b), 2, "no_self")}
    for name, proj in (("queries", "q_proj"), ("output projection", "o_proj")):
        faulty = copy.deepcopy(b)
        with torch.no_grad():
            getattr(faulty.model.layers[2].self_attn, proj).weight.mul_(1.5)
        cases[name] = faulty
    for expected, faulty in cases.items():
        first = diff_models(a, faulty, inputs).first_fault
        assert (first.layer, first.component) == (2, "attention") and first.op.startswith(expected), first
