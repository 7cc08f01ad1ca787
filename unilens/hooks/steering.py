"""Steering: adding a vector to the residual stream inside a trace. One mechanism for every caller
(``StandardizedTransformer.steer``, ``unilens.analysis.generation``'s ``Steering``, ``steer_all``): a mask says where
(which rows and positions of this forward), and one assignment of ``layers_output[layer]`` per layer adds it.

Nothing is steered silently wrong: a position that is not a real token of a steered row (beyond its start or end, or
a padding column) and a batch row outside the batch are refused (``SteeringPositionError``), naming the row and its
length; a steering vector or factor with NaN / inf is refused (``NonFiniteSteeringError``) unless
``allow_nonfinite=True``.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

import torch

from ..core.protocol import StandardizedModel
from ..core.tensors import NonFiniteValueError, _has_negative, has_data, last_real_positions

__all__ = [
    "NonFiniteSteeringError",
    "SteeringPositionError",
    "add_to_residual",
    "check_finite_steering",
    "check_steering_vector",
    "position_mask",
    "positions_in_batch",
    "real_token_mask",
]

Positions = int | Sequence[int] | slice | None


class SteeringPositionError(ValueError, IndexError):
    """A steering position that is not a real token of a steered row, or a batch row outside the batch.

    A ``ValueError`` (a bad argument) and an ``IndexError`` (what plain indexing raised before), so either catches it.
    """


class NonFiniteSteeringError(NonFiniteValueError):
    """A steering vector (or factor) with NaN / inf values; ``allow_nonfinite=True`` adds it deliberately."""


def check_steering_vector(vector: Any, hidden_size: int, where: str, factor: Any = 1.0,
                          allow_nonfinite: bool = False, streams: int = 1) -> None:
    """Refuse a steering ``vector`` that is not a ``(hidden_size,)`` tensor (leading dimensions, which broadcast
    over ``(batch, seq)``, are allowed), a ``factor`` that is not a real number,
    and (unless ``allow_nonfinite``) NaN / inf in either, naming ``where`` (e.g. ``"steer_all: vectors[3]"``) and the
    first bad index. Runs on concrete tensors, before any forward. ``streams``: the residual streams side by side in
    ``layers_output`` (``Architecture.residual_streams``, hyper-connections): the vector is then
    ``(streams * hidden_size,)``, one part per stream, as wide as what it is added to.

    Example:
        >>> check_steering_vector(torch.ones(4), 4, "steer: layer 0")
        >>> check_steering_vector(torch.tensor([1.0, float("nan"), 0.0, 0.0]), 4, "steer")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        unilens.hooks.steering.NonFiniteSteeringError: steer: the steering vector has 1 NaN / inf value (of 4), ...
        >>> check_steering_vector(torch.ones(4), 4, "steer", streams=2)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: steer: a steering vector must have shape (8,) (this model's residual stream: 2 streams of hidden ...
    """
    width = hidden_size * streams
    if not isinstance(vector, torch.Tensor):
        raise TypeError(f"{where}: a steering vector must be a torch.Tensor of shape ({width},), got "
                        f"{type(vector).__name__}; e.g. torch.tensor(values).")
    if tuple(vector.shape[-1:]) != (width,):  # (width,); leading dimensions broadcast over (batch, seq)
        size = ("the model's hidden size" if streams == 1 else
                f"this model's residual stream: {streams} streams of hidden size {hidden_size} side by side; "
                f"v.repeat({streams}) adds a ({hidden_size},) v to every stream")
        raise ValueError(f"{where}: a steering vector must have shape ({width},) ({size}), got {tuple(vector.shape)}.")
    if isinstance(factor, bool) or not (isinstance(factor, numbers.Real) or (
            isinstance(factor, torch.Tensor) and factor.numel() == 1 and not factor.is_complex())):
        raise TypeError(f"{where}: factor must be a number (int or float), got {type(factor).__name__} {factor!r:.40}.")
    if not allow_nonfinite:
        check_finite_steering(vector, factor, where)


def check_finite_steering(vector: torch.Tensor, factor: float, where: str) -> None:
    """Refuse NaN / inf in a steering ``vector`` (any shape) or its ``factor``, naming ``where`` and the first bad
    index (``NonFiniteSteeringError``; callers skip it under ``allow_nonfinite=True``).

    Example:
        >>> check_finite_steering(torch.ones(3), 2.0, "steer: layer 1")
        >>> check_finite_steering(torch.ones(3), float("inf"), "steer: layer 1")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        unilens.hooks.steering.NonFiniteSteeringError: steer: layer 1: factor is inf; pass a finite factor, ...
    """
    if isinstance(factor, torch.Tensor) and factor.numel() == 1 and factor.device.type != "meta":
        factor = float(factor)
    if isinstance(factor, numbers.Real) and not math.isfinite(factor):
        raise NonFiniteSteeringError(f"{where}: factor is {factor}; pass a finite factor, or allow_nonfinite=True to "
                                     "add it on purpose.")
    if not isinstance(vector, torch.Tensor) or not (vector.is_floating_point() or vector.is_complex()):
        return
    if vector.device.type == "meta" or getattr(vector, "fake_mode", None) is not None:  # no data (meta, scan)
        return
    finite = torch.isfinite(vector)
    if bool(finite.all()):
        return
    bad = (~finite).nonzero()
    first = tuple(bad[0].tolist())
    kind = "nan" if bool(torch.isnan(vector[first])) else str(float(vector[first].real))
    index = first[0] if len(first) == 1 else list(first)
    raise NonFiniteSteeringError(
        f"{where}: the steering vector has {len(bad)} NaN / inf value{'s' if len(bad) > 1 else ''} (of "
        f"{vector.numel()}), the first {kind} at index {index}; fix it (e.g. torch.nan_to_num(vector)) or pass "
        "allow_nonfinite=True to add it on purpose."
    )


def _as_positions(positions: Any, what: str) -> Positions:
    """``positions`` / ``batch_index`` as None, an int, a list of ints or a slice (a 0-d / 1-d integer tensor is
    converted), or a ``TypeError`` naming the argument."""
    if isinstance(positions, torch.Tensor) and not positions.is_floating_point() and positions.dim() <= 1:
        positions = positions.tolist()
    if positions is None or isinstance(positions, slice):
        return positions
    if isinstance(positions, int) and not isinstance(positions, bool):
        return positions
    if isinstance(positions, (list, tuple)) and all(isinstance(p, int) and not isinstance(p, bool)
                                                    for p in positions):
        return list(positions)
    raise TypeError(f"{what} must be None, an int, a list of ints or a slice, got "
                    f"{type(positions).__name__} {positions!r:.60}.")


def _describe(real: torch.Tensor, row: int, side: str) -> str:
    """``row 1, which has 2 tokens (columns 3..4 of 5, left-padded; -2..-1 from its last token)``."""
    cols = real.nonzero().flatten().tolist()
    width = real.shape[0]
    if not cols:
        return f"row {row}, which has no real token"
    if len(cols) == width:
        return f"row {row}, which has {width} token{'s' if width > 1 else ''} (positions -{width}..{width - 1})"
    return (f"row {row}, which has {len(cols)} token{'s' if len(cols) > 1 else ''} (columns {cols[0]}..{cols[-1]} of "
            f"{width}, {side}-padded; -{len(cols)}..-1 from its last token)")


def _ambiguous(caller: str) -> str:
    return (f"{caller}: negative positions in a list or slice are ambiguous on a right-padded batch (the rows end at "
            "different places); pass one negative int (counted from each row's last real token), non-negative "
            "positions, or pad on the left.")


def positions_in_batch(mask: torch.Tensor | None, shape: tuple[int, int], positions: Positions = None,
                       batch_index: Positions = None, caller: str = "steer",
                       batch_name: str = "batch_index") -> torch.Tensor:
    """The ``(batch, seq)`` boolean choice of ``positions`` in rows ``batch_index`` (None: all) of a forward of
    ``shape`` ``(batch, seq)`` whose real tokens ``mask`` marks (``(batch, >= seq)``: its last ``seq`` columns are
    this forward's; None: all real). A negative int counts from each row's last real token (``-1``: the last real
    token), whatever the padding side; a non-negative int or a list's entries index the padded columns. Every int
    position must be a real token of every steered row, and a slice must give each steered row at least one:
    otherwise ``SteeringPositionError`` names the row and its length (nothing is steered at padding or clamped).
    ``caller`` and ``batch_name`` name the function and its rows argument in the messages.

    Example:
        >>> mask = torch.tensor([[1, 1, 1], [0, 1, 1]])  # left padding: row 1 has 2 tokens
        >>> positions_in_batch(mask, (2, 3), -2).int().tolist()
        [[0, 1, 0], [0, 1, 0]]
        >>> positions_in_batch(mask, (2, 3), -3)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        unilens.hooks.steering.SteeringPositionError: steer: position -3 is not a token of row 1, which has 2 tokens ...
    """
    batch, seq = shape
    positions = _as_positions(positions, f"{caller}: positions")
    batch_index = _as_positions(batch_index, f"{caller}: {batch_name}")
    cached = ""
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[0] == batch and mask.shape[1] >= seq:
        real = mask[:, mask.shape[1] - seq:].to(torch.bool)
        if mask.shape[1] > seq:  # a generation step on a key/value cache: only its new positions are computed
            cached = f" (this generation step computes {seq} of the {mask.shape[1]} positions; the rest are cached)"
    else:  # no padding in this forward
        real = torch.ones(batch, seq, dtype=torch.bool)
    real = real.cpu()
    right_padded = not bool(real[:, -1].all()) if seq else False
    side = "right" if right_padded else "left"
    for b in [batch_index] if isinstance(batch_index, int) else batch_index if isinstance(batch_index, list) else []:
        if not -batch <= b < batch:
            raise SteeringPositionError(f"{caller}: {batch_name} {b} is out of range: this forward has {batch} row"
                                        f"{'s' if batch != 1 else ''} (0..{batch - 1}).")
    rows = torch.arange(batch)[slice(None) if batch_index is None else batch_index].reshape(-1).tolist()
    chosen = torch.zeros(batch, seq, dtype=torch.bool)
    if positions is None:
        chosen[rows] = True
        return chosen

    def refuse(position: Any, row: int, what: str = "is not a token of") -> None:
        raise SteeringPositionError(
            f"{caller}: position {position} {what} {_describe(real[row], row, side)}{cached}; pass positions "
            f"every steered row has, or select the rows with {batch_name}."
        )

    if isinstance(positions, slice):
        if right_padded and _has_negative(positions):
            raise ValueError(_ambiguous(caller))
        columns = torch.zeros(seq, dtype=torch.bool)
        columns[list(range(seq)[positions])] = True  # a negative step too
        for row in rows:
            if not bool((columns & real[row]).any()):
                span = f"{positions.start}:{positions.stop}" + (f":{positions.step}" if positions.step else "")
                refuse(f"slice {span}", row, "selects no token of")
        chosen[rows] = columns
        return chosen
    if isinstance(positions, int):
        last = last_real_positions(real.to(torch.long)) if right_padded else torch.full((batch,), seq - 1)
        for row in rows:
            column = positions if positions >= 0 else int(last[row]) + 1 + positions
            if not (0 <= column < seq and bool(real[row, column])):
                refuse(positions, row)
            chosen[row, column] = True
        return chosen
    if right_padded and _has_negative(positions):
        raise ValueError(_ambiguous(caller))
    for position in positions:
        if not -seq <= position < seq:
            refuse(position, rows[0] if rows else 0)
    columns = [p % seq for p in positions]
    try:  # as plain indexing does: a list of rows pairs up with the list of positions, anything else broadcasts
        chosen[slice(None) if batch_index is None else batch_index, columns] = True
    except IndexError:
        raise SteeringPositionError(
            f"{caller}: {batch_name} {batch_index} and positions {positions} pair up row by row (as in "
            f"tensor[{batch_name}, positions]) but have different lengths; give one position per row, or one row."
        ) from None
    padding = (chosen & ~real).nonzero()
    if len(padding):
        row, column = (int(i) for i in padding[0])
        refuse(positions[columns.index(column)], row)
    return chosen


def position_mask(model: StandardizedModel, out: torch.Tensor, positions: Positions = None,
                  batch_index: Positions = None) -> torch.Tensor:
    """``(batch, seq, 1)`` 0/1 mask (``out``'s dtype) of the rows ``batch_index`` and positions ``positions`` of a
    ``(batch, seq, hidden)`` tensor ``out`` of this forward (None: all). A negative int position counts from each
    row's last real token, whatever the padding side (``-1``: the last real token); negative positions in a list
    or slice are refused on a right-padded batch (the rows end at different places). A position that is not a real
    token of a steered row (out of range, or padding) is refused: ``positions_in_batch``.

    Example:
        >>> from unilens import StandardizedTransformer
        >>> from unilens.testing import tiny_model
        >>> model = StandardizedTransformer(*tiny_model("llama"), check=False)
        >>> with model.trace("The capital of France is"):
        ...     out = model.layers_output[0]
        ...     where = position_mask(model, out, positions=-1).save()
        >>> where[0, :, 0].tolist()[-2:]
        [0.0, 1.0]
    """
    mask = model.attention_mask  # this forward's mask (read after the layer output: nnsight's order)
    if not has_data(out):  # model.scan's fake tensors: shapes only, no positions to check or choose
        return out.new_ones(*out.shape[:2], 1)
    chosen = positions_in_batch(mask, tuple(out.shape[:2]), positions, batch_index)
    return chosen.to(out.device, out.dtype)[..., None]


def real_token_mask(model: StandardizedModel, out: torch.Tensor) -> torch.Tensor:
    """``(batch, seq, 1)`` 0/1 mask of the real (non-padding) tokens among the last ``seq`` positions of this
    forward: in a generation step the attention mask covers the prompt and every generated token so far, and
    ``out`` only the positions this step computes.

    Example:
        >>> from unilens import StandardizedTransformer
        >>> from unilens.testing import tiny_model
        >>> model = StandardizedTransformer(*tiny_model("llama"), check=False)
        >>> with model.trace(["The capital of France is", "Hi"]):
        ...     where = real_token_mask(model, model.layers_output[0]).save()
        >>> where[1, :, 0].sum().item() < where.shape[1]
        True
    """
    mask = model.attention_mask
    if mask is None:  # no padding in this batch
        return torch.ones(out.shape[:2], dtype=out.dtype, device=out.device)[..., None]
    return mask[:, -out.shape[1]:].to(out.device, out.dtype)[..., None]


def add_to_residual(model: StandardizedModel, layer: int, vectors: Sequence[tuple[float, torch.Tensor]],
                    where: Any = None, allow_nonfinite: bool = False) -> None:
    """Inside a trace: ``layers_output[layer] += where * sum(factor * vector)``, one assignment. Each ``vector`` is
    ``(hidden,)``, cast to the layer output's dtype and device before it is scaled; ``where(model, out)`` returns the
    ``(batch, seq, 1)`` mask (default: every position). A vector or factor with NaN / inf is refused
    (``NonFiniteSteeringError``, naming the layer and the index) unless ``allow_nonfinite=True``, which also lets the
    steered output through the assignment's own finite check.

    Example:
        >>> from unilens import StandardizedTransformer
        >>> from unilens.testing import tiny_model
        >>> model = StandardizedTransformer(*tiny_model("llama"), check=False)
        >>> with model.trace("The capital of France is"):
        ...     add_to_residual(model, 0, [(4.0, torch.ones(model.hidden_size))], real_token_mask)
        ...     logits = model.logits.save()
        >>> logits.shape[0]
        1
    """
    if not allow_nonfinite:
        for factor, vector in vectors:
            check_finite_steering(vector, factor, f"steer: layer {layer}")
    out = model.layers_output[layer]  # (batch, seq, hidden)
    delta = sum(factor * vector.to(out.device, out.dtype) for factor, vector in vectors)
    new = out + (delta if where is None else where(model, out) * delta)
    if not allow_nonfinite or model.__dict__.get("allow_nonfinite"):
        model.layers_output[layer] = new
        return
    model.__dict__["allow_nonfinite"] = True  # the caller asked for non-finite values: the assignment lets them in
    try:
        model.layers_output[layer] = new
    finally:
        del model.__dict__["allow_nonfinite"]
