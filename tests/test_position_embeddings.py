"""``position_embeddings`` (TL ``hook_pos_embed``): found by data flow on models with learned absolute positions,
checked against plain torch forward hooks on the HF position-embedding module (reads and edits), refused with one
sentence on every model without one (rotary / ALiBi)."""

from __future__ import annotations

import pytest
import torch

from unilens import StandardizedTransformer
from unilens.arch.discovery import NO_POSITION_EMBEDDING, discover, probe_dataflow
from unilens.compat.tl import (
    TLNameError,
    hook_names,
    resolve,
    run_with_cache,
    run_with_hooks,
    to_tokens,
)
from unilens.hooks.points import UnsupportedHookPoint
from unilens.hooks.reads import forward_order
from unilens.testing import ZOO_REQUIRED, tiny_model

PROMPTS = ["The capital of France is", "Hi there"]  # two lengths: a padded batch (OPT's positions follow the mask)
# From the transformers source: GPT-2 adds ``wpe(position_ids)``, OPT ``embed_positions(attention_mask)``; every
# other ZOO_REQUIRED type is rotary (or ALiBi: Bloom), so has no position tensor.
LEARNED = {"gpt2": lambda hf: hf.transformer.wpe, "opt": lambda hf: hf.model.decoder.embed_positions}


def _hf_forward(hf, batch, replace=None):
    """Plain HF forward with a torch hook on the position-embedding module: (its output, logits); ``replace``
    (output -> new output) edits it."""
    seen = []

    def hook(module, args, out):
        seen.append(out.detach().clone())
        return None if replace is None else replace(out)

    handle = LEARNED[hf.config.model_type](hf).register_forward_hook(hook)
    try:
        with torch.no_grad():
            logits = hf(**batch).logits
    finally:
        handle.remove()
    assert len(seen) == 1
    return seen[0], logits


def _batch(model):
    """The padded batch with explicit positions (each row counted from its first real token), so the trace and the
    plain HF forward get the same inputs (nnsight would add mask-derived ``position_ids`` itself; HF would not)."""
    batch = dict(model.tokenizer(PROMPTS, return_tensors="pt", padding=True))
    batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # (batch, seq)
    return batch


@pytest.mark.parametrize("model_type", ZOO_REQUIRED)
def test_found_exactly_on_learned_position_models(model_type):
    hf, _ = tiny_model(model_type)
    arch = discover(hf)
    probe_dataflow(hf, arch)
    if model_type in LEARNED:
        assert hf.get_submodule(arch.position_embed_path) is LEARNED[model_type](hf)
    else:
        assert arch.position_embed_path is None


@pytest.mark.parametrize("model_type", sorted(LEARNED))
def test_value_equals_torch_hook(model_type):
    hf, tok = tiny_model(model_type)
    model = StandardizedTransformer(hf, tokenizer=tok)
    batch = _batch(model)
    with torch.no_grad(), model.trace(batch):
        pos = model.position_embeddings.save()  # (batch, seq, hidden)
    oracle, _ = _hf_forward(hf, batch)  # (batch or 1, seq, hidden)
    assert pos.shape == (2, batch["input_ids"].shape[1], model.hidden_size)
    assert torch.equal(pos, oracle.expand_as(pos))
    assert not torch.equal(pos[0], pos[1])  # left padding: the rows' positions differ (per-row values)
    # one-forward reads in any order (model.read follows the recorded forward order)
    got = model.read(batch, ["layers_input.0", "position_embeddings", "token_embeddings"])
    assert torch.equal(got["position_embeddings"], pos)


@pytest.mark.parametrize("model_type", sorted(LEARNED))
def test_forward_order_is_recorded_before_layer_0(model_type):
    model = StandardizedTransformer(*tiny_model(model_type), check=False)
    order = forward_order(model)
    assert ("position_embeddings", None) in order
    assert order[("position_embeddings", None)] != order[("token_embeddings", None)]
    assert order[("position_embeddings", None)] < order[("layers_input", 0)]


@pytest.mark.parametrize("model_type", sorted(LEARNED))
def test_edits_equal_the_same_edit_with_a_torch_hook(model_type):
    hf, tok = tiny_model(model_type)
    model = StandardizedTransformer(hf, tokenizer=tok)
    batch = _batch(model)
    seq = batch["input_ids"].shape[1]
    new = torch.randn(2, seq, model.hidden_size, generator=torch.Generator().manual_seed(0))  # one row per prompt
    _, clean = _hf_forward(hf, batch)
    for edit in (torch.zeros_like(new), new):
        with torch.no_grad(), model.trace(batch):
            model.position_embeddings = edit
            logits = model.logits.save()
        _, expected = _hf_forward(hf, batch, replace=lambda out, edit=edit: edit.to(out.dtype))
        assert torch.allclose(logits, expected, atol=1e-5), float((logits - expected).abs().max())
        assert not torch.allclose(logits, clean, atol=1e-3)  # the edit reached the logits
    # the same through model.read's edits
    got = model.read(batch, ["logits"], edits={("position_embeddings", None): lambda t: t * 0})
    _, expected = _hf_forward(hf, batch, replace=torch.zeros_like)
    assert torch.allclose(got["logits"], expected, atol=1e-5)


def test_bad_edit_shape_is_refused():
    model = StandardizedTransformer(*tiny_model("gpt2"), check=False)
    with pytest.raises(ValueError, match="cannot set position_embeddings to a tensor of shape"):
        with model.trace(PROMPTS):
            model.position_embeddings = torch.zeros(3, 1, model.hidden_size)


@pytest.mark.parametrize("model_type", ["llama", "bloom"])
def test_refused_with_one_sentence_without_learned_positions(model_type):
    model = StandardizedTransformer(*tiny_model(model_type), check=False)
    with pytest.raises(UnsupportedHookPoint) as err:
        model.read(PROMPTS, ["position_embeddings"])
    assert str(err.value) == (f"position_embeddings is not available on this {model_type} model: "
                              f"{NO_POSITION_EMBEDDING}")
    with pytest.raises(UnsupportedHookPoint, match="no learned absolute position embedding"):
        with model.trace(PROMPTS):
            model.position_embeddings.save()
    with pytest.raises(TLNameError) as tl_err:
        resolve(model, "hook_pos_embed")
    assert NO_POSITION_EMBEDDING in str(tl_err.value)
    assert "hook_pos_embed" not in hook_names(model)


@pytest.mark.parametrize("model_type", sorted(LEARNED))
def test_tl_hook_pos_embed(model_type):
    hf, tok = tiny_model(model_type)
    model = StandardizedTransformer(hf, tokenizer=tok)
    assert hook_names(model)[:2] == ["hook_embed", "hook_pos_embed"]
    tokens = to_tokens(model, "The capital of France is")  # (1, seq)
    _, cache = run_with_cache(model, tokens, names_filter="hook_pos_embed")
    oracle, _ = _hf_forward(hf, {"input_ids": tokens})
    assert torch.equal(cache["hook_pos_embed"], oracle)
    logits = run_with_hooks(model, tokens, fwd_hooks=[("hook_pos_embed", lambda t, hook: torch.zeros_like(t))])
    _, expected = _hf_forward(hf, {"input_ids": tokens}, replace=torch.zeros_like)
    assert torch.allclose(logits, expected, atol=1e-5)


def test_one_row_for_the_batch_is_expanded_and_per_row_edits_apply():
    """GPT-2 without padding embeds positions once for the batch ``(1, seq, hidden)``: the accessor gives it per row
    (TL's shape), and a per-row edit reaches each row as a torch hook returning the same tensor does."""
    hf, tok = tiny_model("gpt2")
    model = StandardizedTransformer(hf, tokenizer=tok)
    batch = {"input_ids": torch.tensor([[3, 4, 5, 6], [7, 8, 9, 10]]),
             "attention_mask": torch.ones(2, 4, dtype=torch.long)}
    oracle, clean = _hf_forward(hf, batch)
    assert oracle.shape[0] == 1  # the case this test is about
    with torch.no_grad(), model.trace(batch):
        pos = model.position_embeddings.save()
    assert pos.shape == (2, 4, model.hidden_size) and torch.equal(pos, oracle.expand_as(pos))
    new = torch.randn(2, 4, model.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), model.trace(batch):
        model.position_embeddings = new
        logits = model.logits.save()
    _, expected = _hf_forward(hf, batch, replace=lambda out: new)
    assert torch.allclose(logits, expected, atol=1e-5) and not torch.allclose(logits, clean, atol=1e-3)
    with torch.no_grad(), model.trace(batch):  # the model's own shape is accepted as well
        model.position_embeddings = torch.zeros(1, 4, model.hidden_size)
        zeroed = model.logits.save()
    _, expected = _hf_forward(hf, batch, replace=torch.zeros_like)
    assert torch.allclose(zeroed, expected, atol=1e-5)


def test_probe_keeps_only_a_table_added_before_layer_0():
    """An embedding table the forward never adds to the residual stream is not taken for the position embedding."""
    from torch import nn

    from unilens.arch.discovery import probe_position_embedding

    hf, _ = tiny_model("gpt2")
    hidden = hf.config.n_embd
    hf.transformer.unused_table = nn.Embedding(16, hidden)  # a candidate by structure, never called
    hf.lm_head_extra = nn.Embedding(16, hidden)
    arch = discover(hf)
    assert probe_position_embedding(hf, arch) == "transformer.wpe"
    hf.transformer.wpe.register_forward_hook(lambda m, a, out: out * 0)  # the model stops using its positions
    # wpe's output no longer depends on the position: nothing qualifies
    assert probe_position_embedding(hf, arch) is None and arch.position_embed_path is None
