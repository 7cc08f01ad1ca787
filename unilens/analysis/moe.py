"""Mixture-of-experts analysis on the standardized routing tensors (``router_logits``, ``expert_indices``,
``expert_weights``, ``expert_outputs``, ``shared_expert_output``; ``unilens.hooks.routing``): expert ablation,
forced routing, routing statistics over a dataset and per-expert direct logit attribution. docs/moe.md shows them.

Every helper works through the model's own routing code: an ablation edits the router's logits where the router
computes them, so the family's own top-k, softmax / sigmoid, bias correction and renormalization pick the other
experts; forced routing edits what the experts module is called with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .arguments import _as_index, _encode, _position_list, _prompt_list
from .attribution import _Readout, _token_id

__all__ = [
    "ExpertAttribution",
    "RoutingStatistics",
    "ablate_experts",
    "expert_logit_attribution",
    "force_routing",
    "moe_layers",
    "routing_statistics",
]


def moe_layers(model: Any) -> list[int]:
    """The layers of ``model`` with a sparse mixture-of-experts block (where the routing names are served).

    Example:
        >>> from unilens import StandardizedTransformer
        >>> from unilens.testing import tiny_model
        >>> moe_layers(StandardizedTransformer(*tiny_model("deepseek_v3")))  # layer 0 is dense
        [1]
    """
    setup = model.__dict__.get("_routing_setup")
    return [] if setup is None else setup.moe_layers


def _experts_list(model: Any, layer: int, experts: int | Sequence[int], what: str) -> list[int]:
    setup = model.__dict__.get("_routing_setup")
    if setup is None:
        raise ValueError(f"{what}: this model has no routing hook points (a remote model); load it locally.")
    n = setup.plan(layer).n_experts  # UnsupportedRouting on a dense layer, with the reason
    values = [experts] if not isinstance(experts, (list, tuple, range, torch.Tensor)) else list(experts)
    out = [_as_index(e, "expert") for e in values]
    if not out:
        raise ValueError(f"{what}: no experts given; pass an expert id 0..{n - 1} or a list of them.")
    bad = [e for e in out if not 0 <= e < n]
    if bad:
        raise IndexError(f"{what}: expert {bad[0]} is out of range: layer {layer}'s router has {n} experts "
                         f"(0..{n - 1}).")
    return out


def ablate_experts(model: Any, layer: int, experts: int | Sequence[int]) -> None:
    """Inside a trace: drop ``experts`` from layer ``layer``'s routing, as if the router never offered them.

    Their router logits are set to the dtype's lowest value where the router computes them, so the family's own
    routing runs on the edited logits: each token's top-k is taken among the other experts and the weights are
    normalized the way the family normalizes them (softmax then renormalized top-k for Mixtral / Qwen3-MoE,
    sigmoid with bias-corrected selection and ``routed_scaling_factor`` for DeepSeek-V3, softmax over the top-k
    logits for GPT-OSS). A shared expert is not routed and keeps running.

    Example:
        >>> from unilens import StandardizedTransformer
        >>> from unilens.testing import tiny_model
        >>> model = StandardizedTransformer(*tiny_model("mixtral"))
        >>> with model.trace("The cat sat on the mat"):
        ...     ablate_experts(model, 0, [1])
        ...     chosen = model.expert_indices[0].save()
        >>> bool((chosen != 1).all())
        True
    """
    experts = _experts_list(model, layer, experts, "ablate_experts")
    logits = model.router_logits[layer]  # (batch, seq, n_experts)
    edited = logits.clone()
    edited[..., experts] = torch.finfo(logits.dtype).min
    model.router_logits[layer] = edited


def force_routing(model: Any, layer: int, experts: int | Sequence[int],
                  weights: Sequence[float] | torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Inside a trace: send every token of layer ``layer`` to ``experts`` (one id per top-k slot) with ``weights``
    (default: equal, ``1 / k`` each), whatever the router chose. The experts module runs on the forced routing; the
    router still runs (its logits are unchanged). Returns the forced ``(expert_indices, expert_weights)``, each
    ``(batch, seq, k)`` (read them here: a later read of ``expert_indices[layer]`` would come after the weights).

    Example:
        >>> from unilens import StandardizedTransformer
        >>> from unilens.testing import tiny_model
        >>> model = StandardizedTransformer(*tiny_model("mixtral"))
        >>> with model.trace("The cat sat"):
        ...     used, _ = force_routing(model, 1, [2, 3])
        ...     used = used.save()
        >>> used[0, 0].tolist()
        [2, 3]
    """
    experts = _experts_list(model, layer, experts, "force_routing")
    indices = model.expert_indices[layer]  # (batch, seq, k)
    k = indices.shape[-1]
    if len(experts) != k:
        raise ValueError(f"force_routing: layer {layer} routes each token to k={k} experts; pass {k} expert ids, got "
                         f"{len(experts)}.")
    if weights is None:
        chosen = torch.full((k,), 1.0 / k)
    else:
        chosen = torch.as_tensor(weights, dtype=torch.float64)
        if chosen.shape != (k,):
            raise ValueError(f"force_routing: weights must hold one value per slot (k={k}), got shape "
                             f"{tuple(chosen.shape)}.")
    forced = torch.tensor(experts, dtype=indices.dtype, device=indices.device).expand_as(indices).clone()
    model.expert_indices[layer] = forced
    current = model.expert_weights[layer]  # (batch, seq, k)
    forced_weights = chosen.to(current.dtype).to(current.device).expand_as(current).clone()
    model.expert_weights[layer] = forced_weights
    return forced, forced_weights


@dataclass
class RoutingStatistics:
    """Routing over a dataset, per MoE layer (real tokens only, padding excluded).

    ``load[layer]`` ``(n_experts,)``: the fraction of (token, slot) assignments that went to each expert (sums to
    1); ``entropy[layer]``: the mean entropy (nats) of the softmax of the router logits over the experts;
    ``tokens``: how many tokens were counted; ``n_experts[layer]``.
    """

    load: dict[int, torch.Tensor]
    entropy: dict[int, float]
    tokens: int
    n_experts: dict[int, int]

    def max_load_ratio(self, layer: int) -> float:
        """The busiest expert's load over the mean load (1.0: perfectly balanced)."""
        load = self.load[layer]
        return float(load.max() * load.numel())


def routing_statistics(model: Any, texts: str | Sequence[str], layers: Sequence[int] | None = None,
                       batch_size: int = 8) -> RoutingStatistics:
    """Expert load and router entropy over ``texts``, per MoE layer (``layers``: default every MoE layer whose
    selected experts are served).

    Example:
        >>> from unilens import StandardizedTransformer
        >>> from unilens.testing import tiny_model
        >>> model = StandardizedTransformer(*tiny_model("qwen3_moe"))
        >>> stats = routing_statistics(model, ["The cat sat on the mat", "Hello world"])
        >>> round(float(stats.load[0].sum()), 6), stats.n_experts[0], stats.tokens > 0
        (1.0, 4, True)
    """
    texts = _prompt_list(texts, "texts")
    setup = model.__dict__.get("_routing_setup")
    served = [i for i in moe_layers(model) if setup.reason("expert_indices", i) is None]
    layers = served if layers is None else [model.layers_output._index(_as_index(i, "layer")) for i in layers]
    if not layers:
        raise ValueError(f"routing_statistics: this {model.architecture.model_type} model has no MoE layer whose "
                         "selected experts are served (unilens.hooks.routing says why: model.read a routing name).")
    names = [f"{n}.{i}" for i in layers for n in ("router_logits", "expert_indices")]
    counts = {i: torch.zeros(setup.plan(i).n_experts, dtype=torch.float64) for i in layers}
    entropy = {i: 0.0 for i in layers}
    tokens = 0
    for start in range(0, len(texts), batch_size):
        batch = _encode(model, texts[start:start + batch_size], "texts")
        real = batch["attention_mask"].bool().cpu()  # (batch, seq)
        acts = model.read(batch, names)
        tokens += int(real.sum())
        for i in layers:
            chosen = acts[f"expert_indices.{i}"].cpu()[real]  # (tokens, k)
            counts[i] += torch.bincount(chosen.flatten(), minlength=counts[i].numel())[:counts[i].numel()].double()
            logp = torch.log_softmax(acts[f"router_logits.{i}"].cpu().double()[real], dim=-1)  # (tokens, n_experts)
            entropy[i] += float(-(logp.exp() * logp).sum(-1).sum())
    return RoutingStatistics({i: c / c.sum() for i, c in counts.items()},
                             {i: e / max(tokens, 1) for i, e in entropy.items()}, tokens,
                             {i: c.numel() for i, c in counts.items()})


@dataclass
class ExpertAttribution:
    """Per-expert direct logit attribution at one layer and position.

    ``experts`` ``(n_experts,)`` float64: each expert's direct contribution to the token's logit (zero for experts
    the token was not routed to); ``shared``: the shared expert's (None where the block has none); ``routed``: the
    token's selected experts; ``logit``: the model's logit of the token (the contributions are part of it).
    """

    experts: torch.Tensor
    shared: float | None
    routed: list[int]
    logit: float


def expert_logit_attribution(model: Any, prompt: str, token: int | str, layer: int,
                             position: int = -1) -> ExpertAttribution:
    """Each expert's direct contribution to ``token``'s logit at ``position``, through layer ``layer``'s MoE block.

    Each expert's weighted output (``expert_outputs``) goes straight through the final norm with its scale frozen
    at the full forward's value and the unembedding (as ``unilens.analysis.direct_logit_attribution`` does for
    whole layers): the experts' terms plus the shared expert's add up to the MLP's term of that function.

    Example:
        >>> from unilens import StandardizedTransformer
        >>> from unilens.testing import tiny_model
        >>> model = StandardizedTransformer(*tiny_model("deepseek_v3"))
        >>> att = expert_logit_attribution(model, "The capital of France is", " Paris", layer=1)
        >>> att.experts.shape[0], len(att.routed), att.shared is not None
        (4, 2, True)
    """
    if not isinstance(prompt, str):
        raise TypeError(f"expert_logit_attribution takes one prompt string, got {type(prompt).__name__}; call it "
                        "once per prompt.")
    token = _token_id(model, token)
    layer = model.layers_output._index(_as_index(layer, "layer"))
    setup = model.__dict__.get("_routing_setup")
    if setup is None:
        raise ValueError("expert_logit_attribution: this model has no routing hook points (a remote model).")
    setup.check("expert_outputs", layer)  # UnsupportedRouting with the reason
    has_shared = setup.reason("shared_expert_output", layer) is None
    batch = _encode(model, prompt, "prompt")
    (position,) = _position_list(_as_index(position, "position"), batch["input_ids"].shape[1])
    last = model.num_layers - 1
    names = [f"expert_outputs.{layer}", f"expert_indices.{layer}", f"mlps_output.{layer}", f"layers_output.{last}",
             "logits"] + ([f"shared_expert_output.{layer}"] if has_shared else [])
    acts = model.read(batch, names)
    per_expert = acts[f"expert_outputs.{layer}"][0, position]  # (n_experts, hidden)
    shared = acts[f"shared_expert_output.{layer}"][0, position] if has_shared else None  # (hidden,)
    mlp = acts[f"mlps_output.{layer}"][0, position]
    total = per_expert.double().sum(0) + (shared.double() if shared is not None else 0.0)
    if not torch.allclose(total, mlp.double(), atol=1e-4 * float(mlp.abs().max().clamp(min=1.0)), rtol=1e-3):
        raise ValueError(f"expert_logit_attribution: layer {layer}'s MLP output (mlps_output) is not the sum of its "
                         "experts' outputs and the shared expert's on this model (e.g. a norm after the MoE block), so "
                         "the experts have no direct, additive share of the logit.")
    final = acts[f"layers_output.{last}"][0, position]
    readout = _Readout.build(model, token, final.detach())
    return ExpertAttribution(
        experts=readout(per_expert),  # (n_experts,)
        shared=float(readout(shared)) if shared is not None else None,
        routed=acts[f"expert_indices.{layer}"][0, position].tolist(),
        logit=float(acts["logits"][0, position, token]),
    )
