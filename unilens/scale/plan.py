"""Planning an activation-store run: the texts tokenized once (`_Tokens`), cut into shards whose boundaries depend only
on the inputs and arguments (`_plan_shards`), and each shard's texts sorted by length into batches (`_batches`)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .store_format import CacheError


@dataclass
class _Tokens:
    ids: np.ndarray  # (total_tokens,) int64, kept texts concatenated in text order
    offsets: np.ndarray  # (n_kept + 1,) start of each kept text in `ids`
    text_index: np.ndarray  # (n_kept,) original index of each kept text
    skipped: list[int]
    truncated: int

    def of(self, k: int) -> np.ndarray:
        return self.ids[self.offsets[k] : self.offsets[k + 1]]

    def length(self, k: int) -> int:
        return int(self.offsets[k + 1] - self.offsets[k])

    def sha256(self) -> str:
        h = hashlib.sha256(self.ids.astype("<i8").tobytes())
        h.update(self.offsets.astype("<i8").tobytes())
        h.update(self.text_index.astype("<i8").tobytes())
        return h.hexdigest()


def _tokenize(tokenizer: Any, texts: Sequence[str], max_length: int | None, chunk: int = 1024) -> _Tokens:
    ids: list[np.ndarray] = []
    kept: list[int] = []
    skipped: list[int] = []
    truncated = 0
    for start in range(0, len(texts), chunk):
        part = list(texts[start : start + chunk])
        for j, text in enumerate(part):
            if not isinstance(text, str):
                raise CacheError(f"texts[{start + j}] is a {type(text).__name__}, not a str; pass a list of strings.")
        nonempty = [j for j, text in enumerate(part) if text != ""]
        encoded = tokenizer([part[j] for j in nonempty], add_special_tokens=True)["input_ids"] if nonempty else []
        by_j = dict(zip(nonempty, encoded))
        for j in range(len(part)):
            row = by_j.get(j)
            if not row:
                skipped.append(start + j)
                continue
            if max_length is not None and len(row) > max_length:
                row, truncated = row[:max_length], truncated + 1
            ids.append(np.asarray(row, dtype=np.int64))
            kept.append(start + j)
    lengths = np.array([len(r) for r in ids], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    flat = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
    return _Tokens(flat, offsets, np.asarray(kept, dtype=np.int64), skipped, truncated)


def _plan_shards(tokens: _Tokens, shard_tokens: int) -> list[tuple[int, int]]:
    """Contiguous ranges of kept texts ``[a, b)``, each closed once it holds >= ``shard_tokens`` rows."""
    plan, start, count = [], 0, 0
    n = len(tokens.text_index)
    for k in range(n):
        count += tokens.length(k)
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
