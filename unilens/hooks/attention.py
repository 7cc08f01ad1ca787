"""The hookable attention implementation and its hook points (probabilities, scores, q/k/v, z, per-head results)."""

from __future__ import annotations

import contextlib
import inspect
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

from ..arch.offload import parameter
from ..arch.structure import (
    find_output_projection,
    is_projection,
    is_quantized,
    kv_source_layer,
    uses_attention_interface,
)
from ..core.accessors import LayerIndexed
from ..core.config import heads_attribute
from ..core.memo import ProcessLock, memoize
from ..core.names import attention_hook_sites

__all__ = [
    "ATTENTION_KEYWORDS",
    "HOOK_NAMES",
    "IMPLEMENTATION_NAME",
    "AttentionHookAccessor",
    "AttentionHooks",
    "AttentionSetup",
    "HookPoint",
    "UnknownAttentionKeyword",
    "UnknownForwardKeyword",
    "install_attention_hooks",
    "original_attention",
    "recompute_attention",
    "request_materialize",
    "unilens_attention_forward",
]

IMPLEMENTATION_NAME = "unilens"
# the children of an attention's `unilens_hooks`, one per attention name of the catalogue (unilens.core.names)
HOOK_NAMES = attention_hook_sites()

# Attention backends whose fast path we can keep: the mask they receive is either a boolean / additive 4D mask
# or None (plain causal), which the hookable eager path below can also consume.
_SUPPORTED_ORIGINALS = ("sdpa", "eager")

# The ONE table of per-class special cases. Keep it short and say why.
#   Inline attention classes with their own `config._attn_implementation == "sdpa"` branch that calls
#   `F.scaled_dot_product_attention` directly (so no softmax runs and no probabilities exist to hook).
#   Installing hooks switches such models to eager (the survey shows eager and sdpa agree to 0e+00 on them).
_INLINE_SDPA_BRANCH_CLASSES = {"FalconAttention"}


# Every keyword a model passes to the attention function, and what unilens does with it. The hookable path reproduces
# eager attention from these; the fast path hands them to the model's own kernel. A keyword NOT listed here that
# arrives with a value other than None is refused (`UnknownAttentionKeyword`), never dropped: a transformers release
# that starts passing a new one (a new sink form, a new bias, a new sparsity pattern) fails loudly until it is
# understood here. Checked on every call, on both paths (a set lookup per keyword).
ATTENTION_KEYWORDS: dict[str, str] = {
    # applied by the hookable eager path exactly as the models' eager functions apply them
    "scaling": "applied: scores = q @ k^T * scaling (default head_dim ** -0.5)",
    "dropout": "applied: dropout on the probabilities (0 in eval mode)",
    "softcap": "applied: tanh(scores / softcap) * softcap before the mask (Gemma 2)",
    "is_causal": "applied: causal mask when no mask is given",
    "position_bias": "applied: added to the scores before the mask (T5-style / Inkling relative biases)",
    "sinks": "applied: an extra softmax logit per head, or per (batch, head, query) (Inkling 2)",
    "s_aux": "applied: learned per-head sinks passed for flash kernels (GPT-OSS, Granite-SWA, DeepSeek-V4)",
    # turned into the mask before either path runs (the models apply them themselves only for eager / sdpa)
    "indices": "applied: DeepSeek sparse attention's top-k key indices (batch, query, topk) -> masked keys",
    "block_indices": "applied: MiniMax-M3's selected key blocks, through the module's own indexer.build_block_mask",
    # already inside the mask the model builds; HF's eager and sdpa functions ignore it too (flash kernels read it)
    "sliding_window": "in the mask",
    # forward bookkeeping that does not enter the attention computation given q, k, v and the mask
    "position_ids": "not needed: rotary is already applied to q / k",
    "cache_position": "not needed: positions are already in the mask",
    "use_cache": "not needed",
    "output_attentions": "not needed: probabilities are always returned",
    "output_hidden_states": "not needed",
    "output_router_logits": "not needed",
    "return_dict": "not needed",
    "logits_to_keep": "not needed",
    "labels": "not needed",
    "token_type_ids": "not needed",
    "encoder_hidden_states": "not needed: already projected to k / v",
}


class UnknownAttentionKeyword(TypeError):
    """A model passed the attention function a keyword unilens does not know how to apply."""


class UnknownForwardKeyword(UnknownAttentionKeyword):
    """The caller passed the model's forward a keyword it does not take (transformers hands such keywords on, through
    ``**kwargs``, down to the attention function, where unilens would otherwise blame the architecture). A subclass
    of ``UnknownAttentionKeyword``: code catching that still catches it."""


# TransformerLens's forward keywords (a likely mix-up, named in the error).
_TL_FORWARD_KEYWORDS = ("return_type", "loss_per_token", "prepend_bos", "padding_side", "start_at_layer",
                        "stop_at_layer", "past_kv_cache", "tokens")
# The keywords the caller gave the model's top-level forward, for the thread running it (set by a pre-hook on the HF
# model, cleared after it): an unknown keyword the attention receives that the caller gave is the caller's mistake.
_caller = threading.local()


def _remember_caller_keywords(hf_model: nn.Module) -> None:
    params = inspect.signature(hf_model.forward).parameters.values()
    named = {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}

    def pre(module, args, kwargs):  # only what goes to **kwargs: a named argument the model passes on is its own
        _caller.keywords = (type(module).__name__, frozenset(k for k in kwargs if k not in named))

    def post(module, args, output):
        _caller.keywords = None

    hf_model.register_forward_pre_hook(pre, with_kwargs=True)
    hf_model.register_forward_hook(post, always_call=True)


def _check_keywords(module: nn.Module, kwargs: dict[str, Any]) -> None:
    unknown = [k for k, v in kwargs.items() if v is not None and k not in ATTENTION_KEYWORDS]
    model_name, given = getattr(_caller, "keywords", None) or ("the model", frozenset())
    from_caller = [k for k in unknown if k in given]
    if from_caller:
        tl = [k for k in from_caller if k in _TL_FORWARD_KEYWORDS]
        raise UnknownForwardKeyword(
            f"unilens: {', '.join(f'{k}=' for k in from_caller)} is not an argument of {model_name}.forward (it "
            f"reached {type(module).__name__}'s attention function through **kwargs, unused): remove it from the call"
            + (f" ({', '.join(f'{k}=' for k in tl)}: TransformerLens's, taken by run_with_hooks / run_with_cache)."
               if tl else ".")
        )
    if unknown:
        raise UnknownAttentionKeyword(
            f"unilens: {type(module).__name__} passed {', '.join(f'{k}=' for k in unknown)} to the attention "
            "function, which unilens does not know how to apply; it refuses rather than ignore it (the attention "
            "it computed could silently differ from the model's). Please report this architecture; until it is "
            "supported, use the model without unilens's attention hooks (nnsight's LanguageModel with "
            "unilens.get_rename_dict(...)). Known keywords: unilens.attention.ATTENTION_KEYWORDS."
        )


def _apply_selection(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
    kwargs: dict[str, Any],
) -> tuple[torch.Tensor | None, dict[str, Any]]:
    """Fold sparse key selections (``indices``, ``block_indices``) into the mask, as the models do for eager / sdpa.

    DSA models (DeepSeek-V3.2, GLM-MoE-DSA, HY-V4, Mistral-Large-4, ...) mask keys outside the indexer's top-k only
    when their implementation is "eager" or "sdpa"; under any other name they pass the indices on for a sparse
    kernel. unilens's implementation has another name, so it applies the selection here, the same way.
    """
    indices, block_indices = kwargs.get("indices"), kwargs.get("block_indices")
    if indices is None and block_indices is None:
        return attention_mask, kwargs
    kwargs = {**kwargs, "indices": None, "block_indices": None}
    key_len = key.shape[2]
    if indices is not None:  # (batch, query, topk) key indices kept per query
        masked = torch.ones(indices.shape[0], indices.shape[1], key_len, dtype=torch.bool, device=indices.device)
        masked = masked.scatter(-1, indices.long(), False).unsqueeze(1)  # (batch, 1, query, key); True = masked
        if attention_mask is None:
            attention_mask = _additive_mask(None, query.shape[2], key_len, query.dtype, query.device, True)
            attention_mask = torch.zeros_like(masked, dtype=query.dtype) if attention_mask is None else attention_mask
        if attention_mask.dtype == torch.bool:
            attention_mask = attention_mask & ~masked
        else:
            attention_mask = attention_mask.masked_fill(masked, torch.finfo(query.dtype).min)
    if block_indices is not None:
        build = getattr(getattr(module, "indexer", None), "build_block_mask", None)
        if build is None:
            raise UnknownAttentionKeyword(
                f"unilens: {type(module).__name__} passed block_indices= but has no indexer.build_block_mask to turn "
                "them into a mask; this sparse attention is not supported."
            )
        position_ids = kwargs.get("position_ids")
        if position_ids is None:  # what MiniMax-M3's attention does when none is given
            position_ids = torch.arange(key_len - query.shape[2], key_len, device=query.device)
        position_ids = (position_ids if position_ids.ndim > 1 else position_ids.unsqueeze(0)).expand(query.shape[0], -1)
        attention_mask = build(block_indices, attention_mask, key_len, query.dtype, query.device, position_ids)
    return attention_mask, kwargs


class HookPoint(nn.Module):
    """Identity module: its input is its output, so nnsight and torch hooks can read or replace the tensor.

    Example:
        >>> hp = HookPoint(); hp(torch.ones(2)).tolist()
        [1.0, 1.0]
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class AttentionRequest:
    """What the forwards of one attention module were asked for: hook points to run, z and per-head results."""

    __slots__ = ("points", "heads", "head_results")

    def __init__(self) -> None:
        self.points: set[str] = set()
        self.heads = False  # z will be read (heads or head_results)
        self.head_results = False


class AttentionHooks(nn.Module):
    """The `unilens_hooks` child of an attention module: one `HookPoint` per intermediate plus dispatch state.

    Hook point shapes:
        queries `(batch, heads, seq, head_dim)`, keys / values `(batch, kv_heads, seq, head_dim)` (after rotary),
        scores `(batch, heads, query, key)` (pre-softmax, after scale / softcap / mask),
        probabilities `(batch, heads, query, key)`, heads = z `(batch, seq, heads, head_dim)` (input of the
        output projection), head_results `(batch, seq, heads, hidden)` (opt-in).

    Example:
        >>> hooks = AttentionHooks(route="interface", architecture="LlamaAttention")
        >>> sorted(name for name, _ in hooks.named_children())[:3]
        ['head_results', 'heads', 'keys']
    """

    def __init__(self, route: str, architecture: str, always_materialize: bool = False):
        super().__init__()
        for name in HOOK_NAMES:
            self.add_module(name, HookPoint())
        # "interface": the class calls ALL_ATTENTION_FUNCTIONS; "softmax": inline attention, probabilities are
        # taken by routing the softmax call made during this module's forward.
        self.route = route
        self.architecture = architecture
        self.always_materialize = always_materialize
        # Requests, double-buffered: `request_materialize` adds to `pending`; the module's forward pre-hook moves
        # `pending` to `current` (what this forward computes) and the post-hook drops `current` only. A request made
        # while the module runs (the next generation step's loop body starts while this step's forward is still
        # inside the module) so survives into the next forward instead of being wiped with this one.
        self.pending = AttentionRequest()
        self.current = AttentionRequest()
        # Filled at install time.
        self.original_implementation: str = "eager"
        self.original_function: Callable | None = None
        self.output_projection_name: str | None = None
        # Runtime bookkeeping for one forward.
        self._num_heads: int | None = None
        self._head_dim: int | None = None  # value head dim, when known: checks the output projection's input width
        self._probabilities_seen = False

    # Per-forward state, set on every attention call: plain attributes, not nn.Module's slower __setattr__ (which
    # looks for parameters, buffers and submodules first; ~2 % of a small model's forward over 30 layers).
    _STATE = frozenset({"pending", "current", "_num_heads", "_head_dim", "_probabilities_seen"})

    def __setattr__(self, name: str, value: Any) -> None:
        if name in AttentionHooks._STATE:
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    # A point requested late, while this forward already runs, also runs in this forward: a trace that reads
    # queries and then probabilities of one layer requests the second after the forward began.
    @property
    def active(self) -> bool:
        """Whether this forward takes the hookable path."""
        return self.always_materialize or self.materialize

    @property
    def materialize(self) -> bool:
        """Whether any hook point is requested (for this forward or the next)."""
        return bool(self.current.points) or bool(self.pending.points)

    @property
    def want_heads(self) -> bool:
        """z will be read (heads or head_results): a z that cannot be split per head is then an error."""
        return self.current.heads or self.pending.heads

    @property
    def want_head_results(self) -> bool:
        return self.current.head_results or self.pending.head_results

    def wants(self, name: str) -> bool:
        """Whether hook point ``name`` runs in this forward (requested, or every one under always_materialize)."""
        return self.always_materialize or name in self.current.points or name in self.pending.points

    def begin_forward(self) -> None:
        """Forward pre-hook: this forward serves what was requested so far."""
        self.current, self.pending = self.pending, AttentionRequest()

    def end_forward(self) -> None:
        """Forward post-hook: drop what this forward served; requests made meanwhile stay pending."""
        self.current = AttentionRequest()

    def clear_requests(self) -> None:
        """Drop every request (end of a trace: nothing requested there may reach an unrelated forward)."""
        self.current, self.pending = AttentionRequest(), AttentionRequest()

    def point(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """``x`` through hook point ``name`` when it runs, else ``x`` itself."""
        return getattr(self, name)(x) if self.wants(name) else x

    def extra_repr(self) -> str:
        return f"route={self.route!r}, architecture={self.architecture!r}"


@dataclass
class AttentionSetup:
    """What `install_attention_hooks` did, for the lead's model and for `print_source`."""

    original_implementation: str
    routes: list[str | None]
    architectures: list[str | None]
    output_projections: list[str | None]
    switched_to_eager: bool = False
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------------------
# The attention function registered with transformers
# ----------------------------------------------------------------------------------------------------------------


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(batch, kv_heads, seq, dim) -> (batch, kv_heads * n_rep, seq, dim), each kv head repeated in a block."""
    if n_rep == 1:
        return x
    b, kvh, s, d = x.shape
    return x[:, :, None].expand(b, kvh, n_rep, s, d).reshape(b, kvh * n_rep, s, d)


def _additive_mask(
    attention_mask: torch.Tensor | None, q_len: int, kv_len: int, dtype: torch.dtype, device, is_causal: bool
) -> torch.Tensor | None:
    """Turn whatever mask the backend received into eager's additive float mask `(batch|1, 1|heads, query, key)`.

    - float: already additive (eager mask, finfo(dtype).min on hidden positions);
    - bool (sdpa mask): True = attend, converted with finfo(dtype).min exactly as `masking_utils.eager_mask` does;
    - None: sdpa would use `is_causal` (only when query length > 1), so build that causal mask.
    """
    min_value = torch.finfo(dtype).min
    if attention_mask is None:
        if not (is_causal and q_len > 1):
            return None
        q_pos = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
        allowed = torch.arange(kv_len, device=device)[None, :] <= q_pos
        return torch.where(allowed, torch.zeros((), dtype=dtype, device=device), min_value)[None, None]
    if attention_mask.dtype == torch.bool:
        return torch.where(attention_mask, torch.zeros((), dtype=dtype, device=device), min_value)
    return attention_mask.to(dtype)


def _hookable_eager(
    module: nn.Module,
    hooks: AttentionHooks | None,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    is_causal: bool | None = None,
    position_bias: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """HF eager attention with every intermediate routed through `hooks` (when given)."""

    def hook(name: str, x: torch.Tensor) -> torch.Tensor:
        return hooks.point(name, x) if hooks is not None else x

    query = hook("queries", query)  # (batch, heads, q, head_dim)
    key = hook("keys", key)  # (batch, kv_heads, k, head_dim)
    value = hook("values", value)  # (batch, kv_heads, k, v_head_dim)
    n_heads, n_kv = query.shape[1], key.shape[1]
    if n_heads % n_kv:
        raise ValueError(f"{n_heads} query heads cannot be grouped over {n_kv} key/value heads")
    key_states = _repeat_kv(key, n_heads // n_kv)
    value_states = _repeat_kv(value, n_heads // n_kv)

    if scaling is None:  # GPT-2 / Gemma eager default
        scaling = query.shape[-1] ** -0.5
    scores = torch.matmul(query, key_states.transpose(2, 3)) * scaling  # (batch, heads, q, k)
    if softcap is not None:  # Gemma 2: cap before the mask
        scores = torch.tanh(scores / softcap) * softcap
    if position_bias is not None:
        scores = scores + position_bias
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    mask = _additive_mask(
        attention_mask, query.shape[2], key_states.shape[2], scores.dtype, scores.device, bool(is_causal)
    )
    if mask is not None:
        scores = scores + mask[:, :, :, : key_states.shape[-2]]
    scores = hook("scores", scores)

    # Attention sinks: one extra logit per (head) or per (batch, head, query) that attends to nothing. Either the
    # model passes them (`sinks=` kwarg, Inkling 2: `(batch, heads, q, 1)`) or they are the module's learned
    # per-head parameter (GPT-OSS, Granite-SWA, ...: `(heads,)`).
    sinks = kwargs.get("sinks")
    if not isinstance(sinks, torch.Tensor):
        sinks = kwargs.get("s_aux")
    if not isinstance(sinks, torch.Tensor):
        sinks = getattr(module, "sinks", None)
    sink_scale = None
    if isinstance(sinks, torch.Tensor) and _sinks_scale_output(module):
        # Granite-SWA eager: probabilities are the plain softmax (rows sum to 1, as HF returns them) and the
        # output is scaled by sigmoid(logsumexp(scores) - sink) = 1 - p_sink, the same attention output.
        probabilities = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        lse = torch.logsumexp(scores, dim=-1)  # (batch, heads, q)
        sink_scale = (lse - sinks.reshape(1, -1, 1)).to(torch.float32).sigmoid()
    elif isinstance(sinks, torch.Tensor):
        # GPT-OSS eager: append the sink logit as an extra key, subtract the row max, softmax, drop it;
        # rows over the real keys then sum to 1 - p_sink.
        sink_col = sinks if sinks.dim() == 4 else sinks.reshape(1, -1, 1, 1)
        sink_col = sink_col.to(scores.dtype).expand(scores.shape[0], scores.shape[1], scores.shape[2], 1)
        combined = torch.cat([scores, sink_col], dim=-1)
        combined = combined - combined.max(dim=-1, keepdim=True).values
        probabilities = F.softmax(combined, dim=-1, dtype=torch.float32)[..., :-1].to(query.dtype)
    else:
        # Upcast to fp32 like most eager implementations (GPT-2's eager does not; identical in fp32).
        probabilities = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probabilities = hook("probabilities", probabilities)  # (batch, heads, q, k)
    if hooks is not None:
        hooks._num_heads = n_heads
        hooks._head_dim = value.shape[-1]
        hooks._probabilities_seen = True

    dropped = F.dropout(probabilities, p=dropout, training=module.training)
    attn_output = torch.matmul(dropped.to(value_states.dtype), value_states)  # (batch, heads, q, v_head_dim)
    if sink_scale is not None:
        attn_output = attn_output * sink_scale.unsqueeze(-1).to(attn_output.dtype)
    return attn_output.transpose(1, 2).contiguous(), probabilities


@memoize
def _sinks_scale_output_for(cls: type) -> bool:
    own = getattr(sys.modules.get(cls.__module__), "eager_attention_forward", None)
    try:
        src = inspect.getsource(own) if own is not None else ""
    except (OSError, TypeError):
        src = ""
    return "logsumexp" in src and "sinks" in src


def _sinks_scale_output(module: nn.Module) -> bool:
    """Whether the class's own eager attention applies its sinks as an output scale (probabilities sum to 1)
    instead of as an extra softmax key (probabilities sum to 1 - p_sink); read from that eager function's source.
    """
    return _sinks_scale_output_for(type(module))


def unilens_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *args: Any,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The `"unilens"` attention implementation: hookable eager when requested, else the original fast path.

    Registered with `transformers.AttentionInterface`; models call it as
    `fn(module, query, key, value, attention_mask, scaling=..., dropout=..., **kwargs)` with query / key already
    rotated, shaped `(batch, heads, seq, head_dim)`. Returns `(attn_output (batch, seq, heads, head_dim),
    probabilities or None)`.

    Example:
        >>> class M(nn.Module): is_causal = True
        >>> q = k = v = torch.randn(1, 2, 3, 4)
        >>> out, probs = unilens_attention_forward(M(), q, k, v, None, scaling=0.5)
        >>> out.shape, probs.shape
        (torch.Size([1, 3, 2, 4]), torch.Size([1, 2, 3, 3]))
    """
    _check_keywords(module, kwargs)
    attention_mask, kwargs = _apply_selection(module, query, key, attention_mask, kwargs)
    hooks = getattr(module, "unilens_hooks", None)
    if not isinstance(hooks, AttentionHooks):
        # An attention module we did not install on (e.g. a vision tower sharing the config): plain eager.
        if args:
            raise TypeError(f"unilens attention got unexpected positional arguments {args!r}")
        return _hookable_eager(module, None, query, key, value, attention_mask, **kwargs)
    if hooks.active:
        if args:
            raise TypeError(
                f"{hooks.architecture} passed positional arguments {args!r} after attention_mask; the hookable path "
                "expects keyword arguments (scaling=, dropout=, softcap=)."
            )
        return _hookable_eager(module, hooks, query, key, value, attention_mask, **kwargs)
    return hooks.original_function(module, query, key, value, attention_mask, *args, **kwargs)


class _Recorder:
    """Stands in for ``AttentionHooks`` in ``recompute_attention``: every intermediate is kept, none replaced."""

    def __init__(self) -> None:
        self.values: dict[str, torch.Tensor] = {}

    def point(self, name: str, x: torch.Tensor) -> torch.Tensor:
        self.values[name] = x
        return x


def recompute_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *args: Any,
    **kwargs: Any,
) -> dict[str, torch.Tensor]:
    """The intermediates of one attention-function call, recomputed by the hookable eager path from the call's own
    arguments (the mask the model built for its backend, eager float or sdpa boolean / None, and its keywords:
    scaling, softcap, sinks, sliding window in the mask, GQA by repeating kv heads): ``queries``, ``keys``,
    ``values``, ``scores`` ``(batch, heads, query, key)`` (after scale / softcap / mask) and ``probabilities``.
    Remote mode runs it on the server, on the arguments of the deployment's attention call.

    Example:
        >>> class M(nn.Module): is_causal = True
        >>> q = k = v = torch.randn(1, 2, 3, 4)
        >>> got = recompute_attention(M(), q, k, v, None, scaling=0.5)
        >>> got["probabilities"].shape, bool(got["probabilities"][0, 0, 0, 1] == 0)  # causal: no look-ahead
        (torch.Size([1, 2, 3, 3]), True)
    """
    if args:
        raise TypeError(f"{type(module).__name__} passed positional arguments {args!r} after attention_mask to its "
                        "attention function; unilens recomputes attention from keyword arguments (scaling=, ...).")
    _check_keywords(module, kwargs)
    attention_mask, kwargs = _apply_selection(module, query, key, attention_mask, kwargs)
    recorder = _Recorder()
    _hookable_eager(module, recorder, query, key, value, attention_mask, **kwargs)  # type: ignore[arg-type]
    return recorder.values


def unilens_mask(*args: Any, config=None, **kwargs: Any):
    """Mask for the `"unilens"` implementation: the mask the ORIGINAL backend would get (sdpa or eager)."""
    original = getattr(config, "_unilens_original_attn_implementation", "sdpa")
    fn = sdpa_mask if original == "sdpa" else eager_mask
    return fn(*args, config=config, **kwargs)


AttentionInterface.register(IMPLEMENTATION_NAME, unilens_attention_forward)
AttentionMaskInterface.register(IMPLEMENTATION_NAME, unilens_mask)


# ----------------------------------------------------------------------------------------------------------------
# The softmax route for inline attention classes
# ----------------------------------------------------------------------------------------------------------------

_SOFTMAX_SITES = ((F, "softmax"), (torch, "softmax"), (torch.Tensor, "softmax"))
_softmax_lock = ProcessLock()  # pickles as a new lock: this module ships by value in remote mode


class _SoftmaxRouter:
    """While an inline attention module runs, send its first attention softmax through `scores` / `probabilities`.

    Routed: a last-dim softmax of a 4D `(batch, heads, query, key)` tensor, or of a 3D BART-style
    `(batch * heads, query, key)` tensor (XGLM, MVP, TrOCR, Whisper), which is viewed as 4D for the hooks and
    viewed back for the model; the 3D form is only routed when the module's head count times the batch of the
    hidden states entering the module equals its first dimension. Only calls from the thread running the model
    are routed (nnsight runs intervention code in another thread), and never re-entrantly, so user code calling
    softmax inside a hook is unaffected.
    """

    def __init__(self, hooks: AttentionHooks, module: nn.Module):
        self.hooks = hooks
        # the module's own head count (unilens.core.config), to unflatten BART-style (batch * heads, query, key) scores
        self.num_heads: int | None = heads_attribute(module)
        head_dim = getattr(module, "head_dim", None)
        self.head_dim: int | None = head_dim if isinstance(head_dim, int) and head_dim > 0 else None
        self.batch: int | None = None  # batch of the hidden states of the current forward (set by the pre-hook)
        self.saved: list[tuple[Any, str, Callable]] = []
        self.thread: int | None = None
        self.busy = False

    def _scores_shape(self, input: torch.Tensor, dim: Any) -> tuple[int, int, int, int] | None:
        """The `(batch, heads, query, key)` view of a softmax input, or None when it is not attention scores."""
        if input.dim() == 4 and dim in (-1, 3):
            return tuple(input.shape)
        if input.dim() == 3 and dim in (-1, 2) and self.num_heads and self.batch:
            if input.shape[0] == self.batch * self.num_heads:
                return (self.batch, self.num_heads, input.shape[1], input.shape[2])
        return None

    def _wrap(self, original: Callable) -> Callable:
        router = self

        def softmax(input, *args, **kwargs):
            dim = kwargs.get("dim", args[0] if args else None)
            shape = None
            if (
                threading.get_ident() == router.thread
                and router.hooks.active
                and not router.busy
                and not router.hooks._probabilities_seen
                and isinstance(input, torch.Tensor)
            ):
                shape = router._scores_shape(input, dim)
            if shape is None:
                return original(input, *args, **kwargs)
            # the softmax runs on the 4D view: its dim is the last one whatever the caller wrote
            if "dim" in kwargs:
                kwargs = {**kwargs, "dim": -1}
            else:
                args = (-1, *args[1:])
            router.busy = True
            try:
                scores = router.hooks.point("scores", input.reshape(shape))  # (batch, heads, q, k)
                probabilities = router.hooks.point("probabilities", original(scores, *args, **kwargs))
            finally:
                router.busy = False
            router.hooks._num_heads = probabilities.shape[1]
            router.hooks._head_dim = router.head_dim
            router.hooks._probabilities_seen = True
            return probabilities.reshape(input.shape)

        return softmax

    def enter(self) -> None:
        _softmax_lock.acquire()
        self.thread = threading.get_ident()
        for owner, name in _SOFTMAX_SITES:
            original = getattr(owner, name)
            self.saved.append((owner, name, original))
            setattr(owner, name, self._wrap(original))

    def exit(self) -> None:
        for owner, name, original in reversed(self.saved):
            setattr(owner, name, original)
        self.saved.clear()
        self.thread = None
        _softmax_lock.release()


# ----------------------------------------------------------------------------------------------------------------
# Installation
# ----------------------------------------------------------------------------------------------------------------


def _output_projection_weight(proj: nn.Module, n_heads: int) -> torch.Tensor:
    """W_O `(heads, head_dim, hidden)` from a Linear (weight (out, in)) or a GPT-2 Conv1D (weight (in, out))."""
    weight = parameter(proj, "weight")
    weight = weight.t() if isinstance(proj, nn.Linear) else weight  # (heads * head_dim, hidden)
    return weight.reshape(n_heads, weight.shape[0] // n_heads, weight.shape[1])


def _make_output_projection_hooks(hooks: AttentionHooks, proj: nn.Module):
    def pre_hook(_proj, args, kwargs):
        if not (hooks.active and (hooks.wants("heads") or hooks.want_head_results)):
            return None
        z = args[0]  # (batch, seq, heads * head_dim)
        n_heads = hooks._num_heads
        if n_heads is None:
            raise RuntimeError(
                f"unilens: the attention of {hooks.architecture} reached its output projection "
                f"{hooks.output_projection_name!r} without exposing attention probabilities, so the number of heads "
                "is unknown; this class is not supported."
            )
        expected = n_heads * hooks._head_dim if hooks._head_dim else None
        if z.shape[-1] % n_heads or (expected is not None and z.shape[-1] != expected):
            # e.g. DeepSeek-V4's grouped low-rank output: the projection found is not fed by z directly
            if not hooks.want_heads:
                return None  # only probabilities / scores were asked for: leave the projection alone
            raise RuntimeError(
                f"unilens: {hooks.architecture}.{hooks.output_projection_name} receives width {z.shape[-1]}, not "
                f"heads ({n_heads}) x head_dim ({hooks._head_dim}): it is not fed by the per-head outputs z, so "
                "attention heads / head_results are not supported for this class."
            )
        z4 = hooks.point("heads", z.reshape(*z.shape[:-1], n_heads, z.shape[-1] // n_heads))  # (batch, seq, heads, hd)
        return (z4.reshape(z.shape), *args[1:]), kwargs

    def post_hook(_proj, args, kwargs, output):
        if not (hooks.active and hooks.want_head_results):
            return None
        if hooks._num_heads is None and not hooks.current.head_results:
            return None  # requested after this forward's attention ran: it serves the next forward
        if (not is_projection(_proj) or is_quantized(_proj)):
            raise NotImplementedError(
                f"unilens: attention_head_results is not available for {hooks.architecture}: its output projection "
                f"{hooks.output_projection_name!r} ({type(_proj).__name__}) is not a linear map of z (it mixes in "
                "other inputs), so z does not split into per-head results. attention_heads (z) is available."
            )
        z = args[0]
        n_heads = hooks._num_heads
        z4 = z.reshape(*z.shape[:-1], n_heads, z.shape[-1] // n_heads)  # (batch, seq, heads, head_dim)
        w_o = _output_projection_weight(_proj, n_heads).to(z.device, z.dtype)  # (heads, head_dim, hidden)
        results = torch.einsum("...hd,hdm->...hm", z4, w_o)  # (batch, seq, heads, hidden)
        results = hooks.head_results(results)
        out = results.sum(dim=-2)
        if getattr(_proj, "bias", None) is not None:
            out = out + parameter(_proj, "bias").to(out.device, out.dtype)
        return out

    return pre_hook, post_hook


def _make_attention_hooks(hooks: AttentionHooks, module: nn.Module):
    router = _SoftmaxRouter(hooks, module) if hooks.route == "softmax" else None

    def pre_hook(_module, args, kwargs):
        hooks.begin_forward()
        hooks._probabilities_seen = False
        hooks._num_heads = None
        hooks._head_dim = None
        # The softmax route is entered on every forward of an inline class, requested or not: a request can still
        # arrive once the forward has begun (a trace that reads attentions_input first makes its next request from
        # inside this module's call), and the routed softmax checks `hooks.active` on each call.
        if router is not None:
            hidden = args[0] if args else kwargs.get("hidden_states")
            router.batch = hidden.shape[0] if isinstance(hidden, torch.Tensor) and hidden.dim() == 3 else None
            router.enter()

    def post_hook(_module, _args, _output):
        try:
            if router is not None and router.saved:
                router.exit()
            # _output is None when the forward raised (torch calls always_call hooks then too): that error, e.g. a
            # wrongly shaped assignment at a hook point, is the one to report, not "no probabilities computed"
            if (hooks.always_materialize or hooks.current.points) and not hooks._probabilities_seen \
                    and _output is not None:
                raise RuntimeError(
                    f"unilens: attention hooks were requested on {hooks.architecture} but its forward computed no "
                    f"attention probabilities (route {hooks.route!r}); this class is not supported by the hookable "
                    "attention."
                )
        finally:
            # One request serves one forward of this module: generation steps each re-request via the accessor.
            hooks.end_forward()

    return pre_hook, post_hook


def _original_function(module: nn.Module, implementation: str) -> Callable:
    if implementation == "sdpa":
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward
    # The model's own eager function lives next to its attention class; fall back to our eager path otherwise.
    own = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if own is not None:
        return own
    return lambda mod, q, k, v, mask, *a, **kw: _hookable_eager(mod, None, q, k, v, mask, **kw)


def install_attention_hooks(
    hf_model: nn.Module, attention_modules: list[nn.Module | None], always_materialize: bool = False
) -> AttentionSetup:
    """Attach `unilens_hooks` to each attention module and switch the model to the `"unilens"` implementation.

    Call on the plain HF model before nnsight wraps it. Without a request (`request_materialize`) each
    attention call runs the model's original implementation (sdpa or eager), so the fast path is kept.

    Example:
        >>> from transformers import AutoConfig, AutoModelForCausalLM
        >>> cfg = AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        ...     num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
        >>> m = AutoModelForCausalLM.from_config(cfg)
        >>> attn = m.model.layers[0].self_attn
        >>> setup = install_attention_hooks(m, [attn])
        >>> saved = []
        >>> _ = attn.unilens_hooks.probabilities.register_forward_hook(lambda mod, i, o: saved.append(o))
        >>> request_materialize(attn); _ = m(torch.tensor([[1, 2, 3]]))
        >>> saved[0].shape
        torch.Size([1, 4, 3, 3])
    """
    config = hf_model.config
    original = getattr(config, "_unilens_original_attn_implementation", None) or config._attn_implementation or "eager"
    notes: list[str] = []
    switched = False
    if original not in _SUPPORTED_ORIGINALS:
        raise NotImplementedError(
            f"unilens attention hooks keep the model's fast path for {_SUPPORTED_ORIGINALS}, but this model uses "
            f"attn_implementation={original!r}. Load it with attn_implementation='sdpa' (or 'eager')."
        )
    present = [m for m in attention_modules if m is not None]
    # (transformers >= 5.25 routes Falcon through the attention interface: no inline branch left, nothing to switch)
    if original == "sdpa" and any(type(m).__name__ in _INLINE_SDPA_BRANCH_CLASSES and not uses_attention_interface(m)
                                  for m in present):
        _force_eager(hf_model)
        original, switched = "eager", True
        notes.append("inline sdpa branch bypasses softmax: switched the model to eager")

    routes: list[str | None] = []
    archs: list[str | None] = []
    projections: list[str | None] = []
    any_interface = False
    for module in attention_modules:
        if module is None:
            routes.append(None), archs.append(None), projections.append(None)
            continue
        if isinstance(getattr(module, "unilens_hooks", None), AttentionHooks):
            raise RuntimeError(f"{type(module).__name__} already has unilens hooks installed")
        route = "interface" if uses_attention_interface(module) else "softmax"
        any_interface |= route == "interface"
        hooks = AttentionHooks(route=route, architecture=type(module).__name__, always_materialize=always_materialize)
        hooks.original_implementation = original
        hooks.original_function = _original_function(module, original)
        module.add_module("unilens_hooks", hooks)
        pre, post = _make_attention_hooks(hooks, module)
        module.register_forward_pre_hook(pre, with_kwargs=True)
        module.register_forward_hook(post, always_call=True)
        try:
            proj_name, proj = find_output_projection(module)
            p_pre, p_post = _make_output_projection_hooks(hooks, proj)
            proj.register_forward_pre_hook(p_pre, with_kwargs=True)
            proj.register_forward_hook(p_post, with_kwargs=True)
            hooks.output_projection_name = proj_name
        except ValueError as err:
            notes.append(str(err))
        routes.append(route), archs.append(type(module).__name__), projections.append(hooks.output_projection_name)

    if any_interface:
        for cfg in {id(c): c for c in _all_configs(config)}.values():
            if getattr(cfg, "_attn_implementation", None) in (original, None):
                cfg._unilens_original_attn_implementation = original
        hf_model.set_attn_implementation(IMPLEMENTATION_NAME)
    _remember_caller_keywords(hf_model)
    return AttentionSetup(original, routes, archs, projections, switched, notes)


@contextlib.contextmanager
def original_attention(hf_model: nn.Module):
    """Run ``hf_model`` with the attention implementation it had before unilens installed its own (the oracle of
    the load-time check: models that branch on the implementation's name must compute the same either way).

    Example:
        >>> from unilens import StandardizedTransformer
        >>> from unilens.testing import tiny_model
        >>> hf, tok = tiny_model("llama")
        >>> model = StandardizedTransformer(hf, tokenizer=tok, check=False)
        >>> hf.config._attn_implementation
        'unilens'
        >>> with original_attention(hf):
        ...     hf.config._attn_implementation
        'sdpa'
    """
    configs = {id(c): c for c in _all_configs(hf_model.config)}
    for module in hf_model.modules():
        cfg = getattr(module, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            configs.setdefault(id(cfg), cfg)
    swapped = []
    for cfg in configs.values():
        original = getattr(cfg, "_unilens_original_attn_implementation", None)
        if original is not None and cfg._attn_implementation == IMPLEMENTATION_NAME:
            cfg._attn_implementation = original
            swapped.append(cfg)
    try:
        yield hf_model
    finally:
        for cfg in swapped:
            cfg._attn_implementation = IMPLEMENTATION_NAME


def _force_eager(hf_model: nn.Module) -> None:
    """Switch to eager; inline classes refuse `set_attn_implementation`, so set the configs they read directly."""
    for cfg in {id(c): c for c in _all_configs(hf_model.config)}.values():
        cfg._attn_implementation = "eager"
    for module in hf_model.modules():
        cfg = getattr(module, "config", None)
        if cfg is not None and getattr(cfg, "_attn_implementation", "eager") != "eager":
            cfg._attn_implementation = "eager"


def _all_configs(config) -> list:
    configs = [config]
    for key in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, key, None)
        if sub is not None:
            configs.extend(_all_configs(sub))
    return configs


def request_materialize(
    attn_module: nn.Module, head_results: bool = False, heads: bool = False, points: Sequence[str] | None = None
) -> None:
    """Make the next forward of `attn_module` run the hookable path (and per-head results when asked).

    `points`: the hook points that will be read or written (default: all of `HOOK_NAMES`); only those run.

    `heads=True` (implied by `head_results`) says z will be read: an output projection whose input cannot be split
    into (heads, head_dim) is then an error; otherwise that projection is left alone. The flags reset after that
    forward, so each trace / generation step requests again through the accessor.

    Example:
        >>> from transformers import AutoConfig, AutoModelForCausalLM
        >>> cfg = AutoConfig.for_model("gpt2", n_embd=32, n_layer=1, n_head=4, vocab_size=64)
        >>> m = AutoModelForCausalLM.from_config(cfg); attn = m.transformer.h[0].attn
        >>> _ = install_attention_hooks(m, [attn]); request_materialize(attn); attn.unilens_hooks.materialize
        True
    """
    hooks = getattr(attn_module, "unilens_hooks", None)
    if not isinstance(hooks, AttentionHooks):
        raise ValueError(
            f"{type(attn_module).__name__} has no unilens hooks; call install_attention_hooks on the model first."
        )
    request = hooks.pending
    request.head_results = request.head_results or head_results
    request.heads = request.heads or heads or head_results
    request.points.update(HOOK_NAMES if points is None else points)


# ----------------------------------------------------------------------------------------------------------------
# Accessor used by StandardizedTransformer
# ----------------------------------------------------------------------------------------------------------------

# Hook points each route can provide, with the reason for the ones it cannot.
_SOFTMAX_ROUTE_MISSING = {
    "queries": "the class computes q/k/v inline (no attention-interface call), so rotated queries are not exposed",
    "keys": "the class computes q/k/v inline (no attention-interface call), so rotated keys are not exposed",
    "values": "the class computes q/k/v inline (no attention-interface call), so values are not exposed",
}


class AttentionHookAccessor(LayerIndexed):
    """`model.attention_<hook>[i]`: read (`.save()`) or assign one attention hook point of layer i inside a trace.

    Example:
        >>> from unilens import StandardizedTransformer
        >>> from unilens.testing import tiny_model
        >>> model = StandardizedTransformer(*tiny_model("llama"), check=False)
        >>> with model.trace("The cat sat"):
        ...     probs = model.attention_probabilities[0].save()  # (batch, heads, query, key)
        ...     model.attention_probabilities[1] = model.attention_probabilities[1] * 1.0
        >>> probs.shape[1] == model.num_heads, len(model.attention_probabilities) == model.num_layers
        (True, True)
    """

    def __init__(self, model, hook_name: str):
        if hook_name not in HOOK_NAMES:
            raise ValueError(f"unknown attention hook {hook_name!r}; choose one of {HOOK_NAMES}")
        super().__init__(model, f"attention_{hook_name}")
        self.hook_name = hook_name

    def _count(self) -> int:
        # one entry per layer, None on layers without softmax attention (hybrid models)
        return len(self.model._attention_modules)

    def _arch_name(self) -> str:
        name = getattr(self.model, "architecture_name", None)
        if not isinstance(name, str):
            arch = getattr(self.model, "architecture", None)
            name = getattr(arch, "model_type", None) or type(self.model).__name__
        return name

    def _hooks(self, i: int) -> AttentionHooks:
        modules = self.model._attention_modules
        module = modules[self._index(i)]
        if module is None:
            with_attn = [j for j, m in enumerate(modules) if m is not None]
            refusal = getattr(getattr(self.model, "architecture", None), "attention_refusal", None)
            if refusal is not None:  # it has one, out of the hooks' reach (XLNet, XLM)
                raise IndexError(f"layer {i}'s attention on {self._arch_name()} is not served: {refusal}.")
            raise IndexError(
                f"layer {i} of {self._arch_name()} has no softmax attention (hybrid model); "
                f"layers with attention: {with_attn}"
            )
        hooks = getattr(module, "unilens_hooks", None)
        if not isinstance(hooks, AttentionHooks):
            raise ValueError(f"layer {i}: attention hooks were not installed (install_attention_hooks)")
        if hooks.route == "softmax" and self.hook_name in _SOFTMAX_ROUTE_MISSING:
            raise NotImplementedError(
                f"attention_{self.hook_name} is not available for {self._arch_name()} "
                f"({hooks.architecture}): {_SOFTMAX_ROUTE_MISSING[self.hook_name]}. Available there: "
                "scores, probabilities, heads, head_results."
            )
        if self.hook_name in ("heads", "head_results") and hooks.output_projection_name is None:
            raise NotImplementedError(
                f"attention_{self.hook_name} is not available for {hooks.architecture}: no output projection found"
            )
        projection = module.get_submodule(hooks.output_projection_name) if self.hook_name == "head_results" else None
        if projection is not None and (not is_projection(projection) or is_quantized(projection)):
            raise NotImplementedError(
                f"attention_head_results is not available for {hooks.architecture}: its output projection "
                f"{hooks.output_projection_name!r} is not a linear map of z (it mixes in other inputs), so z does "
                "not split into per-head results. attention_heads (z) is available."
            )
        return hooks

    def _envoy(self, i: int):
        hooks = self._hooks(i)
        interleaver = getattr(self.model, "interleaver", None)
        if interleaver is not None and not interleaver.interleaving:
            # nnsight would refuse the read too, but only after the request was made: it would reach the next
            # unrelated forward (which would then take the slower eager path)
            raise ValueError(
                f"{self._label(i)} can only be read or set inside `with model.trace(...)` or "
                "`with model.generate(...)`: outside one there is no forward to take it from."
            )
        request_materialize(
            self.model._attention_modules[i],
            head_results=self.hook_name == "head_results",
            heads=self.hook_name in ("heads", "head_results"),
            points=[self.hook_name],
        )
        del hooks
        self._check_not_replaced(i)
        return getattr(self.model.attentions[i].unilens_hooks, self.hook_name)

    def _check_not_replaced(self, i: int) -> None:
        """The hooks live on the attention module found at load; a model that swapped it since has none."""
        arch = self.model.architecture
        path = f"{arch.layers_path}.{i % len(arch.layers)}.{arch.layers[i].attention}"
        current = self.model.module_accessor.model.get_submodule(path)
        original = self.model._attention_modules[i]
        if current is not original:
            raise RuntimeError(
                f"{self._arch_name()}: the attention module of layer {i} ({path}) was replaced after loading "
                f"({type(original).__name__} -> {type(current).__name__}), so it carries no unilens hooks. The "
                "model swaps modules at run time (BigBird replaces block-sparse by full attention for short "
                "inputs); load it with a config that fixes the module (BigBird: attention_type='original_full')."
            )

    def _get(self, i: int):
        self._note(i)
        return self._envoy(i).output

    def _set(self, i: int, value: torch.Tensor) -> None:
        self._note(i)
        self._assign(self._envoy(i), self._label(i), value)

    def _note(self, i: int) -> None:
        note = getattr(self.model, "_note_read", None)
        if note is not None:
            note(self._name, i)

    def print_source(self, i: int | None = None) -> None:
        """Print where the tensor comes from for layer i (default: first layer with attention)."""
        modules = self.model._attention_modules
        if i is None:
            i = next(j for j, m in enumerate(modules) if m is not None)
        hooks = self._hooks(i)
        path = f"model.attentions[{i}].unilens_hooks.{self.hook_name}.output"
        print(f"attention_{self.hook_name}[{i}] = {path}")
        if self.hook_name in ("heads", "head_results"):
            print(
                f"  from a forward hook on {hooks.architecture}.{hooks.output_projection_name} (the output projection)"
                + (": per-head z @ W_O[h], summed (+ bias) into its output" if self.hook_name == "head_results"
                   else ": its input reshaped to (batch, seq, heads, head_dim)")
            )
        elif hooks.route == "interface":
            print(
                f"  from unilens.attention.unilens_attention_forward, registered as "
                f"AttentionInterface[{IMPLEMENTATION_NAME!r}], called by {hooks.architecture}.forward; "
                f"fast path when not requested: {hooks.original_implementation}"
            )
        else:
            print(
                f"  from the softmax call (torch.nn.functional.softmax / torch.softmax / Tensor.softmax) made inside "
                f"{hooks.architecture}.forward, routed through the hook while that forward runs"
            )
        source = kv_source_layer(modules, i) if self.hook_name in ("keys", "values") else None
        if source is not None:  # KV sharing (Gemma 3n / 4, Kolibri 1.1): this layer has no k / v projections
            print(f"  layer {i} computes no {self.hook_name}: these are the {self.hook_name} of "
                  f"{'an earlier layer' if source < 0 else f'layer {source}'} (KV sharing), as layer {i} receives them")
