"""Tensor helpers every tier uses: the first element of a module output, each row's last real token, shape-checked
(and finite-checked) assignment, layer indices and input checks."""

from __future__ import annotations

from typing import Any

import torch


def _first(value: Any) -> torch.Tensor:
    """Module outputs are a tensor or a tuple whose first element is the tensor we standardize."""
    return value[0] if isinstance(value, (tuple, list)) else value


def _with_first(value: Any, first: torch.Tensor) -> Any:
    """A module output with its first element (``_first``) replaced by ``first``, of the output's own type: a
    namedtuple stays one (Reformer's layers return ``ReformerOutput``, read by field name), a tuple a tuple.

    Example:
        >>> from collections import namedtuple
        >>> Out = namedtuple("Out", ["hidden_states", "attn_output"])
        >>> _with_first(Out(1, 2), 5)
        Out(hidden_states=5, attn_output=2)
        >>> _with_first((1, 2), 5), _with_first(1, 5)
        ((5, 2), 5)
    """
    if hasattr(value, "_fields"):  # a namedtuple: its fields by name
        return value._replace(**{value._fields[0]: first})
    return (first, *value[1:]) if isinstance(value, tuple) else first


def last_real_positions(mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real (non-padding) token, ``(batch,)``, from an attention mask ``(batch, seq)``.

    Works for left and right padding.

    Example:
        >>> last_real_positions(torch.tensor([[0, 1, 1], [1, 1, 0]])).tolist()
        [2, 1]
    """
    seq = mask.shape[1]
    return seq - 1 - torch.flip(mask.to(torch.long), dims=[1]).argmax(dim=1)


def rows_position(mask: Any, position: int) -> torch.Tensor | None:
    """``(batch,)`` index of a negative ``position`` counted from each row's last real token on a right-padded batch
    (``-1``: the last real token); None where plain negative indexing already means that (left or no padding).

    Example:
        >>> rows_position(torch.tensor([[1, 1, 0], [1, 1, 1]]), -1).tolist()
        [1, 2]
    """
    if position >= 0 or not has_data(mask) or mask.dim() != 2 or bool(mask[:, -1].all()):
        return None
    return (last_real_positions(mask) + 1 + position).clamp(min=0)


def has_data(value: Any) -> bool:
    """Whether ``value`` is a tensor with values to read: False for meta tensors and for the fake tensors of
    ``model.scan`` (shapes only), where a check that reads values (``int(ids.max())``, ``bool(mask.all())``) would
    raise torch's ``GuardOnDataDependentSymNode``.

    Example:
        >>> has_data(torch.ones(2)), has_data(torch.ones(2, device="meta"))
        (True, False)
    """
    return (isinstance(value, torch.Tensor) and value.device.type != "meta"
            and getattr(value, "fake_mode", None) is None)


class NonFiniteValueError(ValueError):
    """A tensor with NaN / inf values was assigned into the forward (``model.allow_nonfinite = True`` allows it)."""


def check_finite(what: str, value: torch.Tensor, allow_nonfinite: bool = False) -> None:
    """Refuse a floating tensor with NaN / inf values about to be written into the forward (``what`` names it and
    where, e.g. ``"the tensor assigned to layers_output[3]"``): they would spread through every later layer without
    a word. One ``torch.isfinite(value).all()`` on that tensor; ``allow_nonfinite=True``
    (``model.allow_nonfinite = True``) writes them deliberately.

    Example:
        >>> check_finite("the tensor assigned to layers_output[3]", torch.ones(2))
        >>> check_finite("the tensor assigned to layers_output[3]", torch.tensor([1.0, float("nan")]))
        Traceback (most recent call last):
        ...
        unilens.core.tensors.NonFiniteValueError: the tensor assigned to layers_output[3] has NaN / inf values (1 of 2)...
    """
    if allow_nonfinite or not isinstance(value, torch.Tensor):
        return
    if not (value.is_floating_point() or value.is_complex()):
        return
    if not has_data(value):  # no values to check (scan, meta)
        return
    finite = torch.isfinite(value)
    if bool(finite.all()):
        return
    bad = int((~finite).sum())
    raise NonFiniteValueError(
        f"{what} has NaN / inf values ({bad} of {value.numel()}): they would spread through every later layer. Fix "
        "the tensor (e.g. torch.nan_to_num(t)), or set model.allow_nonfinite = True to write them deliberately."
    )


def _check_shape(name: str, new: Any, old: torch.Tensor, allow_nonfinite: bool = False) -> None:
    """Refuse assigning ``new`` where the model computes ``old``: another type, shape, dtype or device, or NaN / inf
    values (``check_finite``; ``allow_nonfinite`` writes them)."""
    if not isinstance(new, torch.Tensor):
        raise TypeError(f"{name} must be set to a torch.Tensor, got {type(new).__name__}.")
    if tuple(new.shape) != tuple(old.shape):
        raise ValueError(
            f"cannot set {name} to a tensor of shape {tuple(new.shape)}: the model computes shape "
            f"{tuple(old.shape)} there. Broadcast or index your tensor to that shape first."
        )
    if new.dtype != old.dtype:
        raise TypeError(
            f"cannot set {name} to a {new.dtype} tensor: the model computes {old.dtype} there. Cast it first, "
            f"e.g. value.to({old.dtype})."
        )
    if new.device != old.device:
        raise ValueError(
            f"cannot set {name} to a tensor on {new.device}: the model computes it on {old.device}. Move it first, "
            f"e.g. value.to('{old.device}')."
        )
    check_finite(f"the tensor assigned to {name}", new, allow_nonfinite)


def _has_negative(positions: Any) -> bool:
    if isinstance(positions, slice):
        return any(v is not None and v < 0 for v in (positions.start, positions.stop))
    if isinstance(positions, (list, tuple)):
        return any(isinstance(p, int) and p < 0 for p in positions)
    return False


def _check_ids_shape(ids: torch.Tensor) -> None:
    """Token ids are ``(batch, seq)`` or ``(seq,)``: more dimensions would run as a batch of batches (a 4-D output)."""
    if ids.dim() > 2:
        raise ValueError(f"input_ids must be (batch, seq) (or (seq,) for one prompt), got shape {tuple(ids.shape)}; "
                         "e.g. ids.reshape(-1, ids.shape[-1]) for a stack of batches.")


def _check_inputs(inputs: tuple) -> None:
    """One-line errors for inputs nnsight / the tokenizer would reject with a confusing message (or accept)."""
    for value in inputs:
        if isinstance(value, str):
            continue
        if isinstance(value, torch.Tensor):
            _check_ids_shape(value)
            continue  # token ids: checked against the vocabulary when the forward starts
        if isinstance(value, dict) or hasattr(value, "keys"):
            if "input_ids" not in value and "inputs_embeds" not in value:
                raise TypeError("the input is a mapping without input_ids: pass a tokenizer output, "
                                "e.g. model.tokenizer(texts, return_tensors='pt', padding=True).")
            if isinstance(value.get("input_ids"), torch.Tensor):
                _check_ids_shape(value["input_ids"])
            continue
        if isinstance(value, (list, tuple)) and value:
            if all(isinstance(v, str) for v in value):
                continue
            if all(isinstance(v, int) for v in value) or all(
                isinstance(v, (list, tuple)) and all(isinstance(t, int) for t in v) for v in value
            ):
                continue
        raise TypeError(
            "model.trace / generate / invoke take text (a string or a list of strings), token ids (a list of ints, a "
            "list of lists of ints or a LongTensor (batch, seq)) or a tokenizer output (a dict with input_ids); got "
            f"{type(value).__name__} {value!r:.60}."
        )


def layer_index(name: str, i: int, n: int) -> int:
    """``i`` (negative counts from the end) as a layer index of a model with ``n`` layers, or a clear error."""
    if not isinstance(i, int):
        raise TypeError(f"{name} takes an int layer index, got {type(i).__name__}.")
    if not -n <= i < n:
        raise IndexError(f"{name}[{i}]: layer index out of range, the model has {n} layers (0..{n - 1}).")
    return i % n


