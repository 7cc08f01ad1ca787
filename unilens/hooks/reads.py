"""The forward order of the standardized tensors (recorded once per model) and the reads built on it: ``read`` takes
names in any order, and an out-of-order read inside a trace is explained in standardized names."""

from __future__ import annotations

import contextlib
import re
from typing import Any, Callable, Iterable, Sequence

import torch
from nnsight import save as _nnsight_save

from ..arch.probe import Probe
from ..core.names import (
    ATTENTION,
    CATALOGUE,
    LAYER_NAMES,
    MODEL_NAMES,
    MODULE,
    POINT,
    ROUTING,
    RemoteUnsupportedError,
    names_of_kind,
    remote_refusal,
)
from ..core.protocol import StandardizedModel
from ..core.tensors import _check_shape
from .attention import HOOK_NAMES, request_materialize

__all__ = ["LAYER_ACCESSORS", "MODEL_ACCESSORS", "Location", "forward_order", "parse_names", "read",
           "explain_out_of_order"]  # fmt: skip

# Standardized tensors with one value per layer and whole-model ones, from the catalogue (unilens.core.names). Their
# order inside a layer is NOT assumed: it is recorded (parallel blocks run the MLP before or after the attention, some
# attention classes run their own projections in other orders).
LAYER_ACCESSORS: tuple[str, ...] = LAYER_NAMES
MODEL_ACCESSORS: tuple[str, ...] = MODEL_NAMES
# the LAYER_ACCESSORS that unilens.hooks.points serves (refused per layer with a reason)
_POINT_NAMES = frozenset(names_of_kind(POINT, per_layer=True))
# the LAYER_ACCESSORS that unilens.hooks.routing serves (sparse MoE layers only; refused elsewhere with a reason)
_ROUTING_NAMES = frozenset(names_of_kind(ROUTING, per_layer=True))

# (accessor, layer or None)
Location = tuple[str, "int | None"]
# whole-model tensors computed by the unembedding: a read that asks for one runs the forward to its end
_RUNS_TO_THE_END = ("logits", "next_token_probs")


def _label(loc: Location) -> str:
    return loc[0] if loc[1] is None else f"{loc[0]}[{loc[1]}]"


def _layer_sites(model: "StandardizedModel", i: int) -> dict[str, tuple[str, str] | None]:
    """accessor -> (HF module path, "input" / "output") for layer ``i``; None where the layer has no such part."""
    arch = model.architecture
    base = f"{arch.layers_path}.{i}"
    parts = arch.layers[i]
    sub = lambda path, io: (f"{base}.{path}", io) if path is not None else None  # noqa: E731
    sites: dict[str, tuple[str, str] | None] = {}
    # where the layers are parallel lists (XLM), a layer's input is the first list's entry's (layer_input_path)
    base_in = f"{arch.layer_input_path}.{i}" if arch.layer_input_path is not None else base
    for name in names_of_kind(MODULE, per_layer=True):  # site: (role of the module in LayerParts, "input"/"output")
        role, io = CATALOGUE[name].site
        sites[name] = ((base_in if io == "input" else base), io) if role == "layer" else sub(getattr(parts, role), io)
    has = parts.attention is not None and model._attention_modules[i] is not None
    for name in names_of_kind(ATTENTION):
        site = CATALOGUE[name].site
        sites[name] = sub(f"{parts.attention}.unilens_hooks.{site}", "output") if has else None
    setup = model.__dict__.get("_hook_point_setup")  # unilens.hook_points: None where refused (or not installed)
    for point in _POINT_NAMES:
        path = setup.path(point, i) if setup is not None else None
        sites[point] = (path, "output") if path is not None else None
    routing = model.__dict__.get("_routing_setup")  # unilens.hooks.routing: None where refused (or not installed)
    for name in _ROUTING_NAMES:
        path = routing.path(name, i) if routing is not None else None
        sites[name] = (path, "output") if path is not None else None
    return sites


def _recording_forward(forward: Callable, inputs: list[Location], outputs: list[Location],
                       note: Callable[[Location], None]) -> Callable:
    """``forward`` noting ``inputs`` when it starts and ``outputs`` when it returns (where nnsight serves them)."""

    def recording(*args: Any, **kwargs: Any) -> Any:
        for loc in inputs:
            note(loc)
        out = forward(*args, **kwargs)
        for loc in outputs:
            note(loc)
        return out

    return recording


def forward_order(model: "StandardizedModel") -> dict[Location, int]:
    """Rank of every standardized tensor in the model's forward, recorded once with torch hooks on a short input.

    Example:
        >>> from unilens import StandardizedTransformer
        >>> from unilens.testing import tiny_model
        >>> model = StandardizedTransformer(*tiny_model("llama"), check=False)
        >>> order = forward_order(model)
        >>> order[("attention_probabilities", 1)] < order[("layers_output", 1)] < order[("logits", None)]
        True
    """
    cached = model.__dict__.get("_forward_order")
    if cached is not None:
        return cached
    hf = model.module_accessor.model
    events: list[Location] = []

    def note(loc: Location) -> None:
        if loc not in events:  # a module called twice per forward: nnsight's first visit is what a read gets
            events.append(loc)

    def record(loc: Location):
        return lambda *_args: note(loc)

    # module -> the locations nnsight serves from its input / its output
    sites: dict[int, tuple[torch.nn.Module, list[Location], list[Location]]] = {}

    def site(path: str, io: str, loc: Location) -> None:
        module = hf.get_submodule(path)
        entry = sites.setdefault(id(module), (module, [], []))
        entry[1 if io == "input" else 2].append(loc)

    site(model.architecture.embed_path, "output", ("token_embeddings", None))
    if model.architecture.position_embed_path is not None:
        site(model.architecture.position_embed_path, "output", ("position_embeddings", None))
    setup = model.__dict__.get("_hook_point_setup")
    if setup is not None:
        for point in ("final_norm_scale", "final_norm_normalized"):
            path = setup.path(point, None)
            if path is not None:
                site(path, "output", (point, None))
    for i in range(model.num_layers):
        for accessor, where in _layer_sites(model, i).items():
            if where is not None and accessor != "attention_head_results":
                site(where[0], where[1], (accessor, i))
    points = [p for p in HOOK_NAMES if p != "head_results"]
    routing = model.__dict__.get("_routing_setup")
    try:
        with Probe(hf) as probe:
            # head results are computed in a forward hook of the output projection, after nnsight has seen its output
            # (on Bloom that output is attentions_output itself, noted by the forward wrapper below, before any hook)
            for i, module in enumerate(model._attention_modules):
                name = getattr(getattr(module, "unilens_hooks", None), "output_projection_name", None)
                if name is not None:
                    probe.forward_hook(module.get_submodule(name), record(("_projection_output", i)), prepend=True)
            if setup is not None:
                setup.request_all()
            if routing is not None:
                routing.request_all()
            # nnsight hands a module's input and output to the trace from the module's `forward` (its controller sits
            # in the module's __dict__): AFTER every torch forward pre-hook (a hook point served from a pre-hook of that
            # module, e.g. layers_resid_mid from the MLP's pre-hook on OLMo 2, comes first) and BEFORE every forward
            # hook (unilens's head results and MLP-neuron points come after). The probe sits in the same place: it
            # wraps `forward` itself.
            for module in model._attention_modules:
                if module is not None:
                    request_materialize(module, points=points)
            for module, inputs, outputs in sites.values():
                probe.wrap_forward(module, lambda forward, i=inputs, o=outputs: _recording_forward(forward, i, o, note))
            probe.run()  # probe_ids: 4 tokens, every layer runs, masks are causal
    finally:
        for module in model._attention_modules:
            if module is not None:
                module.unilens_hooks.clear_requests()
        if setup is not None:
            setup.clear()
        if routing is not None:
            routing.clear()
    order: dict[Location, int] = {}
    for rank, loc in enumerate(events):
        if loc[0] == "_projection_output":
            loc = ("attention_head_results", loc[1])
        order[loc] = 2 * rank
    order[("logits", None)] = order[("next_token_probs", None)] = max(order.values(), default=0) + 2
    object.__setattr__(model, "_forward_order", order)
    return order


def parse_names(model: "StandardizedModel", names: str | Sequence[str]) -> list[Location]:
    """``["layers_output.*", "attention_probabilities.3", "logits"]`` -> locations, in the order given.

    Example:
        >>> from unilens import StandardizedTransformer
        >>> from unilens.testing import tiny_model
        >>> model = StandardizedTransformer(*tiny_model("llama"), check=False)
        >>> parse_names(model, ["logits", "layers_output.*"])
        [('logits', None), ('layers_output', 0), ('layers_output', 1)]
    """
    if isinstance(names, str):
        names = [names]
    out: list[Location] = []
    valid = ", ".join(f"{a}.<layer|*>" for a in LAYER_ACCESSORS) + ", " + ", ".join(MODEL_ACCESSORS)
    n = model.num_layers
    availability: dict[str, list[int]] = {}
    layer_sites: dict[int, dict] = {}
    sites = lambda i: layer_sites[i] if i in layer_sites else layer_sites.setdefault(i, _layer_sites(model, i))  # noqa: E731
    for raw in names:
        if not isinstance(raw, str):
            raise TypeError(f"names must be strings like 'layers_output.3', got {type(raw).__name__} {raw!r}.")
        accessor, _, index = raw.strip().partition(".")
        if model.__dict__.get("_remote_mode"):
            refused = remote_refusal(accessor)
            if refused is not None:  # the server's plain model cannot give it: say so, not "no such layer"
                raise RemoteUnsupportedError(refused)
            if accessor in names_of_kind(ATTENTION):  # served in a trace, from the deployment's attention call
                raise RemoteUnsupportedError(
                    f"{accessor} is read remotely inside a trace (`with model.trace(...)`: model.{accessor}[i]."
                    "save()), not by name through model.read / cache_activations yet, whose forward order comes "
                    "from the local hook points.")
        setup = model.__dict__.get("_hook_point_setup")
        if accessor in MODEL_ACCESSORS and not index:
            if setup is not None and accessor.startswith("final_norm_"):
                setup.check(accessor, None)  # UnsupportedHookPoint with the reason where the model has none
            if accessor == "position_embeddings":
                if model.architecture.position_embed_path is None:
                    model._position_envoy()  # UnsupportedHookPoint: the model has no learned position embedding
            out.append((accessor, None))
            continue
        if accessor not in LAYER_ACCESSORS:
            raise ValueError(f"unknown tensor name {raw!r}. Valid names: {valid}.")
        if accessor not in availability:  # once per accessor: _layer_sites costs ~1 ms a layer
            availability[accessor] = [i for i in range(n) if sites(i)[accessor] is not None]
        available = availability[accessor]
        if not available and setup is not None and accessor in _POINT_NAMES and n:
            setup.check(accessor, 0)  # refused on every layer: UnsupportedHookPoint says why
        routing = model.__dict__.get("_routing_setup")
        if not available and routing is not None and accessor in _ROUTING_NAMES and n:
            routing.check(accessor, 0)  # no sparse MoE layer serves it: UnsupportedRouting says why
        if index == "*":
            out.extend((accessor, i) for i in available)
            continue
        if not re.fullmatch(r"-?\d+", index or ""):
            raise ValueError(
                f"{raw!r}: give a layer index or '*' after the dot, e.g. '{accessor}.0' or '{accessor}.*'."
            )
        layer = int(index)
        if not -n <= layer < n:
            raise IndexError(f"{raw!r}: layer {layer} out of range, the model has {n} layers (0..{n - 1}).")
        layer %= n
        if layer not in available and setup is not None and accessor in _POINT_NAMES:
            setup.check(accessor, layer)  # UnsupportedHookPoint: why this layer lacks the point
        if layer not in available and routing is not None and accessor in _ROUTING_NAMES:
            routing.check(accessor, layer)  # UnsupportedRouting: e.g. a dense layer of an MoE model
        if layer not in available:
            raise ValueError(f"{raw!r}: layer {layer} has no {accessor} (hybrid model); layers that do: {available}.")
        out.append((accessor, layer))
    if not out:
        raise ValueError(f"no names given: pass at least one, e.g. 'layers_output.*'. Valid names: {valid}.")
    return list(dict.fromkeys(out))


def _get(model: "StandardizedModel", loc: Location) -> Any:
    accessor, layer = loc
    value = getattr(model, accessor)
    return value if layer is None else value[layer]


def read(model: "StandardizedModel", inputs: Any, names: str | Sequence[str],
         edits: "dict[Location, Callable[[Any], Any]] | None" = None, no_grad: bool = True, **trace_kwargs: Any
         ) -> dict[str, torch.Tensor]:
    """Every requested standardized tensor from ONE forward, whatever the order of ``names``.

    The reads are made in the order the forward computes them (``forward_order``), so nnsight's rule that reads
    follow the forward never reaches the caller. Returns ``{"layers_output.3": tensor, ...}`` in the order asked.
    ``edits``: ``{("layers_output", 3): fn}`` replaces a tensor by ``fn(tensor)`` where the forward computes it
    (in the same forward-order pass; a read of an edited tensor returns the edited value). ``no_grad=False``
    keeps autograd (e.g. to backpropagate through edits). The forward stops right after the last tensor it reads
    (``tracer.stop()``): what comes after it, the unembedding included, runs only for ``logits`` /
    ``next_token_probs`` (and on remote models, whose forward runs on the server as asked).

    Example:
        >>> from unilens import StandardizedTransformer
        >>> from unilens.testing import tiny_model
        >>> model = StandardizedTransformer(*tiny_model("llama"), check=False)
        >>> acts = read(model, "The capital of France is", ["logits", "layers_output.1", "attention_probabilities.1"])
        >>> list(acts), tuple(acts["attention_probabilities.1"].shape)
        (['logits', 'layers_output.1', 'attention_probabilities.1'], (1, 4, 5, 5))
    """
    if not isinstance(names, str) and not (isinstance(names, Iterable) and not isinstance(names, (bytes, dict))):
        raise TypeError("names must be a tensor name or a list of them, e.g. 'layers_output.3' or ['logits', "
                        f"'layers_output.*'], got {type(names).__name__} {names!r:.40}.")
    key = (names,) if isinstance(names, str) else tuple(names)
    parsed = model.__dict__.setdefault("_read_plans", {})  # names -> locations: what a model has does not change
    try:
        locations = parsed.get(key)
    except TypeError:  # an unhashable name: parse_names says what is wrong with it
        locations, key = None, None
    if locations is None:
        locations = parse_names(model, names)
        if key is not None:
            if len(parsed) > 256:
                parsed.clear()
            parsed[key] = locations
    edits = dict(edits or {})
    order = forward_order(model)
    saved: dict[Location, Any] = {}  # filled inside the trace: only saved values leave it
    wanted = set(locations)
    visits = sorted(dict.fromkeys([*locations, *edits]), key=lambda loc: order.get(loc, -1))
    # nothing after the last visit is returned: stop the forward there (nnsight finishes the visit, then unwinds)
    stop = visits[-1][0] not in _RUNS_TO_THE_END and not model.__dict__.get("_remote_mode")
    with torch.no_grad() if no_grad else contextlib.nullcontext(), model.trace(inputs, **trace_kwargs) as tracer:
        for loc in visits:
            value = _get(model, loc)
            if loc in edits:
                new = edits[loc](value)
                if new is not value:
                    _set(model, loc, new)
                    value = new
            if loc in wanted:
                saved[loc] = value.save()
        saved = _nnsight_save(saved)  # a remote request returns saved names only: the dict itself
        if stop:
            tracer.stop()
    return {(a if i is None else f"{a}.{i}"): saved[(a, i)] for a, i in locations}


def _set(model: "StandardizedModel", loc: Location, value: Any) -> None:
    accessor, layer = loc
    if accessor == "token_embeddings":
        envoy = model._envoy_at(model.architecture.embed_path)
        _check_shape(accessor, value, envoy.output, bool(getattr(model, "allow_nonfinite", False)))
        envoy.output = value
        return
    if layer is None:
        prop = getattr(type(model), accessor, None)
        if not (isinstance(prop, property) and prop.fset is not None):
            raise ValueError(f"{accessor} cannot be edited inside the forward; edit a per-layer tensor instead.")
        setattr(model, accessor, value)
        return
    getattr(model, accessor)[layer] = value


def explain_out_of_order(model: "StandardizedModel", message: str, reads: Sequence[Location]) -> str | None:
    """A message for nnsight's OutOfOrderError in standardized names: which read to move before which, or None when
    the location is not a standardized tensor."""
    match = re.search(r"'([\w.]+)\.(input|output)(?:\.i\d+)?'", message)
    if match is None:
        return None
    path, io = match.group(1), match.group(2)
    root = "model."
    path = path[len(root):] if path.startswith(root) else path
    late = None
    for i in range(model.num_layers):
        for accessor, site in _layer_sites(model, i).items():
            if site == (path, io):
                late = (accessor, i)
                break
        if late is not None:
            break
    if late is None:
        return None
    order = forward_order(model)
    earlier = [r for r in reads if r != late and order.get(r, -1) > order.get(late, -1)]
    if earlier:
        what = (f"{_label(late)} was requested after {_label(earlier[0])}, but the forward computes it first: move the "
                f"{_label(late)} line above the {_label(earlier[0])} line")
    else:
        what = f"{_label(late)} was requested after the forward had already computed it"
    return (
        f"{what}. Inside a trace, reads follow "
        "the order the forward computes them (attention hook points run inside their layer, before its output). "
        "Or read any names in any order in one forward with model.read(inputs, names=[...])."
    )



try:  # nnsight's error for a read the forward already ran past; ours says which read to move
    from nnsight.intervention.interleaver import OutOfOrderError as _OutOfOrderError
except ImportError:  # pragma: no cover - nnsight moved it
    _OutOfOrderError = RuntimeError


class ReadOrderError(_OutOfOrderError):
    """A read inside a trace came after the forward computed it; the message names the read to move."""


