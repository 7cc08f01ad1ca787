"""TransformerLens's ``ActivationCache``, in two parts: the mapping over one ``run_with_cache`` (TL names and
``(name, layer)`` keys, dict-like) and ``CacheAnalysis``, TL's analysis methods over it (``accumulated_resid``,
``decompose_resid``, ``stack_head_results``, ``apply_ln_to_stack``, ``logit_attrs``), with the norms they need.

Example:
    >>> from unilens import StandardizedTransformer
    >>> from unilens.compat.tl import run_with_cache
    >>> from unilens.testing import tiny_model
    >>> model = StandardizedTransformer(*tiny_model("llama"), check=False)
    >>> _, cache = run_with_cache(model, "Hello world", names_filter=lambda n: "resid" in n)
    >>> resid, labels = cache.accumulated_resid(return_labels=True)  # (layers_covered, batch, pos, d_model)
    >>> labels[0], labels[-1], cache["resid_post", -1] is cache["blocks.1.hook_resid_post"]
    ('0_pre', 'final_post', True)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..core.protocol import StandardizedModel
from .tl_names import TLNameError, get_act_name, resolve
from .tl_tokens import to_single_token

__all__ = ["ActivationCache", "CacheAnalysis", "final_norm_affine"]


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


class CacheAnalysis:
    """TL's analysis methods of ``ActivationCache`` (a mixin): stacks of residual-stream components and their
    attribution to logits, read from the cached TL names.

    What it uses of the cache it is mixed into: ``model`` (a ``StandardizedModel``), ``cache_dict`` (full TL name ->
    tensor), ``has_batch_dim``, and ``cache[key]`` / ``key in cache`` for TL keys (a name or ``(name, layer)``).

    Example (``cache`` from ``run_with_cache``, the resid names cached):
        ``resid, labels = cache.accumulated_resid(return_labels=True)``.
    """

    model: StandardizedModel
    cache_dict: dict[str, torch.Tensor]
    has_batch_dim: bool

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


class ActivationCache(CacheAnalysis):
    """TL's ``ActivationCache`` over one ``run_with_cache``: ``cache["pattern", 3]``,
    ``cache["blocks.3.attn.hook_pattern"]``, ``cache["resid_post", -1]``, ``cache["q", 0, "attn"]``; dict-like
    (``keys`` / ``values`` / ``items`` / ``len`` / ``in``); ``to(device)``, ``remove_batch_dim()``; and the
    analysis methods of ``CacheAnalysis`` (``accumulated_resid``, ``decompose_resid``, ``stack_head_results``,
    ``apply_ln_to_stack``, ``logit_attrs``). Tensors are in TL's layout (see ``tl_names.BLOCK_ALIASES``).

    Example:
        >>> from unilens import StandardizedTransformer
        >>> from unilens.compat.tl import run_with_cache
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
