"""Mixture-of-experts routing as standardized tensors: the router's logits, the experts each token was sent to, their
weights, each expert's contribution and the shared expert's, read and edited where the model's own code computes them.

Mechanism (one for every family; found by data flow on one probe forward at load, no per-family table):

- The **experts** module of a sparse MoE block is the module called with the tokens' expert indices: an integer
  tensor ``(tokens, k)`` next to a floating one of the same shape (the weights), as every token-choice MoE of
  transformers 5 calls it (``experts(hidden, top_k_index, top_k_weights)``). The **block** is its parent.
- The **router** is the block's child, called before the experts, whose output holds a floating
  ``(tokens, n_experts)`` tensor: the logits (``n_experts`` is that tensor's last dimension).
- The logits are taken INSIDE the router's forward, where they are computed: while the router runs, a
  ``TorchFunctionMode`` watches the tensors its operations return, and the one that equals the logits the router
  returns (found on the probe forward: the k-th ``(tokens, n_experts)`` result) goes through the ``router_logits``
  hook point. An edit of it therefore flows through the family's own top-k, softmax / sigmoid, bias correction,
  group limits and renormalization: ablating an expert is setting its logit to the dtype's lowest value.
- ``expert_indices`` / ``expert_weights`` are the experts module's inputs (what the experts were run with),
  editable there (forced routing). ``expert_outputs`` are recomputed by calling the experts module once more on one
  row per (token, slot), so each row holds one expert's weighted output; they sum to the experts module's output.
- ``shared_expert_output`` is the block's output minus the routed experts' output, where the probe shows that
  difference is a shared expert's output (times a per-token gate, Qwen2-MoE's ``sigmoid(shared_expert_gate)``).

Name -> tensor (per layer ``i``; ``E`` experts, top ``k``):

- ``router_logits[i]`` ``(batch, seq, E)``: the router's logits before any top-k (HF's ``output_router_logits``).
- ``expert_indices[i]`` ``(batch, seq, k)`` (int64) and ``expert_weights[i]`` ``(batch, seq, k)``: the selected
  experts and the weights their outputs are multiplied by, as the experts module received them.
- ``expert_outputs[i]`` ``(batch, seq, E, hidden)``: expert e's weighted output at each token, zero where the
  token was not routed to e. Summed over experts: the experts module's output. Editable (the experts module's
  output becomes the sum of the edited contributions).
- ``shared_expert_output[i]`` ``(batch, seq, hidden)``: what the shared expert adds to the block's output.

Layers without a sparse MoE block (dense layers of DeepSeek-V3, Jamba's odd layers) refuse every name with the
reason (``UnsupportedRouting``), like the hook points. Torch hooks are registered only while a trace asks for a name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
from greenlet import getcurrent
from torch import nn
from torch.overrides import TorchFunctionMode

from ..arch.probe import Probe
from ..core.names import ROUTING, names_of_kind
from ..core.tensors import _first
from .points import HookPointAccessor, PointGroup, UnsupportedHookPoint

__all__ = [
    "ROUTING_NAMES",
    "MoEPlan",
    "RoutingAccessor",
    "RoutingGroup",
    "RoutingSetup",
    "UnsupportedRouting",
    "install_routing",
]

ROUTING_NAMES: tuple[str, ...] = names_of_kind(ROUTING, per_layer=True)
GROUP = "unilens_routing"  # the child of each sparse MoE block that holds the routing hook points
_ROUTER = re.compile(r"router|gate|gating", re.IGNORECASE)
_EXPERT = re.compile(r"expert", re.IGNORECASE)
NO_MOE = "this layer has no sparse mixture-of-experts block (no module is called with per-token expert indices)"


class UnsupportedRouting(UnsupportedHookPoint):
    """A routing tensor this model (or layer) does not have; the message names it, the model type and why."""


class RoutingGroup(PointGroup):
    """The ``unilens_routing`` child of a sparse MoE block: one identity ``HookPoint`` per routing name it serves,
    the names requested by the running trace, the torch hook handles serving them and per-forward state (the
    mechanism of ``unilens.hooks.points.PointGroup``, under its own name in the module tree).

    Example:
        >>> group = RoutingGroup(["router_logits", "expert_indices"])
        >>> sorted(name for name, _ in group.named_children())
        ['expert_indices', 'router_logits']
    """


@dataclass
class MoEPlan:
    """Where one layer's sparse MoE block routes, found on the probe forward.

    ``index_at`` / ``weight_at`` / ``hidden_at``: where the experts module takes the indices, weights and hidden
    states (a positional index or a keyword); ``logits_ordinal``: which ``(tokens, n_experts)`` result of the
    router's operations is the logits (None: not computed inside the router, ``router_logits`` refused).
    """

    layer: int
    block: nn.Module
    path: str  # dotted path of the block
    router: nn.Module
    experts: nn.Module | None
    n_experts: int
    top_k: int | None
    logits_ordinal: int | None = None
    index_at: int | str | None = None
    weight_at: int | str | None = None
    hidden_at: int | str | None = None
    shared: nn.Module | None = None
    group: RoutingGroup | None = None
    refused: dict[str, str] = field(default_factory=dict)


def _arg(args: tuple, kwargs: dict, at: int | str) -> Any:
    return args[at] if isinstance(at, int) else kwargs[at]


def _with_arg(args: tuple, kwargs: dict, at: int | str, value: Any) -> tuple[tuple, dict]:
    if isinstance(at, int):
        return (*args[:at], value, *args[at + 1:]), kwargs
    return args, {**kwargs, at: value}


def _tensors(value: Any) -> list[torch.Tensor]:
    """The tensors of a module output (a tensor, or a tuple / list of them, one level deep)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [v for v in value if isinstance(v, torch.Tensor)]
    return []


def _logits_shaped(value: Any, tokens: int, n_experts: int | None = None) -> bool:
    """A floating ``(..., n_experts)`` tensor with one row per token (``n_experts`` > 1; any when None)."""
    if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.dim() < 2:
        return False
    width = value.shape[-1]
    if n_experts is not None and width != n_experts:
        return False
    return width > 1 and value.numel() == tokens * width


# ----------------------------------------------------------------------------------------------------------------
# Discovery
# ----------------------------------------------------------------------------------------------------------------


class _OpRecorder(TorchFunctionMode):
    """Records every ``(tokens, n_experts)`` floating result of the operations run while it is active."""

    def __init__(self, tokens: int, n_experts: int):
        super().__init__()
        self.tokens, self.n_experts, self.seen = tokens, n_experts, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if _logits_shaped(out, self.tokens, self.n_experts):
            self.seen.append(out.detach().clone())
        return out


def _calls(hf_model: nn.Module, layers: nn.Module, n: int) -> dict[int, dict[str, Any]]:
    """One probe forward: per module inside the layers (by ``id``), its first call's args, kwargs, output and rank."""
    calls: dict[int, dict[str, Any]] = {}

    def record(module, args, kwargs, output):
        if id(module) not in calls:
            calls[id(module)] = {"args": args, "kwargs": kwargs, "output": output, "rank": len(calls)}

    with Probe(hf_model) as probe:
        for i in range(n):
            for module in layers[i].modules():
                probe.forward_hook(module, record, with_kwargs=True)
        probe.run()
    return calls


def _find_experts(layer: nn.Module, calls: dict) -> tuple[str, nn.Module, int | str, int | str] | None:
    """The outermost module of ``layer`` called with an integer ``(tokens, k)`` tensor and a floating one of the same
    shape: (path inside the layer, module, where the indices are, where the weights are)."""
    for name, module in layer.named_modules():  # parents come before their children
        call = calls.get(id(module))
        if call is None or not name:
            continue
        inputs = [(j, a) for j, a in enumerate(call["args"])] + list(call["kwargs"].items())
        index = [(at, a) for at, a in inputs if isinstance(a, torch.Tensor) and a.dim() == 2
                 and not a.is_floating_point() and a.dtype != torch.bool]
        for at, idx in index:
            weight = [w_at for w_at, w in inputs if isinstance(w, torch.Tensor) and w.is_floating_point()
                      and tuple(w.shape) == tuple(idx.shape)]
            if weight:
                return name, module, at, weight[0]
    return None


def _plan(i: int, base: str, layer: nn.Module, calls: dict, hidden_size: int) -> MoEPlan | str:
    """The routing plan of layer ``i`` (``base``: its dotted path), or why it has none."""
    found = _find_experts(layer, calls)
    if found is None:
        return _plan_without_dispatch(i, base, layer, calls, hidden_size)
    name, experts, index_at, weight_at = found
    block_name = name.rpartition(".")[0]
    block = layer.get_submodule(block_name) if block_name else layer
    indices = _arg(calls[id(experts)]["args"], calls[id(experts)]["kwargs"], index_at)
    tokens, top_k = indices.shape
    children = [(n, c) for n, c in block.named_children() if c is not experts and id(c) in calls]
    children.sort(key=lambda nc: calls[id(nc[1])]["rank"])

    def logits_of(module: nn.Module) -> torch.Tensor | None:
        return next((t for t in _tensors(calls[id(module)]["output"]) if _logits_shaped(t, tokens)
                     and t.shape[-1] != hidden_size and t.shape[-1] > int(indices.max())), None)

    before = [c for _, c in children if calls[id(c)]["rank"] < calls[id(experts)]["rank"] and logits_of(c) is not None]
    # the router returns the very indices the experts get (transformers 5's routers); else (DBRX: the block takes
    # the top-k of what its router returns) the first child called before the experts that returns logits
    gives_indices = [c for c in before if any(t.shape == indices.shape and torch.equal(t, indices)
                                              for t in _tensors(calls[id(c)]["output"]))]
    routers = gives_indices or before
    if not routers:
        return (f"the experts module ({type(experts).__name__}) has no sibling router called before it that returns "
                "(tokens, n_experts) logits")
    router = routers[0]
    n_experts = logits_of(router).shape[-1]
    hidden_at = next((at for at, a in [*enumerate(calls[id(experts)]["args"]),
                                       *calls[id(experts)]["kwargs"].items()]
                      if isinstance(a, torch.Tensor) and a.is_floating_point() and a.shape[-1] == hidden_size
                      and a.numel() == tokens * hidden_size), None)
    plan = MoEPlan(i, block, f"{base}.{block_name}" if block_name else base, router, experts, n_experts, top_k,
                   index_at=index_at, weight_at=weight_at, hidden_at=hidden_at)
    if hidden_at is None:
        plan.refused["expert_outputs"] = (f"{type(experts).__name__} takes no (tokens, {hidden_size}) hidden states "
                                          "to recompute per expert")
    shared = [c for n, c in children if c is not router and "shared" in f"{n} {type(c).__name__}".lower()
              and _tensors(calls[id(c)]["output"]) and _tensors(calls[id(c)]["output"])[0].shape[-1] == hidden_size]
    plan.shared = shared[0] if shared else None
    reason = _shared_reason(plan, calls, tokens, hidden_size)
    if reason is not None:
        plan.refused["shared_expert_output"] = reason
    return plan


def _plan_without_dispatch(i: int, base: str, layer: nn.Module, calls: dict, hidden_size: int) -> MoEPlan | str:
    """A MoE block whose experts are not called with per-token indices (Llama 4 runs every expert on every token
    scaled by the router's scores; JetMoE groups the tokens per expert): its router alone, i.e. ``router_logits``.
    The router: the outermost module named or classed router / gate returning ``(tokens, n_experts)`` logits whose
    parent also holds an expert module."""
    for name, module in layer.named_modules():
        call = calls.get(id(module))
        leaf = name.rpartition(".")[2]
        if call is None or not name or not _ROUTER.search(f"{leaf} {type(module).__name__}"):
            continue
        parent_name = name.rpartition(".")[0]
        parent = layer.get_submodule(parent_name) if parent_name else layer
        if parent is layer or not any(_EXPERT.search(f"{n} {type(m).__name__}") for n, m in parent.named_children()):
            continue
        x = _first(calls[id(parent)]["args"]) if id(parent) in calls and calls[id(parent)]["args"] else None
        if not isinstance(x, torch.Tensor) or x.shape[-1] != hidden_size:
            continue
        tokens = x.numel() // hidden_size
        logits = [t for t in _tensors(call["output"]) if _logits_shaped(t, tokens) and t.shape[-1] != hidden_size]
        if not logits:
            continue
        plan = MoEPlan(i, parent, f"{base}.{parent_name}", module, None, logits[0].shape[-1], None)
        why = (f"{type(parent).__name__} does not call its experts with per-token (tokens, k) expert indices (e.g. "
               "every expert runs on every token, scaled by the router's scores, or tokens are grouped per expert), "
               "so no one module's input says which experts a token used")
        for routed in ("expert_indices", "expert_weights", "expert_outputs", "shared_expert_output"):
            plan.refused[routed] = why
        return plan
    return NO_MOE


def _shared_reason(plan: MoEPlan, calls: dict, tokens: int, hidden: int) -> str | None:
    """None when the block's output is the routed experts' output plus the shared expert's output times a per-token
    gate (checked on the probe forward); else why ``shared_expert_output`` is refused."""
    if plan.shared is None:
        return "this MoE block has no shared expert"
    block_out = _first(calls[id(plan.block)]["output"]).reshape(tokens, hidden).double()
    routed = _first(calls[id(plan.experts)]["output"]).reshape(tokens, hidden).double()
    shared = _first(calls[id(plan.shared)]["output"]).reshape(tokens, hidden).double()
    rest = block_out - routed
    gate = (rest * shared).sum(-1, keepdim=True) / (shared * shared).sum(-1, keepdim=True).clamp(min=1e-30)
    scale = float(block_out.abs().max().clamp(min=1.0))
    if not torch.allclose(gate * shared, rest, atol=1e-4 * scale, rtol=1e-4):
        return ("the block's output is not the routed experts' output plus the shared expert's (times a per-token "
                "gate): something else transforms them (e.g. a norm after the sum)")
    return None


def _logits_ordinal(hf_model: nn.Module, plans: list[MoEPlan]) -> None:
    """Which ``(tokens, n_experts)`` result of each router's operations is the logits it returns (a second probe
    forward); a router whose logits are not computed inside it gets ``router_logits`` refused."""
    recorders: dict[int, _OpRecorder] = {}
    outputs: dict[int, Any] = {}

    def enter(plan: MoEPlan):
        def pre(module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            tokens = x.numel() // x.shape[-1]
            recorder = _OpRecorder(tokens, plan.n_experts)
            recorders[plan.layer] = recorder
            recorder.__enter__()
        return pre

    def leave(plan: MoEPlan):
        def post(module, args, kwargs, output):
            recorders[plan.layer].__exit__(None, None, None)
            outputs.setdefault(plan.layer, output)
        return post

    with Probe(hf_model) as probe:
        for plan in plans:
            probe.pre_hook(plan.router, enter(plan), with_kwargs=True)
            probe.forward_hook(plan.router, leave(plan), with_kwargs=True)
        probe.run()
    for plan in plans:
        recorder = recorders.get(plan.layer)
        returned = [t for t in _tensors(outputs.get(plan.layer)) if t.is_floating_point()
                    and t.shape[-1] == plan.n_experts]
        for k, seen in enumerate(recorder.seen if recorder is not None else []):
            if any(t.numel() == seen.numel() and torch.equal(t.reshape(seen.shape), seen) for t in returned):
                plan.logits_ordinal = k
                break
        else:
            plan.refused["router_logits"] = (f"the router ({type(plan.router).__name__}) returns no logits computed "
                                             "inside its forward")


@dataclass
class RoutingSetup:
    """What ``install_routing`` found: per layer its ``MoEPlan`` or the reason it has none, and the path of every
    routing hook point."""

    model_type: str
    plans: list[MoEPlan | str]
    active: list[MoEPlan] = field(default_factory=list)  # plans with torch hooks registered in this trace

    @property
    def moe_layers(self) -> list[int]:
        """The layers with a sparse MoE block."""
        return [i for i, plan in enumerate(self.plans) if isinstance(plan, MoEPlan)]

    def plan(self, layer: int) -> MoEPlan:
        """Layer ``layer``'s plan (``UnsupportedRouting`` where it has no sparse MoE block)."""
        plan = self.plans[layer]
        if isinstance(plan, str):
            raise UnsupportedRouting("routing", self.model_type, plan, layer)
        return plan

    def reason(self, name: str, layer: int) -> str | None:
        """Why ``name`` is refused at ``layer`` (None: it is served)."""
        plan = self.plans[layer]
        return plan if isinstance(plan, str) else plan.refused.get(name)

    def path(self, name: str, layer: int) -> str | None:
        """Dotted path of the HookPoint serving ``name`` at ``layer`` (None where refused)."""
        plan = self.plans[layer]
        return f"{plan.path}.{GROUP}.{name}" if self.reason(name, layer) is None else None

    def check(self, name: str, layer: int) -> str:
        reason = self.reason(name, layer)
        if reason is not None:
            raise UnsupportedRouting(name, self.model_type, reason, layer)
        return self.path(name, layer)

    def request(self, name: str, layer: int) -> None:
        """Make ``name`` of layer ``layer`` run in the forwards of the current trace (registers its torch hooks)."""
        self.check(name, layer)
        plan = self.plans[layer]
        plan.group.requested.add(name)
        if not any(p is plan for p in self.active):
            _register(plan)
            self.active.append(plan)

    def request_all(self) -> None:
        """Every served name of every layer (the forward-order recording)."""
        for layer in self.moe_layers:
            for name in ROUTING_NAMES:
                if self.reason(name, layer) is None:
                    self.request(name, layer)

    def clear(self) -> None:
        """End of a trace: remove every torch hook and request (an ordinary forward runs untouched)."""
        for plan in self.active:
            for handle in plan.group.handles:
                handle.remove()
            plan.group.handles.clear()
            plan.group.requested.clear()
            plan.group.state.clear()
        self.active.clear()


def install_routing(hf_model: nn.Module, arch: Any) -> RoutingSetup:
    """Find every layer's sparse MoE block (two probe forwards) and attach its ``unilens_routing`` group; a model
    whose probe fails still loads, with every routing name refused and the error as the reason.

    Example:
        >>> from unilens.testing import tiny_model
        >>> from unilens.discovery import discover
        >>> hf, _ = tiny_model("mixtral")
        >>> setup = install_routing(hf, discover(hf))
        >>> setup.moe_layers, setup.path("router_logits", 0)
        ([0, 1], 'model.layers.0.mlp.unilens_routing.router_logits')
        >>> setup.reason("router_logits", 0) is None, setup.reason("shared_expert_output", 0)
        (True, 'this MoE block has no shared expert')
    """
    n = len(arch.layers)
    try:
        layers = hf_model.get_submodule(arch.layers_path)
        if not any(_EXPERT.search(f"{name} {type(m).__name__}") for name, m in layers.named_modules()):
            return RoutingSetup(arch.model_type, [NO_MOE] * n)  # no module named or classed expert: skip the probe
        calls = _calls(hf_model, layers, n)
        hidden = int(hf_model.get_input_embeddings().weight.shape[-1])
        plans: list[MoEPlan | str] = [_plan(i, f"{arch.layers_path}.{i}", layers[i], calls, hidden)
                                      for i in range(n)]
        found = [p for p in plans if isinstance(p, MoEPlan)]
        if found:
            _logits_ordinal(hf_model, found)
    except Exception as err:  # noqa: BLE001 - refuse routing, keep the model usable
        reason = f"the probe that locates the MoE routing failed on this model ({type(err).__name__}: {err})"
        return RoutingSetup(arch.model_type, [reason] * n)
    for plan in plans:
        if isinstance(plan, MoEPlan):
            plan.group = RoutingGroup([name for name in ROUTING_NAMES if name not in plan.refused])
            plan.block.add_module(GROUP, plan.group)
            # Kept for good (not per request): a read of the block's input (mlps_input) comes before a request of a
            # routing name, once the block's call has started. Its (batch, seq) is recorded by a pre-hook that has
            # run by then, and a no-op forward hook keeps the call on torch's hook-aware path, so the forward hook
            # registered on request still runs in this call (as unilens.hooks.points does).
            plan.block.register_forward_pre_hook(_shape_recorder(plan.group), with_kwargs=True)
            plan.block.register_forward_hook(_no_op_hook)
    return RoutingSetup(arch.model_type, plans)


def _no_op_hook(module: nn.Module, args: Any, output: Any) -> None:
    return None


def _shape_recorder(group: RoutingGroup):
    """A forward pre-hook of the MoE block recording ``(batch, seq)`` of its input in ``group.state``."""

    def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else next(iter(kwargs.values()))  # (batch, seq, hidden) or (tokens, hidden)
        group.state["batch_seq"] = tuple(x.shape[:2]) if x.dim() == 3 else (1, x.shape[0])

    return record


# ----------------------------------------------------------------------------------------------------------------
# The torch hooks, registered per trace on request
# ----------------------------------------------------------------------------------------------------------------


class _LogitsSite(TorchFunctionMode):
    """Active while the router runs: its ``logits_ordinal``-th ``(tokens, n_experts)`` result goes through the
    ``router_logits`` hook point (as ``(batch, seq, n_experts)``), and the router goes on with what comes back."""

    def __init__(self, plan: MoEPlan, batch_seq: tuple[int, int]):
        super().__init__()
        self.plan, self.batch_seq = plan, batch_seq
        self.tokens = batch_seq[0] * batch_seq[1]
        self.seen, self.done = 0, False
        self.owner = getcurrent()  # the model's greenlet: a trace body running meanwhile is not watched

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.done or getcurrent() is not self.owner or not _logits_shaped(out, self.tokens, self.plan.n_experts):
            return out
        if self.seen < self.plan.logits_ordinal:
            self.seen += 1
            return out
        self.done = True
        value = out.reshape(*self.batch_seq, self.plan.n_experts)  # (batch, seq, n_experts)
        new, edited = self.plan.group.run("router_logits", value)
        return new.reshape(out.shape).to(out.dtype) if edited else out


def _register(plan: MoEPlan) -> None:
    """The torch hooks serving ``plan``'s requested names (each checks at run time whether it is requested)."""
    group = plan.group
    state = group.state
    wants = group.requested.__contains__

    def router_pre(module, args, kwargs):
        if wants("router_logits") and plan.logits_ordinal is not None:
            site = _LogitsSite(plan, state["batch_seq"])
            state["site"] = site
            site.__enter__()

    def router_post(module, args, kwargs, output):
        site = state.pop("site", None)
        if site is not None:
            site.__exit__(None, None, None)

    def experts_pre(module, args, kwargs):
        batch_seq = state["batch_seq"]
        for name, at in (("expert_indices", plan.index_at), ("expert_weights", plan.weight_at)):
            value = _arg(args, kwargs, at)  # (tokens, k)
            new, edited = group.run(name, value.reshape(*batch_seq, value.shape[-1]))  # (batch, seq, k)
            if edited:
                args, kwargs = _with_arg(args, kwargs, at, new.reshape(value.shape).to(value.dtype))
        state["experts_call"] = (args, kwargs)
        return args, kwargs

    def experts_post(module, args, kwargs, output):
        routed = _first(output)
        if wants("expert_outputs"):
            call_args, call_kwargs = state["experts_call"]
            per_expert = expert_contributions(plan, call_args, call_kwargs)  # (tokens, n_experts, hidden)
            value = per_expert.reshape(*state["batch_seq"], *per_expert.shape[1:])
            new, edited = group.run("expert_outputs", value)
            if edited:
                routed = new.sum(dim=-2).reshape(routed.shape).to(routed.dtype)
                output = (routed, *output[1:]) if isinstance(output, tuple) else routed
        state["routed"] = routed
        return output

    def block_post(module, args, kwargs, output):
        if not wants("shared_expert_output") or "routed" not in state:
            return None
        out = _first(output)
        routed = state["routed"].reshape(out.shape)
        new, edited = group.run("shared_expert_output", (out - routed).reshape(*state["batch_seq"], out.shape[-1]))
        if not edited:
            return None
        out = routed + new.reshape(out.shape).to(out.dtype)
        return (out, *output[1:]) if isinstance(output, tuple) else out

    group.handles.append(plan.router.register_forward_pre_hook(router_pre, with_kwargs=True))
    group.handles.append(plan.router.register_forward_hook(router_post, with_kwargs=True, always_call=True))
    if plan.experts is not None:
        group.handles.append(plan.experts.register_forward_pre_hook(experts_pre, with_kwargs=True))
        group.handles.append(plan.experts.register_forward_hook(experts_post, with_kwargs=True))
    group.handles.append(plan.block.register_forward_hook(block_post, with_kwargs=True))


def expert_contributions(plan: MoEPlan, args: tuple, kwargs: dict) -> torch.Tensor:
    """Each expert's weighted output ``(tokens, n_experts, hidden)`` for one call of ``plan``'s experts module with
    ``args`` / ``kwargs``: the module runs once more on one row per (token, slot), the row's expert and weight
    alone, and each row's output is placed at its expert (zero where a token was not routed there).

    The experts module's own forward runs (its class's ``forward``, past nnsight's and torch's hooks), so every
    implementation and layout (fused gate/up, biases, clamped SwiGLU) is the family's own.
    """
    hidden = _arg(args, kwargs, plan.hidden_at)  # (tokens, hidden) or (batch, seq, hidden)
    indices = _arg(args, kwargs, plan.index_at)  # (tokens, k)
    weights = _arg(args, kwargs, plan.weight_at)  # (tokens, k)
    tokens, k = indices.shape
    d = hidden.shape[-1]
    rows = hidden.reshape(tokens, d).repeat_interleave(k, dim=0)  # (tokens * k, hidden): token t, slot j at t * k + j
    rows = rows.reshape(1, tokens * k, d) if hidden.dim() == 3 else rows
    args, kwargs = _with_arg(args, kwargs, plan.hidden_at, rows)
    args, kwargs = _with_arg(args, kwargs, plan.index_at, indices.reshape(tokens * k, 1))
    args, kwargs = _with_arg(args, kwargs, plan.weight_at, weights.reshape(tokens * k, 1))
    per_slot = _first(type(plan.experts).forward(plan.experts, *args, **kwargs)).reshape(tokens, k, d)
    valid = (indices >= 0) & (indices < plan.n_experts)  # a "no expert" sentinel index adds nothing
    out = per_slot.new_zeros(tokens, plan.n_experts, d)
    out.scatter_add_(1, indices.clamp(0, plan.n_experts - 1)[..., None].expand(tokens, k, d),
                     per_slot * valid[..., None])
    return out


# ----------------------------------------------------------------------------------------------------------------
# Accessor
# ----------------------------------------------------------------------------------------------------------------


class RoutingAccessor(HookPointAccessor):
    """``model.<routing name>[i]``: read (``.save()``) or assign one routing tensor of layer ``i`` inside a trace.

    Example:
        >>> from unilens import StandardizedTransformer
        >>> from unilens.testing import tiny_model
        >>> model = StandardizedTransformer(*tiny_model("mixtral"))
        >>> with model.trace("The cat sat"):
        ...     logits = model.router_logits[0].save()
        ...     chosen = model.expert_indices[0].save()
        >>> tuple(logits.shape), tuple(chosen.shape)
        ((1, 5, 4), (1, 5, 2))
    """

    setup_attribute = "_routing_setup"
    unsupported = UnsupportedRouting
    installs = "routing hook points"

