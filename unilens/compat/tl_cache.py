"""TransformerLens's ``ActivationCache``, in two parts: the mapping over one ``run_with_cache`` (TL names and
``(name, layer)`` keys, dict-like, batch slicing) and ``CacheAnalysis``, TL 4.3's analysis methods over it
(residual stacks and decompositions down to heads and neurons, ``apply_ln_to_stack``, ``logit_attrs``,
``logit_lens``), with the norms they need.

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

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from ..arch.discovery import apply_logit_postprocessing
from ..arch.weights import _linear_weight_out_in
from ..core.protocol import StandardizedModel
from .tl_names import TLNameError, get_act_name, resolve
from .tl_tokens import to_single_token

__all__ = ["ActivationCache", "CacheAnalysis", "LogitLensResult", "LogitReadout", "final_norm_affine"]


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


def _keep_dim(neuron_slice: Any) -> Any:
    """A neuron selection that keeps its dimension (TL stacks layers along it): an int ``n`` becomes ``[n]``."""
    return [neuron_slice] if isinstance(neuron_slice, int) else neuron_slice


def _as_2d(project: torch.Tensor | None) -> tuple[torch.Tensor | None, bool]:
    """``project_output_onto``: ``(d_model,)`` -> ``(d_model, 1)`` (squeezed back at the end), else as given."""
    if project is None:
        return None, False
    return (project[:, None], True) if project.dim() == 1 else (project, False)


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
        Needs ``blocks.{l}.attn.hook_result`` in the cache, or ``hook_z`` (``compute_head_results`` fills it in).
        """
        n = self.model.num_layers
        layer = n if layer is None or layer == -1 else layer
        self._ensure_head_results(layer)
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


    # --- per-head and per-neuron writes to the residual stream ------------------------------------------------
    @property
    def has_embed(self) -> bool:
        """Whether ``hook_embed`` is in the cache (TL's attribute)."""
        return "hook_embed" in self.cache_dict

    @property
    def has_pos_embed(self) -> bool:
        """Whether ``hook_pos_embed`` is in the cache (learned absolute positions only: GPT-2, OPT...)."""
        return "hook_pos_embed" in self.cache_dict

    def _mlp_plan(self, layer: int) -> Any:
        """Layer ``layer``'s MLP plan (unilens.hooks.points: its down projection is TL's ``W_out``), or an error."""
        setup = self.model.__dict__.get("_hook_point_setup")
        if setup is None:
            raise NotImplementedError("hook points are not installed on this model: no MLP neurons are known.")
        plan = setup.layers[layer].parts.get("mlp")
        if plan is None:
            reason = setup.layers[layer].refused.get("mlp", "unknown")
            raise NotImplementedError(f"layer {layer} has no per-neuron MLP unilens knows ({reason}): no neuron "
                                      "results there.")
        return plan

    def _residual_factor(self, layer: int) -> float:
        """What the block multiplies its branches' outputs by before adding them (Granite's residual_multiplier;
        1.0 elsewhere), as found by data flow at load (the MLP branch's factor)."""
        setup = self.model.__dict__.get("_hook_point_setup")
        plan = setup.layers[layer].parts.get("resid") if setup is not None else None
        return float(plan.factor) if plan is not None and plan.factor else 1.0

    def _W_out(self, layer: int) -> torch.Tensor:
        """TL's ``blocks[layer].mlp.W_out`` ``(d_mlp, d_model)``: the MLP's down projection, transposed."""
        return _linear_weight_out_in(self._mlp_plan(layer).down).detach().t()

    def _b_out(self, layer: int) -> torch.Tensor | None:
        down = self._mlp_plan(layer).down
        bias = getattr(down, "bias", None)
        return bias.detach() if isinstance(bias, torch.Tensor) else None

    def compute_head_results(self) -> None:
        """Fill ``blocks.{l}.attn.hook_result`` ``(batch, pos, head_index, d_model)`` in place from the cached
        ``hook_z`` and ``W_O`` (each head's write to the residual stream; ``attn_out`` = their sum + ``b_O``),
        for every layer where it is missing, as TL does. Needs ``hook_z`` cached on those layers.

        Example (``cache`` with the ``hook_z`` names): ``cache.compute_head_results(); cache["result", 0]``.
        """
        expected = 4 if self.has_batch_dim else 3
        all_cached = True
        for layer in range(self.model.num_layers):
            key = f"blocks.{layer}.attn.hook_result"
            have = self.cache_dict.get(key)
            if isinstance(have, torch.Tensor) and have.dim() == expected:
                continue
            all_cached = False
            z = self["z", layer, "attn"]  # (batch, pos, head_index, d_head)
            W_O = self.model.weights[layer].W_O.detach()  # (head_index, d_head, d_model)
            if z.dtype != W_O.dtype:
                dtype = torch.promote_types(z.dtype, W_O.dtype)
                z, W_O = z.to(dtype), W_O.to(dtype)
            result = torch.einsum("...hd,hdm->...hm", z, W_O.to(z.device))
            factor = self._residual_factor(layer)
            self.cache_dict[key] = result if factor == 1.0 else result * factor
        if all_cached:
            logging.warning("Tried to compute head results when they were already cached")

    def stack_activation(self, activation_name: str, layer: int = -1, sublayer_type: str | None = None
                         ) -> torch.Tensor:
        """One activation of every layer before ``layer`` (-1 / None: all), stacked ``(layers, ...)``:
        ``cache.stack_activation("pattern")`` is ``(n_layers, batch, head_index, query_pos, key_pos)``."""
        layer = self.model.num_layers if layer is None or layer == -1 else layer
        return torch.stack([self[activation_name, l, sublayer_type] for l in range(layer)], dim=0)

    def get_neuron_results(self, layer: int, neuron_slice: Any = None, pos_slice: Any = None,
                           project_output_onto: torch.Tensor | None = None) -> torch.Tensor:
        """Each neuron's write to the residual stream in layer ``layer``: ``hook_post[..., n] * W_out[n]``,
        ``(batch, pos, d_mlp, d_model)`` (their sum is ``hook_mlp_out`` minus ``b_out`` on models that add the MLP
        output as it is). ``neuron_slice`` / ``pos_slice``: TL's slices. ``project_output_onto`` ``(d_model,)`` /
        ``(d_model, k)``: ``W_out`` is projected first, giving ``(..., d_mlp)`` / ``(..., d_mlp, k)``.
        Needs ``blocks.{layer}.mlp.hook_post`` in the cache.

        Example (on a cache with hook_post): ``cache.get_neuron_results(0).sum(-2)`` is layer 0's MLP output.
        """
        acts = _pos(self["post", layer, "mlp"], pos_slice, -2)  # (batch, pos, d_mlp)
        W_out = self._W_out(layer)  # (d_mlp, d_model)
        if neuron_slice is not None:
            acts = _pos(acts, neuron_slice, -1)
            W_out = _pos(W_out, neuron_slice, 0)
        factor = self._residual_factor(layer)
        if factor != 1.0:
            acts = acts * factor
        W_out = W_out.to(acts.device)
        if project_output_onto is None:
            return acts[..., None] * W_out
        projected = W_out @ project_output_onto.to(W_out.device, W_out.dtype)  # (d_mlp,) or (d_mlp, k)
        return acts * projected if projected.dim() == 1 else acts[..., None] * projected

    def _d_mlp(self) -> int:
        return self._W_out(0).shape[0]

    def _empty_like_embed(self, pos_slice: Any, last: int | None = None) -> torch.Tensor:
        like = _pos(self["hook_embed"] if self.has_embed else self["resid_pre", 0], pos_slice, -2)
        shape = tuple(like.shape) if last is None else (*like.shape[:-1], last)
        return like.new_zeros((0, *shape))

    def stack_neuron_results(self, layer: int, pos_slice: Any = None, neuron_slice: Any = None,
                             return_labels: bool = False, incl_remainder: bool = False, apply_ln: bool = False,
                             project_output_onto: torch.Tensor | None = None, mlp_input: bool = False):
        """Every neuron's write to the residual stream in the layers before ``layer`` (-1 / None: all),
        ``(layer * d_mlp, batch, pos, d_model)``, labels ``"L0N0"``...; ``incl_remainder`` adds the residual the
        stack feeds (``resid_pre`` of ``layer``; ``resid_mid`` with ``mlp_input``) minus their sum. ``apply_ln``:
        that layer's ln1 (ln2 with ``mlp_input``) cached scale, as ``apply_ln_to_stack``. With
        ``project_output_onto`` the last dimension is the projection (the norm then folded in analytically,
        as TL does, so no ``(d_mlp, d_model)`` product is built).

        Example (on a cache with hook_post): ``stack, labels = cache.stack_neuron_results(-1, return_labels=True)``.
        """
        n = self.model.num_layers
        layer = n if layer is None or layer == -1 else layer
        if incl_remainder and layer < 0:
            raise ValueError(f"layer must be >= 0 with incl_remainder=True (-1 / None mean n_layers), got {layer}.")
        neuron_slice = _keep_dim(neuron_slice)
        project, squeeze = _as_2d(project_output_onto)
        ids = _pos(torch.arange(self._d_mlp()), neuron_slice, 0) if layer > 0 else torch.arange(0)
        labels = [f"L{l}N{int(h)}" for l in range(layer) for h in ids]
        target_key = ("resid_mid", layer) if mlp_input else ("resid_post", layer - 1)
        if apply_ln and project is not None:
            components = self._neurons_ln_projected(layer, pos_slice, neuron_slice, project, mlp_input)
            if incl_remainder:
                target = self.apply_ln_to_stack(_pos(self[target_key], pos_slice, -2)[None], layer,
                                                mlp_input=mlp_input, pos_slice=pos_slice)[0]
                remainder = target @ project.to(target.dtype)
                if components.shape[0] > 0:
                    remainder = remainder - components.sum(0)
                components = torch.cat([components, remainder[None]], dim=0)
                labels.append("remainder")
        else:
            parts = [self.get_neuron_results(l, neuron_slice, pos_slice, project) for l in range(layer)]
            if parts:
                components = torch.cat(parts, dim=-2).movedim(-2, 0)  # (layer * d_mlp, batch, pos, d_model)
            else:
                components = self._empty_like_embed(pos_slice, None if project is None else project.shape[-1])
            if incl_remainder:
                target = _pos(self[target_key], pos_slice, -2)
                if project is not None:
                    target = target @ project.to(target.dtype)
                remainder = target - components.sum(0) if components.shape[0] else target
                components = torch.cat([components, remainder[None]], dim=0)
                labels.append("remainder")
            if apply_ln:
                components = self.apply_ln_to_stack(components, layer, mlp_input=mlp_input, pos_slice=pos_slice)
        if squeeze:
            components = components.squeeze(-1)
        return (components, labels) if return_labels else components

    def _neurons_ln_projected(self, layer: int, pos_slice: Any, neuron_slice: Any, project: torch.Tensor,
                              mlp_input: bool) -> torch.Tensor:
        """``apply_ln`` and a projection together, per neuron n: ``LN_s(a_n W_out[n]) @ p = a_n / s *
        (W_out[n] @ p - mean(W_out[n]) * sum(p))`` (the mean term only for centring norms)."""
        key = f"blocks.{layer}.ln{2 if mlp_input else 1}.hook_scale" if layer < self.model.num_layers \
            else "ln_final.hook_scale"
        if key not in self.cache_dict:
            raise TLNameError(f"apply_ln needs {key!r} in the cache: add it to names_filter (or use apply_ln=False).")
        scale = _pos(self.cache_dict[key], pos_slice, -2)  # (batch, pos, 1)
        if layer == self.model.num_layers:
            norm = final_norm_affine(self.model)
            centers = bool(norm is not None and norm.centers)
        else:
            centers = _block_norm_centers(self.model, layer, mlp_input)
        parts = []
        for l in range(layer):
            W_out = _pos(self._W_out(l), neuron_slice, 0).to(scale.device)  # (d_mlp, d_model)
            lin = W_out @ project.to(W_out.device, W_out.dtype)  # (d_mlp, k)
            if centers:
                lin = lin - W_out.mean(-1)[:, None] * project.to(W_out.dtype).sum(0)[None, :]
            acts = _pos(_pos(self["post", l, "mlp"], pos_slice, -2), neuron_slice, -1) * self._residual_factor(l)
            parts.append((acts / scale)[..., None] * lin)  # (batch, pos, d_mlp, k)
        if not parts:
            return self._empty_like_embed(pos_slice, project.shape[-1])
        return torch.cat(parts, dim=-2).movedim(-2, 0)

    def accumulated_bias(self, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True
                         ) -> torch.Tensor:
        """The output biases the blocks before ``layer`` add to the residual stream (``b_O``, and ``b_out`` with
        ``include_mlp_biases``; ``mlp_input``: block ``layer``'s ``b_O`` too), times the block's residual factor,
        ``(d_model,)`` float32 (TL's bridge's ``accumulated_bias``; zeros on models without biases)."""
        total = torch.zeros(self.model.hidden_size)
        layers = list(range(layer)) + ([layer] if mlp_input else [])
        if mlp_input and layer >= self.model.num_layers:
            raise ValueError(f"mlp_input=True: block {layer} does not exist ({self.model.num_layers} blocks).")
        for l in layers:
            factor = self._residual_factor(l)
            total = total + self.model.weights[l].b_O.detach().float().cpu() * factor
            if include_mlp_biases and l < layer:
                b_out = self._b_out(l)
                if b_out is not None:
                    total = total + b_out.float().cpu() * factor
        return total

    def get_full_resid_decomposition(self, layer: int | None = None, mlp_input: bool = False,
                                     expand_neurons: bool = True, apply_ln: bool = False, pos_slice: Any = None,
                                     return_labels: bool = False, project_output_onto: torch.Tensor | None = None):
        """The residual stream entering ``layer`` (None / -1: the unembedding; ``mlp_input``: its MLP) as a stack
        of every head's result (``L0H0``...), every neuron's (``L0N0``..., or each MLP's output ``{l}_mlp_out``
        without ``expand_neurons``), ``embed``, ``pos_embed`` (learned positions only) and ``bias`` (the
        accumulated output biases), in TL's order: ``(components, batch, pos, d_model)``, summing to the
        residual stream on models that add each branch's output as it is. ``apply_ln`` / ``project_output_onto``
        as in ``stack_neuron_results``. Needs hook_z (or hook_result), hook_post, hook_embed (and hook_mlp_out
        without ``expand_neurons``; the ln hook_scale with ``apply_ln``) in the cache.

        Example (on a full cache): ``stack, labels = cache.get_full_resid_decomposition(return_labels=True)``.
        """
        n = self.model.num_layers
        layer = n if layer is None or layer == -1 else layer
        project, squeeze = _as_2d(project_output_onto)
        folded = apply_ln and project is not None

        def ln_then_project(stack: torch.Tensor) -> torch.Tensor:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input=mlp_input, pos_slice=pos_slice)
            return stack @ project.to(stack.dtype) if project is not None else stack

        def finish(stack: torch.Tensor) -> torch.Tensor:
            if folded:
                return ln_then_project(stack)
            return stack @ project.to(stack.dtype) if project is not None else stack

        self._ensure_head_results(layer + (1 if mlp_input else 0))
        heads, labels = self.stack_head_results(layer + (1 if mlp_input else 0), pos_slice=pos_slice,
                                                return_labels=True)
        components = [finish(heads)]
        if layer > 0:
            if expand_neurons:
                neurons, neuron_labels = self.stack_neuron_results(layer, pos_slice=pos_slice, return_labels=True,
                                                                   apply_ln=folded, project_output_onto=project,
                                                                   mlp_input=mlp_input)
                components.append(neurons)
                labels = labels + neuron_labels
            else:
                mlps, mlp_labels = self.decompose_resid(layer, mlp_input=mlp_input, pos_slice=pos_slice,
                                                        incl_embeds=False, mode="mlp", return_labels=True)
                components.append(finish(mlps))
                labels = labels + mlp_labels
        for name, present in (("embed", self.has_embed), ("pos_embed", self.has_pos_embed)):
            if present:
                components.append(finish(_pos(self[f"hook_{name}"], pos_slice, -2)[None]))
                labels.append(name)
        bias = self.accumulated_bias(layer, mlp_input, include_mlp_biases=expand_neurons).to(heads.device)
        if folded:
            bias = ln_then_project(bias.to(heads.dtype).expand((1, *heads.shape[1:-1], self.model.hidden_size)))
        else:
            if project is not None:
                bias = bias @ project.to(bias.device, bias.dtype)
            bias = bias.to(heads.dtype).expand((1, *components[0].shape[1:]))
        components.append(bias)
        labels.append("bias")
        stack = torch.cat(components, dim=0)
        if apply_ln and not folded:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input=mlp_input, pos_slice=pos_slice)
        if squeeze:
            stack = stack.squeeze(-1)
        return (stack, labels) if return_labels else stack

    def _ensure_head_results(self, layer: int) -> None:
        """``hook_result`` for the layers before ``layer``: computed from hook_z where not cached."""
        if any(f"blocks.{l}.attn.hook_result" not in self.cache_dict for l in range(layer)):
            self.compute_head_results()

    # --- logit lens ----------------------------------------------------------------------------------------
    def logit_lens(self, layers: Sequence[int] | None = None, incl_mid: bool = False, positions: Any = -1,
                   batch_slice: Any = None, lens: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
                   apply_ln: bool = True, vocab: Any = None, targets: Any = None, return_type: str = "logits",
                   top_k: int | None = None, chunk_size: int = 64, enable_grad: bool = False) -> "LogitLensResult":
        """TL 4.3's ``cache.logit_lens``: the accumulated residual stream (``accumulated_resid``, labels
        ``"0_pre"``... ``"final_post"``) read through the final norm (recomputed per entry) and the unembedding,
        ``values (entries, batch, pos, selected)`` at ``positions`` (default: the last). ``layers``: entries to
        keep; ``lens(entry, index)``: a translator applied first; one of ``targets`` (str / id / list: shared;
        a tensor: one per row, with ranks), ``top_k`` or ``vocab`` selects the columns (none: the full
        vocabulary); ``return_type``: "logits", "log_probs" or "probs". The final entry equals the model's logits.

        Example (on a cache with the resid names): ``cache.logit_lens(targets=" Paris").rank_trajectory()``.
        """
        if return_type not in ("logits", "log_probs", "probs"):
            raise ValueError(f"return_type must be 'logits', 'log_probs' or 'probs', got {return_type!r}.")
        if sum(x is not None for x in (vocab, targets, top_k)) > 1:
            raise ValueError("pass at most one of vocab, targets and top_k.")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
        stack, labels = self.accumulated_resid(incl_mid=incl_mid, pos_slice=positions, return_labels=True)
        keep = list(range(len(labels))) if layers is None else [l + len(labels) if l < 0 else l for l in layers]
        if any(not 0 <= k < len(labels) for k in keep):
            raise ValueError(f"layers {list(layers or [])} out of range: the stack has entries 0..{len(labels) - 1} "
                             f"= {labels}.")
        stack, labels = stack[keep], [labels[k] for k in keep]
        has_batch = self.has_batch_dim and not isinstance(batch_slice, int)
        if self.has_batch_dim and batch_slice is not None:
            stack = _pos(stack, batch_slice, 1)
        with torch.enable_grad() if enable_grad else torch.no_grad():
            if lens is not None:
                stack = torch.stack([lens(stack[i], keep[i]) for i in range(stack.shape[0])], dim=0)
            readout = _readout(self.model, stack, apply_ln, vocab, targets, return_type, top_k, chunk_size)
        names = None
        if targets is not None and not isinstance(targets, torch.Tensor):
            names = [t if isinstance(t, str) else None for t in (targets if isinstance(targets, (list, tuple))
                                                                 else [targets])]
        return LogitLensResult(readout, labels, has_batch, names)

    # --- SSM layers (TL 4.3's SSM bridges) ---------------------------------------------------------------
    def ssm_layers(self, mixer_type: Any = None) -> list[int]:
        """The layers whose mixer is a state-space / recurrent one: unilens has no hooks inside such mixers, so
        this is ``[]`` on models whose every layer has softmax attention and an error on the others."""
        modules = getattr(self.model, "_attention_modules", None) or []
        without = [i for i, m in enumerate(modules) if m is None]
        if without:
            raise NotImplementedError(f"layers {without} have no softmax attention; unilens has no hooks inside "
                                      "state-space / recurrent mixers, so TL's SSM cache methods are not available.")
        return []

    def compute_ssm_effective_attention(self, *args: Any, **kwargs: Any) -> Any:
        """TL 4.3's SSM effective attention: refused (no SSM layers, or unilens has no hooks inside them)."""
        self.ssm_layers()
        raise RuntimeError("No SSM mixer layers found: this model's layers are all softmax attention.")

    def compute_ssm_state(self, *args: Any, **kwargs: Any) -> Any:
        """TL 4.3's SSM state reconstruction: refused (no SSM layers, or unilens has no hooks inside them)."""
        self.ssm_layers()
        raise RuntimeError("No SSM mixer layers found: this model's layers are all softmax attention.")


class ActivationCache(CacheAnalysis):
    """TL's ``ActivationCache`` over one ``run_with_cache``: ``cache["pattern", 3]``,
    ``cache["blocks.3.attn.hook_pattern"]``, ``cache["resid_post", -1]``, ``cache["q", 0, "attn"]``; dict-like
    (``keys`` / ``values`` / ``items`` / ``len`` / ``in``); ``to(device)``, ``remove_batch_dim()``,
    ``apply_slice_to_batch_dim``, ``toggle_autodiff``; and the analysis methods of ``CacheAnalysis``
    (``accumulated_resid``, ``decompose_resid``, ``get_full_resid_decomposition``, ``stack_head_results``,
    ``compute_head_results``, ``get_neuron_results``, ``stack_neuron_results``, ``stack_activation``,
    ``apply_ln_to_stack``, ``logit_attrs``, ``logit_lens``), with TransformerLens 4.3's semantics (the bridge's
    numbers: bench/tl_cache_compare.py). Tensors are in TL's layout (see ``tl_names.BLOCK_ALIASES``).

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
        # TL code builds ActivationCache(cache_dict, model) with the TL view (unilens.HookedTransformer): its methods
        # read the standardized model's own state, so keep the model the view wraps
        self.model = model.model if getattr(type(model), "wraps_standardized_model", False) else model
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

    def _batch_size(self) -> int:
        """The most common leading size of the cached tensors (TL 4.3's rule)."""
        sizes = [v.shape[0] for v in self.cache_dict.values() if v.dim() > 0]
        return max(set(sizes), key=sizes.count) if sizes else 1

    def remove_batch_dim(self, batch_size: int | None = None) -> "ActivationCache":
        """Drop the batch dimension of a batch-1 cache (in place, like TL; ``batch_size``: the true batch size,
        else the most common leading size); an error for a larger batch, a warning when already removed.

        Example (a one-prompt cache): ``cache.remove_batch_dim()["resid_post", 0].shape`` is ``(pos, d_model)``.
        """
        if not self.has_batch_dim:
            logging.warning("Tried removing batch dimension after already having removed it.")
            return self
        batch_size = self._batch_size() if batch_size is None else batch_size
        if batch_size != 1:
            raise ValueError(f"cannot remove the batch dimension: the batch has {batch_size} rows (needs 1; "
                             "select one first with apply_slice_to_batch_dim(i)).")
        self.cache_dict = {k: (v[0] if v.dim() > 0 and v.shape[0] == 1 else v) for k, v in self.cache_dict.items()}
        self.has_batch_dim = False
        return self

    def apply_slice_to_batch_dim(self, batch_slice: Any) -> "ActivationCache":
        """A new cache of some batch rows (TL's ``Slice``: an int drops the batch dimension, a (start, stop)
        tuple / slice / list of rows keeps it); tensors whose leading size is not the batch's are kept whole.

        Example (a cache of 3 prompts): ``cache.apply_slice_to_batch_dim(0)["resid_post", 0]`` is ``(pos, d_model)``.
        """
        if not self.has_batch_dim and batch_slice is not None:
            raise ValueError("cannot index the batch of a cache without a batch dimension (remove_batch_dim ran).")
        batch = self._batch_size()
        sliced = {k: (_pos(v, batch_slice, 0) if v.dim() > 0 and v.shape[0] == batch else v)
                  for k, v in self.cache_dict.items()}
        keeps_dim = self.has_batch_dim and not isinstance(batch_slice, int)
        return ActivationCache(sliced, self.model, has_batch_dim=keeps_dim)

    def toggle_autodiff(self, mode: bool = False) -> None:
        """``torch.set_grad_enabled(mode)``, globally, as TL does (with its warning); ``torch.no_grad()`` /
        ``torch.inference_mode()`` do the same for one block without touching global state."""
        logging.warning("Changed the global state, set autodiff to %s", mode)
        torch.set_grad_enabled(mode)


# ----------------------------------------------------------------------------------------------------------------
# Logit lens results (TL 4.3's LogitReadout / LogitLensResult, the fields and helpers TL's demos use)
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class LogitReadout:
    """Vectors read through the final norm and unembedding: ``values (..., selected)`` (the ``targets`` /
    ``top_k`` / ``vocab`` columns, else the full vocabulary), ``entropy (...)`` over the full vocabulary, and
    with targets their full-vocabulary ``target_ranks`` (0: the argmax)."""

    values: torch.Tensor
    return_type: str
    entropy: torch.Tensor
    top_ids: torch.Tensor | None = None
    vocab_ids: torch.Tensor | None = None
    target_ids: torch.Tensor | None = None
    target_ranks: torch.Tensor | None = None
    per_row_targets: bool = False
    applied_ln: bool = True

    @property
    def selected_ids(self) -> torch.Tensor | None:
        """The token ids along the last axis of ``values`` (None: the full vocabulary)."""
        for ids in (self.target_ids, self.vocab_ids, self.top_ids):
            if ids is not None:
                return ids
        return None


@dataclass
class LogitLensResult:
    """``cache.logit_lens(...)``: ``readout`` (its ``values (entries, [batch,] [pos,] selected)``), the stack's
    ``labels`` ("0_pre"... "final_post"), whether a batch axis follows the entries, and the target strings."""

    readout: LogitReadout
    labels: list[str]
    has_batch_dim: bool
    target_names: list[str | None] | None = field(default=None)

    @property
    def values(self) -> torch.Tensor:
        return self.readout.values

    def rank_trajectory(self, target: str | int | None = None) -> torch.Tensor:
        """One target's full-vocabulary rank at every entry ``(entries, ...)`` (``target``: the string or id
        passed as ``targets``; None when there was one, or per-row targets)."""
        ranks, ids = self.readout.target_ranks, self.readout.target_ids
        if ranks is None or ids is None:
            raise ValueError("rank_trajectory needs a lens run with targets=...")
        if self.readout.per_row_targets or target is None:
            if not self.readout.per_row_targets and ids.numel() != 1:
                raise ValueError("pass target= when more than one target was requested.")
            if self.readout.per_row_targets and target is not None:
                raise ValueError("per-row targets have one target per row: call rank_trajectory().")
            return ranks[..., 0]
        if isinstance(target, str):
            names = self.target_names or []
            if target not in names:
                raise ValueError(f"unknown target {target!r}: the targets passed were {names}.")
            return ranks[..., names.index(target)]
        where = (ids == int(target)).nonzero().flatten()
        if where.numel() == 0:
            raise ValueError(f"token id {target} was not among the requested targets.")
        return ranks[..., int(where[0])]

    def top_tokens(self, tokenizer: Any) -> dict[str, Any]:
        """The top-k tokens decoded, ``{label: nested lists of strings}`` (needs ``top_k=``)."""
        if self.readout.top_ids is None:
            raise ValueError("top_tokens needs a lens run with top_k=...")

        def decode(ids: torch.Tensor) -> Any:
            return tokenizer.decode([int(ids)]) if ids.dim() == 0 else [decode(row) for row in ids]

        return {label: decode(self.readout.top_ids[i]) for i, label in enumerate(self.labels)}


def _readout(model: StandardizedModel, vectors: torch.Tensor, apply_ln: bool, vocab: Any, targets: Any,
             return_type: str, top_k: int | None, chunk_size: int) -> LogitReadout:
    """``vectors (..., d_model)`` through the model's own path to its logits (the final norm with
    ``apply_ln``, the unembedding, the logit post-processing such as Gemma 2's softcap), ``chunk_size`` rows
    at a time, keeping only the selected columns."""
    accessor = model.module_accessor
    arch = model.architecture
    lead = tuple(vectors.shape[:-1])
    per_row = isinstance(targets, torch.Tensor) and targets.dim() >= 1
    target_ids = None
    if targets is not None:
        if isinstance(targets, torch.Tensor):
            target_ids = targets.reshape(1) if targets.dim() == 0 else targets
        else:
            items = targets if isinstance(targets, (list, tuple)) else [targets]
            target_ids = torch.tensor([to_single_token(model, t) if isinstance(t, str) else int(t) for t in items])
        target_ids = target_ids.long()
    if per_row:
        if target_ids.dim() > len(lead):
            raise ValueError(f"per-row targets {tuple(target_ids.shape)} have more dims than the rows {lead}.")
        target_ids = target_ids.reshape((1,) * (len(lead) - target_ids.dim()) + tuple(target_ids.shape))
        target_ids = target_ids.expand(*lead)
    vocab_ids = torch.as_tensor(vocab, dtype=torch.long).reshape(-1) if vocab is not None else None
    flat = vectors.reshape(-1, vectors.shape[-1])
    values, ranks, tops, entropy = [], [], [], []
    for start in range(0, flat.shape[0], chunk_size):
        chunk = flat[start:start + chunk_size]
        if apply_ln:
            logits = accessor.project_on_vocab(chunk)
        else:
            logits = apply_logit_postprocessing(accessor.get_unembed()(chunk), arch.logit_postprocessing)
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        entropy.append(-(log_probs.exp() * log_probs).sum(-1))
        quantity = logits if return_type == "logits" else log_probs if return_type == "log_probs" else log_probs.exp()
        if per_row:
            rows = target_ids.reshape(-1)[start:start + chunk_size].to(logits.device)[:, None]  # (n, 1)
            picked = logits.gather(-1, rows)
            ranks.append((logits > picked).sum(-1, keepdim=True))
            values.append(quantity.gather(-1, rows))
        elif target_ids is not None:
            picked = logits[:, target_ids.to(logits.device)]  # (n, t)
            ranks.append((logits[:, None, :] > picked[..., None]).sum(-1))
            values.append(quantity[:, target_ids.to(logits.device)])
        elif top_k is not None:
            top = torch.topk(logits, k=top_k, dim=-1)
            tops.append(top.indices)
            values.append(quantity.gather(-1, top.indices))
        elif vocab_ids is not None:
            values.append(quantity[:, vocab_ids.to(logits.device)])
        else:
            values.append(quantity)
    return LogitReadout(
        values=torch.cat(values).reshape(*lead, -1), return_type=return_type,
        entropy=torch.cat(entropy).reshape(lead), top_ids=torch.cat(tops).reshape(*lead, -1) if tops else None,
        vocab_ids=vocab_ids, target_ids=target_ids, target_ranks=torch.cat(ranks).reshape(*lead, -1) if ranks else None,
        per_row_targets=per_row, applied_ln=apply_ln)


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
