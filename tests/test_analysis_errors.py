"""Every user mistake in the analysis functions' arguments gets one line naming the argument and the fix, raised
before any forward (a forward counter on the HF module proves it), as ``TypeError`` / ``ValueError`` /
``IndexError`` (or a subclass). Each case is a row of docs/errors.md's "Analysis functions" section."""

from __future__ import annotations

import pytest
import torch

from unilens import StandardizedTransformer
from unilens.analysis.attribution import direct_logit_attribution
from unilens.analysis.generation import Steering, generate
from unilens.analysis.lens import TargetPrompt, logit_lens, patch_object_attn_lens, patchscope_generate, patchscope_lens
from unilens.analysis.patching import activation_patching, attribution_patching
from unilens.analysis.prompts import Prompt, run_prompts
from unilens.analysis.steering import mean_difference_vector, steer_all
from unilens.hooks.steering import NonFiniteSteeringError, SteeringPositionError
from unilens.testing import tiny_model

CLEAN, CORRUPTED = "The capital of France is", "The capital of Italy is"


@pytest.fixture(scope="module")
def model():
    hf, tok = tiny_model("llama", seed=0)
    return StandardizedTransformer(hf, tokenizer=tok, check=False)


@pytest.fixture()
def forwards(model):
    """How many forwards the HF module ran during the test."""
    calls = [0]
    handle = model.module_accessor.model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    yield calls
    handle.remove()


def _metric(logits):
    return logits[:, -1, 5]


def _v(m):
    return torch.ones(m.hidden_size)


# (id, call, error class, message pattern); `m` is the tiny llama
CASES = [
    ("logit_lens(m, None)", lambda m: logit_lens(m, None), TypeError,
     r"^prompts must be a string or a non-empty list of strings, got NoneType None\.$"),
    ("logit_lens(m, 5)", lambda m: logit_lens(m, 5), TypeError, r"^prompts must be a string .* got int 5\.$"),
    ("logit_lens(m, [])", lambda m: logit_lens(m, []), TypeError, r"got an empty list; pass at least one prompt"),
    ("logit_lens(m, ['a', 3])", lambda m: logit_lens(m, ["a", 3]), TypeError, r"prompts\[1\] is int 3"),
    ("generate(m, [])", lambda m: generate(m, []), TypeError, r"^prompts must be .* got an empty list"),
    ("generate(m, None)", lambda m: generate(m, None), TypeError, r"^prompts must be .* got NoneType None"),
    ("generate(m, [''])", lambda m: generate(m, [""]), ValueError, r"^prompts\[0\] is an empty string"),
    ("generate(m, 'a', steer='x')", lambda m: generate(m, "a", steer="x"), TypeError,
     r"^steer must be a Steering or a list of Steering, got 'x'; e.g. steer=Steering\("),
    ("generate(m, 'a', steer=Steering(0, torch.ones(3)))", lambda m: generate(m, "a", steer=Steering(0, torch.ones(3))),
     ValueError, r"^generate: steer\[0\] \(layers 0\): a steering vector must have shape \(64,\)"),
    ("Steering(layers=0, vector=[1.0])", lambda m: Steering(layers=0, vector=[1.0]), TypeError,
     r"^Steering.vector must be a torch.Tensor of shape \(hidden,\), got list"),
    ("Steering(layers='0', vector=v)", lambda m: Steering(layers="0", vector=_v(m)), TypeError,
     r"^Steering.layers must be an int or a non-empty list of ints, got '0'"),
    ("Steering(..., factor='2')", lambda m: Steering(layers=0, vector=_v(m), factor="2"), TypeError,
     r"^Steering.factor must be a number"),
    ("activation_patching(..., batch_size='4')",
     lambda m: activation_patching(m, CLEAN, CORRUPTED, _metric, batch_size="4", progress=False), TypeError,
     r"^batch_size must be an int >= 1, got str '4'; e.g. batch_size=4\.$"),
    ("activation_patching(..., batch_size=0)",
     lambda m: activation_patching(m, CLEAN, CORRUPTED, _metric, batch_size=0, progress=False), ValueError,
     r"^batch_size must be an int >= 1, got 0\.$"),
    ("activation_patching(..., metric=None)",
     lambda m: activation_patching(m, CLEAN, CORRUPTED, None, progress=False), TypeError,
     r"^metric must be a function of the patched logits \(n, positions, vocab\) returning \(n,\), got NoneType"),
    ("activation_patching(..., layers=[])",
     lambda m: activation_patching(m, CLEAN, CORRUPTED, _metric, layers=[], progress=False), ValueError,
     r"^layers is empty: pass at least one layer \(or None for all; the model has 2 layers\)\.$"),
    ("activation_patching(..., positions=[])",
     lambda m: activation_patching(m, CLEAN, CORRUPTED, _metric, positions=[], progress=False), ValueError,
     r"^positions is empty: pass at least one position"),
    ("activation_patching(..., layers=True)",
     lambda m: activation_patching(m, CLEAN, CORRUPTED, _metric, layers=True, progress=False), TypeError,
     r"^layer must be an int, got bool True\.$"),
    ("activation_patching(..., layers='1')",
     lambda m: activation_patching(m, CLEAN, CORRUPTED, _metric, layers="1", progress=False), TypeError,
     r"^layer must be an int, got str '1'\.$"),
    ("attribution_patching(..., metric=None)", lambda m: attribution_patching(m, CLEAN, CORRUPTED, None), TypeError,
     r"^metric must be a function of the logits \(1, seq, vocab\) returning \(1,\)"),
    ("direct_logit_attribution(..., token=5.7)", lambda m: direct_logit_attribution(m, CLEAN, 5.7), TypeError,
     r"^token must be a token id \(int\) or a one-token string, got float 5.7; e.g. token=model.tokenizer"),
    ("direct_logit_attribution(..., token=None)", lambda m: direct_logit_attribution(m, CLEAN, None), TypeError,
     r"^token must be a token id \(int\) or a one-token string, got NoneType"),
    ("direct_logit_attribution(..., token=True)", lambda m: direct_logit_attribution(m, CLEAN, True), TypeError,
     r"^token must be a token id .* got bool True"),
    ("direct_logit_attribution(..., token=10**6)", lambda m: direct_logit_attribution(m, CLEAN, 10**6), IndexError,
     r"^token id 1000000 out of range \(vocab size 512\)\.$"),
    ("direct_logit_attribution(m, None, 5)", lambda m: direct_logit_attribution(m, None, 5), TypeError,
     r"^direct_logit_attribution takes one prompt string, got NoneType None; call it once per prompt\.$"),
    ("direct_logit_attribution(m, [a, b], 5)", lambda m: direct_logit_attribution(m, [CLEAN, "Hi"], 5), TypeError,
     r"^direct_logit_attribution takes one prompt string, got list"),
    ("direct_logit_attribution(..., position=1.5)",
     lambda m: direct_logit_attribution(m, CLEAN, 5, position=1.5), TypeError, r"^position must be an int, got float"),
    ("steer_all(..., positions=99)", lambda m: steer_all(m, CLEAN, {0: _v(m)}, positions=99), SteeringPositionError,
     r"^steer_all: position 99 is not a token of row 0, which has 5 tokens \(positions -5\.\.4\); pass positions"),
    ("steer_all(..., positions=-99)", lambda m: steer_all(m, CLEAN, {0: _v(m)}, positions=-99),
     SteeringPositionError, r"^steer_all: position -99 is not a token of row 0"),
    ("steer_all(..., positions=1.5)", lambda m: steer_all(m, CLEAN, {0: _v(m)}, positions=1.5), TypeError,
     r"^steer_all: positions must be None, an int, a list of ints or a slice, got float 1.5"),
    ("steer_all(..., batch_rows=5)", lambda m: steer_all(m, CLEAN, {0: _v(m)}, batch_rows=5),
     SteeringPositionError, r"^steer_all: batch_rows 5 is out of range: this forward has 1 row \(0\.\.0\)\.$"),
    ("steer_all(m, p, None)", lambda m: steer_all(m, CLEAN, None), TypeError,
     r"^steer_all: vectors must be a dict \{layer: vector of shape \(64,\)\}, got NoneType; e.g. steer_all\("),
    ("steer_all(m, p, [v])", lambda m: steer_all(m, CLEAN, [_v(m)]), TypeError,
     r"^steer_all: vectors must be a dict .* got list"),
    ("steer_all(m, p, {0: torch.ones(3)})", lambda m: steer_all(m, CLEAN, {0: torch.ones(3)}), ValueError,
     r"^steer_all: vectors\[0\]: a steering vector must have shape \(64,\) \(the model's hidden size\), got \(3,\)"),
    ("steer_all(m, p, {0: [1.0] * 64})", lambda m: steer_all(m, CLEAN, {0: [1.0] * 64}), TypeError,
     r"^steer_all: vectors\[0\]: a steering vector must be a torch.Tensor of shape \(64,\), got list"),
    ("steer_all(..., factor='2')", lambda m: steer_all(m, CLEAN, {0: _v(m)}, factor="2"), TypeError,
     r"^steer_all: factor must be a number \(int or float\), got str '2'\.$"),
    ("steer_all(m, p, {0: nan vector})", lambda m: steer_all(m, CLEAN, {0: _v(m) * float("nan")}),
     NonFiniteSteeringError, r"^steer_all: vectors\[0\]: the steering vector has 64 NaN / inf values \(of 64\), the "
     r"first nan at index 0; fix it .* or pass allow_nonfinite=True"),
    ("mean_difference_vector(..., layer=[0, 1])", lambda m: mean_difference_vector(m, ["a"], ["b"], [0, 1]),
     TypeError, r"^mean_difference_vector: layer must be an int, got list"),
    ("mean_difference_vector(m, [], ['b'], 0)", lambda m: mean_difference_vector(m, [], ["b"], 0), TypeError,
     r"^prompts must be a string or a non-empty list of strings, got an empty list"),
    ("patchscope_lens(..., layers=[])", lambda m: patchscope_lens(m, [CLEAN], layers=[]), ValueError,
     r"^layers is empty"),
    ("patchscope_lens(m, [], layers=[0])", lambda m: patchscope_lens(m, [], layers=[0]), TypeError,
     r"^source_prompts must be a string or a non-empty list of strings, got an empty list"),
    ("patchscope_lens(..., latents=[[...]])", lambda m: patchscope_lens(m, latents=[[0.0]], layers=[0]), TypeError,
     r"^latents must be a tensor \(1 layers, n_sources, 64\), got list"),
    ("patchscope_generate(m, None, ...)", lambda m: patchscope_generate(m, None, TargetPrompt("a ?", -1), 2),
     TypeError, r"^prompts must be a string or a non-empty list of strings, got NoneType"),
    ("patchscope_generate(..., max_length='3')",
     lambda m: patchscope_generate(m, [CLEAN], TargetPrompt("a ?", -1), "3"), TypeError,
     r"^max_length must be an int >= 1, got str '3'; e.g. max_length=3\.$"),
    ("patch_object_attn_lens(..., num_patches='1')", lambda m: patch_object_attn_lens(m, "a", "b c", 0, "1"),
     TypeError, r"^num_patches must be an int >= 1, got str '1'"),
    ("patch_object_attn_lens(..., attn_idx_patch=1.5)", lambda m: patch_object_attn_lens(m, "a", "b c", 1.5),
     TypeError, r"^attn_idx_patch must be an int, got float 1.5"),
    ("patch_object_attn_lens(m, 'a', [], 0)", lambda m: patch_object_attn_lens(m, "a", [], 0), TypeError,
     r"^target_prompts must be a string or a non-empty list of strings, got an empty list"),
    ("run_prompts(m, ['text'])", lambda m: run_prompts(m, ["The capital of France is"]), TypeError,
     r"^run_prompts takes a list of Prompt; prompts\[0\] is str .* wrap it, Prompt.from_strings"),
    ("run_prompts(m, None)", lambda m: run_prompts(m, None), TypeError, r"^run_prompts takes a list of Prompt, got "
     r"NoneType"),
    ("run_prompts(..., batch_size='4')",
     lambda m: run_prompts(m, [Prompt.from_strings(CLEAN, {"c": "Paris"}, m.tokenizer)], batch_size="4"), TypeError,
     r"^batch_size must be an int >= 1, got str '4'"),
]


@pytest.mark.parametrize("call,error,pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_argument_is_one_line_before_any_forward(model, forwards, call, error, pattern):
    with pytest.raises(error, match=pattern) as err:
        call(model)
    message = str(err.value)
    assert "\n" not in message and len(message) < 400, message
    assert isinstance(err.value, (TypeError, ValueError, IndexError))
    assert forwards[0] == 0, f"refused after {forwards[0]} forward(s)"


def test_the_checks_do_not_fire_on_correct_use(model, forwards):
    """Each function called right (with the same kinds of values the cases above get wrong) runs."""
    v = torch.ones(model.hidden_size)
    assert logit_lens(model, [CLEAN, "Hi"]).shape[:2] == (2, model.num_layers)
    out = generate(model, ["a b", "c"], max_new_tokens=2, steer=Steering(layers=[0, 1], vector=v))
    assert out.new_tokens.shape == (2, 2)
    effect = activation_patching(model, CLEAN, CORRUPTED, _metric, layers=[1], positions=[-1], batch_size=4,
                                 progress=False)
    assert effect.shape == (1, 1)
    assert attribution_patching(model, CLEAN, CORRUPTED, _metric, layers=[0]).shape == (1, 5)
    for token in (5, torch.tensor(5), " Paris"):
        dla = direct_logit_attribution(model, CLEAN, token, position=-1)
        assert torch.isclose(dla["embed"] + dla["layers"].sum() + dla["bias"], dla["logit"], atol=1e-4)
    assert direct_logit_attribution(model, [CLEAN], 5)["layers"].shape == (2 * model.num_layers,)
    assert steer_all(model, [CLEAN, "Hi"], {0: v, 1: -v}, factor=torch.tensor(2.0), positions=-1,
                     batch_rows=[1]).shape[0] == 2
    assert mean_difference_vector(model, ["a b"], ["c d"], 1).shape == (model.hidden_size,)
    assert patchscope_lens(model, [CLEAN], layers=[0]).shape == (1, 1, model.vocab_size)
    assert list(patchscope_generate(model, [CLEAN], TargetPrompt("a ?", -1), 2, layers=[1])) == [1]
    assert patch_object_attn_lens(model, "a", "b c", 1, 1).shape == (1, model.num_layers, model.vocab_size)
    assert run_prompts(model, [Prompt.from_strings(CLEAN, {"c": "Paris"}, model.tokenizer)], batch_size=4,
                       progress=False)["c"].shape == (1, 1)
    assert forwards[0] > 0
