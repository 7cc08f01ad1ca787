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
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves, tree_map

from ..arch.discovery import ArchitectureError, ModuleMap
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
    # isolated rows: the precision of the noise yardstick, e.g. "float64", or "float64; float32 in _grouped_mm" where
    # an op has no float64 kernel (transformers' grouped-matmul MoE experts)
    yardstick: str | None = None
    note: str = ""  # why a row diverges without a number: shapes differ, a module raised, non-finite values

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
    raised: list[str] = field(default_factory=list)  # a model's forward raised: "model b raised ... in layer 1 mlp"

    @property
    def first_divergence(self) -> DivergenceRow | None:
        return next((r for r in self.rows if r.exceeds), None)

    @property
    def first_fault(self) -> DivergenceRow | None:
        return next((r for r in self.isolated if r.exceeds), None)

    @property
    def diverged(self) -> bool:
        """A row above its tolerance (NaN / inf in either model included), or a model raised."""
        return self.first_divergence is not None or bool(self.raised)

    @property
    def faulty(self) -> bool:
        return self.first_fault is not None

    def __str__(self) -> str:
        first, fault = self.first_divergence, self.first_fault
        title = (f"divergence {self.label_a} vs {self.label_b}: "
                 + (f"first at layer {first.layer} {first.component}" if first
                    else "a model raised (below)" if self.raised else "none above tolerance"))
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
                tail = "  ".join(t for t in (mark, r.note, "" if r.yardstick in (None, "float64", "float32")
                                             else f"yardstick: {r.yardstick}") if t)
                lines.append(f"{r.layer:>5} {r.component:<10} {r.max_abs:>10.3e} {r.mean_abs:>10.3e} "
                             f"{r.tolerance:>10.3e}  {tail}".rstrip())
        lines += [f"raised: {r}" for r in self.raised]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def figure(self):
        """Plotly heat map of log10 max |error| by (component, layer)."""
        try:
            import plotly.graph_objects as go
        except ImportError as error:
            raise ImportError("DivergenceReport.figure needs plotly: pip install plotly") from error
        layers = sorted({r.layer for r in self.rows})
        cell = {(r.component, r.layer): math.log10(max(r.max_abs, 1e-30)) for r in self.rows}
        z = [[cell.get((c, layer)) for layer in layers] for c in _COMPONENTS]  # None: not captured
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


def _capture(model: nn.Module, inputs: dict[str, Any], notes: list[str] | None = None
             ) -> tuple[dict[tuple[int, str], torch.Tensor], tuple[tuple[int, str] | None, str]]:
    """Each site's output (float64, cpu) in one forward, and ``(site, message)``: if the forward raised, the
    innermost site that was running (None when it raised outside every site) and the error, else ``(None, "")``."""
    captured: dict[tuple[int, str], torch.Tensor] = {}
    running: list[tuple[int, str]] = []
    handles = []

    def pre_for(key):
        def pre(module, args):
            running.append(key)

        return pre

    def hook_for(key):
        def hook(module, args, output):
            if running and running[-1] == key:
                running.pop()
            t = _first_tensor(output)
            if t is not None:  # a module called twice per forward: its last call
                captured[key] = t.detach().double().cpu()

        return hook

    failure: tuple[tuple[int, str] | None, str] = (None, "")
    try:
        for key, module in _sites(model, notes):
            handles.append(module.register_forward_pre_hook(pre_for(key)))
            handles.append(module.register_forward_hook(hook_for(key)))
        with torch.no_grad():
            model(**inputs)
    except Exception as error:  # noqa: BLE001 - a model that raises is a reported divergence, not a crash
        failure = (running[-1] if running else None, f"{type(error).__name__}: {error}"[:200])
    finally:
        for h in handles:
            h.remove()
    return captured, failure


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


def _sites(model: nn.Module, notes: list[str] | None = None) -> list[tuple[tuple[int, str], nn.Module]]:
    """((layer, component), module) in forward order: attention, MLP, then the whole layer ("residual"). A layer
    without a single MLP module (OPT: fc1 -> fc2 inline) has no "mlp" site; its residual row covers it (``notes``
    gets one line saying so)."""
    accessor = ModuleMap(model)
    sites = []
    spans = []
    for i, layer in enumerate(accessor.get_layers()):
        try:
            attention = accessor.get_attention(i)
        except Exception:  # noqa: BLE001 - hybrid layers may have no attention
            attention = None
        if attention is not None:
            sites.append(((i, "attention"), attention))
        try:
            mlp = accessor.get_mlp(i)
        except ArchitectureError:
            mlp = None
            spans.append(i)
        if mlp is not None:
            sites.append(((i, "mlp"), mlp))
        sites.append(((i, "residual"), layer))
    if spans and notes is not None:
        note = (f"layers {_ranges(spans)}: no single MLP module (an inline fc1 -> fc2 span); not compared separately, "
                "the layer's residual row covers it")
        if note not in notes:
            notes.append(note)
    return sites


def _ranges(indices: list[int]) -> str:
    return f"{indices[0]}-{indices[-1]}" if len(indices) > 1 and indices == list(range(indices[0], indices[-1] + 1)) \
        else ", ".join(map(str, indices))


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


def _attention_masks(model: nn.Module, inputs: dict[str, Any]) -> dict[tuple[int, str], Any]:
    """The ``attention_mask`` keyword each site receives (its first call) in one forward of ``model``."""
    masks: dict[tuple[int, str], Any] = {}
    handles = []
    for key, module in _sites(model):
        def pre(_m, args, kwargs, key=key):
            if "attention_mask" in kwargs and key not in masks:
                masks[key] = kwargs["attention_mask"]

        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        with torch.no_grad():
            model(**_to_dtype(inputs, None))
    finally:
        for h in handles:
            h.remove()
    return masks


def _replay(module: nn.Module, args: tuple, kwargs: dict, dtype: torch.dtype | None) -> torch.Tensor | None:
    with torch.no_grad():
        return _first_tensor(module(*_to_dtype(args, dtype), **_to_dtype(kwargs, dtype)))


def _positions(keep: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor | None:
    """The (batch, seq) real-token mask for an activation: the last ``seq`` columns of a 2D attention mask (a
    decode step's mask also covers the cache)."""
    if keep is None or value.dim() < 2 or value.shape[0] != keep.shape[0] or value.shape[1] > keep.shape[1]:
        return None
    return keep[:, keep.shape[1] - value.shape[1]:]


def _is_float64(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype == torch.float64


class _Float32WhereNoFloat64(TorchFunctionMode):
    """For the float64 reference copy: a torch function that raises on float64 tensors (no float64 kernel, e.g.
    `torch._grouped_mm` in transformers' grouped-matmul MoE experts) is rerun on the same values in float32 and its
    result cast back to float64. Functions that write into an argument are not rerun. ``ops``: the names rerun."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        try:
            return func(*args, **kwargs)
        except RuntimeError:
            name = getattr(func, "__name__", str(func))
            in_place = "out" in kwargs or (name.endswith("_") and not name.endswith("__"))
            if in_place or not any(_is_float64(t) for t in tree_leaves((args, kwargs))):
                raise
            down_args, down_kwargs = tree_map(lambda t: t.float() if _is_float64(t) else t, (args, kwargs))
            result = func(*down_args, **down_kwargs)
            self.ops.add(name.removeprefix("torch."))
            return tree_map(lambda t: t.double() if isinstance(t, torch.Tensor) and t.dtype == torch.float32 else t,
                            result)


def _reference_call(call: Callable[[], Any], high: torch.dtype) -> tuple[Any, set[str]]:
    """``call()`` on the higher-precision copy; where float64 raises (an op without a float64 kernel), again with
    those ops in float32 (`_Float32WhereNoFloat64`). Returns the result and the names of the ops run in float32."""
    try:
        return call(), set()
    except RuntimeError:
        if high != torch.float64:
            raise
    mode = _Float32WhereNoFloat64()
    with mode:
        result = call()
    return result, mode.ops


def _yardstick_name(high: torch.dtype, ops: set[str]) -> str:
    name = str(high).removeprefix("torch.")
    return name + (f"; float32 in {', '.join(sorted(ops))} (no float64 kernel)" if ops else "")


def _finite_max(x: torch.Tensor) -> float:
    """max over the finite entries (0.0 if none): tolerances are built from what is finite."""
    x = x[torch.isfinite(x)]
    return float(x.max()) if x.numel() else 0.0


def _error(a: torch.Tensor, b: torch.Tensor, real: torch.Tensor | None) -> tuple[float, float, str]:
    """(max |a - b|, mean |a - b|, note) over the compared positions (``real``, else all). NaN / inf in either
    model there is a divergence whatever the other holds: max inf, and the note names the model(s)."""
    a, b = a.double(), b.double()
    if real is not None:
        a, b = a[real], b[real]
    if not a.numel():
        return 0.0, 0.0, ""
    bad = [name for name, t in (("a", a), ("b", b)) if not bool(torch.isfinite(t).all())]
    err = (a - b).abs()
    if bad:
        return float("inf"), float("inf"), f"non-finite values in model {' and '.join(bad)}"
    return float(err.max()), float(err.mean()), ""


def _isolate(model_a: nn.Module, model_b: nn.Module, inputs: dict[str, Any], keep: torch.Tensor | None,
             factor: float, notes: list[str]) -> list[DivergenceRow]:
    """Per site: model b's module on model a's exact inputs vs model a's output, against the yardstick: model a's
    module in higher precision on the same inputs (its own rounding), ``factor`` x that + the dtype's spacing.

    The yardstick is float64 for a float32 model (float32 for half precision); an op without a float64 kernel runs
    in float32 there, named in the row's ``yardstick``. Whatever model b's module does on those inputs (NaN, inf, a
    wrong shape, an exception) is a row that exceeds, with a ``note``; a site with no yardstick is left out with a
    line in ``notes``."""
    dtype = next(model_a.parameters()).dtype
    high = torch.float64 if dtype == torch.float32 else torch.float32
    reference = copy.deepcopy(model_a).to(high)
    try:
        recorded = _record(model_a, inputs)
    except Exception as error:  # noqa: BLE001 - reported, the propagated rows stand
        notes.append(f"per-layer isolation skipped: model a raised {type(error).__name__}: {error}"[:300])
        return []
    # Each model builds its attention masks for its own attention implementation (eager: additive floats; sdpa:
    # bool, or None for plain causal): model b's modules get model a's inputs with model b's own mask.
    try:
        masks_b = _attention_masks(model_b, inputs)
    except Exception:  # noqa: BLE001 - model b raised: its modules get model a's masks (the rows report it)
        masks_b = {}
    modules_a, modules_b, modules_ref = dict(_sites(model_a)), dict(_sites(model_b)), dict(_sites(reference))
    rows: list[DivergenceRow] = []
    no_yardstick = []
    for key in modules_a:
        if key not in recorded or key not in modules_b:
            continue
        args, kwargs, out_a = recorded[key]
        try:
            out_ref, ops = _reference_call(lambda: _replay(modules_ref[key], args, kwargs, high), high)
        except Exception as error:  # noqa: BLE001
            no_yardstick.append(f"layer {key[0]} {key[1]} ({type(error).__name__}: {str(error)[:80]})")
            continue
        if out_ref is None or out_ref.shape != out_a.shape:
            no_yardstick.append(f"layer {key[0]} {key[1]}")
            continue
        a64, r64 = out_a.double(), out_ref.double()
        noise, scale = (a64 - r64).abs(), a64.abs()
        real = _positions(keep, out_a)
        if real is not None:
            noise, scale = noise[real], scale[real]
        if not noise.numel():
            continue
        spacing = torch.finfo(dtype).eps * _finite_max(scale)
        tolerance = factor * _finite_max(noise) + spacing
        yardstick = _yardstick_name(high, ops)
        kwargs_b = {**kwargs, "attention_mask": masks_b[key]} if key in masks_b and "attention_mask" in kwargs \
            else kwargs
        try:
            out_b, note = _replay(modules_b[key], args, kwargs_b, None), ""
        except Exception as error:  # noqa: BLE001 - a module that raises on these inputs is this site's fault
            out_b, note = None, f"model b raised {type(error).__name__}: {error}"[:200]
        comparable = out_b is not None and out_b.shape == out_a.shape
        if comparable:
            err_max, err_mean, note = _error(out_a, out_b, real)
        else:
            note = note or ("model b returned no tensor" if out_b is None
                            else f"shapes differ: a {tuple(out_a.shape)} vs b {tuple(out_b.shape)}")
            err_max = err_mean = float("inf")
        row = DivergenceRow(key[0], key[1], err_max, err_mean, tolerance, yardstick=yardstick, note=note)
        if row.exceeds and comparable and key[1] == "attention" and not any(r.exceeds for r in rows):
            row.op = _localize_in_attention(modules_a[key], modules_b[key], modules_ref[key], args,  # the first
                                            kwargs, kwargs_b, high, keep, factor)  # fault: split it into its ops
        rows.append(row)
    if no_yardstick:
        notes.append(f"per-layer isolation: no yardstick (reference replay failed) at {', '.join(no_yardstick)}"[:400])
    if any(r.yardstick != _yardstick_name(high, set()) for r in rows):
        ops = sorted({r.yardstick for r in rows} - {_yardstick_name(high, set())})
        notes.append(f"noise yardstick: {'; '.join(ops)} at some sites (those rows name it)")
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


def _localize_in_attention(module_a, module_b, module_ref, args, kwargs, kwargs_b, high, keep,
                           factor) -> str | None:
    """Which op inside an attention module first exceeds its noise yardstick (else the output projection)."""
    try:
        a = _attention_ops(module_a, args, kwargs, None)
        b = _attention_ops(module_b, args, kwargs_b, None)
        ref = _reference_call(lambda: _attention_ops(module_ref, args, kwargs, high), high)[0]
    except Exception:  # noqa: BLE001 - the split is a refinement; the row already names the module
        return None
    if a is None or b is None or ref is None:
        return None
    for name, meaning in _ATTENTION_OPS:
        x, y, r = a[name].double(), b[name].double(), ref[name].double()
        if x.shape != y.shape:
            return f"{meaning}: shapes {tuple(x.shape)} vs {tuple(y.shape)}"
        if r.shape != x.shape:
            return None
        noise, scale = (x - r).abs(), x.abs()
        real = _positions(keep, x) if name == "function" and keep is not None else None  # (batch, query, heads,
        if real is not None:  # dim): padded queries are not compared
            noise, scale = noise[real], scale[real]
        dtype = a[name].dtype
        tolerance = factor * _finite_max(noise) + torch.finfo(dtype).eps * _finite_max(scale)
        if not _error(x, y, real)[0] <= tolerance:
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
    a key/value cache in ``inputs`` (a decode step) is copied for each model and each replay. Model b's modules
    get model a's inputs with model b's own attention masks (each attention implementation builds its own format).
    The yardstick copy is float64 for float32 models; an op with no float64 kernel (`torch._grouped_mm` in
    transformers' MoE experts) runs in float32 inside it, and the rows it touches say so (``row.yardstick``).

    Never raises on what the models compute: NaN / inf in either model at a compared position is a divergence
    (``max_abs`` inf, ``row.note`` names the model); so are outputs of different shapes; a model whose forward
    raises gives the rows before it, a row at the site that raised and ``report.raised`` (``diverged`` is True).
    Raises only for its own arguments (``TypeError`` / ``ValueError``).

    Example:
        >>> import copy
        >>> from unilens.testing import tiny_model
        >>> a, tok = tiny_model("gpt_oss")
        >>> b = copy.deepcopy(a)
        >>> with torch.no_grad():
        ...     _ = b.model.layers[1].mlp.experts.down_proj.mul_(1.5)
        >>> fault = diff_models(a, b, tok(["The capital of France is"], return_tensors="pt")["input_ids"]).first_fault
        >>> fault.layer, fault.component, fault.yardstick
        (1, 'mlp', 'float64; float32 in _grouped_mm (no float64 kernel)')
    """
    if isinstance(inputs, torch.Tensor):
        inputs = {"input_ids": inputs}
    if not isinstance(inputs, dict):
        raise TypeError(f"diff_models: inputs must be a dict of model inputs (e.g. {{'input_ids': ids, "
                        f"'attention_mask': mask}}) or an input_ids tensor, got {type(inputs).__name__}")
    model_a, model_b = _hf(model_a), _hf(model_b)
    for label, m in (("model_a", model_a), ("model_b", model_b)):
        if not isinstance(m, nn.Module):
            raise TypeError(f"diff_models: {label} must be an HF model (torch.nn.Module) or a StandardizedTransformer, "
                            f"got {type(m).__name__}")
    for m in (model_a, model_b):
        if m.training:
            raise ValueError("diff_models needs models in eval mode (dropout); call model.eval() first")
    dtypes = [next(m.parameters()).dtype for m in (model_a, model_b)]
    low = max(dtypes, key=lambda d: _MODEL_TOLERANCES.get(d, (1e-2, 1e-2))[0])
    default_atol, rtol = _MODEL_TOLERANCES.get(low, (1e-2, 1e-2))
    notes: list[str] = []
    # each model gets its own copy of any cache in the inputs (a forward appends to it)
    acts_a, failed_a = _capture(model_a, _to_dtype(inputs, None), notes)
    acts_b, failed_b = _capture(model_b, _to_dtype(inputs, None), notes)
    keep = None
    if inputs.get("attention_mask") is not None:
        keep = inputs["attention_mask"].bool().cpu()  # (batch, seq)
    raised = [f"model {label} raised {message}" + ("" if site is None else f" in layer {site[0]} {site[1]}")
              for label, (site, message) in (("a", failed_a), ("b", failed_b)) if message]
    failed_at = {site: f"model {label} raised here" for label, (site, message) in
                 (("a", failed_a), ("b", failed_b)) if message and site is not None}
    rows = []
    for key in sorted(set(acts_a) | set(acts_b) | set(failed_at), key=lambda k: (k[0], _COMPONENTS.index(k[1]))):
        a, b = acts_a.get(key), acts_b.get(key)
        if a is None or b is None:
            if key in failed_at:
                rows.append(DivergenceRow(key[0], key[1], float("inf"), float("inf"), atol or 0.0,
                                          note=failed_at[key]))
            elif not raised:
                notes.append(f"layer {key[0]} {key[1]}: captured in model {'a' if b is None else 'b'} only")
            continue
        scale = a.abs()
        real = _positions(keep, a)
        if real is not None:
            scale = scale[real]
        tol = atol if atol is not None else default_atol + rtol * _finite_max(scale)
        if a.shape != b.shape:
            rows.append(DivergenceRow(key[0], key[1], float("inf"), float("inf"), tol,
                                      note=f"shapes differ: a {tuple(a.shape)} vs b {tuple(b.shape)}"))
            continue
        err_max, err_mean, note = _error(a, b, real)
        rows.append(DivergenceRow(key[0], key[1], err_max, err_mean, tol, note=note))
    isolated = []
    if isolate and not failed_a[1]:
        isolated = _isolate(model_a, model_b, inputs, keep, noise_factor, notes)
    elif isolate:
        notes.append("per-layer isolation skipped: it replays model a's recorded inputs, and model a raised")
    return DivergenceReport(rows, notes=notes, isolated=isolated, raised=raised)


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
