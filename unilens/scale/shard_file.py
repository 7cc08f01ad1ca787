"""Durable files of an activation store: a shard written in place as a safetensors file (`_ShardFile`), hashed as
it is written, and the commit step (fsync, rename, fsync the folder) that shards and JSON files go through."""

from __future__ import annotations

import errno
import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import xxhash

from .store_format import (
    _DIGEST_PLACEHOLDER,
    _META_DATA,
    _TMP_SUFFIX,
    CacheError,
    _data_digest,
    _text_bounds,
    _text_digest,
)

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


def _write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    _atomic_write(path, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())


# ----------------------------------------------------------------------------------------------------------------
# Shard files
# ----------------------------------------------------------------------------------------------------------------

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


def _shard_layout(specs: dict[str, tuple[torch.dtype, Sequence[int]]], rows: int,
                  metadata: dict[str, str] | None = None) -> tuple[list[str], dict[str, int], dict[str, int], bytes]:
    """The layout of a shard of ``rows`` rows holding ``specs`` (``{name: (dtype, row shape)}``): the names in file
    order, each one's row size and offset in the data, and the header bytes (size + JSON, ``__metadata__`` =
    ``{"format": "pt", **metadata}``). The header depends on nothing else, so a shard's header can be rebuilt and
    compared byte for byte (`unilens.scale.writer`, adopting a shard no manifest lists)."""
    order = list(_SAFETENSORS_DTYPES)
    names = sorted(specs, key=lambda name: (order.index(specs[name][0]), name))  # file order
    header: dict[str, Any] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    row_bytes, offset = {}, {}
    size = 0
    for name in names:
        dtype, row = specs[name]
        row_bytes[name] = math.prod(row) * torch.empty(0, dtype=dtype).element_size()
        offset[name] = size
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": [rows, *row],
                        "data_offsets": [size, size + rows * row_bytes[name]]}  # fmt: skip
        size += rows * row_bytes[name]
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)  # the tensors' bytes start 8-byte aligned
    return names, row_bytes, offset, len(text).to_bytes(8, "little") + text


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

    def __init__(self, path: Path, specs: dict[str, tuple[torch.dtype, Sequence[int]]], bounds: np.ndarray,
                 metadata: dict[str, str] | None = None):
        self.bounds, self.rows = [int(b) for b in bounds], int(bounds[-1])
        self.text_at = {b: t for t, b in enumerate(self.bounds)}  # first row of text t -> t (and rows -> texts)
        # metadata: the shard's own record (store format 4), with a placeholder for the digest of its data, which
        # `finish` writes in place (same length) once every block is hashed
        self.metadata = None if metadata is None else {**metadata, _META_DATA: _DIGEST_PLACEHOLDER}
        self.names, self.row_bytes, self.offset, self.head = _shard_layout(specs, self.rows, self.metadata)
        self.dtype = {name: specs[name][0] for name in self.names}
        self.digests = {name: [None] * (len(self.bounds) - 1) for name in self.names}  # per text, once written
        self.start = len(self.head)
        self.size = self.start + sum(self.rows * self.row_bytes[name] for name in self.names)
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
        blocks = [d for name in self.names for d in self.digests[name]]
        try:
            if self.metadata is not None:  # the digest of the data, in place of its placeholder (same length)
                field = f'"{_META_DATA}":"{_DIGEST_PLACEHOLDER}"'.encode()
                self.head = self.head.replace(field, f'"{_META_DATA}":"{_data_digest(blocks)}"'.encode(), 1)
                _pwrite(self.fd, [self.head], 0)
            if os.fstat(self.fd).st_size != self.size:
                raise OSError(errno.EIO, f"{self.tmp} holds {os.fstat(self.fd).st_size} bytes, not {self.size}")
        except BaseException:
            self.abort()
            raise
        os.close(self.fd)
        return self.size, _text_digest(self.head, iter(blocks))

    def abort(self) -> None:
        os.close(self.fd)
        self.tmp.unlink(missing_ok=True)


def _write_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
                 ) -> tuple[int, str]:
    """Write whole tensors (same number of rows, ``text_index`` among them) as a shard's temp file; its size and
    checksum (`_ShardFile`, with ``metadata``)."""
    bounds = _text_bounds(tensors["text_index"].numpy())
    shard = _ShardFile(path, {name: (t.dtype, tuple(t.shape[1:])) for name, t in tensors.items()}, bounds, metadata)
    try:
        for name, tensor in tensors.items():
            if len(tensor):
                shard.write(name, 0, tensor)
    except BaseException:
        shard.abort()
        raise
    return shard.finish()
