"""Steering: adding a vector to the residual stream (every layer / position) and building one from prompt pairs."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from ..hooks.steering import add_to_residual, check_steering_vector, position_mask, positions_in_batch
from .arguments import Prompts, _as_index, _encode, _layer_list, _number


def steer_all(
    model,
    prompts: Prompts,
    vectors: dict[int, torch.Tensor],
    factor: float = 1.0,
    positions: int | Sequence[int] | slice | None = None,
    batch_rows: int | Sequence[int] | slice | None = None,
    allow_nonfinite: bool = False,
) -> torch.Tensor:
    """Run ``prompts`` with ``factor * vectors[layer]`` added to ``layers_output[layer]`` for every layer given.

    ``positions`` / ``batch_rows`` restrict where the vectors are added (positions index the padded batch;
    with the default left padding, negative positions are the same tokens in every row). Returns the
    logits ``(batch, seq, vocab)``. Checked before the forward: ``vectors`` is ``{layer: (hidden,) tensor}``; every
    int position is a real token of every steered row (``SteeringPositionError`` names the row and its length);
    no NaN / inf in a vector or the factor (``NonFiniteSteeringError``) unless ``allow_nonfinite=True``.

    Example:
        >>> from unilens import StandardizedTransformer
        >>> from unilens.testing import tiny_model
        >>> model = StandardizedTransformer(*tiny_model("llama"))
        >>> v = torch.randn(model.hidden_size)
        >>> logits = steer_all(model, ["Hello there", "Hi"], {0: v, 1: -v}, factor=2.0)
        >>> logits.shape[0], logits.shape[-1] == model.vocab_size
        (2, True)
    """
    if not isinstance(vectors, Mapping):
        raise TypeError(f"steer_all: vectors must be a dict {{layer: vector of shape ({model.hidden_size},)}}, got "
                        f"{type(vectors).__name__}; e.g. steer_all(model, prompts, {{3: v}}).")
    _number(factor, "steer_all: factor")
    layers = _layer_list(model, list(vectors)) if vectors else []
    by_layer = dict(zip(layers, vectors.values()))
    for key, vector in vectors.items():
        check_steering_vector(vector, model.hidden_size, f"steer_all: vectors[{key}]", factor, allow_nonfinite,
                              streams=model.architecture.residual_streams)
    batch = _encode(model, prompts)
    # every row / position checked on this batch's mask before the forward (the trace checks it again per layer)
    positions_in_batch(batch["attention_mask"].cpu(), tuple(batch["input_ids"].shape), positions, batch_rows,
                       "steer_all", "batch_rows")

    def where(model, out: torch.Tensor) -> torch.Tensor:  # this forward's rows and positions
        return position_mask(model, out, positions, batch_rows)

    with torch.no_grad(), model.trace(batch):
        for layer in sorted(by_layer):
            add_to_residual(model, layer, [(factor, by_layer[layer])], where, allow_nonfinite=allow_nonfinite)
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
    (layer,) = _layer_list(model, _as_index(layer, "mean_difference_vector: layer"))

    def mean_last(prompts: Prompts) -> torch.Tensor:
        with torch.no_grad(), model.trace(_encode(model, prompts)):
            last = model._last_positions(model.layers_output[layer]).save()  # (batch, hidden)
        return last.mean(dim=0)

    return mean_last(positive_prompts) - mean_last(negative_prompts)
