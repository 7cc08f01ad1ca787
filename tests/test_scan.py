"""nnsight's ``model.scan`` (a forward on fake tensors: shapes only) on a unilens model gives the shapes nnsight's own
``TransformersModel.scan`` gives, and unilens builds on ``TransformersModel`` (not the deprecated ``LanguageModel``)
without any nnsight deprecation warning."""

from __future__ import annotations

import subprocess
import sys
import warnings

import nnsight
import pytest
import torch
from nnsight import TransformersModel

from unilens import StandardizedTransformer
from unilens.hooks.reads import ReadOrderError
from unilens.testing import tiny_model

PROMPTS = ["The capital of France is", "Hi"]  # two lengths: a padded batch


def _plain(model_type: str) -> TransformersModel:
    hf, tok = tiny_model(model_type)
    return TransformersModel(hf, tokenizer=tok, task="text-generation")


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "falcon"])
@pytest.mark.parametrize("prompts", [PROMPTS[0], PROMPTS], ids=["one", "padded"])
def test_scan_shapes_equal_nnsight_transformers_model(model_type, prompts):
    model = StandardizedTransformer(*tiny_model(model_type))
    plain = _plain(model_type)
    arch = model.architecture
    layer, attention = arch.layers_path, f"{arch.layers_path}.0.{arch.layers[0].attention}"
    with plain.scan(prompts):
        want_attention = model_envoy(plain, attention).input.save()
        want_layer = model_envoy(plain, f"{layer}.1").output.save()
        want_logits = plain.output.logits.save()
    with model.scan(prompts):
        attention_input = model.attentions_input[0].save()
        probabilities = model.attention_probabilities[0].save()
        layer_output = model.layers_output[1].save()
        logits = model.logits.save()
        next_token = model.next_token_probs.save()
    want_layer = want_layer[0] if isinstance(want_layer, tuple) else want_layer
    assert layer_output.shape == want_layer.shape
    assert attention_input.shape == want_attention.shape
    assert logits.shape == want_logits.shape
    batch, seq = want_logits.shape[:2]
    assert probabilities.shape == (batch, model.num_heads, seq, seq)
    assert next_token.shape == (batch, model.vocab_size)
    # the forward ran on fake tensors: nothing was computed
    assert isinstance(layer_output, torch._subclasses.fake_tensor.FakeTensor)


def model_envoy(model, path: str):
    envoy = model
    for part in path.split("."):
        envoy = envoy[int(part)] if part.isdigit() else getattr(envoy, part)
    return envoy


def test_scan_takes_interventions_and_explains_read_order():
    model = StandardizedTransformer(*tiny_model("llama"))
    with model.scan(PROMPTS):
        model.steer(layers=0, steering_vector=torch.ones(model.hidden_size), token_positions=-1)
        logits = model.logits.save()
    assert logits.shape[0] == 2
    with pytest.raises(ReadOrderError, match="attentions_input"), model.scan(PROMPTS):
        model.layers_output[0].save()
        model.attentions_input[0].save()
    # the scan left nothing behind: a real trace afterwards computes values
    with model.trace(PROMPTS):
        out = model.layers_output[0].save()
    assert not isinstance(out, torch._subclasses.fake_tensor.FakeTensor) and torch.isfinite(out).all()


def test_a_transformers_model_with_no_deprecation_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = StandardizedTransformer(*tiny_model("gpt2"))
        with model.generate("The cat", max_new_tokens=2) as tracer:
            ids = tracer.result.save()
    assert isinstance(model, TransformersModel) and ids.shape[-1] > 2
    assert not [w for w in caught if issubclass(w.category, nnsight.NNsightDeprecationWarning)]
    assert model._remoteable_class() is TransformersModel  # the key NDIF deployments are known by


def test_import_and_load_raise_no_nnsight_deprecation_warning():
    """In a fresh process (the import is cached in this one), with nnsight's deprecation warnings as errors."""
    code = ("import warnings, nnsight; warnings.simplefilter('error', nnsight.NNsightDeprecationWarning)\n"
            "import unilens\nfrom unilens.testing import tiny_model\n"
            "unilens.StandardizedTransformer(*tiny_model('llama'))\nprint('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
