"""Per-head weight views in TransformerLens shapes: `W_Q`, `W_K`, `W_V`, `W_O`, `b_*` per layer, `W_U`, `W_E`."""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..core.accessors import LayerIndexed
from ..core.config import heads_attribute, text_config
from .offload import is_dispatched, parameter
from .structure import find_output_projection, is_projection, is_quantized, kv_source_layer

__all__ = ["LayerWeights", "WeightViews", "layer_weights"]

# Separate projections: (query, key, value) child names, tried in order.
_SEPARATE_QKV = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"), ("wq", "wk", "wv"), ("q", "k", "v"))

# Fused projections: child name -> how its output rows are laid out. ONE table, per upstream modeling code:
#   "concat":    [all q heads | all k heads | all v heads]  (GPT-2 / GPT-BigCode `c_attn`, Phi-3 `qkv_proj`,
#                Baichuan `W_pack`, Falcon multi-query `query_key_value`)
#   "per_head":  per head [q | k | v]  (GPT-NeoX `query_key_value`: view(..., heads, 3 * head_dim).chunk(3);
#                Bloom `_reshape` and Falcon without multi_query: view(..., heads, 3, head_dim))
#   "grouped":   per kv group [q heads of the group | k | v]  (Falcon new_decoder_architecture `_split_heads`)
_FUSED_QKV = ("qkv_proj", "c_attn", "query_key_value", "Wqkv", "W_pack")
_PER_HEAD_CLASSES = {"GPTNeoXAttention", "BloomAttention", "GPTNeoXJapaneseAttention"}

# Multi-head latent attention: queries / keys are built from low-rank latents split into rotary and non-rotary
# parts, so there is no single (hidden -> head_dim) map per head to view.
_MLA_MARKERS = ("kv_a_proj_with_mqa", "kv_b_proj")


def _linear_weight_out_in(module: nn.Module) -> torch.Tensor:
    """Weight as (out, in) whatever the layer type (GPT-2 Conv1D stores (in, out)); an offloaded weight (meta
    device under accelerate's ``device_map``) is read from accelerate's offload map (`unilens.offload`)."""
    weight = parameter(module, "weight")
    if isinstance(module, Conv1D):
        return weight.t()
    return weight


def _bias(module: nn.Module, out: int, like: torch.Tensor) -> torch.Tensor:
    b = parameter(module, "bias")
    return b if b is not None else torch.zeros(out, dtype=like.dtype, device=like.device)


def _to_heads(w_out_in: torch.Tensor, bias: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(heads * head_dim, hidden) -> W (heads, hidden, head_dim), b (heads, head_dim)."""
    n = w_out_in.shape[0] // head_dim
    w = w_out_in.reshape(n, head_dim, w_out_in.shape[1]).transpose(1, 2)
    return w, bias.reshape(n, head_dim)


def _num_heads(attn: nn.Module, config) -> int:
    """The attention module's own head count, else the config's (``unilens.core.config.heads_attribute``)."""
    value = heads_attribute(attn) or heads_attribute(config)
    if value is None:
        raise ValueError(f"cannot find the number of heads of {type(attn).__name__} (module or config)")
    return value


class LayerWeights:
    """Lazily computed weight views of one attention layer (plain tensors, sharing storage where possible; layers
    that accelerate offloaded to CPU / disk under ``device_map`` give their stored values, copies on the CPU).

    Shapes: `W_Q (heads, hidden, head_dim)`, `W_K` / `W_V (kv_heads, hidden, head_dim)`,
    `W_O (heads, head_dim, hidden)`, `b_Q (heads, head_dim)`, `b_K` / `b_V (kv_heads, head_dim)`, `b_O (hidden,)`.
    `q = x @ W_Q[h] + b_Q[h]` is the query of head h before rotary embeddings / QK-norm.

    Example:
        >>> from transformers import AutoConfig, AutoModelForCausalLM
        >>> cfg = AutoConfig.for_model("gpt2", n_embd=32, n_layer=1, n_head=4, vocab_size=64)
        >>> m = AutoModelForCausalLM.from_config(cfg)
        >>> layer_weights(m.transformer.h[0].attn, cfg).W_Q.shape
        torch.Size([4, 32, 8])
    """

    def __init__(self, attn: nn.Module, config, layer: int | None = None, kv_source: int | None = None):
        self.attn = attn
        self.config = config
        self.layer = layer
        # KV sharing (`structure.kv_source_layer`): the layer whose keys / values this one attends to; it has no
        # key / value projections, so W_K / W_V / b_K / b_V refuse, naming that layer
        self.kv_source = kv_source
        name = type(attn).__name__
        children = dict(attn.named_children())
        if all(m in children for m in _MLA_MARKERS):
            raise NotImplementedError(
                f"layer {layer}: {name} uses multi-head latent attention (MLA): queries and keys come from low-rank "
                "latents (kv_a_proj_with_mqa -> kv_a_layernorm -> kv_b_proj) with a separate shared rotary key, so "
                "no per-head linear W_Q / W_K from the residual stream exists. Use the attention hook points "
                "(attention_queries / attention_keys) for the actual tensors."
            )
        self._o_name, self._o_proj = find_output_projection(attn)
        if not is_projection(self._o_proj) or is_quantized(self._o_proj):
            raise NotImplementedError(
                f"layer {layer}: {name}'s output projection {self._o_name!r} ({type(self._o_proj).__name__}) is not a "
                "linear map of z (it mixes in other inputs), so no per-head W_O exists; use attention_heads (z)."
            )
        self.n_heads = _num_heads(attn, config)
        self.head_dim = _linear_weight_out_in(self._o_proj).shape[1] // self.n_heads

    # --- q / k / v ---------------------------------------------------------------------------------
    # Recomputed on every access, never cached: a cached view goes stale when `model.to(...)` swaps a parameter's
    # data, and views derived from parameters (not graph leaves) make the model refuse `copy.deepcopy`.
    @property
    def _qkv(self) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        children = dict(self.attn.named_children())
        for names in _SEPARATE_QKV:
            if all(isinstance(children.get(n), (nn.Linear, Conv1D)) for n in names):
                weights = [_linear_weight_out_in(children[n]) for n in names]  # (out, hidden) each
                return tuple(
                    _to_heads(w, _bias(children[n], w.shape[0], w), self.head_dim) for n, w in zip(names, weights)
                )
        for fused_name in _FUSED_QKV:
            fused = children.get(fused_name)
            if isinstance(fused, (nn.Linear, Conv1D)):
                return self._split_fused(fused)
        raise NotImplementedError(
            f"layer {self.layer}: {type(self.attn).__name__} has neither separate q/k/v projections "
            f"{_SEPARATE_QKV} nor a known fused one {_FUSED_QKV}; add its layout to unilens/weights.py."
        )

    def _split_fused(self, fused: nn.Module):
        w = _linear_weight_out_in(fused)  # (out, hidden)
        b = _bias(fused, w.shape[0], w)
        return tuple(_to_heads(w[i], b[i], self.head_dim) for i in self.fused_rows(fused))

    def fused_rows(self, fused: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Output rows of a fused q/k/v projection holding q, k and v, each in (head, head_dim) order."""
        w = _linear_weight_out_in(fused)  # (out, hidden)
        d, h = self.head_dim, self.n_heads
        cls = type(self.attn).__name__
        layout = "concat"
        if cls in _PER_HEAD_CLASSES:
            layout = "per_head"
        elif cls == "FalconAttention":
            if getattr(self.attn, "new_decoder_architecture", False):
                layout = "grouped"
            elif not getattr(self.attn, "multi_query", False):
                layout = "per_head"
        if layout == "per_head":
            rows = torch.arange(w.shape[0], device=w.device).reshape(h, 3, d)  # (heads, [q, k, v], head_dim)
            idx = [rows[:, j].reshape(-1) for j in range(3)]
        elif layout == "grouped":
            n_kv = (w.shape[0] // d - h) // 2
            per_group = h // n_kv + 2
            rows = torch.arange(w.shape[0], device=w.device).reshape(n_kv, per_group, d)
            idx = [rows[:, :-2].reshape(-1), rows[:, -2].reshape(-1), rows[:, -1].reshape(-1)]
        else:  # concat: [q (h*d) | k (kv*d) | v (kv*d)]
            kv_rows = (w.shape[0] - h * d) // 2
            arange = torch.arange(w.shape[0], device=w.device)
            idx = [arange[: h * d], arange[h * d : h * d + kv_rows], arange[h * d + kv_rows :]]
        return tuple(idx)

    def _query_only(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_Q, b_Q) of a KV-sharing layer, which owns a query projection only."""
        proj = dict(self.attn.named_children()).get("q_proj")
        if not isinstance(proj, (nn.Linear, Conv1D)):
            raise NotImplementedError(f"layer {self.layer}: {type(self.attn).__name__} has no q_proj to view.")
        w = _linear_weight_out_in(proj)
        return _to_heads(w, _bias(proj, w.shape[0], w), self.head_dim)

    def _kv(self, index: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kv_source is not None:
            source = "an earlier layer" if self.kv_source < 0 else f"layer {self.kv_source}"
            where = "" if self.kv_source < 0 else f" (model.weights[{self.kv_source}].{name})"
            raise NotImplementedError(
                f"layer {self.layer}: {type(self.attn).__name__} has no key / value projections: it attends to the "
                f"keys and values of {source} (KV sharing), so its {name} is that layer's{where}. "
                f"attention_keys[{self.layer}] / attention_values[{self.layer}] are those keys / values as this "
                "layer receives them."
            )
        return self._qkv[index]

    @property
    def W_Q(self) -> torch.Tensor:
        return self._query_only()[0] if self.kv_source is not None else self._qkv[0][0]

    @property
    def W_K(self) -> torch.Tensor:
        return self._kv(1, "W_K")[0]

    @property
    def W_V(self) -> torch.Tensor:
        return self._kv(2, "W_V")[0]

    @property
    def b_Q(self) -> torch.Tensor:
        return self._query_only()[1] if self.kv_source is not None else self._qkv[0][1]

    @property
    def b_K(self) -> torch.Tensor:
        return self._kv(1, "b_K")[1]

    @property
    def b_V(self) -> torch.Tensor:
        return self._kv(2, "b_V")[1]

    # --- output ------------------------------------------------------------------------------------
    @property
    def W_O(self) -> torch.Tensor:
        w = _linear_weight_out_in(self._o_proj)  # (hidden, heads * head_dim)
        return w.t().reshape(self.n_heads, self.head_dim, w.shape[0])

    @property
    def b_O(self) -> torch.Tensor:
        w = _linear_weight_out_in(self._o_proj)
        return _bias(self._o_proj, w.shape[0], w)

    def __repr__(self) -> str:
        return f"LayerWeights(layer={self.layer}, {type(self.attn).__name__}, heads={self.n_heads}, head_dim={self.head_dim})"


def layer_weights(attn: nn.Module, config, layer: int | None = None) -> LayerWeights:
    """Weight views of one plain attention module (see `LayerWeights`)."""
    return LayerWeights(attn, config, layer)


class WeightViews(LayerIndexed):
    """`model.weights[i].W_Q` ... and `model.weights.W_U (hidden, vocab)`, `model.weights.W_E (vocab, hidden)`.

    `model` is a `StandardizedTransformer` (uses its plain `_attention_modules` and `module_accessor`).

    Example:
        >>> from unilens import StandardizedTransformer
        >>> from unilens.testing import tiny_model
        >>> model = StandardizedTransformer(*tiny_model("llama"))
        >>> model.weights[0].W_O.shape == (model.num_heads, model.head_dim, model.hidden_size)
        True
    """

    def __init__(self, model):
        super().__init__(model, "weights")
        self._layers: dict[int, LayerWeights] = {}

    def _config(self):
        return text_config(self.model.module_accessor.model.config)

    def _count(self) -> int:
        return len(self.model._attention_modules)

    def _get(self, i: int) -> LayerWeights:
        modules = self.model._attention_modules
        if modules[i] is None:
            raise IndexError(
                f"layer {i} has no softmax attention; layers with attention: "
                f"{[j for j, m in enumerate(modules) if m is not None]}"
            )
        if i not in self._layers:
            is_dispatched(self.model.module_accessor.model)  # lets offloaded weights be found on ancestors' hooks
            self._layers[i] = LayerWeights(modules[i], self._config(), i, kv_source=kv_source_layer(modules, i))
        return self._layers[i]

    @property
    def W_U(self) -> torch.Tensor:
        """Unembedding `(hidden, vocab)` (the final norm is not folded in)."""
        return _linear_weight_out_in(self.model.module_accessor.get_unembed()).t()

    @property
    def W_E(self) -> torch.Tensor:
        """Token embedding `(vocab, hidden)`."""
        return parameter(self.model.module_accessor.get_embed_tokens(), "weight")
