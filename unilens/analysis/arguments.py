"""Argument checks and encoding shared by the analysis modules: prompts to a trace's input dict, layer / position
lists checked against the model, the check of a metric's output.

The one module of ``unilens.analysis`` whose underscored helpers its siblings import: a helper two analysis modules
use lives here, not in either of them.
"""

from __future__ import annotations

import numbers
import operator
from typing import Callable, Iterable, Sequence

import torch

__all__ = ["Metric", "Prompts", "check_metric"]

Prompts = str | Sequence[str]
Metric = Callable[[torch.Tensor], torch.Tensor]


def _prompt_list(prompts: Prompts, what: str = "prompts") -> list[str]:
    """``prompts`` as a non-empty list of strings, or a one-line error naming the argument ``what``."""
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, Iterable) and not isinstance(prompts, (bytes, dict, torch.Tensor)):
        prompts = list(prompts)  # a tuple, a generator, ...
    if not isinstance(prompts, list):
        raise TypeError(f"{what} must be a string or a non-empty list of strings, got {type(prompts).__name__} "
                        f"{prompts!r:.60}.")
    if not prompts:
        raise TypeError(f"{what} must be a string or a non-empty list of strings, got an empty "
                        f"{type(prompts).__name__}; pass at least one prompt.")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"{what} must be a string or a non-empty list of strings; {what}[{i}] is "
                            f"{type(p).__name__} {p!r:.60}.")
    return list(prompts)


def _encode(model, prompts: Prompts, what: str = "prompts") -> dict[str, torch.Tensor]:
    """Tokenize ``prompts`` with the model's tokenizer (its padding side), as the dict a trace takes.

    Passing ``input_ids`` and ``attention_mask`` explicitly makes every function here see exactly the
    tokens the model sees (nnsight adds padding-aware ``position_ids`` from the mask).
    """
    prompts = _prompt_list(prompts, what)
    enc = model.tokenizer(prompts, padding=True, return_tensors="pt")
    device = model.input_device
    return {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}


def _as_index(value: object, what: str) -> int:
    """An int (numpy / 0-d integer tensor too) for an index argument, or a ``TypeError`` naming ``what``."""
    if isinstance(value, bool) or isinstance(value, float) or (isinstance(value, torch.Tensor)
                                                                 and value.is_floating_point()):
        raise TypeError(f"{what} must be an int, got {type(value).__name__} {value!r}.")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{what} must be an int, got {type(value).__name__} {value!r:.60}.") from None


def _checked_indices(values: int | Sequence[int] | None, n: int, what: str, unit: str) -> list[int]:
    """Normalized (non-negative), range-checked indices in the order given; ``None`` means all ``n``. Not an int
    (or a list of them): ``TypeError``; an empty list: ``ValueError``; out of range: ``IndexError``."""
    if values is None:
        return list(range(n))
    if isinstance(values, (str, bytes, float, bool)) or not isinstance(values, Iterable) or (
            isinstance(values, torch.Tensor) and values.dim() == 0):
        values = [values]
    values = list(values)
    if not values:
        raise ValueError(f"{what}s is empty: pass at least one {what} (or None for all; {unit.format(n=n)}).")
    out = []
    for v in values:
        i = _as_index(v, what)
        if not -n <= i < n:
            raise IndexError(f"{what} {v!r} out of range: {unit.format(n=n)} (0..{n - 1}).")
        out.append(i % n)
    return out


def _layer_list(model, layers: int | Sequence[int] | None, allow_duplicates: bool = False) -> list[int]:
    """Checked layer indices, in the order given; a layer listed twice is refused unless ``allow_duplicates``
    (nnterp's interventions take ``layers=[0, n // 2, n - 1]``, which repeats a layer on a 2-layer model)."""
    out = _checked_indices(layers, model.num_layers, "layer", "the model has {n} layers")
    if not allow_duplicates and len(set(out)) != len(out):
        raise ValueError(f"layers contains duplicates: {list(layers)}.")
    return out


def _position_list(positions: int | Sequence[int] | None, seq: int) -> list[int]:
    """Checked token positions of ``seq``-token prompts, in the order given (negative counts from the end)."""
    return _checked_indices(positions, seq, "position", "the prompts have {n} tokens")


def _positive_int(value: object, what: str) -> int:
    """``value`` when it is an int >= 1, else a one-line error naming ``what``.

    Example:
        >>> _positive_int(4, "batch_size")
        4
    """
    try:
        if isinstance(value, (bool, float, str)) or (isinstance(value, torch.Tensor) and value.is_floating_point()):
            raise TypeError
        value = operator.index(value)  # an int, numpy integer or integer 0-d tensor
    except TypeError:
        raise TypeError(f"{what} must be an int >= 1, got {type(value).__name__} {value!r:.60}"
                        + (f"; e.g. {what}={int(value)}." if isinstance(value, str) and value.isdigit() else ".")
                        ) from None
    if value < 1:
        raise ValueError(f"{what} must be an int >= 1, got {value}.")
    return value


def _number(value: object, what: str) -> float:
    """``value`` when it is a real number (not a bool), else a ``TypeError`` naming ``what``."""
    if isinstance(value, bool) or not (isinstance(value, numbers.Real) or (
            isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex())):
        raise TypeError(f"{what} must be a number (int or float), got {type(value).__name__} {value!r:.60}.")
    return value


def _check_callable(value: object, what: str, shape: str) -> None:
    """A ``TypeError`` naming ``what`` unless ``value`` is callable (``shape``: what it must compute)."""
    if not callable(value):
        raise TypeError(f"{what} must be a function {shape}, got {type(value).__name__} {value!r:.60}.")


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
