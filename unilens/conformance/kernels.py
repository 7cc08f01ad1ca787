"""Attention kernel conformance: a float64 reference attention and `check_attention` over a case grid."""

from __future__ import annotations

import dataclasses
import importlib
import json
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = [
    "AttentionCase",
    "AttentionImplementation",
    "CaseResult",
    "ConformanceReport",
    "ImplementationUnavailable",
    "check_attention",
    "default_cases",
    "get_implementation",
    "reference_as_attention_fn",
    "reference_attention",
    "run_attn_check",
    "visibility_mask",
]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def _as_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ================================================================================================================
# 1. float64 reference attention
# ================================================================================================================


def visibility_mask(
    batch: int,
    q_len: int,
    k_len: int,
    *,
    causal: bool = True,
    attention_mask_2d: torch.Tensor | None = None,
    sliding_window: int | None = None,
    query_offset: int | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Which keys each query may see: bool `(batch, 1, query, key)`, True = visible.

    Query i sits at absolute position `query_offset + i` (default `k_len - q_len`, as with a KV cache). Causal:
    key j visible iff `j <= p`. Sliding window W (HF `sliding_window_causal_mask_function`): also `j > p - W`,
    i.e. the W keys `p-W+1 .. p`. Padding: `attention_mask_2d` `(batch, key)` with 1 = real token, 0 = pad.

    Example:
        >>> visibility_mask(1, 3, 3, sliding_window=2)[0, 0].int().tolist()
        [[1, 0, 0], [1, 1, 0], [0, 1, 1]]
    """
    if query_offset is None:
        query_offset = k_len - q_len
    q_pos = torch.arange(q_len, device=device)[:, None] + query_offset  # (query, 1)
    k_pos = torch.arange(k_len, device=device)[None, :]  # (1, key)
    visible = torch.ones(q_len, k_len, dtype=torch.bool, device=device)
    if causal:
        visible &= k_pos <= q_pos
    if sliding_window is not None:
        if not causal:
            raise ValueError("sliding_window is only defined here for causal attention; pass causal=True")
        visible &= k_pos > q_pos - sliding_window
    visible = visible[None, None].expand(batch, 1, q_len, k_len)
    if attention_mask_2d is not None:
        if attention_mask_2d.shape != (batch, k_len):
            raise ValueError(
                f"attention_mask_2d must be (batch, key) = {(batch, k_len)}, got {tuple(attention_mask_2d.shape)}"
            )
        visible = visible & attention_mask_2d.to(device=device).bool()[:, None, None, :]
    return visible.contiguous()


def reference_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    scaling: float,
    causal: bool = True,
    attention_mask_2d: torch.Tensor | None = None,
    sliding_window: int | None = None,
    sinks: torch.Tensor | None = None,
    softcap: float | None = None,
    query_offset: int | None = None,
    visible: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float64 attention with the semantics of transformers 5.23 eager.

    Args:
        query: `(batch, heads, query, head_dim)`; key / value: `(batch, kv_heads, key, head_dim)`. Kv head j serves
            query heads `j*g .. (j+1)*g - 1` with `g = heads // kv_heads` (HF `repeat_kv`).
        scaling: multiplies `q k^T` (take it from the module, it is not always `head_dim**-0.5`).
        causal, attention_mask_2d, sliding_window, query_offset: see `visibility_mask`.
        sinks: `(heads,)` learned sink logits (GPT-OSS): appended as an extra key column, dropped after the
            softmax, so the probabilities over real keys sum to `1 - p_sink`.
        softcap: `tanh(s / cap) * cap` on the scaled scores, before the mask (Gemma 2).
        visible: optional precomputed bool visibility `(batch|1, 1|heads, query, key)`; replaces the four
            arguments above. bias: optional additive float bias on the visible scores (same shape rules).

    Returns:
        `(output (batch, query, heads, head_dim), probs (batch, heads, query, key), scores (batch, heads, query,
        key))`, all float64. `scores` are the scaled (and softcapped) logits before masking.

    Fully masked rows (a query that sees no key, e.g. left padding): this reference returns probabilities 0 and an
    output of 0 (with sinks: all mass on the sink, which gives the same zeros). HF eager differs there: adding
    `finfo(dtype).min` to every score makes the row constant, so it returns a *uniform* distribution and the mean
    of the values; sdpa returns zeros. Those rows carry no information, so `check_attention` compares only rows
    with at least one visible key and reports the masked rows separately (NaN/inf there is still a failure).

    Example:
        >>> q = k = v = torch.eye(2)[None, None]  # one head, 2 tokens, head_dim 2
        >>> out, probs, _ = reference_attention(q, k, v, scaling=1.0)
        >>> round(probs[0, 0, 1, 1].item(), 4)  # e / (1 + e)
        0.7311
    """
    q, k, v = query.double(), key.double(), value.double()
    batch, heads, q_len, _ = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads cannot be grouped over {kv_heads} key/value heads")
    groups = heads // kv_heads
    k = k.repeat_interleave(groups, dim=1)  # (batch, heads, key, head_dim), blocked like repeat_kv
    v = v.repeat_interleave(groups, dim=1)

    scores = torch.matmul(q, k.transpose(-1, -2)) * scaling  # (batch, heads, query, key)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if visible is None:
        visible = visibility_mask(
            batch, q_len, k_len, causal=causal, attention_mask_2d=attention_mask_2d,
            sliding_window=sliding_window, query_offset=query_offset, device=q.device,
        )
    visible = visible.expand(batch, heads, q_len, k_len)
    logits = scores if bias is None else scores + bias.double()

    neg_inf = torch.tensor(float("-inf"), dtype=torch.float64, device=q.device)
    row_max = torch.where(visible, logits, neg_inf).amax(dim=-1, keepdim=True)  # (batch, heads, query, 1)
    if sinks is not None:
        sink = sinks.double().reshape(1, heads, 1, 1).expand(batch, heads, q_len, 1)
        row_max = torch.maximum(row_max, sink)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    exp = torch.where(visible, torch.exp(logits - row_max), torch.zeros_like(logits))
    denom = exp.sum(dim=-1, keepdim=True)
    if sinks is not None:
        denom = denom + torch.exp(sink - row_max)
    probs = torch.where(denom > 0, exp / torch.where(denom > 0, denom, torch.ones_like(denom)), torch.zeros_like(exp))
    output = torch.matmul(probs, v).transpose(1, 2).contiguous()  # (batch, query, heads, head_dim)
    return output, probs, scores


def _mask_to_visible_and_bias(
    attention_mask: torch.Tensor | None, batch: int, q_len: int, k_len: int, is_causal: bool,
    sliding_window: int | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Read a transformers 4D mask (bool: True = attend; float: additive, <= finfo.min/2 = hidden)."""
    if attention_mask is None:
        # sdpa's `is_causal` path aligns top-left but HF only takes it when query == key or query == 1; we use the
        # bottom-right (KV cache) alignment, which agrees in both cases.
        return visibility_mask(
            batch, q_len, k_len, causal=is_causal, sliding_window=sliding_window if is_causal else None, device="cpu"
        ), None
    mask = attention_mask[..., :k_len]
    if mask.dtype == torch.bool:
        return mask, None
    hidden = mask <= torch.finfo(mask.dtype).min / 2
    return ~hidden, torch.where(hidden, torch.zeros_like(mask), mask)


def reference_as_attention_fn(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`reference_attention` with transformers' attention-interface signature (computes in float64).

    Accepts the 4D masks transformers builds (bool for sdpa, additive `finfo.min` for eager, or None + the
    module's `is_causal`). Sinks come from `s_aux` or `module.sinks`. Returns `(output (batch, query, heads,
    head_dim), probs (batch, heads, query, key))` cast back to the query dtype.

    Example:
        >>> from transformers import AttentionInterface
        >>> AttentionInterface.register("reference64", reference_as_attention_fn)
    """
    if dropout and module.training:
        raise ValueError("reference attention has no dropout; put the model in eval mode (model.eval())")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    sinks = s_aux if s_aux is not None else getattr(module, "sinks", None)
    batch, _, q_len, _ = query.shape
    visible, bias = _mask_to_visible_and_bias(
        attention_mask, batch, q_len, key.shape[2], bool(getattr(module, "is_causal", True)),
        sliding_window if attention_mask is None else None,
    )
    output, probs, _ = reference_attention(
        query, key, value, scaling=scaling, sinks=sinks, softcap=softcap, visible=visible.to(query.device),
        bias=None if bias is None else bias.to(query.device),
    )
    return output.to(query.dtype), probs.to(query.dtype)


# ================================================================================================================
# 2. Cases, implementations, mask adapters
# ================================================================================================================

# Component blamed when a case fails while the case it builds on passes.
_FEATURE_COMPONENT = {
    "causal": "masking (causal)",
    "padding": "masking (padding)",
    "sliding_window": "masking (sliding window)",
    "cross_length": "masking (causal offset, query shorter than key)",
    "sinks": "sinks",
    "softcap": "softcap",
    "gqa": "GQA/MQA head mapping",
    "scaling": "scaling",
    "large_logits": "softmax numerics (large logits)",
    "shape": "shape handling",
    "length": "long sequences (key tiles past the first: running max / sum carried across tiles, last partial tile)",
    "decode": "the decode path (one query against a key/value cache)",
}


@dataclass(frozen=True)
class AttentionCase:
    """One input configuration. `base` names the case this one adds `adds` to (used for the diagnosis)."""

    name: str
    batch: int = 2
    heads: int = 4
    kv_heads: int = 4
    q_len: int = 8
    k_len: int | None = None  # None: same as q_len; larger: KV-cache style, queries are the last q_len positions
    head_dim: int = 16
    causal: bool = True
    padding: str | None = None  # "left" | "right": row 1 padded by pad_count, and (right) row 2 all padding
    pad_count: int = 3
    sliding_window: int | None = None
    sinks: bool = False
    softcap: float | None = None
    scaling: float | None = None  # None: head_dim ** -0.5
    logit_scale: float = 1.0  # multiplies q and k to make logits large
    base: str | None = None
    adds: tuple[str, ...] = ()

    @property
    def keys(self) -> int:
        return self.k_len if self.k_len is not None else self.q_len

    @property
    def scale(self) -> float:
        return self.scaling if self.scaling is not None else self.head_dim**-0.5

    def padding_mask(self) -> torch.Tensor | None:
        """`(batch, key)` int mask, 1 = real token, or None."""
        if self.padding is None:
            return None
        mask = torch.ones(self.batch, self.keys, dtype=torch.long)
        if self.padding == "left":
            mask[1, : self.pad_count] = 0
        elif self.padding == "right":
            mask[1, self.keys - self.pad_count :] = 0
            if self.batch > 2:
                mask[2] = 0  # a row that is all padding: every query of it sees no key
        else:
            raise ValueError(f"padding must be 'left', 'right' or None, got {self.padding!r}")
        return mask

    def visible(self) -> torch.Tensor:
        """bool `(batch, 1, query, key)`."""
        return visibility_mask(
            self.batch, self.q_len, self.keys, causal=self.causal, attention_mask_2d=self.padding_mask(),
            sliding_window=self.sliding_window,
        )


LEVELS = ("default", "thorough")


def default_cases(level: str = "default") -> list[AttentionCase]:
    """The case grid: each variant alone (on top of `basic`), then combinations and shapes.

    ``level="default"`` (seconds on CPU) adds, to the feature cases, sequences across 64- and 128-key tiles, chunked
    prefill (queries against a cache offset) and decode steps (one query against a cache) crossed with every
    feature, and sinks with a sliding window that starts past the first 64- and 128-key tile (chunked prefill and
    decode); ``"thorough"`` adds lengths 127 / 128 / 129 / 257 / 1031 keys, prefill, chunked prefill and decode at
    those lengths with every feature, and the layouts real models use (gpt-oss, gemma 2/3, mistral, qwen2).

    Example:
        >>> [c.name for c in default_cases()][:3]
        ['bidirectional', 'basic', 'padding_left']
        >>> len(default_cases("thorough")) > len(default_cases())
        True
    """
    if level not in LEVELS:
        raise ValueError(f"unknown level {level!r}; use one of {LEVELS}")
    C = AttentionCase
    cases = _feature_cases(C) + _long_and_decode_cases(C)
    if level == "thorough":
        cases += _thorough_cases(C)
    return cases


def _long_and_decode_cases(C) -> list[AttentionCase]:
    """Where optimized kernels break: past the first key tile, chunked prefill, and a separate decode path."""
    decode = dict(q_len=1, k_len=150, base="decode_long")
    return [
        C("tiles_129", heads=2, kv_heads=2, q_len=129, base="basic", adds=("length",)),
        C("chunked_prefill", heads=8, kv_heads=2, q_len=16, k_len=150, base="cross_length", adds=("length", "gqa")),
        C("decode_long", q_len=1, k_len=150, base="decode", adds=("length",)),
        C("decode_gqa", heads=8, kv_heads=2, **decode, adds=("gqa",)),
        C("decode_mqa", heads=4, kv_heads=1, **decode, adds=("gqa",)),
        C("decode_window", sliding_window=40, **decode, adds=("sliding_window",)),
        C("decode_sinks", sinks=True, **decode, adds=("sinks",)),
        C("decode_softcap", softcap=5.0, logit_scale=2.5, **decode, adds=("softcap",)),
        C("decode_padding_left", batch=3, padding="left", pad_count=20, **decode, adds=("padding",)),
        C("decode_padding_right", padding="right", pad_count=20, **decode, adds=("padding",)),
        C("decode_gpt_oss_like", batch=3, heads=8, kv_heads=2, q_len=1, k_len=150, padding="left", pad_count=20,
          sliding_window=128, sinks=True, base="decode_long", adds=("padding", "sliding_window", "sinks", "gqa")),
        # Sinks x a sliding window that starts past the first key tile (of 64 and of 128 keys): a kernel that skips
        # the key tiles left of the window must still count the sink. Decode: the window is keys 130 .. 149.
        C("decode_window_sinks_past_tile", sliding_window=20, sinks=True, **decode, adds=("sliding_window", "sinks")),
        # Chunked prefill, queries at 128 .. 199: the first sees keys from 65, a 64-query block at 192 from 129.
        C("chunked_window_sinks_past_tile", heads=2, kv_heads=2, q_len=72, k_len=200, sliding_window=64, sinks=True,
          base="cross_length", adds=("length", "sliding_window", "sinks")),
    ]


def _thorough_cases(C) -> list[AttentionCase]:
    """Long sequences with every feature, and real models' layouts (head_dim 64, their GQA ratios and windows)."""
    out = []
    for n in (127, 128, 129, 257, 1031):
        out.append(C(f"prefill_{n}", heads=4, kv_heads=2, q_len=n, head_dim=64, base="gqa", adds=("length",)))
        out.append(C(f"decode_{n}", heads=4, kv_heads=2, q_len=1, k_len=n, head_dim=64, base="decode_gqa",
                     adds=("length",)))
    long = dict(heads=4, kv_heads=2, q_len=1, k_len=1031, head_dim=64, base="decode_1031")
    out += [
        C("decode_1031_window", sliding_window=256, **long, adds=("sliding_window",)),
        C("decode_1031_sinks", sinks=True, **long, adds=("sinks",)),
        C("decode_1031_softcap", softcap=20.0, logit_scale=2.0, **long, adds=("softcap",)),
        C("decode_1031_padding_left", batch=3, padding="left", pad_count=300, **long, adds=("padding",)),
        C("decode_1031_padding_right", padding="right", pad_count=300, **long, adds=("padding",)),
        C("chunked_prefill_1031", heads=4, kv_heads=2, q_len=64, k_len=1031, head_dim=64, base="decode_1031",
          adds=("cross_length",)),
        C("prefill_1031_window_sinks", heads=4, kv_heads=2, q_len=1031, head_dim=64, sliding_window=128, sinks=True,
          base="prefill_1031", adds=("sliding_window", "sinks")),
        # real layouts (scaled down in heads, kept in head_dim, window and GQA ratio)
        C("gpt_oss_layout", batch=2, heads=8, kv_heads=1, q_len=300, head_dim=64, padding="left", pad_count=40,
          sliding_window=128, sinks=True, base="prefill_257", adds=("padding", "sliding_window", "sinks", "gqa")),
        C("gemma2_layout", heads=8, kv_heads=4, q_len=300, head_dim=64, sliding_window=128, softcap=50.0,
          scaling=64**-0.5, logit_scale=3.0, base="prefill_257", adds=("sliding_window", "softcap")),
        C("gemma3_layout", heads=8, kv_heads=4, q_len=300, head_dim=64, sliding_window=128, scaling=0.125,
          base="prefill_257", adds=("sliding_window", "scaling")),
        C("mistral_layout", batch=3, heads=8, kv_heads=2, q_len=1, k_len=1031, head_dim=64, padding="right",
          pad_count=100, sliding_window=512, base="decode_1031", adds=("padding", "sliding_window", "gqa")),
        C("qwen2_layout", heads=7, kv_heads=1, q_len=257, head_dim=64, base="prefill_257", adds=("gqa",)),
    ]
    return out


def _feature_cases(C) -> list[AttentionCase]:
    return [
        C("bidirectional", causal=False),
        C("basic", base="bidirectional", adds=("causal",)),
        # Left padding: row 1's first 3 queries see no key at all (fully masked rows).
        C("padding_left", batch=3, padding="left", base="basic", adds=("padding",)),
        # Right padding: row 1 has 3 pads at the end, row 2 is all padding (fully masked rows).
        C("padding_right", batch=3, padding="right", base="basic", adds=("padding",)),
        C("sliding_window", q_len=12, sliding_window=3, base="basic", adds=("sliding_window",)),
        C("sinks", sinks=True, base="basic", adds=("sinks",)),
        C("softcap", softcap=5.0, logit_scale=2.5, base="basic", adds=("softcap",)),
        C("gqa", heads=8, kv_heads=2, base="basic", adds=("gqa",)),
        C("mqa", heads=4, kv_heads=1, base="basic", adds=("gqa",)),
        C("scaling", scaling=0.37, base="basic", adds=("scaling",)),
        C("cross_length", q_len=3, k_len=10, base="basic", adds=("cross_length",)),
        C("decode", q_len=1, k_len=9, base="cross_length", adds=("shape",)),
        C("seq1", q_len=1, base="basic", adds=("shape",)),
        C("seq33_hd64", heads=2, kv_heads=2, q_len=33, head_dim=64, base="basic", adds=("shape",)),
        # Logits up to ~40: exp overflows fp16 (max 65504 ~ e^11) unless the row max is subtracted first.
        C("large_logits", logit_scale=3.0, base="basic", adds=("large_logits",)),
        # Combinations, as real models use them.
        C("gpt_oss_like", batch=3, heads=8, kv_heads=2, q_len=12, padding="left", sliding_window=4, sinks=True,
          base="gqa", adds=("padding", "sliding_window", "sinks")),
        C("gemma2_like", batch=3, heads=8, kv_heads=4, q_len=12, padding="right", sliding_window=5, softcap=5.0,
          scaling=0.3, logit_scale=2.0, base="gqa", adds=("padding", "sliding_window", "softcap", "scaling")),
        C("decode_window_sinks", batch=3, heads=8, kv_heads=2, q_len=2, k_len=12, padding="left", sliding_window=4,
          sinks=True, base="cross_length", adds=("padding", "sliding_window", "sinks", "gqa")),
    ]


class ImplementationUnavailable(RuntimeError):
    """An implementation that cannot run here (missing module, backend that does not work on this device)."""


@dataclass
class AttentionImplementation:
    """A function with transformers' attention-interface signature plus how to call it.

    mask_format: which mask transformers would hand it: "additive" (eager: float `(batch, 1, q, k)`, 0 or
    `finfo(dtype).min`), "bool" (sdpa: True = attend; None when plain causal with query == key, so that sdpa uses
    `is_causal`), "flash" (FA2 style: the `(batch, key)` padding mask or None; the function applies causal /
    window itself), "block" (a flex `BlockMask`). unsupported: feature -> why; cases using it are reported as
    unsupported instead of run.
    """

    name: str
    fn: Callable[..., Any]
    mask_format: str = "additive"
    unsupported: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _eager_dispatch(module, query, key, value, attention_mask, **kwargs):
    """transformers' own eager functions: GPT-OSS's when the module has sinks, Gemma 2's for softcap, else Llama's."""
    from transformers.models.gemma2.modeling_gemma2 import (
        eager_attention_forward as gemma2_eager,
    )
    from transformers.models.gpt_oss.modeling_gpt_oss import (
        eager_attention_forward as gpt_oss_eager,
    )
    from transformers.models.llama.modeling_llama import (
        eager_attention_forward as llama_eager,
    )

    has_sinks = getattr(module, "sinks", None) is not None
    softcap = kwargs.get("softcap")
    if has_sinks and softcap is not None:
        raise NotImplementedError("no transformers eager function has both sinks and softcap")
    kwargs.pop("s_aux", None)  # GPT-OSS eager reads module.sinks
    if has_sinks:
        kwargs.pop("softcap", None)
        return gpt_oss_eager(module, query, key, value, attention_mask, **kwargs)
    if softcap is not None:
        return gemma2_eager(module, query, key, value, attention_mask, **kwargs)
    kwargs.pop("softcap", None)
    return llama_eager(module, query, key, value, attention_mask, **kwargs)


def _flex_probe() -> str | None:
    """Run a tiny flex call in a subprocess (a broken inductor build can abort the process); None when it works."""
    import subprocess
    import sys

    code = (
        "import torch\nfrom torch import nn\n"
        "from torch.nn.attention.flex_attention import create_block_mask\n"
        "from transformers.integrations.flex_attention import flex_attention_forward\n"
        "m = nn.Module(); m.num_key_value_groups = 1; m.is_causal = True\n"
        "bm = create_block_mask(lambda b, h, q, k: k <= q, B=1, H=None, Q_LEN=4, KV_LEN=4, device='cpu',\n"
        "                       _compile=False)\n"
        "q = torch.randn(1, 2, 4, 8)\n"
        "out, _ = flex_attention_forward(m, q, q, q, bm, scaling=0.3)\n"
        "assert torch.isfinite(out).all()\n"
    )
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return "flex attention probe timed out after 300 s"
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return f"flex attention probe exited with code {proc.returncode}: {' | '.join(tail)}"
    return None


_FLEX_PROBE_RESULT: list[str | None] = []


def get_implementation(name: str, *, probe: bool = True) -> AttentionImplementation:
    """An attention implementation to check, by name.

    "eager": transformers' own eager functions (Llama's; GPT-OSS's when the case has sinks; Gemma 2's for softcap).
    "sdpa": `transformers.integrations.sdpa_attention.sdpa_attention_forward`.
    "flex": `transformers.integrations.flex_attention.flex_attention_forward` with a `BlockMask` (probed in a
        subprocess first unless probe=False; raises `ImplementationUnavailable` when it cannot run).
    "unilens": the function `unilens.attention` registers as "unilens" in `transformers.AttentionInterface`.
    "reference": `reference_as_attention_fn`.
    "package.module:function": any importable function with the attention-interface signature (additive masks).

    Example:
        >>> get_implementation("sdpa").mask_format
        'bool'
    """
    if name == "eager":
        return AttentionImplementation("eager", _eager_dispatch, "additive")
    if name == "sdpa":
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return AttentionImplementation(
            "sdpa", sdpa_attention_forward, "bool",
            unsupported={
                "sinks": "transformers' sdpa ignores s_aux (GPT-OSS declares _supports_sdpa = False)",
                "softcap": "transformers' sdpa raises ValueError for softcap (Gemma 2 needs eager or flex)",
            },
        )
    if name == "flex":
        try:
            from transformers.integrations.flex_attention import flex_attention_forward
        except Exception as error:  # noqa: BLE001 - any import problem means unavailable
            raise ImplementationUnavailable(f"flex attention cannot be imported: {error}") from error
        if probe:
            if not _FLEX_PROBE_RESULT:
                _FLEX_PROBE_RESULT.append(_flex_probe())
            if _FLEX_PROBE_RESULT[0] is not None:
                raise ImplementationUnavailable(_FLEX_PROBE_RESULT[0])
        unsupported = {}
        if not torch.cuda.is_available():
            unsupported["sinks"] = "transformers' flex raises on CPU for attention sinks (it needs the LSE)"
        return AttentionImplementation(
            "flex", flex_attention_forward, "block", unsupported,
            notes=["float 4D masks crash the compiled flex kernel on CPU here; a BlockMask is passed instead"],
        )
    if name == "unilens":
        try:
            importlib.import_module("unilens.attention")
        except Exception as error:  # noqa: BLE001
            raise ImplementationUnavailable(
                f"'unilens' attention is unavailable: importing unilens.attention failed ({error!r})"
            ) from error
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, eager_mask

        fn = AttentionInterface._global_mapping.get("unilens")
        if fn is None:
            raise ImplementationUnavailable(
                "unilens.attention imported but registered no 'unilens' function in transformers.AttentionInterface"
            )
        mask_fn = AttentionMaskInterface._global_mapping.get("unilens")
        notes = []
        if mask_fn is None:
            notes.append("no 'unilens' mask function registered: inside a real model it would get attention_mask=None")
        # unilens_mask hands out the original backend's mask (sdpa's boolean by default).
        return AttentionImplementation("unilens", fn, "additive" if mask_fn is eager_mask else "bool", notes=notes)
    if name == "reference":
        return AttentionImplementation("reference", reference_as_attention_fn, "additive")
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as error:
            raise ImplementationUnavailable(f"cannot load {name!r}: {error}") from error
        if isinstance(fn, AttentionImplementation):
            return fn
        return AttentionImplementation(name, fn, getattr(fn, "mask_format", "additive"),
                                       dict(getattr(fn, "unsupported", {})))
    raise ValueError(
        f"unknown attention implementation {name!r}; use 'eager', 'sdpa', 'flex', 'unilens', 'reference' or "
        "'package.module:function'"
    )


class _FakeAttentionModule(nn.Module):
    """The attributes transformers' attention functions read from the calling attention module."""

    def __init__(self, case: AttentionCase, sinks: torch.Tensor | None):
        super().__init__()
        self.num_key_value_groups = case.heads // case.kv_heads
        self.num_heads = case.heads
        self.num_key_value_heads = case.kv_heads
        self.head_dim = case.head_dim
        self.scaling = case.scale
        self.is_causal = case.causal
        self.layer_idx = 0
        # nonzero on purpose: the caller passes dropout=0.0 in eval mode; a kernel that reads the module's attribute
        # instead (and ignores the mode) drops probabilities and fails
        self.attention_dropout = 0.5
        self.sliding_window = case.sliding_window
        self.sinks = None if sinks is None else nn.Parameter(sinks, requires_grad=False)
        self.train(False)


def _build_mask(case: AttentionCase, mask_format: str, dtype: torch.dtype):
    """The mask transformers would pass for `case` in `mask_format` (see `AttentionImplementation`)."""
    visible = case.visible()  # (batch, 1, query, key)
    plain = case.padding is None and case.sliding_window is None
    if mask_format == "additive":
        if not case.causal and plain:
            return None
        return torch.where(visible, torch.zeros((), dtype=dtype), torch.finfo(dtype).min)
    if mask_format == "bool":
        # masking_utils.sdpa_mask skips the mask (sdpa then uses is_causal) for plain causal prefill / one query.
        if plain and (not case.causal or case.q_len == case.keys or case.q_len == 1):
            return None
        return visible
    if mask_format == "flash":
        pad = case.padding_mask()
        return None if pad is None else pad.bool()
    if mask_format == "block":
        from torch.nn.attention.flex_attention import create_block_mask

        allowed = visible[:, 0]  # (batch, query, key)

        def mask_mod(b, h, q_idx, kv_idx):
            return allowed[b, q_idx, kv_idx]

        return create_block_mask(mask_mod, B=case.batch, H=None, Q_LEN=case.q_len, KV_LEN=case.keys,
                                 device="cpu", _compile=False)
    raise ValueError(f"unknown mask_format {mask_format!r}; use 'additive', 'bool', 'flash' or 'block'")


def _case_inputs(case: AttentionCase, seed: int) -> dict[str, torch.Tensor]:
    """Float64 inputs for a case (the same for every dtype; each dtype rounds them)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(case.name.encode()))
    q = torch.randn(case.batch, case.heads, case.q_len, case.head_dim, generator=g, dtype=torch.float64)
    k = torch.randn(case.batch, case.kv_heads, case.keys, case.head_dim, generator=g, dtype=torch.float64)
    v = torch.randn(case.batch, case.kv_heads, case.keys, case.head_dim, generator=g, dtype=torch.float64)
    q, k = q * case.logit_scale, k * case.logit_scale
    inputs = {"query": q, "key": k, "value": v}
    if case.sinks:
        inputs["sinks"] = torch.randn(case.heads, generator=g, dtype=torch.float64) + 0.5
    return inputs


def _identity_values(case: AttentionCase) -> torch.Tensor | None:
    """Values whose key j is the unit vector e_j, so the output row of a query *is* its probability row."""
    if case.keys > case.head_dim:
        return None
    v = torch.zeros(case.batch, case.kv_heads, case.keys, case.head_dim, dtype=torch.float64)
    v[..., torch.arange(case.keys), torch.arange(case.keys)] = 1.0
    return v


def _naive_attention(q, k, v, visible, scaling, sinks, softcap):
    """Plain PyTorch attention entirely in the inputs' dtype: the flash-attention yardstick."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~visible, torch.finfo(q.dtype).min)
    if sinks is not None:
        col = sinks.to(q.dtype).reshape(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[2], 1)
        probs = torch.softmax(torch.cat([scores, col], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v).transpose(1, 2), probs


def _fp32_accumulation_attention(q, k, v, visible, scaling, sinks, softcap):
    """A correct kernel of the inputs' dtype: the same rounded inputs, everything computed in float32, the output
    rounded once to the dtype. The yardstick of the precision verdict (what good accumulation achieves)."""
    out, probs = _naive_attention(q.float(), k.float(), v.float(), visible, scaling,
                                  None if sinks is None else sinks.float(), softcap)
    return out.to(q.dtype), probs.to(q.dtype)


def _rel_rms(out: torch.Tensor, ref: torch.Tensor, valid_bq: torch.Tensor) -> float:
    """Relative RMS error over valid rows: sqrt(mean((out - ref)^2)) / sqrt(mean(ref^2)), outputs (b, q, h, d)."""
    rows = valid_bq[:, :, None, None].expand_as(ref)
    if not rows.any():
        return 0.0
    diff = (out.double() - ref.double())[rows]
    scale = ref.double()[rows].pow(2).mean().sqrt()
    return float(diff.pow(2).mean().sqrt() / scale.clamp_min(1e-300))


# The precision verdict decides in half precision only: there the accumulation dtype is a kernel's choice (bf16 /
# fp16 sums lose digits with every key), while float32 kernels accumulate in float32 anyway.
PRECISION_FACTOR = 2.0


# ================================================================================================================
# 3. Comparison and report
# ================================================================================================================


@dataclass
class _Cmp:
    max_abs: float
    max_rel: float
    pct_outside: float
    naive_max_abs: float
    bound: float
    worst: tuple[int, int, int] | None  # (batch, head, query)
    heat: list[list[float]]  # (heads, query): max |err| over batch and head_dim, NaN on masked rows
    passed: bool
    nonfinite: int


def _compare(out, ref, naive, valid_bq, softcap: bool, low: torch.dtype, layout: str) -> _Cmp:
    """Compare on valid rows. layout "bqhd" (outputs) or "bhqk" (probabilities)."""
    out, ref, naive = out.double(), ref.double(), naive.double()
    if layout == "bhqk":  # -> (batch, query, heads, key) so that rows index the same way as outputs
        out, ref, naive = (x.transpose(1, 2) for x in (out, ref, naive))
    valid = valid_bq[:, :, None, None].expand_as(ref)
    err = (out - ref).abs()
    err = torch.where(torch.isnan(err), torch.full_like(err, float("inf")), err)
    naive_err = (naive - ref).abs()
    naive_err = torch.where(torch.isnan(naive_err), torch.full_like(naive_err, float("inf")), naive_err)
    zero = torch.zeros((), dtype=torch.float64)
    max_abs = float(torch.where(valid, err, zero).max()) if valid.any() else 0.0
    naive_max = float(torch.where(valid, naive_err, zero).max()) if valid.any() else 0.0
    # Flash-attention rule (numerics.md; flash-attention tests/test_flash_attn.py, FA3 tests): the kernel's max abs
    # error against the high-precision reference must be <= 2x (3x with softcap) the max abs error of a plain
    # same-dtype PyTorch implementation, plus an absolute term of 2x the rounding error of one add/subtract on the
    # reference values in the low dtype (FA3), never below 1e-5 (PyTorch SDPA tests' floor).
    ref_low = ref.to(low)
    one_add = float(((ref_low + 0.3) - 0.3 - ref_low).abs().double().max()) if ref.numel() else 0.0
    floor = max(1e-5, 2.0 * one_add)
    bound = (3.0 if softcap else 2.0) * naive_max + floor
    ref_scale = float(torch.where(valid, ref.abs(), zero).max()) if valid.any() else 0.0
    rel = err / (ref.abs() + 1e-2 * ref_scale + 1e-30)  # relative error, denominators floored at 1% of the scale
    max_rel = float(torch.where(valid, rel, zero).max()) if valid.any() else 0.0
    n_valid = int(valid.sum())
    pct = 100.0 * float(((err > bound) & valid).sum()) / n_valid if n_valid else 0.0
    worst = None
    if n_valid:
        flat = int(torch.where(valid, err, torch.full_like(err, -1.0)).argmax())
        b, qi, h, _ = (int(i) for i in torch.unravel_index(torch.tensor(flat), err.shape))
        worst = (b, h, qi)
    heat_t = torch.where(valid, err, torch.full_like(err, float("nan"))).amax(dim=-1)  # (batch, query, heads)
    heat_t = torch.where(valid_bq[:, :, None], heat_t, torch.full_like(heat_t, -1.0)).amax(dim=0)  # (query, heads)
    heat_t = torch.where(heat_t < 0, torch.full_like(heat_t, float("nan")), heat_t)
    nonfinite = int((~torch.isfinite(out) & torch.isfinite(ref)).sum())
    passed = max_abs <= bound and nonfinite == 0
    return _Cmp(max_abs, max_rel, pct, naive_max, bound, worst, heat_t.T.tolist(), passed, nonfinite)


@dataclass
class CaseResult:
    """The outcome of one (case, dtype)."""

    case: str
    dtype: str
    status: str  # "pass" | "fail" | "error" | "unsupported"
    max_abs: float | None = None
    max_rel: float | None = None
    pct_outside: float | None = None
    naive_max_abs: float | None = None
    bound: float | None = None
    worst: tuple[int, int, int] | None = None  # (batch, head, query)
    weights: str = "not returned"  # "pass" | "fail" | "not returned"
    weights_max_abs: float | None = None
    weights_bound: float | None = None
    probe: str = "n/a"  # identity-values probe: "pass" | "fail" | "n/a"
    probe_max_abs: float | None = None
    nonfinite: int = 0  # NaN / inf where the reference is finite (all rows)
    masked_rows: str = "none"  # behaviour on rows with no visible key: none | zeros | nan | finite (e.g. uniform)
    rel_rms: float | None = None  # relative RMS error of the output over valid rows
    yardstick_rel_rms: float | None = None  # the same for a correct kernel of this dtype (float32 accumulation)
    # the rule that failed: absolute | relative | non-finite | weights | probe | padded queries; what the call
    # returned or did: return type | output type | output shape | output dtype | output device | inputs modified;
    # raised (the kernel raised: status "error") | checker (a unilens bug reading the output: status "error")
    rule: str = ""
    message: str = ""
    diagnosis: str = ""
    heat: list[list[float]] | None = None  # (heads, query)

    @property
    def passed(self) -> bool:
        return self.status in ("pass", "unsupported")


def _fmt(x: float | None, spec: str = ".2e") -> str:
    return "-" if x is None else format(x, spec)


@dataclass
class ConformanceReport:
    """Results of `check_attention` for one implementation.

    `passed`, `failures()`, `str(report)` (a table), `to_json(path)`, `heatmap(case, dtype)` (plotly).
    """

    implementation: str
    results: list[CaseResult]
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    def failures(self) -> list[CaseResult]:
        """Results that failed or raised (unsupported cases are not failures; they are listed in the table)."""
        return [r for r in self.results if not r.passed]

    def result(self, case: str, dtype: str) -> CaseResult:
        for r in self.results:
            if r.case == case and r.dtype == dtype:
                return r
        raise KeyError(f"no result for case {case!r} in dtype {dtype!r}")

    def __str__(self) -> str:
        head = (f"{'case':<26} {'dtype':<9} {'status':<11} {'max_abs':>9} {'bound':>9} {'naive':>9} {'max_rel':>9} "
                f"{'rel/fp32acc':>11} {'%out':>6} {'worst(b,h,q)':>13} {'weights':>8} {'probe':>5} {'masked':>7} "
                f"{'rule':>9}  diagnosis / message")
        lines = [f"attention conformance: {self.implementation}  ->  {'PASS' if self.passed else 'FAIL'}", head,
                 "-" * len(head)]
        for r in self.results:
            worst = "-" if r.worst is None else ",".join(map(str, r.worst))
            tail = r.diagnosis or r.message
            if r.diagnosis and r.message:
                tail = f"{r.diagnosis} | {r.message}"
            ratio = (None if r.rel_rms is None or not r.yardstick_rel_rms else r.rel_rms / r.yardstick_rel_rms)
            lines.append(
                f"{r.case:<26} {r.dtype:<9} {r.status:<11} {_fmt(r.max_abs):>9} {_fmt(r.bound):>9} "
                f"{_fmt(r.naive_max_abs):>9} {_fmt(r.max_rel):>9} {_fmt(ratio, '.2f'):>11} "
                f"{_fmt(r.pct_outside, '.1f'):>6} {worst:>13} {r.weights[:8]:>8} {r.probe:>5} {r.masked_rows[:7]:>7} "
                f"{r.rule[:9]:>9}  {tail}"
            )
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"implementation": self.implementation, "passed": self.passed, "notes": self.notes,
                "results": [dataclasses.asdict(r) for r in self.results]}

    def to_json(self, path: str) -> None:
        """Write the report (all numbers, including the heat maps) as JSON."""
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1, default=str, allow_nan=True)

    def heatmap(self, case: str, dtype: str):
        """Plotly heat map of max |error| by (head, query position) for one case and dtype."""
        try:
            import plotly.graph_objects as go
        except ImportError as error:
            raise ImportError("heatmap needs plotly: pip install plotly") from error
        r = self.result(case, dtype)
        if r.heat is None:
            raise ValueError(f"case {case!r} / {dtype} has no error map (status {r.status}: {r.message})")
        fig = go.Figure(go.Heatmap(z=r.heat, colorscale="Reds", colorbar={"title": "|error|"}))
        fig.update_layout(title=f"{self.implementation}: {case} ({dtype}) {r.status}, bound {_fmt(r.bound)}",
                          xaxis_title="query position", yaxis_title="head")
        return fig


def _case_features(case: AttentionCase) -> set[str]:
    feats = set()
    if case.causal:
        feats.add("causal")
    if case.padding:
        feats.add("padding")
    if case.sliding_window is not None:
        feats.add("sliding_window")
    if case.sinks:
        feats.add("sinks")
    if case.softcap is not None:
        feats.add("softcap")
    return feats


PADDED_QUERIES = ("any", "zeros")


class _BadOutput(Exception):
    """What a kernel returned breaks the interface: `rule` names what was wrong (a failing result, not an error)."""

    def __init__(self, rule: str, message: str):
        super().__init__(message)
        self.rule = rule


def _run_impl(impl: AttentionImplementation, case: AttentionCase, dtype: torch.dtype, q, k, v, sinks) -> Any:
    """Call the kernel as transformers would; returns whatever it returned (checked by `_validated_output`).

    The kernel gets copies of the inputs, so one that writes into its arguments cannot change the checker's own;
    such a write raises `_BadOutput` ("inputs modified": transformers passes the KV cache itself as key / value)."""
    module = _FakeAttentionModule(case, None if sinks is None else sinks.to(dtype).clone())
    mask = _build_mask(case, impl.mask_format, dtype)
    kwargs: dict[str, Any] = {"scaling": case.scale, "dropout": 0.0}
    if case.sliding_window is not None:
        kwargs["sliding_window"] = case.sliding_window
    if case.softcap is not None:
        kwargs["softcap"] = case.softcap
    if sinks is not None:
        kwargs["s_aux"] = module.sinks
    given = {"query": q.to(dtype).clone(), "key": k.to(dtype).clone(), "value": v.to(dtype).clone()}
    with torch.no_grad():
        result = impl.fn(module, given["query"], given["key"], given["value"], mask, **kwargs)
    originals = {"query": q, "key": k, "value": v, "sinks": sinks}
    given["sinks"] = module.sinks
    modified = [n for n, t in given.items() if t is not None and not torch.equal(t, originals[n].to(dtype))]
    if modified:
        raise _BadOutput("inputs modified", f"the kernel wrote into its {' / '.join(modified)} argument(s); "
                                            "transformers passes the KV cache itself as key / value")
    return result


# Rules of the call itself (what it returned: type, shape, dtype, device; what it wrote into its arguments),
# checked before any number is compared.
_CONTRACT_RULES = ("return type", "output type", "output shape", "output dtype", "output device", "inputs modified")


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {_dtype_name(value.dtype)} tensor of shape {tuple(value.shape)}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)}"
    return "None" if value is None else f"a {type(value).__module__}.{type(value).__qualname__}"


def _validated_output(result: Any, case: AttentionCase, dtype: torch.dtype) -> tuple[torch.Tensor, Any]:
    """`(attn_output, attn_weights)` from what a kernel returned, or `_BadOutput` naming what is wrong with it."""
    if not isinstance(result, tuple) or len(result) != 2:
        raise _BadOutput("return type", f"returned {_describe(result)}; expected a tuple (attn_output, attn_weights)")
    out, weights = result
    if not isinstance(out, torch.Tensor):
        raise _BadOutput("output type", f"attn_output is {_describe(out)}; expected a torch.Tensor")
    if out.layout != torch.strided:
        raise _BadOutput("output type", f"attn_output is a {str(out.layout).removeprefix('torch.')} tensor; "
                                         "expected a dense (strided) tensor")
    if out.device.type != "cpu":
        raise _BadOutput("output device", f"attn_output is on {out.device}; expected the inputs' device (cpu)")
    expected = (case.batch, case.q_len, case.heads, case.head_dim)
    if tuple(out.shape) != expected:
        raise _BadOutput("output shape", f"output shape {tuple(out.shape)}, expected {expected}")
    if out.dtype != dtype:
        raise _BadOutput("output dtype", f"output dtype {_dtype_name(out.dtype)}, expected {_dtype_name(dtype)} "
                                         "(the query's dtype, as transformers' attention functions return)")
    return out.detach(), weights


_CONTRACT_DIAGNOSIS = {
    "return type": "the returned value (expected a tuple (attn_output, attn_weights))",
    "output type": "the returned attn_output (expected a dense torch.Tensor)",
    "output device": "the returned attn_output's device",
    "output shape": "output layout (expected (batch, query, heads, head_dim))",
    "output dtype": "the returned attn_output's dtype (expected the query's dtype)",
    "inputs modified": "the kernel's writes into its arguments",
}


def _comparable_weights(weights: Any, case: AttentionCase) -> tuple[torch.Tensor | None, str]:
    """Returned weights to compare, else None and why not ("" when they are simply absent or another quantity,
    e.g. flex's log-sum-exp: weights are optional)."""
    expected_w = (case.batch, case.heads, case.q_len, case.keys)
    if not isinstance(weights, torch.Tensor) or tuple(weights.shape) != expected_w:
        return None, ""
    if weights.layout != torch.strided or weights.device.type != "cpu" or not weights.is_floating_point():
        kind = "dense" if weights.layout == torch.strided else str(weights.layout).removeprefix("torch.")
        return None, (f"attn_weights are a {kind} {_dtype_name(weights.dtype)} tensor on {weights.device}; "
                      "expected dense floating-point probabilities on cpu")
    return weights.detach(), ""


def _check_one(impl, case: AttentionCase, dtype: torch.dtype, seed: int, padded_queries: str = "any") -> CaseResult:
    """One (case, dtype). Whatever the kernel returns or raises becomes a result; only a bad `case` raises."""
    name = _dtype_name(dtype)
    blocked = sorted(set(impl.unsupported) & _case_features(case))
    if blocked:
        return CaseResult(case.name, name, "unsupported", message="; ".join(impl.unsupported[f] for f in blocked))
    inputs = _case_inputs(case, seed)
    # Low-precision inputs, and the reference computed in float64 from exactly those rounded values.
    q, k, v = (inputs[n].to(dtype) for n in ("query", "key", "value"))
    sinks = inputs.get("sinks")
    sinks = None if sinks is None else sinks.to(dtype)
    visible = case.visible()
    ref_kwargs = dict(scaling=case.scale, softcap=case.softcap, visible=visible,
                      sinks=None if sinks is None else sinks.double())
    ref_out, ref_probs, _ = reference_attention(q, k, v, **ref_kwargs)
    try:
        try:
            result = _run_impl(impl, case, dtype, q, k, v, sinks)
        except _BadOutput:
            raise
        except Exception as error:  # noqa: BLE001 - report, do not crash the whole check
            return CaseResult(case.name, name, "error", rule="raised",
                              message=f"{type(error).__name__}: {error}"[:300])
        out, weights = _validated_output(result, case, dtype)
    except _BadOutput as bad:
        return CaseResult(case.name, name, "fail", rule=bad.rule, message=str(bad)[:300],
                          diagnosis=_CONTRACT_DIAGNOSIS[bad.rule])
    try:
        return _evaluate(impl, case, dtype, seed, padded_queries, q, k, v, sinks, visible, ref_kwargs, ref_out,
                         ref_probs, out, weights)
    except Exception as error:  # noqa: BLE001 - the contract: a kernel's numbers never crash the check
        return CaseResult(case.name, name, "error", rule="checker",
                          message=(f"the checker could not evaluate this output ({type(error).__name__}: {error}); "
                                   "please report this as a unilens bug")[:300])


def _evaluate(impl, case, dtype, seed, padded_queries, q, k, v, sinks, visible, ref_kwargs, ref_out, ref_probs,
              out, weights) -> CaseResult:
    """The numeric verdict on an output of the right type, shape and dtype (any values: NaN, inf, garbage)."""
    name = _dtype_name(dtype)
    # The contract for padded query rows (the same in diff_models): a query that is itself a padding token, or that
    # sees no key, is not compared. Its output never reaches a real token (eager returns an average of values there,
    # flash_attention_2 zeros); only NaN / inf there fails, and padded_queries="zeros" demands flash's zeros.
    pad = case.padding_mask()
    real_q = (torch.ones(case.batch, case.q_len, dtype=torch.bool) if pad is None
              else pad[:, case.keys - case.q_len:].bool())  # (batch, query): queries that are real tokens
    sees = visible[:, 0].any(dim=-1)  # (batch, query): rows with at least one visible key
    valid_bq = sees & real_q
    naive_out, naive_probs = _naive_attention(q, k, v, visible, case.scale, sinks, case.softcap)
    softcap = case.softcap is not None
    cmp = _compare(out, ref_out, naive_out, valid_bq, softcap, dtype, "bqhd")
    res = CaseResult(case.name, name, "pass" if cmp.passed else "fail", cmp.max_abs, cmp.max_rel, cmp.pct_outside,
                     cmp.naive_max_abs, cmp.bound, cmp.worst, nonfinite=cmp.nonfinite, heat=cmp.heat)
    if not cmp.passed:
        res.rule = "absolute"
    # Precision verdict: relative RMS error against the larger of a float32-accumulation kernel's and the plain
    # same-dtype kernel's (both correct); a kernel summing in bf16 / fp16 grows past it with the number of keys.
    acc_out, _ = _fp32_accumulation_attention(q, k, v, visible, case.scale, sinks, case.softcap)
    res.rel_rms = _rel_rms(out, ref_out, valid_bq)
    res.yardstick_rel_rms = max(_rel_rms(acc_out, ref_out, valid_bq), _rel_rms(naive_out, ref_out, valid_bq))
    if dtype in (torch.bfloat16, torch.float16) and res.rel_rms > PRECISION_FACTOR * res.yardstick_rel_rms:
        res.status = "fail"
        res.rule = res.rule or "relative"
        # a yardstick of exactly 0: the correct kernels are exact here (e.g. one visible key: the output is v)
        times = (f"is {res.rel_rms / res.yardstick_rel_rms:.1f}x that of" if res.yardstick_rel_rms > 0
                 else "where it is exactly 0 for")
        res.message = (f"relative RMS error {res.rel_rms:.2e} {times} a correct {name} kernel with float32 "
                       f"accumulation (limit {PRECISION_FACTOR:g}x)")
    padded = ~real_q & sees
    if padded_queries == "zeros" and padded.any() and out.double()[padded].abs().max() > 0:
        res.status = "fail"
        res.rule = res.rule or "padded queries"
        res.message = (res.message + " nonzero output at padded query positions (padded_queries='zeros')").strip()
    # Masked rows: excluded from the error, but their behaviour is reported and NaN / inf there fails (a NaN in a
    # padded position's output poisons every later layer through 0 * NaN).
    masked = ~valid_bq
    if masked.any():
        rows = out.double()[masked]  # (n_rows, heads, head_dim)
        if not torch.isfinite(rows).all():
            res.masked_rows = "nan"
        elif rows.abs().max() <= 1e-6:
            res.masked_rows = "zeros"
        else:
            res.masked_rows = "finite (nonzero, e.g. eager's uniform average)"
    if cmp.nonfinite:
        res.status = "fail"
        res.rule = "non-finite"
        res.message = f"{cmp.nonfinite} non-finite output values where the reference is finite"
    w, why = _comparable_weights(weights, case)
    if why:
        res.weights, res.status, res.rule = "fail", "fail", res.rule or "weights"
        res.message = (res.message + " " + why).strip()[:300]
    elif w is not None:
        wc = _compare(w, ref_probs, naive_probs, valid_bq, softcap, dtype, "bhqk")
        res.weights = "pass" if wc.passed else "fail"
        res.weights_max_abs, res.weights_bound = wc.max_abs, wc.bound
        if not wc.passed:
            res.status = "fail"
            res.rule = res.rule or "weights"
            what = (f"{wc.nonfinite} non-finite values where the reference is finite" if wc.nonfinite
                    else f"max |error| {wc.max_abs:.2e} above the bound {wc.bound:.2e}")
            res.message = (res.message + f" attn_weights: {what}").strip()[:300]
    # Probe: identity values make the output row equal the probability row, exposing the softmax even when the
    # function returns no weights.
    v_id = _identity_values(case)
    if v_id is not None:
        v_id = v_id.to(dtype)
        p_ref, _, _ = reference_attention(q, k, v_id, **ref_kwargs)
        p_naive, _ = _naive_attention(q, k, v_id, visible, case.scale, sinks, case.softcap)
        try:
            p_out, _ = _validated_output(_run_impl(impl, case, dtype, q, k, v_id, sinks), case, dtype)
            pc = _compare(p_out, p_ref, p_naive, valid_bq, softcap, dtype, "bqhd")
            res.probe, res.probe_max_abs = ("pass" if pc.passed else "fail"), pc.max_abs
        except _BadOutput as bad:
            res.probe = "fail"
            res.message = (res.message + f" probe: {bad}").strip()[:300]
        except Exception as error:  # noqa: BLE001
            res.probe = "fail"
            res.message = (res.message + f" probe raised {type(error).__name__}: {error}").strip()[:300]
        if res.probe == "fail":
            res.status = "fail"
            res.rule = res.rule or "probe"
    return res


def _stage(r: CaseResult) -> str:
    """Where in the pipeline the failing result first diverges, from weights / the identity-values probe."""
    if r.nonfinite or r.masked_rows == "nan":
        return "non-finite values (overflow / NaN) in the softmax"
    if r.weights == "fail" or r.probe == "fail":
        return "probabilities diverge (scores / mask / softmax)"
    if r.weights == "pass" or r.probe == "pass":
        return "probabilities match, output diverges (probs @ V, value heads or output layout)"
    return "probabilities not observable (no weights returned, probe n/a)"


def _diagnose(results: list[CaseResult], cases: dict[str, AttentionCase]) -> None:
    by_key = {(r.case, r.dtype): r for r in results}
    for r in results:
        if r.passed or r.status == "error" or r.rule in _CONTRACT_RULES:
            if r.status == "error":  # the kernel raised, or (a unilens bug) the checker could not read its output
                r.diagnosis = "raised" if r.rule == "raised" else "checker error"
            continue  # a contract failure keeps the diagnosis naming what was returned
        case = cases[r.case]
        base = by_key.get((case.base, r.dtype)) if case.base else None
        if case.base is None:
            component = "core attention"
        elif base is None or base.status == "unsupported":
            component = ", ".join(_FEATURE_COMPONENT[a] for a in case.adds) + " (base case not run)"
        elif base.passed:
            component = ", ".join(_FEATURE_COMPONENT[a] for a in case.adds)
            if len(case.adds) > 1:
                singles = [c for c in cases.values() if c.base and len(c.adds) == 1 and c.adds[0] in case.adds]
                failing = [c.adds[0] for c in singles if (c.name, r.dtype) in by_key
                           and not by_key[(c.name, r.dtype)].passed]
                component = (", ".join(_FEATURE_COMPONENT[a] for a in dict.fromkeys(failing)) if failing
                             else f"interaction of {component}")
        else:
            component = f"inherited from '{case.base}'"
        r.diagnosis = f"{component}: {_stage(r)}"


def check_attention(
    fn: Callable[..., Any] | AttentionImplementation | str,
    cases: Sequence[AttentionCase | str] | None = None,
    dtypes: Iterable[str | torch.dtype] = ("float32", "bfloat16", "float16"),
    seed: int = 0,
    *,
    level: str = "default",
    padded_queries: str = "any",
    mask_format: str | None = None,
    unsupported: dict[str, str] | None = None,
) -> ConformanceReport:
    """Check an attention function against the float64 reference on a grid of cases and dtypes.

    `fn` has transformers' attention-interface signature `fn(module, query, key, value, attention_mask,
    scaling=..., dropout=0.0, sliding_window=..., softcap=..., s_aux=..., **kwargs) -> (attn_output (batch,
    query, heads, head_dim), attn_weights (batch, heads, query, key) or None)`; sinks also sit on `module.sinks`.
    It may be a name for `get_implementation`. `mask_format` (default "additive", eager's) says which mask it gets.

    Pass rules per (case, dtype), the one that failed is reported (`CaseResult.rule`):
    - absolute: max |error| within flash-attention's bound, 2x (3x with softcap) a plain same-dtype kernel's
      (`_compare`); returned weights and an identity-values probe are held to the same bound;
    - relative (bfloat16 / float16): relative RMS error at most 2x that of a correct kernel of the same dtype with
      float32 accumulation; the long cases make a kernel that accumulates in half precision grow past it;
    - non-finite: NaN / inf where the reference is finite fails, padded rows included;
    - the call itself, before any number: "return type" (not a tuple of 2), "output type" (attn_output not a dense
      tensor), "output shape", "output dtype" (not the query's), "output device", "inputs modified" (the kernel
      wrote into query / key / value / sinks); a kernel that raises gives status "error", rule "raised".
    Whatever the kernel returns or raises (``Exception``) becomes a result: `check_attention` itself raises only for
    its own arguments (``KeyboardInterrupt`` and ``SystemExit`` from the kernel propagate).
    Padded query rows (queries that are padding tokens, or see no key) are not compared: a conforming kernel may
    return any finite value there (eager: an average of values; flash_attention_2: zeros); ``padded_queries="zeros"``
    demands flash's zeros. ``level``: the case grid (`default_cases`), "default" (seconds) or "thorough".

    Example:
        >>> report = check_attention("eager", cases=["basic", "sinks"], dtypes=["float32"])
        >>> report.passed
        True
    """
    if isinstance(fn, str):
        impl = get_implementation(fn)
    elif isinstance(fn, AttentionImplementation):
        impl = fn
    elif not callable(fn):
        raise TypeError(f"check_attention: fn must be an attention function fn(module, query, key, value, "
                        f"attention_mask, **kwargs) -> (attn_output, attn_weights), an AttentionImplementation or a "
                        f"name such as 'sdpa'; got {type(fn).__name__} {fn!r}"[:300])
    else:
        impl = AttentionImplementation(getattr(fn, "__name__", repr(fn)), fn,
                                       getattr(fn, "mask_format", "additive"),
                                       dict(getattr(fn, "unsupported", {})))
    if mask_format is not None or unsupported is not None:
        impl = dataclasses.replace(impl, mask_format=mask_format or impl.mask_format,
                                   unsupported=unsupported if unsupported is not None else impl.unsupported)
    if padded_queries not in PADDED_QUERIES:
        raise ValueError(f"padded_queries must be one of {PADDED_QUERIES}, got {padded_queries!r}")
    grid = {c.name: c for c in default_cases("thorough")}  # names of every level resolve
    if isinstance(dtypes, (str, torch.dtype)):  # one dtype, not its characters
        dtypes = (dtypes,)
    dtypes = [_as_dtype(d) for d in dtypes]
    if isinstance(cases, (str, AttentionCase)):  # one case
        cases = [cases]
    if cases is None:
        chosen = default_cases(level)
    else:
        chosen = []
        for c in cases:
            if isinstance(c, str):
                if c not in grid:
                    raise ValueError(f"unknown case {c!r}; known: {sorted(grid)}")
                c = grid[c]
            elif not isinstance(c, AttentionCase):
                raise TypeError(f"check_attention: cases must be case names or AttentionCase objects, got "
                                f"{type(c).__name__} {c!r}"[:200])
            chosen.append(c)
    all_cases = {**grid, **{c.name: c for c in chosen}}
    # The tensors are tiny: one thread avoids BLAS thread start-up / contention (measured 16 ms vs 0.01 ms per
    # fp32 matmul with 2 threads on a loaded 2-core machine). Restored afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = [_check_one(impl, c, d, seed, padded_queries) for c in chosen for d in dtypes]
    finally:
        torch.set_num_threads(threads)
    _diagnose(results, all_cases)
    return ConformanceReport(impl.name, results, notes=list(impl.notes))


def run_attn_check(impl: str, dtypes: Iterable[str] = ("float32", "bfloat16", "float16"),
                   cases: Sequence[str] | None = None, seed: int = 0, level: str = "default",
                   padded_queries: str = "any") -> ConformanceReport:
    """CLI entry point: `check_attention(get_implementation(impl), ...)`. Raises `ImplementationUnavailable`.

    ``cases``: extra case names (of any level) run besides the level's grid.

    Example:
        >>> run_attn_check("sdpa", dtypes=["float32"]).passed
        True
    """
    chosen = None
    if cases:
        chosen = list(dict.fromkeys([c.name for c in default_cases(level)] + list(cases)))
    return check_attention(get_implementation(impl), cases=chosen, dtypes=tuple(dtypes), seed=seed, level=level,
                           padded_queries=padded_queries)
