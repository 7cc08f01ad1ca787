"""The activation store's format: its cacheable names (from the catalogue), errors, file names, dtypes, checksums and
the fingerprints its manifest records. The writer (`unilens.scale.writer`) and the reader (`unilens.scale.reader`)
both build on it; the layout itself is described in `unilens.scale.store`."""

from __future__ import annotations

import errno
import functools
import hashlib
import importlib.metadata
import json
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO, Iterator, Sequence

import numpy as np
import torch
import xxhash

from ..arch.offload import parameter
from ..core.names import CATALOGUE, LAYER_NAMES, MODEL_NAMES
from ..hooks.reads import forward_order, parse_names

if TYPE_CHECKING:
    from ..model.transformer import StandardizedTransformer

__all__ = [
    "CACHEABLE_NAMES",
    "CacheCorruptError",
    "CacheDiskFullError",
    "CacheError",
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST",
]

FORMAT = "unilens-activation-cache"
# 2: shards are checksummed with xxh3_128 (~20 GB/s) instead of sha256 (~1.3 GB/s, a full core at GPU caching rates).
# 3: the checksum is built from per-text digests taken as the rows are written ("xxh3_128_texts", `_text_digest`)
#    instead of read back from the file after it is written. ActivationStore reads and verifies every version.
FORMAT_VERSION = 3
MANIFEST = "manifest.json"
_SHARD_RE = re.compile(r"^shard_\d{5}\.safetensors$")
# A shard finished by one rank of a distributed run, not yet listed in manifest.json (rank 0 lists it at the end)
_DONE_RE = re.compile(r"^shard_(\d{5})\.done\.json$")
_TMP_SUFFIX = ".tmp"
_DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))  # no space / quota exceeded
_META_NAMES = ("token_ids", "text_index", "position")


def _shard_name(k: int) -> str:
    return f"shard_{k:05d}.safetensors"


def _done_name(k: int) -> str:
    """The record of shard ``k`` finished by a rank of a distributed run (matches ``_DONE_RE``)."""
    return f"shard_{k:05d}.done.json"


class CacheError(ValueError):
    """Bad arguments or an ``out_dir`` that cannot be used for this run."""


class CacheDiskFullError(OSError):
    """The disk filled up while writing; the store is consistent and resumes once space is freed."""


class CacheCorruptError(ValueError):
    """A shard's bytes do not match the checksum recorded in the manifest (or the shard is missing)."""


# ----------------------------------------------------------------------------------------------------------------
# Names
# ----------------------------------------------------------------------------------------------------------------

# Standardized name -> how its tensor maps to per-token rows, from the catalogue (`unilens.core.names`, ``.store``).
# (Reads are made in the model's recorded forward order, `unilens.hooks.reads.forward_order`: nnsight 0.8 serves
# values in execution order.)
#   "token": (batch, seq, *row)   "heads_first": (batch, heads, seq, d)   "probs": (batch, heads, query, key)
_LAYOUTS: dict[str, str] = {name: entry.store for name, entry in CATALOGUE.items() if entry.store is not None}
# The names the store caches: every name the catalogue gives a layout, per layer ("layers_output.3", "mlps_output.*")
# and whole-model ("logits", "token_embeddings", "position_embeddings" where the model has one).
_LAYER_LEVEL: tuple[str, ...] = tuple(name for name in LAYER_NAMES if name in _LAYOUTS)
_MODEL_LEVEL: tuple[str, ...] = tuple(name for name in MODEL_NAMES if name in _LAYOUTS)
CACHEABLE_NAMES: tuple[str, ...] = (*_LAYER_LEVEL, *_MODEL_LEVEL)
# Standardized name -> why the store refuses it (the catalogue's ``.not_stored``).
_NOT_CACHEABLE: dict[str, str] = {name: entry.not_stored for name, entry in CATALOGUE.items()
                                  if entry.store is None and entry.not_stored}  # fmt: skip


@dataclass(frozen=True)
class _Name:
    accessor: str  # e.g. "layers_output"
    layer: int | None  # None for a whole-model name (logits, token_embeddings, ...)

    @property
    def key(self) -> str:
        return self.accessor if self.layer is None else f"{self.accessor}.{self.layer}"

    @property
    def layout(self) -> str:
        """How the tensor maps to per-token rows (``_LAYOUTS``)."""
        return _LAYOUTS[self.accessor]

    def value(self, model: "StandardizedTransformer") -> Any:
        """Inside a trace: the model's value for this name, ``model.<accessor>[layer]`` (or ``model.<accessor>``)."""
        value = getattr(model, self.accessor)
        return value if self.layer is None else value[self.layer]


def _resolve_names(model: "StandardizedTransformer", names: str | Sequence[str]) -> list[_Name]:
    """``["layers_output.*", "attention_probabilities.3"]`` -> de-duplicated names in the model's forward order
    (parsed by `unilens.hooks.reads.parse_names`, ordered by the recorded `forward_order`)."""
    if isinstance(names, str):
        names = [names]
    names = list(names)
    if not names:
        raise CacheError(
            f"names is empty: pass at least one name, e.g. 'layers_output.*'. Cacheable: {CACHEABLE_NAMES}"
        )
    valid = ", ".join([*(f"{n}.<layer|*>" for n in _LAYER_LEVEL), *_MODEL_LEVEL])
    for raw in names:
        if not isinstance(raw, str):
            raise CacheError(f"names must be strings like 'layers_output.3', got {raw!r}")
        accessor = raw.strip().partition(".")[0]
        if accessor in _NOT_CACHEABLE:
            raise CacheError(f"{raw!r} cannot be cached: {_NOT_CACHEABLE[accessor]}.")
        if accessor not in CACHEABLE_NAMES:
            raise CacheError(f"unknown activation name {raw!r}. Valid names: {valid}.")
    try:
        locations = parse_names(model, names)
    except (ValueError, IndexError, TypeError) as err:
        raise CacheError(str(err)) from err
    order = forward_order(model)
    return [_Name(a, i) for a, i in sorted(locations, key=lambda loc: order.get(loc, -1))]


# ----------------------------------------------------------------------------------------------------------------
# Dtypes
# ----------------------------------------------------------------------------------------------------------------

_DTYPES = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
}  # fmt: skip


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype in _DTYPES:
        return _DTYPES[dtype]
    raise CacheError(f"dtype {dtype!r} is not supported; choose one of {sorted(_DTYPES)} or None (the model's dtype).")


# ----------------------------------------------------------------------------------------------------------------
# Checksums
# ----------------------------------------------------------------------------------------------------------------

_CHECKSUM = "xxh3_128_texts"  # the manifest key of a shard's checksum (format version 3): `_text_digest`
_LEGACY_CHECKSUMS = ("xxh3_128", "sha256")  # whole-file digests of format versions 2 and 1, still verified


def _hash_from(h: Any, f: BinaryIO, buffer: memoryview, n: int | None = None) -> Any:
    """Feed ``h`` the next ``n`` bytes of ``f`` (all the rest when ``None``) through ``buffer``, a reused block (2 MiB:
    it stays in the CPU's cache, where a fresh block per read would cost more than xxh3 itself); returns ``h``.
    Raises ``ValueError`` when ``f`` ends before ``n`` bytes."""
    left = math.inf if n is None else n
    while left:
        got = f.readinto(buffer[: int(min(left, len(buffer)))])
        if not got:
            if n is None:
                break
            raise ValueError("truncated")
        h.update(buffer[:got])
        left -= got
    return h


def _checksum(algorithm: str, f: BinaryIO) -> str:
    """Hex digest of the binary file ``f`` from its position to its end with ``"xxh3_128"`` or ``"sha256"`` (the
    shard checksums of format versions 2 and 1)."""
    h = xxhash.xxh3_128() if algorithm == "xxh3_128" else hashlib.sha256()
    return _hash_from(h, f, memoryview(bytearray(1 << 21))).hexdigest()


def _text_bounds(text_index: np.ndarray) -> np.ndarray:
    """``(texts + 1,)`` row offsets of the texts of a shard: the runs of equal ``text_index`` (rows in text order)."""
    if not len(text_index):
        return np.zeros(1, dtype=np.int64)
    return np.concatenate([[0], np.flatnonzero(np.diff(text_index)) + 1, [len(text_index)]]).astype(np.int64)


def _text_digest(head: bytes, blocks: Iterator[bytes]) -> str:
    """A shard's checksum (``"xxh3_128_texts"``): xxh3_128 of the file's first bytes (size + JSON header) followed by
    the 16-byte xxh3_128 digests of each tensor's rows of each text, tensors in file order, texts in row order.
    Every byte of the file is in the header or in exactly one block, and a block is one text's rows, which leave the
    model together: `_ShardFile` hashes them as it writes them (still in the CPU's cache; no read-back of the file),
    `_file_text_digest` recomputes the same from the file."""
    h = xxhash.xxh3_128(head)
    for block in blocks:
        h.update(block)
    return h.hexdigest()


def _file_text_digest(f: BinaryIO) -> str:
    """`_text_digest` of a shard file, from its own bytes: its header, and its ``text_index`` for the text bounds.
    Raises ``ValueError`` where the file is not laid out as a shard (truncated, extra bytes, tensors that do not
    tile the data, a tensor whose row count is not the shard's)."""
    size = f.read(8)
    n = int.from_bytes(size, "little")
    if len(size) < 8 or n > 1 << 30:
        raise ValueError("no safetensors header")
    text = f.read(n)
    header = json.loads(text)
    tensors = sorted((info["data_offsets"], name, info["shape"]) for name, info in header.items()
                     if name != "__metadata__")  # fmt: skip
    (a, b), _, _ = next((t for t in tensors if t[1] == "text_index"), ((0, 0), None, None))
    if b <= a:
        raise ValueError("no text_index tensor")
    f.seek(8 + n + a)
    bounds = _text_bounds(np.frombuffer(f.read(b - a), dtype="<i8"))

    def blocks() -> Iterator[bytes]:
        buffer = memoryview(bytearray(1 << 21))
        end = 0
        for (a, b), name, shape in tensors:
            if a != end or not shape or shape[0] != bounds[-1] or (b - a) % max(1, shape[0]):
                raise ValueError(f"tensor {name} does not fit the shard's {int(bounds[-1])} rows")
            row_bytes, end = (b - a) // max(1, shape[0]), b
            f.seek(8 + n + a)
            for rows in np.diff(bounds):
                yield _hash_from(xxhash.xxh3_128(), f, buffer, int(rows) * row_bytes).digest()
        if f.read(1):
            raise ValueError("bytes after the last tensor")

    return _text_digest(size + text, blocks())


# ----------------------------------------------------------------------------------------------------------------
# Identity / fingerprints (the manifest's "model" and "versions")
# ----------------------------------------------------------------------------------------------------------------


def _sha256_tensor_sample(t: torch.Tensor, max_elements: int = 1 << 16) -> str:
    """sha256 of up to ``max_elements`` evenly strided elements of ``t`` (bytes as stored), plus its shape/dtype."""
    flat = t.detach().reshape(-1)
    step = max(1, flat.numel() // max_elements)
    sample = flat[::step].contiguous().cpu()
    h = hashlib.sha256(f"{tuple(t.shape)}|{t.dtype}|{step}".encode())
    h.update(sample.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _model_identity(model: "StandardizedTransformer") -> dict[str, Any]:
    """model_type + config fingerprint + sampled checksums of the first, middle and last parameter (in remote mode
    the weights are on the server: the deployment's repo id stands for them)."""
    hf = model.module_accessor.model
    config = hf.config.to_dict()
    for key in ("_name_or_path", "name_or_path", "transformers_version", "_commit_hash"):
        config.pop(key, None)  # where / with what it was loaded, not what it computes
    config_json = json.dumps(config, sort_keys=True, default=str)
    params = list(hf.named_parameters())
    if getattr(hf, "hf_device_map", None):  # dispatched (accelerate): tied weights are separate meta tensors there,
        tied = set(getattr(hf, "all_tied_weights_keys", None) or {})  # one shared parameter in memory: list it once
        params = [(n, p) for n, p in params if n not in tied]
    picked = {params[i][0]: params[i][1] for i in sorted({0, len(params) // 2, len(params) - 1})} if params else {}
    if any(p.device.type == "meta" for p in picked.values()):  # offloaded by accelerate (device_map): stored values
        modules = dict(hf.named_modules())
        picked = {n: parameter(modules[n.rpartition(".")[0]], n.rpartition(".")[2], root=hf) for n in picked}
    return {
        "model_type": model.architecture.model_type,
        "class": type(hf).__name__,
        "num_layers": model.num_layers,
        "hidden_size": model.hidden_size,
        "config_sha256": hashlib.sha256(config_json.encode()).hexdigest(),
        "weights_sha256": {"remote": str(model.__dict__.get("repo_id"))} if model.__dict__.get("_remote_mode")
        else {name: _sha256_tensor_sample(p) for name, p in picked.items()},
    }


def _version(dist: str) -> str:
    """The installed version of the distribution ``dist``, or ``"unknown"``."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@functools.lru_cache(maxsize=None)  # installed versions do not change under a running process (importlib: ~5 ms)
def _versions() -> dict[str, str]:
    return {"unilens": _version("unilens"), "torch": torch.__version__,
            **{dist: _version(dist) for dist in ("transformers", "nnsight", "safetensors")}}  # fmt: skip
