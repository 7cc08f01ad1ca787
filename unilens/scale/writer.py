"""Writing an activation store: `cache_activations` (the layout, resume, data parallel and generation are described
in `unilens.scale.store`) in four steps, under the store's lock (`unilens.scale.store_lock`): plan the run
(`_plan_run`), check ``out_dir`` and find the shards already complete, each verified from its bytes (`_resume`),
compute this rank's shards (`_compute_shards`), and finish the manifest (`_finish`)."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Sequence

import numpy as np
import torch

from ..core.distributed import (
    RankProgress,
    all_gather_objects,
    barrier,
    broadcast_object,
    rank_world,
)
from ..core.names import HEADS_FIRST, PROBS
from .capture import _generate_steps, _hf_modules, _per_token, _probe_rows, _run_batch
from .plan import _batches, _pack, _pad_id, _plan_shards, _tokenize, _Tokens
from .reader import ActivationStore, _signature
from .shard_file import (
    _atomic_write,
    _commit,
    _shard_layout,
    _ShardFile,
    _write_manifest,
    _write_shard,
)
from .store_format import (
    _CHECKSUM,
    _DISK_FULL,
    _DONE_RE,
    _DTYPES,
    _MANIFEST_CHECKSUM,
    _MANIFEST_REPAIR,
    _META_DATA,
    _META_NAMES,
    _META_SHARD,
    _META_STORE,
    _SHARD_RE,
    _TMP_SUFFIX,
    FORMAT,
    FORMAT_VERSION,
    LOCK,
    MANIFEST,
    CacheCorruptError,
    CacheDiskFullError,
    CacheError,
    CacheMismatchError,
    _differences,
    _done_name,
    _dtype_name,
    _join_differences,
    _legacy_identity,
    _load_manifest,
    _manifest_digest,
    _model_identity,
    _Name,
    _numerics,
    _parse_dtype,
    _resolve_names,
    _run_digest,
    _shard_checksum,
    _shard_name,
    _versions,
)
from .store_lock import StoreLock

if TYPE_CHECKING:
    from ..model.transformer import StandardizedTransformer

__all__ = ["cache_activations"]

# Testing hook: seconds to sleep after each batch, so a test can kill a run mid-shard.
_DELAY_ENV = "UNILENS_CACHE_TEST_DELAY"
_DEFAULT_SHARD_BYTES = 256 * 2**20  # automatic shard_tokens: about 256 MiB of activations per shard


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
    context_size: int | None = None,
    prepend_bos: bool = True,
    separator: int | Literal["bos", "eos", "sep"] | None = "bos",
    exclude_sinks: bool = False,
) -> ActivationStore:
    """Run ``model`` over ``texts`` and store the per-token activations ``names`` in ``out_dir`` (resumable).

    ``names``: ``"layers_output.12"``, ``"mlps_output.*"`` (every layer), ``"attention_probabilities.3"``,
    ``"logits"``, ``"token_embeddings"`` (`unilens.scale.store.CACHEABLE_NAMES`; see `unilens.scale.store` for row
    shapes). Padding never reaches the store. ``max_length``
    truncates each text to its first ``max_length`` tokens. ``dtype`` is the stored dtype (default: the model's).
    ``shard_tokens`` is the number of rows after which a shard is closed (default: about 256 MiB per shard).
    Calling again with the same arguments after a crash resumes: every shard already written is verified from its
    bytes first (a damaged one is recomputed, with a warning; a damaged manifest is rebuilt from the verified shards),
    and on a complete store it returns the store once verified. A store made with another model (any weight differs),
    other numerics settings (device, dtypes, torch threads, versions), other inputs or other arguments is refused
    (`CacheMismatchError`, listing the differences), never mixed. One process writes to ``out_dir`` at a time: a
    second one gets `CacheLockedError` at once.
    ``generate_tokens=n``: also store up to ``n`` greedily generated tokens per text, read during generation
    (`unilens.scale.store`; not for ``attention_probabilities``).

    ``context_size=n`` (SAELens's caching, `unilens.scale.store`'s "Packed contexts"): the texts, tokenized without
    special tokens, are packed into contexts of exactly ``n`` tokens, each starting with BOS (``prepend_bos``), texts
    in one context separated by ``separator`` (default BOS, as SAELens; ``None``: none), the last unfilled context
    dropped; the model runs on the contexts (``batch_size`` contexts per forward, no padding) and every token of a
    context is a row (``text_index`` = the context's index, ``position`` = the position in the context).
    ``exclude_sinks=True`` stores no row for each context's first token and the separators packing inserted (the
    attention sinks, whose norm dwarfs the others'); by default they are kept, as SAELens keeps them.

    The forward stops right after the last module a name is read from (the unembedding runs only for ``"logits"``).

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
    texts = _check_arguments(texts, batch_size, max_length, shard_tokens, generate_tokens)
    packing = _check_packing(context_size, prepend_bos, separator, exclude_sinks, max_length, generate_tokens)
    store_dtype = _parse_dtype(dtype)
    resolved = _check_names(model, names, generate_tokens)
    lock = _lock(Path(out_dir))  # before the inputs are tokenized: a second writer is refused at once
    try:
        run = _plan_run(model, texts, resolved, Path(out_dir), batch_size, max_length, store_dtype, shard_tokens,
                        generate_tokens, packing)  # fmt: skip
        done = _resume(run)
        written = _compute_shards(run, done, progress)
        return _finish(run, done, written)
    finally:
        if lock is not None:
            lock.release()


def _lock(out_dir: Path) -> StoreLock | None:
    """Rank 0 takes ``out_dir``'s lock (`StoreLock`) for the whole run; under torch.distributed every rank learns
    whether it got it (the other ranks write only the shards rank 0's plan gives them, while rank 0 holds it)."""
    rank, world = rank_world()
    lock: StoreLock | None = None
    status: Any = None
    if rank == 0:
        try:
            lock = StoreLock(out_dir)
        except CacheError as err:
            if world == 1:
                raise
            status = err
    if world > 1:
        status = broadcast_object(status)
        if isinstance(status, BaseException):
            raise status
    return lock


# ----------------------------------------------------------------------------------------------------------------
# Step 1: plan
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class _Run:
    """One `cache_activations` call, planned: what the model, inputs and arguments fix (every rank of a distributed
    run plans the same), and this rank's probe forward, kept for the shard whose first batch it ran."""

    model: "StandardizedTransformer"
    out_dir: Path
    names: list[_Name]  # in the model's forward order
    tokens: _Tokens
    batch_size: int
    key_length: int  # attention_probabilities rows: keys 0..key_length-1
    pad_id: int
    generate_tokens: int
    plan: list[tuple[int, int]]  # shard k holds kept texts plan[k][0] .. plan[k][1] - 1
    rows_spec: dict[str, dict[str, Any]]  # name -> {"shape": row shape, "dtype": stored dtype}
    header: dict[str, Any]  # manifest.json less "complete" and "shards": what a resumed run must match
    rank: int
    world: int
    first_shard: int | None  # the shard whose first batch the probe ran, or None
    probed: tuple[dict[str, torch.Tensor], torch.Tensor] | None  # that batch's (saved, mask), until it is used
    verified: dict[int, tuple[int, ...]] = field(default_factory=dict)  # shards verified on resume: signatures
    legacy: bool = False  # out_dir holds a complete store of format 1-3, returned as it is (`_legacy_store`)
    _digest: str | None = None

    @property
    def manifest_path(self) -> Path:
        return self.out_dir / MANIFEST

    @property
    def digest(self) -> str:
        """The run's `_run_digest`, which each of its shards carries in its metadata (the header is fixed once
        planned: computed once)."""
        if self._digest is None:
            self._digest = _run_digest(self.header)
        return self._digest

    def shard_metadata(self, k: int) -> dict[str, str]:
        """Shard ``k``'s own record in its safetensors metadata: this run and its index (`_ShardFile` adds the
        digest of its data)."""
        return {_META_STORE: self.digest, _META_SHARD: str(k)}

    def specs(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """``{name: (stored dtype, row shape)}`` of every tensor of a shard, the metadata ones included."""
        specs = {key: (_DTYPES[spec["dtype"]], tuple(spec["shape"])) for key, spec in self.rows_spec.items()}
        specs.update({key: (torch.int64, ()) for key in _META_NAMES})
        return specs

    def manifest(self, done: dict[int, dict[str, Any]]) -> dict[str, Any]:
        """manifest.json listing the complete shards ``done`` (those from shard 0 on without a gap), with its own
        checksum."""
        manifest = {**self.header, "complete": len(done) == len(self.plan), "shards": _contiguous(done)}
        return {**manifest, _MANIFEST_CHECKSUM: _manifest_digest(manifest)}


def _check_arguments(texts: Sequence[str], batch_size: int, max_length: int | None, shard_tokens: int | None,
                     generate_tokens: int) -> list[str]:  # fmt: skip
    """The texts as a list, once the arguments that need no model are checked."""
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
    return texts


def _check_packing(context_size: int | None, prepend_bos: bool, separator: Any, exclude_sinks: bool,
                   max_length: int | None, generate_tokens: int) -> dict[str, Any] | None:  # fmt: skip
    """The packing arguments of `_pack` (None: one text per forward row), once checked."""
    if context_size is None:
        given = [name for name, value, default in (("prepend_bos", prepend_bos, True), ("separator", separator, "bos"),
                                                   ("exclude_sinks", exclude_sinks, False)) if value != default]
        if given:
            raise CacheError(f"{', '.join(given)} only apply to packed contexts: pass context_size too.")
        return None
    if not isinstance(context_size, int) or isinstance(context_size, bool) or context_size < 1:
        raise CacheError(f"context_size must be a positive int or None, got {context_size!r}.")
    if max_length is not None:
        raise CacheError("max_length and context_size cannot be combined: packed texts are not truncated (a long "
                         "text runs on into the next context); leave max_length out.")  # fmt: skip
    if generate_tokens:
        raise CacheError("generate_tokens and context_size cannot be combined: generation continues one text, not a "
                         "packed context.")  # fmt: skip
    if separator is not None and not (isinstance(separator, int) and not isinstance(separator, bool)) \
            and separator not in ("bos", "eos", "sep"):
        raise CacheError(f"separator must be 'bos', 'eos', 'sep', a token id or None, got {separator!r}.")
    return {"context_size": context_size, "prepend_bos": bool(prepend_bos), "separator": separator,
            "exclude_sinks": bool(exclude_sinks)}  # fmt: skip


def _check_names(model: "StandardizedTransformer", names: str | Sequence[str], generate_tokens: int) -> list[_Name]:
    """The names resolved (`_resolve_names`), once checked against ``generate_tokens``."""
    resolved = _resolve_names(model, names)
    if generate_tokens:
        for name in resolved:
            if name.layout == PROBS:
                raise CacheError(
                    f"{name.key} cannot be cached with generate_tokens: each generated token attends over a key "
                    "length that grows by one per step, which has no fixed row shape here. Cache it without "
                    "generate_tokens (a forward over the text), or cache attention_heads / attention_queries."
                )
    return resolved


def _plan_run(
    model: "StandardizedTransformer", texts: list[str], resolved: list[_Name], out_dir: Path, batch_size: int,
    max_length: int | None, store_dtype: torch.dtype | None, shard_tokens: int | None, generate_tokens: int,
    packing: dict[str, Any] | None = None,
) -> _Run:
    """Tokenize (and pack) the texts, probe every name's row shape, plan the shards (``shard_tokens``, or about
    `_DEFAULT_SHARD_BYTES` per shard) and build the manifest's header."""
    if packing is None:
        tokens = _tokenize(model.tokenizer, texts, max_length)
    else:
        tokens = _pack(model.tokenizer, texts, **packing)
        if not len(tokens.text_index) and len(tokens.skipped) < len(texts):
            raise CacheError(f"the texts hold {tokens.packing['dropped_tokens']} tokens, fewer than one context of "
                             f"{packing['context_size']}: pass more text or a smaller context_size.")  # fmt: skip
    if tokens.skipped:
        if len(tokens.skipped) == len(texts):
            raise CacheError("every text is empty (or tokenizes to no token): nothing to cache.")
        warnings.warn(
            f"skipping {len(tokens.skipped)} empty text(s) (indices {tokens.skipped[:10]}"
            f"{'...' if len(tokens.skipped) > 10 else ''}); other texts keep their index.",
            stacklevel=3,  # the caller of cache_activations
        )
    pad_id = _pad_id(model.tokenizer)
    key_length = max_length if max_length is not None else int(np.diff(tokens.offsets).max())  # packed: context
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
    rows_spec, probed = _probe_rows(model, resolved, probe, key_length, pad_id, packed=packing is not None)
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

    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": _model_identity(model),
        "numerics": _numerics(model),
        "names": [n.key for n in resolved],
        "rows": rows_spec,
        "args": {
            "batch_size": batch_size,
            "max_length": max_length,
            "dtype": None if store_dtype is None else _dtype_name(store_dtype),
            "shard_tokens": shard_tokens,
            "key_length": key_length if any(n.layout == PROBS for n in resolved) else None,
            "padding": "right" if packing is None else "none",
            **({"generate_tokens": generate_tokens} if generate_tokens else {}),
        },
        "inputs": {
            "num_texts": len(texts),
            "num_cached_texts": len(tokens.text_index),
            "num_tokens": int(tokens.offsets[-1]),
            "tokens_sha256": tokens.sha256(),
            "skipped_texts": tokens.skipped,
            "truncated_texts": tokens.truncated,
        },
        **({"packing": tokens.packing} if tokens.packing is not None else {}),
        "hf_modules": _hf_modules(model, resolved),
        "num_shards": len(plan),
        "versions": dict(_versions()),
    }
    return _Run(model, out_dir, resolved, tokens, batch_size, key_length, pad_id, generate_tokens, plan, rows_spec,
                header, rank, world, first_shard, probed)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# Step 2: resume
# ----------------------------------------------------------------------------------------------------------------


def _resume(run: _Run) -> dict[int, dict[str, Any]]:
    """Check that every rank is about to write the same store, and (rank 0 alone, which alone touches manifest.json)
    that ``out_dir`` holds nothing or a store of this very run, then write the manifest; every rank gets the complete
    shards ``{k: entry}`` (or the error rank 0 met)."""
    if run.world > 1:  # every rank must be about to write the very same store
        digests = all_gather_objects(hashlib.sha256(json.dumps(run.header, sort_keys=True, default=str).encode())
                                     .hexdigest())
        if len(set(digests)) > 1:
            odd = [r for r, d in enumerate(digests) if d != digests[0]]
            raise CacheError(
                f"ranks {odd} would write a different store than rank 0 (model weights, texts or arguments differ); "
                "every rank must call cache_activations with the same model, texts and arguments."
            )
    status: Any = None
    if run.rank == 0:  # only rank 0 touches manifest.json; the others learn the finished shards from it
        try:
            done = _prepare_out_dir(run)
            if not run.legacy:
                _write_manifest(run.manifest_path, run.manifest(done))
            status = done
        except CacheError as err:
            status = err
        except OSError as err:
            if err.errno not in _DISK_FULL:
                raise
            status = _disk_full(err, run.out_dir, 0, MANIFEST)
    status = broadcast_object(status)
    if isinstance(status, BaseException):
        raise status
    return {int(k): entry for k, entry in status.items()}


def _disk_full(err: OSError, out_dir: Path, done: int, what: str) -> CacheDiskFullError:
    return CacheDiskFullError(
        errno.ENOSPC,
        f"disk full while writing {what} in {out_dir}. The store is consistent ({done} complete shard(s), "
        "listed in manifest.json; the partial file was removed). Free some space and run the same call again to "
        f"resume. ({err})",
    )


# ----------------------------------------------------------------------------------------------------------------
# Step 3: compute this rank's shards
# ----------------------------------------------------------------------------------------------------------------


def _compute_shards(run: _Run, done: dict[int, dict[str, Any]], progress: bool) -> dict[int, dict[str, Any]]:
    """Compute the shards still to do that fall to this rank (round robin over the plan's order); returns the shards
    this rank wrote ``{k: entry}``. ``done`` is updated as shards are listed (one process).

    Shard k is written to its temp file as it is computed (`_ShardFile`), then committed (fsync, rename, manifest)
    by one writer thread while shard k+1 is computed; shards are recorded in order, and a write error stops the run
    at the next shard."""
    todo = [k for k in range(len(run.plan)) if k not in done]
    mine = todo[run.rank :: run.world]
    if run.world > 1 and run.rank == 0 and 0 < len(todo) < run.world:
        warnings.warn(
            f"{len(todo)} shard(s) to compute for {run.world} ranks: ranks {list(range(len(todo), run.world))} stay "
            "idle. Shards are the unit of work: pass a smaller shard_tokens to spread the texts over every rank.",
            stacklevel=3,  # the caller of cache_activations
        )
    delay = float(os.environ.get(_DELAY_ENV, "0") or 0)
    done_tokens = sum(e["rows"][1] - e["rows"][0] for e in done.values())
    upper = int(run.tokens.row_offsets[-1]) + run.generate_tokens * len(run.tokens.text_index)  # generation: at most
    bar = RankProgress(upper, done_tokens, progress, desc="caching activations")
    written: dict[int, dict[str, Any]] = {}

    def record(k: int, entry: dict[str, Any]) -> None:
        """Make shard ``k`` (written to its temp file) durable, rename it and list it. On the writer thread: fsync waits
        on the disk, which overlaps the next shard's forwards (the CPU work, writing and hashing, stays on the main
        thread, where it cannot slow the forwards' threads down)."""
        try:
            _commit(run.out_dir / entry["file"])
        except OSError as err:
            if err.errno in _DISK_FULL:
                raise _disk_full(err, run.out_dir, len(_contiguous(done)), entry["file"]) from err
            raise
        written[k] = entry
        try:
            if run.world == 1:  # one process: the manifest lists every shard as soon as it is on disk
                done[k] = entry
                _write_manifest(run.manifest_path, run.manifest(done))
            else:  # a rank's own record; rank 0 lists it in manifest.json once every rank is done
                _atomic_write(run.out_dir / _done_name(k), json.dumps(entry, sort_keys=True).encode())
        except OSError as err:  # the shard is on disk but unrecorded: it is recomputed on resume
            if err.errno in _DISK_FULL:
                raise _disk_full(err, run.out_dir, len(_contiguous(done)), MANIFEST) from err
            raise

    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="unilens-cache-writer")
    pending: Future | None = None
    specs = run.specs()
    try:
        for k in mine:
            entry = _expected_entry(k, run.plan, run.tokens, rows=not run.generate_tokens)
            try:
                entry["bytes"], entry[_CHECKSUM], n_rows = _shard_to_temp(run, k, entry["file"], specs, bar, delay)
            except OSError as err:
                if err.errno in _DISK_FULL:
                    raise _disk_full(err, run.out_dir, len(_contiguous(done)), entry["file"]) from err
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
    return written


def _shard_to_temp(run: _Run, k: int, file: str, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]], bar: Any,
                   delay: float) -> tuple[int, str, int]:  # fmt: skip
    """Compute shard ``k`` into the temp file of ``out_dir / file``; its size, checksum and row count."""
    a, b = run.plan[k]
    path = run.out_dir / file
    if run.generate_tokens:
        tensors, n_rows = _compute_shard_generated(
            run.model, run.names, run.tokens, a, b, run.generate_tokens, run.pad_id, run.rows_spec, bar, delay
        )
        size, digest = _write_shard(path, tensors, run.shard_metadata(k))
        return size, digest, n_rows
    reuse, run.probed = (run.probed if k == run.first_shard else None), None  # the probe ran its first batch
    shard = _ShardFile(path, specs, run.tokens.row_offsets[a : b + 1] - run.tokens.row_offsets[a],
                       run.shard_metadata(k))  # fmt: skip
    try:
        _compute_shard(run.model, run.names, run.tokens, a, b, run.batch_size, run.key_length, run.pad_id, shard, bar,
                       delay, reuse)  # fmt: skip
    except BaseException:
        shard.abort()
        raise
    size, digest = shard.finish()
    return size, digest, int(run.tokens.row_offsets[b] - run.tokens.row_offsets[a])


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
    """Write the activations of units (kept texts, or packed contexts) ``a..b-1`` into ``shard``, rows in unit then
    position order. ``first_batch``: the ``(saved, mask)`` of the shard's first batch, when the probe ran it already."""
    start = int(tokens.row_offsets[a])
    by_key = {name.key: name for name in names}
    packed = tokens.packing is not None
    for i, batch in enumerate(_batches(tokens, a, b, batch_size)):
        # text k's real tokens are the first length(k) positions of its row (right padding) and rows
        # offsets[k] - start .. + length(k) of the shard; each text is in one batch, so every row is written once
        spans = [(j, int(tokens.row_offsets[k]) - start, tokens.length(k)) for j, k in enumerate(batch)]
        width = max(tokens.length(k) for k in batch)
        keep = None
        if packed:  # contexts of one length, in order (`_batches`): the batch's rows are one run of the shard
            if batch != list(range(batch[0], batch[0] + len(batch))):
                raise CacheError(f"internal error: packed batch {batch[:4]}... is not consecutive contexts")
            rows = int(tokens.row_offsets[batch[-1] + 1] - tokens.row_offsets[batch[0]])
            spans = [(0, spans[0][1], rows)]
            if tokens.keep is not None:
                keep = torch.from_numpy(tokens.keep[tokens.offsets[batch[0]] : tokens.offsets[batch[-1] + 1]])
                keep = keep.view(len(batch), width)  # (batch, context): the tokens that get a row

        def store(key: str, value: torch.Tensor) -> None:
            value = _per_token(by_key[key], value, len(batch), width, key_length)  # (batch, width, *row)
            if packed:  # (1, rows, *row): the batch's rows, in context then position order
                value = (value.flatten(0, 1) if keep is None else value[keep]).unsqueeze(0)
            shard.write_texts(key, value, spans)

        if i == 0 and first_batch is not None:
            saved, _ = first_batch
        else:  # names read by a hook are stored during the forward
            saved, _ = _run_batch(model, names, [tokens.of(k) for k in batch], pad_id, consume=store, packed=packed)
        for key, value in saved.items():  # names read through a trace (every name of the probe's batch)
            store(key, value)
        if bar is not None:
            bar.update(sum(length for _, _, length in spans))
        if delay:
            time.sleep(delay)
    ids, position = tokens.kept_positions(a, b)
    shard.write("token_ids", 0, torch.from_numpy(ids))
    rows_per_unit = np.diff(tokens.row_offsets[a : b + 1])
    shard.write("text_index", 0, torch.from_numpy(np.repeat(tokens.text_index[a:b], rows_per_unit)))
    shard.write("position", 0, torch.from_numpy(position))


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
            per_step = [_per_token(name, v, 1, v.shape[2 if name.layout == HEADS_FIRST else 1], 0)
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
# Step 4: finish
# ----------------------------------------------------------------------------------------------------------------


def _finish(run: _Run, done: dict[int, dict[str, Any]], written: dict[int, dict[str, Any]]) -> ActivationStore:
    """Gather every rank's shards, have rank 0 write the final manifest and drop the records it now lists; the
    store, once every rank is there."""
    if run.world > 1:
        for part in all_gather_objects(written):  # also the barrier: every rank has written its shards
            done.update(part)
    if run.rank == 0:
        if run.world > 1 and not run.legacy:
            _write_manifest(run.manifest_path, run.manifest(done))
        for k in range(len(_contiguous(done))):  # records of shards the manifest now lists
            (run.out_dir / _done_name(k)).unlink(missing_ok=True)
    barrier()  # the manifest is written before any rank reads the store
    store = ActivationStore(run.out_dir)
    for k, signature in run.verified.items():  # verified from their bytes on resume: not read twice
        store._verified[k] = signature
    return store


# ----------------------------------------------------------------------------------------------------------------
# Resume: out_dir and the manifest's shard entries
# ----------------------------------------------------------------------------------------------------------------


def _prepare_out_dir(run: _Run) -> dict[int, dict[str, Any]]:
    """Check ``out_dir`` holds nothing or a store of this very run; return its complete shards ``{k: entry}``, each
    verified from its bytes: the ones manifest.json lists (checksum against the manifest's), and shard files no
    manifest lists (a kill between a shard's rename and the manifest's update, shards of ranks of a distributed run,
    or every shard when the manifest is damaged or missing), adopted when their own metadata names this run and their
    bytes match (`_adopt`). Damaged shards are removed (with a warning when the manifest listed them) and recomputed;
    a damaged manifest is rebuilt. Refuses (`CacheMismatchError`) a store of another run, and a damaged manifest
    whose shards it cannot attribute to this run."""
    out_dir = run.out_dir
    files = list(out_dir.iterdir())
    ours = lambda p: (_SHARD_RE.match(p.name) or _DONE_RE.match(p.name) or p.name in (MANIFEST, LOCK)  # noqa: E731
                      or p.name.endswith(_TMP_SUFFIX))
    shard_files = sorted(p.name for p in files if _SHARD_RE.match(p.name))
    foreign = sorted(p.name for p in files if not ours(p))
    has_manifest = (out_dir / MANIFEST).exists()
    if not has_manifest and not shard_files:
        if foreign:
            raise CacheError(
                f"out_dir {out_dir} is not empty and holds no {MANIFEST} (found {foreign[:5]}): it is not an "
                "activation store. Pass an empty or new folder."
            )
        _clean(out_dir, files, set())
        return {}
    done: dict[int, dict[str, Any]] = {}
    damaged: dict[str, str] = {}  # listed shards that do not verify: file -> why
    problem: CacheCorruptError | None = None
    try:
        existing = _load_manifest(out_dir)
    except CacheCorruptError as err:
        problem = err
    damage = str(problem).removesuffix(f": {_MANIFEST_REPAIR}.")  # what is wrong with the manifest, no repair
    if problem is None:
        theirs = {k: v for k, v in existing.items() if k not in ("complete", "shards", _MANIFEST_CHECKSUM)}
        if "hf_modules" not in theirs and "hf_modules" in run.header:  # written before stores recorded it: resumed
            run.header.pop("hf_modules")  # as it is (the header, and so the run digest its shards carry, unchanged)
            run._digest = None
        if existing["format_version"] < 4:
            return _legacy_store(run, existing, theirs)
        diffs = _differences(theirs, run.header)
        if diffs:
            raise CacheMismatchError(
                f"out_dir {out_dir} holds a store made with a different model, numerics settings, inputs or arguments"
                "; refusing to mix them. Pass a new out_dir, or repeat the original call (same model, settings and "
                f"arguments) to resume it. Differences: {_join_differences(diffs)}"
            )
        for k, entry in enumerate(existing["shards"]):  # listed: the checksum the manifest records
            why = _check_listed(run, k, entry)
            if why is None:
                done[k] = entry
            else:
                damaged[entry["file"]] = why
    elif not shard_files:  # nothing to rebuild it from, and it may not even be ours
        raise CacheCorruptError(f"{damage}, and {out_dir} holds no shard to rebuild it from: pass a new out_dir, or "
                                f"delete {out_dir / MANIFEST} to start the store afresh.")  # fmt: skip
    strangers: dict[str, list[str]] = {"other": [], "legacy": []}
    for name in shard_files:  # shard files no manifest lists: adopted once verified, else removed
        k = int(name[len("shard_") : len("shard_") + 5])
        if k in done or name in damaged:
            continue
        entry, kind = _adopt(run, k, name)
        if entry is not None:
            done[k] = entry
        elif kind in strangers:
            strangers[kind].append(name)
    if problem is not None and (strangers["other"] or strangers["legacy"]):
        if strangers["other"]:
            whose = (f"{len(strangers['other'])} of its shards ({strangers['other'][0]}, ...) were written by another "
                     "run (a different model, settings, inputs or arguments)")  # fmt: skip
        else:
            whose = (f"its shards ({strangers['legacy'][0]}, ...) were written by an older unilens (store format 3 "
                     "or earlier), whose shards cannot be verified without their manifest")  # fmt: skip
        raise CacheMismatchError(f"{damage}, and {whose}: pass a new out_dir, or "
                                 f"delete {out_dir} to recompute the store.")  # fmt: skip
    if damaged:
        warnings.warn(f"recomputing {len(damaged)} damaged shard(s) of the store in {out_dir}: "
                      f"{', '.join(f'{file} ({why})' for file, why in list(damaged.items())[:8])}"
                      f"{' ...' if len(damaged) > 8 else ''}", stacklevel=4)  # fmt: skip
    if problem is not None:
        warnings.warn(f"{damage}; rebuilt it from {len(done)} verified shard(s) "
                      f"and recomputing the other {len(run.plan) - len(done)}.", stacklevel=4)  # fmt: skip
    _clean(out_dir, files, {entry["file"] for entry in done.values()})
    return done


def _clean(out_dir: Path, files: list[Path], keep: set[str]) -> None:
    """Remove temp files, shard files not in ``keep`` (damaged, or never verified) and every rank's done record
    (the shards they name are adopted from their own bytes): nothing but complete, verified shards is ever read."""
    for p in files:
        if p.name.endswith(_TMP_SUFFIX) or _DONE_RE.match(p.name) or (_SHARD_RE.match(p.name) and p.name not in keep):
            p.unlink(missing_ok=True)


def _check_listed(run: _Run, k: int, entry: dict[str, Any]) -> str | None:
    """Why shard ``k``, listed by the manifest with ``entry``, cannot be kept (``None`` when its bytes are the ones
    the manifest records); remembers its signature as verified."""
    path = run.out_dir / entry["file"]
    try:
        signature = _signature(path)
        if signature[2] != entry["bytes"]:
            return f"{signature[2]} bytes, the manifest records {entry['bytes']}"
        digest, _ = _shard_checksum(_CHECKSUM, path)
    except FileNotFoundError:
        return "missing"
    except OSError as err:
        return f"unreadable: {err.strerror}"
    if digest != entry.get(_CHECKSUM):
        return "checksum differs" if not digest.startswith("unreadable") else digest
    run.verified[k] = signature
    return None


def _adopt(run: _Run, k: int, name: str) -> tuple[dict[str, Any] | None, str]:
    """Shard file ``name`` (shard ``k``) that no manifest lists: its manifest entry when its own metadata names this
    run and shard ``k``, its data digest matches its bytes and its header is the one this run writes (``(entry,
    "ok")``); else ``(None, why)``: ``"other"`` (another run's shard), ``"legacy"`` (format 3 or earlier: no metadata
    to check it by) or ``"damaged"``."""
    if k >= len(run.plan):
        return None, "damaged"
    path = run.out_dir / name
    try:
        signature = _signature(path)
        digest, digests = _shard_checksum(_CHECKSUM, path)
    except OSError:
        return None, "damaged"
    if digests is None:
        return None, "damaged"
    meta = digests.metadata
    if _META_STORE not in meta:
        return None, "legacy"
    if meta[_META_STORE] != run.digest:
        return None, "other"
    a, b = run.plan[k]
    rows = digests.rows if run.generate_tokens else int(run.tokens.row_offsets[b] - run.tokens.row_offsets[a])
    head = _shard_layout(run.specs(), rows, {**run.shard_metadata(k), _META_DATA: digests.data_digest})[3]
    if meta.get(_META_SHARD) != str(k) or meta.get(_META_DATA) != digests.data_digest or head != digests.head:
        return None, "damaged"
    expected = _expected_entry(k, run.plan, run.tokens, rows=not run.generate_tokens)
    if digests.rows and not expected["texts"][0] <= digests.texts[0] < digests.texts[1] <= expected["texts"][1]:
        return None, "damaged"
    run.verified[k] = signature
    return {"rows": [0, digests.rows], **expected, "bytes": signature[2], _CHECKSUM: digest}, "ok"


def _legacy_store(run: _Run, existing: dict[str, Any], theirs: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """A store written by format 1-3, whose model fingerprint samples 3 parameters: when complete and made by this
    very call (compared with that fingerprint), verified and returned as it is; an incomplete one is refused (its
    shards cannot be shown to come from this model's weights, so resuming could mix two models)."""
    version = existing["format_version"]
    legacy = {k: v for k, v in run.header.items()
              if k not in ("numerics", "hf_modules")}  # what formats 1-3 recorded  # fmt: skip
    legacy.update(format_version=version, model=_legacy_identity(run.model))
    diffs = _differences(theirs, legacy)
    if diffs:
        raise CacheMismatchError(
            f"out_dir {run.out_dir} holds a store (format {version}) made with a different model, inputs or "
            f"arguments; refusing to mix them. Pass a new out_dir. Differences: {_join_differences(diffs)}"
        )
    if not existing["complete"]:
        raise CacheMismatchError(
            f"out_dir {run.out_dir} holds an incomplete store written by store format {version}, whose model "
            "fingerprint samples 3 weights: its shards cannot be shown to come from this model, so it is not "
            f"resumed. Pass a new out_dir, or delete {run.out_dir} to recompute it (ActivationStore({str(run.out_dir)!r}"
            f", allow_incomplete=True) reads its {len(existing['shards'])} complete shard(s))."
        )
    store = ActivationStore(run.out_dir)
    store.verify()  # CacheCorruptError names a damaged shard and the repair (a new out_dir)
    run.legacy = True
    run.verified.update(store._verified)
    return {k: entry for k, entry in enumerate(existing["shards"])}


def _expected_entry(k: int, plan: list[tuple[int, int]], tokens: "_Tokens", rows: bool = True) -> dict[str, Any]:
    """The plan-determined fields of shard ``k``'s manifest entry (file name, original text range, and the global
    rows unless texts are continued by generation: then a shard's row count is known once it is computed)."""
    a, b = plan[k]
    entry: dict[str, Any] = {
        "file": _shard_name(k), "texts": [int(tokens.text_index[a]), int(tokens.text_index[b - 1]) + 1],
    }  # fmt: skip
    if rows:
        entry["rows"] = [int(tokens.row_offsets[a]), int(tokens.row_offsets[b])]
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
