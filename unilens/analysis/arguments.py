"""Argument checks and encoding shared by the analysis functions: prompts to a trace's input dict, layer / position
lists checked against the model, the unembedding as a plain function."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..arch.offload import module_device


Prompts = str | Sequence[str]
Metric = Callable[[torch.Tensor], torch.Tensor]


# ------------------------------------------------------------------------------------------------
# Plumbing
# ------------------------------------------------------------------------------------------------


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


def _unembed(model, hidden: torch.Tensor) -> torch.Tensor:
    """Final norm + unembedding + logit post-processing on plain modules (no trace): ``(..., hidden)`` -> logits."""
    device = module_device(model.module_accessor.get_unembed())  # accelerate's execution device when dispatched
    with torch.no_grad():
        return model.module_accessor.project_on_vocab(hidden.to(device))


# ------------------------------------------------------------------------------------------------
# Logit lens
# ------------------------------------------------------------------------------------------------


