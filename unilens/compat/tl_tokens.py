"""TransformerLens's tokenization: ``to_tokens`` (BOS prepended by default, the text's own tokens, right padding),
``to_string``, ``to_str_tokens``, ``to_single_token``, and the inputs ``run_with_cache`` / ``run_with_hooks`` hand to
the trace.

Example:
    >>> from unilens import StandardizedTransformer
    >>> from unilens.testing import tiny_model
    >>> model = StandardizedTransformer(*tiny_model("llama"), check=False)
    >>> ids = to_tokens(model, ["Hello world", "Hi"])  # (batch, pos): BOS first, right padding
    >>> ids.shape[0], bool((ids[:, 0] == model.tokenizer.bos_token_id).all())
    (2, True)
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..core.config import context_length
from ..core.protocol import StandardizedModel

__all__ = ["NO_DEFAULT_BOS", "default_prepend_bos", "to_single_token", "to_str_tokens", "to_string", "to_tokens"]


def _tokenizer(model: "StandardizedModel"):
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise ValueError("this model has no tokenizer: pass token ids, or load it with tokenizer=...")
    return tok


def _bos_id(model: "StandardizedModel") -> int:
    tok = _tokenizer(model)
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id  # TL: eos stands in for a bos
    if bos is None:
        raise ValueError("prepend_bos=True, but the tokenizer has neither a bos nor an eos token; pass "
                         "prepend_bos=False.")
    return int(bos)


# Model types whose tokenizers do not start a text with a BOS token of their own: TL 4.3's bridge adapters set
# ``cfg.default_prepend_bos = False`` for them (transformer_lens/model_bridge/supported_architectures/*.py), so
# ``to_tokens`` / a forward on text adds no BOS unless asked (``prepend_bos=True``).
NO_DEFAULT_BOS: frozenset[str] = frozenset({
    "bloom", "ernie4_5", "ernie4_5_moe", "exaone", "exaone4", "glm", "glm4_moe", "glm4v", "granite", "llada",
    "minimax_m2", "mpt", "gpt_neox", "phi", "phimoe", "qwen2", "qwen2_5_vl", "qwen3", "qwen3_moe", "qwen3_vl",
    "recurrent_gemma", "seed_oss", "smollm3", "starcoder2",
})


def default_prepend_bos(model: "StandardizedModel") -> bool:
    """Whether text gets a BOS token when ``prepend_bos`` is None: TL's bridge's default for the model type
    (``NO_DEFAULT_BOS``: no), unless set for this model (``HookedTransformer.cfg.default_prepend_bos``).

    Example:
        >>> from unilens import StandardizedTransformer
        >>> from unilens.testing import tiny_model
        >>> default_prepend_bos(StandardizedTransformer(*tiny_model("llama"), check=False))
        True
    """
    chosen = model.__dict__.get("_tl_default_prepend_bos")
    if chosen is not None:
        return bool(chosen)
    return model.architecture.model_type not in NO_DEFAULT_BOS


def _encode(model, texts: list[str], prepend_bos: bool | None, padding_side: str | None, truncate: bool
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """TL's tokenization: the text's own tokens (no special tokens), BOS prepended by hand when asked, padded on
    ``padding_side`` (TL's default: right). Returns ids and attention mask ``(batch, pos)``."""
    tok = _tokenizer(model)
    prepend = default_prepend_bos(model) if prepend_bos is None else bool(prepend_bos)
    side = padding_side or "right"
    if side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}.")
    rows = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    if prepend:
        bos = _bos_id(model)
        rows = [[bos] + r for r in rows]
    limit = context_length(model.config)
    if truncate and limit is not None:
        rows = [r[:limit] for r in rows]
    width = max(len(r) for r in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    ids = torch.full((len(rows), width), int(pad), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        sl = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[b, sl] = torch.tensor(r, dtype=torch.long)
        mask[b, sl] = 1
    return ids, mask


def to_tokens(model: "StandardizedModel", input: str | list[str], prepend_bos: bool | None = None,
              padding_side: str | None = None, move_to_device: bool = True, truncate: bool = True) -> torch.Tensor:
    """Text -> token ids ``(batch, pos)``, as TL's ``to_tokens``: BOS prepended by default (``prepend_bos=None``
    means ``default_prepend_bos(model)``: True except for the model types TL's bridge starts without one), the
    text's own tokens without the tokenizer's special tokens, right padding by default.

    Example:
        >>> from unilens import StandardizedTransformer
        >>> from unilens.testing import tiny_model
        >>> model = StandardizedTransformer(*tiny_model("llama"), check=False)
        >>> ids = to_tokens(model, "The capital of France is")
        >>> ids.shape[0], ids[0, 0].item() == model.tokenizer.bos_token_id
        (1, True)
    """
    texts = [input] if isinstance(input, str) else list(input)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise TypeError("to_tokens takes a string or a non-empty list of strings.")
    ids, _ = _encode(model, texts, prepend_bos, padding_side, truncate)
    return ids.to(model.input_device) if move_to_device else ids


def to_string(model: "StandardizedModel", tokens: torch.Tensor | Sequence[int] | int) -> str | list[str]:
    """Token ids -> text: one string for ``(pos,)`` ids, a list for ``(batch, pos)`` (as TL's ``to_string``).

    Example:
        >>> from unilens import StandardizedTransformer
        >>> from unilens.testing import tiny_model
        >>> model = StandardizedTransformer(*tiny_model("llama"), check=False)
        >>> to_string(model, to_tokens(model, "Hello world", prepend_bos=False)[0])
        'Hello world'
    """
    tok = _tokenizer(model)
    t = torch.as_tensor(tokens)
    if t.dim() <= 1:
        return tok.decode(t.reshape(-1).tolist(), clean_up_tokenization_spaces=False)
    if t.dim() == 2:
        return [tok.decode(row.tolist(), clean_up_tokenization_spaces=False) for row in t]
    raise ValueError(f"to_string takes ids of shape (pos,) or (batch, pos), got {tuple(t.shape)}.")


def to_str_tokens(model: "StandardizedModel", input: str | list[str] | torch.Tensor | Sequence[int],
                  prepend_bos: bool | None = None, padding_side: str | None = None) -> list[str] | list[list[str]]:
    """Each token as its own string: text is tokenized as ``to_tokens`` does (BOS first by default); a list of
    texts gives one list per text (without padding), ids ``(pos,)`` / ``(batch, pos)`` are decoded one by one.

    Example:
        >>> from unilens import StandardizedTransformer
        >>> from unilens.testing import tiny_model
        >>> model = StandardizedTransformer(*tiny_model("llama"), check=False)
        >>> "".join(to_str_tokens(model, "Hello world", prepend_bos=False))
        'Hello world'
    """
    tok = _tokenizer(model)
    if isinstance(input, list) and input and all(isinstance(t, str) for t in input):
        return [to_str_tokens(model, t, prepend_bos, padding_side) for t in input]
    if isinstance(input, str):
        ids = to_tokens(model, input, prepend_bos, padding_side, move_to_device=False)[0]
    else:
        ids = torch.as_tensor(input)
        if ids.dim() == 2:
            if ids.shape[0] != 1:
                return [to_str_tokens(model, row) for row in ids]
            ids = ids[0]
    return [tok.decode([i], clean_up_tokenization_spaces=False) for i in ids.reshape(-1).tolist()]


def to_single_token(model: "StandardizedModel", string: str) -> int:
    """The id of a string that is exactly one token (TL's ``to_single_token``); an error naming the tokens otherwise.

    Example:
        >>> from unilens import StandardizedTransformer
        >>> from unilens.testing import tiny_model
        >>> model = StandardizedTransformer(*tiny_model("llama"), check=False)
        >>> isinstance(to_single_token(model, "a"), int)
        True
    """
    ids = _tokenizer(model)(string, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"{string!r} is {len(ids)} tokens ({to_str_tokens(model, ids)}), not one.")
    return int(ids[0])


def _inputs(model, input: Any, prepend_bos: bool | None, padding_side: str | None, attention_mask: Any) -> dict:
    """Text (TL tokenization), token ids or a tokenizer output -> the dict handed to the trace."""
    if isinstance(input, str) or (isinstance(input, (list, tuple)) and input and all(isinstance(t, str) for t in input)):
        ids, mask = _encode(model, [input] if isinstance(input, str) else list(input), prepend_bos, padding_side, True)
    elif isinstance(input, dict) or hasattr(input, "keys"):
        ids, mask = input["input_ids"], input.get("attention_mask")
    else:
        ids = torch.as_tensor(input)
        if ids.dim() == 1:
            ids = ids[None]
        mask = attention_mask
    batch = {"input_ids": ids.to(model.input_device)}
    if mask is not None:
        batch["attention_mask"] = torch.as_tensor(mask).to(model.input_device)
    return batch
