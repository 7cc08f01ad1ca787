"""Where two implementations of a model diverge: `diff_models` (propagated and isolated rows against a noise
yardstick) and `diff_model_implementations`."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..arch.discovery import ModuleMap
from .kernels import _as_dtype

__all__ = ["DivergenceReport", "DivergenceRow", "diff_model_implementations", "diff_models"]


# ================================================================================================================
# 4. Whole-model divergence
# ================================================================================================================

# transformers' eager-vs-sdpa test tolerances (numerics.md; tests/test_modeling_common.py): (atol, rtol).
_MODEL_TOLERANCES = {torch.float32: (1e-6, 1e-4), torch.float16: (5e-3, 5e-3), torch.bfloat16: (1e-2, 1e-2),
                     torch.float64: (1e-12, 1e-10)}
_COMPONENTS = ("attention", "mlp", "residual")


@dataclass
class DivergenceRow:
    layer: int
    component: str  # "attention" | "mlp" | "residual" (the decoder layer's output)
    max_abs: float
    mean_abs: float
    tolerance: float
    op: str | None = None  # for the first isolated attention fault: the op inside it that first diverges

    @property
    def exceeds(self) -> bool:
        return not (self.max_abs <= self.tolerance)


@dataclass
class DivergenceReport:
    """Per layer and component errors between two models.

    ``rows``: propagated errors (each model runs end to end; error at a layer includes what it inherited), with
    ``first_divergence`` in forward order. ``isolated``: each layer / attention / MLP of model b fed model a's exact
    inputs for it, compared with model a's output, against a noise yardstick (model a's own rounding at that module,
    from a higher-precision copy), with ``first_fault``: the first module whose own error exceeds the yardstick.
    In low precision the propagated errors grow with depth by rounding alone, so ``first_fault`` is the verdict.
    """

    rows: list[DivergenceRow]
    label_a: str = "a"
    label_b: str = "b"
    notes: list[str] = field(default_factory=list)
    isolated: list[DivergenceRow] = field(default_factory=list)

    @property
    def first_divergence(self) -> DivergenceRow | None:
        return next((r for r in self.rows if r.exceeds), None)

    @property
    def first_fault(self) -> DivergenceRow | None:
        return next((r for r in self.isolated if r.exceeds), None)

    @property
    def diverged(self) -> bool:
        return self.first_divergence is not None

    @property
    def faulty(self) -> bool:
        return self.first_fault is not None

    def __str__(self) -> str:
        first, fault = self.first_divergence, self.first_fault
        title = (f"divergence {self.label_a} vs {self.label_b}: "
                 + (f"first at layer {first.layer} {first.component}" if first else "none above tolerance"))
        if self.isolated:
            title += ("; per-layer isolation: " + (f"first fault at layer {fault.layer} {fault.component}" if fault
                                                   else "no layer above its noise yardstick"))
            if fault is not None and fault.op:
                title += f" (first op: {fault.op})"
        head = f"{'layer':>5} {'component':<10} {'max_abs':>10} {'mean_abs':>10} {'tol':>10}  "
        lines = [title]
        for label, rows, mark_row in (("propagated", self.rows, first), ("isolated", self.isolated, fault)):
            if not rows:
                continue
            lines += [f"{label}:", head, "-" * len(head)]
            for r in rows:
                mark = "<-- first" if r is mark_row else ("x" if r.exceeds else "")
                lines.append(f"{r.layer:>5} {r.component:<10} {r.max_abs:>10.3e} {r.mean_abs:>10.3e} "
                             f"{r.tolerance:>10.3e}  {mark}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def figure(self):
        """Plotly heat map of log10 max |error| by (component, layer)."""
        try:
            import plotly.graph_objects as go
        except ImportError as error:
            raise ImportError("DivergenceReport.figure needs plotly: pip install plotly") from error
        layers = sorted({r.layer for r in self.rows})
        z = [[math.log10(max(r.max_abs, 1e-30)) for r in self.rows if r.component == c] for c in _COMPONENTS]
        fig = go.Figure(go.Heatmap(z=z, x=layers, y=list(_COMPONENTS), colorscale="Reds",
                                   colorbar={"title": "log10 max|err|"}))
        fig.update_layout(title=str(self).splitlines()[0], xaxis_title="layer")
        return fig


def _first_tensor(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return next((o for o in output if isinstance(o, torch.Tensor)), None)
    return getattr(output, "last_hidden_state", None) if output is not None else None


def _capture(model: nn.Module, inputs: dict[str, Any]) -> dict[tuple[int, str], torch.Tensor]:
    accessor = ModuleMap(model)
    captured: dict[tuple[int, str], torch.Tensor] = {}
    handles = []

    def hook_for(key):
        def hook(module, args, output):
            t = _first_tensor(output)
            if t is not None:
                captured[key] = t.detach().double().cpu()

        return hook

    try:
        for i in range(len(accessor.get_layers())):
            handles.append(accessor.get_layers()[i].register_forward_hook(hook_for((i, "residual"))))
            try:
                attention = accessor.get_attention(i)
            except Exception:  # noqa: BLE001 - hybrid layers may have no attention
                attention = None
            if attention is not None:
                handles.append(attention.register_forward_hook(hook_for((i, "attention"))))
            mlp = accessor.get_mlp(i)
            if mlp is not None:
                handles.append(mlp.register_forward_hook(hook_for((i, "mlp"))))
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in handles:
            h.remove()
    return captured


def _hf(model: Any) -> nn.Module:
    """The plain HF model of a `StandardizedTransformer` (or the model itself)."""
    accessor = getattr(model, "module_accessor", None)
    return accessor.model if accessor is not None else model


def _is_cache(value: Any) -> bool:
    from transformers.cache_utils import Cache

    return isinstance(value, Cache)


def _snapshot(value: Any) -> Any:
    """Inputs kept for a replay: tensors detached and cloned, caches deep-copied (a forward appends to them)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if _is_cache(value):
        return copy.deepcopy(value)
    if isinstance(value, (tuple, list)):
        return type(value)(_snapshot(v) for v in value)
    if isinstance(value, dict):
        return {k: _snapshot(v) for k, v in value.items()}
    return value


def _to_dtype(value: Any, dtype: torch.dtype | None) -> Any:
    """A replay's inputs: fresh copies of caches; floating tensors cast to ``dtype`` (when given)."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if dtype is not None and value.is_floating_point() else value
    if _is_cache(value):
        cache = copy.deepcopy(value)
        if dtype is not None:
            for layer in getattr(cache, "layers", []):
                for name in ("keys", "values"):
                    t = getattr(layer, name, None)
                    if isinstance(t, torch.Tensor) and t.is_floating_point():
                        setattr(layer, name, t.to(dtype))
        return cache
    if isinstance(value, (tuple, list)):
        return type(value)(_to_dtype(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _to_dtype(v, dtype) for k, v in value.items()}
    return value


def _sites(model: nn.Module) -> list[tuple[tuple[int, str], nn.Module]]:
    """((layer, component), module) in forward order: attention, MLP, then the whole layer ("residual")."""
    accessor = ModuleMap(model)
    sites = []
    for i, layer in enumerate(accessor.get_layers()):
        try:
            attention = accessor.get_attention(i)
        except Exception:  # noqa: BLE001 - hybrid layers may have no attention
            attention = None
        if attention is not None:
            sites.append(((i, "attention"), attention))
        mlp = accessor.get_mlp(i)
        if mlp is not None:
            sites.append(((i, "mlp"), mlp))
        sites.append(((i, "residual"), layer))
    return sites


def _record(model: nn.Module, inputs: dict[str, Any]) -> dict[tuple[int, str], tuple[tuple, dict, torch.Tensor]]:
    """Each site's inputs (snapshotted before its call) and output in one forward of ``model``."""
    recorded: dict[tuple[int, str], tuple[tuple, dict, torch.Tensor]] = {}
    pending: dict[tuple[int, str], tuple[tuple, dict]] = {}
    handles = []
    for key, module in _sites(model):
        def pre(_m, args, kwargs, key=key):
            if key not in pending:  # a module called twice per forward: its first call
                pending[key] = (_snapshot(args), _snapshot(kwargs))

        def post(_m, args, kwargs, output, key=key):
            out = _first_tensor(output)
            if out is not None and key not in recorded:
                recorded[key] = (*pending[key], out.detach().clone())

        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.register_forward_hook(post, with_kwargs=True))
    try:
        with torch.no_grad():
            model(**_to_dtype(inputs, None))
    finally:
        for h in handles:
            h.remove()
    return recorded


def _replay(module: nn.Module, args: tuple, kwargs: dict, dtype: torch.dtype | None) -> torch.Tensor | None:
    with torch.no_grad():
        return _first_tensor(module(*_to_dtype(args, dtype), **_to_dtype(kwargs, dtype)))


def _positions(keep: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor | None:
    """The (batch, seq) real-token mask for an activation: the last ``seq`` columns of a 2D attention mask (a
    decode step's mask also covers the cache)."""
    if keep is None or value.dim() < 2 or value.shape[0] != keep.shape[0] or value.shape[1] > keep.shape[1]:
        return None
    return keep[:, keep.shape[1] - value.shape[1]:]


def _isolate(model_a: nn.Module, model_b: nn.Module, inputs: dict[str, Any], keep: torch.Tensor | None,
             factor: float) -> list[DivergenceRow]:
    """Per site: model b's module on model a's exact inputs vs model a's output, against the yardstick: model a's
    module in higher precision on the same inputs (its own rounding), ``factor`` x that + the dtype's spacing."""
    dtype = next(model_a.parameters()).dtype
    high = torch.float64 if dtype == torch.float32 else torch.float32
    reference = copy.deepcopy(model_a).to(high)
    recorded = _record(model_a, inputs)
    modules_a, modules_b, modules_ref = dict(_sites(model_a)), dict(_sites(model_b)), dict(_sites(reference))
    rows = []
    for key in modules_a:
        if key not in recorded or key not in modules_b:
            continue
        args, kwargs, out_a = recorded[key]
        out_b = _replay(modules_b[key], args, kwargs, None)
        out_ref = _replay(modules_ref[key], args, kwargs, high)
        if out_b is None or out_ref is None or out_b.shape != out_a.shape:
            continue
        a64, b64, r64 = out_a.double(), out_b.double(), out_ref.double()
        err, noise, scale = (b64 - a64).abs(), (a64 - r64).abs(), a64.abs()
        real = _positions(keep, out_a)
        if real is not None:
            err, noise, scale = err[real], noise[real], scale[real]
        if not err.numel():
            continue
        spacing = torch.finfo(dtype).eps * float(scale.max())
        tolerance = factor * float(noise.max()) + spacing
        err_max = float(torch.nan_to_num(err, nan=float("inf")).max())
        row = DivergenceRow(key[0], key[1], err_max, float(err.mean()), tolerance)
        if row.exceeds and key[1] == "attention" and not any(r.exceeds for r in rows):  # the first fault: split it
            row.op = _localize_in_attention(modules_a[key], modules_b[key], modules_ref[key], args,
                                            kwargs, high, keep, factor)
        rows.append(row)
    return rows


def _implementation_function(module: nn.Module, name: str) -> Callable:
    """The function an attention module runs for implementation ``name`` (its own eager function for "eager")."""
    import sys

    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if name == "eager":
        own = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if own is None:
            raise KeyError("no eager_attention_forward next to the class")
        return own
    return ALL_ATTENTION_FUNCTIONS[name]


def _attention_ops(module: nn.Module, args: tuple, kwargs: dict, dtype: torch.dtype | None) -> dict | None:
    """Replay an attention module and record what its attention function received and returned: queries / keys /
    values (after norms and rotary) and its output (the output projection's input). None for classes that do not
    call transformers' attention interface (nothing to split there)."""
    from transformers import AttentionInterface

    name = getattr(getattr(module, "config", None), "_attn_implementation", None)
    if not isinstance(name, str):
        return None
    recorded: dict[str, torch.Tensor] = {}

    def recorder(mod, query, key, value, attention_mask, *rest, **kw):
        out = _implementation_function(mod, name)(mod, query, key, value, attention_mask, *rest, **kw)
        if not recorded:
            recorded.update(queries=query.detach(), keys=key.detach(), values=value.detach(),
                            function=_first_tensor(out).detach())
        return out

    AttentionInterface.register("unilens_record_ops", recorder)
    config = module.config
    module.config = copy.copy(config)
    module.config._attn_implementation = "unilens_record_ops"
    try:
        _replay(module, args, kwargs, dtype)
    except KeyError:
        return None
    finally:
        module.config = config
    return recorded or None


# The ops inside an attention module, in order, and what a fault there means.
_ATTENTION_OPS = (
    ("queries", "queries (projection, norms, rotary)"),
    ("keys", "keys (projection, norms, rotary)"),
    ("values", "values (projection)"),
    ("function", "attention function (scores, mask, softmax, P @ V)"),
)


def _localize_in_attention(module_a, module_b, module_ref, args, kwargs, high, keep, factor) -> str | None:
    """Which op inside an attention module first exceeds its noise yardstick (else the output projection)."""
    ops = [_attention_ops(m, args, kwargs, d) for m, d in ((module_a, None), (module_b, None), (module_ref, high))]
    if any(o is None for o in ops):
        return None
    a, b, ref = ops
    for name, meaning in _ATTENTION_OPS:
        x, y, r = a[name].double(), b[name].double(), ref[name].double()
        if x.shape != y.shape:
            return f"{meaning}: shapes {tuple(x.shape)} vs {tuple(y.shape)}"
        err, noise, scale = (y - x).abs(), (x - r).abs(), x.abs()
        if name == "function" and keep is not None:  # (batch, query, heads, dim): padded queries are not compared
            real = _positions(keep, x)
            if real is not None:
                err, noise, scale = err[real], noise[real], scale[real]
        dtype = a[name].dtype
        tolerance = factor * float(noise.max()) + torch.finfo(dtype).eps * float(scale.max())
        if float(torch.nan_to_num(err, nan=float("inf")).max()) > tolerance:
            return meaning
    return "output projection (the attention function's output matches)"


def diff_models(model_a: nn.Module, model_b: nn.Module, inputs: dict[str, Any] | torch.Tensor,
                atol: float | None = None, isolate: bool = True, noise_factor: float = 4.0) -> DivergenceReport:
    """Run two HF models on the same inputs and localize where their activations first diverge.

    Captures, per decoder layer, the attention output, the MLP output and the residual stream (the layer output)
    with torch forward hooks on the modules `unilens.discovery.ModuleMap` finds (first tensor of tuple
    outputs). Padded positions (`attention_mask == 0`) are left out: backends legitimately differ there (the
    padded-query contract of `check_attention`). Tolerance of the propagated rows: `atol` if given, else
    transformers' eager-vs-sdpa test tolerance of the less precise dtype, `atol + rtol * max|a|` per (layer,
    component).

    ``isolate`` (default): also run every site of model b on model a's recorded inputs for it (`_isolate`), so a
    layer's own error is measured without what it inherited, against ``noise_factor`` x model a's own rounding
    there (a higher-precision copy of model a is the yardstick). This localizes faults in bfloat16 / float16,
    where propagated rounding outgrows any fixed tolerance. Models may be HF models or `StandardizedTransformer`s;
    a key/value cache in ``inputs`` (a decode step) is copied for each model and each replay.

    Example:
        >>> report = diff_models(model_eager, model_sdpa, {"input_ids": ids})  # doctest: +SKIP
        >>> report.first_divergence  # None when they agree  # doctest: +SKIP
    """
    if isinstance(inputs, torch.Tensor):
        inputs = {"input_ids": inputs}
    model_a, model_b = _hf(model_a), _hf(model_b)
    for m in (model_a, model_b):
        if m.training:
            raise ValueError("diff_models needs models in eval mode (dropout); call model.eval() first")
    dtypes = [next(m.parameters()).dtype for m in (model_a, model_b)]
    low = max(dtypes, key=lambda d: _MODEL_TOLERANCES.get(d, (1e-2, 1e-2))[0])
    default_atol, rtol = _MODEL_TOLERANCES.get(low, (1e-2, 1e-2))
    # each model gets its own copy of any cache in the inputs (a forward appends to it)
    acts_a, acts_b = _capture(model_a, _to_dtype(inputs, None)), _capture(model_b, _to_dtype(inputs, None))
    keep = None
    if inputs.get("attention_mask") is not None:
        keep = inputs["attention_mask"].bool().cpu()  # (batch, seq)
    rows = []
    notes = []
    for key in sorted(acts_a, key=lambda k: (k[0], _COMPONENTS.index(k[1]))):
        if key not in acts_b:
            notes.append(f"layer {key[0]} {key[1]}: captured in model a only")
            continue
        a, b = acts_a[key], acts_b[key]
        if a.shape != b.shape:
            raise ValueError(f"layer {key[0]} {key[1]}: shapes differ {tuple(a.shape)} vs {tuple(b.shape)}")
        err = (a - b).abs()
        scale = a.abs()
        real = _positions(keep, a)
        if real is not None:
            err, scale = err[real], scale[real]
        tol = atol if atol is not None else default_atol + rtol * float(scale.max())
        err_max = float(torch.nan_to_num(err, nan=float("inf")).max()) if err.numel() else 0.0
        rows.append(DivergenceRow(key[0], key[1], err_max, float(err.mean()) if err.numel() else 0.0, tol))
    isolated = _isolate(model_a, model_b, inputs, keep, noise_factor) if isolate else []
    return DivergenceReport(rows, notes=notes, isolated=isolated)


def diff_model_implementations(model_factory: Callable[[], nn.Module], a: str = "eager", b: str = "sdpa",
                               dtype: str | torch.dtype = "float32", inputs: dict[str, Any] | None = None,
                               atol: float | None = None, seed: int = 0) -> DivergenceReport:
    """CLI entry point: one model (from `model_factory()`), copied, run with attention implementations a and b.

    Default inputs: batch 2, 12 random tokens, the second row left-padded by 3.

    Example:
        >>> diff_model_implementations(lambda: my_tiny_model, "eager", "sdpa")  # doctest: +SKIP
    """
    import copy

    base = model_factory().to(_as_dtype(dtype)).eval()
    model_a, model_b = base, copy.deepcopy(base)
    model_a.set_attn_implementation(a)
    model_b.set_attn_implementation(b)
    if inputs is None:
        g = torch.Generator().manual_seed(seed)
        vocab = int(getattr(base.config, "vocab_size", 100))
        ids = torch.randint(0, vocab, (2, 12), generator=g)
        mask = torch.ones(2, 12, dtype=torch.long)
        mask[1, :3] = 0
        inputs = {"input_ids": ids, "attention_mask": mask}
    report = diff_models(model_a, model_b, inputs, atol=atol)
    report.label_a, report.label_b = a, b
    return report
