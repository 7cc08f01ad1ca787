"""Every entry of the catalogue of standardized names (unilens.core.names) is served, or refused by the catalogue's own
flag, everywhere names are used: ``model.read``, the activation store, remote mode (its support table and a request
to a loopback server) and the TransformerLens mapping. Adding a hook point is one catalogue entry plus the code that
computes it (docs/architecture.md, "Where to add"); this test is what makes the rest follow."""

from __future__ import annotations

import re

import pytest
import torch

from unilens import StandardizedTransformer
from unilens.compat.tl import PRE_NORM, resolve
from unilens.core.names import (
    ATTENTION,
    CATALOGUE,
    LAYER_NAMES,
    MODEL_NAMES,
    POINT,
    RemoteUnsupportedError,
    remote_refusal,
)
from unilens.hooks.points import UnsupportedHookPoint
from unilens.model.loopback import Loopback
from unilens.model.remote import REMOTE_TABLE_NAMES, remote_support
from unilens.scale.store import ActivationStore, CacheError, cache_activations
from unilens.testing import tiny_model

TEXTS = ["The cat sat on the mat", "Hello"]


@pytest.fixture(scope="module")
def models():
    """A rotary, gated-MLP model (llama), a learned-position, Conv1D model (gpt2) and a sparse mixture-of-experts
    model with a shared expert (qwen2_moe, for the routing names): together they have every name."""
    return {kind: StandardizedTransformer(*tiny_model(kind), check=False) for kind in ("llama", "gpt2", "qwen2_moe")}


def _rank(shape: str) -> int:
    return len(shape.strip("()").split(","))


def _read(model, name: str) -> torch.Tensor | None:
    key = f"{name}.1" if CATALOGUE[name].per_layer else name
    try:
        return model.read(TEXTS, [key])[key]
    except UnsupportedHookPoint:
        return None  # the model lacks it, with the reason (e.g. position_embeddings on a rotary model)


def test_catalogue_is_the_one_list_of_names():
    assert set(LAYER_NAMES) | set(MODEL_NAMES) == set(CATALOGUE)
    assert not set(LAYER_NAMES) & set(MODEL_NAMES)
    for entry in CATALOGUE.values():
        assert re.fullmatch(r"\((\w+(, )?)+\)", entry.shape), entry
        assert (entry.store is None) == (entry.not_stored is not None), entry.name  # a layout, or the reason not


@pytest.mark.parametrize("name", list(CATALOGUE))
def test_every_catalogue_entry_is_served_or_refused_everywhere(models, name, tmp_path):
    entry = CATALOGUE[name]
    # 1. model.read, on whichever of the two models has it, with the catalogue's number of dimensions
    values = {kind: _read(model, name) for kind, model in models.items()}
    assert any(v is not None for v in values.values()), f"{name}: no zoo model serves it"
    for value in values.values():
        if value is not None:
            assert value.dim() == _rank(entry.shape), (name, tuple(value.shape), entry.shape)
    kind = next(k for k, v in values.items() if v is not None)
    model = models[kind]
    # 2. the activation store: stored with its layout, or refused with the catalogue's reason
    key = f"{name}.*" if entry.per_layer else name
    if entry.store is not None:
        store = cache_activations(model, TEXTS, [key], tmp_path / "store", progress=False)
        stored = f"{name}.1" if entry.per_layer else name
        assert ActivationStore(tmp_path / "store")[stored].shape[0] > 0
    else:
        with pytest.raises(CacheError, match=re.escape(entry.not_stored[:40])):
            cache_activations(model, TEXTS, [key], tmp_path / "store", progress=False)
    # 3. remote mode: the support table's column says what the flag says, and a request does it
    support = remote_support(model)
    column = "hook_points" if entry.kind == POINT else name
    assert (column in REMOTE_TABLE_NAMES) == (entry.kind != POINT)
    assert support[column].startswith("refused") == (entry.remote is not None), (name, support[column])
    assert (remote_refusal(name) is None) == (entry.remote is None)
    # 4. the TransformerLens names map to it (hook_mlp_in reads the residual the MLP branch reads, normalized)
    for tl_name, layout in entry.tl:
        full = f"blocks.1.{tl_name}" if entry.per_layer else tl_name
        info = resolve(model, full)
        if layout == PRE_NORM:
            assert info.layout == PRE_NORM and info.accessor == name, (full, info)
        else:
            assert info.location == ((name, 1) if entry.per_layer else (name, None)), (full, info.location)


def test_remote_requests_follow_the_catalogue_flag():
    hf, tok = tiny_model("llama")
    remote = StandardizedTransformer(hf.config, tokenizer=tok, remote=Loopback(tiny_model("llama")[0], tok),
                                     check=False)
    local = StandardizedTransformer(hf, tokenizer=tok, check=False)
    for name, entry in CATALOGUE.items():
        key = f"{name}.1" if entry.per_layer else name
        if entry.remote is not None:
            with pytest.raises(RemoteUnsupportedError, match=re.escape(name)):
                remote.read("The cat sat", [key])
        elif entry.kind == ATTENTION:
            # read from the deployment's own attention call inside a trace; model.read by name refuses, saying so.
            # Not bitwise: the deployment's kernel computes the layers below, the local hookable path recomputes
            with pytest.raises(RemoteUnsupportedError, match="inside a trace"):
                remote.read("The cat sat", [key])
            with remote.trace("The cat sat"):
                got = getattr(remote, name)[1].save()
            with local.trace("The cat sat"):
                want = getattr(local, name)[1].save()
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        elif name != "position_embeddings":  # llama has none (refused locally too, with the reason)
            got, want = remote.read("The cat sat", [key])[key], local.read("The cat sat", [key])[key]
            torch.testing.assert_close(got, want, rtol=0, atol=0)
