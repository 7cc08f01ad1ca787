"""TransformerLens-style surface: TL hook names as aliases of the standardized tensors (in TL's shapes),
``run_with_cache`` / ``run_with_hooks`` (any names, any order, one forward, through ``hooks.reads.read``), the
``ActivationCache`` with TL's analysis methods, ``to_tokens`` / ``to_str_tokens`` / ``to_string``, and ``TLMethods``
(those as methods of the model).

The parts, lowest first (each module imports only the ones before it): ``tl_names`` (what a TL hook name means on a
model: the alias table derived from the catalogue, ``resolve``, ``hook_names``, ``get_act_name``), ``tl_tokens``
(TL's tokenization), ``tl_cache`` (``ActivationCache``: the mapping and TL's analysis methods), and this module (one
forward for reads and edits, and the model methods). Everything is importable from here (``unilens.tl``).

Example:
    >>> from unilens import StandardizedTransformer
    >>> from unilens.testing import tiny_model
    >>> model = StandardizedTransformer(*tiny_model("llama"), check=False)
    >>> logits, cache = run_with_cache(model, "Hello world", names_filter="blocks.0.hook_resid_post")
    >>> list(cache.keys()), logits.shape[-1] == model.vocab_size  # logits: (batch, pos, d_vocab)
    (['blocks.0.hook_resid_post'], True)
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

from ..core.protocol import StandardizedModel
from ..hooks.reads import Location, read
from .tl_cache import ActivationCache, CacheAnalysis, final_norm_affine
from .tl_names import (
    BLOCK_ALIASES,
    HEADS_FIRST,
    MODEL_ALIASES,
    PRE_NORM,
    REFUSED,
    RESID_DIFF,
    SAME,
    HookPointInfo,
    TLNameError,  # fmt: skip
    get_act_name,
    hook_names,
    resolve,
)
from .tl_tokens import _inputs, to_single_token, to_str_tokens, to_string, to_tokens

__all__ = ["ActivationCache", "BLOCK_ALIASES", "CacheAnalysis", "HEADS_FIRST", "HookPointInfo", "MODEL_ALIASES",
           "PRE_NORM", "REFUSED", "RESID_DIFF", "SAME", "TLMethods", "TLNameError", "final_norm_affine",
           "get_act_name", "hook_names", "resolve", "run_with_cache", "run_with_hooks", "to_single_token",
           "to_str_tokens", "to_string", "to_tokens"]  # fmt: skip


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
    """One forward through ``hooks.reads.read``: every read and edit made where the forward computes it."""
    batch = _inputs(model, input, prepend_bos, padding_side, attention_mask)
    by_location: dict[Location, list[tuple[HookPointInfo, Callable]]] = {}
    logit_hooks = []
    for info, fn in hooks:
        if info.accessor in ("logits", "next_token_probs"):
            logit_hooks.append((info, fn))  # nothing in the forward reads them: applied to the returned logits
        else:
            by_location.setdefault(info.location, []).append((info, fn))

    resid: dict[Location, torch.Tensor] = {}  # the residual an edited hook_mlp_in starts from, seen first

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
    values = read(model, batch, names, edits=edits, no_grad=no_grad)
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
# The model methods
# ----------------------------------------------------------------------------------------------------------------


class TLMethods:
    """TransformerLens's model methods (mixed into ``StandardizedTransformer``): ``run_with_cache``,
    ``run_with_hooks``, ``to_tokens``, ``to_str_tokens``, ``to_string``, ``to_single_token``, each the function of
    this module with the model as its first argument. The class ships by value in remote mode (the server has no
    unilens): the methods call this module's functions, with no import in their bodies.

    Example:
        >>> from unilens import StandardizedTransformer
        >>> from unilens.testing import tiny_model
        >>> model = StandardizedTransformer(*tiny_model("llama"), check=False)
        >>> ids = model.to_tokens("Hello world")  # (batch, pos), BOS first
        >>> model.to_str_tokens(ids) == to_str_tokens(model, "Hello world")
        True
    """

    def run_with_cache(self: StandardizedModel, input: Any, names_filter: Any = None, **kwargs: Any):
        """TL's ``run_with_cache`` (``unilens.tl.run_with_cache``): ``(logits, cache)`` from one forward."""
        return run_with_cache(self, input, names_filter, **kwargs)

    def run_with_hooks(self: StandardizedModel, input: Any, fwd_hooks: Any = (), *args: Any, **kwargs: Any):
        """TL's ``run_with_hooks`` (``unilens.tl.run_with_hooks``): ``fwd_hooks=[(name, fn(tensor, hook))]``."""
        return run_with_hooks(self, input, fwd_hooks, *args, **kwargs)

    def to_tokens(self: StandardizedModel, input: Any, prepend_bos: bool | None = None,
                  padding_side: str | None = None, move_to_device: bool = True, truncate: bool = True
                  ) -> torch.Tensor:
        """TL's ``to_tokens`` (``unilens.tl.to_tokens``): BOS prepended by default, right padding."""
        return to_tokens(self, input, prepend_bos, padding_side, move_to_device, truncate)

    def to_str_tokens(self: StandardizedModel, input: Any, prepend_bos: bool | None = None,
                      padding_side: str | None = None):
        """TL's ``to_str_tokens`` (``unilens.tl.to_str_tokens``)."""
        return to_str_tokens(self, input, prepend_bos, padding_side)

    def to_string(self: StandardizedModel, tokens: Any):
        """TL's ``to_string`` (``unilens.tl.to_string``)."""
        return to_string(self, tokens)

    def to_single_token(self: StandardizedModel, string: str) -> int:
        """TL's ``to_single_token`` (``unilens.tl.to_single_token``)."""
        return to_single_token(self, string)
