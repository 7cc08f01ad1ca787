"""Deliberately wrong attention functions (one planted fault each) that `check_attention` must catch.

The tiled ones (`TILED_FAULT_NAMES`) break where optimized kernels break: past the first key tile, in a separate
one-query (decode) path, in low-precision accumulation. All use the flash-attention-2 calling convention of
transformers (`mask_format="flash"`: the `(batch, key)` padding mask or None; the function applies causality and the
sliding window itself), so masking bugs can live in them. `correct` and `tiled_correct` are the same code with no
fault, so a test can show that only the planted fault differs. `plant_attention_fault` puts one of `MODEL_FAULTS`
into one layer of a real model (for `diff_models`).

Example:
    >>> from unilens.conformance import check_attention
    >>> from unilens.conformance_faults import FAULTS
    >>> check_attention(FAULTS["wrong_scale"], cases=["scaling"], dtypes=["float32"]).passed
    False
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..arch.discovery import ModuleMap
from .diff import _implementation_function
from .kernels import AttentionImplementation

FAULT_NAMES = (
    "wrong_scale",
    "window_off_by_one",
    "sinks_ignored",
    "causal_missing",
    "padding_ignored",
    "gqa_interleaved",
    "gqa_values_interleaved",
    "softcap_skipped",
    "fp16_softmax_no_max",
)


def _simple_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    fault: str | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    s_aux: torch.Tensor | None = None,
    **_: Any,
) -> tuple[torch.Tensor, None]:
    """Straightforward attention with an optional planted fault; returns (output (batch, q, heads, dim), None)."""
    batch, heads, q_len, head_dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    if fault == "gqa_interleaved":  # query head h -> kv head h % kv_heads (wrong: HF maps h -> h // groups)
        key, value = key.repeat(1, groups, 1, 1), value.repeat(1, groups, 1, 1)
    elif fault == "gqa_values_interleaved":  # keys mapped right, values wrong: probabilities stay correct
        key, value = key.repeat_interleave(groups, dim=1), value.repeat(1, groups, 1, 1)
    else:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    if fault == "wrong_scale" or scaling is None:
        scaling = head_dim**-0.5
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling  # (batch, heads, q, k)
    if softcap is not None and fault != "softcap_skipped":
        scores = torch.tanh(scores / softcap) * softcap

    q_pos = torch.arange(q_len)[:, None] + (k_len - q_len)  # bottom-right aligned, as with a KV cache
    k_pos = torch.arange(k_len)[None, :]
    visible = torch.ones(q_len, k_len, dtype=torch.bool)
    if getattr(module, "is_causal", True) and fault != "causal_missing":
        visible &= k_pos <= q_pos
    if sliding_window is not None:
        if fault == "window_off_by_one":  # W + 1 keys
            visible &= k_pos >= q_pos - sliding_window
        else:
            visible &= k_pos > q_pos - sliding_window
    visible = visible[None, None]
    if attention_mask is not None and fault != "padding_ignored":
        visible = visible & attention_mask.bool()[:, None, None, :]
    scores = scores.masked_fill(~visible, torch.finfo(scores.dtype).min)

    sinks = s_aux if fault != "sinks_ignored" else None
    if sinks is not None:
        scores = torch.cat([scores, sinks.to(scores.dtype).reshape(1, -1, 1, 1).expand(batch, -1, q_len, 1)], dim=-1)
    if fault == "fp16_softmax_no_max":  # exp of raw logits in the input dtype: overflows fp16 for logits > ~11
        exp = torch.exp(scores)
        probs = exp / exp.sum(dim=-1, keepdim=True)
    else:
        probs = torch.softmax(scores.float(), dim=-1).to(query.dtype)
    if sinks is not None:
        probs = probs[..., :-1]
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


TILED_FAULT_NAMES = (
    "tile_no_rescale",  # the running output is not rescaled when a later tile raises the running max
    "tile_drop_partial",  # the last partial key tile is dropped
    "tile_sinks_first_only",  # the sink's mass is taken against the first tile's max and never rescaled
    "decode_window_dropped",  # the one-query (decode) path ignores the sliding window
    "decode_sinks_dropped",  # ... ignores the sinks
    "decode_padding_dropped",  # ... ignores the padding mask
    "decode_gqa_interleaved",  # ... maps query head h to kv head h % kv_heads
    "low_precision_accumulation",  # running sum and output accumulated in the input dtype (bf16 / fp16)
    "dropout_from_module",  # applies module.attention_dropout whatever the dropout argument and the mode say
    # key tiles wholly left of every query's sliding window are skipped (a correct optimization), but the sink is
    # folded into the running softmax when key tile 0 is processed: lost once the window starts past the first tile
    "tile_window_skip_sinks_lost",
)


def _tiled_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    fault: str | None,
    tile: int = 64,
    skip_masked_tiles: bool = False,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    s_aux: torch.Tensor | None = None,
    **_: Any,
) -> tuple[torch.Tensor, None]:
    """Flash-style attention: keys in tiles of ``tile``, an online softmax (running max ``m``, running sum ``l``,
    running output ``acc``) accumulated in float32, one optional planted fault. ``skip_masked_tiles``: key tiles
    wholly before the first query's sliding window are not visited (as flash kernels do). Returns (output, None)."""
    batch, heads, q_len, head_dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    decode = q_len == 1
    if fault == "decode_gqa_interleaved" and decode:
        key, value = key.repeat(1, groups, 1, 1), value.repeat(1, groups, 1, 1)
    else:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scaling = head_dim**-0.5 if scaling is None else scaling
    low = fault == "low_precision_accumulation"
    acc_dtype = query.dtype if low else torch.float32
    q = query.float()
    q_pos = torch.arange(q_len)[:, None] + (k_len - q_len)
    padding = attention_mask if not (fault == "decode_padding_dropped" and decode) else None
    window = sliding_window if not (fault == "decode_window_dropped" and decode) else None
    sinks = s_aux if not (fault == "decode_sinks_dropped" and decode) else None
    neg = torch.finfo(torch.float32).min
    m = torch.full((batch, heads, q_len, 1), neg)  # running max
    l = torch.zeros((batch, heads, q_len, 1), dtype=acc_dtype)  # running sum of exp
    acc = torch.zeros((batch, heads, q_len, value.shape[-1]), dtype=acc_dtype)
    sink_mass = None
    sink_in_loop = fault == "tile_window_skip_sinks_lost"
    if sinks is not None and fault != "tile_sinks_first_only" and not sink_in_loop:
        m = sinks.float().reshape(1, -1, 1, 1).expand(batch, heads, q_len, 1).clone()  # the sink as a pseudo-key
        l = torch.ones_like(l)
    end = k_len - (k_len % tile) if fault == "tile_drop_partial" and k_len > tile and k_len % tile else k_len
    first = 0
    if skip_masked_tiles and window is not None and getattr(module, "is_causal", True):
        first = max(0, (k_len - q_len) - window + 1) // tile * tile  # the tile of the first query's first key
    for start in range(first, end, tile):
        if sink_in_loop and start == 0 and sinks is not None:  # equivalent to the above, unless tile 0 is skipped
            m = sinks.float().reshape(1, -1, 1, 1).expand(batch, heads, q_len, 1).clone()
            l = torch.ones_like(l)
        stop = min(start + tile, end)
        k_t, v_t = key[:, :, start:stop].float(), value[:, :, start:stop].float()
        s = torch.matmul(q, k_t.transpose(-1, -2)) * scaling  # (batch, heads, q, tile)
        if softcap is not None:
            s = torch.tanh(s / softcap) * softcap
        k_pos = torch.arange(start, stop)[None, :]
        visible = torch.ones(q_len, stop - start, dtype=torch.bool)
        if getattr(module, "is_causal", True):
            visible &= k_pos <= q_pos
        if window is not None:
            visible &= k_pos > q_pos - window
        visible = visible[None, None]
        if padding is not None:
            visible = visible & padding.bool()[:, None, None, start:stop]
        s = s.masked_fill(~visible, neg)
        m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))
        p = torch.exp(s - m_new)
        if fault == "dropout_from_module":
            p = nn.functional.dropout(p, p=getattr(module, "attention_dropout", 0.0), training=True)
        alpha = torch.exp(m - m_new)
        l = (l * alpha.to(acc_dtype) + p.sum(dim=-1, keepdim=True).to(acc_dtype)).to(acc_dtype)
        pv = torch.matmul(p.to(acc_dtype) if low else p, v_t.to(acc_dtype) if low else v_t)
        if fault == "tile_no_rescale" and start > 0:
            acc = acc + pv.to(acc_dtype)
        else:
            acc = (acc * alpha.to(acc_dtype) + pv.to(acc_dtype)).to(acc_dtype)
        m = m_new
        if fault == "tile_sinks_first_only" and sinks is not None and start == 0:
            sink_mass = torch.exp(sinks.float().reshape(1, -1, 1, 1) - m)  # never rescaled afterwards
    denominator = l.float() + (sink_mass if sink_mass is not None else 0.0)
    out = acc.float() / denominator
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def _query_blocked_attention(module, query, key, value, attention_mask, *, block: int, **kwargs: Any):
    """`_tiled_attention` over blocks of ``block`` queries, each against the keys up to its last query (causal), so
    that with ``skip_masked_tiles`` a later block skips the key tiles left of its own window, as flash kernels do."""
    q_len, k_len = query.shape[2], key.shape[2]
    if q_len <= block or not getattr(module, "is_causal", True):
        return _tiled_attention(module, query, key, value, attention_mask, **kwargs)
    outputs = []
    for a in range(0, q_len, block):
        b = min(a + block, q_len)
        stop = k_len - q_len + b  # keys 0 .. the block's last query position
        mask = None if attention_mask is None else attention_mask[:, :stop]
        out, _ = _tiled_attention(module, query[:, :, a:b], key[:, :, :stop], value[:, :, :stop], mask, **kwargs)
        outputs.append(out)
    return torch.cat(outputs, dim=1), None


def _make_tiled(fault: str | None, tile: int = 64, query_block: int | None = None, skip_masked_tiles: bool = False,
                name: str | None = None) -> AttentionImplementation:
    """``skip_masked_tiles``: key tiles left of the sliding window are not visited, per block of ``query_block``
    queries (None: all queries at once)."""
    def fn(module, query, key, value, attention_mask, **kwargs):
        if query_block is None:
            return _tiled_attention(module, query, key, value, attention_mask, fault=fault, tile=tile,
                                    skip_masked_tiles=skip_masked_tiles, **kwargs)
        return _query_blocked_attention(module, query, key, value, attention_mask, block=query_block, fault=fault,
                                        tile=tile, skip_masked_tiles=skip_masked_tiles, **kwargs)

    fn.__name__ = name or (f"tiled_{fault}" if fault else "tiled_correct")
    return AttentionImplementation(fn.__name__, fn, mask_format="flash")


def _make(fault: str | None) -> AttentionImplementation:
    def fn(module, query, key, value, attention_mask, **kwargs):
        return _simple_attention(module, query, key, value, attention_mask, fault=fault, **kwargs)

    fn.__name__ = f"fault_{fault}" if fault else "correct_simple"
    return AttentionImplementation(fn.__name__, fn, mask_format="flash")


correct = _make(None)
tiled_correct = _make_tiled(None)  # a correct flash-style kernel: tiles of 64 keys, float32 online softmax
# the same, in blocks of 64 queries that skip the key tiles left of their sliding window
tiled_skip_correct = _make_tiled(None, query_block=64, skip_masked_tiles=True, name="tiled_skip_correct")
FAULTS: dict[str, AttentionImplementation] = {name: _make(name) for name in FAULT_NAMES}
# tiles of 16 keys for the low-precision fault, so its accumulation error grows over many tiles
FAULTS.update({name: _make_tiled(name, 16 if name == "low_precision_accumulation" else 64)
               for name in TILED_FAULT_NAMES})
FAULTS["tile_window_skip_sinks_lost"] = _make_tiled("tile_window_skip_sinks_lost", 64, query_block=64,
                                                    skip_masked_tiles=True)
globals().update(FAULTS)  # usable as "unilens.conformance_faults:wrong_scale"


# ----------------------------------------------------------------------------------------------------------------
# Faults planted in one layer of a real model (for diff_models): that layer's attention gets its own config whose
# implementation name points at a faulty wrapper around the function the layer ran before (sdpa, or the model's own
# eager function: GPT-OSS's with its sinks), so that the planted fault is the only difference.
# ----------------------------------------------------------------------------------------------------------------


def _visible(attention_mask: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """sdpa's mask as a bool `(batch, 1, query, key)` (True = attend), causal when it is None."""
    batch, q_len, k_len = query.shape[0], query.shape[2], key.shape[2]
    if attention_mask is None:
        q_pos = torch.arange(q_len)[:, None] + (k_len - q_len)
        return (torch.arange(k_len)[None, :] <= q_pos)[None, None].expand(batch, 1, q_len, k_len)
    mask = attention_mask[..., :k_len]
    return mask if mask.dtype == torch.bool else mask == 0


_BASE_ATTRIBUTE = "_unilens_fault_base"  # on the faulty layer's config: the implementation it ran before


def _base_name(module: nn.Module) -> str:
    return getattr(getattr(module, "config", None), _BASE_ATTRIBUTE, "sdpa")


def _base(module, query, key, value, attention_mask, **kwargs):
    """The attention function this layer ran before the fault was planted."""
    return _implementation_function(module, _base_name(module))(module, query, key, value, attention_mask, **kwargs)


def _as_mask(allowed: torch.Tensor, module: nn.Module, attention_mask: torch.Tensor | None, dtype: torch.dtype):
    """A bool visibility in the format the base function takes: additive for eager (or a float mask), else bool."""
    if _base_name(module) == "eager" or (attention_mask is not None and attention_mask.is_floating_point()):
        dtype = attention_mask.dtype if attention_mask is not None and attention_mask.is_floating_point() else dtype
        return torch.where(allowed, torch.zeros((), dtype=dtype), torch.finfo(dtype).min)
    return allowed


def _scale(module, query, key, value, attention_mask, scaling=None, **kwargs):
    return _base(module, query, key, value, attention_mask, scaling=(scaling or query.shape[-1] ** -0.5) * 1.25,
                 **kwargs)


def _no_self(module, query, key, value, attention_mask, **kwargs):
    """A query never sees its own key (a window or causal mask off by one); key 0 stays visible."""
    allowed = _visible(attention_mask, query, key).clone()
    q_len, k_len = query.shape[2], key.shape[2]
    rows = torch.arange(q_len)
    allowed[:, :, rows, rows + (k_len - q_len)] = False
    allowed[:, :, :, 0] = True
    return _base(module, query, key, value, _as_mask(allowed, module, attention_mask, query.dtype), **kwargs)


def _padding_ignored(module, query, key, value, attention_mask, **kwargs):
    kwargs.pop("is_causal", None)
    if _base_name(module) == "eager":  # eager has no is_causal: a plain causal mask, padding (and window) dropped
        causal = _as_mask(_visible(None, query, key), module, None, query.dtype)
        return _base(module, query, key, value, causal, **kwargs)
    return _base(module, query, key, value, None, is_causal=query.shape[2] > 1, **kwargs)


def _decode_kv_heads_rolled(module, query, key, value, attention_mask, **kwargs):
    """Only the one-query (decode) path maps query heads to the wrong key/value heads."""
    if query.shape[2] == 1:
        perm = torch.arange(key.shape[1]).roll(1)
        key, value = key[:, perm], value[:, perm]
    return _base(module, query, key, value, attention_mask, **kwargs)


MODEL_FAULTS = {"scale": _scale, "no_self": _no_self, "padding_ignored": _padding_ignored,
                "decode_kv_heads_rolled": _decode_kv_heads_rolled}


def plant_attention_fault(model: nn.Module, layer: int, fault: str) -> nn.Module:
    """Make layer ``layer``'s attention of an HF model run fault ``fault`` (`MODEL_FAULTS`); returns the model.

    Only that attention module gets a config of its own whose implementation is the faulty function, wrapped
    around the implementation it ran before (sdpa, or the model's own eager function, e.g. GPT-OSS's with sinks);
    models whose attention calls transformers' attention interface (Llama, Mistral, Qwen, GPT-OSS, ...) honour it.

    Example:
        >>> from unilens.testing import tiny_model
        >>> hf, _ = tiny_model("llama")
        >>> _ = plant_attention_fault(hf, 1, "scale")
        >>> [layer.self_attn.config._attn_implementation for layer in hf.model.layers]
        ['sdpa', 'unilens_fault_scale']
    """
    import copy

    from transformers import AttentionInterface

    if fault not in MODEL_FAULTS:
        raise ValueError(f"unknown fault {fault!r}; choose one of {sorted(MODEL_FAULTS)}")
    name = f"unilens_fault_{fault}"
    AttentionInterface.register(name, MODEL_FAULTS[fault])
    attention = ModuleMap(model).get_attention(layer)
    config = copy.copy(attention.config)
    setattr(config, _BASE_ATTRIBUTE, getattr(attention.config, _BASE_ATTRIBUTE, attention.config._attn_implementation))
    config._attn_implementation = name
    attention.config = config
    return model
