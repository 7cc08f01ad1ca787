"""Steering: adding a vector to the residual stream inside a trace. One mechanism for every caller
(``StandardizedTransformer.steer``, ``unilens.analysis.generation``'s ``Steering``, ``steer_all``): a mask says where
(which rows and positions of this forward), and one assignment of ``layers_output[layer]`` per layer adds it.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..core.protocol import StandardizedModel
from ..core.tensors import _has_negative, rows_position

__all__ = ["add_to_residual", "position_mask", "real_token_mask"]

Positions = int | Sequence[int] | slice | None


def position_mask(model: StandardizedModel, out: torch.Tensor, positions: Positions = None,
                  batch_index: Positions = None) -> torch.Tensor:
    """``(batch, seq, 1)`` 0/1 mask (``out``'s dtype) of the rows ``batch_index`` and positions ``positions`` of a
    ``(batch, seq, hidden)`` tensor ``out`` of this forward (None: all). A negative int position counts from each
    row's last real token, whatever the padding side (``-1``: the last real token); negative positions in a list
    or slice are refused on a right-padded batch (the rows end at different places).

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
    rows = slice(None) if batch_index is None else batch_index
    mask = model.attention_mask  # this forward's mask (read after the layer output: nnsight's order)
    right_padded = isinstance(mask, torch.Tensor) and mask.dim() == 2 and not bool(mask[:, -1].all())
    index = rows_position(mask, positions) if isinstance(positions, int) else None
    chosen = torch.zeros(out.shape[:2], dtype=torch.bool, device=out.device)  # (batch, seq)
    if index is not None:
        # counted from each row's last real token, not from the padded end (left padding: the same thing)
        chosen[torch.arange(out.shape[0], device=out.device), index.to(out.device)] = True
        keep = torch.zeros(out.shape[0], dtype=torch.bool, device=out.device)
        keep[rows] = True
        chosen &= keep[:, None]
    elif right_padded and _has_negative(positions):
        raise ValueError(
            "steer: negative positions in a list or slice are ambiguous on a right-padded batch (the rows end at "
            "different places); pass one negative int (counted from each row's last real token), non-negative "
            "positions, or pad on the left."
        )
    else:
        chosen[rows, slice(None) if positions is None else positions] = True
    return chosen[..., None].to(out.dtype)


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
                    where: Any = None) -> None:
    """Inside a trace: ``layers_output[layer] += where * sum(factor * vector)``, one assignment. Each ``vector`` is
    ``(hidden,)``, cast to the layer output's dtype and device before it is scaled; ``where(model, out)`` returns the
    ``(batch, seq, 1)`` mask (default: every position).

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
    out = model.layers_output[layer]  # (batch, seq, hidden)
    delta = sum(factor * vector.to(out.device, out.dtype) for factor, vector in vectors)
    model.layers_output[layer] = out + (delta if where is None else where(model, out) * delta)
