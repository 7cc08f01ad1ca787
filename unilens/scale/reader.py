"""Reading an activation store written by `unilens.scale.writer.cache_activations`: the whole store or one shard at
a time (`ActivationStore`), rows as a torch ``Dataset`` (`ActivationDataset`), and checksum verification.

Every read checks what it reads: the manifest when the store is opened (`unilens.scale.store_format._load_manifest`:
JSON, its own checksum, shard entries in order), and each shard the first time it is read (its checksum against the
manifest's, its rows, names and texts against its entry). A damaged file is a `CacheCorruptError` naming the file
and the repair, never a value read from it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from .shard_file import _SAFETENSORS_DTYPES
from .store_format import (
    _CHECKSUM,
    _DTYPES,
    _LEGACY_CHECKSUMS,
    _META_NAMES,
    _META_SHARD,
    _META_STORE,
    CacheCorruptError,
    CacheError,
    _load_manifest,
    _run_digest,
    _shard_checksum,
    _shard_digests,
    _ShardDigests,
)

__all__ = ["ActivationStore", "ActivationDataset"]

_TORCH_DTYPES = {code: dtype for dtype, code in _SAFETENSORS_DTYPES.items()}  # "F32" -> torch.float32


def _signature(path: Path) -> tuple[int, ...]:
    """What changes when a file is replaced or rewritten: device, inode, size, modification time."""
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


class ActivationStore:
    """Read an activation store written by ``cache_activations``.

    ``store[name]`` is ``(tokens, *row)`` over all shards (also ``"token_ids"``, ``"text_index"``,
    ``"position"``); ``store.shard(k)`` / ``store.iter_shards()`` read one shard at a time;
    ``store.dataset()`` is a torch ``Dataset`` of rows; ``store.verify()`` checks every shard's checksum.

    Reads are checked: the manifest when the store is opened, each shard the first time it is read (its checksum,
    computed from the bytes read, then its rows, names and texts against its manifest entry; again if the file
    changes). A damaged or missing file raises `CacheCorruptError` (a `CacheError`) naming it and the repair.

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
        self.manifest: dict[str, Any] = _load_manifest(self.path)
        if not self.manifest["complete"] and not allow_incomplete:
            raise CacheError(
                f"the store in {self.path} is incomplete ({len(self.manifest['shards'])} of "
                f"{self.manifest['num_shards']} shards): run cache_activations again with the same arguments to "
                "finish it, or pass allow_incomplete=True to read the complete shards."
            )
        version = self.manifest["format_version"]
        self._run = _run_digest(self.manifest) if version >= 4 else None  # what its shards name (format 4)
        self._verified: dict[int, tuple[int, ...]] = {}  # shard -> its file's `_signature` when it was verified
        self._check_reads = True  # tests and the benchmark turn it off to price the checks

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

    # -- checks ------------------------------------------------------------------------------------------------

    @property
    def _repair(self) -> str:
        if self.manifest["format_version"] >= 4:
            return "run the same cache_activations call again to recompute it (the store's other shards are kept)"
        return (f"this store was written by store format {self.manifest['format_version']}, which cannot be repaired "
                "in place: recompute it with cache_activations into a new out_dir")  # fmt: skip

    def _entry(self, k: int) -> dict[str, Any]:
        shards = self.manifest["shards"]
        if not isinstance(k, int) or not -len(shards) <= k < len(shards):
            raise IndexError(f"shard {k!r} out of range: the store has {len(shards)} shards.")
        return shards[k % len(shards)]

    def _stat(self, k: int) -> tuple[int, ...]:
        """The `_signature` of shard ``k``'s file and its size checked against the manifest's."""
        entry = self._entry(k)
        path = self.path / entry["file"]
        try:
            signature = _signature(path)
        except FileNotFoundError:
            raise CacheCorruptError(f"shard {entry['file']} of the store in {self.path} is missing: "
                                    f"{self._repair}.") from None  # fmt: skip
        size = signature[2]
        if size != entry["bytes"]:
            what = (f"truncated: {size} bytes, the manifest records {entry['bytes']}" if size < entry["bytes"]
                    else f"{size - entry['bytes']} bytes more than the manifest records")  # fmt: skip
            raise CacheCorruptError(f"shard {entry['file']} in {self.path} is unreadable ({what}): {self._repair}.")
        return signature

    def _check_digests(self, k: int, algorithm: str, digest: str, digests: _ShardDigests | None) -> None:
        """Shard ``k``'s checksum ``digest`` against its entry, then what its bytes hold against the entry: its row
        count, names, range of texts and (format 4) the store and shard its metadata names."""
        entry = self._entry(k)
        if digest != entry[algorithm]:
            raise CacheCorruptError(
                f"shard {entry['file']} in {self.path} is corrupt: {algorithm} {digest} differs from the manifest's "
                f"{entry[algorithm]}; {self._repair}."
            )
        if digests is None:  # format versions 1 and 2: the whole-file digest is all there is
            return
        problem = None
        names = {name for name in digests.header if name != "__metadata__"}
        if digests.rows != entry["rows"][1] - entry["rows"][0]:
            problem = f"{digests.rows} rows, its entry {entry['rows'][1] - entry['rows'][0]}"
        elif names != {*self.manifest["names"], *_META_NAMES}:
            problem = f"names {sorted(names)}, the manifest {sorted({*self.manifest['names'], *_META_NAMES})}"
        elif not entry["texts"][0] <= digests.texts[0] < digests.texts[1] <= entry["texts"][1] and digests.rows:
            problem = f"texts {list(digests.texts)}, its entry {entry['texts']}"
        elif self._run is not None and (digests.metadata.get(_META_STORE), digests.metadata.get(_META_SHARD)) != (
                self._run, str(k)):
            problem = (f"it names store {digests.metadata.get(_META_STORE)} shard {digests.metadata.get(_META_SHARD)}"
                       f", this is store {self._run} shard {k}")  # fmt: skip
        if problem is not None:
            raise CacheCorruptError(f"shard {entry['file']} in {self.path} does not match its manifest entry "
                                    f"({problem}): {self._repair}.")  # fmt: skip

    def _algorithm(self, k: int) -> str:
        entry = self._entry(k)
        return next(key for key in (_CHECKSUM, *_LEGACY_CHECKSUMS) if isinstance(entry.get(key), str))

    def _verify_shard(self, k: int) -> None:
        """Check shard ``k``'s file from its bytes (memory mapped, hashed as read) and remember it as verified."""
        signature = self._stat(k)
        algorithm = self._algorithm(k)
        try:
            digest, digests = _shard_checksum(algorithm, self.path / self._entry(k)["file"])
        except OSError as err:
            raise CacheCorruptError(f"shard {self._entry(k)['file']} in {self.path} cannot be read ({err.strerror})"
                                    f": {self._repair}.") from None  # fmt: skip
        self._check_digests(k, algorithm, digest, digests)
        self._verified[k % len(self.manifest["shards"])] = signature

    def _read_checked(self, k: int) -> dict[str, torch.Tensor]:
        """Every tensor of shard ``k``, checked (`_check_digests`) on the very bytes the tensors are made of: the
        file mapped once (copy on write, as safetensors maps it), hashed, and each tensor a view of that mapping."""
        entry = self._entry(k)
        signature = self._stat(k)
        try:
            storage = torch.UntypedStorage.from_file(str(self.path / entry["file"]), shared=False,
                                                     nbytes=entry["bytes"])  # fmt: skip
        except (OSError, RuntimeError) as err:  # removed or truncated since it was looked at
            raise CacheCorruptError(f"shard {entry['file']} in {self.path} cannot be read ({err}): "
                                    f"{self._repair}.") from None  # fmt: skip
        buffer = torch.empty(0, dtype=torch.uint8).set_(storage)
        try:
            digests = _shard_digests(buffer.numpy())
            digest = digests.checksum
        except (ValueError, KeyError, TypeError, IndexError) as err:
            digest, digests = f"unreadable ({type(err).__name__}: {err})", None
        self._check_digests(k, _CHECKSUM, digest, digests)
        start = len(digests.head)
        out = {}
        for name, info in digests.header.items():
            if name == "__metadata__":
                continue
            a, b = info["data_offsets"]
            dtype = _TORCH_DTYPES[info["dtype"]]
            raw = buffer[start + a : start + b]
            if (start + a) % dtype.itemsize:  # safetensors lays the widest dtypes first: aligned, but never trust it
                raw = raw.clone()
            out[name] = raw.view(dtype).view(info["shape"])
        self._verified[k % len(self.manifest["shards"])] = signature
        return out

    def _checked(self, k: int) -> bool:
        """Whether shard ``k`` was verified and its file has not changed since."""
        return not self._check_reads or self._verified.get(k % len(self.manifest["shards"])) == self._stat(k)

    # -- reads -------------------------------------------------------------------------------------------------

    def shard(self, k: int, names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Tensors of shard ``k`` (all names + metadata, or only ``names``), checked the first time it is read."""
        entry = self._entry(k)
        path = self.path / entry["file"]
        if names is not None:
            for name in names:
                self._check_name(name)
        if not self._checked(k):
            if self._algorithm(k) == _CHECKSUM:  # one mapping of the file, hashed, its tensors views of it
                tensors = self._read_checked(k)
                # some names: copies (a view would keep the whole shard mapped for a part of it)
                return tensors if names is None else {name: tensors[name].clone() for name in names}
            self._verify_shard(k)  # format 1-2: the whole-file digest, then safetensors reads
        try:
            if names is None:
                return load_file(path)
            with safe_open(path, framework="pt") as f:
                return {name: f.get_tensor(name) for name in names}
        except (SafetensorError, OSError) as err:  # replaced since it was checked
            raise CacheCorruptError(f"shard {entry['file']} in {self.path} is unreadable ({err}): "
                                    f"{self._repair}.") from None  # fmt: skip

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
        of stores written by format versions 2 and 1) and check what it holds against its manifest entry; raise
        ``CacheCorruptError`` naming the first bad or missing shard."""
        for k in range(len(self.manifest["shards"])):
            self._verify_shard(k)

    def __repr__(self) -> str:
        m = self.manifest
        packing = m.get("packing")
        units = (f"{m['inputs']['num_cached_texts']} texts" if packing is None else
                 f"{packing['num_contexts']} contexts of {packing['context_size']}")  # fmt: skip
        return (
            f"ActivationStore({self.path}: {m['model']['model_type']}, {len(self)} tokens from "
            f"{units}, {len(m['names'])} names, {len(m['shards'])} shards)"
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
