"""The routing column of the support report: per mixture-of-experts type, whether unilens's ``router_logits`` are
HF's own router logits (``output_router_logits=True``, the same forward, bitwise), and which routing names are served.

Example:
    >>> from unilens import StandardizedTransformer
    >>> from unilens.testing import tiny_model
    >>> routing_check(StandardizedTransformer(*tiny_model("mixtral"), check=False))
    'match (2 MoE layers)'
    >>> routing_check(StandardizedTransformer(*tiny_model("llama"), check=False))
    '-'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from nnsight import save

from ..hooks.routing import ROUTING_NAMES
from ..model.transformer import StandardizedTransformer
from ..testing import tiny_model

__all__ = ["RoutingRow", "routing_check", "routing_report"]

PROMPTS = ["The capital of France is", "A cat sat on the mat and"]


def _matched(ours: list[torch.Tensor], theirs: Sequence[torch.Tensor]) -> int:
    """How many of ``ours`` (one per MoE layer, in layer order) equal an entry of HF's list, in order. HF lists the
    routers its output recorder saw: JetMoE's attention routers too, DeepSeek-V4 not its hash-routed layers."""
    count, j = 0, 0
    for mine in ours:
        flat = mine.reshape(-1, mine.shape[-1])
        for k in range(j, len(theirs)):
            other = theirs[k]
            if (isinstance(other, torch.Tensor) and other.numel() == flat.numel()
                    and other.shape[-1] == flat.shape[-1] and torch.equal(flat, other.reshape(flat.shape))):
                count, j = count + 1, k + 1
                break
    return count


def routing_check(model: StandardizedTransformer) -> str:
    """The routing cell of ``model``'s support row: ``"-"`` (no sparse MoE block), ``"match (n MoE layers)"`` /
    ``"mismatch: ..."`` (``router_logits`` vs HF's ``output_router_logits`` in the same forward), ``"served (n MoE
    layers), HF returns none"`` or ``"refused: <why>"``.

    Example:
        >>> from unilens import StandardizedTransformer
        >>> from unilens.testing import tiny_model
        >>> routing_check(StandardizedTransformer(*tiny_model("deepseek_v3"), check=False))
        'match (1 MoE layers)'
    """
    setup = model.__dict__.get("_routing_setup")
    layers = [] if setup is None else setup.moe_layers
    if not layers:
        reason = setup.plans[0] if setup is not None and setup.plans else "-"
        return "-" if reason.startswith("this layer has no sparse") or reason == "-" else f"refused: {reason}"
    served = [i for i in layers if setup.reason("router_logits", i) is None]
    if not served:
        return f"refused: {setup.reason('router_logits', layers[0])}"
    enc = model.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    theirs = None
    try:
        with torch.no_grad(), model.trace(inputs, output_router_logits=True):
            ours = save([model.router_logits[i] for i in served])
            theirs = getattr(model.output, "router_logits", None)
            theirs = save(theirs) if theirs is not None else None
    except Exception:  # noqa: BLE001 - a forward that takes no output_router_logits: read ours alone
        try:
            with torch.no_grad(), model.trace(inputs):
                ours = save([model.router_logits[i] for i in served])
        except Exception as err:  # noqa: BLE001 - the report records every failure with its reason
            return f"error: {type(err).__name__}: {str(err).splitlines()[0][:120]}"
    if not isinstance(theirs, (tuple, list)) or not theirs:
        return f"served ({len(served)} MoE layers), HF returns none"
    matched = _matched(ours, theirs)
    widths = sum(isinstance(t, torch.Tensor) and t.shape[-1] == ours[0].shape[-1] for t in theirs)
    if matched == len(served):
        return f"match ({len(served)} MoE layers)"
    if matched == widths:  # HF records fewer routers than there are MoE layers; each of them is ours
        return f"match ({matched} of {len(served)} MoE layers: HF returns {len(theirs)})"
    return f"mismatch: {matched} of {len(served)} layers' router_logits equal HF's router logits"


@dataclass
class RoutingRow:
    """One MoE type: its routing cell and, per routing name, the layers serving it (or the first refusal)."""

    model_type: str
    router_logits: str
    served: dict[str, str]


def routing_report(model_types: Sequence[str]) -> list[RoutingRow]:
    """``routing_check`` and the served routing names of each tiny ``model_types`` model.

    Example:
        >>> [row.router_logits for row in routing_report(["qwen3_moe"])]
        ['match (2 MoE layers)']
    """
    rows = []
    for model_type in model_types:
        hf, tok = tiny_model(model_type)
        model = StandardizedTransformer(hf, tokenizer=tok, check=False)
        setup = model.__dict__.get("_routing_setup")
        served: dict[str, str] = {}
        for name in ROUTING_NAMES:
            layers = [i for i in setup.moe_layers if setup.reason(name, i) is None]
            first = setup.moe_layers[0] if setup.moe_layers else 0
            served[name] = (f"layers {layers}" if layers else
                            f"refused: {setup.reason(name, first) if setup.plans else 'no layers'}")
        rows.append(RoutingRow(model_type, routing_check(model), served))
    return rows
