"""Deliberately wrong attention functions (one planted fault each) that `check_attention` must catch.

They use the flash-attention-2 calling convention of transformers (`mask_format="flash"`: the `(batch, key)`
padding mask or None; the function applies causality and the sliding window itself), so masking bugs can live
in them. `correct` is the same code with no fault, so a test can show that only the planted fault differs.

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

from unilens.conformance import AttentionImplementation

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


def _make(fault: str | None) -> AttentionImplementation:
    def fn(module, query, key, value, attention_mask, **kwargs):
        return _simple_attention(module, query, key, value, attention_mask, fault=fault, **kwargs)

    fn.__name__ = f"fault_{fault}" if fault else "correct_simple"
    return AttentionImplementation(fn.__name__, fn, mask_format="flash")


correct = _make(None)
FAULTS: dict[str, AttentionImplementation] = {name: _make(name) for name in FAULT_NAMES}
globals().update(FAULTS)  # usable as "unilens.conformance_faults:wrong_scale"
