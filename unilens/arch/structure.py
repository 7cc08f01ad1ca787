"""What the parts of a model are, read from their structure: one predicate per question.

- ``is_projection``: a linear map module (``nn.Linear``, transformers' ``Conv1D``, or a quantized linear:
  bitsandbytes' ``Linear8bitLt`` / ``Linear4bit``, ``FP8Linear``); ``is_quantized`` says whether its weight can be
  read as a dense matrix (weight views and per-head results need one).
- ``computes_softmax_attention``: an attention module with a probability matrix (not a linear / recurrent mixer).
- ``find_output_projection``: the projection fed by the per-head outputs z inside an attention module.
- ``kv_source_layer``: the layer whose keys and values a KV-sharing layer attends to.
- ``token_table``: the one token embedding / unembedding table (a one-codebook audio LM keeps it in a ModuleList).
"""

from __future__ import annotations

import inspect
import re
import sys

from torch import nn

from ..core.memo import memoize

# Quantized linear layers, by class name (their libraries are optional): linear maps whose weight is not a dense
# float matrix.
QUANTIZED_PROJECTIONS = ("FP8Linear", "Linear8bitLt", "Linear4bit")


def is_projection(module: nn.Module) -> bool:
    """Whether ``module`` is a linear map: ``nn.Linear``, transformers' ``Conv1D`` (GPT-2: a Linear with a transposed
    weight) or a quantized linear.

    Example:
        >>> is_projection(nn.Linear(4, 4)), is_projection(nn.LayerNorm(4))
        (True, False)
    """
    return isinstance(module, nn.Linear) or type(module).__name__ in ("Conv1D", *QUANTIZED_PROJECTIONS)


def is_quantized(module: nn.Module) -> bool:
    """Whether a projection's weight is quantized (no dense matrix to view: weight views / head results refuse it).

    Example:
        >>> is_quantized(nn.Linear(4, 4))
        False
    """
    return type(module).__name__ in QUANTIZED_PROJECTIONS


def owns_projection(module: nn.Module) -> bool:
    """Whether one of ``module``'s direct children is a projection."""
    return any(is_projection(c) for c in module.children())


def token_table(tables: nn.Module) -> nn.Module:
    """The one token table behind a model's ``get_input_embeddings()`` / ``get_output_embeddings()``.

    Usually the module itself. Audio-code LMs keep one table per codebook in an ``nn.ModuleList`` (MusicGen: one
    embedding and one ``lm_head`` per codebook; the codebooks' embeddings are summed per position, and the heads'
    logits stacked into the batch, ``(batch * num_codebooks, seq, vocab)``). With a single codebook the input is
    plain ``(batch, seq)`` codes and the logits are that one head's: its table is the model's embedding /
    unembedding. With several, no single table pairs with the ``(batch, seq, hidden)`` residual stream: ValueError.

    Example:
        >>> token_table(nn.ModuleList([nn.Linear(4, 8)]))
        Linear(in_features=4, out_features=8, bias=True)
        >>> token_table(nn.ModuleList([nn.Linear(4, 8), nn.Linear(4, 8)]))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: 2 token tables (one per audio codebook, an nn.ModuleList): ...
    """
    if not isinstance(tables, nn.ModuleList):
        return tables
    if len(tables) == 1:
        return tables[0]
    k = len(tables)
    raise ValueError(
        f"{k} token tables (one per audio codebook, an nn.ModuleList): the model reads (batch * {k}, seq) codes, sums "
        f"the {k} embeddings per position and stacks the {k} heads' logits into the batch, so no single embedding / "
        "unembedding pairs with the (batch, seq, hidden) residual stream; unilens serves a one-codebook model only "
        "(config num_codebooks=1)."
    )


# Output projection names, tried in order before falling back to "the last Linear/Conv1D child".
_OUTPUT_PROJECTION_NAMES = ("o_proj", "out_proj", "c_proj", "dense", "wo", "o")
# Children that project the layer INPUT to queries / keys / values; never taken as the output projection by the
# fallback (BERT's self-attention owns only query / key / value: its output dense lives in a sibling module;
# JetMoE's queries and output come from its mixture of attention experts, its only Linear child is kv_proj).
# Inkling 2's sink_proj maps the layer input to one sink logit per head and query: an input projection too.
_INPUT_PROJECTION = re.compile(
    r"^(w?q|w?k|w?v|qk|kv|qkv|wqkv|query|key|value|query_key|query_key_value|c_attn|in_proj|project_[qkv]|sink)"
    r"(_|$)",
    re.IGNORECASE,
)


@memoize
def _class_source(cls: type) -> str:
    """The source of the functions a class (and its bases up to nn.Module) defines, concatenated.

    Read function by function (each from its code object's first line): ``inspect.getsource(cls)`` parses the whole
    modeling file to find the class, ~90 ms per class, which made loading a model noticeably slower.
    """
    parts = []
    for klass in cls.__mro__:
        if klass in (nn.Module, object):
            break
        for value in vars(klass).values():
            fn = value.__func__ if isinstance(value, (staticmethod, classmethod)) else value
            if inspect.isfunction(fn):
                try:
                    parts.append(inspect.getsource(fn))
                except (OSError, TypeError):
                    pass
    return "\n".join(parts)


def uses_attention_interface(module: nn.Module) -> bool:
    src = _class_source(type(module))
    return "ALL_ATTENTION_FUNCTIONS" in src or "attention_interface" in src


# What the source of a softmax-attention class (or of a function it calls) mentions, lower-cased.
_SOFTMAX_ATTENTION_MARKERS = ("softmax", "all_attention_functions", "attention_interface", "scaled_dot_product")


@memoize
def _computes_softmax_attention_for(cls: type) -> bool:
    src = _class_source(cls)
    if not src:
        return True  # no source to read (compiled / dynamic class): do not guess it away
    if any(marker in src.lower() for marker in _SOFTMAX_ATTENTION_MARKERS):
        return True
    # one level down: module-level functions the class calls (e.g. `attention_fn(self, q, k, v)`)
    namespace = vars(sys.modules[cls.__module__]) if cls.__module__ in sys.modules else {}
    for name in set(re.findall(r"\b([A-Za-z_]\w*)\(", src)):
        fn = namespace.get(name)
        if inspect.isfunction(fn):
            try:
                if any(marker in inspect.getsource(fn).lower() for marker in _SOFTMAX_ATTENTION_MARKERS):
                    return True
            except (OSError, TypeError):
                return True
    return False


def computes_softmax_attention(module: nn.Module) -> bool:
    """Whether an "Attention" module computes a softmax over keys, i.e. has an attention probability matrix.

    False for linear / delta-rule / recurrent mixers that are named attention (Kimi-Linear's and Bailing's delta
    attention, MiniMax's lightning attention, RWKV): their source (and that of the module-level functions they call)
    mentions no softmax, attention interface or scaled_dot_product_attention. Discovery uses it to leave such layers
    out of the attention layers, as for Mamba-style mixers.

    Example:
        >>> from transformers import AutoConfig, AutoModelForCausalLM
        >>> cfg = AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        ...     num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
        >>> computes_softmax_attention(AutoModelForCausalLM.from_config(cfg).model.layers[0].self_attn)
        True
    """
    return _computes_softmax_attention_for(type(module))


def find_output_projection(attn_module: nn.Module) -> tuple[str, nn.Module]:
    """Find the projection fed by z (per-head outputs) inside an attention module.

    Tries the conventional names (`o_proj`, `out_proj`, `c_proj`, `dense`, `wo`, `o`), then the last direct
    Linear / Conv1D child that is not an input (query / key / value) projection. Raises ValueError when there is
    none (BERT-style self-attention, whose output dense lives in a sibling module).

    Example:
        >>> from transformers import AutoConfig, AutoModelForCausalLM
        >>> cfg = AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        ...     num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
        >>> find_output_projection(AutoModelForCausalLM.from_config(cfg).model.layers[0].self_attn)[0]
        'o_proj'
    """
    children = dict(attn_module.named_children())
    for name in _OUTPUT_PROJECTION_NAMES:
        if is_projection(children.get(name, nn.Identity())):
            return name, children[name]
    for name in _OUTPUT_PROJECTION_NAMES:
        # A conventionally named module that is not itself linear (Inkling 2's o_proj gates z with a sigmoid of the
        # layer input before its Linear): its first input is still z, so heads can be read there; head_results
        # and W_O need a linear map of z and are refused for it (`is_projection`).
        if isinstance(children.get(name), nn.Module) and any(
            is_projection(m) for m in children[name].modules()
        ):
            return name, children[name]
    linears = [
        (n, m) for n, m in children.items() if is_projection(m) and not _INPUT_PROJECTION.match(n)
    ]
    if not linears:
        raise ValueError(
            f"{type(attn_module).__name__} has no Linear/Conv1D child to use as output projection (children: "
            f"{list(children)}); heads / head_results hook points are unavailable for it."
        )
    return linears[-1]




def kv_source_layer(attention_modules: list[nn.Module | None], layer: int) -> int | None:
    """The layer whose keys and values layer ``layer``'s attention attends to, when it reuses another layer's (KV
    sharing: Gemma 3n / Gemma 4's last layers, Kolibri 1.1's indexed layers); None when it computes its own.

    Such a layer has no key / value projections: its keys and values (the ``attention_keys`` / ``attention_values``
    hook points) are those the source layer stored, and its ``W_K`` / ``W_V`` are the source layer's. Read from the
    modules: ``is_kv_shared_layer`` marks a reusing layer; the source is its ``kv_source_layer`` (Kolibri) or else the
    last earlier layer of the same ``layer_type`` that stores its keys and values (``store_full_length_kv``, Gemma).
    ``-1`` when a layer reuses keys and values but the source cannot be found.

    Example:
        >>> from types import SimpleNamespace as NS
        >>> mods = [NS(is_kv_shared_layer=False, store_full_length_kv=True, layer_type="full"),
        ...         NS(is_kv_shared_layer=True, layer_type="full")]
        >>> kv_source_layer(mods, 0), kv_source_layer(mods, 1)
        (None, 0)
    """
    module = attention_modules[layer]
    if module is None or getattr(module, "is_kv_shared_layer", False) is not True:
        return None
    source = getattr(module, "kv_source_layer", None)
    if isinstance(source, int) and not isinstance(source, bool) and source != layer:
        return source
    kind = getattr(module, "layer_type", None)
    for j in range(layer - 1, -1, -1):
        other = attention_modules[j]
        if other is not None and getattr(other, "store_full_length_kv", False) is True and (
            getattr(other, "layer_type", None) == kind
        ):
            return j
    return -1
