"""Attention in remote mode: ``attention_probabilities`` (and queries / keys / values, scores, heads, head results) read
from the deployment's own attention call, on the server, equal the local hookable path at every real token: through
the loopback server with an eager deployment (the probabilities are an output of the model's attention call) and an
sdpa one (recomputed on the server from that call's arguments), and through nnsight's ``remote="local"`` dry run."""

from __future__ import annotations

import functools

import nnsight
import pytest
import torch

from unilens import StandardizedTransformer
from unilens.core.names import RemoteUnsupportedError
from unilens.model.remote import Loopback, attention_plans
from unilens.testing import ZOO_REQUIRED, tiny_model

PROMPTS = ["The capital of France is", "Hi there"]  # two lengths: a padded batch
SITES = ("queries", "keys", "values", "scores", "probabilities", "heads", "head_results")
# The server runs its own kernel for the layer outputs (sdpa; eager in the model's own function), the local model
# the hookable eager path when attention is read: later layers see inputs that differ by float32 rounding, so the
# comparison allows float32 rounding growth over a few layers, not bit equality (layer-0 values are exact on sdpa).
ATOL = 1e-5


def _sites(plans: list, layers: list[int]) -> list[str]:
    """The attention names this model serves (locally and remotely): inline attention exposes no q / k / v."""
    inline = all(plans[i]["route"] == "softmax" for i in layers)
    return [s for s in SITES if not (inline and s in ("queries", "keys", "values"))]


def _read(model, sites: list[str], layers: list[int]) -> dict[str, torch.Tensor]:
    with torch.no_grad(), model.trace(PROMPTS):
        got = {}
        for i in layers:  # forward order: q / k / v, scores, probabilities inside the attention, then z, results
            for site in sites:
                got[f"{site}.{i}"] = getattr(model, f"attention_{site}")[i].save()
        got = nnsight.save(got)  # a remote request returns saved names only: the dict itself
    return {k: v.detach() for k, v in got.items()}


@functools.lru_cache(maxsize=4)
def _local(model_type: str):
    """The local reads (the oracle: the local hookable path, itself checked against HF) and what they cover."""
    hf, tok = tiny_model(model_type)
    local = StandardizedTransformer(hf, tokenizer=tok)
    layers = local.architecture.attention_layers
    sites = _sites(attention_plans(local, local.architecture, local.num_heads), layers)
    return tok, layers, sites, _read(local, sites, layers)


def _remote(model_type: str, deployment: str):
    hf, tok = tiny_model(model_type)
    if deployment == "sdpa" and not hf._supports_sdpa:  # transformers has no sdpa path for the class
        pytest.skip(f"{type(hf).__name__} runs eager attention only: no sdpa deployment of it exists")
    server = None if deployment == "local" else Loopback(hf, tok, attn_implementation=deployment)
    with pytest.warns(UserWarning, match="check=False"):  # the load check is tests/test_remote.py's
        if server is None:  # nnsight's dry run: serialized and run in this process against a loaded model
            return StandardizedTransformer(hf, tokenizer=tok, remote="local", check=False), None
        return StandardizedTransformer(hf.config, tokenizer=tok, remote=server, check=False), server


def _assert_close(want: dict, got: dict, tokenizer) -> None:
    """Equal at every real token: query rows of real tokens (every key column: padding keys get 0 on both sides),
    rows / positions of real tokens for z and head results; scores compared where finite (masked keys hold the
    model's masking constant on both sides)."""
    real = tokenizer(PROMPTS, return_tensors="pt", padding=True)["attention_mask"].bool()  # (batch, seq)
    assert want.keys() == got.keys()
    for key, a in want.items():
        b = got[key]
        assert a.shape == b.shape and a.dtype == b.dtype, (key, a.shape, b.shape)
        if key.startswith(("heads", "head_results")):  # (batch, seq, heads, d)
            a, b = a[real], b[real]
        else:  # (batch, heads, seq, d) -> real tokens
            a, b = a.transpose(1, 2)[real], b.transpose(1, 2)[real]
        if key.startswith("scores"):
            masked = a < torch.finfo(a.dtype).min / 2
            assert torch.equal(masked, b < torch.finfo(b.dtype).min / 2), key
            a, b = a[~masked], b[~masked]
        torch.testing.assert_close(b, a, rtol=0, atol=ATOL, msg=lambda m, key=key: f"{key}: {m}")


@pytest.mark.parametrize("deployment", ["eager", "sdpa", "local"])
@pytest.mark.parametrize("model_type", ZOO_REQUIRED)
def test_remote_attention_equals_local(model_type, deployment):
    tok, layers, sites, want = _local(model_type)
    remote, server = _remote(model_type, deployment)
    got = _read(remote, sites, layers)
    _assert_close(want, got, tok)
    probabilities = got[f"probabilities.{layers[0]}"]  # (batch, heads, query, key)
    assert probabilities.shape[1] == remote.num_heads
    if server is not None:
        assert server.requests == 1  # every layer's attention in one request
        assert not any(n.endswith("unilens_hooks") for n, _ in server.server._module.named_modules())


def test_eager_probabilities_are_the_deployments_own_output():
    """On an eager deployment the probabilities are what the model's attention function returned (HF's attention
    weights, read through nnsight's .source), not a recomputation."""
    hf, tok = tiny_model("llama")
    server = Loopback(hf, tok, attn_implementation="eager")
    with pytest.warns(UserWarning):
        remote = StandardizedTransformer(hf.config, tokenizer=tok, remote=server, check=False)
    with torch.no_grad(), remote.trace(PROMPTS):
        probs = remote.attention_probabilities[1].save()
        weights = remote.attentions[1].source.attention_interface_1.output[1].save()
    assert torch.equal(probs, weights)
    with torch.no_grad():  # HF's attention weights from a plain forward of the server's model, outside nnsight
        hf_weights = server.server._module(**tok(PROMPTS, return_tensors="pt", padding=True),
                                           output_attentions=True).attentions[1]
    real = tok(PROMPTS, return_tensors="pt", padding=True)["attention_mask"].bool()
    # at real query tokens; float32 rounding: the plain forward is another call of the same kernels
    torch.testing.assert_close(probs.detach().transpose(1, 2)[real], hf_weights.transpose(1, 2)[real], rtol=0,
                               atol=1e-6)


def test_attention_plans_name_the_call_that_computes_attention():
    model = StandardizedTransformer(*tiny_model("bloom"), check=False)  # softmax inline, no sdpa branch
    plans = attention_plans(model, model.architecture, model.num_heads)
    assert plans[0]["route"] == "softmax" and plans[0]["softmax"].startswith("F_softmax_")
    assert plans[0]["sdpa"] is None
    # Falcon computed softmax inline (or called sdpa) until transformers 5.25; now it calls the attention interface
    for model_type in ("llama", "falcon"):
        model = StandardizedTransformer(*tiny_model(model_type), check=False)
        plan = attention_plans(model, model.architecture, model.num_heads)[0]
        assert plan["route"] == "interface" and plan["call"] == "attention_interface_1"


def test_refused_with_the_reason():
    hf, tok = tiny_model("bloom")
    server = Loopback(hf, tok)
    with pytest.warns(UserWarning):
        remote = StandardizedTransformer(hf.config, tokenizer=tok, remote=server, check=False)
    with pytest.raises(RemoteUnsupportedError, match="attention_queries.*inline"):  # as locally: no q / k / v
        with remote.trace(PROMPTS):
            remote.attention_queries[0].save()
    with pytest.raises(RemoteUnsupportedError, match="cannot be assigned in remote mode"):
        with remote.trace(PROMPTS):
            remote.attention_scores[0] = remote.attention_scores[0] * 2
    with pytest.raises(ValueError, match="inside"):
        remote.attention_probabilities[0]
    # a deployment kernel unilens does not know the mask format of: refused on the server, with the reason
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register("custom_kernel", sdpa_attention_forward)
    AttentionMaskInterface.register("custom_kernel", sdpa_mask)
    llama, tok = tiny_model("llama")
    server = Loopback(llama, tok, attn_implementation="custom_kernel")
    with pytest.warns(UserWarning):
        remote = StandardizedTransformer(llama.config, tokenizer=tok, remote=server, check=False)
    with pytest.raises(RemoteUnsupportedError, match="runs 'custom_kernel' attention.*eager and sdpa"):
        with remote.trace(PROMPTS):
            remote.attention_scores[0].save()


@pytest.mark.slow
def test_smollm2_remote_attention_equals_local():
    from unilens import load_default
    from unilens.arch.loading import default_model_path, gguf_cache_dir

    local = load_default()
    folder = gguf_cache_dir(default_model_path())
    layers = [0, 14, 29]
    want = _read(local, ["probabilities"], layers)
    for deployment in ("eager", "sdpa"):
        server = Loopback(folder, dtype=torch.float32, attn_implementation=deployment)
        with pytest.warns(UserWarning):
            remote = StandardizedTransformer(folder, remote=server, check=False)
        _assert_close(want, _read(remote, ["probabilities"], layers), local.tokenizer)
