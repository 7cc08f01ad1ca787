"""TransformerLens-style surface: TL hook names as aliases of the standardized tensors (in TL's shapes),
``run_with_cache`` / ``run_with_hooks`` (any names, any order, one forward, through ``order.read``), the
``ActivationCache`` with TL's analysis methods, and ``to_tokens`` / ``to_str_tokens`` / ``to_string``."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch

from ..core.protocol import StandardizedModel
from ..hooks import reads as order


__all__ = ["ActivationCache", "HookPointInfo", "TLNameError", "get_act_name", "hook_names", "resolve",
           "run_with_cache", "run_with_hooks", "to_single_token", "to_str_tokens", "to_string", "to_tokens"]  # fmt: skip


class TLNameError(KeyError):
    """A TransformerLens hook name this model does not have (the message says why) or that unilens does not know."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0]) if self.args else ""


# ----------------------------------------------------------------------------------------------------------------
# The alias table: TL name <-> standardized name, and the layout change between them
# ----------------------------------------------------------------------------------------------------------------

# Layouts. unilens keeps q / k / v as (batch, heads, seq, head_dim) (the layout attention kernels take); TL puts
# them as (batch, pos, head_index, d_head). Patterns / scores are (batch, head, query, key) in both, z and per-head
# results (batch, pos, head, ...) in both.
SAME = "same"
HEADS_FIRST = "heads_first"  # unilens (batch, heads, seq, d) <-> TL (batch, pos, heads, d): transpose(1, 2)
# TL's hook_mlp_in: read from a residual tensor (``source``), an edit normalized (the MLP's norm, TL's formula) into
# the standardized tensor the MLP reads (``accessor``), so only the MLP branch sees it, as in TL.
PRE_NORM = "pre_norm"
# TL's hook_attn_out / hook_mlp_out are what the residual stream receives. Where a block transforms the branch's
# output before adding it (Gemma 2 / 3, OLMo 2 post-norms: found by data flow, ``_branch_transformed``), that is
# the difference of two residual tensors (read-only there; attn.hook_out / mlp.hook_out stay the modules' outputs).
RESID_DIFF = "resid_diff"

# One table for every model. Per layer: "blocks.{i}." + key. Value: (standardized accessor, layout). Where the
# accessor depends on the block's structure (the MLP branch input), the value names a rule resolved per model.
BLOCK_ALIASES: dict[str, tuple[str, str]] = {
    "hook_resid_pre": ("layers_input", SAME),  # (batch, pos, d_model)
    "hook_resid_mid": ("layers_resid_mid", SAME),
    "hook_resid_post": ("layers_output", SAME),
    # TL: copies of the residual stream BEFORE ln1, one per head (batch, pos, head_index, d_model); an edited copy
    # goes through ln1 into that head's projection only (unilens.hook_points)
    "hook_attn_in": ("attention_inputs_per_head", SAME),
    "hook_q_input": ("attention_queries_input", SAME),
    "hook_k_input": ("attention_keys_input", SAME),  # (batch, pos, kv_head_index, d_model)
    "hook_v_input": ("attention_values_input", SAME),
    "hook_attn_out": ("attentions_output", SAME),
    "hook_mlp_in": ("mlps_input", PRE_NORM),  # TL: the residual the MLP branch reads (resid_mid), before ln2
    "hook_mlp_out": ("mlps_output", SAME),
    "ln1.hook_scale": ("input_norms_scale", SAME),  # (batch, pos, 1)
    "ln1.hook_normalized": ("input_norms_normalized", SAME),  # (batch, pos, d_model)
    "ln2.hook_scale": ("post_attention_norms_scale", SAME),
    "ln2.hook_normalized": ("post_attention_norms_normalized", SAME),
    "attn.hook_in": ("attentions_input", SAME),  # the bridge's name for the attention module's (normalized) input
    "attn.hook_out": ("attentions_output", SAME),
    "attn.hook_q": ("attention_queries_pre_rotary", HEADS_FIRST),  # (batch, pos, head_index, d_head)
    "attn.hook_k": ("attention_keys_pre_rotary", HEADS_FIRST),  # (batch, pos, kv_head_index, d_head)
    "attn.hook_v": ("attention_values", HEADS_FIRST),
    "attn.hook_rot_q": ("attention_queries", HEADS_FIRST),
    "attn.hook_rot_k": ("attention_keys", HEADS_FIRST),
    "attn.hook_attn_scores": ("attention_scores", SAME),  # (batch, head_index, query_pos, key_pos)
    "attn.hook_pattern": ("attention_probabilities", SAME),  # (batch, head_index, query_pos, key_pos)
    "attn.hook_z": ("attention_heads", SAME),  # (batch, pos, head_index, d_head)
    "attn.hook_result": ("attention_head_results", SAME),  # (batch, pos, head_index, d_model)
    "mlp.hook_in": ("mlps_input", SAME),  # the bridge's name for the MLP module's (normalized) input
    "mlp.hook_pre": ("mlps_pre_activation", SAME),  # (batch, pos, d_mlp)
    "mlp.hook_pre_linear": ("mlps_pre_linear", SAME),  # gated MLPs: the linear (up) branch
    "mlp.hook_post": ("mlps_post_activation", SAME),  # (batch, pos, d_mlp): the down projection's input
    "mlp.hook_out": ("mlps_output", SAME),
}
MODEL_ALIASES: dict[str, tuple[str, str]] = {
    "hook_embed": ("token_embeddings", SAME),  # (batch, pos, d_model)
    "hook_pos_embed": ("position_embeddings", SAME),  # (batch, pos, d_model): learned absolute positions only
    "ln_final.hook_scale": ("final_norm_scale", SAME),
    "ln_final.hook_normalized": ("final_norm_normalized", SAME),
    "hook_unembed": ("logits", SAME),  # (batch, pos, d_vocab)
    "unembed.hook_out": ("logits", SAME),
}
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
    def location(self) -> order.Location:
        return (self.accessor, self.layer_index)

    @property
    def read_locations(self) -> list[order.Location]:
        """Every standardized tensor the TL value is computed from."""
        return [self.read_location] + ([(self.minus, self.layer_index)] if self.minus else [])

    def from_reads(self, values: list[torch.Tensor]) -> torch.Tensor:
        """The TL value from the tensors at ``read_locations``."""
        if self.minus:
            return values[0] - values[1]
        return values[0] if self.source is not None else self.to_tl(values[0])

    @property
    def read_location(self) -> order.Location:
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


def _known_accessors() -> set[str]:
    return set(order.LAYER_ACCESSORS) | set(order.MODEL_ACCESSORS)


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
    """Refuse a name the model lacks, with the reason: the hook points' own (unilens.hook_points, the same
    sentence on every model), the attention route's, or the layer's (hybrid models)."""
    if accessor not in _known_accessors():
        raise TLNameError(
            f"{name} is not available: it aliases the standardized tensor {accessor!r}, which this unilens version "
            "does not provide."
        )
    kind = model.architecture.model_type
    setup = model.__dict__.get("_hook_point_setup")
    from ..hooks.points import LAYER_POINTS, MODEL_POINTS

    if accessor in LAYER_POINTS or accessor in MODEL_POINTS:
        reason = ("hook points are installed on a locally loaded model only" if setup is None
                  else setup.reason(accessor, layer))
        if reason is not None:
            raise TLNameError(f"{name} ({accessor}) is not available on this {kind} model: {reason}.")
        return
    if layer is None:
        if accessor == "position_embeddings" and model.architecture.position_embed_path is None:
            from ..arch.discovery import NO_POSITION_EMBEDDING

            raise TLNameError(f"{name} ({accessor}) is not available on this {kind} model: {NO_POSITION_EMBEDDING}.")
        return
    if order._layer_sites(model, layer).get(accessor) is None:
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
            v = order.read(model, torch.arange(3, 7, device=model.input_device)[None], names)
            scale = float(v["layers_output.0"].abs().max()) or 1.0
            close = lambda a, b: torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5 * scale)  # noqa: E731
            found["hook_attn_out"] = not close(v["layers_input.0"] + v["attentions_output.0"], v["layers_resid_mid.0"])
            found["hook_mlp_out"] = not close(v["layers_resid_mid.0"] + v["mlps_output.0"], v["layers_output.0"])
        object.__setattr__(model, "_tl_branch_transformed", found)
    return bool(found.get(key, False))


def hook_names(model: "StandardizedModel") -> list[str]:
    """Every TL hook name this model has, in TL's order (embeddings, then block by block, then the final norm).

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
    candidates = ["hook_embed", "hook_pos_embed"]
    candidates += [f"blocks.{i}.{k}" for i in range(model.num_layers) for k in BLOCK_ALIASES]
    candidates += ["ln_final.hook_scale", "ln_final.hook_normalized", "hook_unembed", "unembed.hook_out"]
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


# ----------------------------------------------------------------------------------------------------------------
# Tokens
# ----------------------------------------------------------------------------------------------------------------


def _tokenizer(model: "StandardizedModel"):
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise ValueError("this model has no tokenizer: pass token ids, or load it with tokenizer=...")
    return tok


def _bos_id(model: "StandardizedModel") -> int:
    tok = _tokenizer(model)
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id  # TL: eos stands in for a bos
    if bos is None:
        raise ValueError("prepend_bos=True, but the tokenizer has neither a bos nor an eos token; pass "
                         "prepend_bos=False.")
    return int(bos)


def _encode(model, texts: list[str], prepend_bos: bool | None, padding_side: str | None, truncate: bool
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """TL's tokenization: the text's own tokens (no special tokens), BOS prepended by hand when asked, padded on
    ``padding_side`` (TL's default: right). Returns ids and attention mask ``(batch, pos)``."""
    from ..core.config import context_length

    tok = _tokenizer(model)
    prepend = True if prepend_bos is None else bool(prepend_bos)
    side = padding_side or "right"
    if side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}.")
    rows = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    if prepend:
        bos = _bos_id(model)
        rows = [[bos] + r for r in rows]
    limit = context_length(model.config)
    if truncate and limit is not None:
        rows = [r[:limit] for r in rows]
    width = max(len(r) for r in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    ids = torch.full((len(rows), width), int(pad), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        sl = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[b, sl] = torch.tensor(r, dtype=torch.long)
        mask[b, sl] = 1
    return ids, mask


def to_tokens(model: "StandardizedModel", input: str | list[str], prepend_bos: bool | None = None,
              padding_side: str | None = None, move_to_device: bool = True, truncate: bool = True) -> torch.Tensor:
    """Text -> token ids ``(batch, pos)``, as TL's ``to_tokens``: BOS prepended by default (``prepend_bos=None``
    means True), the text's own tokens without the tokenizer's special tokens, right padding by default.

    Example:
        >>> from unilens import StandardizedTransformer
        >>> from unilens.testing import tiny_model
        >>> model = StandardizedTransformer(*tiny_model("llama"), check=False)
        >>> ids = to_tokens(model, "The capital of France is")
        >>> ids.shape[0], ids[0, 0].item() == model.tokenizer.bos_token_id
        (1, True)
    """
    texts = [input] if isinstance(input, str) else list(input)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise TypeError("to_tokens takes a string or a non-empty list of strings.")
    ids, _ = _encode(model, texts, prepend_bos, padding_side, truncate)
    return ids.to(model.input_device) if move_to_device else ids


def to_string(model: "StandardizedModel", tokens: torch.Tensor | Sequence[int] | int) -> str | list[str]:
    """Token ids -> text: one string for ``(pos,)`` ids, a list for ``(batch, pos)`` (as TL's ``to_string``).

    Example:
        >>> from unilens import StandardizedTransformer
        >>> from unilens.testing import tiny_model
        >>> model = StandardizedTransformer(*tiny_model("llama"), check=False)
        >>> to_string(model, to_tokens(model, "Hello world", prepend_bos=False)[0])
        'Hello world'
    """
    tok = _tokenizer(model)
    t = torch.as_tensor(tokens)
    if t.dim() <= 1:
        return tok.decode(t.reshape(-1).tolist(), clean_up_tokenization_spaces=False)
    if t.dim() == 2:
        return [tok.decode(row.tolist(), clean_up_tokenization_spaces=False) for row in t]
    raise ValueError(f"to_string takes ids of shape (pos,) or (batch, pos), got {tuple(t.shape)}.")


def to_str_tokens(model: "StandardizedModel", input: str | list[str] | torch.Tensor | Sequence[int],
                  prepend_bos: bool | None = None, padding_side: str | None = None) -> list[str] | list[list[str]]:
    """Each token as its own string: text is tokenized as ``to_tokens`` does (BOS first by default); a list of
    texts gives one list per text (without padding), ids ``(pos,)`` / ``(batch, pos)`` are decoded one by one.

    Example:
        >>> from unilens import StandardizedTransformer
        >>> from unilens.testing import tiny_model
        >>> model = StandardizedTransformer(*tiny_model("llama"), check=False)
        >>> "".join(to_str_tokens(model, "Hello world", prepend_bos=False))
        'Hello world'
    """
    tok = _tokenizer(model)
    if isinstance(input, list) and input and all(isinstance(t, str) for t in input):
        return [to_str_tokens(model, t, prepend_bos, padding_side) for t in input]
    if isinstance(input, str):
        ids = to_tokens(model, input, prepend_bos, padding_side, move_to_device=False)[0]
    else:
        ids = torch.as_tensor(input)
        if ids.dim() == 2:
            if ids.shape[0] != 1:
                return [to_str_tokens(model, row) for row in ids]
            ids = ids[0]
    return [tok.decode([i], clean_up_tokenization_spaces=False) for i in ids.reshape(-1).tolist()]


def to_single_token(model: "StandardizedModel", string: str) -> int:
    """The id of a string that is exactly one token (TL's ``to_single_token``); an error naming the tokens otherwise.

    Example:
        >>> from unilens import StandardizedTransformer
        >>> from unilens.testing import tiny_model
        >>> model = StandardizedTransformer(*tiny_model("llama"), check=False)
        >>> isinstance(to_single_token(model, "a"), int)
        True
    """
    ids = _tokenizer(model)(string, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"{string!r} is {len(ids)} tokens ({to_str_tokens(model, ids)}), not one.")
    return int(ids[0])


def _inputs(model, input: Any, prepend_bos: bool | None, padding_side: str | None, attention_mask: Any) -> dict:
    """Text (TL tokenization), token ids or a tokenizer output -> the dict handed to the trace."""
    if isinstance(input, str) or (isinstance(input, (list, tuple)) and input and all(isinstance(t, str) for t in input)):
        ids, mask = _encode(model, [input] if isinstance(input, str) else list(input), prepend_bos, padding_side, True)
    elif isinstance(input, dict) or hasattr(input, "keys"):
        ids, mask = input["input_ids"], input.get("attention_mask")
    else:
        ids = torch.as_tensor(input)
        if ids.dim() == 1:
            ids = ids[None]
        mask = attention_mask
    batch = {"input_ids": ids.to(model.input_device)}
    if mask is not None:
        batch["attention_mask"] = torch.as_tensor(mask).to(model.input_device)
    return batch


# ----------------------------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------------------------



def _select(model: "StandardizedModel", names_filter: Any) -> list[HookPointInfo]:
    """names_filter -> hook points. Explicit names the model lacks are refused (with the reason); a callable (or
    None: everything) picks among the names the model has, like TL's filter over its hook dict."""
    if names_filter is None or callable(names_filter):
        infos = [resolve(model, n) for n in hook_names(model) if names_filter is None or names_filter(n)]
        return _drop_conflicts(model, infos)
    if isinstance(names_filter, str):
        names_filter = [names_filter]
    return [resolve(model, get_act_name(n) if isinstance(n, str) else n) for n in names_filter]


def _drop_conflicts(model: "StandardizedModel", infos: list[HookPointInfo]) -> list[HookPointInfo]:
    """A selection by filter leaves out ``attn.hook_result`` where the model cannot give it in the same forward as
    the attention's output (Bloom: its attention adds the residual itself; unilens refuses that pair in one trace).
    Asked for by name, both are read and the model's own error explains."""
    reads = {loc for info in infos for loc in info.read_locations}
    kept = []
    for info in infos:
        if info.accessor == "attention_head_results" and ("attentions_output", info.layer_index) in reads:
            parts = model.architecture.layers[info.layer_index]
            hooks = getattr(model._attention_modules[info.layer_index], "unilens_hooks", None)
            if parts.attention_out == f"{parts.attention}.{getattr(hooks, 'output_projection_name', None)}":
                continue
        kept.append(info)
    return kept


def _run(model, input: Any, reads: list[HookPointInfo], hooks: list[tuple[HookPointInfo, Callable]],
         prepend_bos: bool | None, padding_side: str | None, attention_mask: Any, no_grad: bool
         ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward through ``order.read``: every read and edit made where the forward computes it."""
    batch = _inputs(model, input, prepend_bos, padding_side, attention_mask)
    by_location: dict[order.Location, list[tuple[HookPointInfo, Callable]]] = {}
    logit_hooks = []
    for info, fn in hooks:
        if info.accessor in ("logits", "next_token_probs"):
            logit_hooks.append((info, fn))  # nothing in the forward reads them: applied to the returned logits
        else:
            by_location.setdefault(info.location, []).append((info, fn))

    resid: dict[order.Location, torch.Tensor] = {}  # the residual an edited hook_mlp_in starts from, seen first

    def edit_for(chain):
        def edit(value):
            for info, fn in chain:
                if info.source is not None:  # hook_mlp_in: the residual the MLP reads, before its norm
                    copy = resid[info.read_location].clone()
                    before = copy.clone()
                    new = fn(copy, info)
                    new = copy if new is None else new
                    if not torch.equal(new, before):  # edited: through the norm into the MLP's input only
                        value = info.normalize(new).to(value.dtype)
                    continue
                tl_value = info.to_tl(value)
                new = fn(tl_value, info)
                if new is not None and new is not tl_value:
                    value = info.from_tl(new)
            return value

        return edit

    captures = {info.read_location for chain in by_location.values() for info, _ in chain
                if info.source is not None}

    def visit(loc):
        chain = edit_for(by_location.get(loc, []))
        if loc not in captures:
            return chain

        def capture(value):  # the residual (after any edit of it) for the hook_mlp_in edit made later
            value = chain(value)
            resid[loc] = value
            return value

        return capture

    edits = {loc: visit(loc) for loc in {*by_location, *captures}}
    label = lambda loc: loc[0] if loc[1] is None else f"{loc[0]}.{loc[1]}"  # noqa: E731
    keys = [[label(loc) for loc in info.read_locations] for info in reads]
    names = list(dict.fromkeys(["logits", *(k for ks in keys for k in ks)]))
    values = order.read(model, batch, names, edits=edits, no_grad=no_grad)
    logits = values["logits"]
    for info, fn in logit_hooks:
        new = fn(logits, info)
        logits = logits if new is None else new
    cache = {}
    for info, ks in zip(reads, keys):
        cache[info.name] = logits if info.accessor == "logits" else info.from_reads([values[k] for k in ks])
    return logits, cache


def run_with_cache(model: "StandardizedModel", input: Any, names_filter: Any = None, *,
                   prepend_bos: bool | None = None, padding_side: str | None = None, attention_mask: Any = None,
                   remove_batch_dim: bool = False, return_type: str | None = "logits", device: Any = None
                   ) -> tuple[torch.Tensor | None, "ActivationCache"]:
    """TL's ``run_with_cache``: ONE forward, every TL hook name picked by ``names_filter`` (None: all, a name, a
    list of names or a predicate on names), in any order; returns ``(logits, cache)``.

    Text is tokenized as TL does (``to_tokens``: BOS first, right padding). The attention's own kernel (sdpa) keeps
    running unless a name needs attention internals (q / k / v, scores, pattern, z, per-head results).

    Example:
        >>> from unilens import StandardizedTransformer
        >>> from unilens.testing import tiny_model
        >>> model = StandardizedTransformer(*tiny_model("llama"), check=False)
        >>> logits, cache = run_with_cache(model, "The capital of France is",
        ...                                names_filter=["blocks.1.attn.hook_pattern", "blocks.0.hook_resid_post"])
        >>> tuple(cache["pattern", 1].shape)  # (batch, head_index, query_pos, key_pos)
        (1, 4, 6, 6)
    """
    if return_type not in ("logits", None):
        raise ValueError(f"return_type must be 'logits' or None, got {return_type!r}.")
    reads = _select(model, names_filter)
    logits, values = _run(model, input, reads, [], prepend_bos, padding_side, attention_mask, no_grad=True)
    cache = ActivationCache(values, model)
    if device is not None:
        cache = cache.to(device)
    if remove_batch_dim:
        cache.remove_batch_dim()
    return (logits if return_type == "logits" else None), cache


def run_with_hooks(model: "StandardizedModel", input: Any,
                   fwd_hooks: Iterable[tuple[str | Callable[[str], bool], Callable]] = (),
                   bwd_hooks: Iterable = (), reset_hooks_end: bool = True, clear_contexts: bool = False, *,
                   prepend_bos: bool | None = None, padding_side: str | None = None, attention_mask: Any = None,
                   return_type: str | None = "logits") -> torch.Tensor | None:
    """TL's ``run_with_hooks``: ``fwd_hooks=[(name or predicate, fn)]``, ``fn(tensor, hook) -> tensor | None``
    edits the tensor (TL's shape; returning None keeps an in-place edit) in one forward, in any order of names.
    ``hook.name`` is the TL name, ``hook.layer()`` its block. Several hooks on one name run in the order given.

    Example:
        >>> from unilens import StandardizedTransformer
        >>> from unilens.testing import tiny_model
        >>> model = StandardizedTransformer(*tiny_model("llama"), check=False)
        >>> def zero_head_0(z, hook):  # z: (batch, pos, head_index, d_head)
        ...     z[:, :, 0] = 0.0
        ...     return z
        >>> logits = run_with_hooks(model, "The capital of France is",
        ...                         fwd_hooks=[("blocks.1.attn.hook_z", zero_head_0)])
        >>> logits.shape[-1] == model.vocab_size
        True
    """
    if list(bwd_hooks):
        raise NotImplementedError("bwd_hooks are not supported: run the forward with run_with_hooks under "
                                  "torch.enable_grad() and call .backward() yourself, or use nnsight's .grad.")
    if return_type not in ("logits", None):
        raise ValueError(f"return_type must be 'logits' or None, got {return_type!r}.")
    hooks: list[tuple[HookPointInfo, Callable]] = []
    for entry in fwd_hooks:
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and callable(entry[1])):
            raise TypeError(f"each fwd_hooks entry is (name or name filter, fn(tensor, hook)), got {entry!r:.80}.")
        selector, fn = entry
        infos = ([resolve(model, get_act_name(selector))] if isinstance(selector, str)
                 else [resolve(model, n) for n in hook_names(model) if selector(n)])
        for info in infos:
            if info.layout == RESID_DIFF:
                raise TLNameError(
                    f"{info.name} cannot be edited on this {model.architecture.model_type} model: its blocks transform "
                    f"the branch's output before adding it to the residual stream, so {info.name} is read as the "
                    "difference of two residual tensors. Edit the module's output (blocks.{i}.attn.hook_out / "
                    "mlp.hook_out) or the residual (hook_resid_mid / hook_resid_post) instead."
                )
        hooks.extend((info, fn) for info in infos)
    logits, _ = _run(model, input, [], hooks, prepend_bos, padding_side, attention_mask,
                     no_grad=not torch.is_grad_enabled())
    return logits if return_type == "logits" else None


# ----------------------------------------------------------------------------------------------------------------
# The cache
# ----------------------------------------------------------------------------------------------------------------


def _pos(tensor: torch.Tensor, pos_slice: Any, dim: int) -> torch.Tensor:
    """TL's ``Slice`` on one dimension: None (all), an int (kept as that index), a (start, stop[, step]) tuple,
    a slice, or a list / tensor of indices."""
    if pos_slice is None:
        return tensor
    if isinstance(pos_slice, int):
        return tensor.select(dim, pos_slice)
    if isinstance(pos_slice, tuple):
        pos_slice = slice(*pos_slice)
    if isinstance(pos_slice, slice):
        index = [slice(None)] * tensor.dim()
        index[dim] = pos_slice
        return tensor[tuple(index)]
    idx = torch.as_tensor(pos_slice, device=tensor.device)
    return tensor.index_select(dim, idx.reshape(-1))


class ActivationCache:
    """TL's ``ActivationCache`` over one ``run_with_cache``: ``cache["pattern", 3]``,
    ``cache["blocks.3.attn.hook_pattern"]``, ``cache["resid_post", -1]``, ``cache["q", 0, "attn"]``; dict-like
    (``keys`` / ``values`` / ``items`` / ``len`` / ``in``); ``to(device)``, ``remove_batch_dim()``; and the
    analysis methods ``accumulated_resid``, ``decompose_resid``, ``stack_head_results``, ``apply_ln_to_stack``,
    ``logit_attrs``. Tensors are in TL's layout (see ``BLOCK_ALIASES``).

    Example:
        >>> from unilens import StandardizedTransformer
        >>> from unilens.testing import tiny_model
        >>> model = StandardizedTransformer(*tiny_model("llama"), check=False)
        >>> _, cache = run_with_cache(model, "Hello world", names_filter=lambda n: "resid" in n)
        >>> cache.accumulated_resid().shape[0] == model.num_layers + 1  # (layers_covered, batch, pos, d_model)
        True
    """

    def __init__(self, cache_dict: dict[str, torch.Tensor], model: "StandardizedModel",
                 has_batch_dim: bool = True):
        self.cache_dict = cache_dict
        self.model = model
        self.has_batch_dim = has_batch_dim

    # --- dict-like ---------------------------------------------------------------------------------------
    def _key(self, key: Any) -> str:
        if isinstance(key, str):
            return key if key in self.cache_dict else get_act_name(key)
        if isinstance(key, tuple) and key and isinstance(key[0], str):
            name, layer, layer_type = (*key, None, None)[:3]
            if isinstance(layer, int) and layer < 0:
                layer += self.model.num_layers  # TL: negative layers count from the end
            return get_act_name(name, layer, layer_type)
        raise TypeError(f"cache keys are hook names or (name, layer[, layer_type]) tuples, got {key!r}.")

    def __getitem__(self, key: Any) -> torch.Tensor:
        full = self._key(key)
        if full not in self.cache_dict:
            try:
                resolve(self.model, full)
            except TLNameError as err:
                raise TLNameError(f"{key!r} -> {full}: {err}") from None
            raise TLNameError(f"{key!r} -> {full} was not cached: add it to names_filter (cached: "
                              f"{len(self.cache_dict)} names, e.g. {list(self.cache_dict)[:4]}).")
        return self.cache_dict[full]

    def __contains__(self, key: Any) -> bool:
        try:
            return self._key(key) in self.cache_dict
        except TypeError:
            return False

    def __len__(self) -> int:
        return len(self.cache_dict)

    def __iter__(self):
        return iter(self.cache_dict)

    def keys(self):
        return self.cache_dict.keys()

    def values(self):
        return self.cache_dict.values()

    def items(self):
        return self.cache_dict.items()

    def __repr__(self) -> str:
        return f"ActivationCache with keys {list(self.cache_dict)}"

    def to(self, device: Any) -> "ActivationCache":
        """Move every tensor to ``device`` (in place, like TL); returns the cache."""
        self.cache_dict = {k: v.to(device) for k, v in self.cache_dict.items()}
        return self

    def remove_batch_dim(self) -> "ActivationCache":
        """Drop the batch dimension of a batch-1 cache (in place, like TL); an error for a larger batch."""
        if not self.has_batch_dim:
            return self
        sizes = {v.shape[0] for v in self.cache_dict.values() if v.dim() > 0}
        if sizes - {1}:
            raise ValueError(f"cannot remove the batch dimension: the batch has {max(sizes)} rows (needs 1).")
        self.cache_dict = {k: (v[0] if v.dim() > 0 else v) for k, v in self.cache_dict.items()}
        self.has_batch_dim = False
        return self

    # --- analysis ----------------------------------------------------------------------------------------
    @property
    def _pos_dim(self) -> int:
        return -2  # every residual-shaped tensor is (..., pos, d_model)

    def accumulated_resid(self, layer: int | None = None, incl_mid: bool = False, apply_ln: bool = False,
                          pos_slice: Any = None, mlp_input: bool = False, return_labels: bool = False):
        """The residual stream before each layer up to ``layer`` (None / -1 / n_layers: all, plus the final one),
        ``(layers_covered, batch, pos, d_model)``; labels ``"0_pre"``, ``"0_mid"``, ..., ``"final_post"`` (TL's).
        ``apply_ln``: through ``apply_ln_to_stack`` (the final norm applied to each entry for the final layer).

        Example (on a cache with the resid names): ``resid, labels = cache.accumulated_resid(return_labels=True)``.
        """
        n = self.model.num_layers
        layer = n if layer is None or layer == -1 else layer
        stack, labels = [], []
        for l in range(layer + 1):
            if l == n:
                stack.append(self["resid_post", n - 1])
                labels.append("final_post")
                continue
            stack.append(self["resid_pre", l])
            labels.append(f"{l}_pre")
            if (incl_mid and l < layer) or (mlp_input and l == layer):
                stack.append(self["resid_mid", l])
                labels.append(f"{l}_mid")
        components = torch.stack([_pos(c, pos_slice, -2) for c in stack])
        if apply_ln:
            components = self.apply_ln_to_stack(components, layer, mlp_input=mlp_input, pos_slice=pos_slice,
                                                recompute_ln=layer == n)
        return (components, labels) if return_labels else components

    def decompose_resid(self, layer: int | None = None, mlp_input: bool = False, mode: str = "all",
                        apply_ln: bool = False, pos_slice: Any = None, incl_embeds: bool = True,
                        return_labels: bool = False):
        """The residual stream before ``layer`` as a stack of what wrote it: ``embed``, then ``{l}_attn_out`` /
        ``{l}_mlp_out`` per layer (``mode``: "all" / "attn" / "mlp"), ``(components, batch, pos, d_model)``.

        ``embed`` is ``blocks.0.hook_resid_pre`` (what the blocks receive: on models that scale or normalize the
        embedding, or add learned positions, that is more than ``hook_embed``), so with every mode the
        components sum to the residual stream exactly, on every model. Needs ``blocks.0.hook_resid_pre`` (or
        ``hook_embed``), ``hook_attn_out`` and ``hook_mlp_out`` in the cache.
        """
        if mode not in ("all", "attn", "mlp"):
            raise ValueError(f"mode must be 'all', 'attn' or 'mlp', got {mode!r}.")
        n = self.model.num_layers
        layer = n if layer is None or layer == -1 else layer
        stack, labels = [], []
        if incl_embeds:
            stack.append(self["resid_pre", 0] if ("resid_pre", 0) in self else self["hook_embed"])
            labels.append("embed")
        for l in range(layer):
            if mode != "mlp":
                stack.append(self["attn_out", l])
                labels.append(f"{l}_attn_out")
            if mode != "attn":
                stack.append(self["mlp_out", l])
                labels.append(f"{l}_mlp_out")
        if mlp_input and mode != "mlp":
            stack.append(self["attn_out", layer])
            labels.append(f"{layer}_attn_out")
        components = torch.stack([_pos(c, pos_slice, -2) for c in stack])
        if mode == "all" and incl_embeds:
            self._check_decomposition(components, layer, mlp_input, pos_slice)
        if apply_ln:
            components = self.apply_ln_to_stack(components, layer, mlp_input=mlp_input, pos_slice=pos_slice)
        return (components, labels) if return_labels else components

    def _check_decomposition(self, components: torch.Tensor, layer: int, mlp_input: bool, pos_slice: Any) -> None:
        """The components must add up to the residual they decompose (when it is cached): on models that normalize
        a branch's output before adding it (Gemma 2 / 3, OLMo 2 post-norms), hook_attn_out / hook_mlp_out are the
        branch outputs before that norm (as in TL's bridge), and the sum is not the residual."""
        n = self.model.num_layers
        key = ("resid_mid", layer) if mlp_input else ("resid_post", n - 1) if layer == n else ("resid_pre", layer)
        if key not in self:
            return
        target = _pos(self[key], pos_slice, -2)
        total = components.sum(0)
        scale = float(target.abs().max()) or 1.0
        if not torch.allclose(total.float(), target.float(), rtol=1e-3, atol=1e-3 * scale):
            raise ValueError(
                f"decompose_resid: on this {self.model.architecture.model_type} model the embedding and the "
                f"hook_attn_out / hook_mlp_out outputs do not add up to {get_act_name(*key)} (max abs difference "
                f"{float((total - target).abs().max()):.3g}): its blocks transform a branch's output (e.g. a norm "
                "after the attention / MLP) before adding it to the residual stream, so these hooks are not what "
                "the residual receives. Decompose with hook_resid_pre / hook_resid_mid / hook_resid_post differences "
                "instead."
            )

    def stack_head_results(self, layer: int = -1, return_labels: bool = False, incl_remainder: bool = False,
                           pos_slice: Any = None, apply_ln: bool = False):
        """Every head's write to the residual stream in the layers before ``layer`` (-1 / None / n_layers: all),
        ``(layer * n_heads, batch, pos, d_model)``, labels ``"L0H0"``...; ``incl_remainder`` adds the residual
        stream minus their sum (``blocks.{layer-1}.hook_resid_post`` minus the heads) as ``"remainder"``.
        Needs ``blocks.{l}.attn.hook_result`` in the cache.
        """
        n = self.model.num_layers
        layer = n if layer is None or layer == -1 else layer
        parts, labels = [], []
        for l in range(layer):
            result = _pos(self["result", l], pos_slice, -3)  # (batch, pos, head_index, d_model)
            parts.append(result.movedim(-2, 0))
            labels.extend(f"L{l}H{h}" for h in range(result.shape[-2]))
        if parts:
            components = torch.cat(parts, dim=0)
        else:
            like = _pos(self["resid_pre", 0] if ("resid_pre", 0) in self else self["hook_embed"], pos_slice, -2)
            components = like.new_zeros((0, *like.shape))
        if incl_remainder:
            resid = _pos(self["resid_post", layer - 1], pos_slice, -2) if layer > 0 else None
            if resid is None:
                raise ValueError("incl_remainder needs at least one layer (layer >= 1).")
            components = torch.cat([components, (resid - components.sum(0))[None]], dim=0)
            labels.append("remainder")
        if apply_ln:
            components = self.apply_ln_to_stack(components, layer, pos_slice=pos_slice)
        return (components, labels) if return_labels else components

    def apply_ln_to_stack(self, residual_stack: torch.Tensor, layer: int | None = None, mlp_input: bool = False,
                          pos_slice: Any = None, batch_slice: Any = None, has_batch_dim: bool = True,
                          recompute_ln: bool = False) -> torch.Tensor:
        """Treat each entry of ``residual_stack`` ``(components, batch, pos, d_model)`` as the input of layer
        ``layer``'s norm (``ln1``, ``ln2`` with ``mlp_input``; None / -1 / n_layers: the final norm) and apply that
        norm's cached scale: centred (LayerNorm) and divided by ``hook_scale``, as TL does. The norm's weight
        and bias are NOT applied (TL folds them into the next weights; ``logit_attrs`` folds the final norm's
        weight into its token directions). ``recompute_ln`` (final norm only): run the final norm itself on each
        entry (weight included), as TL's logit lens does. Needs the matching ``hook_scale`` in the cache.
        """
        n = self.model.num_layers
        layer = n if layer is None or layer == -1 else layer
        stack = residual_stack
        if has_batch_dim and batch_slice is not None:
            stack = _pos(stack, batch_slice, 1)
        if layer == n:
            norm = final_norm_affine(self.model)
            if norm is None:
                return stack  # no final norm: nothing to apply
            if recompute_ln:
                return norm(stack)
            key, centers = "ln_final.hook_scale", norm.centers
        else:
            key = f"blocks.{layer}.ln{2 if mlp_input else 1}.hook_scale"
            centers = _block_norm_centers(self.model, layer, mlp_input)
        if key not in self.cache_dict:
            raise TLNameError(f"apply_ln needs {key!r} in the cache: add it to names_filter (or use apply_ln=False).")
        scale = _pos(self.cache_dict[key], pos_slice, -2)
        if has_batch_dim and batch_slice is not None and self.has_batch_dim:
            scale = _pos(scale, batch_slice, 0)
        if centers:
            stack = stack - stack.mean(dim=-1, keepdim=True)
        return stack / scale

    def logit_attrs(self, residual_stack: torch.Tensor, tokens: Any, incorrect_tokens: Any = None,
                    pos_slice: Any = None, batch_slice: Any = None, has_batch_dim: bool = True) -> torch.Tensor:
        """How much each entry of ``residual_stack`` ``(components, batch, pos, d_model)`` adds to the logit of
        ``tokens`` (minus ``incorrect_tokens``), TL's way: the final norm's cached scale is applied
        (``apply_ln_to_stack``), then the dot product with each token's direction ``W_U[:, t]``, the final norm's
        elementwise weight folded in (what TL's default ``fold_ln`` does). Returns ``(components, batch, pos)``
        (the token dimensions follow ``tokens``: an int / str, ``(batch,)`` or ``(batch, pos)``).

        With ``decompose_resid()`` as the stack, the attributions sum to the model's logit (difference) minus the
        final norm's bias and the unembedding bias terms (zero on most models).
        """
        directions = self.tokens_to_residual_directions(tokens)
        if incorrect_tokens is not None:
            wrong = self.tokens_to_residual_directions(incorrect_tokens)
            if wrong.shape != directions.shape:
                raise ValueError(f"tokens and incorrect_tokens must have the same shape: {tuple(directions.shape)}"
                                 f" vs {tuple(wrong.shape)}.")
            directions = directions - wrong
        scaled = self.apply_ln_to_stack(residual_stack, -1, pos_slice=pos_slice, batch_slice=batch_slice,
                                        has_batch_dim=has_batch_dim)
        if has_batch_dim and scaled.dim() == 4 and directions.dim() == 2 and directions.shape[0] == scaled.shape[1]:
            directions = directions.unsqueeze(-2)  # one token per row: the same over every position
        return (scaled * directions.to(scaled.dtype)).sum(dim=-1)

    def tokens_to_residual_directions(self, tokens: Any) -> torch.Tensor:
        """Token(s) -> the residual direction that writes their logit: ``W_U[:, t]`` times the final norm's
        elementwise weight, ``(d_model,)`` / ``(batch, d_model)`` / ``(batch, pos, d_model)``."""
        if isinstance(tokens, str):
            tokens = to_single_token(self.model, tokens)
        t = torch.as_tensor(tokens, device=self.model.weights.W_U.device)
        directions = self.model.weights.W_U.detach().t()[t]  # (*tokens, d_model)
        norm = final_norm_affine(self.model)
        if norm is not None:
            directions = directions * norm.weight.to(directions.dtype)
        return directions


# ----------------------------------------------------------------------------------------------------------------
# Norms: what TL's apply_ln needs to know (measured on the module, never assumed from the class)
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class _NormAffine:
    plan: Any  # unilens.hook_points.NormPlan: the norm's formula, probed at load
    weight: torch.Tensor  # (d_model,) the elementwise weight applied after normalizing ((1 + w) on Gemma)
    bias: torch.Tensor  # (d_model,)

    @property
    def centers(self) -> bool:
        return bool(self.plan.center)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The norm on any (..., d_model) tensor, with its own statistics."""
        xc, _, scale = self.plan.statistics(x)
        return self.plan.affine(xc / scale).to(x.dtype)


def _affine(plan: Any, d_model: int, like: torch.Tensor) -> _NormAffine:
    with torch.no_grad():
        zeros = torch.zeros(d_model, dtype=like.dtype, device=like.device)
        bias = plan.affine(zeros)
        weight = plan.affine(torch.ones_like(zeros)) - bias
    return _NormAffine(plan, weight, bias)


def final_norm_affine(model: "StandardizedModel") -> _NormAffine | None:
    """The final norm as weight / bias / centering (None when the model has none), from unilens.hook_points'
    plan of it (its formula probed at load).

    Example:
        >>> from unilens import StandardizedTransformer
        >>> from unilens.testing import tiny_model
        >>> model = StandardizedTransformer(*tiny_model("gpt2"), check=False)
        >>> final_norm_affine(model).centers  # GPT-2's ln_f is a LayerNorm
        True
    """
    cached = model.__dict__.get("_tl_final_norm")
    if cached is not None:
        return cached or None
    chain = model.architecture.head_chain
    if chain is None or len(chain) > 1:
        raise NotImplementedError(
            f"this {model.architecture.model_type} model's path from the residual stream to the unembedding is not "
            f"one norm ({chain}), so TL's apply_ln / logit_attrs (a cached scale, then W_U) do not describe it.")
    setup = model.__dict__.get("_hook_point_setup")
    if not chain or setup is None or setup.final_norm is None:
        if chain:
            reason = "hook points are not installed" if setup is None else setup.final_norm_reason
            raise NotImplementedError(f"the final norm's formula is unknown ({reason}): apply_ln is not available.")
        object.__setattr__(model, "_tl_final_norm", False)
        return None
    result = _affine(setup.final_norm, model.hidden_size, model.weights.W_U)
    object.__setattr__(model, "_tl_final_norm", result)
    return result


def _block_norm_centers(model: "StandardizedModel", layer: int, mlp_input: bool) -> bool:
    """Whether layer ``layer``'s ln1 / ln2 subtracts the mean (LayerNorm), from unilens.hook_points' plan."""
    setup = model.__dict__.get("_hook_point_setup")
    role = "mlp_norm" if mlp_input else "input_norm"
    plan = setup.layers[layer].parts.get(role) if setup is not None else None
    if plan is None:
        raise TLNameError(f"layer {layer} has no {'ln2' if mlp_input else 'ln1'} unilens knows the formula of: "
                          "apply_ln is not available there.")
    return bool(plan.center)
