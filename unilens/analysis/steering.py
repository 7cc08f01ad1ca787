"""Steering: adding a vector to the residual stream (every layer / position) and building one from prompt pairs."""

from __future__ import annotations

from typing import Sequence

import torch

from .arguments import Prompts, _encode, _layer_list


def steer_all(
    model,
    prompts: Prompts,
    vectors: dict[int, torch.Tensor],
    factor: float = 1.0,
    positions: int | Sequence[int] | slice | None = None,
    batch_rows: int | Sequence[int] | slice | None = None,
) -> torch.Tensor:
    """Run ``prompts`` with ``factor * vectors[layer]`` added to ``layers_output[layer]`` for every layer given.

    ``positions`` / ``batch_rows`` restrict where the vectors are added (positions index the padded batch;
    with the default left padding, negative positions are the same tokens in every row). Returns the
    logits ``(batch, seq, vocab)``.

    Example:
        >>> from unilens import StandardizedTransformer
        >>> from unilens.testing import tiny_model
        >>> model = StandardizedTransformer(*tiny_model("llama"))
        >>> v = torch.randn(model.hidden_size)
        >>> logits = steer_all(model, ["Hello there", "Hi"], {0: v, 1: -v}, factor=2.0)
        >>> logits.shape[0], logits.shape[-1] == model.vocab_size
        (2, True)
    """
    layers = _layer_list(model, list(vectors))
    by_layer = dict(zip(layers, vectors.values()))
    batch = _encode(model, prompts)
    with torch.no_grad(), model.trace(batch):
        for layer in sorted(by_layer):
            model.steer(layer, by_layer[layer], factor=factor, positions=positions, batch_index=batch_rows)
        logits = model.logits.save()
    return logits


def mean_difference_vector(model, positive_prompts: Prompts, negative_prompts: Prompts, layer: int) -> torch.Tensor:
    """Steering vector ``(hidden,)``: mean last-token ``layers_output[layer]`` of positive minus negative prompts.

    Example:
        >>> from unilens import StandardizedTransformer
        >>> from unilens.testing import tiny_model
        >>> model = StandardizedTransformer(*tiny_model("llama"))
        >>> v = mean_difference_vector(model, ["I love it", "Great"], ["I hate it", "Awful"], layer=1)
        >>> v.shape == (model.hidden_size,)
        True
    """
    (layer,) = _layer_list(model, layer)

    def mean_last(prompts: Prompts) -> torch.Tensor:
        with torch.no_grad(), model.trace(_encode(model, prompts)):
            last = model._last_positions(model.layers_output[layer]).save()  # (batch, hidden)
        return last.mean(dim=0)

    return mean_last(positive_prompts) - mean_last(negative_prompts)
