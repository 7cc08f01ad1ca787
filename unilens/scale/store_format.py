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
import mmap
import os
import re
from dataclasses import dataclass
from pathlib import Path
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
    "CacheLockedError",
    "CacheMismatchError",
    "CacheNotFoundError",
    "FORMAT",
    "FORMAT_VERSION",
    "LOCK",
    "MANIFEST",
]

FORMAT = "unilens-activation-cache"
# 2: shards are checksummed with xxh3_128 (~20 GB/s) instead of sha256 (~1.3 GB/s, a full core at GPU caching rates).
# 3: the checksum is built from per-text digests taken as the rows are written ("xxh3_128_texts", `_text_digest`)
#    instead of read back from the file after it is written. ActivationStore reads and verifies every version.
# 4: the manifest carries its own checksum (`_MANIFEST_CHECKSUM`); the model fingerprint hashes every parameter
#    ("weights_xxh3_128") and the manifest records the numerics-relevant settings ("numerics": device, dtypes, torch
#    threads); each shard's safetensors metadata names its store (`_run_digest`), its index and the xxh3_128 of its
#    data blocks (`_META_DATA`), so a damaged manifest can be rebuilt from verified shards.
FORMAT_VERSION = 4
MANIFEST = "manifest.json"
LOCK = ".lock"  # held (flock) by the one process writing to a store: `unilens.scale.store_lock`
_MANIFEST_CHECKSUM = "manifest_xxh3_128"  # xxh3_128 of the manifest's other keys (`_manifest_digest`)
# a shard's own safetensors metadata (format 4): which store (`_run_digest` of the manifest's header), which shard,
# and the xxh3_128 of its data blocks (`_data_digest`), 32 hex digits written in place once the shard is complete
_META_STORE, _META_SHARD, _META_DATA = "unilens_store", "unilens_shard", "unilens_data_xxh3_128"
_DIGEST_PLACEHOLDER = "0" * 32
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


class CacheCorruptError(CacheError):
    """A store's file is damaged: a shard whose bytes do not match the checksum recorded in the manifest, a missing or
    truncated shard, a manifest that is not the one written (not JSON, truncated, entries out of order, its own
    checksum differs). The message names the file and the repair."""


class CacheMismatchError(CacheError):
    """``out_dir`` holds a store of another model (weights, config), other numerics settings (device, dtypes, torch
    threads, versions), other inputs or other arguments: resuming would mix two runs in one store."""


class CacheLockedError(CacheError):
    """Another process (or another call in this one) is writing to the same ``out_dir``."""


class CacheNotFoundError(CacheError, FileNotFoundError):
    """The folder holds no activation store (no manifest and no shard)."""


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


@dataclass
class _ShardDigests:
    """What `_shard_digests` finds in a shard's bytes: its header bytes (size + JSON) and parsed header, the row
    offsets of its texts, and the xxh3_128 digest of each block (tensor x text, in file order)."""

    head: bytes
    header: dict[str, Any]
    bounds: np.ndarray
    blocks: list[bytes]
    texts: tuple[int, int]  # (first text_index, last + 1): the range of original texts the shard holds

    @property
    def checksum(self) -> str:
        """The shard's checksum as the manifest records it (``"xxh3_128_texts"``, `_text_digest`)."""
        return _text_digest(self.head, iter(self.blocks))

    @property
    def data_digest(self) -> str:
        """The xxh3_128 of the data blocks alone (`_data_digest`), which format 4 writes into the shard's metadata."""
        return _data_digest(self.blocks)

    @property
    def rows(self) -> int:
        return int(self.bounds[-1])

    @property
    def metadata(self) -> dict[str, str]:
        meta = self.header.get("__metadata__")
        return meta if isinstance(meta, dict) else {}


def _data_digest(blocks: Sequence[bytes]) -> str:
    """xxh3_128 of a shard's block digests, back to back (no header): the digest a format-4 shard carries in its own
    metadata (`_META_DATA`), checkable without the manifest."""
    h = xxhash.xxh3_128()
    for block in blocks:
        h.update(block)
    return h.hexdigest()


def _shard_digests(data: Any) -> _ShardDigests:
    """`_ShardDigests` of a whole shard's bytes ``data`` (any buffer: a memory map of the file, or the bytes read).
    Raises ``ValueError`` where the bytes are not laid out as a shard (truncated, extra bytes, tensors that do not
    tile the data, a tensor whose row count is not the shard's)."""
    view = memoryview(data).cast("B")
    if len(view) < 8:
        raise ValueError("no safetensors header")
    n = int.from_bytes(view[:8], "little")
    if n > 1 << 30 or 8 + n > len(view):
        raise ValueError("no safetensors header")
    header = json.loads(bytes(view[8 : 8 + n]))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    tensors = sorted((info["data_offsets"], name, info["shape"]) for name, info in header.items()
                     if name != "__metadata__")  # fmt: skip
    (a, b), _, _ = next((t for t in tensors if t[1] == "text_index"), ((0, 0), None, None))
    if b <= a or 8 + n + b > len(view):
        raise ValueError("no text_index tensor")
    text_index = np.frombuffer(view[8 + n + a : 8 + n + b], dtype="<i8")
    bounds = _text_bounds(text_index)
    texts = (int(text_index[0]), int(text_index[-1]) + 1) if len(text_index) else (0, 0)
    if len(text_index) and not bool((np.diff(text_index) >= 0).all()):
        raise ValueError("text_index is not in text order")
    del text_index
    blocks, end = [], 0
    for (a, b), name, shape in tensors:
        if a != end or not shape or shape[0] != bounds[-1] or (b - a) % max(1, shape[0]):
            raise ValueError(f"tensor {name} does not fit the shard's {int(bounds[-1])} rows")
        row_bytes, end = (b - a) // max(1, shape[0]), b
        if 8 + n + b > len(view):
            raise ValueError("truncated")
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            start = 8 + n + a + int(lo) * row_bytes
            blocks.append(xxhash.xxh3_128_digest(view[start : 8 + n + a + int(hi) * row_bytes]))
    if 8 + n + end != len(view):
        raise ValueError("bytes after the last tensor")
    return _ShardDigests(bytes(view[: 8 + n]), header, bounds, blocks, texts)


def _file_text_digest(f: BinaryIO) -> str:
    """`_text_digest` of a shard file, from its own bytes (from its position to its end). Raises ``ValueError``
    where the file is not laid out as a shard (`_shard_digests`)."""
    with _mapped(f) as data:
        return _shard_digests(data).checksum


class _mapped:
    """``with _mapped(f) as data``: the bytes of the binary file ``f`` from its position to its end, memory mapped
    (read as they are hashed, never all held in memory; an empty buffer for an empty file)."""

    def __init__(self, f: BinaryIO):
        self.f, self.map = f, None

    def __enter__(self) -> memoryview:
        start = self.f.tell()
        size = os.fstat(self.f.fileno()).st_size
        if size <= start:
            return memoryview(b"")
        self.map = mmap.mmap(self.f.fileno(), 0, access=mmap.ACCESS_READ)
        self.view = memoryview(self.map)[start:]
        return self.view

    def __exit__(self, *exc: Any) -> None:
        if self.map is not None:
            try:
                self.view.release()
                self.map.close()
            except BufferError:  # a view of it still lives (an exception's frames): unmapped once it is freed
                pass


def _shard_checksum(algorithm: str, path: Path) -> tuple[str, _ShardDigests | None]:
    """The checksum ``algorithm`` (``"xxh3_128_texts"``, or the whole-file ``"xxh3_128"`` / ``"sha256"`` of format
    versions 2 and 1) of the shard file ``path``, and its `_ShardDigests` (format 3 and later). A file not laid out
    as a shard gives ``"unreadable (...)"``, which never equals a recorded checksum. ``OSError`` where it cannot be
    opened."""
    with open(path, "rb") as f:
        if algorithm != _CHECKSUM:
            return _checksum(algorithm, f), None
        with _mapped(f) as data:
            try:
                digests = _shard_digests(data)
            except (ValueError, KeyError, TypeError, IndexError) as err:  # not laid out as a shard
                return f"unreadable ({type(err).__name__}: {err})", None
            return digests.checksum, digests


# ----------------------------------------------------------------------------------------------------------------
# The manifest's own checksum and the store's identity in each shard
# ----------------------------------------------------------------------------------------------------------------


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, default=str, separators=(",", ":")).encode()


def _manifest_digest(manifest: dict[str, Any]) -> str:
    """xxh3_128 of the manifest less its own checksum, in canonical JSON: any changed value, a swapped entry or a
    lost key changes it (`_MANIFEST_CHECKSUM`)."""
    return xxhash.xxh3_128_hexdigest(_canonical({k: v for k, v in manifest.items() if k != _MANIFEST_CHECKSUM}))


def _run_digest(header: dict[str, Any]) -> str:
    """xxh3_128 of the manifest's header (model fingerprint, numerics, names, rows, arguments, inputs, versions):
    what every shard of a format-4 store carries in its metadata (`_META_STORE`), so that a shard names the very run
    that wrote it."""
    return xxhash.xxh3_128_hexdigest(_canonical({k: v for k, v in header.items()
                                                 if k not in ("complete", "shards", _MANIFEST_CHECKSUM)}))


# ----------------------------------------------------------------------------------------------------------------
# Identity / fingerprints (the manifest's "model" and "versions")
# ----------------------------------------------------------------------------------------------------------------


def _sha256_tensor_sample(t: torch.Tensor, max_elements: int = 1 << 16) -> str:
    """sha256 of up to ``max_elements`` evenly strided elements of ``t`` (bytes as stored), plus its shape/dtype: the
    sampled weight fingerprint of format versions 1 to 3 (`_legacy_weights`)."""
    flat = t.detach().reshape(-1)
    step = max(1, flat.numel() // max_elements)
    sample = flat[::step].contiguous().cpu()
    h = hashlib.sha256(f"{tuple(t.shape)}|{t.dtype}|{step}".encode())
    h.update(sample.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


_HASH_CHUNK = 1 << 26  # bytes copied off an accelerator at a time when hashing a parameter there


def _tensor_digest(t: torch.Tensor) -> str:
    """xxh3_128 of every byte of ``t`` as stored (on the CPU without a copy; off an accelerator in 64 MiB pieces),
    after its shape and dtype."""
    h = xxhash.xxh3_128(f"{tuple(t.shape)}|{t.dtype}".encode())
    flat = t.detach().reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    raw = flat.view(torch.uint8) if flat.numel() else flat.new_zeros(0, dtype=torch.uint8)
    for start in range(0, raw.numel(), _HASH_CHUNK):
        h.update(raw[start : start + _HASH_CHUNK].cpu().numpy())
    return h.hexdigest()


def _hf_parameters(model: "StandardizedTransformer") -> list[tuple[str, torch.Tensor]]:
    """Every parameter of the HF model, once each, with its stored value (offloaded ones read from accelerate's
    offload map)."""
    hf = model.module_accessor.model
    params = list(hf.named_parameters())
    if getattr(hf, "hf_device_map", None):  # dispatched (accelerate): tied weights are separate meta tensors there,
        tied = set(getattr(hf, "all_tied_weights_keys", None) or {})  # one shared parameter in memory: list it once
        params = [(n, p) for n, p in params if n not in tied]
    if any(p.device.type == "meta" for _, p in params):  # offloaded by accelerate (device_map): stored values
        modules = dict(hf.named_modules())
        params = [(n, parameter(modules[n.rpartition(".")[0]], n.rpartition(".")[2], root=hf)
                   if p.device.type == "meta" else p) for n, p in params]  # fmt: skip
    return params


def _model_facts(model: "StandardizedTransformer") -> dict[str, Any]:
    """model_type, class, sizes and the sha256 of the config (less where / with what it was loaded)."""
    hf = model.module_accessor.model
    config = hf.config.to_dict()
    for key in ("_name_or_path", "name_or_path", "transformers_version", "_commit_hash"):
        config.pop(key, None)  # where / with what it was loaded, not what it computes
    return {
        "model_type": model.architecture.model_type,
        "class": type(hf).__name__,
        "num_layers": model.num_layers,
        "hidden_size": model.hidden_size,
        "config_sha256": hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest(),
    }


def _model_identity(model: "StandardizedTransformer") -> dict[str, Any]:
    """`_model_facts` + the xxh3_128 of every parameter (`_tensor_digest`; SmolLM2's 135M float32 parameters: about
    0.1 s). In remote mode the weights are on the server: the deployment's repo id stands for them."""
    if model.__dict__.get("_remote_mode"):
        weights = {"remote": str(model.__dict__.get("repo_id"))}
    else:
        weights = {name: _tensor_digest(p) for name, p in _hf_parameters(model)}
    return {**_model_facts(model), "weights_xxh3_128": weights}


def _legacy_identity(model: "StandardizedTransformer") -> dict[str, Any]:
    """The model fingerprint of format versions 1 to 3 (`_model_facts` + the sampled sha256 of the first, middle and
    last parameter), to compare a store those versions wrote."""
    if model.__dict__.get("_remote_mode"):
        return {**_model_facts(model), "weights_sha256": {"remote": str(model.__dict__.get("repo_id"))}}
    params = _hf_parameters(model)
    picked = [params[i] for i in sorted({0, len(params) // 2, len(params) - 1})] if params else []
    return {**_model_facts(model), "weights_sha256": {name: _sha256_tensor_sample(p) for name, p in picked}}


def _numerics(model: "StandardizedTransformer") -> dict[str, Any]:
    """The settings under which the same weights and inputs can give other bits: the device (and GPU model), the
    parameters' dtypes, and on the CPU the torch thread count (1 vs 2 threads: last-bit differences) and the CPU's
    vector instruction set; on CUDA whether TF32 matmuls are allowed."""
    if model.__dict__.get("_remote_mode"):
        return {"device": "remote"}
    device = model.input_device
    out: dict[str, Any] = {
        "device": device.type,
        "dtypes": sorted({_dtype_name(p.dtype) for p in model.module_accessor.model.parameters()}),
    }
    if device.type == "cpu":
        out["torch_threads"] = torch.get_num_threads()
        out["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    elif device.type == "cuda":
        out["device_name"] = torch.cuda.get_device_name(device)
        out["tf32_matmul"] = bool(torch.backends.cuda.matmul.allow_tf32)
        out["tf32_cudnn"] = bool(torch.backends.cudnn.allow_tf32)
    return out


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


# ----------------------------------------------------------------------------------------------------------------
# The manifest as written: loading and structural checks
# ----------------------------------------------------------------------------------------------------------------

_HEADER_TYPES: dict[str, type | tuple[type, ...]] = {
    "format_version": int, "model": dict, "names": list, "rows": dict, "args": dict, "inputs": dict,
    "num_shards": int, "complete": bool, "shards": list,
}  # fmt: skip
# the repair a damaged manifest gets on read (the writer rebuilds it from the verified shards of format 4)
_MANIFEST_REPAIR = (
    "run the same cache_activations call again: it rebuilds the manifest from the shards it can verify and "
    "recomputes the rest"
)


def _manifest_problem(manifest: Any) -> str | None:
    """Why ``manifest`` (parsed JSON) is not a manifest as `cache_activations` writes it, or ``None``: wrong types,
    a missing key, shard entries out of order (each entry ``k`` names ``shard_k``, rows laid end to end from 0, text
    ranges increasing), a count that does not add up, or (format 4) its own checksum differs."""
    if not isinstance(manifest, dict):
        kind = {type(None): "null", list: "an array", str: "a string", bool: "a boolean"}.get(type(manifest), "a number")
        return f"it holds {kind}, not a JSON object"
    if manifest.get("format") != FORMAT:
        return f"its format is {manifest.get('format')!r}, not {FORMAT!r}"
    for key, kind in _HEADER_TYPES.items():
        if not isinstance(manifest.get(key), kind) or isinstance(manifest.get(key), bool) is not (kind is bool):
            return f"its {key!r} is missing or not a {getattr(kind, '__name__', kind)}"
    version = manifest["format_version"]
    if version >= 4:
        recorded = manifest.get(_MANIFEST_CHECKSUM)
        if recorded != _manifest_digest(manifest):
            return f"its checksum {_MANIFEST_CHECKSUM} {recorded!r} does not match its contents"
    for name in manifest["names"]:
        spec = manifest["rows"].get(name) if isinstance(name, str) else None
        if not isinstance(spec, dict) or spec.get("dtype") not in _DTYPES or not isinstance(spec.get("shape"), list):
            return f"the row spec of {name!r} is missing or malformed"
    shards = manifest["shards"]
    if len(shards) > manifest["num_shards"] or manifest["complete"] != (len(shards) == manifest["num_shards"]):
        return f"it lists {len(shards)} of {manifest['num_shards']} shards but says complete={manifest['complete']}"
    row, text = 0, 0
    for k, entry in enumerate(shards):
        if not isinstance(entry, dict) or entry.get("file") != _shard_name(k):
            got = entry.get("file") if isinstance(entry, dict) else entry
            return f"entry {k} names {got!r}, not {_shard_name(k)!r}: entries are out of order"
        rows, texts = entry.get("rows"), entry.get("texts")
        if not (_int_pair(rows) and rows[0] == row and rows[1] >= rows[0]):
            return f"entry {k} ({entry['file']}) has rows {rows!r}, not [{row}, ...]: entries are out of order"
        if not (_int_pair(texts) and texts[0] >= text and texts[1] > texts[0]):
            return f"entry {k} ({entry['file']}) has texts {texts!r}, not after text {text}: entries are out of order"
        if not any(isinstance(entry.get(key), str) for key in (_CHECKSUM, *_LEGACY_CHECKSUMS)):
            return f"entry {k} ({entry['file']}) has no checksum"
        if not isinstance(entry.get("bytes"), int) or isinstance(entry.get("bytes"), bool):
            return f"entry {k} ({entry['file']}) has no byte count"
        row, text = rows[1], texts[1]
    return None


def _int_pair(value: Any) -> bool:
    return (isinstance(value, list) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value))  # fmt: skip


def _shard_files(folder: Path) -> list[str]:
    """The names of the shard files in ``folder`` (``shard_00000.safetensors``, ...), sorted."""
    try:
        return sorted(p.name for p in folder.iterdir() if _SHARD_RE.match(p.name))
    except OSError:
        return []


def _load_manifest(folder: Path) -> dict[str, Any]:
    """``folder``'s manifest.json, parsed and checked (`_manifest_problem`). Raises `CacheNotFoundError` where the
    folder holds no manifest and no shard, `CacheCorruptError` where the manifest is missing beside shards, unreadable
    or damaged (one line: the file and the repair), `CacheError` where a newer unilens wrote it."""
    path = folder / MANIFEST
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        shards = _shard_files(folder)
        if shards:
            raise CacheCorruptError(f"{path} is missing but {folder} holds {len(shards)} shard file(s): "
                                    f"{_MANIFEST_REPAIR}.") from None  # fmt: skip
        raise CacheNotFoundError(f"{folder} holds no {MANIFEST}: it is not an activation store.") from None
    except IsADirectoryError:
        raise CacheCorruptError(f"{path} is a folder, not a file: remove it, then {_MANIFEST_REPAIR}.") from None
    except OSError as err:
        raise CacheCorruptError(f"{path} cannot be read ({err.strerror}): check its permissions.") from None
    try:
        manifest = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        what = "truncated" if isinstance(err, json.JSONDecodeError) and err.pos >= len(text.rstrip()) else "not JSON"
        raise CacheCorruptError(f"{path} is damaged ({what}: {err}): {_MANIFEST_REPAIR}.") from None
    if isinstance(manifest, dict) and isinstance(manifest.get("format_version"), int) and manifest.get(
            "format") == FORMAT and manifest["format_version"] > FORMAT_VERSION:
        if manifest.get(_MANIFEST_CHECKSUM) != _manifest_digest(manifest):  # a flipped digit, not a newer writer
            raise CacheCorruptError(f"{path} is damaged (its format_version {manifest['format_version']} is newer than "
                                    f"this unilens reads and its checksum does not match): {_MANIFEST_REPAIR}, or "
                                    "upgrade unilens if a newer one wrote it.")  # fmt: skip
        raise CacheError(f"{path} was written by a newer unilens (store format {manifest['format_version']}; this "
                         f"one reads up to {FORMAT_VERSION}): upgrade unilens to read it.")  # fmt: skip
    problem = _manifest_problem(manifest)
    if problem is not None:
        raise CacheCorruptError(f"{path} is damaged ({problem}): {_MANIFEST_REPAIR}.")
    return manifest


# ----------------------------------------------------------------------------------------------------------------
# Differences between a store's header and a run's: one line, weights and numerics in words
# ----------------------------------------------------------------------------------------------------------------

_NUMERICS_WORDS = {
    "torch_threads": "torch threads", "device": "device", "device_name": "GPU", "dtypes": "parameter dtypes",
    "cpu_capability": "CPU instruction set", "tf32_matmul": "TF32 matmuls", "tf32_cudnn": "TF32 cuDNN",
}  # fmt: skip


def _differences(store: Any, run: Any, prefix: str = "") -> list[str]:
    """What differs between the header of a store (``store``) and a run's (``run``), in words: ``"weights of
    model.layers.3.mlp.down_proj.weight differ"``, ``"torch threads: store 1, this run 2"``, ``"versions.torch:
    store '2.12', this run '2.13'"``."""
    if isinstance(store, dict) and isinstance(run, dict):
        if prefix in ("model.weights_xxh3_128.", "model.weights_sha256."):
            differ = sorted(k for k in set(store) & set(run) if store[k] != run[k])
            only_store, only_run = sorted(set(store) - set(run)), sorted(set(run) - set(store))
            out = []
            if len(differ) > 3:
                out.append(f"weights of {len(differ)} of {len(store)} parameters differ ({', '.join(differ[:3])}, ...)")
            else:
                out += [f"weights of {k} differ" for k in differ]
            for only, whose in ((only_store, "the store's model"), (only_run, "this run's model")):
                if only:
                    out.append(f"{len(only)} parameter(s) only in {whose} ({', '.join(only[:3])}"
                               f"{', ...' if len(only) > 3 else ''})")  # fmt: skip
            return out
        out = []
        for key in sorted(set(store) | set(run)):
            out += _differences(store.get(key), run.get(key), f"{prefix}{key}.")
        return out
    if store == run:
        return []
    key = prefix.rstrip(".")
    if key.startswith("numerics."):
        name = key.removeprefix("numerics.")
        line = f"{_NUMERICS_WORDS.get(name, name)}: store {store}, this run {run}"
        if name == "torch_threads" and isinstance(store, int):
            line += f" (torch.set_num_threads({store}) or OMP_NUM_THREADS={store} matches the store)"
        return [line]
    return [f"{key}: store has {store!r}, this run has {run!r}"]


def _join_differences(lines: list[str], limit: int = 8) -> str:
    more = f"; and {len(lines) - limit} more" if len(lines) > limit else ""
    return "; ".join(lines[:limit]) + more
