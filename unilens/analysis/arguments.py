"""Argument checks and encoding shared by the analysis modules: prompts to a trace's input dict, layer / position
lists checked against the model, the check of a metric's output.

The one module of ``unilens.analysis`` whose underscored helpers its siblings import: a helper two analysis modules
use lives here, not in either of them.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

__all__ = ["Metric", "Prompts", "check_metric"]

Prompts = str | Sequence[str]
Metric = Callable[[torch.Tensor], torch.Tensor]


def _encode(model, prompts: Prompts) -> dict[str, torch.Tensor]:
    """Tokenize ``prompts`` with the model's tokenizer (its padding side), as the dict a trace takes.

    Passing ``input_ids`` and ``attention_mask`` explicitly makes every function here see exactly the
    tokens the model sees (nnsight adds padding-aware ``position_ids`` from the mask).
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be a string or a non-empty list of strings.")
    enc = model.tokenizer(prompts, padding=True, return_tensors="pt")
    device = model.input_device
    return {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}


def _checked_indices(values: int | Sequence[int] | None, n: int, what: str, unit: str) -> list[int]:
    """Normalized (non-negative), range-checked indices in the order given; ``None`` means all ``n``."""
    if values is None:
        return list(range(n))
    if isinstance(values, int):
        values = [values]
    out = []
    for v in values:
        if not isinstance(v, int) or not -n <= v < n:
            raise IndexError(f"{what} {v!r} out of range: {unit.format(n=n)} (0..{n - 1}).")
        out.append(v % n)
    return out


def _layer_list(model, layers: int | Sequence[int] | None) -> list[int]:
    """Checked layer indices, in the order given, without duplicates."""
    out = _checked_indices(layers, model.num_layers, "layer", "the model has {n} layers")
    if len(set(out)) != len(out):
        raise ValueError(f"layers contains duplicates: {list(layers)}.")
    return out


def _position_list(positions: int | Sequence[int] | None, seq: int) -> list[int]:
    """Checked token positions of ``seq``-token prompts, in the order given (negative counts from the end)."""
    return _checked_indices(positions, seq, "position", "the prompts have {n} tokens")


def check_metric(values: torch.Tensor, n: int) -> torch.Tensor:
    """``values`` when it is the ``(n,)`` tensor a patching metric must return, else a clear error.

    Example:
        >>> check_metric(torch.zeros(3), 3).shape
        torch.Size([3])
    """
    if not isinstance(values, torch.Tensor) or values.shape != (n,):
        shape = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
        raise ValueError(f"metric must map logits (n, positions, vocab) to a tensor of shape (n,) = ({n},); "
                         f"got {shape}.")
    return values
