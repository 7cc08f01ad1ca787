"""Activation stores for SAE trainers: shuffled, batched, multi-name streams and export to Hugging Face `datasets`.

Two ways to feed a sparse autoencoder (or any probe) from an `unilens.cache.ActivationStore`:

- `ActivationBatches`: a torch ``IterableDataset`` yielding ``{name: (batch, *row), "token_ids": (batch,),
  "text_index": (batch,), "position": (batch,)}`` batches, several names per pass (the same tokens in every
  name), shuffled through a buffer with a fixed seed, split deterministically across DataLoader workers (and
  training ranks).
- `export_to_datasets`: the store as a ``datasets.Dataset`` saved with ``save_to_disk``, in the layout SAELens's
  ``CacheActivationsRunner`` writes and its trainer reads (``cached_activations_path``): one column per hook with
  ``Array2D(shape=(context_size, d_in))`` rows, plus ``token_ids`` ``(context_size,)`` int32. A store cached
  with ``cache_activations(..., context_size=n)`` (texts packed into contexts with BOS and separators, SAELens's
  caching) exports to the very rows SAELens caches for the same texts; columns can carry HF module paths
  (``column_names="hf"``: ``model.layers.3``) or TransformerLens hook names (``"transformer_lens"``).

Stream semantics (``shuffle=True``): one pass reads every row exactly once. Shards are the unit of work: the
pass's shard order is a permutation drawn from ``(seed, epoch)``; the shards of that order go round-robin to the
``world_size * num_workers`` readers (reader ``rank * num_workers + worker`` takes positions ``r, r + R, ...``),
so each reader's rows and batches depend only on ``(seed, epoch, rank, world_size, worker, num_workers)`` and
the store. Each reader keeps a pool: it appends its next shard's rows, permutes the pool (a generator seeded
from ``(seed, epoch, reader)``), hands out all but ``shuffle_buffer`` rows in whole batches, and keeps the rest
to mix with the next shard; at its end it permutes and hands out the remainder (the last batch may be short,
``drop_last=True`` drops it). Every row handed out was drawn uniformly from at least ``shuffle_buffer`` rows
plus one shard. ``shuffle=False`` reads shards and rows in store order (``reader`` r still takes shards
``r, r + R, ...``). ``set_epoch(e)`` gives another permutation per epoch. With DataLoader workers pass
``batch_size=None`` to the DataLoader (batches are made here) and have at least as many shards as readers.
Memory per reader: the pool (``shuffle_buffer`` rows plus one shard).

Install the export's dependency with ``pip install 'unilens[sae]'`` (Hugging Face ``datasets``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch

from .store import ActivationStore
from .store_format import _META_NAMES as _META

__all__ = ["ActivationBatches", "export_to_datasets", "TRANSFORMER_LENS_HOOKS", "transformer_lens_hook_name"]

# unilens name -> TransformerLens hook name (SAELens's column names); only where the two are the same tensor.
TRANSFORMER_LENS_HOOKS: dict[str, str] = {
    "layers_input": "blocks.{i}.hook_resid_pre",
    "layers_output": "blocks.{i}.hook_resid_post",
    "attentions_output": "blocks.{i}.hook_attn_out",
    "mlps_output": "blocks.{i}.hook_mlp_out",
    "attention_heads": "blocks.{i}.attn.hook_z",  # (heads, head_dim) flattened to heads * head_dim, as SAELens
}


_HF_OUTPUTS_WORDS = ("layers_output.<i>", "attentions_output.<i>", "mlps_output.<i>")


def transformer_lens_hook_name(name: str) -> str:
    """``"layers_output.3"`` -> ``"blocks.3.hook_resid_post"`` (see `TRANSFORMER_LENS_HOOKS`).

    Example:
        >>> transformer_lens_hook_name("mlps_output.0")
        'blocks.0.hook_mlp_out'
    """
    accessor, _, layer = name.partition(".")
    if accessor not in TRANSFORMER_LENS_HOOKS or not layer.isdigit():
        raise ValueError(
            f"{name!r} has no TransformerLens hook name here; names that do: "
            f"{[a + '.<layer>' for a in TRANSFORMER_LENS_HOOKS]}. Pass column_names={{{name!r}: 'your_column'}}."
        )
    return TRANSFORMER_LENS_HOOKS[accessor].format(i=int(layer))


def _seed_for(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes and Python versions, unlike ``hash``)."""
    digest = hashlib.sha256(",".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _check_names(store: ActivationStore, names: str | Sequence[str] | None) -> list[str]:
    if names is None:
        return store.names
    names = [names] if isinstance(names, str) else list(names)
    if not names:
        raise ValueError(f"names is empty: pass at least one of the store's names {store.names}.")
    for name in names:
        if name not in store.names:
            raise KeyError(f"{name!r} is not in this store; it holds {store.names}.")
    if len(set(names)) != len(names):
        raise ValueError(f"names contains duplicates: {names}.")
    return names


class ActivationBatches(torch.utils.data.IterableDataset):
    """Shuffled batches of rows of an `unilens.cache.ActivationStore`, several names per pass (see the module doc).

    Each batch: ``{name: (batch, *row) for name in names}`` plus ``"token_ids"``, ``"text_index"``,
    ``"position"`` ``(batch,)`` int64; row ``j`` of every tensor is the same token.

    Example:
        >>> import tempfile
        >>> from unilens import StandardizedTransformer
        >>> from unilens.cache import ActivationStore, cache_activations
        >>> from unilens.testing import tiny_model
        >>> out = tempfile.mkdtemp()
        >>> model = StandardizedTransformer(*tiny_model("gpt2"))
        >>> store = cache_activations(model, ["The cat sat on the mat", "Hello there", "One two three"],
        ...                           ["layers_output.*"], out, shard_tokens=4, progress=False)
        >>> stream = ActivationBatches(store, ["layers_output.0", "layers_output.1"], batch_size=4, seed=0)
        >>> batch = next(iter(stream))
        >>> batch["layers_output.1"].shape == (4, model.hidden_size), batch["position"].shape
        (True, torch.Size([4]))
        >>> loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=0)
        >>> sum(len(b["position"]) for b in loader) == len(store)
        True
    """

    def __init__(
        self,
        store: ActivationStore | str | os.PathLike,
        names: str | Sequence[str] | None = None,
        batch_size: int = 4096,
        shuffle: bool = True,
        shuffle_buffer: int = 65536,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.store = store if isinstance(store, ActivationStore) else ActivationStore(store)
        self.names = _check_names(self.store, names)
        for label, value, low in (("batch_size", batch_size, 1), ("shuffle_buffer", shuffle_buffer, 0),
                                  ("world_size", world_size, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{label} must be an int >= {low}, got {value!r}.")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an int in 0..world_size-1 = 0..{world_size - 1}, got {rank!r}.")
        self.batch_size, self.shuffle, self.shuffle_buffer = batch_size, bool(shuffle), shuffle_buffer
        self.seed, self.drop_last, self.rank, self.world_size = int(seed), bool(drop_last), rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use another shard order and row permutation for the next pass (call before each epoch)."""
        self.epoch = int(epoch)

    def _reader(self) -> tuple[int, int]:
        """(this reader's index, number of readers) over ranks x DataLoader workers."""
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.rank * workers + worker, self.world_size * workers

    def shard_order(self) -> list[int]:
        """The pass's shard order (before the round-robin split across readers)."""
        n = len(self.store.shards)
        if not self.shuffle:
            return list(range(n))
        generator = torch.Generator().manual_seed(_seed_for(self.seed, self.epoch, -1))
        return torch.randperm(n, generator=generator).tolist()

    def _shard_rows(self, k: int) -> dict[str, torch.Tensor]:
        tensors = self.store.shard(k, [*self.names, *_META])
        return {name: tensors[name] for name in [*self.names, *_META]}

    def _batches(self, pool: dict[str, torch.Tensor], n: int) -> Iterator[dict[str, torch.Tensor]]:
        for start in range(0, n, self.batch_size):
            stop = min(start + self.batch_size, n)
            if stop - start < self.batch_size and self.drop_last:
                return
            yield {name: t[start:stop] for name, t in pool.items()}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        reader, readers = self._reader()
        mine = self.shard_order()[reader::readers]
        generator = torch.Generator().manual_seed(_seed_for(self.seed, self.epoch, reader))
        pool: dict[str, torch.Tensor] | None = None
        for k in mine:
            rows = self._shard_rows(k)
            pool = rows if pool is None else {name: torch.cat([pool[name], rows[name]]) for name in pool}
            size = len(pool["position"])
            if not self.shuffle:
                n_out = (size // self.batch_size) * self.batch_size
            else:
                perm = torch.randperm(size, generator=generator)
                pool = {name: t[perm] for name, t in pool.items()}
                n_out = max(0, (size - self.shuffle_buffer) // self.batch_size) * self.batch_size
            if n_out:
                yield from self._batches(pool, n_out)
                pool = {name: t[n_out:] for name, t in pool.items()}
        if pool is not None and len(pool["position"]):
            if self.shuffle:
                perm = torch.randperm(len(pool["position"]), generator=generator)
                pool = {name: t[perm] for name, t in pool.items()}
            yield from self._batches(pool, len(pool["position"]))


def _datasets():
    try:
        import datasets
    except ImportError as err:
        raise ImportError(
            "export_to_datasets needs the Hugging Face `datasets` package: pip install 'unilens[sae]'"
        ) from err
    return datasets


def export_to_datasets(
    store: ActivationStore | str | os.PathLike,
    out_dir: str | os.PathLike,
    context_size: int | None = None,
    names: str | Sequence[str] | None = None,
    column_names: Mapping[str, str] | str | None = None,
    dtype: str | None = None,
    metadata: bool = False,
    max_shard_size: str | int = "500MB",
) -> dict[str, Any]:
    """Write ``store`` as a Hugging Face ``datasets.Dataset`` (``save_to_disk``) in SAELens's cached-activation
    layout; returns a summary ``{"path", "contexts", "tokens", "dropped_tokens", "columns", "bytes"}``.

    Rows of the store (in store order) are grouped into contexts of ``context_size`` consecutive rows; the last
    ``len(store) % context_size`` rows do not fill a context and are left out (``dropped_tokens``). For a store
    cached with ``context_size=n`` (packed contexts, SAELens's caching) ``context_size`` defaults to ``n``: each
    exported context is one context the model ran, row for row what SAELens's ``CacheActivationsRunner`` writes
    for the same texts. For a store of one text per row, a context is consecutive tokens of the texts, which a
    context may span (no BOS or separator is added: the model ran each text alone). One
    column per name, ``Array2D(shape=(context_size, d_in))`` with ``d_in`` the row's size (a ``(heads, d)`` row
    is flattened to ``heads * d``); ``token_ids`` ``(context_size,)`` int32; with ``metadata=True`` also
    ``text_index`` and ``position`` ``(context_size,)`` int64. ``column_names``: ``{name: column}``; ``"hf"`` for
    the HF module path of a module's output (``model.layers.3``: what SAELens's runner hooks on a model loaded with
    ``model_class_name="AutoModelForCausalLM"``, for ``layers_output``, ``attentions_output`` and ``mlps_output``);
    ``"transformer_lens"`` for TransformerLens hook names (``blocks.3.hook_resid_post``, see
    `TRANSFORMER_LENS_HOOKS`: SAELens on a ``HookedTransformer``); default: the store's names. ``dtype``:
    ``"float32"`` / ``"float16"`` (default: the store's; a bfloat16 store is written as float32, exactly, since
    Arrow has no bfloat16). Memory: one store shard plus one context. Point SAELens at it with
    ``cached_activations_path=out_dir``, ``hook_name=<column>``, ``context_size=context_size``, ``d_in=d_in``.

    Example:
        >>> import tempfile
        >>> import datasets
        >>> from unilens import StandardizedTransformer
        >>> from unilens.cache import cache_activations
        >>> from unilens.testing import tiny_model
        >>> out = tempfile.mkdtemp()
        >>> store = cache_activations(StandardizedTransformer(*tiny_model("gpt2")), ["The cat sat on the mat"] * 3,
        ...                           ["layers_output.1"], out + "/store", progress=False)
        >>> info = export_to_datasets(store, out + "/hf", context_size=4, column_names="transformer_lens")
        >>> ds = datasets.load_from_disk(out + "/hf").with_format("torch")
        >>> ds[0]["blocks.1.hook_resid_post"].shape == (4, 64), info["dropped_tokens"] == len(store) % 4
        (True, True)
    """
    datasets = _datasets()
    store = store if isinstance(store, ActivationStore) else ActivationStore(store)
    names = _check_names(store, names)
    packing = store.manifest.get("packing")
    if context_size is None:
        if packing is None:
            raise ValueError("context_size is needed for a store of one text per row (cached without context_size): "
                             "pass the context size SAELens is to train with, e.g. context_size=128.")  # fmt: skip
        context_size = int(packing["context_size"])
    if not isinstance(context_size, int) or isinstance(context_size, bool) or context_size < 1:
        raise ValueError(f"context_size must be an int >= 1, got {context_size!r}.")
    if len(store) < context_size:
        raise ValueError(f"the store holds {len(store)} tokens, fewer than one context of {context_size}: cache more "
                         "text or choose a smaller context_size.")
    if column_names is None:
        columns = {name: name for name in names}
    elif column_names == "transformer_lens":
        columns = {name: transformer_lens_hook_name(name) for name in names}
    elif column_names == "hf":
        modules = store.manifest.get("hf_modules")
        if modules is None:
            raise ValueError("this store does not record HF module paths (an older unilens wrote it): pass "
                             "column_names={name: 'model.layers.3', ...} by hand.")  # fmt: skip
        missing = [n for n in names if n not in modules]
        if missing:
            raise ValueError(f"{missing} are not the output of one HF module, so SAELens has no hook name for them; "
                             f"names that are: {[n for n in names if n in modules] or list(modules)} "
                             f"({', '.join(_HF_OUTPUTS_WORDS)}).")  # fmt: skip
        columns = {name: modules[name] for name in names}
    elif isinstance(column_names, Mapping):
        missing = [n for n in names if n not in column_names]
        if missing:
            raise ValueError(f"column_names has no column for {missing}; give one per name, or leave it None.")
        columns = {name: str(column_names[name]) for name in names}
    else:
        raise ValueError(f"column_names must be None, 'hf', 'transformer_lens' or a dict, got {column_names!r}.")
    reserved = set(_META) & set(columns.values())
    if reserved or len(set(columns.values())) != len(columns):
        raise ValueError(f"column names must be distinct and not {list(_META)}: {columns}.")
    if dtype not in (None, "float32", "float16"):
        raise ValueError(f"dtype must be None (the store's), 'float32' or 'float16', got {dtype!r}.")

    specs = store.manifest["rows"]
    d_in = {name: int(np.prod(specs[name]["shape"])) for name in names}
    # Arrow has no bfloat16: a bfloat16 store is written as float32 (exact)
    np_dtype = {n: dtype or ("float32" if specs[n]["dtype"] == "bfloat16" else specs[n]["dtype"]) for n in names}
    features = datasets.Features({
        **{columns[n]: datasets.Array2D(shape=(context_size, d_in[n]), dtype=np_dtype[n]) for n in names},
        "token_ids": datasets.Sequence(datasets.Value("int32"), length=context_size),
        **({m: datasets.Sequence(datasets.Value("int64"), length=context_size) for m in _META[1:]} if metadata else {}),
    })  # fmt: skip

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty: export to a new folder (nothing was written).")
    tmp = out.with_name(out.name + ".unilens-tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    from datasets.arrow_writer import ArrowWriter

    contexts = 0
    try:
        arrow_path = tmp / "contexts.arrow"
        with ArrowWriter(features=features, path=str(arrow_path)) as writer:
            carry: dict[str, torch.Tensor] | None = None
            for shard in store.iter_shards([*names, *_META]):
                rows = {n: shard[n].reshape(len(shard["position"]), -1) for n in names}
                rows.update({m: shard[m] for m in _META})
                carry = rows if carry is None else {k: torch.cat([carry[k], rows[k]]) for k in carry}
                n_ctx = len(carry["position"]) // context_size
                if n_ctx == 0:
                    continue
                take = n_ctx * context_size
                batch = {
                    columns[n]: carry[n][:take].to(getattr(torch, np_dtype[n])).reshape(n_ctx, context_size, -1).numpy()
                    for n in names
                }
                batch["token_ids"] = carry["token_ids"][:take].to(torch.int32).reshape(n_ctx, context_size).numpy()
                if metadata:
                    for m in _META[1:]:
                        batch[m] = carry[m][:take].to(torch.int64).reshape(n_ctx, context_size).numpy()
                writer.write_batch(batch)
                contexts += n_ctx
                carry = {k: t[take:] for k, t in carry.items()}
            writer.finalize()
        dropped = 0 if carry is None else len(carry["position"])
        dataset = datasets.Dataset.from_file(str(arrow_path))
        dataset.save_to_disk(str(out), max_shard_size=max_shard_size)
        del dataset
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    return {"path": str(out), "contexts": contexts, "tokens": contexts * context_size, "dropped_tokens": dropped,
            "columns": {columns[n]: (context_size, d_in[n]) for n in names}, "bytes": size}
