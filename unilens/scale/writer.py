"""Writing an activation store: `cache_activations` (the layout, resume, data parallel and generation are described
in `unilens.scale.store`) in four steps: plan the run (`_plan_run`), check ``out_dir`` and find the shards already
complete (`_resume`), compute this rank's shards (`_compute_shards`), and finish the manifest (`_finish`)."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

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
from .capture import _generate_steps, _per_token, _probe_rows, _run_batch
from .plan import _batches, _pad_id, _plan_shards, _tokenize, _Tokens
from .reader import ActivationStore
from .shard_file import (
    _atomic_write,
    _commit,
    _ShardFile,
    _write_manifest,
    _write_shard,
)
from .store_format import (
    _CHECKSUM,
    _DISK_FULL,
    _DONE_RE,
    _DTYPES,
    _META_NAMES,
    _SHARD_RE,
    _TMP_SUFFIX,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    CacheDiskFullError,
    CacheError,
    _done_name,
    _dtype_name,
    _model_identity,
    _Name,
    _parse_dtype,
    _resolve_names,
    _shard_name,
    _versions,
)

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
) -> ActivationStore:
    """Run ``model`` over ``texts`` and store the per-token activations ``names`` in ``out_dir`` (resumable).

    ``names``: ``"layers_output.12"``, ``"mlps_output.*"`` (every layer), ``"attention_probabilities.3"``,
    ``"logits"``, ``"token_embeddings"`` (`unilens.scale.store.CACHEABLE_NAMES`; see `unilens.scale.store` for row
    shapes). Padding never reaches the store. ``max_length``
    truncates each text to its first ``max_length`` tokens. ``dtype`` is the stored dtype (default: the model's).
    ``shard_tokens`` is the number of rows after which a shard is closed (default: about 256 MiB per shard).
    Calling again with the same arguments after a crash resumes from the last complete shard; on a complete
    store it returns the store at once. A store made with other arguments is refused, never mixed.
    ``generate_tokens=n``: also store up to ``n`` greedily generated tokens per text, read during generation
    (`unilens.scale.store`; not for ``attention_probabilities``).

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
    run = _plan_run(model, texts, names, Path(out_dir), batch_size, max_length, _parse_dtype(dtype), shard_tokens,
                    generate_tokens)  # fmt: skip
    done = _resume(run)
    written = _compute_shards(run, done, progress)
    return _finish(run, done, written)


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

    @property
    def manifest_path(self) -> Path:
        return self.out_dir / MANIFEST

    def manifest(self, done: dict[int, dict[str, Any]]) -> dict[str, Any]:
        """manifest.json listing the complete shards ``done`` (those from shard 0 on without a gap)."""
        return {**self.header, "complete": len(done) == len(self.plan), "shards": _contiguous(done)}


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


def _plan_run(
    model: "StandardizedTransformer", texts: list[str], names: str | Sequence[str], out_dir: Path, batch_size: int,
    max_length: int | None, store_dtype: torch.dtype | None, shard_tokens: int | None, generate_tokens: int,
) -> _Run:
    """Resolve the names, tokenize the texts, probe every name's row shape, plan the shards (``shard_tokens``, or
    about `_DEFAULT_SHARD_BYTES` per shard) and build the manifest's header."""
    resolved = _resolve_names(model, names)
    if generate_tokens:
        for name in resolved:
            if name.layout == PROBS:
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
            stacklevel=3,  # the caller of cache_activations
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
            "key_length": key_length if any(n.layout == PROBS for n in resolved) else None,
            "padding": "right",
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
            done = _prepare_out_dir(run.out_dir, run.header, run.plan, run.tokens)
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
    upper = int(run.tokens.offsets[-1]) + run.generate_tokens * len(run.tokens.text_index)  # generation: at most
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
    specs = {key: (_DTYPES[spec["dtype"]], tuple(spec["shape"])) for key, spec in run.rows_spec.items()}
    specs.update({key: (torch.int64, ()) for key in _META_NAMES})
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
        size, digest = _write_shard(path, tensors)
        return size, digest, n_rows
    reuse, run.probed = (run.probed if k == run.first_shard else None), None  # the probe ran its first batch
    shard = _ShardFile(path, specs, run.tokens.offsets[a : b + 1] - run.tokens.offsets[a])
    try:
        _compute_shard(run.model, run.names, run.tokens, a, b, run.batch_size, run.key_length, run.pad_id, shard, bar,
                       delay, reuse)  # fmt: skip
    except BaseException:
        shard.abort()
        raise
    size, digest = shard.finish()
    return size, digest, int(run.tokens.offsets[b] - run.tokens.offsets[a])


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
        if run.world > 1:
            _write_manifest(run.manifest_path, run.manifest(done))
        for k in range(len(_contiguous(done))):  # records of shards the manifest now lists
            (run.out_dir / _done_name(k)).unlink(missing_ok=True)
    barrier()  # the manifest is written before any rank reads the store
    return ActivationStore(run.out_dir)


# ----------------------------------------------------------------------------------------------------------------
# Resume: out_dir and the manifest's shard entries
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
                warnings.warn(f"{entry['file']} is missing or truncated; recomputing from it.", stacklevel=4)
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
