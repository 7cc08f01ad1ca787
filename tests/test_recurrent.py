"""Recurrent, state-space and hybrid models: the residual stream, the token mixer and the analyses on them.

Oracles: HF's own ``output_hidden_states`` (the load-time check, under each family's convention), plain torch forward
hooks on the HF modules (independent of nnsight), and a by-hand patching loop with torch hooks.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from unilens import StandardizedTransformer
from unilens.analysis.lens import logit_lens
from unilens.analysis.patching import activation_patching
from unilens.arch.discovery import ArchitectureError
from unilens.model.validation import validate_model
from unilens.testing import tiny_model

RECURRENT = ("mamba", "mamba2", "falcon_mamba", "rwkv", "xlstm")
HYBRID = ("jamba", "qwen3_next", "nemotron_h")
TEXT = "the cat sat on the mat"


@pytest.fixture(scope="module")
def models():
    cache: dict[str, StandardizedTransformer] = {}

    def get(model_type: str) -> StandardizedTransformer:
        if model_type not in cache:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # transformers' "slow reference kernel" notices, nnsight's E_output
                cache[model_type] = StandardizedTransformer(*tiny_model(model_type))  # check=True: the load check
        return cache[model_type]

    return get


def _hf_hooked(model, paths: dict[str, str], text: str = TEXT) -> dict[str, torch.Tensor]:
    """Plain HF forward with torch forward hooks: path -> the module's output (first tensor of a tuple)."""
    hf = model.module_accessor.model
    seen: dict[str, torch.Tensor] = {}
    handles = [
        hf.get_submodule(path).register_forward_hook(
            lambda m, a, out, key=key: seen.__setitem__(key, (out[0] if isinstance(out, tuple) else out).clone()))
        for key, path in paths.items()
    ]
    try:
        with torch.no_grad():
            hf(**model.tokenizer(text, return_tensors="pt"))
    finally:
        for h in handles:
            h.remove()
    return seen


@pytest.mark.parametrize("model_type", RECURRENT + HYBRID)
def test_residual_stream_equals_hf_hidden_states(models, model_type):
    report = validate_model(models(model_type), raise_on_error=False)  # loading already ran it with raise_on_error
    assert report.ok, report.errors
    if model_type in ("mamba", "falcon_mamba", "rwkv"):  # HF's states start at the first layer's output
        assert "layers_input[0] vs input embeddings output" in report.errors
        assert "layers_output[1] vs hidden_states[1]" in report.errors


@pytest.mark.parametrize("model_type", RECURRENT + HYBRID)
def test_mixer_and_mlp_rebuild_the_layer_output(models, model_type):
    model = models(model_type)
    checked = 0
    for i, parts in enumerate(model.architecture.layers):
        if parts.mixer is None or (model_type == "rwkv" and i == 0):  # RWKV's block 0 norms its input first (pre_ln)
            continue
        names = [f"layers_input.{i}", f"mixers_output.{i}", f"layers_output.{i}"]
        names += [f"mlps_output.{i}"] if parts.mlp_out else []
        got = model.read(TEXT, names)
        rebuilt = got[names[0]] + got[names[1]] + (got[names[3]] if parts.mlp_out else 0)
        torch.testing.assert_close(rebuilt, got[names[2]], rtol=1e-5, atol=1e-5)
        checked += 1
    assert checked


@pytest.mark.parametrize("model_type", ("mamba", "rwkv", "xlstm", "jamba"))
def test_mixer_tensors_equal_torch_hooks_on_the_hf_modules(models, model_type):
    model = models(model_type)
    base = model.architecture.layers_path
    i = model.num_layers - 1
    parts = model.architecture.layers[i]
    paths = {"mixers_output": f"{base}.{i}.{parts.mixer_out}"}
    paths.update({"mlps_output": f"{base}.{i}.{parts.mlp_out}"} if parts.mlp_out else {})
    oracle = _hf_hooked(model, paths)
    got = model.read(TEXT, [f"{name}.{i}" for name in paths] + [f"mixers_projection_input.{i}"])
    for name in paths:
        torch.testing.assert_close(got[f"{name}.{i}"], oracle[name], rtol=0, atol=0)
    # the mixer's last hidden state (the gated SSM output on Mamba) goes through its output projection to its output
    projection = model.module_accessor.model.get_submodule(f"{base}.{i}.{parts.mixer_projection}")
    torch.testing.assert_close(projection(got[f"mixers_projection_input.{i}"]), oracle["mixers_output"],
                               rtol=1e-5, atol=1e-6)


def test_branches_with_a_gate_after_their_last_projection_keep_their_output(models):
    """RWKV's feed-forward returns sigmoid(r) * v and a shared-expert MoE returns routed + shared: neither adds the
    residual, so mlps_output stays the module's output (only Bloom-style modules that add an input move)."""
    for model_type in ("rwkv", "bailing_hybrid"):
        model = models(model_type)
        base, i = model.architecture.layers_path, model.num_layers - 1
        mlp = model.architecture.layers[i].mlp
        assert model.architecture.layers[i].mlp_out == mlp
        oracle = _hf_hooked(model, {"mlp": f"{base}.{i}.{mlp}"})
        torch.testing.assert_close(model.read(TEXT, [f"mlps_output.{i}"])[f"mlps_output.{i}"], oracle["mlp"],
                                   rtol=0, atol=0)


@pytest.mark.parametrize("model_type,layer", [("falcon_h1", 0), ("nemotron_h", 1)])
def test_layers_without_a_single_mixer_refuse_with_the_reason(models, model_type, layer):
    model = models(model_type)  # Falcon-H1: attention + Mamba summed in parallel; Nemotron-H layer 1: an MoE only
    with pytest.raises(ArchitectureError, match="no single token mixer"):
        with model.trace(TEXT):
            model.mixers_output[layer].save()


@pytest.mark.parametrize("model_type", ("mamba", "mamba2", "rwkv", "xlstm", "jamba"))
def test_logit_lens_runs_and_equals_the_unembedded_layer_outputs(models, model_type):
    model = models(model_type)
    probs = logit_lens(model, [TEXT])  # (batch, layers, vocab) at the last token
    hf = model.module_accessor.model
    base = model.architecture.layers_path
    outs = _hf_hooked(model, {i: f"{base}.{i}" for i in range(model.num_layers)})
    norm = hf.get_submodule(model.architecture.final_norm_path)
    with torch.no_grad():
        logits = torch.stack([hf.get_output_embeddings()(norm(outs[i][:, -1])) for i in range(model.num_layers)], 1)
        expected = model.module_accessor.model(**model.tokenizer(TEXT, return_tensors="pt")).logits[:, -1]
    cap = getattr(hf.config, "output_logit_soft_cap", None)  # xLSTM caps its logits
    if cap:
        logits = torch.tanh(logits / cap) * cap
    torch.testing.assert_close(probs, logits.softmax(-1), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(probs[:, -1], expected.softmax(-1), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("model_type", ("mamba", "mamba2", "rwkv", "xlstm", "jamba"))
def test_activation_patching_equals_a_loop_of_torch_hooks(models, model_type):
    model = models(model_type)
    clean, corrupted = "the cat sat on the mat", "the mat sat on the cat"  # same tokens, other order
    tok = model.tokenizer
    clean_ids, corrupted_ids = tok(clean, return_tensors="pt").input_ids, tok(corrupted, return_tensors="pt").input_ids
    assert clean_ids.shape == corrupted_ids.shape
    target = int(clean_ids[0, -1])

    def metric(logits):  # (n, seq, vocab) -> (n,)
        return logits[:, -1, target]

    got = activation_patching(model, clean, corrupted, metric, component="resid", progress=False)
    hf = model.module_accessor.model
    layers = hf.get_submodule(model.architecture.layers_path)
    clean_out = _hf_hooked(model, {i: f"{model.architecture.layers_path}.{i}" for i in range(len(layers))}, clean)
    expected = torch.zeros(len(layers), clean_ids.shape[1])
    for i, layer in enumerate(layers):
        for p in range(clean_ids.shape[1]):
            def patch(module, args, out, i=i, p=p):
                hidden = (out[0] if isinstance(out, tuple) else out).clone()
                hidden[:, p] = clean_out[i][:, p]
                return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

            handle = layer.register_forward_hook(patch)
            try:
                with torch.no_grad():
                    expected[i, p] = metric(hf(input_ids=corrupted_ids).logits)[0]
            finally:
                handle.remove()
    torch.testing.assert_close(got.float(), expected, rtol=1e-4, atol=1e-5)


def test_inputs_a_model_would_run_in_chunks_are_refused(models):
    """xLSTM runs an input longer than max_inference_chunksize chunk by chunk, every layer once per chunk: a read
    would silently hold the first chunk's rows only."""
    model = models("xlstm")
    limit = model.config.max_inference_chunksize
    try:
        model.config.max_inference_chunksize = 4
        with pytest.raises(ValueError, match="max_inference_chunksize to at least 6"):
            model.read(torch.tensor([[5, 6, 7, 8, 9, 10]]), ["layers_output.0"])
    finally:
        model.config.max_inference_chunksize = limit
    assert model.read(torch.tensor([[5, 6, 7, 8, 9, 10]]), ["layers_output.0"])["layers_output.0"].shape[1] == 6


def test_remote_load_check_on_a_recurrent_model():
    """Remote mode checks the residual stream against the server's hidden states under the same convention, and its
    reply (whose output holds a recurrent cache object) loads."""
    from unilens.model.loopback import Loopback
    from unilens.model.remote import validate_remote

    hf, tok = tiny_model("mamba")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = StandardizedTransformer(hf, tokenizer=tok, remote=Loopback(tiny_model("mamba")[0], tok))
    errors = validate_remote(model)
    assert "layers_output[1] vs hidden_states[1]" in errors and max(errors.values()) < 1e-5
