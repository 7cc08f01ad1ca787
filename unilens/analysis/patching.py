"""Activation and attribution patching: the entry points (the batched sweep engine is ``unilens.analysis.sweep``)."""

from __future__ import annotations

from typing import Sequence

import torch
from nnsight import save as _nnsight_save

from ..core.distributed import distributed_pairs, is_distributed, rank_world
from .arguments import (
    Metric,
    _checked_indices,
    _check_callable,
    _encode,
    _layer_list,
    _position_list,
    _positive_int,
    check_metric,
)
from .sweep import Row, Sweep, run_sweep

__all__ = ["activation_patching", "attribution_patching"]


_COMPONENTS = {"resid": "layers_output", "attn": "attentions_output", "mlp": "mlps_output", "head": "attention_heads"}


def _accessor(model, component: str):
    if component not in _COMPONENTS:
        raise ValueError(f"component must be one of {sorted(_COMPONENTS)}, got {component!r}.")
    return getattr(model, _COMPONENTS[component])


def _encode_pairs(
    model, clean: str | Sequence[str], corrupted: str | Sequence[str]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Clean and corrupted prompts, one pair or lists of pairs, as two unpadded batches ``(pairs, seq)``."""
    one = isinstance(clean, str) and isinstance(corrupted, str)
    cleans, corrupteds = ([clean], [corrupted]) if one else (clean, corrupted)
    if isinstance(cleans, str) or isinstance(corrupteds, str) or not all(
        isinstance(p, str) for p in [*cleans, *corrupteds]
    ):
        raise TypeError("clean and corrupted must each be one prompt string, or each a list of prompt strings.")
    cleans, corrupteds = list(cleans), list(corrupteds)
    if not cleans or len(cleans) != len(corrupteds):
        raise ValueError(f"clean and corrupted must be as many prompts (one pair each), got {len(cleans)} clean "
                         f"and {len(corrupteds)} corrupted.")  # fmt: skip
    labelled = [("clean", p) for p in cleans] + [("corrupted", p) for p in corrupteds]
    lengths = [len(model.tokenizer(p).input_ids) for _, p in labelled]
    if len(set(lengths)) > 1:
        k = next(i for i, n in enumerate(lengths) if n != lengths[0])
        raise ValueError(
            f"clean and corrupted prompts must tokenize to the same length (patching swaps activations "
            f"position by position, and pairs share batches): clean {cleans[0]!r} has {lengths[0]} tokens, "
            f"{labelled[k][0]} {labelled[k][1]!r} has {lengths[k]}. Reword one of them."
        )
    return _encode(model, cleans), _encode(model, corrupteds)


def _clean_activations(model, accessor, batch: dict[str, torch.Tensor], layers: Sequence[int]) -> dict:
    """``accessor[layer]`` of every layer in ``layers`` on ``batch``, one no-grad trace: ``{layer: (n, seq, ...)}``."""
    acts: dict[int, torch.Tensor] = {}  # built before the trace: nnsight pushes back only saved names
    with torch.no_grad(), model.trace(batch):
        for layer in sorted(layers):
            acts[layer] = accessor[layer].save()  # (n, seq, hidden) or (n, seq, heads, head_dim)
        acts = _nnsight_save(acts)  # a remote request returns saved names only: the dict itself
    return acts


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """Detached, on CPU, float32 or wider (half-precision models give float32 scores, float64 models float64)."""
    return x.detach().to(torch.promote_types(x.dtype, torch.float32)).cpu()


def activation_patching(
    model,
    clean: str | Sequence[str],
    corrupted: str | Sequence[str],
    metric: Metric,
    component: str = "resid",
    layers: int | Sequence[int] | None = None,
    positions: int | Sequence[int] | None = None,
    batch_size: int | None = None,
    progress: bool = True,
    reuse_prefix: bool = True,
    stagger: bool = True,
    metric_positions: int | Sequence[int] | None = None,
    distribute: bool = True,
) -> torch.Tensor:
    """Activation patching: the corrupted run with ONE cell's activation replaced by the clean run's, per cell.

    ``component``: ``"resid"`` (``layers_output``), ``"attn"`` (``attentions_output``), ``"mlp"``
    (``mlps_output``), cells ``(layer, position)`` -> returns ``(len(layers), len(positions))``; or
    ``"head"`` (per-head attention output z before the output projection, ``attention_heads``, patched at
    all ``positions`` together), cells ``(layer, head)`` -> returns ``(len(layers), num_heads)``.
    ``metric(logits (n, seq, vocab)) -> (n,)`` is evaluated on the patched runs' logits, row by row.

    ``clean`` and ``corrupted`` may be lists of n prompt pairs (every prompt the same number of tokens): each
    cell is patched in every pair (pair i's clean activation into pair i's corrupted run), the metric is
    called per cell on the n runs in pair order (as on one batched forward of the n corrupted prompts),
    and the result gains a leading pair dimension, ``(n, len(layers), ...)``.

    With ``metric_positions`` (e.g. ``-1``), the metric gets those positions' logits only, in that order,
    ``(n, len(metric_positions), vocab)``, and the unembedding skips the others (most of a small model's
    patching work when the metric reads the last position): ``lambda logits: logits[:, -1, token]`` works
    unchanged with ``metric_positions=-1``.

    Many patched runs share one forward, a row each (at most ``batch_size`` rows; default: as many as keep
    ~256 MB of logits). What a patch cannot change is not recomputed, after a run-time check that the model
    allows it (else a warning, and the same result computed the plain way):

    - ``reuse_prefix``: a run patching position p starts at p; tokens before p are the corrupted run's
      (causal attention), from its key/value cache and logits (not for ``"head"`` over every position);
    - ``stagger``: a row joins the batch at its patched layer; layers below are the corrupted run's, so a
      forward starts with the rows of its lowest layer and grows, and the layers below it are skipped.

    Data parallel: under an initialized ``torch.distributed`` process group of several ranks (``torchrun``), lists
    of pairs are split across ranks (contiguous blocks, `unilens.distributed.split_range`) and every rank returns
    the whole ``(n, ...)`` result, gathered in pair order; only rank 0 shows a progress bar. Every rank must make
    the same call. ``distribute=False``: every rank computes all pairs itself.

    Example:
        >>> from unilens import StandardizedTransformer
        >>> from unilens.testing import tiny_model
        >>> model = StandardizedTransformer(*tiny_model("llama"))
        >>> paris = model.tokenizer(" Paris").input_ids[0]
        >>> effect = activation_patching(model, "The capital of France is", "The capital of Italy is",
        ...                              lambda logits: logits[:, -1, paris], progress=False)
        >>> effect.shape[0] == model.num_layers
        True
    """
    _check_callable(metric, "metric", "of the patched logits (n, positions, vocab) returning (n,)")
    if batch_size is not None:
        _positive_int(batch_size, "batch_size")
    if distribute and not isinstance(clean, str) and not isinstance(corrupted, str) and is_distributed():
        _encode_pairs(model, clean, corrupted)  # every rank checks every pair (same lengths) before the split
        return distributed_pairs(
            activation_patching, clean, corrupted, model=model, metric=metric, component=component, layers=layers,
            positions=positions, batch_size=batch_size, progress=progress and rank_world()[0] == 0,
            reuse_prefix=reuse_prefix, stagger=stagger, metric_positions=metric_positions, distribute=False,
        )  # fmt: skip
    accessor = _accessor(model, component)
    clean_batch, corrupted_batch = _encode_pairs(model, clean, corrupted)
    pairs, seq = clean_batch["input_ids"].shape
    layer_list = _layer_list(model, layers)
    position_list = _position_list(positions, seq)
    if metric_positions is not None:
        metric_positions = _checked_indices(metric_positions, seq, "metric position", "the prompts have {n} tokens")

    if model.__dict__.get("_remote_mode"):  # one request per forward: no key/value cache or layer outputs travel
        reuse_prefix = stagger = False  # between requests, so every patched run is a plain batched row
    clean_acts = _clean_activations(model, accessor, clean_batch, layer_list)  # (pairs, seq, ...) per layer

    # A row is one patched run: (layer, position) or (layer, head, patched at every listed position), in a pair.
    columns = list(range(model.num_heads)) if component == "head" else position_list
    rows = [(layer, j, pair) for layer in layer_list for j in dict.fromkeys(columns) for pair in range(pairs)]
    sweep = Sweep(model, component, accessor, clean_acts, clean_batch["input_ids"], corrupted_batch, metric,
                  metric_positions, sorted(set(position_list)), per_cell=not isinstance(clean, str))
    values = run_sweep(sweep, rows, batch_size, resume=reuse_prefix, stagger=stagger, progress=progress)
    result = _cell_grid(values, layer_list, columns, pairs)  # (pairs, layers, columns)
    return result[0] if isinstance(clean, str) else result


def _cell_grid(values: dict[Row, torch.Tensor], layers: list[int], columns: list[int], pairs: int) -> torch.Tensor:
    """The sweep's per-row metric values as one tensor ``(pairs, len(layers), len(columns))``, float32 or wider."""
    values = {row: _at_least_float32(v) for row, v in values.items()}
    return torch.stack([
        torch.stack([torch.stack([values[(layer, j, pair)] for j in columns]) for layer in layers])
        for pair in range(pairs)
    ])


def attribution_patching(
    model,
    clean: str,
    corrupted: str,
    metric: Metric,
    component: str = "resid",
    layers: int | Sequence[int] | None = None,
) -> torch.Tensor:
    """Attribution patching: the first-order estimate of activation patching, ``(len(layers), seq)``.

    For each (layer, position): ``(clean_act - corrupted_act) . d metric / d act`` with the gradient taken
    at the corrupted run (``metric`` is summed over its ``(n,)`` output). One clean forward, then ONE
    corrupted forward and ONE backward for all cells. ``component``: ``"resid"``, ``"attn"`` or ``"mlp"``.

    Example:
        >>> from unilens import StandardizedTransformer
        >>> from unilens.testing import tiny_model
        >>> model = StandardizedTransformer(*tiny_model("llama"))
        >>> paris = model.tokenizer(" Paris").input_ids[0]
        >>> est = attribution_patching(model, "The capital of France is", "The capital of Italy is",
        ...                            lambda logits: logits[:, -1, paris])
        >>> est.shape[0] == model.num_layers
        True
    """
    if component == "head":
        raise ValueError("attribution_patching supports component 'resid', 'attn' or 'mlp'; use activation_patching "
                         "for heads.")
    accessor = _accessor(model, component)
    _check_callable(metric, "metric", "of the logits (1, seq, vocab) returning (1,)")
    if not isinstance(clean, str) or not isinstance(corrupted, str):
        raise TypeError("attribution_patching takes one clean and one corrupted prompt string.")
    clean_batch, corrupted_batch = _encode_pairs(model, clean, corrupted)
    layer_list = sorted(_layer_list(model, layers))
    clean_acts = _clean_activations(model, accessor, clean_batch, layer_list)
    # A zero "probe" added to each activation: d metric / d probe = d metric / d activation, whatever
    # the module does with its own output tensor; autograd.grad leaves the parameters' .grad untouched.
    probes = {layer: torch.zeros_like(act, requires_grad=True) for layer, act in clean_acts.items()}
    corrupted_acts: dict[int, torch.Tensor] = {}
    with torch.enable_grad():
        with model.trace(corrupted_batch):
            for layer in layer_list:
                out = accessor[layer]
                corrupted_acts[layer] = out.detach().save()
                accessor[layer] = out + probes[layer].to(out.device, out.dtype)
            logits = model.logits.save()
        value = check_metric(metric(logits), 1).sum()
        grads = torch.autograd.grad(value, [probes[layer] for layer in layer_list], allow_unused=True)
    rows = []
    for layer, grad in zip(layer_list, grads):
        if grad is None:
            grad = torch.zeros_like(probes[layer])  # the metric does not depend on this activation
        delta = (clean_acts[layer] - corrupted_acts[layer]).to(grad.dtype)
        rows.append((delta * grad).sum(dim=-1)[0])  # (seq,)
    order = _layer_list(model, layers)
    by_layer = dict(zip(layer_list, rows))
    return _at_least_float32(torch.stack([by_layer[layer] for layer in order]))

