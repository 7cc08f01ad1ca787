"""Streaming activation cache: per-token activations of many texts in resumable safetensors shards.

Layout of a store (``out_dir``)::

    manifest.json              model identity, arguments, per-name row shape / dtype, shard list (checksums)
    shard_00000.safetensors    every requested name's rows for the shard + ``token_ids``, ``text_index``, ``position``
    shard_00001.safetensors    ...

One *row* is one real (non-padding) token. Rows are stored in text order, then position order, whatever
order the batches ran in: row ``r`` of every name belongs to text ``text_index[r]`` at token ``position[r]``.

Names are standardized accessor names with a layer: ``"layers_output.12"``, ``"mlps_output.*"`` (every layer
that has one), ``"attention_probabilities.3"``, plus ``"logits"``. Per-token row shapes:

=================================================  ===================================================
``layers_input`` / ``layers_output``, ``attentions_input`` / ``attentions_output``, ``mlps_input`` /
``mlps_output``                                    ``(hidden,)``
``attention_queries`` / ``_keys`` / ``_values``    ``(heads, head_dim)`` (key/value heads for keys/values)
``attention_heads``                                ``(heads, head_dim)``
``attention_head_results``                         ``(heads, hidden)``
``attention_probabilities``                        ``(heads, key_length)``: the query token's attention
                                                   over key positions ``0..key_length-1`` of its own text;
                                                   ``key_length`` is ``max_length`` when given, else the
                                                   longest text. Keys after the query (causal) and past the
                                                   text's end are exactly 0.
``logits``                                         ``(vocab,)``
=================================================  ===================================================

Shards are contiguous groups of texts closed as soon as they hold ``shard_tokens`` rows, so boundaries depend
only on the inputs and arguments. Within a shard, texts are sorted by length into batches (right padding,
so each real token sees exactly what it would see alone); the batch plan is deterministic too, so a resumed
run is byte-identical to an uninterrupted one. Each shard is a safetensors file written in place under a ``.tmp``
name as its batches run (every activation is copied once, from the model's tensor into the file, and hashed with
xxh3 on the way), fsynced, renamed, and only then is ``manifest.json`` rewritten (temp + fsync + rename): a kill at any
moment leaves a store that the same call resumes from its last complete shard. Memory holds one batch's
activations (no shard is built in memory). Module inputs / outputs (``layers_*``, ``attentions_*``, ``mlps_*``) are
read by torch hooks on the modules the accessors read (tested bitwise against them on every architecture); when
nothing else is asked for, the batch runs the model's forward without an nnsight trace.

Texts that are empty (``""``) or tokenize to no token are skipped with a warning; their indices are listed in
the manifest (``inputs.skipped_texts``) and other texts keep their original ``text_index``.

Data parallel (`unilens.distributed`): under an initialized ``torch.distributed`` process group (``torchrun
--nproc-per-node N -m unilens cache ...``), every rank plans the same shards, the shards still to compute are dealt
round robin over ranks, each rank writes its own shard files plus a ``shard_k.done.json`` record, and rank 0 alone
writes ``manifest.json`` (at the start, and after gathering every rank's records at the end). Shard bytes depend only
on the inputs and arguments, so the store is byte-identical to a one-process run; a relaunch after a crash of any
rank keeps every recorded shard and computes the rest.

Generation (``generate_tokens=n``): each text is continued greedily by the model's own ``generate`` (KV cache on)
and the activations of every token fed through the model are read during generation, step by step (one text per
``generate`` call): a text's rows are its prompt tokens, then up to ``n`` generated tokens (fewer when the model
ends the text; the token after the last row is generated but never fed back, so it has none).
"""

from __future__ import annotations

import argparse
import errno
import functools
import hashlib
import importlib.metadata
import json
import math
import os
import re
import sys
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Iterator, Sequence

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from .distributed import RankProgress, all_gather_objects, barrier, broadcast_object, rank_world

if TYPE_CHECKING:
    from ..model.transformer import StandardizedTransformer

__all__ = [
    "ActivationStore",
    "ActivationDataset",
    "CacheError",
    "CacheDiskFullError",
    "CacheCorruptError",
    "cache_activations",
    "main_cache",
    "read_texts",
    "CACHEABLE_NAMES",
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
# Testing hook: seconds to sleep after each batch, so a test can kill a run mid-shard.
_DELAY_ENV = "UNILENS_CACHE_TEST_DELAY"
_DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))  # no space / quota exceeded
_DEFAULT_SHARD_BYTES = 256 * 2**20  # automatic shard_tokens: about 256 MiB of activations per shard

# Accessor name -> how its tensor maps to per-token rows. (Reads are made in the model's recorded forward order,
# `unilens.order.forward_order`: nnsight 0.8 serves values in execution order.)
#   "token": (batch, seq, *row)   "heads_first": (batch, heads, seq, d)   "probs": (batch, heads, query, key)
_KINDS: dict[str, str] = {
    "layers_input": "token",
    "attentions_input": "token",
    "attention_queries": "heads_first",
    "attention_keys": "heads_first",
    "attention_values": "heads_first",
    "attention_probabilities": "probs",
    "attention_heads": "token",
    "attention_head_results": "token",
    "attentions_output": "token",
    "mlps_input": "token",
    "mlps_output": "token",
    "layers_output": "token",
}
CACHEABLE_NAMES: tuple[str, ...] = (*_KINDS, "logits")
_NOT_CACHEABLE = {
    "attention_scores": "pre-softmax scores hold the model's masking constant at masked keys, which does not "
    "survive padding to a common key length; cache attention_probabilities instead",
    "next_token_probs": "it is one row per text, not per token; cache logits and take the last row of each text",
}
_META_NAMES = ("token_ids", "text_index", "position")


class CacheError(ValueError):
    """Bad arguments or an ``out_dir`` that cannot be used for this run."""


class CacheDiskFullError(OSError):
    """The disk filled up while writing; the store is consistent and resumes once space is freed."""


class CacheCorruptError(ValueError):
    """A shard's bytes do not match the checksum recorded in the manifest (or the shard is missing)."""


# ----------------------------------------------------------------------------------------------------------------
# Names
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Name:
    accessor: str  # e.g. "layers_output"
    layer: int | None  # None for logits

    @property
    def key(self) -> str:
        return self.accessor if self.layer is None else f"{self.accessor}.{self.layer}"



def _resolve_names(model: "StandardizedTransformer", names: str | Sequence[str]) -> list[_Name]:
    """``["layers_output.*", "attention_probabilities.3"]`` -> de-duplicated names in the model's forward order
    (parsed by `unilens.order.parse_names`, ordered by the recorded `forward_order`)."""
    from ..hooks.reads import forward_order, parse_names

    if isinstance(names, str):
        names = [names]
    names = list(names)
    if not names:
        raise CacheError(
            f"names is empty: pass at least one name, e.g. 'layers_output.*'. Cacheable: {CACHEABLE_NAMES}"
        )
    valid = ", ".join(f"{n}.<layer|*>" for n in _KINDS) + ", logits"
    for raw in names:
        if not isinstance(raw, str):
            raise CacheError(f"names must be strings like 'layers_output.3', got {raw!r}")
        accessor = raw.strip().partition(".")[0]
        if accessor in _NOT_CACHEABLE:
            raise CacheError(f"{raw!r} cannot be cached: {_NOT_CACHEABLE[accessor]}.")
        if accessor not in _KINDS and accessor != "logits":
            raise CacheError(f"unknown activation name {raw!r}. Valid names: {valid}.")
    try:
        locations = parse_names(model, names)
    except (ValueError, IndexError, TypeError) as err:
        raise CacheError(str(err)) from err
    order = forward_order(model)
    return [_Name(a, i) for a, i in sorted(locations, key=lambda loc: order.get(loc, -1))]


# ----------------------------------------------------------------------------------------------------------------
# Identity / fingerprints
# ----------------------------------------------------------------------------------------------------------------


def _sha256_tensor_sample(t: torch.Tensor, max_elements: int = 1 << 16) -> str:
    """sha256 of up to ``max_elements`` evenly strided elements of ``t`` (bytes as stored), plus its shape/dtype."""
    flat = t.detach().reshape(-1)
    step = max(1, flat.numel() // max_elements)
    sample = flat[::step].contiguous().cpu()
    h = hashlib.sha256(f"{tuple(t.shape)}|{t.dtype}|{step}".encode())
    h.update(sample.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


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
    import xxhash

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
    import xxhash

    h = xxhash.xxh3_128(head)
    for block in blocks:
        h.update(block)
    return h.hexdigest()


def _file_text_digest(f: BinaryIO) -> str:
    """`_text_digest` of a shard file, from its own bytes: its header, and its ``text_index`` for the text bounds.
    Raises ``ValueError`` where the file is not laid out as a shard (truncated, extra bytes, tensors that do not
    tile the data, a tensor whose row count is not the shard's)."""
    import xxhash

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


def _save(value: Any) -> Any:
    """``nnsight.save``: marks a container built outside a trace to come back from a remote request too."""
    from nnsight import save

    return save(value)


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
        from ..arch.offload import parameter

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


@functools.lru_cache(maxsize=None)  # installed versions do not change under a running process (importlib: ~5 ms)
def _versions() -> dict[str, str]:
    from .. import __version__

    out = {"unilens": __version__, "torch": torch.__version__}
    for dist in ("transformers", "nnsight", "safetensors"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "unknown"
    return out


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
# Tokenization and plan
# ----------------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------------
# Running the model
# ----------------------------------------------------------------------------------------------------------------


def _pad_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return 0


def _module_reads(model: "StandardizedTransformer", names: list[_Name]) -> dict[str, tuple[torch.nn.Module, str, bool]]:
    """``{key: (module, "input" | "output", copy)}`` for the names that are a module's first input / output (the
    six ``LayerAccessor`` names): `_run_batch` reads those with a plain torch hook on the very module the accessor's
    nnsight envoy wraps, which skips nnsight's per-read interleaving (a switch into the trace body for each read: a
    few % of a SmolLM2 batch for 30 reads). The tensor is the one the accessor returns (`_first` of the output, or
    the first positional / keyword input, unflattened the same way; copied where the accessor copies), checked
    bitwise against the accessors on every architecture by tests/test_cache.py. Other names (attention hook
    points, logits) and remote models are read through the trace."""
    from ..core.accessors import LayerAccessor

    if model.__dict__.get("_remote_mode"):
        return {}
    sites = {}
    for name in names:
        accessor = getattr(model, name.accessor) if name.layer is not None else None
        if isinstance(accessor, LayerAccessor):
            envoy = accessor._envoy_of(accessor._index(name.layer))
            sites[name.key] = (envoy._module, accessor._io, accessor._copy)
    return sites


def _run_batch(
    model: "StandardizedTransformer", names: list[_Name], rows: list[np.ndarray], pad_id: int, hooks: bool = True,
    consume: Callable[[str, torch.Tensor], None] | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One right-padded forward; returns ``{name: raw saved tensor}`` and the ``(batch, seq)`` mask.

    ``consume(key, value)``: where every name is hook-read (no trace runs), called from the hook with each value while
    the forward runs (the tensor is still in the CPU's cache, and nothing the model later changes in place has changed
    yet); those keys are then not in the returned dict. ``hooks=False`` reads every name through a trace (the
    reference the torch-hook reads are tested against)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = torch.from_numpy(r)
        mask[b, : len(r)] = 1
    device = model.input_device
    sites = _module_reads(model, names) if hooks else {}
    traced = len(sites) < len(names)  # a trace reads the rest (an error raised in a hook then surfaces from nnsight)
    consume = None if traced else consume
    hooked: dict[str, torch.Tensor | None] = {}

    def keep(key: str, value: Any, copy: bool) -> None:
        if key not in hooked:  # a module called twice: its first call, as nnsight's .input / .output
            value = (value[0] if isinstance(value, (tuple, list)) else value).detach()
            if consume is None:
                hooked[key] = value.clone() if copy else value
            else:
                hooked[key] = None
                consume(key, model._unflatten_tokens(value))

    handles = []
    for key, (module, io, copy) in sites.items():
        if io == "output":
            hook = lambda _m, _args, out, key=key, copy=copy: keep(key, out, copy)  # noqa: E731
            handles.append(module.register_forward_hook(hook))
        else:  # nnsight's .input: the first positional argument, else the first keyword one
            hook = lambda _m, args, kwargs, key=key: keep(  # noqa: E731
                key, args[0] if args else next(iter(kwargs.values())), False)
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    saved: dict[str, torch.Tensor] = {}  # built before the trace: nnsight does not push back containers made inside
    wants_logits = any(name.layer is None for name in names)
    lean = {} if wants_logits else model._keep_last_logits_kwargs()
    inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}  # what a trace passes the model too
    try:
        if not traced:  # every name is hook-read: the model's forward without a trace, which spares
            with torch.no_grad():  # nnsight's interleaver (~15 us per module call, ~2.5% of a SmolLM2 batch)
                model.module_accessor.model(**inputs, **lean)
        else:
            with torch.no_grad(), model.trace(inputs, **lean):
                for name in names:
                    if name.key in sites:
                        continue
                    if name.layer is None:
                        saved[name.key] = model.logits.save()
                    else:
                        saved[name.key] = getattr(model, name.accessor)[name.layer].save()
                saved = _save(saved)  # a remote request returns saved names only: the dict itself
    finally:
        for handle in handles:
            handle.remove()
    missing = [key for key in sites if key not in hooked]
    if missing:
        raise CacheError(f"{missing} were not computed by this forward (their module never ran).")
    saved.update({key: model._unflatten_tokens(value) for key, value in hooked.items() if value is not None})
    return saved, mask


def _per_token(name: _Name, value: torch.Tensor, batch: int, width: int, key_length: int) -> torch.Tensor:
    """Raw accessor tensor -> ``(batch, seq, *row)``."""
    kind = "token" if name.layer is None else _KINDS[name.accessor]
    value = value.detach()
    if kind == "heads_first":  # (batch, heads, seq, d) -> (batch, seq, heads, d)
        value = value.transpose(1, 2)
    elif kind == "probs":  # (batch, heads, query, key) -> (batch, query, heads, key_length)
        value = value.permute(0, 2, 1, 3)
        if value.shape[-1] > key_length:
            raise CacheError(f"{name.key}: {value.shape[-1]} keys exceed key_length {key_length}")
        value = torch.nn.functional.pad(value, (0, key_length - value.shape[-1]))
    if tuple(value.shape[:2]) != (batch, width):
        raise CacheError(
            f"{name.key} has shape {tuple(value.shape)}, expected (batch={batch}, seq={width}, ...) per token; "
            "this accessor does not give one value per token on this model."
        )
    return value


def _probe_rows(
    model: "StandardizedTransformer", names: list[_Name], rows: list[np.ndarray], key_length: int, pad_id: int
) -> tuple[dict[str, dict[str, Any]], tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """Row shape and dtype of every name, from a forward on ``rows``; also that forward's ``(saved, mask)``, which
    `_compute_shard` takes as its first batch when ``rows`` is that batch (a forward reads every weight once: on
    SmolLM2 even 4 tokens cost ~50 ms)."""
    saved, mask = _run_batch(model, names, rows, pad_id)
    out = {}
    for name in names:
        value = _per_token(name, saved[name.key], len(rows), mask.shape[1], key_length)
        out[name.key] = {"shape": list(value.shape[2:]), "dtype": _dtype_name(value.dtype)}
    return out, (saved, mask)


# ----------------------------------------------------------------------------------------------------------------
# Atomic file writes
# ----------------------------------------------------------------------------------------------------------------


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _commit(path: Path) -> None:
    """fsync ``path.tmp`` (written in full), rename it over ``path``, fsync the folder. Removes the temp on error."""
    tmp = path.with_name(path.name + _TMP_SUFFIX)
    try:
        fd = os.open(tmp, os.O_RDWR)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path.tmp``, then `_commit` it. Cleans the temp on error."""
    tmp = path.with_name(path.name + _TMP_SUFFIX)
    try:
        tmp.write_bytes(data)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _commit(path)


# safetensors' dtype names, in the order it lays tensors out (widest dtype first, then by name)
_SAFETENSORS_DTYPES = {
    torch.int64: "I64", torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
}  # fmt: skip


def _pwrite(fd: int, buffers: Sequence[Any], offset: int) -> None:
    """Write ``buffers`` back to back from ``offset`` (``os.pwritev``, at most ``IOV_MAX`` at a time) until every byte
    is written (a function of its own so tests can fill the disk)."""
    views = [view for view in (memoryview(b).cast("B") for b in buffers) if len(view)]
    while views:
        n = os.pwritev(fd, views[:_IOV_MAX], offset)
        if n <= 0:
            raise OSError(errno.EIO, f"pwritev wrote {n} bytes")
        offset += n
        while views and n >= len(views[0]):
            n -= len(views.pop(0))
        if n:
            views[0] = views[0][n:]


_IOV_MAX = os.sysconf("SC_IOV_MAX")  # the most buffers one pwritev takes (1024 on Linux)


class _ShardFile:
    """One shard being written: ``path.tmp`` laid out as a safetensors file (every tensor ``(rows, *row)``), filled
    in place as batches run, so each activation goes from the model's tensor to the file once, and no shard is ever
    held in memory. Rows are written a text at a time (or several whole texts), and each text's rows are hashed as
    they are written (`_text_digest`). `finish` checks every text of every tensor was written once and returns the
    size and checksum; `_commit` then makes it durable and visible.

    The format (github.com/huggingface/safetensors): a little-endian u64 header size, a JSON header (``__metadata__``,
    then ``{"dtype", "shape", "data_offsets"}`` per tensor) padded with spaces to 8 bytes, then the tensors' bytes in
    safetensors' own order: the file's bytes are the ones ``safetensors.torch.save`` makes of the same tensors
    (tests/test_cache.py), and every shard is read back with safetensors.

    ``bounds``: the ``(texts + 1,)`` row offsets of the shard's texts (`_text_bounds` of its ``text_index``)."""

    def __init__(self, path: Path, specs: dict[str, tuple[torch.dtype, Sequence[int]]], bounds: np.ndarray):
        order = list(_SAFETENSORS_DTYPES)
        self.names = sorted(specs, key=lambda name: (order.index(specs[name][0]), name))  # file order
        self.bounds, self.rows = [int(b) for b in bounds], int(bounds[-1])
        self.text_at = {b: t for t, b in enumerate(self.bounds)}  # first row of text t -> t (and rows -> texts)
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        self.dtype, self.row_bytes, self.offset, self.digests = {}, {}, {}, {}
        size = 0
        for name in self.names:
            dtype, row = specs[name]
            self.dtype[name], self.digests[name] = dtype, [None] * (len(self.bounds) - 1)  # per text, once written
            self.row_bytes[name] = math.prod(row) * torch.empty(0, dtype=dtype).element_size()
            self.offset[name] = size
            header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": [self.rows, *row],
                            "data_offsets": [size, size + self.rows * self.row_bytes[name]]}  # fmt: skip
            size += self.rows * self.row_bytes[name]
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-(8 + len(text)) % 8)  # the tensors' bytes start 8-byte aligned
        self.head = len(text).to_bytes(8, "little") + text
        self.start, self.size = len(self.head), len(self.head) + size
        self.tmp = path.with_name(path.name + _TMP_SUFFIX)
        self.fd = os.open(self.tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _pwrite(self.fd, [self.head], 0)
        except BaseException:
            self.abort()
            raise

    def write(self, name: str, row: int, value: torch.Tensor) -> None:
        """Rows ``row .. row + len(value) - 1`` of ``name``: whole texts of the shard (`write_texts`)."""
        self.write_texts(name, value.unsqueeze(0), [(0, row, len(value))])

    def write_texts(self, name: str, value: torch.Tensor, spans: Sequence[tuple[int, int, int]]) -> None:
        """Texts of one batch: ``value`` is ``(batch, width, *row)`` (converted to the shard's dtype for ``name``,
        copied to the CPU if needed); each ``(j, row, length)`` writes ``value[j, :length]`` at rows ``row ..
        row + length - 1``, which must be whole texts of the shard. Texts that land next to each other in the file go
        out in one ``pwritev``, and each text's rows are hashed here, while they are in the CPU's cache."""
        import xxhash

        data = value.detach()
        if data.device.type != "cpu" or data.dtype != self.dtype[name]:
            data = data.to(device="cpu", dtype=self.dtype[name])
        data = data.contiguous()
        row_bytes, digests = self.row_bytes[name], self.digests[name]
        if data.dim() < 2 or math.prod(data.shape[2:]) * data.element_size() != row_bytes:
            raise CacheError(f"{name}: rows of shape {tuple(data.shape[2:])} do not fit the shard's rows of "
                             f"{row_bytes} bytes")  # fmt: skip
        flat = data.view(torch.uint8).numpy().reshape(len(data), -1)  # (batch, width * row_bytes)
        runs: list[tuple[int, list[Any]]] = []  # (file offset, buffers written back to back there)
        new: dict[int, bytes] = {}  # text -> digest of its rows
        end = -1
        for j, row, length in sorted(spans, key=lambda span: span[1]):
            if row < 0 or length < 1 or row + length > self.rows or length > data.shape[1]:
                raise CacheError(f"{name}: rows {row}..{row + length} do not fit the shard's {self.rows} rows")
            first, last = self.text_at.get(row), self.text_at.get(row + length)
            if first is None or last is None:
                raise CacheError(f"internal error: {name} rows {row}..{row + length} are not whole texts of the shard")
            buffer = flat[j, : length * row_bytes]
            for t in range(first, last):
                if digests[t] is not None or t in new:
                    raise CacheError(f"internal error: {name} rows {self.bounds[t]}..{self.bounds[t + 1]} written "
                                     "twice")  # fmt: skip
                new[t] = xxhash.xxh3_128_digest(buffer[(self.bounds[t] - row) * row_bytes :
                                                       (self.bounds[t + 1] - row) * row_bytes])  # fmt: skip
            offset = self.start + self.offset[name] + row * row_bytes
            if offset == end:
                runs[-1][1].append(buffer)
            else:
                runs.append((offset, [buffer]))
            end = offset + length * row_bytes
        for offset, buffers in runs:
            _pwrite(self.fd, buffers, offset)
        for t, digest in new.items():
            digests[t] = digest

    def finish(self) -> tuple[int, str]:
        """Close the file; its size and checksum. Every text of every tensor must have been written once."""
        holes = {name: sum(d is None for d in done) for name, done in self.digests.items() if None in done}
        if holes:
            self.abort()
            raise CacheError(f"internal error: texts never written, per name: {holes} (of {len(self.bounds) - 1})")
        try:
            if os.fstat(self.fd).st_size != self.size:
                raise OSError(errno.EIO, f"{self.tmp} holds {os.fstat(self.fd).st_size} bytes, not {self.size}")
        except BaseException:
            self.abort()
            raise
        os.close(self.fd)
        return self.size, _text_digest(self.head, (d for name in self.names for d in self.digests[name]))

    def abort(self) -> None:
        os.close(self.fd)
        self.tmp.unlink(missing_ok=True)


def _write_shard(path: Path, tensors: dict[str, torch.Tensor]) -> tuple[int, str]:
    """Write whole tensors (same number of rows, ``text_index`` among them) as a shard's temp file; its size and
    checksum (`_ShardFile`)."""
    bounds = _text_bounds(tensors["text_index"].numpy())
    shard = _ShardFile(path, {name: (t.dtype, tuple(t.shape[1:])) for name, t in tensors.items()}, bounds)
    try:
        for name, tensor in tensors.items():
            if len(tensor):
                shard.write(name, 0, tensor)
    except BaseException:
        shard.abort()
        raise
    return shard.finish()


def _write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    _atomic_write(path, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())


def _disk_full(err: OSError, out_dir: Path, done: int, what: str) -> CacheDiskFullError:
    return CacheDiskFullError(
        errno.ENOSPC,
        f"disk full while writing {what} in {out_dir}. The store is consistent ({done} complete shard(s), "
        "listed in manifest.json; the partial file was removed). Free some space and run the same call again to "
        f"resume. ({err})",
    )


def _shard_name(k: int) -> str:
    return f"shard_{k:05d}.safetensors"


# ----------------------------------------------------------------------------------------------------------------
# Resume
# ----------------------------------------------------------------------------------------------------------------


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += _diff(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [f"{prefix.rstrip('.')}: store has {a!r}, this run has {b!r}"]


def _prepare_out_dir(out_dir: Path, header: dict[str, Any], plan: list[tuple[int, int]], tokens: "_Tokens"
                     ) -> dict[int, dict[str, Any]]:
    """Check ``out_dir`` holds nothing or a store of this very run; return its complete shards ``{k: entry}``: the
    ones manifest.json lists and the ones ranks of a distributed run finished (``shard_k.done.json``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = out_dir / MANIFEST
    files = [p for p in out_dir.iterdir()]
    ours = lambda p: (_SHARD_RE.match(p.name) or _DONE_RE.match(p.name) or p.name == MANIFEST  # noqa: E731
                      or p.name.endswith(_TMP_SUFFIX))
    if not manifest_path.exists():
        foreign = sorted(p.name for p in files if not ours(p))
        if foreign:
            raise CacheError(
                f"out_dir {out_dir} is not empty and holds no {MANIFEST} (found {foreign[:5]}): it is not an "
                "activation store. Pass an empty or new folder."
            )
        done: list[dict[str, Any]] = []
    else:
        try:
            existing = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise CacheError(f"{manifest_path} is unreadable ({err}); pass a new out_dir.") from err
        if existing.get("format") != FORMAT:
            raise CacheError(f"{manifest_path} is not a unilens activation-store manifest; pass a new out_dir.")
        theirs = {k: v for k, v in existing.items() if k not in ("complete", "shards")}
        diffs = _diff(theirs, header)
        if diffs:
            raise CacheError(
                f"out_dir {out_dir} holds a store made with a different model, inputs or arguments; refusing to mix "
                "them. Pass a new out_dir, or repeat the original call to resume it. Differences:\n  "
                + "\n  ".join(diffs[:10])
            )
        done = []
        for entry in existing.get("shards", []):  # trust listed shards whose file is there with the listed size
            path = out_dir / entry["file"]
            if not path.is_file() or path.stat().st_size != entry["bytes"]:
                warnings.warn(f"{entry['file']} is missing or truncated; recomputing from it.", stacklevel=3)
                break
            done.append(entry)
    complete = {k: entry for k, entry in enumerate(done)}
    if manifest_path.exists():
        for p in sorted(files):  # shards finished by ranks of a distributed run after the manifest was written
            match = _DONE_RE.match(p.name)
            if match and int(match.group(1)) not in complete and int(match.group(1)) < len(plan):
                k = int(match.group(1))
                try:
                    entry = json.loads(p.read_text())
                except (OSError, json.JSONDecodeError):
                    continue  # unreadable: recompute the shard
                expected = _expected_entry(k, plan, tokens, rows=not header["args"].get("generate_tokens"))
                if isinstance(entry, dict) and entry == {**entry, **expected}:
                    shard = out_dir / entry["file"]
                    if shard.is_file() and shard.stat().st_size == entry.get("bytes"):
                        complete[k] = entry
    listed = {entry["file"] for entry in complete.values()}
    for p in files:  # temp files and shards written after the last manifest update are never read: remove them
        if (p.name.endswith(_TMP_SUFFIX) or (_SHARD_RE.match(p.name) and p.name not in listed)
                or (_DONE_RE.match(p.name) and int(_DONE_RE.match(p.name).group(1)) not in complete)):
            p.unlink(missing_ok=True)
    return complete


def _expected_entry(k: int, plan: list[tuple[int, int]], tokens: "_Tokens", rows: bool = True) -> dict[str, Any]:
    """The plan-determined fields of shard ``k``'s manifest entry (file name, original text range, and the global
    rows unless texts are continued by generation: then a shard's row count is known once it is computed)."""
    a, b = plan[k]
    entry: dict[str, Any] = {
        "file": _shard_name(k), "texts": [int(tokens.text_index[a]), int(tokens.text_index[b - 1]) + 1],
    }  # fmt: skip
    if rows:
        entry["rows"] = [int(tokens.offsets[a]), int(tokens.offsets[b])]
    return entry


def _contiguous(done: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """The entries of shards ``0..k`` with every one of them complete (what manifest.json lists), their ``rows``
    (global row range) laid end to end from each shard's row count."""
    out: list[dict[str, Any]] = []
    start = 0
    while len(out) in done:
        entry = done[len(out)]
        n = entry["rows"][1] - entry["rows"][0]
        out.append({**entry, "rows": [start, start + n]})
        start += n
    return out


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------


def cache_activations(
    model: "StandardizedTransformer",
    texts: Sequence[str],
    names: str | Sequence[str],
    out_dir: str | os.PathLike,
    batch_size: int = 8,
    max_length: int | None = None,
    dtype: torch.dtype | str | None = None,
    shard_tokens: int | None = None,
    progress: bool = True,
    generate_tokens: int = 0,
) -> "ActivationStore":
    """Run ``model`` over ``texts`` and store the per-token activations ``names`` in ``out_dir`` (resumable).

    ``names``: ``"layers_output.12"``, ``"mlps_output.*"`` (every layer), ``"attention_probabilities.3"``,
    ``"logits"`` (see the module docstring for row shapes). Padding never reaches the store. ``max_length``
    truncates each text to its first ``max_length`` tokens. ``dtype`` is the stored dtype (default: the model's).
    ``shard_tokens`` is the number of rows after which a shard is closed (default: about 256 MiB per shard).
    Calling again with the same arguments after a crash resumes from the last complete shard; on a complete
    store it returns the store at once. A store made with other arguments is refused, never mixed.
    ``generate_tokens=n``: also store up to ``n`` greedily generated tokens per text, read during generation
    (module docstring; not for ``attention_probabilities``).

    Under an initialized ``torch.distributed`` process group every rank must make the same call (same model,
    texts, arguments): shards are split over ranks, rank 0 writes the manifest, every rank returns the store.

    Example:
        >>> import tempfile
        >>> from unilens import StandardizedTransformer
        >>> from unilens.testing import tiny_model
        >>> model = StandardizedTransformer(*tiny_model("gpt2"))
        >>> out = tempfile.mkdtemp()
        >>> store = cache_activations(model, ["The cat sat", "Hello"], ["layers_output.*"], out, progress=False)
        >>> store["layers_output.0"].shape == (len(store), model.hidden_size)
        True
    """
    out_dir = Path(out_dir)
    if isinstance(texts, str):
        raise CacheError("texts is a single string; pass a list of strings, e.g. [text].")
    texts = list(texts)
    if not texts:
        raise CacheError("texts is empty: pass at least one non-empty string.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise CacheError(f"batch_size must be a positive int, got {batch_size!r}.")
    if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
        raise CacheError(f"max_length must be a positive int or None, got {max_length!r}.")
    if shard_tokens is not None and (not isinstance(shard_tokens, int) or shard_tokens < 1):
        raise CacheError(f"shard_tokens must be a positive int or None, got {shard_tokens!r}.")
    if not isinstance(generate_tokens, int) or generate_tokens < 0:
        raise CacheError(f"generate_tokens must be an int >= 0, got {generate_tokens!r}.")
    store_dtype = _parse_dtype(dtype)
    resolved = _resolve_names(model, names)
    if generate_tokens:
        for name in resolved:
            if name.accessor == "attention_probabilities":
                raise CacheError(
                    f"{name.key} cannot be cached with generate_tokens: each generated token attends over a key "
                    "length that grows by one per step, which has no fixed row shape here. Cache it without "
                    "generate_tokens (a forward over the text), or cache attention_heads / attention_queries."
                )

    tokens = _tokenize(model.tokenizer, texts, max_length)
    if tokens.skipped:
        if len(tokens.skipped) == len(texts):
            raise CacheError("every text is empty (or tokenizes to no token): nothing to cache.")
        warnings.warn(
            f"skipping {len(tokens.skipped)} empty text(s) (indices {tokens.skipped[:10]}"
            f"{'...' if len(tokens.skipped) > 10 else ''}); other texts keep their index.",
            stacklevel=2,
        )
    pad_id = _pad_id(model.tokenizer)
    key_length = max_length if max_length is not None else int(np.diff(tokens.offsets).max())
    rank, world = rank_world()
    # The probe forward (row shapes) is the first batch this rank computes on a fresh store where the shard plan is
    # known before it (shard_tokens given, no generation): its activations are kept for that shard, not recomputed
    first_shard: int | None = None
    probe = [tokens.of(0)[:4]]
    plan = _plan_shards(tokens, shard_tokens) if shard_tokens is not None else None
    if plan is not None and not generate_tokens:
        fresh = list(range(len(plan)))[rank::world]  # what this rank computes on a fresh store
        if fresh and not (out_dir / _shard_name(fresh[0])).exists():  # (a resumed store may have it: a short probe)
            first_shard = fresh[0]
            probe = [tokens.of(k) for k in _batches(tokens, *plan[first_shard], batch_size)[0]]
    rows_spec, probed = _probe_rows(model, resolved, probe, key_length, pad_id)
    if store_dtype is not None:
        for spec in rows_spec.values():
            spec["dtype"] = _dtype_name(store_dtype)
    if shard_tokens is None:
        row_bytes = sum(
            math.prod(s["shape"]) * torch.empty(0, dtype=_DTYPES.get(s["dtype"], torch.float32)).element_size()
            for s in rows_spec.values()
        )
        shard_tokens = max(1, _DEFAULT_SHARD_BYTES // max(1, row_bytes))
        plan = _plan_shards(tokens, shard_tokens)
    total = int(tokens.offsets[-1])

    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": _model_identity(model),
        "names": [n.key for n in resolved],
        "rows": rows_spec,
        "args": {
            "batch_size": batch_size,
            "max_length": max_length,
            "dtype": None if store_dtype is None else _dtype_name(store_dtype),
            "shard_tokens": shard_tokens,
            "key_length": key_length if any(n.accessor == "attention_probabilities" for n in resolved) else None,
            "padding": "right",
            **({"generate_tokens": generate_tokens} if generate_tokens else {}),
        },
        "inputs": {
            "num_texts": len(texts),
            "num_cached_texts": len(tokens.text_index),
            "num_tokens": total,
            "tokens_sha256": tokens.sha256(),
            "skipped_texts": tokens.skipped,
            "truncated_texts": tokens.truncated,
        },
        "num_shards": len(plan),
        "versions": dict(_versions()),
    }
    manifest_path = out_dir / MANIFEST
    if world > 1:  # every rank must be about to write the very same store
        digests = all_gather_objects(hashlib.sha256(json.dumps(header, sort_keys=True, default=str).encode())
                                     .hexdigest())
        if len(set(digests)) > 1:
            odd = [r for r, d in enumerate(digests) if d != digests[0]]
            raise CacheError(
                f"ranks {odd} would write a different store than rank 0 (model weights, texts or arguments differ); "
                "every rank must call cache_activations with the same model, texts and arguments."
            )
    status: Any = None
    if rank == 0:  # only rank 0 touches manifest.json; the others learn the finished shards from it
        try:
            done = _prepare_out_dir(out_dir, header, plan, tokens)
            _write_manifest(manifest_path, {**header, "complete": len(done) == len(plan), "shards": _contiguous(done)})
            status = done
        except CacheError as err:
            status = err
        except OSError as err:
            if err.errno not in _DISK_FULL:
                raise
            status = _disk_full(err, out_dir, 0, MANIFEST)
    status = broadcast_object(status)
    if isinstance(status, BaseException):
        raise status
    done = {int(k): entry for k, entry in status.items()}

    # The shards still to compute, split over ranks by shard: round robin over the plan's order
    todo = [k for k in range(len(plan)) if k not in done]
    mine = todo[rank::world]
    if world > 1 and rank == 0 and 0 < len(todo) < world:
        warnings.warn(
            f"{len(todo)} shard(s) to compute for {world} ranks: ranks {list(range(len(todo), world))} stay idle. "
            "Shards are the unit of work: pass a smaller shard_tokens to spread the texts over every rank.",
            stacklevel=2,
        )
    delay = float(os.environ.get(_DELAY_ENV, "0") or 0)
    done_tokens = sum(e["rows"][1] - e["rows"][0] for e in done.values())
    upper = total + generate_tokens * len(tokens.text_index)  # with generation: at most this many rows
    bar = RankProgress(upper, done_tokens, progress, desc="caching activations")
    written: dict[int, dict[str, Any]] = {}

    def record(k: int, entry: dict[str, Any]) -> None:
        """Make shard ``k`` (written to its temp file) durable, rename it and list it. On the writer thread: fsync waits
        on the disk, which overlaps the next shard's forwards (the CPU work, writing and hashing, stays on the main
        thread, where it cannot slow the forwards' threads down)."""
        try:
            _commit(out_dir / entry["file"])
        except OSError as err:
            if err.errno in _DISK_FULL:
                raise _disk_full(err, out_dir, len(_contiguous(done)), entry["file"]) from err
            raise
        written[k] = entry
        try:
            if world == 1:  # one process: the manifest lists every shard as soon as it is on disk
                done[k] = entry
                listed = _contiguous(done)
                _write_manifest(manifest_path, {**header, "complete": len(done) == len(plan), "shards": listed})
            else:  # a rank's own record; rank 0 lists it in manifest.json once every rank is done
                _atomic_write(out_dir / f"shard_{k:05d}.done.json", json.dumps(entry, sort_keys=True).encode())
        except OSError as err:  # the shard is on disk but unrecorded: it is recomputed on resume
            if err.errno in _DISK_FULL:
                raise _disk_full(err, out_dir, len(_contiguous(done)), MANIFEST) from err
            raise

    # Shard k is written to its temp file as it is computed (`_ShardFile`), then committed (fsync, rename, manifest)
    # by one writer thread while shard k+1 is computed; shards are recorded in order, and a write error stops the run
    # at the next shard.
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="unilens-cache-writer")
    pending: Future | None = None
    specs = {key: (_DTYPES[spec["dtype"]], tuple(spec["shape"])) for key, spec in rows_spec.items()}
    specs.update({key: (torch.int64, ()) for key in _META_NAMES})
    try:
        for k in mine:
            a, b = plan[k]
            entry = _expected_entry(k, plan, tokens, rows=not generate_tokens)
            try:
                if generate_tokens:
                    tensors, n_rows = _compute_shard_generated(
                        model, resolved, tokens, a, b, generate_tokens, pad_id, rows_spec, bar, delay
                    )
                    entry["bytes"], entry[_CHECKSUM] = _write_shard(out_dir / entry["file"], tensors)
                    del tensors
                else:
                    reuse, probed = (probed if k == first_shard else None), None  # the probe ran its first batch
                    n_rows = int(tokens.offsets[b] - tokens.offsets[a])
                    shard = _ShardFile(out_dir / entry["file"], specs, tokens.offsets[a : b + 1] - tokens.offsets[a])
                    try:
                        _compute_shard(model, resolved, tokens, a, b, batch_size, key_length, pad_id, shard, bar,
                                       delay, reuse)  # fmt: skip
                    except BaseException:
                        shard.abort()
                        raise
                    entry["bytes"], entry[_CHECKSUM] = shard.finish()
            except OSError as err:
                if err.errno in _DISK_FULL:
                    raise _disk_full(err, out_dir, len(_contiguous(done)), entry["file"]) from err
                raise
            entry = {"rows": [0, n_rows], **entry}  # generated shards: their own row count (plan rows win otherwise)
            if pending is not None:
                pending.result()
            pending = writer.submit(record, k, entry)
        if pending is not None:
            pending.result()
        bar.finish()
    finally:
        writer.shutdown(wait=True)  # a shard being written when a forward failed still lands (a resume keeps it)
        bar.close()
    if world > 1:
        for part in all_gather_objects(written):  # also the barrier: every rank has written its shards
            done.update(part)
    if rank == 0:
        listed = _contiguous(done)
        if world > 1:
            _write_manifest(manifest_path, {**header, "complete": len(done) == len(plan), "shards": listed})
        for k in range(len(listed)):  # records of shards the manifest now lists
            (out_dir / f"shard_{k:05d}.done.json").unlink(missing_ok=True)
    barrier()  # the manifest is written before any rank reads the store
    return ActivationStore(out_dir)



def _compute_shard(
    model: "StandardizedTransformer",
    names: list[_Name],
    tokens: _Tokens,
    a: int,
    b: int,
    batch_size: int,
    key_length: int,
    pad_id: int,
    shard: _ShardFile,
    bar: Any,
    delay: float,
    first_batch: tuple[dict[str, torch.Tensor], torch.Tensor] | None = None,
) -> None:
    """Write the activations of kept texts ``a..b-1`` into ``shard``, rows in text then position order.
    ``first_batch``: the ``(saved, mask)`` of the shard's first batch, when the probe ran it already."""
    start = int(tokens.offsets[a])
    by_key = {name.key: name for name in names}
    for i, batch in enumerate(_batches(tokens, a, b, batch_size)):
        # text k's real tokens are the first length(k) positions of its row (right padding) and rows
        # offsets[k] - start .. + length(k) of the shard; each text is in one batch, so every row is written once
        spans = [(j, int(tokens.offsets[k]) - start, tokens.length(k)) for j, k in enumerate(batch)]
        width = max(length for _, _, length in spans)

        def store(key: str, value: torch.Tensor) -> None:
            value = _per_token(by_key[key], value, len(spans), width, key_length)
            shard.write_texts(key, value, spans)

        if i == 0 and first_batch is not None:
            saved, _ = first_batch
        else:  # names read by a hook are stored during the forward
            saved, _ = _run_batch(model, names, [tokens.of(k) for k in batch], pad_id, consume=store)
        for key, value in saved.items():  # names read through a trace (every name of the probe's batch)
            store(key, value)
        if bar is not None:
            bar.update(sum(length for _, _, length in spans))
        if delay:
            time.sleep(delay)
    lengths = np.diff(tokens.offsets[a : b + 1])
    shard.write("token_ids", 0, torch.from_numpy(tokens.ids[start : int(tokens.offsets[b])]))
    shard.write("text_index", 0, torch.from_numpy(np.repeat(tokens.text_index[a:b], lengths)))
    shard.write("position", 0, torch.from_numpy(np.concatenate([np.arange(n) for n in lengths]).astype(np.int64)))


def _generate_steps(
    model: "StandardizedTransformer", names: list[_Name], prompt: np.ndarray, n_new: int, pad_id: int
) -> tuple[dict[str, list[torch.Tensor]], torch.Tensor]:
    """Greedy ``model.generate`` of ``n_new + 1`` tokens after one prompt (KV cache on), saving ``names`` at every
    forward step: step 0 is the prompt ``(1, prompt, ...)``, step ``j`` the ``j``-th generated token fed back
    ``(1, 1, ...)``. Returns ``({name: [step tensors]}, generated ids (new,))``; fewer steps when the model ends
    the text (end-of-sequence) early. The ``n_new + 1``-th token is generated but never fed back (no row)."""
    ids = torch.from_numpy(prompt)[None].to(model.input_device)  # (1, prompt)
    steps: dict[str, list[torch.Tensor]] = {name.key: [] for name in names}  # built outside the trace (nnsight)
    result: dict[str, torch.Tensor] = {}
    # every position's logits when they are cached (generate keeps only the last one by default)
    keep = {"logits_to_keep": 0} if any(n.layer is None for n in names) and model._keep_last_logits_kwargs() else {}
    with warnings.catch_warnings():
        # a text that ends early leaves the loop's last request unserved: nnsight warns; the steps made are kept
        warnings.filterwarnings("ignore", message=".*was never reached.*")
        with torch.no_grad(), model.generate(max_new_tokens=n_new + 1, do_sample=False, pad_token_id=pad_id,
                                             **keep) as tracer:  # fmt: skip
            with tracer.invoke({"input_ids": ids, "attention_mask": torch.ones_like(ids)}):
                for _ in tracer.iter[: n_new + 1]:
                    for name in names:
                        value = model.logits if name.layer is None else getattr(model, name.accessor)[name.layer]
                        steps[name.key].append(value.save())
            with tracer.invoke():
                result["tokens"] = tracer.result.save()
    return steps, result["tokens"][0, len(prompt) :].cpu()


def _compute_shard_generated(
    model: "StandardizedTransformer",
    names: list[_Name],
    tokens: _Tokens,
    a: int,
    b: int,
    n_new: int,
    pad_id: int,
    rows_spec: dict[str, dict[str, Any]],
    bar: Any,
    delay: float,
) -> tuple[dict[str, torch.Tensor], int]:
    """Like `_compute_shard`, each text continued by up to ``n_new`` generated tokens whose activations are read
    during generation (one text per ``generate`` call: no padding): rows = prompt tokens, then generated tokens."""
    parts: dict[str, list[torch.Tensor]] = {key: [] for key in rows_spec}
    ids, text_index, position = [], [], []
    for k in range(a, b):
        prompt = tokens.of(k)
        steps, new = _generate_steps(model, names, prompt, n_new, pad_id)
        n_steps = min(len(v) for v in steps.values())  # forwards made: prompt + generated tokens fed back
        for name in names:
            per_step = [_per_token(name, v, 1, v.shape[2 if _KINDS.get(name.accessor) == "heads_first" else 1], 0)
                        for v in steps[name.key][:n_steps]]  # (1, seq, *row) each
            rows = torch.cat(per_step, dim=1)[0]  # (prompt + generated fed back, *row)
            parts[name.key].append(rows.to(device="cpu", dtype=_DTYPES[rows_spec[name.key]["dtype"]]))
        fed = np.concatenate([prompt, new[: n_steps - 1].numpy().astype(np.int64)])
        ids.append(fed)
        text_index.append(np.full(len(fed), tokens.text_index[k], dtype=np.int64))
        position.append(np.arange(len(fed), dtype=np.int64))
        bar.update(len(fed))
        if delay:
            time.sleep(delay)
    tensors = {key: torch.cat(value) for key, value in parts.items()}
    tensors["token_ids"] = torch.from_numpy(np.concatenate(ids))
    tensors["text_index"] = torch.from_numpy(np.concatenate(text_index))
    tensors["position"] = torch.from_numpy(np.concatenate(position))
    return tensors, int(tensors["token_ids"].shape[0])


# ----------------------------------------------------------------------------------------------------------------
# Reading a store
# ----------------------------------------------------------------------------------------------------------------


class ActivationStore:
    """Read an activation store written by ``cache_activations``.

    ``store[name]`` is ``(tokens, *row)`` over all shards (also ``"token_ids"``, ``"text_index"``,
    ``"position"``); ``store.shard(k)`` / ``store.iter_shards()`` read one shard at a time;
    ``store.dataset()`` is a torch ``Dataset`` of rows; ``store.verify()`` checks every shard's checksum.

    Example:
        >>> import tempfile
        >>> from unilens import StandardizedTransformer
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


# ----------------------------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------------------------


def read_texts(texts_path: str | os.PathLike) -> list[str]:
    """Texts from a ``.jsonl`` file (one JSON object per line with a ``"text"`` field; blank lines ignored) or a
    ``.txt`` file (one text per line; line ``i`` is text ``i``, an empty line an empty text).

    Example:
        >>> import pathlib, tempfile
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "prompts.txt"
        >>> _ = path.write_text("The cat sat\\nHello\\n")
        >>> read_texts(path)
        ['The cat sat', 'Hello']
    """
    path = Path(texts_path)
    if not path.is_file():
        raise FileNotFoundError(f"texts file {str(path)!r} does not exist.")
    raw = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise CacheError(f"{path}:{n} is not valid JSON ({err}).") from err
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise CacheError(f'{path}:{n}: each line must be a JSON object with a string "text" field.')
            texts.append(record["text"])
        return texts
    if path.suffix == ".txt":
        return raw.split("\n")[:-1] if raw.endswith("\n") else raw.split("\n")
    raise CacheError(f"{path}: unsupported texts file; use .jsonl (field \"text\") or .txt (one text per line).")


def main_cache(
    texts_path: str,
    names: list[str],
    out_dir: str,
    model_source: str | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    *,
    shard_tokens: int | None = None,
    dtype: str | None = None,
    progress: bool = True,
    generate_tokens: int = 0,
) -> ActivationStore:
    """CLI entry: read texts from ``texts_path``, load ``model_source`` (default: the embedded SmolLM2), cache.

    Example:
        >>> import pathlib, tempfile
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (folder / "prompts.txt").write_text("The capital of France is\\n")
        >>> store = main_cache(str(folder / "prompts.txt"), ["layers_output.0"], str(folder / "acts"), progress=False)
        >>> store["layers_output.0"].shape[0] == len(store)
        True
    """
    from .distributed import init_from_env

    started = init_from_env()  # under torchrun: join its process group (gloo on CPU, nccl with CUDA)
    try:
        texts = read_texts(texts_path)
        from ..model.transformer import StandardizedTransformer, load_default

        kwargs: dict[str, Any] = {}
        if started and torch.cuda.is_available():  # each rank on its own GPU
            kwargs["device_map"] = {"": torch.cuda.current_device()}
        if model_source is None:
            model = load_default(**kwargs)
        else:
            model = StandardizedTransformer(model_source, dtype=torch.float32, **kwargs)
        return cache_activations(
            model, texts, names, out_dir, batch_size=batch_size, max_length=max_length, dtype=dtype,
            shard_tokens=shard_tokens, progress=progress, generate_tokens=generate_tokens,
        )  # fmt: skip
    finally:
        if started:
            torch.distributed.destroy_process_group()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m unilens.cache", description="Cache per-token activations to shards.")
    p.add_argument("texts", help=".jsonl (field 'text') or .txt (one text per line)")
    p.add_argument("out_dir", help="store folder (created; an interrupted run here is resumed)")
    p.add_argument("--names", nargs="+", required=True, help="e.g. layers_output.* attention_probabilities.3")
    p.add_argument("--model", default=None, help="folder, .gguf, or hub id in the local cache (default: SmolLM2)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--shard-tokens", type=int, default=None)
    p.add_argument("--dtype", default=None, choices=sorted(_DTYPES))
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--generate-tokens", type=int, default=0, help="also store up to this many greedily generated "
                   "tokens per text, read during generation (KV cache on)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        store = main_cache(
            args.texts, args.names, args.out_dir, args.model, args.batch_size, args.max_length,
            shard_tokens=args.shard_tokens, dtype=args.dtype, progress=not args.no_progress,
            generate_tokens=args.generate_tokens,
        )  # fmt: skip
    except (CacheError, CacheDiskFullError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:  # one line per job, not per torchrun rank
        print(store)
    return 0


if __name__ == "__main__":
    sys.exit(main())
