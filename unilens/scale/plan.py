"""Planning an activation-store run: the texts tokenized once (`_Tokens`), cut into shards whose boundaries depend only
on the inputs and arguments (`_plan_shards`), and each shard's texts sorted by length into batches (`_batches`)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Iterator, Literal, Sequence

import numpy as np

from .store_format import CacheError


@dataclass
class _Tokens:
    """The units the model runs, one forward row each: the kept texts, or (packed stores) the contexts.

    A unit's tokens all run through the model; those with ``keep`` set get a row of the store (every token when
    ``keep`` is None), so a unit's rows are ``row_offsets[k] .. row_offsets[k + 1]``."""

    ids: np.ndarray  # (total_tokens,) int64, units concatenated in order
    offsets: np.ndarray  # (n_units + 1,) start of each unit in `ids`
    text_index: np.ndarray  # (n_units,) original index of each kept text; packed: the context index
    skipped: list[int]
    truncated: int
    keep: np.ndarray | None = None  # (total_tokens,) bool: the tokens that get a row (packed stores dropping sinks)
    packing: dict[str, Any] | None = None  # packed stores: what `_pack` did (the manifest's "packing")

    def __post_init__(self) -> None:
        if self.keep is None:
            self.row_offsets = self.offsets
        else:
            rows = np.concatenate([[0], np.cumsum(self.keep, dtype=np.int64)])
            self.row_offsets = rows[self.offsets].astype(np.int64)

    def of(self, k: int) -> np.ndarray:
        return self.ids[self.offsets[k] : self.offsets[k + 1]]

    def length(self, k: int) -> int:
        return int(self.offsets[k + 1] - self.offsets[k])

    def rows(self, k: int) -> int:
        """Store rows of unit ``k`` (its length unless sink rows are dropped)."""
        return int(self.row_offsets[k + 1] - self.row_offsets[k])

    def kept_positions(self, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        """``(token_ids, position)`` of the rows of units ``a..b-1``: the tokens that get a row and their position
        in their unit (text or context)."""
        lengths = np.diff(self.offsets[a : b + 1])
        ids = self.ids[self.offsets[a] : self.offsets[b]]
        position = np.concatenate([np.arange(n) for n in lengths]).astype(np.int64) if len(lengths) else ids[:0]
        if self.keep is None:
            return ids, position
        keep = self.keep[self.offsets[a] : self.offsets[b]]
        return ids[keep], position[keep]

    def sha256(self) -> str:
        h = hashlib.sha256(self.ids.astype("<i8").tobytes())
        h.update(self.offsets.astype("<i8").tobytes())
        h.update(self.text_index.astype("<i8").tobytes())
        if self.keep is not None:
            h.update(self.keep.astype(np.uint8).tobytes())
        return h.hexdigest()


def _encoded_rows(tokenizer: Any, texts: Sequence[str], add_special_tokens: bool,
                  chunk: int = 1024) -> Iterator[tuple[int, list[int] | None]]:
    """(index, token ids) of every text, tokenized ``chunk`` texts per call; None for an empty text."""
    for start in range(0, len(texts), chunk):
        part = list(texts[start : start + chunk])
        for j, text in enumerate(part):
            if not isinstance(text, str):
                raise CacheError(f"texts[{start + j}] is a {type(text).__name__}, not a str; pass a list of strings.")
        nonempty = [j for j, text in enumerate(part) if text != ""]
        encoded = tokenizer([part[j] for j in nonempty], add_special_tokens=add_special_tokens)["input_ids"] \
            if nonempty else []
        by_j = dict(zip(nonempty, encoded))
        for j in range(len(part)):
            yield start + j, by_j.get(j)


def _tokenize(tokenizer: Any, texts: Sequence[str], max_length: int | None, chunk: int = 1024) -> _Tokens:
    ids: list[np.ndarray] = []
    kept: list[int] = []
    skipped: list[int] = []
    truncated = 0
    for index, row in _encoded_rows(tokenizer, texts, add_special_tokens=True, chunk=chunk):
        if not row:
            skipped.append(index)
            continue
        if max_length is not None and len(row) > max_length:
            row, truncated = row[:max_length], truncated + 1
        ids.append(np.asarray(row, dtype=np.int64))
        kept.append(index)
    lengths = np.array([len(r) for r in ids], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    flat = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
    return _Tokens(flat, offsets, np.asarray(kept, dtype=np.int64), skipped, truncated)


def _special_token_id(tokenizer: Any, token: "int | Literal['bos', 'eos', 'sep'] | None") -> int | None:
    """``"bos"`` / ``"eos"`` / ``"sep"`` -> the tokenizer's id of that token (None where it has none); an int as is."""
    if token is None or (isinstance(token, int) and not isinstance(token, bool)):
        return token
    if token not in ("bos", "eos", "sep"):
        raise CacheError(f"separator must be 'bos', 'eos', 'sep', a token id or None, got {token!r}.")
    value = getattr(tokenizer, f"{token}_token_id", None)
    return value if isinstance(value, int) else None


def _pack(
    tokenizer: Any,
    texts: Sequence[str],
    context_size: int,
    prepend_bos: bool = True,
    separator: "int | Literal['bos', 'eos', 'sep'] | None" = "bos",
    exclude_sinks: bool = False,
    chunk: int = 1024,
) -> _Tokens:
    """The texts packed into contexts of exactly ``context_size`` tokens, SAELens's way (its
    ``concat_and_batch_sequences``, used by ``ActivationsStore`` / ``CacheActivationsRunner``); the units of the
    returned `_Tokens` are the contexts.

    Each text is tokenized without special tokens and its tokens are appended to the open context, in text order:
    a new context starts with the BOS token (``prepend_bos``; not added where the text's next token is BOS itself),
    a text that continues an open context is preceded by ``separator`` (not added where the text starts with it).
    A text longer than the room left runs on into the next context (which starts with BOS, and no separator); a
    separator that fills the last slot ends its context and the text starts the next one. The last context, unless
    full, is dropped (its text tokens are counted in ``packing["dropped_tokens"]``). ``exclude_sinks``: the rows
    of each context's first token and of every separator packing inserted get no store row (they still run)."""
    bos = getattr(tokenizer, "bos_token_id", None) if prepend_bos else None
    bos = bos if isinstance(bos, int) else None
    sep = _special_token_id(tokenizer, separator)
    if context_size < 1 + (bos is not None):
        raise CacheError(f"context_size must be at least {1 + (bos is not None)} (a BOS and one token), "
                         f"got {context_size}.")  # fmt: skip
    contexts: list[np.ndarray] = []  # (context_size,) token ids of each full context
    inserted: list[np.ndarray] = []  # (context_size,) bool: the BOS / separators packing inserted
    parts: list[np.ndarray] = []  # the open context, in pieces
    marks: list[np.ndarray] = []
    filled, is_open = 0, False
    skipped: list[int] = []
    for index, row in _encoded_rows(tokenizer, texts, add_special_tokens=False, chunk=chunk):
        if not row:
            skipped.append(index)
            continue
        tokens = np.asarray(row, dtype=np.int64)
        offset = 0
        while offset < len(tokens):
            # a new context opens with BOS; a text joining an open context is preceded by the separator
            special = sep if is_open else bos
            prefix = [special] if special is not None and int(tokens[offset]) != special else []
            prefix = prefix[: context_size - filled]
            take = min(context_size - filled - len(prefix), len(tokens) - offset)
            piece = np.concatenate([np.asarray(prefix, dtype=np.int64), tokens[offset : offset + take]])
            mark = np.zeros(len(piece), dtype=bool)
            mark[: len(prefix)] = True
            parts.append(piece)
            marks.append(mark)
            filled, offset, is_open = filled + len(piece), offset + take, True
            if filled == context_size:
                contexts.append(np.concatenate(parts))
                inserted.append(np.concatenate(marks))
                parts, marks, filled, is_open = [], [], 0, False
    dropped = int(sum(int((~m).sum()) for m in marks))  # text tokens of the last, unfilled context
    n = len(contexts)
    ids = np.concatenate(contexts) if n else np.zeros(0, dtype=np.int64)
    sink = np.concatenate(inserted) if n else np.zeros(0, dtype=bool)
    sink[::context_size] = True  # a context's first token is an attention sink, whatever it is
    packing = {
        "context_size": context_size,
        "prepend_bos": bool(prepend_bos),
        "bos_token_id": bos,
        "separator_token_id": sep,
        "exclude_sinks": bool(exclude_sinks),
        "num_contexts": n,
        "dropped_tokens": dropped,
    }
    return _Tokens(ids, np.arange(n + 1, dtype=np.int64) * context_size, np.arange(n, dtype=np.int64), skipped, 0,
                   keep=~sink if exclude_sinks else None, packing=packing)  # fmt: skip


def _plan_shards(tokens: _Tokens, shard_tokens: int) -> list[tuple[int, int]]:
    """Contiguous ranges of units (kept texts, or contexts) ``[a, b)``, each closed once it holds >= ``shard_tokens``
    rows."""
    plan, start, count = [], 0, 0
    n = len(tokens.text_index)
    for k in range(n):
        count += tokens.rows(k)
        if count >= shard_tokens:
            plan.append((start, k + 1))
            start, count = k + 1, 0
    if start < n:
        plan.append((start, n))
    return plan


def _batches(tokens: _Tokens, a: int, b: int, batch_size: int) -> list[list[int]]:
    """Kept texts ``a..b-1`` sorted by length (longest first, ties by index), cut into batches."""
    order = sorted(range(a, b), key=lambda k: (-tokens.length(k), k))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _pad_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return 0
