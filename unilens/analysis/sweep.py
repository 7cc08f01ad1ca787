"""Activation patching runs: plans a sweep of single-cell patches into few batched forwards, and runs them.

A *cell* ``(layer, j)`` is one patch: an activation of the corrupted prompt replaced by the clean prompt's
(``j`` a position, or a head for ``"head"``); a *row* ``(layer, j, pair)`` is that patch on one clean /
corrupted prompt pair, one patched run. A sweep puts many rows in one forward and does not recompute what a
patch cannot change:

- positions before a cell's first patched position are the corrupted run's (causal attention): a chunk starts
  at its first patched position, from the corrupted run's key/value cache (*resume*);
- layers below a cell's layer are the corrupted run's: a row *joins* the batch at its layer, so a forward
  starts with the rows of its lowest layer and grows (*staggered* rows), and the layers below are skipped,
  fed the corrupted run's outputs.

Both depend on the model's code (a cache that can be cut and repeated per layer, layers that accept a batch
that grows), so both are checked at run time against the plain computation, with a warning and a fallback
(same result, slower) when a model does not allow them. ``unilens.analysis.patching.activation_patching`` (also
``unilens.interventions.activation_patching``) is the API.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm
from transformers.cache_utils import Cache, DynamicCache

from ..core.tensors import _first, _with_first  # a namedtuple output (Reformer's layers) stays one
from .arguments import Metric, check_metric

__all__ = [
    "DEFAULT_LOGITS_BUDGET",
    "FORWARD_COST_TOKENS",
    "Chunk",
    "ChunkRunner",
    "CorruptedRun",
    "Row",
    "Sweep",
    "cache_keyword",
    "check_staggered",
    "output_cache",
    "plan",
    "probe_rows",
    "run_sweep",
]

# Logits kept in memory per forward when `batch_size` is not given (bytes).
DEFAULT_LOGITS_BUDGET = 2**28

# A forward's fixed cost (weights streamed once, Python and nnsight per-module overhead) as a number of tokens
# run through every layer: ~100 measured on SmolLM2-135M on 2 CPU cores (67 ms per forward vs 0.022 ms per
# token and layer). It only decides how many positions share a forward; the result does not depend on it.
FORWARD_COST_TOKENS = 100

# (layer, position or head, prompt pair): one patched run, one row of a forward.
Row = tuple[int, int, int]


@dataclass
class Chunk:
    """One forward of a sweep."""

    start: int  # first position computed; earlier positions are the corrupted run's (cache and logits)
    rows: list[Row]  # sorted by layer: the order rows join a staggered batch
    staggered: bool  # rows join the batch at their layer; else every row runs from the input


_CACHE_KEYWORDS: dict[type, str] = {}  # a plain dict, not functools.lru_cache: this module ships by value to NDIF


def _cache_keyword_of(forward_cls: type) -> str:
    if forward_cls not in _CACHE_KEYWORDS:
        params = inspect.signature(forward_cls.forward).parameters
        _CACHE_KEYWORDS[forward_cls] = "cache" if "cache" in params else "past_key_values"
    return _CACHE_KEYWORDS[forward_cls]


def cache_keyword(hf_model: torch.nn.Module) -> str:
    """The keyword the model's forward takes its key/value cache by, read from its signature.

    transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name still works there, with a
    FutureWarning); earlier releases only know ``past_key_values``. Never decided by version string.

    Example:
        >>> from unilens.testing import tiny_model
        >>> hf, _ = tiny_model("llama")
        >>> cache_keyword(hf) in ("cache", "past_key_values")
        True
    """
    return _cache_keyword_of(type(hf_model))


def output_cache(output: Any) -> Any:
    """The key/value cache a model output carries: field ``cache`` (transformers >= 5.24) or ``past_key_values``,
    read without touching the deprecated alias (which warns)."""
    names = {f.name for f in dataclasses.fields(output)} if dataclasses.is_dataclass(output) else set()
    for name in ("cache", "past_key_values"):
        if name in names:
            return getattr(output, name)
    return None


def _reproduces(got: torch.Tensor, expected: torch.Tensor) -> bool:
    """Whether two computations of the same logits agree up to the rounding of differently shaped kernels.

    float32 kernels of other shapes differ by ~1e-6 of the logit scale after 30 layers (SmolLM2: 3e-5 on
    logits of ~20); 1e-4 of the scale leaves a wide margin, while a patch leaking into another row moves its
    logits by the patch's effect, orders of magnitude more. Half precision rounds at ~4e-3 per operation.
    """
    if got.shape != expected.shape:
        return False
    rtol = 1e-4 if expected.dtype in (torch.float32, torch.float64) else 5e-2
    scale = expected.abs().max().clamp_min(1.0)
    return bool((got.float() - expected.float()).abs().max() <= rtol * scale)


class CorruptedRun:
    """The corrupted prompt's run: its logits, each layer's output (to skip layers) and key/value cache (to resume).

    ``layer_outputs`` is None when layers cannot be skipped (an output that is not per-position tensors, a
    model mutating activations in place, or a failed check); ``cache`` is None when runs cannot resume.
    """

    def __init__(self, logits: torch.Tensor, cache: Any, layer_outputs: list[Any] | None,
                 cache_key: str = "past_key_values"):
        self.logits = logits  # (pairs, seq, vocab)
        self.cache = cache
        self.cache_key = cache_key  # the keyword the model's forward takes the cache by
        self.layer_outputs = layer_outputs  # per layer, as the layer returns it (a tensor or a tuple)

    @property
    def seq(self) -> int:
        return self.logits.shape[1]

    def layer_output(self, layer: int, start: int, pairs: Sequence[int]) -> Any:
        """Layer ``layer``'s corrupted output in its own structure, positions ``start:``, one row per pair."""
        index = torch.tensor(list(pairs), dtype=torch.long)

        def cut(value):
            if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[:2] == self.logits.shape[:2]:
                return value[index.to(value.device), start:]  # (len(pairs), seq - start, ...)
            if isinstance(value, tuple):
                return tuple(cut(v) for v in value)
            return value

        return cut(self.layer_outputs[layer])

    @staticmethod
    def _skippable(output: Any, batch_seq: tuple[int, int]) -> bool:
        """Whether a layer output can be cut per row and position: ``(pairs, seq, ...)`` tensors and Nones only."""
        if isinstance(output, tuple):
            return all(CorruptedRun._skippable(v, batch_seq) for v in output)
        if output is None:
            return True
        return isinstance(output, torch.Tensor) and output.dim() >= 2 and tuple(output.shape[:2]) == batch_seq

    @classmethod
    def build(cls, model, batch: dict[str, torch.Tensor], resume_at: int) -> "CorruptedRun":
        """Run the corrupted prompt once, recording each layer's output and (``resume_at > 0``) its cache.

        Then check that a run started at ``resume_at`` from the cache with the lower half of the layers skipped
        reproduces it; if not, the same without the cache (resume dropped, with a warning); if that fails too,
        layers are not skipped either (second warning). Patched runs then use only what was checked.
        """
        blocks = list(model.module_accessor.get_layers())
        outputs: list[Any] = [None] * len(blocks)
        handles = [
            block.register_forward_hook(lambda _m, _a, out, i=i: outputs.__setitem__(i, out))
            for i, block in enumerate(blocks)
        ]
        try:
            with torch.no_grad():
                out = cls._forward(model, batch, with_cache=resume_at > 0)
        finally:
            for handle in handles:
                handle.remove()
        logits = out.logits.detach()
        if not bool(batch["attention_mask"].all()):
            return cls(logits, None, None)  # padded prompt: the cache would start at a padding token
        cache = output_cache(out) if resume_at > 0 else None
        cache = cache if isinstance(cache, Cache) else None
        batch_seq = tuple(batch["input_ids"].shape)
        skippable = all(cls._skippable(o, batch_seq) for o in outputs) and not model.architecture.mutated_in_place
        run = cls(logits, cache, outputs if skippable else None, cache_keyword(model.module_accessor.model))
        if run.cache is not None and not run._check(model, batch, resume_at, "resuming from its key/value cache"):
            run.cache = None
        if run.layer_outputs is not None and run.cache is None:
            if not run._check(model, batch, 0, "skipping layers fed their recorded outputs"):
                run.layer_outputs = None
        return run

    @staticmethod
    def _forward(model, batch: dict[str, torch.Tensor], with_cache: bool):
        """The corrupted forward. With a cache, one that can be cut back: a plain ``DynamicCache`` of the model's
        layer types recording past states (sliding-window layers otherwise drop what a cut needs)."""
        hf = model.module_accessor.model
        if with_cache:
            try:
                cache = DynamicCache(config=hf.config)
                cache.activate_past_recording()
                return hf(**batch, use_cache=True, **{cache_keyword(hf): cache})
            except Exception:  # noqa: BLE001 - the model needs its own cache class: let it make one
                pass
        return hf(**batch, use_cache=with_cache)

    def _check(self, model, batch: dict[str, torch.Tensor], start: int, what: str) -> bool:
        """Whether a run from ``start`` (from the cache when > 0), lower half of the layers skipped when they can
        be, reproduces the corrupted logits; warns when not."""
        skip = len(self.layer_outputs) // 2 if self.layer_outputs is not None else 0
        pairs = range(self.logits.shape[0])
        try:
            with torch.no_grad(), model.trace(
                {"input_ids": batch["input_ids"][:, start:], "attention_mask": batch["attention_mask"]},
                **(self.cache_kwargs(start, pairs) if start > 0 else {}),
            ):
                for layer in range(skip):
                    model._layer_envoy(layer).skip(self.layer_output(layer, start, pairs))
                resumed = model.logits.save()  # (pairs, seq - start, vocab)
            if _reproduces(resumed, self.logits[:, start:]):
                return True
            reason = "does not reproduce the corrupted run"
        except Exception as err:  # noqa: BLE001 - the model's code does not allow it
            reason = f"fails ({type(err).__name__}: {err})"
        fallback = "covers the whole sequence" if start > 0 else "runs every layer"
        warnings.warn(f"activation_patching: {what} {reason} for {type(model.module_accessor.model).__name__}; every "
                      f"patched run {fallback} (same result, slower).", stacklevel=5)
        return False

    def cache_kwargs(self, start: int, pairs: Sequence[int] | Sequence[Sequence[int]]) -> dict:
        """The cache keyword (``cache`` or ``past_key_values``): a copy of the cache cut to the first ``start``
        tokens, one row per entry of ``pairs`` (the pair whose cache it is), or per entry of ``pairs[i]`` for layer
        ``i`` (a staggered batch)."""
        cache = copy.deepcopy(self.cache)
        cache.crop(start - self.seq)  # negative: remove the tokens from `start` on
        per_layer = [list(p) for p in pairs] if pairs and not isinstance(pairs[0], int) else None
        if per_layer is None:
            cache.batch_select_indices(torch.tensor(list(pairs), dtype=torch.long))
        else:
            if len(cache.layers) != len(per_layer):
                raise ValueError(f"the cache has {len(cache.layers)} layers for {len(per_layer)} decoder layers")
            for layer, layer_pairs in zip(cache.layers, per_layer):
                layer.batch_select_indices(torch.tensor(layer_pairs, dtype=torch.long))
        return {self.cache_key: cache, "use_cache": True}


class Sweep:
    """The patched runs of one ``activation_patching`` call, as data, and what a row is: its first patched position,
    the layer it joins a staggered batch at, the logits a forward from a position keeps. It runs nothing: `plan`
    groups rows into chunks, a `ChunkRunner` runs a chunk, `run_sweep` does both after the run-time checks.

    ``clean_acts[layer]``: the clean prompts' activations ``(pairs, seq, ...)`` at each patched layer;
    ``patched_positions``: the positions a ``"head"`` row patches (all of them, together);
    ``metric(logits (pairs, positions, vocab)) -> (pairs,)`` is called per cell on the rows of every pair, in
    pair order (``per_cell``), or, for one pair given as strings, on all the rows of a chunk at once.
    """

    def __init__(
        self,
        model,
        component: str,
        accessor,
        clean_acts: dict[int, torch.Tensor],
        clean_ids: torch.Tensor,
        corrupted_batch: dict[str, torch.Tensor],
        metric: Metric,
        metric_positions: list[int] | None,
        patched_positions: list[int],
        per_cell: bool,
    ):
        self.model, self.component, self.accessor = model, component, accessor
        self.per_cell = per_cell
        self.clean_acts, self.batch = clean_acts, corrupted_batch
        self.metric, self.metric_positions = metric, metric_positions
        self.patched_positions = patched_positions
        self.pairs, self.seq = corrupted_batch["input_ids"].shape
        self.num_layers = model.num_layers
        # a patch changes nothing before the first token where its pair differs (causal attention)
        differs = clean_ids.to(corrupted_batch["input_ids"].device) != corrupted_batch["input_ids"]  # (pairs, seq)
        firsts = [int(d.nonzero()[0]) if bool(d.any()) else self.seq for d in differs]
        self.first_difference = max(firsts)  # every pair's patches change its run from here on

    def first_position(self, row: Row) -> int:
        return min(self.patched_positions) if self.component == "head" else row[1]

    def entry_layer(self, layer: int) -> int:
        """The layer whose output a row patched at ``layer`` joins the batch at (-1: the input).

        A layer-output patch is known there; an attention / MLP / head patch is inside the layer, so the row
        joins at the layer's input, the previous layer's output.
        """
        return layer if self.component == "resid" else layer - 1

    def kept_logits(self, start: int) -> int:
        """How many final positions a forward starting at ``start`` unembeds (``logits_to_keep``)."""
        if self.metric_positions is None:
            return self.seq - start
        computed = [p for p in self.metric_positions if p >= start]
        return self.seq - min(computed) if computed else 1

    def default_batch_size(self) -> int:
        """Rows per forward when ``batch_size`` is not given: as many as keep ``DEFAULT_LOGITS_BUDGET`` of logits."""
        kept = self.seq if self.metric_positions is None else self.seq - min(self.metric_positions)
        return max(1, DEFAULT_LOGITS_BUDGET // (kept * self.model.vocab_size * 4))


# ------------------------------------------------------------------------------------------------
# Planning: rows -> chunks (one forward each), by a cost model
# ------------------------------------------------------------------------------------------------


def plan(sweep: Sweep, rows: list[Row], batch_size: int, staggered: bool, resume: bool) -> list[Chunk]:
    """Chunks covering ``rows``: positions grouped to balance a forward's fixed cost against recomputed
    positions (staggered), or one start per position (plain), each cut to ``batch_size`` rows. Without ``resume``
    (no checked key/value cache) every chunk starts at position 0.

    Example:
        >>> from unilens import StandardizedTransformer
        >>> from unilens.testing import tiny_model
        >>> model = StandardizedTransformer(*tiny_model("llama"))
        >>> ids = torch.tensor([[1, 2, 3, 4]])
        >>> corrupted = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        >>> sweep = Sweep(model, "resid", model.layers_output, {}, torch.tensor([[1, 5, 3, 4]]), corrupted,
        ...               lambda logits: logits[:, -1, 0], None, [0, 1, 2, 3], per_cell=False)
        >>> rows = [(0, position, 0) for position in range(4)]  # layer 0, every position, pair 0
        >>> [chunk.start for chunk in plan(sweep, rows, batch_size=8, staggered=False, resume=True)]
        [0, 1, 2, 3]
        >>> [len(chunk.rows) for chunk in plan(sweep, rows, batch_size=3, staggered=False, resume=False)]
        [3, 1]
    """
    by_start: dict[int, list[Row]] = {}
    for row in rows:
        by_start.setdefault(sweep.first_position(row) if resume else 0, []).append(row)
    starts = sorted(by_start)
    groups = _group_positions(sweep, starts, by_start, batch_size) if staggered else [[s] for s in starts]
    chunks = []
    for group in groups:
        group_rows = sorted((r for s in group for r in by_start[s]), key=lambda r: r[0])  # stable
        for i in range(0, len(group_rows), batch_size):
            chunks.extend(_chunks_at(sweep, group[0], group_rows[i : i + batch_size], staggered))
    return chunks


def _chunks_at(sweep: Sweep, start: int, rows: list[Row], staggered: bool) -> list[Chunk]:
    """A staggered chunk joining rows at the input holds one input row; more go to a plain chunk."""
    if not staggered:
        return [Chunk(start, rows, False)]
    at_input = [r for r in rows if sweep.entry_layer(r[0]) < 0]
    if len(at_input) <= 1:
        return [Chunk(start, rows, True)]
    rest = [r for r in rows if sweep.entry_layer(r[0]) >= 0]
    return [Chunk(start, at_input[:1] + rest, True), Chunk(start, at_input[1:], False)]


def _group_positions(
    sweep: Sweep, starts: list[int], by_start: dict[int, list[Row]], batch_size: int
) -> list[list[int]]:
    """Consecutive starts sharing a forward, by dynamic programming over a cost counted in token-layers."""
    accessor = sweep.model.module_accessor
    layer_params = sum(p.numel() for p in accessor.get_layers()[0].parameters())
    unembed = accessor.get_unembed().weight.numel()
    head_cost = unembed / max(layer_params, 1)  # the unembedding of one position, in layers
    n_layers = sweep.num_layers
    # prefix sums over starts: rows, and layers those rows run through
    rows, layers = [0], [0]
    for s in starts:
        rows.append(rows[-1] + len(by_start[s]))
        layers.append(layers[-1] + sum(n_layers - max(sweep.entry_layer(r[0]), 0) for r in by_start[s]))

    def cost(begin: int, end: int) -> float:  # starts[begin:end] in one group
        start, n = starts[begin], rows[end] - rows[begin]
        forwards = math.ceil(n / batch_size)
        compute = (sweep.seq - start) * (layers[end] - layers[begin]) + n * sweep.kept_logits(start) * head_cost
        return forwards * FORWARD_COST_TOKENS * n_layers + compute

    best = [0.0] + [math.inf] * len(starts)
    cut = [0] * (len(starts) + 1)
    for end in range(1, len(starts) + 1):
        for begin in range(end):
            total = best[begin] + cost(begin, end)
            if total < best[end]:
                best[end], cut[end] = total, begin
    groups, end = [], len(starts)
    while end > 0:
        groups.append(starts[cut[end] : end])
        end = cut[end]
    return groups[::-1]


# ------------------------------------------------------------------------------------------------
# Running: one chunk's patched forward
# ------------------------------------------------------------------------------------------------


class ChunkRunner:
    """Runs the chunks of a sweep: plain rows (every row from the input) or staggered rows (rows join the batch at
    their layer), from the corrupted run's key/value cache and layer outputs where ``run`` has them (checked)."""

    def __init__(self, sweep: Sweep, run: CorruptedRun | None):
        self.sweep, self.run = sweep, run
        self.model = sweep.model

    def run_chunk(self, chunk: Chunk, full_logits: bool = False) -> torch.Tensor:
        """The chunk's logits, one row per row: ``(rows, kept positions, vocab)``, every position from
        ``chunk.start`` on with ``full_logits``."""
        start, kept = chunk.start, self.sweep.kept_logits(chunk.start)
        kwargs: dict[str, Any] = {}
        if not full_logits and kept < self.sweep.seq - start:
            kwargs.update(self.model._keep_last_logits_kwargs(kept))
        runner = self._staggered if chunk.staggered else self._plain
        with torch.no_grad():
            return runner(chunk, kwargs)

    def _inputs(self, start: int, pairs: Sequence[int]) -> dict[str, torch.Tensor]:
        index = torch.tensor(list(pairs), dtype=torch.long)
        batch = self.sweep.batch
        return {  # the mask covers the cache
            "input_ids": batch["input_ids"][index, start:],
            "attention_mask": batch["attention_mask"][index],
        }

    def _patch_masks(self, rows: list[Row], start: int) -> dict[int, torch.Tensor]:
        """Per patched layer, a boolean mask over the chunk's rows marking what each row patches."""
        sweep = self.sweep
        width, masks = sweep.seq - start, {}
        for i, (layer, j, _pair) in enumerate(rows):
            if layer not in masks:
                per_head = (self.model.num_heads, 1) if sweep.component == "head" else (1,)
                masks[layer] = torch.zeros((len(rows), width, *per_head), dtype=torch.bool)
            if sweep.component == "head":
                masks[layer][i, [p - start for p in sweep.patched_positions], j] = True
            else:
                masks[layer][i, j - start] = True
        return masks

    def _patch(self, layer: int, mask: torch.Tensor, pairs: Sequence[int], start: int) -> None:
        """Inside a trace: the rows of ``mask`` take the clean activation of their pair where it is set."""
        accessor = self.sweep.accessor
        out = accessor[layer]
        clean = self.sweep.clean_acts[layer][torch.tensor(list(pairs), dtype=torch.long), start:]  # (rows, width, ...)
        accessor[layer] = torch.where(mask.to(out.device), clean.to(out.device, out.dtype), out)

    def _plain(self, chunk: Chunk, kwargs: dict) -> torch.Tensor:
        """Every row runs from the input (layers below the chunk's lowest one skipped, when allowed)."""
        start, pairs = chunk.start, [pair for *_, pair in chunk.rows]
        if start > 0:
            kwargs.update(self.run.cache_kwargs(start, pairs))
        can_skip = self.run is not None and self.run.layer_outputs is not None
        skip_below = min(r[0] for r in chunk.rows) if can_skip else 0
        masks = self._patch_masks(chunk.rows, start)
        with self.model.trace(self._inputs(start, pairs), **kwargs):
            for layer in range(skip_below):  # forward order: skips first, then the patches
                self.model._layer_envoy(layer).skip(self.run.layer_output(layer, start, pairs))
            for layer in sorted(masks):
                self._patch(layer, masks[layer], pairs, start)
            logits = self.model.logits.save()  # (rows, kept, vocab)
        return logits

    def _staggered(self, chunk: Chunk, kwargs: dict) -> torch.Tensor:
        """Rows join the batch at their layer: the forward starts with one row (the input), skips the layers up to
        the lowest entry, whose output becomes that entry's rows, and grows at each later entry."""
        start, n = chunk.start, self.sweep.num_layers
        joining: dict[int, list[Row]] = {}  # entry layer -> rows joining at its output (-1: the input row)
        for row in chunk.rows:
            joining.setdefault(self.sweep.entry_layer(row[0]), []).append(row)
        first = min(joining)  # the rows of the first entry are the last skipped layer's output (or the input)
        input_pair = joining[first][0][2] if first < 0 else chunk.rows[0][2]
        present: list[list[int]] = []  # pairs of the rows in the batch at each layer's input, in batch order
        batch = [input_pair] if first < 0 else []
        for layer in range(n):
            present.append(list(batch) if layer > first else [input_pair])
            batch += [pair for *_, pair in joining.get(layer, [])]
        if start > 0:
            kwargs.update(self.run.cache_kwargs(start, present))
        masks = {} if self.sweep.component == "resid" else self._patch_masks(chunk.rows, start)
        with self.model.trace(self._inputs(start, [input_pair]), **kwargs):
            for layer in range(first + 1):  # layers up to the first entry are skipped
                joins = joining[layer] if layer == first else [(layer, 0, input_pair)]
                value = self.run.layer_output(layer, start, [pair for *_, pair in joins])
                if layer == first:
                    value = _with_first(value, self._joining_rows(joins, _first(value), start))
                self.model._layer_envoy(layer).skip(value)
            for layer in range(first + 1, n):
                if layer in masks:  # patched inside the layer: the rows present are the chunk's first ones
                    self._patch(layer, masks[layer][: len(present[layer])], present[layer], start)
                if layer in joining:
                    envoy = self.model._layer_envoy(layer)
                    out = envoy.output
                    joins = joining[layer]
                    base = _first(self.run.layer_output(layer, start, [pair for *_, pair in joins]))
                    new = self._joining_rows(joins, base, start).to(_first(out).device)
                    envoy.output = _with_first(out, torch.cat([_first(out), new], dim=0))
            logits = self.model.logits.save()  # (rows, kept, vocab)
        return logits

    def _joining_rows(self, rows: list[Row], base: torch.Tensor, start: int) -> torch.Tensor:
        """Rows joining at a layer's output ``base`` (corrupted, one per row): patched there for ``"resid"``."""
        if self.sweep.component != "resid":
            return base  # patched inside the next layer
        base = base.clone()  # (len(rows), seq - start, hidden)
        for i, (layer, j, pair) in enumerate(rows):
            base[i, j - start] = self.sweep.clean_acts[layer][pair, j].to(base.device, base.dtype)
        return base


# ------------------------------------------------------------------------------------------------
# Run-time check: staggered rows against plain rows
# ------------------------------------------------------------------------------------------------


def probe_rows(sweep: Sweep, rows: list[Row]) -> list[Row]:
    """A few rows to check staggered rows on: the lowest, a middle and the highest patched layer, at two
    neighbouring positions (or heads) where patches change the run (at or after the first token where the
    prompts differ), for the first and last pair: rows joining later would show any trace of earlier rows.

    Example:
        >>> from unilens import StandardizedTransformer
        >>> from unilens.testing import tiny_model
        >>> model = StandardizedTransformer(*tiny_model("llama"))
        >>> ids = torch.tensor([[1, 2, 3, 4]])
        >>> corrupted = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        >>> sweep = Sweep(model, "resid", model.layers_output, {}, torch.tensor([[1, 5, 3, 4]]), corrupted,
        ...               lambda logits: logits[:, -1, 0], None, [0, 1, 2, 3], per_cell=False)
        >>> sweep.first_difference  # the prompts differ from position 1 on
        1
        >>> probe_rows(sweep, [(layer, position, 0) for layer in range(2) for position in range(4)])
        [(0, 1, 0), (0, 2, 0), (1, 1, 0), (1, 2, 0)]
    """
    layers = sorted({r[0] for r in rows})
    layers = {layers[0], layers[len(layers) // 2], layers[-1]}
    columns = sorted({r[1] for r in rows})
    if sweep.component != "head":
        informative = [j for j in columns if j >= sweep.first_difference] or columns
        columns = informative[-3:-1] if len(informative) > 2 else informative  # width >= 2 where possible
    pairs = {0, sweep.pairs - 1}
    return [r for r in rows if r[0] in layers and r[1] in columns[:2] and r[2] in pairs]


def check_staggered(
    runner: ChunkRunner, rows: list[Row], resume: bool
) -> tuple[bool, Chunk | None, torch.Tensor | None]:
    """Run a few rows as one staggered chunk and as plain rows, and compare every logit.

    Returns (ok, the chunk run, its logits): when ok, those rows are done."""
    sweep = runner.sweep
    start = min(sweep.first_position(r) for r in rows) if resume else 0
    chunk = _chunks_at(sweep, start, sorted(rows, key=lambda r: r[0]), True)[0]
    if len(chunk.rows) < 2:
        return True, None, None  # one row from a one-row input: what the corrupted run's check covered
    name = type(sweep.model.module_accessor.model).__name__
    try:
        staggered = runner.run_chunk(chunk, full_logits=True)
        plain = runner.run_chunk(Chunk(chunk.start, chunk.rows, False), full_logits=True)
    except Exception as err:  # noqa: BLE001 - the model's code does not allow a growing batch
        reason = f"fails ({type(err).__name__}: {err})"
    else:
        if _reproduces(staggered, plain):
            return True, chunk, staggered[:, staggered.shape[1] - sweep.kept_logits(chunk.start) :]
        reason = "does not reproduce plain batched rows"
    warnings.warn(f"activation_patching: rows joining the batch at their patched layer {reason} for {name}; "
                  "every row runs from the first layer (same result, slower).", stacklevel=4)
    return False, None, None


# ------------------------------------------------------------------------------------------------
# The metric, and the whole sweep
# ------------------------------------------------------------------------------------------------


class _Metrics:
    """Calls the metric once per cell on its rows of every pair, in pair order, as soon as all have run (or,
    when not ``per_cell``: one pair, once per chunk on all its rows)."""

    def __init__(self, sweep: Sweep, run: CorruptedRun | None):
        self.sweep, self.run = sweep, run
        self.values: dict[Row, torch.Tensor] = {}
        self.pending: dict[tuple[int, int], dict[int, torch.Tensor]] = {}

    def metric_logits(self, chunk: Chunk, logits: torch.Tensor) -> torch.Tensor:
        """Each row's logits as the metric sees them: every position ``(rows, seq, vocab)``, or the
        ``metric_positions`` in order ``(rows, len(metric_positions), vocab)``; positions a chunk did not compute
        are the corrupted run's."""
        sweep = self.sweep
        pairs = torch.tensor([pair for *_, pair in chunk.rows], dtype=torch.long)
        offset = sweep.seq - logits.shape[1]  # the position of logits[:, 0]
        if sweep.metric_positions is None:
            if offset > 0:
                logits = torch.cat([self.run.logits[pairs, :offset].to(logits.device), logits], dim=1)
            return logits
        columns = [self.run.logits[pairs, p].to(logits.device) if p < offset else logits[:, p - offset]
                   for p in sweep.metric_positions]  # fmt: skip
        return torch.stack(columns, dim=1)

    def add(self, chunk: Chunk, logits: torch.Tensor) -> None:
        sweep = self.sweep
        logits = self.metric_logits(chunk, logits)  # (rows, positions, vocab)
        if not sweep.per_cell:
            self.values.update(zip(chunk.rows, check_metric(sweep.metric(logits), len(chunk.rows))))
            return
        for row_logits, (layer, j, pair) in zip(logits, chunk.rows):
            done = self.pending.setdefault((layer, j), {})
            done[pair] = row_logits
            if len(done) == sweep.pairs:
                stacked = torch.stack([done[p] for p in range(sweep.pairs)])  # (pairs, positions, vocab)
                values = check_metric(sweep.metric(stacked), sweep.pairs)
                self.values.update(((layer, j, p), v) for p, v in enumerate(values))
                del self.pending[(layer, j)]


def run_sweep(
    sweep: Sweep,
    rows: list[Row],
    batch_size: int | None,
    resume: bool,
    stagger: bool,
    progress: bool,
) -> dict[Row, torch.Tensor]:
    """Every row's metric value: the corrupted run (and its checks), the staggered check, the plan, then the chunks.

    ``resume`` / ``stagger`` ask for the fast paths; each is used only where its run-time check passes.
    """
    firsts = [sweep.first_position(r) for r in rows]
    resume_at = min((p for p in firsts if p > 0), default=0) if resume else 0
    run = None  # without one every run is plain: from the input, over the whole sequence
    if resume_at > 0 or stagger:
        run = CorruptedRun.build(sweep.model, sweep.batch, resume_at)
    stagger = stagger and run is not None and run.layer_outputs is not None
    resume = run is not None and run.cache is not None  # the cache passed its check
    if batch_size is None:
        batch_size = sweep.default_batch_size()
    runner, metrics = ChunkRunner(sweep, run), _Metrics(sweep, run)
    if stagger:
        stagger, checked, logits = check_staggered(runner, probe_rows(sweep, rows), resume)
        if checked is not None:
            metrics.add(checked, logits)
            done = set(checked.rows)
            rows = [r for r in rows if r not in done]
    chunks = plan(sweep, rows, batch_size, stagger, resume)
    for chunk in tqdm(chunks, desc=f"patching {sweep.component}", disable=not progress or len(chunks) == 1):
        metrics.add(chunk, runner.run_chunk(chunk))
    return metrics.values
