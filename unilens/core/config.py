"""Reading facts from a HuggingFace config (text sub-config included): one reader, one key order per fact.

Every place that reads a model's head counts, head size, hidden size, vocabulary size or context length from a config
(the model's facts, the weight views, the attention hooks, nnterp's ``get_*`` helpers) reads it here, through the key
tables below. Each table is tried in order and the first key set (not None) wins; ``text_config`` picks the language
model's config of a multimodal one first. No config of transformers 5.24 sets two keys of one table to different
values, so the order only decides which name is read, never which number.

Example:
    >>> from transformers import AutoConfig
    >>> cfg = AutoConfig.for_model("gpt2", n_embd=32, n_head=4, n_layer=1, vocab_size=64)
    >>> num_attention_heads(cfg), hidden_size(cfg), vocab_size(cfg), num_kv_heads(cfg), head_dim(cfg)
    (4, 32, 64, None, None)
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "CHUNK_KEYS",
    "CONTEXT_KEYS",
    "HEAD_DIM_KEYS",
    "HIDDEN_SIZE_KEYS",
    "KV_HEADS_KEYS",
    "NORM_EPS_KEYS",
    "NUM_HEADS_KEYS",
    "VOCAB_SIZE_KEYS",
    "config_value",
    "context_length",
    "head_dim",
    "heads_attribute",
    "hidden_size",
    "num_attention_heads",
    "num_kv_heads",
    "text_config",
    "vocab_size",
]

# --- the key tables: config attribute names holding one fact, in the order they are tried -----------------------
# query heads (also the attribute names attention modules keep them under, see ``heads_attribute``)
NUM_HEADS_KEYS: tuple[str, ...] = ("num_attention_heads", "n_head", "num_heads", "n_heads")
# key / value heads (grouped-query attention); a config with none of them and ``multi_query`` set has one
KV_HEADS_KEYS: tuple[str, ...] = ("num_key_value_heads", "num_kv_heads", "n_head_kv", "multi_query_group_num")
# the size of one head, where the config states it (it is not always hidden_size // heads: Gemma, Qwen3)
HEAD_DIM_KEYS: tuple[str, ...] = ("head_dim",)
HIDDEN_SIZE_KEYS: tuple[str, ...] = ("hidden_size", "d_model", "n_embd")
VOCAB_SIZE_KEYS: tuple[str, ...] = ("vocab_size", "n_vocab")
# the number of positions a model was built for
CONTEXT_KEYS: tuple[str, ...] = ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "seq_length")
# the longest input a model runs in one piece: longer ones go through every layer once per chunk (xLSTM's inference
# mode, when hidden states are not requested), so a layer's .output would hold only the first chunk
CHUNK_KEYS: tuple[str, ...] = ("max_inference_chunksize",)
# a norm's epsilon, on the norm module or in the config (``unilens.hooks.points`` tries each value found)
NORM_EPS_KEYS: tuple[str, ...] = ("eps", "variance_epsilon", "epsilon", "rms_norm_eps", "layer_norm_eps",
                                  "layer_norm_epsilon", "norm_eps")


def text_config(config: Any) -> Any:
    """The language model's config: transformers' ``get_text_config()`` (the ``text_config`` / ``decoder`` sub-config
    of a composite model, the config itself otherwise), else the ``text_config`` attribute, else ``config``.

    Example:
        >>> from transformers import AutoConfig
        >>> cfg = AutoConfig.for_model("llama")
        >>> text_config(cfg) is cfg
        True
        >>> type(text_config(AutoConfig.for_model("llava"))).__name__
        'LlamaConfig'
    """
    get = getattr(config, "get_text_config", None)
    if callable(get):
        try:
            return get()
        except ValueError:  # several text sub-configs (MusicGen): ambiguous for transformers, take `text_config`
            pass
    sub = getattr(config, "text_config", None)
    return sub if sub is not None else config


def config_value(config: Any, *keys: str) -> Any:
    """The value of the first of ``keys`` set (not None) in ``text_config(config)``; None when none is.

    Example:
        >>> from transformers import AutoConfig
        >>> config_value(AutoConfig.for_model("gpt2", n_head=4), "nope", *NUM_HEADS_KEYS)
        4
    """
    cfg = text_config(config)
    for key in keys:
        value = getattr(cfg, key, None)
        if value is not None:
            return value
    return None


def num_attention_heads(config: Any) -> Any:
    """The number of query heads (``NUM_HEADS_KEYS``), None when the config names none.

    Example:
        >>> from transformers import AutoConfig
        >>> num_attention_heads(AutoConfig.for_model("gpt2", n_head=4))
        4
    """
    return config_value(config, *NUM_HEADS_KEYS)


def num_kv_heads(config: Any) -> int | None:
    """The number of key / value heads (``KV_HEADS_KEYS``); 1 for a ``multi_query`` config without one (Falcon-7B,
    GPT-BigCode); None when the config states neither: every query head has its own (use the query heads).

    Example:
        >>> from transformers import AutoConfig
        >>> num_kv_heads(AutoConfig.for_model("llama", num_attention_heads=4, num_key_value_heads=2))
        2
        >>> num_kv_heads(AutoConfig.for_model("gpt_bigcode", multi_query=True))
        1
    """
    value = config_value(config, *KV_HEADS_KEYS)
    if value is None and config_value(config, "multi_query"):
        return 1
    return int(value) if value is not None else None


def head_dim(config: Any) -> int | None:
    """The size of one head where the config states it (``HEAD_DIM_KEYS``, non-zero); None otherwise: then it is
    the hidden size over the query heads.

    Example:
        >>> from transformers import AutoConfig
        >>> head_dim(AutoConfig.for_model("llama", hidden_size=32, num_attention_heads=4, head_dim=16))
        16
    """
    value = config_value(config, *HEAD_DIM_KEYS)
    return int(value) if value else None


def hidden_size(config: Any) -> Any:
    """The hidden size (``HIDDEN_SIZE_KEYS``), None when the config names none.

    Example:
        >>> from transformers import AutoConfig
        >>> hidden_size(AutoConfig.for_model("gpt2", n_embd=32))
        32
    """
    return config_value(config, *HIDDEN_SIZE_KEYS)


def vocab_size(config: Any) -> Any:
    """The vocabulary size (``VOCAB_SIZE_KEYS``), None when the config names none.

    Example:
        >>> from transformers import AutoConfig
        >>> vocab_size(AutoConfig.for_model("gpt2", vocab_size=64))
        64
    """
    return config_value(config, *VOCAB_SIZE_KEYS)


def context_length(config: Any) -> int | None:
    """The model's context in tokens (``CONTEXT_KEYS``, a positive int; the text sub-config first, then the config
    itself), or None when it names none.

    Example:
        >>> from transformers import AutoConfig
        >>> context_length(AutoConfig.for_model("gpt2", n_positions=64))
        64
    """
    for cfg in (text_config(config), config):
        for name in CONTEXT_KEYS:
            value = getattr(cfg, name, None) if cfg is not None else None
            if isinstance(value, int) and value > 0:
                return value
    return None


def heads_attribute(obj: Any) -> int | None:
    """The first positive int among ``NUM_HEADS_KEYS`` on ``obj`` itself: an attention module's own head count
    (``self.num_heads`` of GPT-2, BART, Falcon ...) or a config's, without looking into sub-configs.

    Example:
        >>> from torch import nn
        >>> attn = nn.Module(); attn.num_heads = 4
        >>> heads_attribute(attn), heads_attribute(nn.Module())
        (4, None)
    """
    for key in NUM_HEADS_KEYS:
        value = getattr(obj, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
