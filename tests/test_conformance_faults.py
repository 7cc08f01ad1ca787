"""Fault injection for the conformance checkers (issue 27): whatever a kernel returns or raises, and whatever a model
computes, is a reported result, never an exception; the default grid catches a tiled kernel that loses the sinks
once the sliding window starts past the first key tile; `diff_models` runs on the MoE families of the zoo in every
dtype and localizes planted faults there."""

import copy

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from unilens.arch.discovery import ModuleMap
from unilens.conformance import check_attention, default_cases, diff_models
from unilens.conformance.faults import (
    FAULTS,
    _make_tiled,
    _simple_attention,
    plant_attention_fault,
    tiled_skip_correct,
)
from unilens.testing import tiny_model

# ---------------------------------------------------------------------------------------------------------------
# check_attention: any output of a kernel is a failing result
# ---------------------------------------------------------------------------------------------------------------


def _kernel(make, name):
    """A flash-convention kernel returning ``make(query, key, value, correct_output)``."""

    def fn(module, query, key, value, attention_mask, **kwargs):
        out, _ = _simple_attention(module, query, key, value, attention_mask, fault=None, **kwargs)
        return make(query, key, value, out)

    fn.__name__ = name
    fn.mask_format = "flash"
    return fn


def _fill(value):
    return lambda q, k, v, out: (torch.full_like(out, value), None)


def _one_nan(q, k, v, out):
    out = out.clone()
    out[0, -1, 0, 0] = float("nan")  # batch row 0 is never padded; its last query sees keys
    return out, None


def _random(q, k, v, out):
    return torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(out.dtype), None


def _raises(q, k, v, out):
    raise RuntimeError("CUDA error: an illegal memory access was encountered")


def _writes_key(q, k, v, out):
    k.mul_(2.0)
    return out, None


# kernel -> the rules its failing results may carry (every (case, dtype) of the default grid must fail)
BAD_OUTPUTS = {
    "nan": (_fill(float("nan")), {"non-finite"}),
    "inf": (_fill(float("inf")), {"non-finite"}),
    "minus_inf": (_fill(float("-inf")), {"non-finite"}),
    "zeros": (_fill(0.0), {"absolute"}),
    "ones": (_fill(1.0), {"absolute"}),
    "random": (_random, {"absolute"}),
    "one_nan_in_a_correct_output": (_one_nan, {"non-finite"}),
    "float64": (lambda q, k, v, out: (out.double(), None), {"output dtype"}),
    "int64": (lambda q, k, v, out: (out.long(), None), {"output dtype"}),
    "bool": (lambda q, k, v, out: (out > 0, None), {"output dtype"}),
    "head_dim_cut": (lambda q, k, v, out: (out[..., :-1], None), {"output shape"}),
    "extra_dim": (lambda q, k, v, out: (out[None], None), {"output shape"}),
    # (batch, heads, query, head_dim): the same shape where heads == query, then the numbers are wrong
    "transposed": (lambda q, k, v, out: (out.transpose(1, 2), None), {"output shape", "absolute"}),
    "tensor_not_tuple": (lambda q, k, v, out: out, {"return type"}),
    "none": (lambda q, k, v, out: None, {"return type"}),
    "triple": (lambda q, k, v, out: (out, None, None), {"return type"}),
    "tuple_instead_of_tensor": (lambda q, k, v, out: ((out,), None), {"output type"}),
    "numpy_array": (lambda q, k, v, out: (out.float().numpy(), None), {"output type"}),
    "sparse": (lambda q, k, v, out: (out.to_sparse(), None), {"output type"}),
    "meta_device": (lambda q, k, v, out: (torch.empty_like(out, device="meta"), None), {"output device"}),
    "nan_weights": (lambda q, k, v, out: (out, torch.full((q.shape[0], q.shape[1], q.shape[2], k.shape[2]),
                                                          float("nan"), dtype=q.dtype)), {"weights"}),
    "int_weights": (lambda q, k, v, out: (out, torch.zeros((q.shape[0], q.shape[1], q.shape[2], k.shape[2]),
                                                           dtype=torch.long)), {"weights"}),
    "writes_into_key": (_writes_key, {"inputs modified"}),
    "raises": (_raises, {"raised"}),
}


@pytest.mark.parametrize("name", sorted(BAD_OUTPUTS))
def test_any_kernel_output_is_a_failing_result_over_the_default_grid(name):
    make, rules = BAD_OUTPUTS[name]
    report = check_attention(_kernel(make, name))  # every case of the default grid, float32 / bfloat16 / float16
    assert not report.passed
    assert len(report.results) == 3 * len(default_cases())
    for r in report.results:
        assert r.status == ("error" if name == "raises" else "fail"), (r.case, r.dtype, r.status, r.message)
        assert r.rule in rules, (r.case, r.dtype, r.rule, r.message)
        assert r.message or r.rule in ("absolute", "output shape") or r.nonfinite, (r.case, r.dtype)
    str(report)  # the table renders whatever the numbers


def test_messages_name_what_was_returned():
    def one(make):
        return check_attention(_kernel(make, "k"), cases=["basic"], dtypes=["bfloat16"]).results[0]

    assert one(BAD_OUTPUTS["float64"][0]).message.startswith("output dtype float64, expected bfloat16")
    assert one(BAD_OUTPUTS["head_dim_cut"][0]).message == "output shape (2, 8, 4, 15), expected (2, 8, 4, 16)"
    assert "expected a tuple (attn_output, attn_weights)" in one(BAD_OUTPUTS["tensor_not_tuple"][0]).message
    assert one(BAD_OUTPUTS["tuple_instead_of_tensor"][0]).message.startswith("attn_output is a tuple of 1")
    r = one(_raises)
    assert r.status == "error" and r.diagnosis == "raised" and r.message.startswith("RuntimeError: CUDA error")
    assert one(_writes_key).message.startswith("the kernel wrote into its key argument")
    assert one(BAD_OUTPUTS["nan"][0]).message == "1024 non-finite output values where the reference is finite"
    weights = one(BAD_OUTPUTS["nan_weights"][0])
    assert "attn_weights: 512 non-finite values where the reference is finite" in weights.message


def test_zero_precision_yardstick_does_not_crash():
    """seq1: one query, one key, so the output is the value itself and correct bf16 kernels are exact (relative RMS
    error 0). Before: ZeroDivisionError building the precision message for any kernel with an error there."""
    r = check_attention(_kernel(_fill(0.0), "zeros"), cases=["seq1"], dtypes=["bfloat16"]).results[0]
    assert r.status == "fail" and r.rule == "absolute" and r.yardstick_rel_rms == 0.0
    assert "where it is exactly 0 for a correct bfloat16 kernel" in r.message
    assert check_attention(FAULTS["tile_no_rescale"], cases=["seq1"], dtypes=["bfloat16"]).passed  # exact: passes


def test_a_correct_kernel_writing_into_its_query_fails_only_for_that():
    """The kernel gets copies: the checker's own inputs (and verdict on the numbers) are untouched."""
    def correct_but_writes_query(q, k, v, out):
        q.fill_(float("nan"))
        return out, None

    report = check_attention(_kernel(correct_but_writes_query, "w"), cases=["basic", "sinks"], dtypes=["float32"])
    assert {(r.status, r.rule) for r in report.results} == {("fail", "inputs modified")}
    assert report.results[0].message.startswith("the kernel wrote into its query argument")


# A garbage generator: a base (a constant, scaled noise, or a correct output with one value replaced), then a dtype,
# a shape and a container. Whatever it draws is not a correct output, so every result must fail, and none may raise.
_BASES = st.one_of(
    st.tuples(st.just("constant"), st.floats(allow_nan=True, allow_infinity=True, width=32)),
    st.tuples(st.just("noise"), st.floats(min_value=1e-3, max_value=1e6)),
    st.tuples(st.just("poke"), st.sampled_from([float("nan"), float("inf"), float("-inf"), 1e4, -1e4])),
)
_DTYPES = st.sampled_from([None, torch.float64, torch.int32, torch.bool, torch.complex64, torch.uint8])
_SHAPES = st.sampled_from(["same", "transpose", "squeeze_batch", "cut", "extra"])
_CONTAINERS = st.sampled_from(["tuple", "list", "bare", "nested", "weights_garbage"])


def _garbage(base, dtype, shape, container):
    def make(q, k, v, out):
        kind, x = base
        if kind == "constant":
            y = torch.full_like(out, x)
        elif kind == "noise":
            y = (torch.randn(out.shape, generator=torch.Generator().manual_seed(1)) * x).to(out.dtype)
        else:
            y = out.clone()
            y[0, -1, 0, 0] = x
        if dtype is not None:
            y = y.to(dtype)
        y = {"same": y, "transpose": y.transpose(1, 2), "squeeze_batch": y[0], "cut": y[..., 1:],
             "extra": y[..., None]}[shape]
        if container == "tuple":
            return y, None
        if container == "list":
            return [y, None]
        if container == "bare":
            return y
        if container == "nested":
            return (y, None), None
        return y, "weights"

    return make


@settings(derandomize=True, max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(base=_BASES, dtype=_DTYPES, shape=_SHAPES, container=_CONTAINERS)
def test_fuzz_check_attention_never_raises_and_never_passes_garbage(base, dtype, shape, container):
    kernel = _kernel(_garbage(base, dtype, shape, container), "garbage")
    # seq1: the zero-yardstick case; decode_sinks / padding_right: sinks and fully masked rows
    report = check_attention(kernel, cases=["seq1", "basic", "decode_sinks", "padding_right"])
    assert all(r.status in ("fail", "error") for r in report.results), str(report)
    assert all(r.rule for r in report.results), str(report)


def test_argument_mistakes_are_one_line_errors_and_single_values_work():
    with pytest.raises(TypeError, match="fn must be an attention function"):
        check_attention(42)
    with pytest.raises(TypeError, match="cases must be case names or AttentionCase objects"):
        check_attention("eager", cases=[3])
    with pytest.raises(ValueError, match="unknown dtype 'float99'"):
        check_attention("eager", cases="basic", dtypes="float99")
    with pytest.raises(ValueError, match="unknown dtype torch.int64"):
        check_attention("eager", cases="basic", dtypes=torch.int64)
    report = check_attention("eager", cases="basic", dtypes="float32")  # one case, one dtype (not its letters)
    assert [(r.case, r.dtype, r.status) for r in report.results] == [("basic", "float32", "pass")]


# ---------------------------------------------------------------------------------------------------------------
# The default grid: sinks x a sliding window that starts past the first key tile
# ---------------------------------------------------------------------------------------------------------------

NEW_CASES = {"decode_window_sinks_past_tile", "chunked_window_sinks_past_tile"}


def _first_visible_key(case, query: int) -> int:
    return int(case.visible()[0, 0, query].nonzero().min())


def test_default_grid_has_sinks_with_a_window_past_the_first_key_tile():
    grid = {c.name: c for c in default_cases()}
    assert NEW_CASES <= set(grid)
    decode, chunked = grid["decode_window_sinks_past_tile"], grid["chunked_window_sinks_past_tile"]
    assert decode.sinks and chunked.sinks and decode.sliding_window and chunked.sliding_window
    assert _first_visible_key(decode, 0) >= 128  # past the first tile of 64 and of 128 keys
    assert _first_visible_key(chunked, 0) >= 64  # the first query's window starts in the second 64-key tile
    offset = chunked.keys - chunked.q_len  # a 64-query block of flash kernels starting at query position 192:
    assert _first_visible_key(chunked, 192 - offset) >= 128


def test_window_skipping_tiled_kernel_that_loses_the_sinks_passes_the_old_grid_and_fails_the_new():
    """The planted kernel (unilens.conformance.faults, 'tile_window_skip_sinks_lost'): flash-style, 64-key tiles in
    blocks of 64 queries, skips the key tiles left of a block's sliding window (correct), but folds the sink into the
    running softmax when key tile 0 is processed: right unless tile 0 is skipped, i.e. only with sinks and a window
    starting past the first tile. The grid before this issue had no such case."""
    kernel = FAULTS["tile_window_skip_sinks_lost"]
    old_grid = [c for c in default_cases() if c.name not in NEW_CASES]
    assert check_attention(kernel, cases=old_grid).passed
    report = check_attention(kernel)
    assert not report.passed
    assert {r.case for r in report.failures()} == NEW_CASES
    r = report.result("decode_window_sinks_past_tile", "float32")
    assert r.rule == "absolute" and r.diagnosis.startswith("interaction of masking (sliding window), sinks")


@pytest.mark.parametrize("tile,query_block", [(64, None), (128, None), (128, 128), (128, 64)])
def test_the_sinks_lost_past_the_first_tile_fail_for_64_and_128_key_tiles(tile, query_block):
    """Key tiles of 64 or 128, queries all at once (None) or in blocks: the fault fails, the same kernel without it
    passes."""
    kernel = _make_tiled("tile_window_skip_sinks_lost", tile, query_block, skip_masked_tiles=True)
    report = check_attention(kernel, dtypes=["float32"])
    assert "decode_window_sinks_past_tile" in {r.case for r in report.failures()}
    assert {r.case for r in report.failures()} <= NEW_CASES
    correct = _make_tiled(None, tile, query_block, skip_masked_tiles=True)
    assert check_attention(correct, dtypes=["float32", "bfloat16"]).passed


def test_window_skipping_correct_kernel_passes_the_default_grid():
    for seed in range(3):
        report = check_attention(tiled_skip_correct, seed=seed)
        assert report.passed, f"seed {seed}:\n{report}"


# ---------------------------------------------------------------------------------------------------------------
# diff_models: MoE families in every dtype, planted faults, numbers that are not numbers
# ---------------------------------------------------------------------------------------------------------------


def _moe(model_type, dtype):
    model, tok = tiny_model(model_type)
    enc = tok(["The capital of France is", "Hello there"], return_tensors="pt", padding=True)
    return model.to(dtype), {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("model_type", ["gpt_oss", "mixtral"])
def test_diff_models_localizes_planted_faults_in_moe_models(model_type, dtype):
    a, inputs = _moe(model_type, dtype)
    # a clean pair: transformers' grouped-matmul experts against its eager loop over experts
    b = copy.deepcopy(a)
    b.set_experts_implementation("eager")
    clean = diff_models(a, b, inputs)
    assert not clean.faulty and not clean.diverged, str(clean)
    if dtype == torch.float32:  # the float64 yardstick copy: _grouped_mm has no float64 kernel (raised before)
        moe = [r for r in clean.isolated if r.component in ("mlp", "residual")]
        assert moe and all(r.yardstick == "float64; float32 in _grouped_mm (no float64 kernel)" for r in moe)
        assert all(r.yardstick == "float64" for r in clean.isolated if r.component == "attention")
    # a fault in layer 1's attention function (GPT-OSS: around its own eager function, sinks included)
    report = diff_models(a, plant_attention_fault(copy.deepcopy(a), 1, "no_self"), inputs)
    fault = report.first_fault
    assert (fault.layer, fault.component) == (1, "attention"), str(report)
    assert fault.op.startswith("attention function"), fault.op
    assert not any(r.exceeds for r in report.isolated if r.layer == 0)
    # a fault in layer 1's experts: every expert's down projection scaled
    faulty = copy.deepcopy(a)
    with torch.no_grad():
        ModuleMap(faulty).get_mlp(1).experts.down_proj.mul_(1.5)
    report = diff_models(a, faulty, inputs)
    fault = report.first_fault
    assert (fault.layer, fault.component) == (1, "mlp"), str(report)
    assert not any(r.exceeds for r in report.isolated if r.layer == 0)


@pytest.mark.parametrize("model_type", ["qwen2_moe", "qwen3_moe", "deepseek_v3", "glm4_moe", "dbrx", "opt"])
def test_diff_models_runs_on_the_other_moe_families_and_mlp_spans(model_type):
    """float32 raised `Expected mat_a to be Float32, BFloat16 or Float16 matrix, got Double` on every grouped-matmul
    MoE; OPT (no single MLP module) raised ArchitectureError."""
    a, inputs = _moe(model_type, torch.float32)
    report = diff_models(a, copy.deepcopy(a), inputs)
    assert not report.diverged and not report.faulty, str(report)
    assert all(r.max_abs == 0.0 for r in report.rows + report.isolated)
    if model_type == "opt":
        assert {r.component for r in report.rows} == {"attention", "residual"}
        assert any("no single MLP module" in n for n in report.notes)


def _llama():
    a, tok = tiny_model("llama", num_hidden_layers=3)
    enc = tok(["The capital of France is", "Hello there"], return_tensors="pt", padding=True)
    return a, {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_diff_models_reports_non_finite_values_as_divergence(value):
    a, inputs = _llama()
    broken = copy.deepcopy(a)
    with torch.no_grad():
        broken.model.layers[1].mlp.down_proj.weight[0, 0] = value
    for model_a, model_b, which in ((a, broken, "b"), (broken, a, "a"), (broken, copy.deepcopy(broken), "a and b")):
        report = diff_models(model_a, model_b, inputs)
        assert report.diverged and report.faulty
        for row in (report.first_divergence, report.first_fault):
            assert (row.layer, row.component, row.max_abs) == (1, "mlp", float("inf")), str(report)
            assert row.note == f"non-finite values in model {which}"
        assert all(not r.exceeds for r in report.rows if r.layer == 0)
        assert "non-finite values in model" in str(report)


def test_diff_models_reports_a_raising_module_and_different_shapes():
    a, inputs = _llama()
    raising = copy.deepcopy(a)

    def boom(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    raising.model.layers[1].mlp.forward = boom
    report = diff_models(a, raising, inputs)
    assert report.diverged and report.raised == ["model b raised RuntimeError: kernel exploded in layer 1 mlp"]
    first = report.first_divergence
    assert (first.layer, first.component, first.note) == (1, "mlp", "model b raised here")
    fault = report.first_fault
    assert (fault.layer, fault.component) == (1, "mlp")
    assert fault.note == "model b raised RuntimeError: kernel exploded"
    assert "raised: model b raised RuntimeError" in str(report)
    assert len(report.figure().data) == 1

    class Transposed(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x).transpose(0, 1)

    shaped = copy.deepcopy(a)
    shaped.model.layers[1].mlp.down_proj = Transposed(shaped.model.layers[1].mlp.down_proj)
    report = diff_models(a, shaped, inputs)
    first = report.first_divergence
    assert (first.layer, first.component) == (1, "mlp") and first.note.startswith("shapes differ: a (2, 6, 64) vs b")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_diff_models_gives_each_model_its_own_attention_masks(dtype):
    """Model a on sdpa (bool masks, or None for plain causal), model b on eager (additive masks): b's attention
    replayed with a's mask was called a fault at layer 0 before (a bool mask added to eager's scores)."""
    a, inputs = _llama()
    sdpa, eager = copy.deepcopy(a).to(dtype), copy.deepcopy(a).to(dtype)
    sdpa.set_attn_implementation("sdpa")
    eager.set_attn_implementation("eager")
    for x, y in ((sdpa, eager), (eager, sdpa)):
        for batch in (inputs, {"input_ids": inputs["input_ids"][:1]}):
            report = diff_models(x, y, batch)
            assert not report.faulty and not report.diverged, str(report)


def test_diff_models_argument_mistakes():
    a, inputs = _llama()
    with pytest.raises(TypeError, match="inputs must be a dict of model inputs"):
        diff_models(a, a, None)
    with pytest.raises(TypeError, match="model_b must be an HF model"):
        diff_models(a, "llama", inputs)
    assert np.isfinite([r.max_abs for r in diff_models(a, copy.deepcopy(a), inputs["input_ids"]).rows]).all()
