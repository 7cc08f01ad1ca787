"""Reading activations out of the model for the activation store: one right-padded batch forward (`_run_batch`:
torch hooks on the modules the accessors read, a trace for the rest, the forward stopped right after the last name is
read), the per-token view of each name (`_per_token`), the probe that fixes every name's row shape, the step-by-step
reads during generation, and the HF module paths of the names that are a module's output (`_hf_modules`)."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
from nnsight import save
from nnsight.intervention.interleaver import EarlyStopException

from ..core.accessors import LayerTensors
from ..core.names import HEADS_FIRST, PROBS
from ..hooks.reads import _RUNS_TO_THE_END, _layer_sites
from .store_format import CacheError, _dtype_name, _Name

if TYPE_CHECKING:
    from ..model.transformer import StandardizedTransformer


def _module_reads(model: "StandardizedTransformer", names: list[_Name]) -> dict[str, tuple[torch.nn.Module, str, bool]]:
    """``{key: (module, "input" | "output", copy)}`` for the names that are a module's first input / output (the
    six ``LayerTensors`` names): `_run_batch` reads those with a plain torch hook on the very module the accessor's
    nnsight envoy wraps, which skips nnsight's per-read interleaving (a switch into the trace body for each read: a
    few % of a SmolLM2 batch for 30 reads). The tensor is the one the accessor returns (`_first` of the output, or
    the first positional / keyword input, unflattened the same way; copied where the accessor copies), checked
    bitwise against the accessors on every architecture by tests/test_cache.py. Other names (attention hook
    points, logits) and remote models are read through the trace."""
    if model.__dict__.get("_remote_mode"):
        return {}
    sites = {}
    for name in names:
        accessor = getattr(model, name.accessor) if name.layer is not None else None
        if isinstance(accessor, LayerTensors):
            envoy = accessor._envoy_of(accessor._index(name.layer))
            sites[name.key] = (envoy._module, accessor._io, accessor._copy)
    return sites


# the names whose tensor is a module's output (its first element where it returns a tuple): what SAELens's
# HookedProxyLM reads from a hook name that is an HF module path (``model.layers.3``)
_HF_OUTPUTS = ("layers_output", "attentions_output", "mlps_output")


class _StopForward(Exception):
    """Raised by the hook of the last name a forward reads (no trace running): the rest of the forward is skipped."""


def _hf_modules(model: "StandardizedTransformer", names: list[_Name]) -> dict[str, str]:
    """``{"layers_output.3": "model.layers.3"}``: the names that are the output of a module of the HF model (its
    first element when it returns a tuple), with that module's path in ``named_modules()``, as SAELens's
    ``HookedProxyLM`` names its hooks for a model loaded with ``model_class_name="AutoModelForCausalLM"``."""
    out: dict[str, str] = {}
    for name in names:
        if name.accessor in _HF_OUTPUTS and name.layer is not None:
            site = _layer_sites(model, name.layer).get(name.accessor)
            if site is not None and site[1] == "output":
                out[name.key] = site[0]
    return out


def _run_batch(
    model: "StandardizedTransformer", names: list[_Name], rows: list[np.ndarray], pad_id: int, hooks: bool = True,
    consume: Callable[[str, torch.Tensor], None] | None = None,
    packed: bool = False,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One right-padded forward; returns ``{name: raw saved tensor}`` and the ``(batch, seq)`` mask.

    ``consume(key, value)``: where every name is hook-read (no trace runs), called from the hook with each value while
    the forward runs (the tensor is still in the CPU's cache, and nothing the model later changes in place has changed
    yet); those keys are then not in the returned dict. ``hooks=False`` reads every name through a trace (the
    reference the torch-hook reads are tested against). ``packed``: rows of one length (packed contexts) run with
    no attention mask, as SAELens runs them (no padding to mask; spares the model its check that the mask is all
    ones, a device sync per batch on a GPU).

    The forward stops once the last name is read (``names`` are in forward order), as SAELens stops it: where that
    name is hook-read, its hook raises once every hooked name is in (`_StopForward` outside a trace, nnsight's
    ``EarlyStopException`` inside one, which the trace swallows: by then every traced read, earlier in the forward,
    is served); where it is read through the trace, ``tracer.stop()`` follows it (nnsight lets the visit finish,
    then unwinds). Nothing after the last name runs, the unembedding included, unless ``logits`` is asked for."""
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
    last = names[-1]  # the deepest name (forward order)
    # stop the forward after the last name: from its hook (`keep`) or from the trace (`tracer.stop()`); a remote
    # model's forward runs on the server, as asked
    stop = last.accessor not in _RUNS_TO_THE_END and not model.__dict__.get("_remote_mode")
    stop_in_hook = stop and last.key in sites
    stop_exception = EarlyStopException if traced else _StopForward

    def keep(key: str, value: Any, copy: bool) -> None:
        if key not in hooked:  # a module called twice: its first call, as nnsight's .input / .output
            value = (value[0] if isinstance(value, (tuple, list)) else value).detach()
            if consume is None:
                hooked[key] = value.clone() if copy else value
            else:
                hooked[key] = None
                consume(key, model._unflatten_tokens(value))
            if stop_in_hook and len(hooked) == len(sites):  # the last name is in: nothing after it is needed
                raise stop_exception()

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
    wants_logits = any(name.accessor == "logits" for name in names)
    lean = {} if wants_logits else model._keep_last_logits_kwargs()
    inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}  # what a trace passes the model too
    if packed:
        if width * len(rows) != sum(len(r) for r in rows):
            raise CacheError("internal error: packed rows of different lengths")
        del inputs["attention_mask"]
    try:
        if not traced:  # every name is hook-read: the model's forward without a trace, which spares
            with torch.no_grad():  # nnsight's interleaver (~15 us per module call, ~2.5% of a SmolLM2 batch)
                try:
                    model.module_accessor.model(**inputs, **lean)
                except _StopForward:
                    pass
        else:
            with torch.no_grad(), model.trace(inputs, **lean) as tracer:
                for name in names:
                    if name.key in sites:
                        continue
                    saved[name.key] = name.value(model).save()
                # nnsight.save marks the container built outside the trace to come back from a remote request too
                saved = save(saved)  # (a remote request returns saved names only: the dict itself)
                if stop and not stop_in_hook:
                    tracer.stop()
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
    kind = name.layout
    value = value.detach()
    if kind == HEADS_FIRST:  # (batch, heads, seq, d) -> (batch, seq, heads, d)
        value = value.transpose(1, 2)
    elif kind == PROBS:  # (batch, heads, query, key) -> (batch, query, heads, key_length)
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
    model: "StandardizedTransformer", names: list[_Name], rows: list[np.ndarray], key_length: int, pad_id: int,
    packed: bool = False,
) -> tuple[dict[str, dict[str, Any]], tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """Row shape and dtype of every name, from a forward on ``rows``; also that forward's ``(saved, mask)``, which
    `_compute_shard` takes as its first batch when ``rows`` is that batch (a forward reads every weight once: on
    SmolLM2 even 4 tokens cost ~50 ms)."""
    saved, mask = _run_batch(model, names, rows, pad_id, packed=packed)
    out = {}
    for name in names:
        value = _per_token(name, saved[name.key], len(rows), mask.shape[1], key_length)
        out[name.key] = {"shape": list(value.shape[2:]), "dtype": _dtype_name(value.dtype)}
    return out, (saved, mask)



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
    wants_logits = any(name.accessor == "logits" for name in names)
    keep = {"logits_to_keep": 0} if wants_logits and model._keep_last_logits_kwargs() else {}
    with warnings.catch_warnings():
        # a text that ends early leaves the loop's last request unserved: nnsight warns; the steps made are kept
        warnings.filterwarnings("ignore", message=".*was never reached.*")
        with torch.no_grad(), model.generate(max_new_tokens=n_new + 1, do_sample=False, pad_token_id=pad_id,
                                             **keep) as tracer:  # fmt: skip
            with tracer.invoke({"input_ids": ids, "attention_mask": torch.ones_like(ids)}):
                for _ in tracer.iter[: n_new + 1]:
                    for name in names:
                        steps[name.key].append(name.value(model).save())
            with tracer.invoke():
                result["tokens"] = tracer.result.save()
    return steps, result["tokens"][0, len(prompt) :].cpu()


