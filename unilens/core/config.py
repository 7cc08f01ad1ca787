"""Reading facts from a HuggingFace config (text sub-config included): one reader, one key order per fact."""

from __future__ import annotations

from typing import Any


# Config attributes holding the number of positions a model was built for, in order of preference.
_CONTEXT_ATTRIBUTES = ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "seq_length")


def context_length(config: Any) -> int | None:
    """The model's context in tokens from its config (text sub-config included), or None when it names none.

    Example:
        >>> from transformers import AutoConfig
        >>> context_length(AutoConfig.for_model("gpt2", n_positions=64))
        64
    """
    for cfg in (getattr(config, "text_config", None), config):
        for name in _CONTEXT_ATTRIBUTES:
            value = getattr(cfg, name, None) if cfg is not None else None
            if isinstance(value, int) and value > 0:
                return value
    return None


