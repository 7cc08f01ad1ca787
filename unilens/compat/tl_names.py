"""TransformerLens hook names on a model: the alias table (derived from the catalogue of standardized names,
``unilens.core.names``), ``resolve`` (a TL name -> its standardized location, or ``TLNameError`` with the reason),
``hook_names`` (every TL name a model has) and ``get_act_name`` (TL's shorthands).

Example:
    >>> BLOCK_ALIASES["attn.hook_pattern"], MODEL_ALIASES["hook_embed"]
    (('attention_probabilities', 'same'), ('token_embeddings', 'same'))
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from ..arch.discovery import NO_POSITION_EMBEDDING
from ..core.names import CATALOGUE, PRE_NORM, SAME
from ..core.names import TL_HEADS_FIRST as HEADS_FIRST
from ..core.protocol import StandardizedModel
from ..hooks.points import LAYER_POINTS, MODEL_POINTS
from ..hooks.reads import Location, _layer_sites, read

__all__ = ["BLOCK_ALIASES", "HEADS_FIRST", "MODEL_ALIASES", "PRE_NORM", "REFUSED", "RESID_DIFF", "SAME",
           "HookPointInfo", "TLNameError", "get_act_name", "hook_names", "resolve"]  # fmt: skip


class TLNameError(KeyError):
    """A TransformerLens hook name this model does not have (the message says why) or that unilens does not know."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0]) if self.args else ""


# ----------------------------------------------------------------------------------------------------------------
# The alias table: TL name <-> standardized name, and the layout change between them
# ----------------------------------------------------------------------------------------------------------------

# Layouts (the catalogue's: SAME, HEADS_FIRST, PRE_NORM). unilens keeps q / k / v as (batch, heads, seq, head_dim)
# (the layout attention kernels take); TL puts them as (batch, pos, head_index, d_head): HEADS_FIRST is
# transpose(1, 2). Patterns / scores are (batch, head, query, key) in both, z and per-head results (batch, pos, head,
# ...) in both. PRE_NORM (TL's hook_mlp_in): read from a residual tensor (``source``), an edit normalized (the MLP's
# norm, TL's formula) into the standardized tensor the MLP reads (``accessor``), so only the MLP branch sees it.
# RESID_DIFF is not a catalogue layout but a rule resolved per model: TL's hook_attn_out / hook_mlp_out are what the
# residual stream receives. Where a block transforms the branch's output before adding it (Gemma 2 / 3, OLMo 2
# post-norms: found by data flow, ``_branch_transformed``), that is the difference of two residual tensors
# (read-only there; attn.hook_out / mlp.hook_out stay the modules' outputs).
RESID_DIFF = "resid_diff"


def _aliases(per_layer: bool) -> dict[str, tuple[str, str]]:
    """TL name -> (standardized name, layout), from the catalogue's ``tl`` pairs (block-relative per layer), in the
    catalogue's order."""
    table: dict[str, tuple[str, str]] = {}
    for name, entry in CATALOGUE.items():
        for tl_name, layout in entry.tl if entry.per_layer == per_layer else ():
            if tl_name in table:
                raise ValueError(f"unilens.core.names: the TL name {tl_name!r} aliases both {table[tl_name][0]!r} and "
                                 f"{name!r}; keep it in one entry's tl=.")
            table[tl_name] = (name, layout)
    return table


# Per layer: "blocks.{i}." + key, e.g. "attn.hook_pattern": ("attention_probabilities", SAME). The MLP branch input's
# rule (PRE_NORM) and RESID_DIFF are resolved per model by ``resolve``.
BLOCK_ALIASES: dict[str, tuple[str, str]] = _aliases(per_layer=True)
MODEL_ALIASES: dict[str, tuple[str, str]] = _aliases(per_layer=False)
# The whole-model names TL lists before the blocks (the embeddings); the others (final norm, unembed) come after.
_BEFORE_BLOCKS = tuple(k for k, (name, _) in MODEL_ALIASES.items()
                       if CATALOGUE[name].site[0] in ("embed", "position_embed"))  # fmt: skip
# TL names unilens refuses on every model, with the reason.
REFUSED: dict[str, str] = {
    "mlp.hook_mid": "SoLU's mid-activation exists only in TransformerLens's own SoLU models",
}


@dataclass(frozen=True)
class HookPointInfo:
    """What a TL hook name means on this model: the standardized location and the layout change.

    ``.name`` is the TL name (what TL's ``hook.name`` gives a hook function); ``.layer()`` its block index.
    """

    name: str
    accessor: str
    layer_index: int | None
    layout: str
    norm: Any = None  # PRE_NORM: the branch's NormPlan (None: the branch reads the residual itself)
    source: str | None = None  # PRE_NORM / RESID_DIFF: the residual tensor the TL value is read from
    minus: str | None = None  # RESID_DIFF: the residual tensor subtracted from it

    def layer(self) -> int | None:
        return self.layer_index

    @property
    def location(self) -> Location:
        return (self.accessor, self.layer_index)

    @property
    def read_locations(self) -> list[Location]:
        """Every standardized tensor the TL value is computed from."""
        return [self.read_location] + ([(self.minus, self.layer_index)] if self.minus else [])

    def from_reads(self, values: list[torch.Tensor]) -> torch.Tensor:
        """The TL value from the tensors at ``read_locations``."""
        if self.minus:
            return values[0] - values[1]
        return values[0] if self.source is not None else self.to_tl(values[0])

    @property
    def read_location(self) -> Location:
        """Where the TL value is read: the residual before the layer for the per-head inputs."""
        return (self.source, self.layer_index) if self.source is not None else self.location

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """The branch's norm applied to ``x`` with TL's formula (what the branch then reads)."""
        if self.norm is None:
            return x
        xc, _, scale = self.norm.statistics(x)
        return self.norm.affine(xc / scale).to(x.dtype)

    def to_tl(self, value: torch.Tensor) -> torch.Tensor:
        return value.transpose(1, 2) if self.layout == HEADS_FIRST else value

    def from_tl(self, value: torch.Tensor) -> torch.Tensor:
        return value.transpose(1, 2) if self.layout == HEADS_FIRST else value


def resolve(model: "StandardizedModel", name: str) -> HookPointInfo:
    """A TL hook name -> its standardized location on ``model``; TLNameError (with the reason) if it has none.

    Example:
        >>> from unilens import StandardizedTransformer
        >>> from unilens.testing import tiny_model
        >>> model = StandardizedTransformer(*tiny_model("llama"), check=False)
        >>> resolve(model, "blocks.1.attn.hook_pattern").location
        ('attention_probabilities', 1)
    """
    if not isinstance(name, str):
        raise TypeError(f"TL hook names are strings like 'blocks.0.hook_resid_post', got {type(name).__name__}.")
    known = model.__dict__.setdefault("_tl_resolved", {})  # what a model has does not change after loading
    if name not in known:
        known[name] = _resolve(model, name)
    return known[name]


def _resolve(model: "StandardizedModel", name: str) -> HookPointInfo:
    match = re.fullmatch(r"blocks\.(-?\d+)\.(.+)", name)
    if match is None:
        if name in REFUSED:
            raise TLNameError(f"{name} is not available: {REFUSED[name]}.")
        if name not in MODEL_ALIASES:
            raise TLNameError(f"unknown TransformerLens hook name {name!r}. Known: {_known_names_text()}.")
        accessor, layout = MODEL_ALIASES[name]
        _check_available(model, name, accessor, None)
        return HookPointInfo(name, accessor, None, layout)
    layer, key = int(match.group(1)), match.group(2)
    if key in REFUSED:
        raise TLNameError(f"{name} is not available: {REFUSED[key]}.")
    if key not in BLOCK_ALIASES:
        raise TLNameError(f"unknown TransformerLens hook name {name!r}. Known: {_known_names_text()}.")
    n = model.num_layers
    if not -n <= layer < n:
        raise TLNameError(f"{name}: block {layer} out of range, the model has {n} blocks (0..{n - 1}).")
    layer %= n
    accessor = BLOCK_ALIASES[key][0]
    _check_available(model, name, accessor, layer)
    layout = BLOCK_ALIASES[key][1]
    full = f"blocks.{layer}.{key}"
    if layout == PRE_NORM:  # hook_mlp_in: the residual the MLP branch reads; edits reach that branch only
        plan = model.__dict__["_hook_point_setup"].layers[layer]
        if model.architecture.parallel:
            return HookPointInfo(full, accessor, layer, layout, plan.parts.get("mlp_norm")
                                 or plan.parts.get("input_norm"), "layers_input")
        source = "layers_resid_mid"
        _check_available(model, full, source, layer)
        return HookPointInfo(full, accessor, layer, layout, plan.parts.get("mlp_norm"), source)
    if key in ("hook_attn_out", "hook_mlp_out") and _branch_transformed(model, key):
        source, minus = (("layers_resid_mid", "layers_input") if key == "hook_attn_out"
                         else ("layers_output", "layers_resid_mid"))  # fmt: skip
        return HookPointInfo(full, accessor, layer, RESID_DIFF, source=source, minus=minus)
    return HookPointInfo(full, accessor, layer, layout)


def _known_names_text() -> str:
    return ", ".join([f"blocks.{{i}}.{k}" for k in BLOCK_ALIASES] + list(MODEL_ALIASES))


def _check_available(model: "StandardizedModel", name: str, accessor: str, layer: int | None) -> None:
    """Refuse a name the model lacks, with the reason: the hook points' own (unilens.hooks.points, the same
    sentence on every model), the attention route's, or the layer's (hybrid models)."""
    kind = model.architecture.model_type
    setup = model.__dict__.get("_hook_point_setup")
    if accessor in LAYER_POINTS or accessor in MODEL_POINTS:
        reason = ("hook points are installed on a locally loaded model only" if setup is None
                  else setup.reason(accessor, layer))
        if reason is not None:
            raise TLNameError(f"{name} ({accessor}) is not available on this {kind} model: {reason}.")
        return
    if layer is None:
        if accessor == "position_embeddings" and model.architecture.position_embed_path is None:
            raise TLNameError(f"{name} ({accessor}) is not available on this {kind} model: {NO_POSITION_EMBEDDING}.")
        return
    if _layer_sites(model, layer).get(accessor) is None:
        arch = model.architecture
        why = (f"layer {layer} has no softmax attention (layers with attention: {arch.attention_layers})"
               if accessor.startswith("attention") else f"layer {layer} has no {accessor}")
        raise TLNameError(f"{name} is not available on this {kind} model: {why}.")
    if accessor.startswith("attention_"):
        # the attention route can lack a point (classes that compute q/k/v inline): the accessor says why
        try:
            getattr(model, accessor)._hooks(layer)
        except (NotImplementedError, IndexError, ValueError) as err:
            raise TLNameError(f"{name} is not available on this {kind} model: {err}") from None


def _branch_transformed(model: "StandardizedModel", key: str) -> bool:
    """Whether the residual stream receives something else than the attention's (``hook_attn_out``) / the MLP's
    (``hook_mlp_out``) output: measured once per model on block 0 (resid_mid - resid_pre vs attentions_output)."""
    found = model.__dict__.get("_tl_branch_transformed")
    if found is None:
        found = {}
        setup = model.__dict__.get("_hook_point_setup")
        if not model.architecture.parallel and setup is not None and setup.reason("layers_resid_mid", 0) is None:
            names = ["layers_input.0", "attentions_output.0", "layers_resid_mid.0", "mlps_output.0", "layers_output.0"]
            v = read(model, torch.arange(3, 7, device=model.input_device)[None], names)
            scale = float(v["layers_output.0"].abs().max()) or 1.0
            close = lambda a, b: torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5 * scale)  # noqa: E731
            found["hook_attn_out"] = not close(v["layers_input.0"] + v["attentions_output.0"], v["layers_resid_mid.0"])
            found["hook_mlp_out"] = not close(v["layers_resid_mid.0"] + v["mlps_output.0"], v["layers_output.0"])
        object.__setattr__(model, "_tl_branch_transformed", found)
    return bool(found.get(key, False))


def hook_names(model: "StandardizedModel") -> list[str]:
    """Every TL hook name this model has, in TL's order (embeddings, then block by block, then the final norm;
    inside a block in the catalogue's order).

    Example:
        >>> from unilens import StandardizedTransformer
        >>> from unilens.testing import tiny_model
        >>> model = StandardizedTransformer(*tiny_model("llama"), check=False)
        >>> "blocks.0.attn.hook_pattern" in hook_names(model), "hook_pos_embed" in hook_names(model)
        (True, False)
    """
    cached = model.__dict__.get("_tl_hook_names")
    if cached is not None:
        return list(cached)
    names = []
    candidates = list(_BEFORE_BLOCKS)
    candidates += [f"blocks.{i}.{k}" for i in range(model.num_layers) for k in BLOCK_ALIASES]
    candidates += [k for k in MODEL_ALIASES if k not in _BEFORE_BLOCKS]
    for name in candidates:
        try:
            resolve(model, name)
        except TLNameError:
            continue
        names.append(name)
    object.__setattr__(model, "_tl_hook_names", tuple(names))
    return names


def get_act_name(name: str, layer: int | str | None = None, layer_type: str | None = None) -> str:
    """TL's shorthand -> full hook name: ``("pattern", 3)`` -> ``blocks.3.attn.hook_pattern``, ``"k6"``,
    ``("scale", 4, "ln1")``, ``"embed"`` -> ``hook_embed`` (same rules as ``transformer_lens.utils.get_act_name``).

    Example:
        >>> get_act_name("q", 0, "attn"), get_act_name("scale4ln1"), get_act_name("resid_post", 2)
        ('blocks.0.attn.hook_q', 'blocks.4.ln1.hook_scale', 'blocks.2.hook_resid_post')
    """
    if ("." in name or name.startswith("hook_")) and layer is None and layer_type is None:
        return name
    shorthand = re.fullmatch(r"([a-z_]+?)(\d+)([a-z]?.*)", name)
    if shorthand is not None and layer is None:
        name, layer, layer_type = shorthand.group(1), shorthand.group(2), shorthand.group(3) or None
    name = {"attn": "pattern", "attn_logits": "attn_scores", "key": "k", "query": "q", "value": "v",
            "mlp_pre": "pre", "mlp_mid": "mid", "mlp_post": "post"}.get(name, name)  # fmt: skip
    if name in ("q", "k", "v", "z", "rot_q", "rot_k", "result", "pattern", "attn_scores"):
        layer_type = "attn"
    elif name in ("pre", "post", "mid", "pre_linear"):
        layer_type = "mlp"
    else:
        layer_type = {"a": "attn", "m": "mlp", "b": "", "block": "", "blocks": "", "attention": "attn"}.get(
            layer_type or "", layer_type)  # fmt: skip
    full = f"blocks.{layer}." if layer is not None else ""
    full += f"{layer_type}." if layer_type else ""
    full += f"hook_{name}"
    if name in ("scale", "normalized") and layer is None:
        full = f"ln_final.{full}"
    return full


