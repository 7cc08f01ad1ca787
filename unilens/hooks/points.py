"""The TransformerLens-style hook points beyond attention: pre-rotary q/k, per-head attention inputs, MLP neurons,
resid_mid and the norms' scale / normalized output; where they live, how they run, why a model lacks one.

Mechanism (one for every architecture): at load, each module that hosts points gets a child ``unilens_points`` (a
``PointGroup`` of identity ``HookPoint``s, so nnsight, torch hooks and ``model.read`` see them as modules), and one
probe forward finds by data flow which HF modules play which part (the norm feeding the attention, the norm feeding
the MLP, the MLP's gate / up / down projections, where the layer adds the MLP branch to the residual). A point that
an architecture lacks is recorded with the reason and refused (``UnsupportedHookPoint``) the same way on every
model. Torch hooks are registered only when a trace requests a point and removed when the trace ends, so an ordinary
trace (and the sdpa fast path) runs exactly as before (the one exception, a no-op hook on a module whose input is a
standardized read and whose output serves a point, e.g. OPT's fc1, is explained in ``_install``).

Point (accessor) -> tensor, shape, where it is taken:

- ``attention_queries_pre_rotary[i]`` / ``attention_keys_pre_rotary[i]`` ``(batch, heads|kv_heads, seq, head_dim)``:
  the q / k projection's output split into heads (TransformerLens ``hook_q`` / ``hook_k``): before rotary AND before
  any q/k norm (Qwen3, OLMo 2, Gemma 3), and before a scale the model applies itself (OPT multiplies q by
  head_dim**-0.5 before the attention function). On models without rotary, q/k norm or such a scale (GPT-2) they
  equal ``attention_queries`` / ``attention_keys``.
- ``attention_inputs_per_head[i]`` ``(batch, seq, heads, hidden)``: the residual the layer's input norm reads,
  copied per query head (TL ``hook_attn_in``, whose bridge (``use_attn_in``) forks the residual BEFORE ln1 and
  applies ln1 per head; on a layer without an input norm, OLMo 2's, the attention's input itself).
  ``attention_queries_input[i]`` ``(batch, seq, heads, hidden)``, ``attention_keys_input[i]`` /
  ``attention_values_input[i]`` ``(batch, seq, kv_heads, hidden)`` (TL ``hook_q_input`` / ``hook_k_input`` /
  ``hook_v_input``; kv head j starts from ``attention_inputs_per_head``'s head j, as in TL's bridge). Editing one
  head's copy changes only that head's projection: the input norm is applied to the edited copy and the head's rows
  are recomputed from the per-head weight views (``unilens.weights``), fused q/k/v, Conv1D and grouped-query layouts
  included; the other heads keep the model's own values.
- ``mlps_pre_activation[i]`` ``(batch, seq, d_mlp)``: the input of the activation function (TL ``mlp.hook_pre``; on
  gated MLPs the gate projection's output), ``mlps_pre_linear[i]`` (gated MLPs only: the up projection, TL
  ``hook_pre_linear``), ``mlps_post_activation[i]`` ``(batch, seq, d_mlp)``: the input of the down projection (TL
  ``hook_post``).
- ``layers_resid_mid[i]`` ``(batch, seq, hidden)``: the residual after the attention branch, before the MLP branch
  (TL ``hook_resid_mid``): the input of the MLP's input norm (of the MLP where it has none).
- ``input_norms_scale[i]`` / ``post_attention_norms_scale[i]`` / ``final_norm_scale`` ``(batch, seq, 1)`` and
  ``*_normalized`` ``(batch, seq, hidden)``: TransformerLens 4.3 bridge's definitions: ``scale = sqrt(mean(xc**2) +
  eps)`` with ``xc = x - mean(x)`` for LayerNorm and ``x`` for RMSNorm, ``normalized = xc / scale`` BEFORE the weight
  and bias (float32 for half-precision inputs). The norm's output is ``normalized * w + b`` (``(1 + w)`` on Gemma's
  RMSNorm); editing ``scale`` or ``normalized`` recomputes it from the edited value, as TL's bridge does.
  ``post_attention_norms`` is the MLP's input norm (HF's usual name; Gemma 2/3's ``pre_feedforward_layernorm``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..arch.offload import module_device, parameter
from ..arch.probe import Probe
from ..arch.structure import is_projection
from ..arch.weights import _FUSED_QKV, _SEPARATE_QKV, layer_weights
from ..core.accessors import LayerIndexed
from ..core.config import NORM_EPS_KEYS, text_config
from ..core.layouts import ResidualLayout
from ..core.names import hook_point_sites
from ..core.tensors import _check_shape, _first
from .attention import HookPoint

__all__ = [
    "LAYER_POINTS",
    "MODEL_POINTS",
    "HookPointAccessor",
    "HookPointSetup",
    "PointGroup",
    "UnsupportedHookPoint",
    "install_hook_points",
]

# accessor name -> (role, name of the HookPoint inside the host's PointGroup), from the catalogue (unilens.core.names)
_POINTS: dict[str, tuple[str, str]] = hook_point_sites(per_layer=True)
LAYER_POINTS: tuple[str, ...] = tuple(_POINTS)
MODEL_POINTS: tuple[str, ...] = tuple(hook_point_sites(per_layer=False))
_ATTENTION_INPUTS = ("attn_in", "q_input", "k_input", "v_input")

# MLPs whose per-token neurons are not one tensor: a router picks experts per token (a module inside the MLP is
# named or classed expert / router). One rule for every model; a shared dense expert is only part of such an MLP's
# output, so it does not make one.
_MOE = re.compile(r"expert|router", re.IGNORECASE)
_NORM = re.compile(r"norm", re.IGNORECASE)


class UnsupportedHookPoint(NotImplementedError):
    """A hook point this architecture (or this layer) does not have; the message names the point, the model type and
    why."""

    def __init__(self, point: str, model_type: str, reason: str, layer: int | None = None):
        where = f"{point}[{layer}]" if layer is not None else point
        super().__init__(f"{where} is not available on this {model_type} model: {reason}")
        self.point, self.model_type, self.reason, self.layer = point, model_type, reason, layer


class PointGroup(nn.Module):
    """The ``unilens_points`` child of a host module: one identity ``HookPoint`` per point it hosts, plus the
    requests of the running trace and the torch hook handles serving them.

    Example:
        >>> group = PointGroup(["scale", "normalized"])
        >>> sorted(name for name, _ in group.named_children())
        ['normalized', 'scale']
    """

    def __init__(self, names: list[str]):
        super().__init__()
        for name in names:
            self.add_module(name, HookPoint())
        object.__setattr__(self, "requested", set())
        object.__setattr__(self, "handles", [])
        object.__setattr__(self, "state", {})

    def forward(self, x: Any) -> Any:
        """The identity: a host that runs all its children in order (an ``nn.Sequential`` MLP, as CTRL's ``ffn``)
        calls this group last, on its output, which must pass through unchanged."""
        return x

    def run(self, name: str, value: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """``value`` through HookPoint ``name`` if requested: (result, whether it was edited, in place or replaced)."""
        if name not in self.requested:
            return value, False
        snapshot = value.clone()
        out = getattr(self, name)(value)
        return out, out is not value or not torch.equal(out, snapshot)

    def routes_grad(self, name: str, value: torch.Tensor) -> bool:
        """Whether the forward must compute from point ``name``'s (unedited) output so that its gradient exists.

        A point's tensor is often a view or a recomputation the model itself never uses (q split into heads, a norm's
        scale), so a backward hook on it, or nnsight's ``.grad`` of it, would see no gradient. When the point is
        requested under autograd, its host splices the output back in, with the model's own values bitwise
        (a copy, or ``_GradientThrough`` where it is a recomputation), so the rest of the
        forward, and the backward, run through the point."""
        return name in self.requested and torch.is_grad_enabled() and value.requires_grad


class _GradientThrough(torch.autograd.Function):
    """``value`` (the model's own tensor, exactly) whose gradient goes to ``through`` (the same values recomputed
    from hook points) instead of ``value``'s own graph: the backward runs through the points, the forward's numbers
    stay the model's."""

    @staticmethod
    def forward(ctx: Any, value: torch.Tensor, through: torch.Tensor) -> torch.Tensor:
        return value.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, torch.Tensor]:
        return None, grad


def _replace_first(value: Any, new: torch.Tensor) -> Any:
    return (new, *value[1:]) if isinstance(value, tuple) else new


def _linear_out_width(module: nn.Module) -> int:
    return module.weight.shape[1] if isinstance(module, Conv1D) else module.weight.shape[0]


# ----------------------------------------------------------------------------------------------------------------
# Plans: which HF modules play which part, found by the probe
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class NormPlan:
    """A norm module and its formula (found by probing it against TL's definitions)."""

    module: nn.Module
    path: str
    center: bool  # LayerNorm (subtract the mean) or RMSNorm
    eps: float
    weight_offset: float  # 1.0 for Gemma's (1 + w)
    group: PointGroup | None = None

    def affine(self, normalized: torch.Tensor) -> torch.Tensor:
        w = parameter(self.module, "weight")
        b = parameter(self.module, "bias")
        out = normalized
        if isinstance(w, torch.Tensor):
            out = out * (w.to(out.dtype) + self.weight_offset)
        if isinstance(b, torch.Tensor):
            out = out + b.to(out.dtype)
        return out

    def statistics(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(centred x, variance, scale), in float32 for half-precision inputs (as TL's bridge)."""
        xf = x.float() if x.dtype not in (torch.float32, torch.float64) else x
        xc = xf - xf.mean(-1, keepdim=True) if self.center else xf
        var = xc.pow(2).mean(-1, keepdim=True)
        return xc, var, (var + self.eps).sqrt()


@dataclass
class ProjectionPart:
    """Rows of one input projection's output that hold q, k or v: ``rows`` in (head, head_dim) order."""

    part: str  # "q" / "k" / "v"
    rows: slice | torch.Tensor
    heads: int
    head_dim: int


@dataclass
class AttentionPlan:
    module: nn.Module
    weights: Any  # unilens.weights.LayerWeights
    projections: list[tuple[nn.Module, list[ProjectionPart]]]
    first: nn.Module  # the projection called first: the per-head inputs are made in its pre-hook
    n_heads: int
    n_kv: int
    group: PointGroup | None = None
    norm: NormPlan | None = None  # the layer's input norm: per-head inputs are copies of ITS input (TL), renormed


@dataclass
class MlpPlan:
    host: nn.Module  # holds the PointGroup (the MLP, or the layer for bare fc1 -> fc2 MLPs)
    gate: nn.Module  # output = pre-activation (gate on gated MLPs)
    up: nn.Module | None  # gated MLPs: the up projection (TL hook_pre_linear)
    down: nn.Module  # input = post-activation
    fused_halves: str | None = None  # "gate_up" / "up_gate": one projection holds both halves
    group: PointGroup | None = None


@dataclass
class ResidPlan:
    layer: nn.Module
    site: nn.Module  # its input is resid_mid (the MLP's input norm, or the MLP)
    branch_end: nn.Module  # its output enters the layer output as resid_mid + factor * output
    factor: float  # 1.0 normally; Granite's residual_multiplier; 0.0: branch_end's output already holds resid_mid
    group: PointGroup | None = None


@dataclass
class LayerPlan:
    parts: dict[str, Any] = field(default_factory=dict)  # role -> plan
    refused: dict[str, str] = field(default_factory=dict)  # role or point -> reason


# ----------------------------------------------------------------------------------------------------------------
# Probing
# ----------------------------------------------------------------------------------------------------------------


def _probe_norm(module: nn.Module, path: str, config: Any) -> NormPlan | str:
    """The norm's formula, by comparing its output with TL's on random inputs; a reason string when none fits."""
    param = next(iter(module.parameters()), None)
    dtype = param.dtype if param is not None else torch.float32
    device = module_device(module)
    hidden = getattr(module, "normalized_shape", None)
    hidden = hidden[-1] if isinstance(hidden, (tuple, list)) else hidden
    if hidden is None and param is not None:
        hidden = param.shape[-1]
    if not isinstance(hidden, int):
        return f"{type(module).__name__} at {path}: cannot tell its width"
    eps_values = []
    for obj in (module, config):
        for key in NORM_EPS_KEYS:
            value = getattr(obj, key, None)
            if isinstance(value, float) and value not in eps_values:
                eps_values.append(value)
    eps_values += [e for e in (1e-5, 1e-6, 1e-12, 1e-8) if e not in eps_values]
    gen = torch.Generator(device="cpu").manual_seed(0)
    inputs = [torch.randn(2, 3, hidden, generator=gen) * s + 0.3 * s for s in (1.0, 1e-2)]
    inputs = [x.to(device=device, dtype=dtype) for x in inputs]
    tol = 1e-5 if dtype in (torch.float32, torch.float64) else 2e-2
    with torch.no_grad():
        try:
            outputs = [module(x) for x in inputs]
        except Exception as err:  # noqa: BLE001 - e.g. weights offloaded to meta: no formula can be checked
            return f"{type(module).__name__} at {path} could not be probed ({type(err).__name__}: {err})"
        if not all(isinstance(o, torch.Tensor) and o.shape == x.shape for o, x in zip(outputs, inputs)):
            return f"{type(module).__name__} at {path} does not return one tensor of its input's shape"
        for center in (True, False):
            for offset in (0.0, 1.0):
                for eps in eps_values:
                    plan = NormPlan(module, path, center, eps, offset)
                    ok = True
                    for x, out in zip(inputs, outputs):
                        xc, var, _ = plan.statistics(x)
                        expected = plan.affine(xc * torch.rsqrt(var + eps)).to(out.dtype)
                        scale = out.abs().max().clamp(min=1.0)
                        if not torch.allclose(expected, out, atol=tol * float(scale), rtol=tol):
                            ok = False
                            break
                    if ok:
                        return plan
    return (f"{type(module).__name__} at {path} is not (x - mean) / sqrt(var + eps) * w + b nor x / rms * w (or "
            "(1 + w)): no scale / normalized split of it is known")


def _attention_plan(attn: nn.Module, config: Any, layer: int) -> AttentionPlan | str:
    try:
        weights = layer_weights(attn, config, layer)
        n_heads, head_dim = weights.n_heads, weights.head_dim
        weights.W_Q  # noqa: B018 - resolves the q/k/v layout (raises where there is no per-head linear map)
    except (NotImplementedError, ValueError) as err:
        return f"no per-head linear q/k/v projection of the attention input ({err})"
    children = dict(attn.named_children())
    n_kv = weights.W_K.shape[0]
    projections: list[tuple[nn.Module, list[ProjectionPart]]] = []
    for names in _SEPARATE_QKV:
        if all(is_projection(children.get(n, nn.Identity())) for n in names):
            for part, name, heads in zip("qkv", names, (n_heads, n_kv, n_kv)):
                projections.append((children[name], [ProjectionPart(part, slice(0, heads * head_dim), heads,
                                                                     head_dim)]))
            break
    else:
        for fused_name in _FUSED_QKV:
            fused = children.get(fused_name)
            if fused is not None and is_projection(fused):
                rows = weights.fused_rows(fused)
                parts = []
                for part, idx, heads in zip("qkv", rows, (n_heads, n_kv, n_kv)):
                    contiguous = bool((idx[1:] - idx[:-1] == 1).all()) if idx.numel() > 1 else True
                    sel = slice(int(idx[0]), int(idx[-1]) + 1) if contiguous else idx
                    parts.append(ProjectionPart(part, sel, heads, head_dim))
                projections.append((fused, parts))
                break
    if not projections:
        return "no q/k/v projection found"
    return AttentionPlan(attn, weights, projections, projections[0][0], n_heads, n_kv)


def _mlp_plan(mlp: nn.Module | None, layer_module: nn.Module, parts: Any, calls: dict, mlp_input: Any
              ) -> MlpPlan | str:
    """The gate / up / down projections of a dense MLP, by data flow on the probe forward."""
    if mlp is None:  # bare fc1 -> act -> fc2 span (OPT, BioGPT)
        first = layer_module.get_submodule(parts.mlp_in)
        last = layer_module.get_submodule(parts.mlp_out)
        if _linear_out_width(first) != _in_width(last):
            return "the MLP's first and last projections do not meet in one width"
        return MlpPlan(layer_module, first, None, last)
    for name, module in mlp.named_modules():
        if name and (_MOE.search(type(module).__name__) or _MOE.search(name.rsplit(".", 1)[-1])):
            return (f"a mixture-of-experts MLP ({type(mlp).__name__}, with {name}): each token's neurons are those of "
                    "the experts its router picks, so there is no single per-token (batch, seq, d_mlp) activation")
    order = [m for m in calls.get("order", []) if any(m is x for x in mlp.modules())]
    linears = [m for m in order if is_projection(m)]
    if len(linears) < 2:
        return f"{type(mlp).__name__} does not run as projections around an activation"
    down = linears[-1]
    d_mlp = _in_width(down)
    x = mlp_input
    ins = [m for m in linears[:-1] if calls["inputs"].get(id(m)) is not None
           and _same(calls["inputs"][id(m)], x)]
    acts = [m for _, m in mlp.named_children() if not is_projection(m) and not isinstance(m, nn.Dropout)
            and not isinstance(m, PointGroup)]
    down_in = calls["inputs"].get(id(down))
    if len(ins) == 1 and _linear_out_width(ins[0]) == d_mlp:
        return MlpPlan(mlp, ins[0], None, down)
    if len(ins) == 1 and _linear_out_width(ins[0]) == 2 * d_mlp:
        out = calls["outputs"][id(ins[0])]
        a, b = out[..., :d_mlp], out[..., d_mlp:]
        for act in acts:
            with torch.no_grad():
                if _same(act(a) * b, down_in):
                    return MlpPlan(mlp, ins[0], ins[0], down, fused_halves="gate_up")
                if _same(act(b) * a, down_in):
                    return MlpPlan(mlp, ins[0], ins[0], down, fused_halves="up_gate")
        return f"{type(mlp).__name__}'s fused gate/up projection: could not tell which half is the gate"
    if len(ins) == 2 and all(_linear_out_width(m) == d_mlp for m in ins):
        out0, out1 = (calls["outputs"][id(m)] for m in ins)
        for act in acts:
            with torch.no_grad():
                if _same(act(out0) * out1, down_in):
                    return MlpPlan(mlp, ins[0], ins[1], down)
                if _same(act(out1) * out0, down_in):
                    return MlpPlan(mlp, ins[1], ins[0], down)
        return f"{type(mlp).__name__}: could not tell its gate projection from its up projection"
    return f"{type(mlp).__name__} is not in-projection(s) -> activation -> down projection"


def _in_width(module: nn.Module) -> int:
    return module.weight.shape[0] if isinstance(module, Conv1D) else module.weight.shape[1]


def _same(a: Any, b: Any, exact: bool | None = None) -> bool:
    """Equal up to the rounding of the dtype the model computes in (the probe's data-flow test); ``exact``: the
    model computes in float32 / float64 (default: read from the tensors' dtypes)."""
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor) or a.numel() != b.numel():
        return False
    if a is b:
        return True
    if exact is None:
        exact = all(t.dtype in (torch.float32, torch.float64) for t in (a, b))
    tol = 1e-5 if exact else 2e-2
    a, b = a.reshape(-1).float(), b.reshape(-1).float()
    return bool(torch.allclose(a, b, atol=tol * float(b.abs().max().clamp(min=1.0)), rtol=10 * tol))


# ----------------------------------------------------------------------------------------------------------------
# Installation
# ----------------------------------------------------------------------------------------------------------------


def _group_on(host: nn.Module, names: list[str]) -> PointGroup:
    group = getattr(host, "unilens_points", None)
    if isinstance(group, PointGroup):
        for name in names:
            if not hasattr(group, name):
                group.add_module(name, HookPoint())
        return group
    group = PointGroup(names)
    host.add_module("unilens_points", group)
    return group


@dataclass
class HookPointSetup:
    """What ``install_hook_points`` found: per layer the plan of each role (or the reason it is refused), the final
    norm, and the path of every point's HookPoint."""

    model_type: str
    layers: list[LayerPlan]
    final_norm: NormPlan | None
    final_norm_reason: str | None
    paths: dict[tuple[str, int | None], str]  # (point, layer) -> dotted path of its HookPoint module
    unflatten: Callable[[torch.Tensor], torch.Tensor]
    active: list[PointGroup] = field(default_factory=list)  # groups with torch hooks registered in this trace
    registered: list[Any] = field(default_factory=list)  # plans whose torch hooks are registered in this trace

    # --- queries -----------------------------------------------------------------------------------------------
    def reason(self, point: str, layer: int | None) -> str | None:
        """Why ``point`` is refused at ``layer`` (None: it is available)."""
        if point in MODEL_POINTS:
            return self.final_norm_reason if self.final_norm is None else None
        role, name = _POINTS[point]
        plan = self.layers[layer]
        if point in plan.refused:
            return plan.refused[point]
        if role not in plan.parts:
            return plan.refused.get(role, "not found in this layer")
        return None

    def path(self, point: str, layer: int | None) -> str | None:
        return self.paths.get((point, layer)) if self.reason(point, layer) is None else None

    def check(self, point: str, layer: int | None) -> str:
        reason = self.reason(point, layer)
        if reason is not None:
            raise UnsupportedHookPoint(point, self.model_type, reason, layer)
        return self.paths[(point, layer)]

    # --- requests ----------------------------------------------------------------------------------------------
    def request(self, point: str, layer: int | None) -> None:
        """Make ``point`` run in the forwards of the current trace (registers the torch hooks it needs)."""
        self.check(point, layer)
        if point in MODEL_POINTS:
            plan, name = self.final_norm, point[len("final_norm_"):]
            register = _register_norm
        else:
            role, name = _POINTS[point]
            plan = self.layers[layer].parts[role]
            register = {"input_norm": _register_norm, "mlp_norm": _register_norm, "attention": _register_attention,
                        "mlp": _register_mlp, "resid": _register_resid}[role]
        group = plan.group
        group.requested.add(name)
        if not any(p is plan for p in self.registered):  # one group may serve two plans (OPT's layer: MLP, resid)
            register(plan, self)
            self.registered.append(plan)
            if group not in self.active:
                self.active.append(group)

    def request_all(self) -> None:
        """Every available point of every layer (the forward-order recording)."""
        for layer in range(len(self.layers)):
            for point in LAYER_POINTS:
                if self.reason(point, layer) is None:
                    self.request(point, layer)
        for point in MODEL_POINTS:
            if self.reason(point, None) is None:
                self.request(point, None)

    def clear(self) -> None:
        """End of a trace: remove every torch hook and request (an ordinary forward runs untouched)."""
        for group in self.active:
            for handle in group.handles:
                handle.remove()
            group.handles.clear()
            group.requested.clear()
            group.state.clear()
        self.active.clear()
        self.registered.clear()


def install_hook_points(hf_model: nn.Module, arch: Any, attention_modules: list, unflatten: Callable
                        ) -> HookPointSetup:
    """Find the parts that host the hook points and attach their groups (``_install``); a model whose probe forward
    fails still loads, with every point refused and the error as the reason.

    Example:
        >>> from unilens.testing import tiny_model
        >>> from unilens.discovery import discover
        >>> hf, _ = tiny_model("gpt2")
        >>> setup = install_hook_points(hf, discover(hf), [hf.transformer.h[i].attn for i in range(2)], lambda t: t)
        >>> setup.reason("mlps_pre_linear", 0)
        'the MLP is not gated: its one in-projection is mlps_pre_activation'
    """
    try:
        return _install(hf_model, arch, attention_modules, unflatten)
    except Exception as err:  # noqa: BLE001 - refuse the points, keep the model usable
        reason = f"the probe that locates the hook points failed on this model ({type(err).__name__}: {err})"
        layers = [LayerPlan(refused={role: reason for role, _ in _POINTS.values()}) for _ in arch.layers]
        return HookPointSetup(arch.model_type, layers, None, reason, {}, unflatten)


def _install(hf_model: nn.Module, arch: Any, attention_modules: list, unflatten: Callable) -> HookPointSetup:
    """Find the parts that host the hook points (one probe forward) and attach their ``unilens_points`` groups.

    Call on the plain HF model before nnsight wraps it (``StandardizedTransformer`` does). The steps, per layer:
    the norms feeding the attention and the MLP (``_plan_norms``), the attention's projections
    (``_plan_attention``), the MLP's gate / up / down (``_plan_mlp``), the residual between the branches
    (``_plan_resid``), and the no-op hooks some modules need (``_keep_hook_path``); then the final norm.

    Example:
        >>> from unilens.testing import tiny_model
        >>> from unilens.discovery import discover
        >>> hf, _ = tiny_model("llama")
        >>> arch = discover(hf)
        >>> setup = install_hook_points(hf, arch, [hf.model.layers[i].self_attn for i in range(2)], lambda t: t)
        >>> setup.reason("layers_resid_mid", 0) is None, setup.paths[("mlps_pre_activation", 0)]
        (True, 'model.layers.0.mlp.unilens_points.pre')
    """
    config = text_config(hf_model.config)
    layers_module = hf_model.get_submodule(arch.layers_path)
    calls = _probe_calls(hf_model, layers_module, len(arch.layers))
    paths: dict[tuple[str, int | None], str] = {}
    layers: list[LayerPlan] = []
    for i in range(len(arch.layers)):
        attn = attention_modules[i] if i < len(attention_modules) else None
        layer = _LayerView.of(arch, i, layers_module[i], attn, calls)
        plan = LayerPlan()
        layers.append(plan)
        found, found_mlp = _plan_norms(layer, plan, paths, config)
        _plan_attention(layer, plan, paths, config, found)
        _plan_mlp(layer, plan, paths)
        _plan_resid(layer, plan, paths, arch, found_mlp)
        _keep_hook_path(layer, plan)
    final, final_reason = _plan_final_norm(hf_model, arch, config, paths)
    return HookPointSetup(arch.model_type, layers, final, final_reason, paths, unflatten)


def _probe_calls(hf_model: nn.Module, layers_module: nn.Module, n: int) -> dict[str, Any]:
    """One probe forward (``unilens.arch.probe``) recording, for every module inside the first ``n`` layers, the order
    of first calls (``"order"``) and the first call's input (``"inputs"``) and output (``"outputs"``), by ``id``."""
    calls: dict[str, Any] = {"order": [], "inputs": {}, "outputs": {}}

    def record(mod, args, kwargs, out):
        x = args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values()), None))
        if id(mod) not in calls["inputs"]:
            calls["order"].append(mod)
            calls["inputs"][id(mod)] = x
            calls["outputs"][id(mod)] = _first(out)

    watched = set()
    with Probe(hf_model) as probe:
        for i in range(n):
            for module in layers_module[i].modules():
                if id(module) not in watched:
                    watched.add(id(module))
                    probe.forward_hook(module, record, with_kwargs=True)
        probe.run()
    return calls


@dataclass
class _LayerView:
    """One layer as the planning steps see it: its parts, what the probe forward saw enter them, and its norms
    outside the attention / MLP (by the tensor they hand on)."""

    i: int
    base: str  # dotted path of the layer
    parts: Any  # unilens.arch.discovery.LayerParts
    module: nn.Module
    attn: nn.Module | None
    mlp: nn.Module | None
    mlp_first: nn.Module | None  # the module whose input is the MLP input (the MLP, or fc1 of a bare span)
    attn_in: Any  # the attention's input in the probe forward
    mlp_in: Any  # the MLP's input in the probe forward
    norms: list[tuple[str, nn.Module]]
    calls: dict[str, Any]

    @classmethod
    def of(cls, arch: Any, i: int, layer_module: nn.Module, attn: nn.Module | None, calls: dict) -> "_LayerView":
        parts = arch.layers[i]
        mlp = layer_module.get_submodule(parts.mlp) if parts.mlp else None
        mlp_first = layer_module.get_submodule(parts.mlp_in) if parts.mlp_in else None
        attn_in = calls["inputs"].get(id(attn)) if attn is not None else None
        mlp_in = calls["inputs"].get(id(mlp_first)) if mlp_first is not None else None
        inner = set()
        for sub in (attn, mlp):
            if sub is not None:
                inner.update(id(m) for m in sub.modules())
        norms = [(name, m) for name, m in layer_module.named_modules()
                 if name and id(m) not in inner and _NORM.search(type(m).__name__) and id(m) in calls["outputs"]]
        return cls(i, f"{arch.layers_path}.{i}", parts, layer_module, attn, mlp, mlp_first, attn_in, mlp_in, norms,
                   calls)

    def feeding(self, target: Any) -> tuple[str, nn.Module] | None:
        """The norm whose output is ``target`` (the very tensor, else an equal one)."""
        if target is None:
            return None
        outputs = self.calls["outputs"]
        same = [(name, m) for name, m in self.norms if outputs[id(m)] is target]
        equal = [(name, m) for name, m in self.norms if _same(outputs[id(m)], target)]
        return (same or equal or [None])[0]


def _plan_norms(layer: _LayerView, plan: LayerPlan, paths: dict, config: Any
                ) -> tuple[tuple[str, nn.Module] | None, tuple[str, nn.Module] | None]:
    """The norms feeding the attention (``input_norm``) and the MLP (``mlp_norm``); returns both (None: none)."""
    found = layer.feeding(layer.attn_in) if layer.attn is not None else None
    _serve_norm(layer, plan, paths, config, "input_norm", found,
                "this layer has no softmax attention (hybrid model)" if layer.attn is None else None,
                ("input_norms_scale", "input_norms_normalized"))
    found_mlp = layer.feeding(layer.mlp_in) if layer.mlp_first is not None else None
    mlp_refusal = None
    if layer.mlp_first is None:
        mlp_refusal = "this layer has no MLP"
    elif found is not None and found_mlp is not None and found_mlp[1] is found[1]:
        mlp_refusal = ("parallel block: the MLP reads the same norm output as the attention; use "
                       "input_norms_scale / input_norms_normalized")
    _serve_norm(layer, plan, paths, config, "mlp_norm", found_mlp, mlp_refusal,
                ("post_attention_norms_scale", "post_attention_norms_normalized"))
    return found, found_mlp


def _serve_norm(layer: _LayerView, plan: LayerPlan, paths: dict, config: Any, part: str,
                found: tuple[str, nn.Module] | None, refusal: str | None, points: tuple[str, str]) -> None:
    """Serve ``points`` (scale, normalized) from the norm ``found`` feeding a branch, or record why not."""
    if refusal is None and found is None:
        branch = "attention" if part == "input_norm" else "MLP"
        refusal = (f"the {branch} reads the residual stream directly (no norm before it; e.g. OLMo 2 "
                   "normalizes the branch outputs instead)")
    result = refusal if refusal is not None else _probe_norm(found[1], f"{layer.base}.{found[0]}", config)
    if isinstance(result, str):
        plan.refused[part] = result
        return
    plan.parts[part] = result
    result.group = _group_on(found[1], ["scale", "normalized"])
    for point in points:
        paths[(point, layer.i)] = f"{layer.base}.{found[0]}.unilens_points.{_POINTS[point][1]}"


def _plan_attention(layer: _LayerView, plan: LayerPlan, paths: dict, config: Any,
                    found: tuple[str, nn.Module] | None) -> None:
    """The attention's q/k/v projections (pre-rotary q/k, the per-head inputs), or why not."""
    if layer.attn is None:
        plan.refused["attention"] = "this layer has no softmax attention (hybrid model)"
        return
    result = _attention_plan(layer.attn, config, layer.i)
    if isinstance(result, str):
        plan.refused["attention"] = result
        return
    calls = layer.calls
    if not all(_same(calls["inputs"].get(id(p)), layer.attn_in) for p, _ in result.projections):
        plan.refused["attention"] = "the q/k/v projections do not read the attention's input"
        return
    called = [m for m in calls["order"] if any(m is p for p, _ in result.projections)]
    result.first = called[0] if called else result.first
    result.norm = plan.parts.get("input_norm")
    if found is not None and result.norm is None:
        for point in ("attention_inputs_per_head", "attention_queries_input", "attention_keys_input",
                      "attention_values_input"):
            plan.refused[point] = ("the per-head inputs are copies of the input norm's input, but that "
                                   f"norm cannot be re-applied per head: {plan.refused['input_norm']}")
    plan.parts["attention"] = result
    result.group = _group_on(layer.attn, list(_ATTENTION_INPUTS) + ["q", "k"])
    for point, (role, name) in _POINTS.items():
        if role == "attention":
            paths[(point, layer.i)] = f"{layer.base}.{layer.parts.attention}.unilens_points.{name}"


def _plan_mlp(layer: _LayerView, plan: LayerPlan, paths: dict) -> None:
    """The MLP's gate / up / down projections (its neurons), or why not."""
    if layer.mlp_first is None:
        plan.refused["mlp"] = "this layer has no MLP"
        return
    result = _mlp_plan(layer.mlp, layer.module, layer.parts, layer.calls, layer.mlp_in)
    if isinstance(result, str):
        plan.refused["mlp"] = result
        return
    plan.parts["mlp"] = result
    names = ["pre", "post"] + (["pre_linear"] if result.up is not None else [])
    result.group = _group_on(result.host, names)
    host_path = f"{layer.base}.{layer.parts.mlp}" if layer.mlp is not None else layer.base
    for point in ("mlps_pre_activation", "mlps_pre_linear", "mlps_post_activation"):
        paths[(point, layer.i)] = f"{host_path}.unilens_points.{_POINTS[point][1]}"
    if result.up is None:
        plan.refused["mlps_pre_linear"] = "the MLP is not gated: its one in-projection is mlps_pre_activation"


def _plan_resid(layer: _LayerView, plan: LayerPlan, paths: dict, arch: Any,
                found_mlp: tuple[str, nn.Module] | None) -> None:
    """``resid_mid``: the residual between the attention and the MLP branch, or why not."""
    result = _resid_plan(layer, arch, found_mlp)
    if isinstance(result, str):
        plan.refused["resid"] = result
        return
    plan.parts["resid"] = result
    result.group = _group_on(layer.module, ["resid_mid"])
    paths[("layers_resid_mid", layer.i)] = f"{layer.base}.unilens_points.resid_mid"


def _keep_hook_path(layer: _LayerView, plan: LayerPlan) -> None:
    """Modules read from before their point's hook is registered get a no-op forward hook, for good.

    A point's torch hooks are registered when a trace requests it, i.e. once the trace has been served the previous
    read. When that read is the INPUT of the very module whose output serves the point (OPT's bare MLP: mlps_input
    is fc1's input, mlps_pre_activation fc1's output), the module's call is already under way, and torch took its
    hook-free fast path: a forward hook added now does not run in this call, and the point is never served. A no-op
    forward hook, kept for good on exactly these modules, keeps their call on torch's hook-aware path (which looks
    up the forward hooks after `forward` returns), so the late hook runs.
    """
    read_inputs = [m for m in (layer.module, layer.attn, layer.mlp_first) if m is not None]
    served = [plan.parts[role].module for role in ("input_norm", "mlp_norm") if role in plan.parts]
    if "mlp" in plan.parts:
        served += [m for m in (plan.parts["mlp"].gate, plan.parts["mlp"].up) if m is not None]
    if "attention" in plan.parts:
        served += [m for m, _ in plan.parts["attention"].projections]
    for module in served:
        if any(module is m for m in read_inputs) and not getattr(module, "_unilens_live_hooks", False):
            module.register_forward_hook(_no_op_hook)
            object.__setattr__(module, "_unilens_live_hooks", True)


def _plan_final_norm(hf_model: nn.Module, arch: Any, config: Any, paths: dict) -> tuple[NormPlan | None, str | None]:
    """The final norm's plan (``final_norm_scale`` / ``final_norm_normalized``), or None and why not."""
    if arch.final_norm_path is None:
        return None, "the model has no final norm before the unembedding"
    norm = hf_model.get_submodule(arch.final_norm_path)
    result = _probe_norm(norm, arch.final_norm_path, config)
    if isinstance(result, str):
        return None, result
    result.group = _group_on(norm, ["scale", "normalized"])
    for point in MODEL_POINTS:
        paths[(point, None)] = f"{arch.final_norm_path}.unilens_points.{point[len('final_norm_'):]}"
    return result, None


def _no_op_hook(module: nn.Module, args: Any, output: Any) -> None:
    """Keeps a module's call on torch's hook-aware path (see ``_keep_hook_path``); changes nothing."""
    return None


def _residual_factor(x: torch.Tensor, o: torch.Tensor, y: torch.Tensor) -> float | None:
    """The factor ``c`` with ``y == x + c * o`` (the layer output ``y`` as the MLP branch's input ``x`` plus ``c`` times
    the branch's output ``o``: 1 on most models, Granite's ``residual_multiplier``), or None when ``y`` is not that.

    The test is elementwise, against the rounding of the residual add itself, never against a difference: on real
    weights the residual carries a few huge coordinates (SmolLM2: |x| ~ 2.5e4 from layer 12 on, the MLP output ~ 10),
    so ``y - x`` loses ~ eps * |x| to cancellation, far more than a tolerance scaled by ``o`` allows. One add in the
    model's dtype, ``fl(x + fl(c * o))``, is off ``x + c * o`` by at most eps * (|x| + |c * o|) per element (two
    roundings of at most eps / 2 each); twice that is allowed. A norm after the residual add (post-norm blocks),
    or any other transform of the sum, is off by the size of the sum itself and fails.

    ``c`` is 1 when that fits; else fitted by least squares with each element weighted by 1 / (|x| + |o|)**2 (its
    rounding's scale), and the fit's own error bound (from the same per-element bound) is added to the tolerance.

    Example:
        >>> x, o = torch.tensor([[2.5e4, 1.0, -3.0]]), torch.tensor([[0.3, -7.0, 2.0]])
        >>> _residual_factor(x, o, x + o), round(_residual_factor(x, o, x + 0.25 * o), 6)
        (1.0, 0.25)
        >>> _residual_factor(x, o, (x + o) / 2) is None  # not a residual add: a transform of the sum
        True
    """
    if not (x.is_floating_point() and o.is_floating_point() and y.is_floating_point()):
        return None
    eps = torch.finfo(y.dtype).eps
    x, o, y = (t.reshape(y.shape).double() for t in (x, o, y))
    if bool(((y - x - o).abs() <= 2 * eps * (x.abs() + o.abs())).all()):
        return 1.0
    s = x.abs() + o.abs()  # each element's rounding scale
    t = torch.where(s > 0, o / s.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(s))
    denom = float((t * t).sum())
    if denom == 0.0:
        return None
    c = float(((y - x) / s.clamp_min(torch.finfo(torch.float64).tiny) * t).sum()) / denom
    # |c - c_true| <= sum(|rounding_i| * |t_i| / s_i) / sum(t_i**2) <= eps * max(1, |c|) * sum(|t|) / sum(t**2)
    c_err = eps * max(1.0, abs(c)) * float(t.abs().sum()) / denom
    tol = 2 * eps * (x.abs() + abs(c) * o.abs()) + 2 * c_err * o.abs()
    return c if bool(((y - x - c * o).abs() <= tol).all()) else None


def _resid_plan(layer: _LayerView, arch: Any, found_mlp: tuple[str, nn.Module] | None) -> ResidPlan | str:
    if arch.parallel:
        return ("parallel block: the attention and the MLP both read the layer input, so no residual exists between "
                "them")
    attn, mlp_first, layer_module, calls = layer.attn, layer.mlp_first, layer.module, layer.calls
    if attn is None:
        return "this layer has no softmax attention (hybrid model): no residual after an attention"
    if mlp_first is None:
        return "this layer has no MLP"
    site = found_mlp[1] if found_mlp is not None else mlp_first
    x = calls["inputs"].get(id(site))
    y = calls["outputs"].get(id(layer_module))
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        return "the MLP branch's input or the layer's output was not seen in the probe forward"
    mlp_last = layer_module.get_submodule(layer.parts.mlp_out)
    inner_attn = {id(m) for m in attn.modules()}
    candidates = [mlp_last] + [m for _, m in layer.norms if id(m) not in inner_attn and m is not site]
    # the module called last is the one nearest the residual add (a post-MLP norm before the MLP itself)
    called = {id(m): k for k, m in enumerate(calls["order"])}
    candidates.sort(key=lambda m: -called.get(id(m), -1))
    if x.numel() != y.numel():
        return "the MLP branch's input and the layer's output differ in size"
    exact = y.dtype in (torch.float32, torch.float64)
    for module in candidates:
        o = calls["outputs"].get(id(module))
        if not isinstance(o, torch.Tensor) or o.numel() != y.numel():
            continue
        factor = _residual_factor(x, o, y)  # OPT runs the MLP on flattened tokens (batch * seq, hidden): reshaped
        if factor is not None:
            return ResidPlan(layer_module, site, module, factor)
        if module is mlp_last and _same(o.reshape(y.shape), y, exact):  # the MLP adds the residual itself (Bloom)
            return ResidPlan(layer_module, site, module, 0.0)
    return ("the layer output is not the MLP branch's input plus the MLP branch (e.g. a norm after the residual add), "
            "so no editable residual between the branches is known")


# ----------------------------------------------------------------------------------------------------------------
# The torch hooks, registered per trace on request
# ----------------------------------------------------------------------------------------------------------------


def _register_norm(plan: NormPlan, setup: HookPointSetup) -> None:
    group = plan.group

    def post(module, args, output):
        x = args[0]
        xc, var, scale = plan.statistics(x)  # (batch, seq, hidden), (batch, seq, 1), (batch, seq, 1)
        scale, scale_edited = group.run("scale", scale)
        scale_grad = group.routes_grad("scale", scale)
        normalized = xc / scale if scale_edited or scale_grad else xc * torch.rsqrt(var + plan.eps)
        normalized, normalized_edited = group.run("normalized", normalized)
        out = _first(output)
        if scale_edited or normalized_edited:
            return _replace_first(output, plan.affine(normalized).to(out.dtype))
        if scale_grad or group.routes_grad("normalized", normalized):  # the model's values, the points' gradient
            return _replace_first(output, _GradientThrough.apply(out, plan.affine(normalized).to(out.dtype)))
        return None

    group.handles.append(plan.module.register_forward_hook(post))


def _register_mlp(plan: MlpPlan, setup: HookPointSetup) -> None:
    group = plan.group
    unflatten = setup.unflatten

    def gate_post(module, args, output):
        out = _first(output)
        shaped = unflatten(out)  # (batch, seq, d_mlp) or (batch, seq, 2 * d_mlp)
        if plan.fused_halves is None:
            new, edited = group.run("pre", shaped)
            spliced = edited or (new is not out and group.routes_grad("pre", new))  # a copy: the same values
            return _replace_first(output, new.reshape(out.shape)) if spliced else None
        d = shaped.shape[-1] // 2
        first, second = shaped[..., :d], shaped[..., d:]
        gate, up = (first, second) if plan.fused_halves == "gate_up" else (second, first)
        gate, gate_edited = group.run("pre", gate)
        up, up_edited = group.run("pre_linear", up)
        if not (gate_edited or up_edited or group.routes_grad("pre", gate) or group.routes_grad("pre_linear", up)):
            return None
        halves = (gate, up) if plan.fused_halves == "gate_up" else (up, gate)
        return _replace_first(output, torch.cat(halves, dim=-1).reshape(out.shape))

    def up_post(module, args, output):
        out = _first(output)
        new, edited = group.run("pre_linear", unflatten(out))
        spliced = edited or (new is not out and group.routes_grad("pre_linear", new))
        return _replace_first(output, new.reshape(out.shape)) if spliced else None

    def down_pre(module, args):
        x = args[0]
        new, edited = group.run("post", unflatten(x))
        spliced = edited or (new is not x and group.routes_grad("post", new))
        return (new.reshape(x.shape), *args[1:]) if spliced else None

    group.handles.append(plan.gate.register_forward_hook(gate_post))
    if plan.up is not None and plan.up is not plan.gate:
        group.handles.append(plan.up.register_forward_hook(up_post))
    group.handles.append(plan.down.register_forward_pre_hook(down_pre))


def _register_resid(plan: ResidPlan, setup: HookPointSetup) -> None:
    group = plan.group

    def site_pre(module, args, kwargs):
        group.state.pop("delta", None)
        key = "hidden_states" if not args else None
        x = args[0] if args else kwargs["hidden_states"]
        shaped = setup.unflatten(x)  # (batch, seq, hidden)
        new, edited = group.run("resid_mid", shaped)
        routed = group.routes_grad("resid_mid", new)
        if new is x or not (edited or routed):
            return None  # x itself: edited in place, or read where the forward's graph already runs through it
        if new is shaped and not routed:
            return None  # edited in place through a view: the residual the layer adds later is this same tensor
        new = new.reshape(x.shape)
        group.state["delta"] = new - x
        if key is None:
            return (new, *args[1:]), kwargs
        return args, {**kwargs, key: new}

    def end_post(module, args, output):
        delta = group.state.pop("delta", None)
        if delta is None:
            return None
        out = _first(output)
        scaled = delta if plan.factor == 0.0 else delta / plan.factor
        return _replace_first(output, out + scaled.reshape(out.shape).to(out.dtype))

    group.handles.append(plan.site.register_forward_pre_hook(site_pre, with_kwargs=True))
    group.handles.append(plan.branch_end.register_forward_hook(end_post))


def _register_attention(plan: AttentionPlan, setup: HookPointSetup) -> None:
    group = plan.group

    def make_inputs(x: torch.Tensor) -> None:
        """The per-head copies of ``x`` (the residual the input norm reads, or the attention's input where the layer
        has no input norm) through their points; the heads whose copy was edited are kept for the projections."""
        group.state.pop("inputs", None)
        if not group.requested.intersection(_ATTENTION_INPUTS):
            return
        base = x[:, :, None, :].expand(*x.shape[:2], plan.n_heads, x.shape[-1])  # (batch, seq, heads, hidden)
        attn_in, _ = group.run("attn_in", base.contiguous())
        inputs = {}
        for part, name, heads in (("q", "q_input", plan.n_heads), ("k", "k_input", plan.n_kv),
                                  ("v", "v_input", plan.n_kv)):
            value = attn_in[:, :, :heads]
            value, _ = group.run(name, value.clone() if name in group.requested else value)
            changed = (value != base[:, :, :heads]).flatten(start_dim=-1).any(dim=-1)  # (batch, seq, heads)
            heads_changed = changed.reshape(-1, heads).any(dim=0).nonzero().flatten().tolist()
            if heads_changed:
                inputs[part] = (value, heads_changed)
        group.state["inputs"] = inputs

    def norm_pre(module, args):
        make_inputs(args[0])  # TL forks the residual BEFORE ln1 (and applies ln1 per head)

    def first_pre(module, args, kwargs):
        make_inputs(args[0] if args else kwargs["hidden_states"])

    weights = {"q": (lambda: plan.weights.W_Q, lambda: plan.weights.b_Q),
               "k": (lambda: plan.weights.W_K, lambda: plan.weights.b_K),
               "v": (lambda: plan.weights.W_V, lambda: plan.weights.b_V)}

    def make_post(parts: list[ProjectionPart]):
        def post(module, args, output):
            out = _first(output)  # (batch, seq, rows)
            new = out
            inputs = group.state.get("inputs") or {}
            for part in parts:
                if part.part not in inputs:
                    continue
                value, heads = inputs[part.part]  # (batch, seq, heads, hidden)
                w, b = weights[part.part][0]()[heads], weights[part.part][1]()[heads]  # (n, hidden, d), (n, d)
                w, b = w.to(out.device), b.to(out.device)  # offloaded layers give CPU copies
                chosen = value[:, :, heads]  # (batch, seq, n, hidden)
                if plan.norm is not None:  # the input norm, per head copy
                    xc, var, _ = plan.norm.statistics(chosen)
                    chosen = plan.norm.affine(xc * torch.rsqrt(var + plan.norm.eps)).to(value.dtype)
                projected = torch.einsum("bsnh,nhd->bsnd", chosen.to(w.dtype), w) + b
                if new is out:
                    new = out.clone()
                per_head = new[..., part.rows].unflatten(-1, (part.heads, part.head_dim))  # (batch, seq, heads, d)
                per_head = per_head.clone()
                per_head[:, :, heads] = projected.to(out.dtype)  # only the edited heads are recomputed
                new[..., part.rows] = per_head.flatten(start_dim=-2)
            for part in parts:
                name = part.part
                if name not in ("q", "k") or name not in group.requested:
                    continue
                rows = part.rows
                heads4 = new[..., rows].unflatten(-1, (part.heads, part.head_dim)).transpose(1, 2)
                heads4, edited = group.run(name, heads4)  # (batch, heads, seq, head_dim)
                if edited or group.routes_grad(name, heads4):  # routed: a copy of the same values
                    if new is out:
                        new = out.clone()
                    new[..., rows] = heads4.transpose(1, 2).flatten(start_dim=-2).to(out.dtype)
            return None if new is out else _replace_first(output, new)

        return post

    if plan.norm is not None:  # the points run where the residual enters the input norm (before ln1's points)
        group.handles.append(plan.norm.module.register_forward_pre_hook(norm_pre))
    else:
        group.handles.append(plan.first.register_forward_pre_hook(first_pre, with_kwargs=True))
    for module, parts in plan.projections:
        group.handles.append(module.register_forward_hook(make_post(parts)))


# ----------------------------------------------------------------------------------------------------------------
# Accessor
# ----------------------------------------------------------------------------------------------------------------


class HookPointAccessor(LayerIndexed):
    """``model.<point>[i]``: read (``.save()``) or assign one hook point of layer ``i`` inside a trace.

    Example:
        >>> from unilens import StandardizedTransformer
        >>> from unilens.testing import tiny_model
        >>> model = StandardizedTransformer(*tiny_model("llama"))
        >>> with model.trace("The cat sat"):
        ...     pre = model.mlps_pre_activation[0].save()
        ...     model.mlps_post_activation[0] = torch.zeros_like(model.mlps_post_activation[0])
        ...     out = model.mlps_output[0].save()
        >>> d_mlp = model.module_accessor.get_mlp(0).gate_proj.out_features
        >>> pre.shape[-1] == d_mlp, float(out.detach().abs().max())
        (True, 0.0)
    """

    # where the installing setup lives on the model, the refusal it raises, and what it installs (for the message):
    # unilens.hooks.routing's accessor is this one over the routing setup
    setup_attribute: str = "_hook_point_setup"
    unsupported: type[UnsupportedHookPoint] = UnsupportedHookPoint
    installs: str = "hook points"

    def __init__(self, model: Any, point: str):
        super().__init__(model, point)
        self.point = point

    def _envoy(self, i: int | None):
        setup = self.model.__dict__.get(self.setup_attribute)
        if setup is None:
            model_type = getattr(getattr(self.model, "architecture", None), "model_type", "remote")
            raise self.unsupported(self.point, model_type, f"{self.installs} are installed on a locally loaded model "
                                   "only (remote mode has none)")
        path = setup.check(self.point, i)
        interleaver = getattr(self.model, "interleaver", None)
        if interleaver is not None and not interleaver.interleaving:
            raise ValueError(f"{self._label(i)} can only be read or set inside `with model.trace(...)` or "
                             "`with model.generate(...)`: outside one there is no forward to take it from.")
        setup.request(self.point, i)
        self.model._note_read(self.point, i)
        return self.model._envoy_at(path)

    def _layout(self) -> ResidualLayout:
        """The layers' layout (``unilens.core.layouts``): a per-layer point is served as ``(batch, seq, ...)`` like
        every tensor of the layers (XLNet runs them sequence first, ProphetNet on its main and n-gram streams)."""
        return getattr(getattr(self.model, "architecture", None), "residual_layout", None) or ResidualLayout()

    def _get(self, i: int) -> torch.Tensor:
        return self._layout().to_residual(self._envoy(i).output)

    def _set(self, i: int, value: torch.Tensor) -> None:
        layout, envoy = self._layout(), self._envoy(i)
        if layout.is_standard:
            self._assign(envoy, self._label(i), value)
            return
        current = envoy.output  # in the layers' layout: the edit goes back in place
        _check_shape(self._label(i), value, layout.to_residual(current), self._allow_nonfinite())
        envoy.output = layout.to_module(value, current)

    def get(self) -> torch.Tensor:
        """The whole-model point (``final_norm_*``)."""
        return self._envoy(None).output

    def set(self, value: torch.Tensor) -> None:
        self._assign(self._envoy(None), self._label(None), value)
