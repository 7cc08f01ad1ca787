"""Reading an activation store written by `unilens.scale.writer.cache_activations`: the whole store or one shard at
a time (`ActivationStore`), rows as a torch ``Dataset`` (`ActivationDataset`), and checksum verification."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from .store_format import (
    _CHECKSUM,
    _DTYPES,
    _LEGACY_CHECKSUMS,
    _META_NAMES,
    FORMAT,
    MANIFEST,
    CacheCorruptError,
    CacheError,
    _checksum,
    _file_text_digest,
)

__all__ = ["ActivationStore", "ActivationDataset"]


class ActivationStore:
    """Read an activation store written by ``cache_activations``.

    ``store[name]`` is ``(tokens, *row)`` over all shards (also ``"token_ids"``, ``"text_index"``,
    ``"position"``); ``store.shard(k)`` / ``store.iter_shards()`` read one shard at a time;
    ``store.dataset()`` is a torch ``Dataset`` of rows; ``store.verify()`` checks every shard's checksum.

    Example:
        >>> import tempfile
        >>> from unilens import StandardizedTransformer
        >>> from unilens.scale.store import cache_activations
        >>> from unilens.testing import tiny_model
        >>> out = tempfile.mkdtemp()
        >>> _ = cache_activations(StandardizedTransformer(*tiny_model("gpt2")), ["The cat sat", "Hello"],
        ...                       ["layers_output.0"], out, progress=False)
        >>> store = ActivationStore(out)
        >>> resid = store["layers_output.0"]            # (tokens, hidden)
        >>> first_text = resid[store["text_index"] == 0]
        >>> first_text.shape[0] == int((store["position"][store["text_index"] == 0] >= 0).sum())
        True
    """

    def __init__(self, out_dir: str | os.PathLike, allow_incomplete: bool = False):
        self.path = Path(out_dir)
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{self.path} holds no {MANIFEST}: it is not an activation store.")
        self.manifest: dict[str, Any] = json.loads(manifest_path.read_text())
        if self.manifest.get("format") != FORMAT:
            raise CacheError(f"{manifest_path} is not a unilens activation-store manifest.")
        if not self.manifest["complete"] and not allow_incomplete:
            raise CacheError(
                f"the store in {self.path} is incomplete ({len(self.manifest['shards'])} of "
                f"{self.manifest['num_shards']} shards): run cache_activations again with the same arguments to "
                "finish it, or pass allow_incomplete=True to read the complete shards."
            )

    @property
    def names(self) -> list[str]:
        return list(self.manifest["names"])

    @property
    def shards(self) -> list[dict[str, Any]]:
        return list(self.manifest["shards"])

    def __len__(self) -> int:
        """Number of stored rows (real tokens)."""
        return sum(e["rows"][1] - e["rows"][0] for e in self.manifest["shards"])

    def _check_name(self, name: str) -> None:
        if name not in self.manifest["names"] and name not in _META_NAMES:
            raise KeyError(f"{name!r} is not in this store; it holds {self.names} and {list(_META_NAMES)}.")

    def shard(self, k: int, names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Tensors of shard ``k`` (all names + metadata, or only ``names``)."""
        entry = self.manifest["shards"][k]
        path = self.path / entry["file"]
        if names is None:
            return load_file(path)
        for name in names:
            self._check_name(name)
        with safe_open(path, framework="pt") as f:
            return {name: f.get_tensor(name) for name in names}

    def iter_shards(self, names: Sequence[str] | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """One dict of tensors per shard, in row order (memory: one shard)."""
        for k in range(len(self.manifest["shards"])):
            yield self.shard(k, names)

    def __getitem__(self, name: str) -> torch.Tensor:
        if not isinstance(name, str):
            raise TypeError("store[name] takes a name like 'layers_output.3'; use store.dataset()[i] for row i.")
        self._check_name(name)
        parts = [shard[name] for shard in self.iter_shards([name])]
        if parts:
            return torch.cat(parts)
        if name in _META_NAMES:
            return torch.zeros(0, dtype=torch.int64)
        spec = self.manifest["rows"][name]
        return torch.zeros((0, *spec["shape"]), dtype=_DTYPES[spec["dtype"]])

    def dataset(self, names: Sequence[str] | None = None) -> "ActivationDataset":
        """A torch ``Dataset`` over rows: ``{name: row, "token_ids": id, "text_index": i, "position": p}``."""
        return ActivationDataset(self, names)

    def verify(self) -> None:
        """Recompute every shard's checksum from its file (``xxh3_128_texts``; the whole-file xxh3_128 or sha256
        of stores written by format versions 2 and 1); raise ``CacheCorruptError`` naming the first bad or missing
        shard."""
        for entry in self.manifest["shards"]:
            path = self.path / entry["file"]
            if not path.is_file():
                raise CacheCorruptError(f"shard {entry['file']} is missing from {self.path}.")
            algorithm = next((key for key in (_CHECKSUM, *_LEGACY_CHECKSUMS) if key in entry), None)
            if algorithm is None:
                raise CacheCorruptError(f"the manifest entry of shard {entry['file']} in {self.path} has no checksum.")
            with open(path, "rb") as f:
                try:
                    digest = _file_text_digest(f) if algorithm == _CHECKSUM else _checksum(algorithm, f)
                except (ValueError, KeyError, TypeError) as err:  # not laid out as a shard
                    digest = f"unreadable ({type(err).__name__}: {err})"
            if digest != entry[algorithm]:
                raise CacheCorruptError(
                    f"shard {entry['file']} in {self.path} is corrupt: {algorithm} {digest} differs from the "
                    f"manifest's {entry[algorithm]}. Delete it and the store's manifest entry, or recompute the store."
                )

    def __repr__(self) -> str:
        m = self.manifest
        return (
            f"ActivationStore({self.path}: {m['model']['model_type']}, {len(self)} tokens from "
            f"{m['inputs']['num_cached_texts']} texts, {len(m['names'])} names, {len(m['shards'])} shards)"
        )


class ActivationDataset(torch.utils.data.Dataset):
    """Rows of an ``ActivationStore`` as a map-style torch ``Dataset`` (keeps the last shard it read in memory).

    Example:
        >>> import tempfile
        >>> from unilens import StandardizedTransformer
        >>> from unilens.scale.store import cache_activations
        >>> from unilens.testing import tiny_model
        >>> out = tempfile.mkdtemp()
        >>> _ = cache_activations(StandardizedTransformer(*tiny_model("gpt2")), ["The cat sat", "Hello"],
        ...                       ["layers_output.0"], out, progress=False)
        >>> ds = ActivationStore(out).dataset(["layers_output.0"])
        >>> row = ds[0]; int(row["text_index"]), int(row["position"])
        (0, 0)
    """

    def __init__(self, store: ActivationStore, names: Sequence[str] | None = None):
        self.store = store
        self.names = list(store.names if names is None else names)
        for name in self.names:
            store._check_name(name)
        self._starts = [e["rows"][0] for e in store.manifest["shards"]]
        self._len = len(store)
        self._cached: tuple[int, dict[str, torch.Tensor]] | None = None

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not -self._len <= i < self._len:
            raise IndexError(f"row {i} out of range: the store holds {self._len} rows.")
        i %= self._len
        k = int(np.searchsorted(self._starts, i, side="right")) - 1
        if self._cached is None or self._cached[0] != k:
            self._cached = (k, self.store.shard(k, [*self.names, *_META_NAMES]))
        tensors = self._cached[1]
        j = i - self._starts[k]
        return {name: tensors[name][j] for name in tensors}
