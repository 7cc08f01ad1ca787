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

import inspect
import re
from typing import Any, Callable, Iterable

import torch

from ..core.protocol import StandardizedModel
from ..hooks.reads import Location, read
from .tl_cache import ActivationCache, CacheAnalysis, final_norm_affine
from .tl_names import (
    _BEFORE_BLOCKS,
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
           "get_act_name", "hook_names", "loss_fn", "resolve", "run_with_cache", "run_with_hooks", "to_single_token",
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


def _call_hook(fn: Callable, value: Any, hook: Any) -> Any:
    """Call a TL hook function as TL's HookPoint does, ``fn(value, hook=hook)``, or positionally where ``fn`` has
    no parameter named ``hook`` (``def f(x, h)``)."""
    if _takes_hook_keyword(fn):
        return fn(value, hook=hook)
    return fn(value, hook)


def _takes_hook_keyword(fn: Callable) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins without a signature
        return False
    p = params.get("hook")
    if p is not None:
        return p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return any(q.kind == inspect.Parameter.VAR_KEYWORD for q in params.values())


def _grad_hook(info: HookPointInfo, fn: Callable) -> Callable:
    """A torch tensor hook running a TL backward hook on the gradient, in TL's layout."""

    def on_grad(grad: torch.Tensor) -> torch.Tensor | None:
        tl_grad = info.to_tl(grad)
        new = _call_hook(fn, tl_grad, info)
        return None if new is None or new is tl_grad else info.from_tl(new)

    return on_grad


def _forward_batch(model, input: Any, prepend_bos: bool | None, padding_side: str | None, attention_mask: Any
                   ) -> tuple[dict, dict]:
    """The trace's inputs and extra forward kwargs, as TL's bridge builds them: a list of several texts without a
    ``padding_side`` is padded on the left (each row's last token at position -1) and given position ids counted
    from each row's first real token, where the model's forward takes them."""
    texts = isinstance(input, (list, tuple)) and len(input) > 1 and all(isinstance(t, str) for t in input)
    if texts and padding_side is None:
        padding_side = "left"
    batch = _inputs(model, input, prepend_bos, padding_side, attention_mask)
    extra: dict[str, Any] = {}
    mask = batch.get("attention_mask")
    if texts and attention_mask is None and mask is not None and not bool(mask.all()):
        forward = model.module_accessor.model.forward
        if "position_ids" in inspect.signature(forward).parameters:
            position_ids = mask.long().cumsum(-1) - 1  # (batch, pos): 0 at each row's first real token
            extra["position_ids"] = position_ids.masked_fill(mask == 0, 1)
    return batch, extra


# The per-head copies of the attention's input (hook_attn_in / hook_q_input / ...): no gradient reaches them.
_PER_HEAD_INPUTS = ("attention_inputs_per_head", "attention_queries_input", "attention_keys_input",
                    "attention_values_input")


def _check_hooks(model: "StandardizedModel", infos: list[HookPointInfo], backward: bool) -> None:
    for info in infos:
        if info.layout == RESID_DIFF:
            raise TLNameError(
                f"{info.name} cannot be edited on this {model.architecture.model_type} model: its blocks transform "
                f"the branch's output before adding it to the residual stream, so {info.name} is read as the "
                "difference of two residual tensors. Edit the module's output (blocks.{i}.attn.hook_out / "
                "mlp.hook_out) or the residual (hook_resid_mid / hook_resid_post) instead."
            )
        if backward and info.accessor in _PER_HEAD_INPUTS:
            raise TLNameError(f"{info.name}: backward hooks are not supported on the per-head attention inputs (the "
                              "model never computes from these copies unless one is edited, so no gradient reaches "
                              "them); hook blocks.{i}.hook_resid_pre, or the q / k / v of the heads, instead.")
        if backward and info.source is not None:
            raise TLNameError(f"{info.name}: backward hooks are not supported on this name (it is computed from the "
                              "residual stream, not a tensor of the forward); hook blocks.{i}.hook_resid_mid instead.")


def _hookable(model: "StandardizedModel", info: HookPointInfo, backward: bool) -> bool:
    try:
        _check_hooks(model, [info], backward)
    except TLNameError:
        return False
    return True


def _resolve_hooks(model: "StandardizedModel", entries: Iterable, backward: bool = False
                   ) -> list[tuple[HookPointInfo, Callable]]:
    """``[(name or name filter, fn)]`` -> ``[(hook point, fn)]``, refusing what cannot be hooked (with why)."""
    hooks: list[tuple[HookPointInfo, Callable]] = []
    for entry in entries:
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and callable(entry[1])):
            raise TypeError(f"each hooks entry is (name or name filter, fn(tensor, hook)), got {entry!r:.80}.")
        selector, fn = entry
        if isinstance(selector, str):
            infos = [resolve(model, get_act_name(selector))]
            _check_hooks(model, infos, backward)
        else:  # a filter picks among the names that can be hooked (this way), as TL's among its hook points
            infos = [info for info in (resolve(model, n) for n in hook_names(model) if selector(n))
                     if _hookable(model, info, backward)]
        hooks.extend((info, fn) for info in infos)
    return hooks


def _run(model, input: Any, reads: list[HookPointInfo], hooks: list[tuple[HookPointInfo, Callable]],
         prepend_bos: bool | None, padding_side: str | None, attention_mask: Any, no_grad: bool,
         bwd_hooks: list[tuple[HookPointInfo, Callable]] = ()
         ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """One forward through ``hooks.reads.read``: every read and edit made where the forward computes it (backward
    hooks registered on the tensors there). Returns logits, the TL values read, and the input ids."""
    batch, extra = _forward_batch(model, input, prepend_bos, padding_side, attention_mask)
    by_location: dict[Location, list[tuple[HookPointInfo, Callable]]] = {}
    backward: dict[Location, list[tuple[HookPointInfo, Callable]]] = {}
    logit_hooks = []
    for info, fn in hooks:
        if info.accessor in ("logits", "next_token_probs"):
            logit_hooks.append((info, fn))  # nothing in the forward reads them: applied to the returned logits
        else:
            by_location.setdefault(info.location, []).append((info, fn))
    logit_grads = []
    for info, fn in bwd_hooks:
        if info.accessor in ("logits", "next_token_probs"):
            logit_grads.append((info, fn))
        else:
            backward.setdefault(info.location, []).append((info, fn))

    resid: dict[Location, torch.Tensor] = {}  # the residual an edited hook_mlp_in starts from, seen first

    def edit_for(chain, grads):
        def edit(value):
            for info, fn in chain:
                if info.source is not None:  # hook_mlp_in: the residual the MLP reads, before its norm
                    copy = resid[info.read_location].clone()
                    before = copy.clone()
                    new = _call_hook(fn, copy, info)
                    new = copy if new is None else new
                    if not torch.equal(new, before):  # edited: through the norm into the MLP's input only
                        value = info.normalize(new).to(value.dtype)
                    continue
                tl_value = info.to_tl(value)
                new = _call_hook(fn, tl_value, info)
                if new is not None and new is not tl_value:
                    value = info.from_tl(new)
            for info, fn in grads:
                if isinstance(value, torch.Tensor) and value.requires_grad:
                    value.register_hook(_grad_hook(info, fn))
            return value

        return edit

    captures = {info.read_location for chain in by_location.values() for info, _ in chain
                if info.source is not None}

    def visit(loc):
        chain = edit_for(by_location.get(loc, []), backward.get(loc, []))
        if loc not in captures:
            return chain

        def capture(value):  # the residual (after any edit of it) for the hook_mlp_in edit made later
            value = chain(value)
            resid[loc] = value
            return value

        return capture

    edits = {loc: visit(loc) for loc in {*by_location, *backward, *captures}}
    label = lambda loc: loc[0] if loc[1] is None else f"{loc[0]}.{loc[1]}"  # noqa: E731
    keys = [[label(loc) for loc in info.read_locations] for info in reads]
    names = list(dict.fromkeys(["logits", *(k for ks in keys for k in ks)]))
    values = read(model, batch, names, edits=edits, no_grad=no_grad, **extra)
    logits = values["logits"]
    for info, fn in logit_hooks:
        new = _call_hook(fn, logits, info)
        logits = logits if new is None else new
    for info, fn in logit_grads:
        if logits.requires_grad:
            logits.register_hook(_grad_hook(info, fn))
    cache = {}
    for info, ks in zip(reads, keys):
        cache[info.name] = logits if info.accessor == "logits" else info.from_reads([values[k] for k in ks])
    return logits, cache, batch["input_ids"]


def loss_fn(logits: torch.Tensor, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None,
            per_token: bool = False) -> torch.Tensor:
    """TL's next-token cross-entropy: position ``p``'s logits predict ``tokens[:, p + 1]``; the mean over every
    position (and row), or per position ``(batch, pos - 1)`` with ``per_token=True``. With ``attention_mask``
    the mean runs over the positions whose prediction and target are both real tokens (per token: 0 elsewhere).

    Example:
        >>> import torch
        >>> logits, tokens = torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
        >>> ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), tokens[:, 1:].reshape(-1))
        >>> torch.allclose(loss_fn(logits, tokens), ce)
        True
    """
    if tokens.device != logits.device:
        tokens = tokens.to(logits.device)
    if logits.dim() != 3 or tokens.shape != logits.shape[:2]:
        raise ValueError(f"loss_fn takes logits (batch, pos, d_vocab) and tokens (batch, pos), got "
                         f"{tuple(logits.shape)} and {tuple(tokens.shape)}.")
    log_probs = logits.log_softmax(dim=-1)  # (batch, pos, d_vocab), in the logits' dtype as TL
    per_position = -log_probs[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]  # (batch, pos - 1)
    if attention_mask is not None:
        mask = attention_mask.to(per_position.device)
        keep = (mask[:, 1:] * mask[:, :-1]).bool()  # both the predicting and the predicted token are real
        per_position = per_position * keep
        if per_token:
            return per_position
        return per_position.sum() / keep.sum()
    return per_position if per_token else per_position.mean()


RETURN_TYPES = ("logits", "loss", "both", None)


def _returned(logits: torch.Tensor, ids: torch.Tensor, return_type: str | None, loss_per_token: bool) -> Any:
    """What TL's ``return_type`` asks for: logits, the next-token loss, both, or None."""
    if return_type == "logits":
        return logits
    if return_type is None:
        return None
    loss = loss_fn(logits, ids, per_token=loss_per_token)
    return loss if return_type == "loss" else (logits, loss)


def _check_return_type(return_type: Any) -> None:
    if return_type not in RETURN_TYPES:
        raise ValueError(f"return_type must be one of {RETURN_TYPES}, got {return_type!r}.")


def _stop_layer(model: "StandardizedModel", stop_at_layer: int | None) -> int | None:
    """TL's ``stop_at_layer`` as a block index in 0..n_layers-1 (negative counts from the end); None: no stop
    (also for n_layers, where the forward ends anyway)."""
    if stop_at_layer is None:
        return None
    n = model.num_layers
    k = stop_at_layer + n if stop_at_layer < 0 else stop_at_layer
    if not 0 <= k <= n:
        raise ValueError(f"stop_at_layer={stop_at_layer} is out of range for a model with {n} blocks "
                         f"(-{n}..{n}).")
    return k if k < n else None


def _before(name: str, stop: int | None) -> bool:
    """Whether the hook point ``name`` runs before block ``stop`` (every name when stop is None)."""
    if stop is None:
        return True
    match = re.match(r"blocks\.(\d+)\.", name)
    return int(match.group(1)) < stop if match else name in _BEFORE_BLOCKS


def run_with_cache(model: "StandardizedModel", input: Any, names_filter: Any = None, *,
                   prepend_bos: bool | None = None, padding_side: str | None = None, attention_mask: Any = None,
                   remove_batch_dim: bool = False, return_type: str | None = "logits", device: Any = None,
                   stop_at_layer: int | None = None, loss_per_token: bool = False, return_cache_object: bool = True,
                   fwd_hooks: Iterable = (), bwd_hooks: Iterable = ()) -> tuple[Any, "ActivationCache"]:
    """TL's ``run_with_cache``: ONE forward, every TL hook name picked by ``names_filter`` (None: all, a name, a
    list of names or a predicate on names), in any order; returns ``(output, cache)``, the output as
    ``return_type`` asks (``"logits"``, ``"loss"``, ``"both"``, None). ``stop_at_layer=k`` stops before block k
    (as TL: the output is block k's input, the residual stream ``(batch, pos, d_model)``, and only the names
    before block k are cached). ``fwd_hooks`` / ``bwd_hooks`` (``[(name, fn)]``) run in the same forward.

    Text is tokenized as TL does (``to_tokens``: BOS first; a list of several texts left-padded, as the bridge's
    forward). The attention's own kernel (sdpa) keeps running unless a name needs attention internals (q / k / v,
    scores, pattern, z, per-head results).

    Example:
        >>> from unilens import StandardizedTransformer
        >>> from unilens.testing import tiny_model
        >>> model = StandardizedTransformer(*tiny_model("llama"), check=False)
        >>> logits, cache = run_with_cache(model, "The capital of France is",
        ...                                names_filter=["blocks.1.attn.hook_pattern", "blocks.0.hook_resid_post"])
        >>> tuple(cache["pattern", 1].shape)  # (batch, head_index, query_pos, key_pos)
        (1, 4, 6, 6)
        >>> loss, _ = run_with_cache(model, "The capital of France is", names_filter=[], return_type="loss")
        >>> loss.dim()
        0
    """
    _check_return_type(return_type)
    stop = _stop_layer(model, stop_at_layer)
    reads = [info for info in _select(model, names_filter) if _before(info.name, stop)]
    if stop is not None:
        reads.append(resolve(model, f"blocks.{stop}.hook_resid_pre"))
    hooks = [(i, f) for i, f in _resolve_hooks(model, fwd_hooks) if _before(i.name, stop)]
    grads = [(i, f) for i, f in _resolve_hooks(model, bwd_hooks, backward=True) if _before(i.name, stop)]
    no_grad = not (grads and torch.is_grad_enabled())  # the cache is detached; backward hooks need the graph
    logits, values, ids = _run(model, input, reads, hooks, prepend_bos, padding_side, attention_mask,
                               no_grad=no_grad, bwd_hooks=grads)
    if stop is not None:  # block `stop`'s input (read last, so never also a name the filter picked)
        out = values.pop(reads.pop().name)
    else:
        out = _returned(logits, ids, return_type, loss_per_token)
    cache = ActivationCache(values, model)
    if device is not None:
        cache = cache.to(device)
    if remove_batch_dim:
        cache.remove_batch_dim()
    if not return_cache_object:
        cache = dict(cache.items())
    return out, cache


def run_with_hooks(model: "StandardizedModel", input: Any,
                   fwd_hooks: Iterable[tuple[str | Callable[[str], bool], Callable]] = (),
                   bwd_hooks: Iterable = (), reset_hooks_end: bool = True, clear_contexts: bool = False, *,
                   prepend_bos: bool | None = None, padding_side: str | None = None, attention_mask: Any = None,
                   return_type: str | None = "logits", loss_per_token: bool = False,
                   stop_at_layer: int | None = None) -> Any:
    """TL's ``run_with_hooks``: ``fwd_hooks=[(name or predicate, fn)]``, ``fn(tensor, hook) -> tensor | None``
    edits the tensor (TL's shape; returning None keeps an in-place edit) in one forward, in any order of names.
    ``hook.name`` is the TL name, ``hook.layer()`` its block. Several hooks on one name run in the order given.
    ``bwd_hooks`` run on the gradient of their tensor when the caller backpropagates (grad enabled);
    ``return_type`` and ``stop_at_layer`` as ``run_with_cache``.

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
    _check_return_type(return_type)
    stop = _stop_layer(model, stop_at_layer)
    hooks = [(i, f) for i, f in _resolve_hooks(model, fwd_hooks) if _before(i.name, stop)]
    grads = [(i, f) for i, f in _resolve_hooks(model, bwd_hooks, backward=True) if _before(i.name, stop)]
    if grads and not torch.is_grad_enabled():
        raise RuntimeError("bwd_hooks need gradients: call run_with_hooks with torch.enable_grad() (not under "
                           "torch.no_grad() / inference_mode), then .backward() on what it returns.")
    reads = [resolve(model, f"blocks.{stop}.hook_resid_pre")] if stop is not None else []
    logits, values, ids = _run(model, input, reads, hooks, prepend_bos, padding_side, attention_mask,
                               no_grad=not torch.is_grad_enabled(), bwd_hooks=grads)
    if stop is not None:
        return values[reads[0].name]
    return _returned(logits, ids, return_type, loss_per_token)


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
