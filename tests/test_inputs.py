"""Bad inputs and read-order traps: each either works or fails with a one-line error that names the problem and the
fix (never a raw torch / nnsight message, never a silently wrong number)."""

from __future__ import annotations

import pytest
import torch

from unilens import StandardizedTransformer
from unilens.hooks.reads import ReadOrderError
from unilens.testing import tiny_model

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def llama():
    return StandardizedTransformer(*tiny_model("llama"), check=False)


@pytest.fixture(scope="module")
def bloom():
    return StandardizedTransformer(*tiny_model("bloom"), check=False)


def _logits(model, inputs):
    with model.trace(inputs):
        logits = model.logits.save()
    return logits


@pytest.mark.parametrize("inputs,error,match", [
    (123, TypeError, r"take text \(a string or a list of strings\).*got int 123"),
    (None, TypeError, r"take text.*got NoneType"),
    ({"attention_mask": torch.ones(1, 2)}, TypeError, "mapping without input_ids"),
    ("", ValueError, r"the input is empty \(0 tokens\)"),
    (["The cat", ""], ValueError, r"row 1 of the batch is empty"),
    (torch.tensor([[5, 99999]]), ValueError, r"token id 99999 \(at row, position \[0, 1\]\) is outside the model's "
                                             r"vocabulary 0\.\.511"),
    (torch.tensor([[5, -1]]), ValueError, r"token id -1 .* outside the model's vocabulary"),
    (torch.tensor([[1.0, 2.0]]), TypeError, r"input_ids must be integer token ids \(torch.long\), got torch.float32"),
])  # fmt: skip
def test_bad_inputs_get_one_line_errors(llama, inputs, error, match):
    with pytest.raises(error, match=match):
        _logits(llama, inputs)


def test_good_inputs_still_work(llama):
    ids = llama.tokenizer(PROMPT)["input_ids"]
    expected = _logits(llama, PROMPT)
    for inputs in (ids, [ids], torch.tensor([ids]), llama.tokenizer(PROMPT, return_tensors="pt")):
        assert torch.equal(_logits(llama, inputs), expected)


def test_generate_checks_its_inputs(llama):
    with pytest.raises(TypeError, match=r"model.trace / generate / invoke take text"):
        with llama.generate(42, max_new_tokens=2):
            pass


def test_float64_assignment_names_the_cast(llama):
    with pytest.raises(TypeError, match=r"cannot set layers_output\[0\] to a torch.float64 tensor.*value.to"):
        with llama.trace(PROMPT):
            llama.layers_output[0] = llama.layers_output[0].double()


@pytest.mark.parametrize("side", ["left", "right"])
def test_steer_minus_one_is_each_rows_last_real_token(side):
    """With right padding, positions=-1 steers the shorter row's last real token, not its padding."""
    hf, tok = tiny_model("llama")
    model = StandardizedTransformer(hf, tokenizer=tok, check=False, tokenizer_kwargs={"padding_side": side})
    prompts = [PROMPT, "A cat"]
    enc = tok(prompts, padding=True, return_tensors="pt", padding_side=side)
    last = (enc["attention_mask"].cumsum(-1).argmax(-1))  # index of each row's last real token
    vector = torch.randn(model.hidden_size, generator=torch.Generator().manual_seed(0))
    with model.trace(dict(enc)):
        model.steer(layers=1, steering_vector=vector, factor=5.0, positions=-1)
        steered = model.layers_output[1].save()
    with model.trace(dict(enc)):
        plain = model.layers_output[1].save()
    delta = (steered - plain).norm(dim=-1)  # (batch, seq)
    for b in range(2):
        changed = (delta[b] > 1e-4).nonzero().flatten().tolist()
        assert changed == [int(last[b])], (side, b, changed, int(last[b]))
    with pytest.raises(ValueError, match="ambiguous on a right-padded batch") if side == "right" else _nothing():
        with model.trace(dict(enc)):
            model.steer(layers=1, steering_vector=vector, positions=[-2, -1])


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ------------------------------------------------------------------------------------------------------------
# Read-order traps
# ------------------------------------------------------------------------------------------------------------


def test_readme_order_trap_names_the_read_to_move(llama):
    with pytest.raises(ReadOrderError, match=r"attention_probabilities\[1\] was requested after layers_output\[1\], "
                                             r"but the forward computes it first: move the attention_probabilities"
                                             r"\[1\] line above the layers_output\[1\] line"):
        with llama.trace(PROMPT):
            llama.layers_output[1].save()
            llama.attention_probabilities[1].save()


def test_output_before_head_results_names_the_read_to_move(llama):
    with pytest.raises(ReadOrderError, match=r"move the attention_head_results\[1\] line above the "
                                             r"attentions_output\[1\] line"):
        with llama.trace(PROMPT):
            llama.attentions_output[1].save()
            llama.attention_head_results[1].save()


@pytest.mark.parametrize("second", ["attention_scores", "attention_probabilities"])
def test_bloom_attention_input_then_softmax_points_work(bloom, second):
    """The softmax route (Bloom's inline attention) now serves a request made after the module's input was read."""
    with bloom.trace(PROMPT):
        first = bloom.attentions_input[1].save()
        value = getattr(bloom, second)[1].save()
    alone = bloom.read(PROMPT, [f"{second}.1"])[f"{second}.1"]
    assert first.shape[-1] == bloom.hidden_size and torch.equal(value, alone)


def test_bloom_head_results_and_attention_output_conflict_is_explained(bloom):
    for pair in (("attention_head_results", "attentions_output"), ("attentions_output", "attention_head_results")):
        with pytest.raises(ValueError, match=r"cannot be read in one trace on this bloom model: its attention adds "
                                             r"the residual itself"):
            with bloom.trace(PROMPT):
                for name in pair:
                    getattr(bloom, name)[1].save()


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "bloom", "gptj", "falcon", "opt"])
def test_read_takes_any_order_in_one_forward(model_type):
    """model.read returns what separate traces return, whatever order the names come in."""
    model = StandardizedTransformer(*tiny_model(model_type), check=False)
    names = ["logits", "layers_output.1", "attention_probabilities.1", "mlps_output.0", "attentions_input.1",
             "attention_heads.0", "layers_input.0", "attentions_output.1"]
    acts = model.read(PROMPT, names)
    assert list(acts) == names
    for name in names:
        accessor, _, layer = name.partition(".")
        with model.trace(PROMPT):
            value = (getattr(model, accessor)[int(layer)] if layer else getattr(model, accessor)).save()
        # the attention reads make that forward run the hookable eager path, the lone trace may run sdpa: fp32
        # kernels summing in another order (1e-5, torch.testing's fp32 atol)
        torch.testing.assert_close(acts[name], value, atol=1e-5, rtol=0, msg=name)
