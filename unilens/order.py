"""The forward order of the standardized tensors (recorded once per model) and the reads built on it: ``read`` takes
names in any order, and an out-of-order read inside a trace is explained in standardized names."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Sequence

import torch

if TYPE_CHECKING:
    from .model import StandardizedTransformer

__all__ = ["LAYER_ACCESSORS", "MODEL_ACCESSORS", "Location", "forward_order", "parse_names", "read",
           "explain_out_of_order"]  # fmt: skip

# Standardized tensors with one value per layer, and their hook site: (module part of the layer, "input"/"output")
# or an attention hook point. Their order inside a layer is NOT assumed: it is recorded (parallel blocks run the MLP
# before or after the attention, some attention classes run their own projections in other orders).
LAYER_ACCESSORS: tuple[str, ...] = (
    "layers_input", "attentions_input", "attention_queries", "attention_keys", "attention_values",
    "attention_scores", "attention_probabilities", "attention_heads", "attention_head_results",
    "attentions_output", "mlps_input", "mlps_output", "layers_output",
)  # fmt: skip
# Whole-model tensors: the token embeddings come first, the logits (and what is computed from them) last.
MODEL_ACCESSORS: tuple[str, ...] = ("token_embeddings", "logits", "next_token_probs")

# (accessor, layer or None)
Location = tuple[str, "int | None"]


def _label(loc: Location) -> str:
    return loc[0] if loc[1] is None else f"{loc[0]}[{loc[1]}]"


def _layer_sites(model: "StandardizedTransformer", i: int) -> dict[str, tuple[str, str] | None]:
    """accessor -> (HF module path, "input" / "output") for layer ``i``; None where the layer has no such part."""
    arch = model.architecture
    base = f"{arch.layers_path}.{i}"
    parts = arch.layers[i]
    sub = lambda path, io: (f"{base}.{path}", io) if path is not None else None  # noqa: E731
    sites: dict[str, tuple[str, str] | None] = {
        "layers_input": (base, "input"),
        "layers_output": (base, "output"),
        "attentions_input": sub(parts.attention, "input"),
        "attentions_output": sub(parts.attention_out, "output"),
        "mlps_input": sub(parts.mlp_in, "input"),
        "mlps_output": sub(parts.mlp_out, "output"),
    }
    for point in ("queries", "keys", "values", "scores", "probabilities", "heads", "head_results"):
        has = parts.attention is not None and model._attention_modules[i] is not None
        sites[f"attention_{point}"] = sub(f"{parts.attention}.unilens_hooks.{point}", "output") if has else None
    return sites


def forward_order(model: "StandardizedTransformer") -> dict[Location, int]:
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
    from .attention import HOOK_NAMES, request_materialize

    hf = model.module_accessor.model
    events: list[Location] = []
    handles = []

    def record(loc: Location):
        def hook(*_args):
            if loc not in events:  # a module called twice per forward: nnsight's first visit is what a read gets
                events.append(loc)

        return hook

    # head results are computed in a forward hook of the output projection, after nnsight has seen its output
    # (on Bloom that output is attentions_output itself). Registered first: hooks prepended later run before it.
    for i, module in enumerate(model._attention_modules):
        name = getattr(getattr(module, "unilens_hooks", None), "output_projection_name", None)
        if name is not None:
            projection = module.get_submodule(name)
            handles.append(projection.register_forward_hook(record(("_projection_output", i)), prepend=True))
    embed = hf.get_submodule(model.architecture.embed_path)
    handles.append(embed.register_forward_hook(record(("token_embeddings", None))))
    for i in range(model.num_layers):
        for accessor, site in _layer_sites(model, i).items():
            if site is None or accessor == "attention_head_results":
                continue
            module = hf.get_submodule(site[0])
            # nnsight hands a module's output to the trace inside its forward, before any torch forward hook
            # (unilens's own head_results hook included): prepend, so this probe sees it in the same place
            if site[1] == "input":
                handles.append(module.register_forward_pre_hook(record((accessor, i)), prepend=True))
            else:
                handles.append(module.register_forward_hook(record((accessor, i)), prepend=True))
    points = [p for p in HOOK_NAMES if p != "head_results"]
    for module in model._attention_modules:
        if module is not None:
            request_materialize(module, points=points)
    ids = torch.arange(3, 7, device=model.input_device)[None]  # 4 tokens: every layer runs, masks are causal
    try:
        with torch.no_grad():
            hf(input_ids=ids)
    finally:
        for handle in handles:
            handle.remove()
        for module in model._attention_modules:
            if module is not None:
                module.unilens_hooks.clear_requests()
    order: dict[Location, int] = {}
    for rank, loc in enumerate(events):
        if loc[0] == "_projection_output":
            loc = ("attention_head_results", loc[1])
        order[loc] = 2 * rank
    order[("logits", None)] = order[("next_token_probs", None)] = max(order.values(), default=0) + 2
    object.__setattr__(model, "_forward_order", order)
    return order


def parse_names(model: "StandardizedTransformer", names: str | Sequence[str]) -> list[Location]:
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
    for raw in names:
        if not isinstance(raw, str):
            raise TypeError(f"names must be strings like 'layers_output.3', got {type(raw).__name__} {raw!r}.")
        accessor, _, index = raw.strip().partition(".")
        if accessor in MODEL_ACCESSORS and not index:
            out.append((accessor, None))
            continue
        if accessor not in LAYER_ACCESSORS:
            raise ValueError(f"unknown tensor name {raw!r}. Valid names: {valid}.")
        available = [i for i in range(n) if _layer_sites(model, i)[accessor] is not None]
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
        if layer not in available:
            raise ValueError(f"{raw!r}: layer {layer} has no {accessor} (hybrid model); layers that do: {available}.")
        out.append((accessor, layer))
    if not out:
        raise ValueError(f"no names given: pass at least one, e.g. 'layers_output.*'. Valid names: {valid}.")
    return list(dict.fromkeys(out))


def _get(model: "StandardizedTransformer", loc: Location) -> Any:
    accessor, layer = loc
    value = getattr(model, accessor)
    return value if layer is None else value[layer]


def read(model: "StandardizedTransformer", inputs: Any, names: str | Sequence[str], **trace_kwargs: Any
         ) -> dict[str, torch.Tensor]:
    """Every requested standardized tensor from ONE forward, whatever the order of ``names``.

    The reads are made in the order the forward computes them (``forward_order``), so nnsight's rule that reads
    follow the forward never reaches the caller. Returns ``{"layers_output.3": tensor, ...}`` in the order asked.

    Example:
        >>> from unilens import StandardizedTransformer
        >>> from unilens.testing import tiny_model
        >>> model = StandardizedTransformer(*tiny_model("llama"), check=False)
        >>> acts = read(model, "The capital of France is", ["logits", "layers_output.1", "attention_probabilities.1"])
        >>> list(acts), tuple(acts["attention_probabilities.1"].shape)
        (['logits', 'layers_output.1', 'attention_probabilities.1'], (1, 4, 5, 5))
    """
    locations = parse_names(model, names)
    order = forward_order(model)
    saved: dict[Location, Any] = {}  # filled inside the trace: only saved values leave it
    with torch.no_grad(), model.trace(inputs, **trace_kwargs):
        for loc in sorted(locations, key=lambda loc: order.get(loc, -1)):
            saved[loc] = _get(model, loc).save()
    return {(a if i is None else f"{a}.{i}"): saved[(a, i)] for a, i in locations}


def explain_out_of_order(model: "StandardizedTransformer", message: str, reads: Sequence[Location]) -> str | None:
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
