"""Generation-time capture in unilens.cache: activations of generated tokens read step by step during `generate` (KV
cache on) equal a plain HF forward recomputed over the generated text, within float32 rounding."""

from __future__ import annotations

import pytest
import torch

from unilens import ActivationStore, StandardizedTransformer, cache_activations
from unilens.scale.store import CacheError
from unilens.testing import tiny_model

TEXTS = ["The cat sat", "Hello there my friend", "A"]


@pytest.fixture(scope="module")
def model():
    hf, tok = tiny_model("llama", num_hidden_layers=3)
    return StandardizedTransformer(hf, tokenizer=tok)


def _layer_outputs(hf, ids: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Oracle: plain torch forward hooks on HF's decoder layers, one unpadded forward of ``ids`` (seq,)."""
    outs: list[torch.Tensor] = []
    hooks = [layer.register_forward_hook(lambda _m, _a, o: outs.append((o[0] if isinstance(o, tuple) else o)[0]))
             for layer in hf.model.layers]  # fmt: skip
    try:
        with torch.no_grad():
            logits = hf(ids[None]).logits[0]  # (seq, vocab)
    finally:
        for h in hooks:
            h.remove()
    return outs, logits  # [(seq, hidden)] per layer


def test_generated_rows_equal_a_recomputed_forward(model, tmp_path):
    hf, tok = model.module_accessor.model, model.tokenizer
    n_new = 5
    store = cache_activations(model, TEXTS, ["layers_output.*", "attention_queries.1", "logits"], tmp_path / "gen",
                              generate_tokens=n_new, progress=False)  # fmt: skip
    assert store.manifest["args"]["generate_tokens"] == n_new
    plain = cache_activations(model, TEXTS, ["attention_queries.1"], tmp_path / "plain", progress=False)
    for i, text in enumerate(TEXTS):
        rows = store["text_index"] == i
        ids = store["token_ids"][rows]  # (prompt + generated, )
        prompt = tok(text).input_ids
        assert ids[: len(prompt)].tolist() == prompt
        assert store["position"][rows].tolist() == list(range(len(ids)))
        layers, logits = _layer_outputs(hf, ids)
        # HF's own greedy continuation: each generated token is the argmax after the tokens before it
        assert ids[len(prompt) :].tolist() == logits[len(prompt) - 1 : -1].argmax(-1).tolist()
        # up to n_new generated tokens have rows (fewer only if the model ended the text)
        assert len(prompt) < len(ids) <= len(prompt) + n_new
        # One query against cached keys vs the full causal matrix: the same math with sums in another order, so
        # float32 rounding only (observed <= 3e-7 on values of magnitude ~0.1 - 0.6); a wrong position or a
        # missing step would differ by O(0.1).
        for layer, expected in enumerate(layers):
            torch.testing.assert_close(store[f"layers_output.{layer}"][rows], expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(store["logits"][rows], logits, rtol=1e-5, atol=1e-6)
        # the prompt's rows are a plain forward's rows (the other path of the cache, checked in test_cache.py)
        torch.testing.assert_close(store["attention_queries.1"][rows][: len(prompt)],
                                   plain["attention_queries.1"][plain["text_index"] == i], rtol=1e-5, atol=1e-6)
    assert len(ActivationStore(tmp_path / "gen")) == int(store["token_ids"].shape[0])


def test_generation_refuses_attention_probabilities(model, tmp_path):
    with pytest.raises(CacheError, match="grows by one per step"):
        cache_activations(model, TEXTS, ["attention_probabilities.0"], tmp_path, generate_tokens=2, progress=False)
    with pytest.raises(CacheError, match="generate_tokens must be an int"):
        cache_activations(model, TEXTS, ["layers_output.0"], tmp_path, generate_tokens=-1, progress=False)
