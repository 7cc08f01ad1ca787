"""Models dispatched by accelerate (`device_map`, `offload_folder`): real parameter values and execution devices.

A model loaded with ``device_map`` that puts some modules on ``"cpu"`` / ``"disk"`` beyond the execution device
keeps those parameters on the ``meta`` device; accelerate's ``AlignDevicesHook`` (``module._hf_hook``) loads them
from its ``weights_map`` (a CPU dict or the offload folder) just before the module runs and drops them after.
Anything that reads a parameter outside a forward (weight views, probes, fingerprints) must ask here instead of
reading ``module.weight``, and anything that needs "the module's device" must use the hook's execution device.

Example:
    >>> import tempfile, torch
    >>> from transformers import AutoModelForCausalLM
    >>> from unilens.testing import tiny_model
    >>> hf, tok = tiny_model("llama")
    >>> folder = tempfile.mkdtemp()
    >>> hf.save_pretrained(folder)
    >>> device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
    ...               "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    >>> off = AutoModelForCausalLM.from_pretrained(folder, device_map=device_map, offload_folder=folder + "/off")
    >>> q = off.model.layers[1].self_attn.q_proj
    >>> q.weight.device.type, parameter(q, "weight").device.type
    ('meta', 'cpu')
    >>> bool((parameter(q, "weight") == hf.model.layers[1].self_attn.q_proj.weight).all())
    True
"""

from __future__ import annotations

import weakref
from typing import Iterator

import torch
from torch import nn

from ..core.memo import ProcessWeakKeyDictionary, ProcessWeakSet

__all__ = [
    "OffloadError", "parameter", "module_device", "offloaded_parameter_names", "is_dispatched", "detached_copy",
    "prepare_dispatched", "check_offload_map",
]


class OffloadError(RuntimeError):
    """A parameter is on the meta device and no accelerate hook holds its value."""


# module -> its parent, per root model (built once; modules are not re-parented after dispatch). Per process: they
# pickle empty (remote mode ships the functions that read them by value).
_PARENTS: "weakref.WeakKeyDictionary[nn.Module, tuple[nn.Module, str]]" = ProcessWeakKeyDictionary()
_ROOTS: "weakref.WeakSet[nn.Module]" = ProcessWeakSet()


def _align_hooks(module: nn.Module) -> Iterator[object]:
    """The ``AlignDevicesHook``s attached to ``module`` (directly or inside a ``SequentialHook``)."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return
    for h in getattr(hook, "hooks", None) or (hook,):
        if hasattr(h, "execution_device"):  # AlignDevicesHook (duck-typed: no accelerate import needed here)
            yield h


def _register_parents(root: nn.Module) -> None:
    if root in _ROOTS:
        return
    _ROOTS.add(root)
    for parent in root.modules():
        for name, child in parent.named_children():
            _PARENTS.setdefault(child, (parent, name))


def _ancestors(module: nn.Module) -> Iterator[tuple[nn.Module, str]]:
    """``(ancestor, dotted path from ancestor to module)``, starting with ``(module, "")``."""
    yield module, ""
    path = ""
    current = module
    while current in _PARENTS:
        parent, name = _PARENTS[current]
        path = f"{name}.{path}" if path else name
        yield parent, path
        current = parent


def parameter(module: nn.Module, name: str, root: nn.Module | None = None) -> torch.Tensor | None:
    """The real value of ``module``'s direct parameter / buffer ``name`` (``None`` if it has none), loading it
    from accelerate's offload map when it sits on the meta device.

    For an offloaded parameter the result is a copy of the stored value (on the CPU; cast to the parameter's dtype
    as accelerate casts it), so writing to it does not change the model; for a parameter in memory it is the
    parameter itself. ``root`` (the whole model) is
    needed only when the offload hook sits on an ancestor of ``module`` (``place_submodules``); modules of a
    model passed to `module_device` / `is_dispatched` before are known already.

    Example:
        >>> from torch import nn
        >>> lin = nn.Linear(2, 3)
        >>> parameter(lin, "weight") is lin.weight
        True
    """
    value = getattr(module, name, None)
    if value is None or not isinstance(value, torch.Tensor) or value.device.type != "meta":
        return value
    if root is not None:
        _register_parents(root)
    for ancestor, path in _ancestors(module):
        key = f"{path}.{name}" if path else name
        for hook in _align_hooks(ancestor):
            weights_map = getattr(hook, "weights_map", None)
            if getattr(hook, "offload", False) and weights_map is not None:
                try:
                    stored = weights_map[key]
                except KeyError:
                    continue
                if value.dtype.is_floating_point and stored.dtype != value.dtype:
                    return stored.to(value.dtype)  # as accelerate casts it when the module runs
                # a CPU map hands out the very tensor the forward reads: a copy, so a view never edits the model
                return stored.clone()
    raise OffloadError(
        f"{type(module).__name__}.{name} is on the meta device and no accelerate offload hook holds its value: the "
        "model was built without weights (init_empty_weights / device='meta') or dispatched without a weights map. "
        "Load it with from_pretrained(..., device_map=..., offload_folder=...) so accelerate can load the weights."
    )


def module_device(module: nn.Module) -> torch.device:
    """Where ``module`` computes: accelerate's execution device when it is dispatched, else the device of its
    first parameter that is not on ``meta`` (CPU for a module without parameters).

    Example:
        >>> from torch import nn
        >>> module_device(nn.Linear(2, 3)).type
        'cpu'
    """
    for hook in _align_hooks(module):
        device = hook.execution_device
        if device is not None:
            return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    for tensor in module.parameters():
        if tensor.device.type != "meta":
            return tensor.device
    for sub in module.modules():
        for hook in _align_hooks(sub):
            if hook.execution_device is not None:
                return module_device(sub)
    return torch.device("cpu")


def is_dispatched(model: nn.Module) -> bool:
    """Whether accelerate hooks are attached anywhere in ``model`` (``device_map`` loading); registers its
    module tree for `parameter`."""
    dispatched = any(getattr(m, "_hf_hook", None) is not None for m in model.modules())
    if dispatched:
        _register_parents(model)
    return dispatched


def offloaded_parameter_names(model: nn.Module) -> list[str]:
    """Dotted names of ``model``'s parameters kept off the execution device (on ``meta`` until their module runs).

    Example:
        >>> from torch import nn
        >>> offloaded_parameter_names(nn.Linear(2, 3))
        []
    """
    return [name for name, p in model.named_parameters() if p.device.type == "meta"]


def detached_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` without accelerate's hooks and with every offloaded parameter loaded, for code that
    probes a module outside the model's forward (e.g. in float64). Hooks and their offload maps are not copied.

    Example:
        >>> from torch import nn
        >>> norm = nn.LayerNorm(4)
        >>> bool((detached_copy(norm).weight == norm.weight).all())
        True
    """
    import copy

    memo: dict[int, object] = {}
    for sub in module.modules():
        hook = getattr(sub, "_hf_hook", None)
        if hook is not None:
            memo[id(hook)] = hook  # shared, not copied (a disk offload map is large)
    copied = copy.deepcopy(module, memo)
    for original, sub in zip(module.modules(), copied.modules()):
        for name, p in list(sub.named_parameters(recurse=False)):
            if p.device.type == "meta":
                value = parameter(original, name).detach().clone()
                sub._parameters[name] = nn.Parameter(value, requires_grad=p.requires_grad)
        if "_hf_hook" in sub.__dict__:
            del sub.__dict__["_hf_hook"]
            sub.__dict__.pop("forward", None)  # accelerate's wrapper; the class's own forward remains
            sub.__dict__.pop("_old_forward", None)
    return copied


def prepare_dispatched(model: nn.Module) -> None:
    """Make a dispatched ``model`` usable by nnsight: registers its module tree for `parameter`; puts an execution
    device first in ``model.hf_device_map`` when its first entry is ``"disk"`` (transformers' pipeline, which
    nnsight builds, takes the first entry as the model's device and ``torch.device("disk")`` fails); and gives a
    model hooked by hand (``accelerate.cpu_offload``) the map ``{"": execution device}``, without which the
    pipeline moves it with ``.to()`` (impossible for meta weights). The map is informational after dispatch
    (accelerate's hooks hold the devices and the offloaded weights); nothing else changes.

    Example:
        >>> from accelerate import cpu_offload
        >>> m = cpu_offload(nn.Sequential(nn.Linear(2, 2)), execution_device=torch.device("cpu"))
        >>> m[0].weight.device.type
        'meta'
        >>> prepare_dispatched(m)
        >>> m.hf_device_map
        {'': 'cpu'}
        >>> m.hf_device_map = {"0": "disk", "1": "cpu"}
        >>> prepare_dispatched(m)
        >>> list(m.hf_device_map.values())
        ['cpu', 'disk']
    """
    if not is_dispatched(model):
        return
    check_offload_map(model)
    device_map = getattr(model, "hf_device_map", None)
    if device_map is None:  # hooked by hand (accelerate.cpu_offload / dispatch_model on a built model): say so, or
        model.hf_device_map = {"": str(module_device(model))}  # the pipeline would .to() the meta weights
        return
    if not isinstance(device_map, dict) or not device_map or next(iter(device_map.values())) != "disk":
        return
    first = next((k for k, v in device_map.items() if v != "disk"), None)
    if first is None:  # everything on disk: accelerate computes on the main device (CPU without an accelerator)
        model.hf_device_map = {"": "cpu", **device_map}
        return
    model.hf_device_map = {first: device_map[first], **{k: v for k, v in device_map.items() if k != first}}


def check_offload_map(model: nn.Module) -> None:
    """Refuse a dispatched ``model`` whose offload map lacks a value for a parameter of an offloaded module (its
    first forward would fail deep inside accelerate, whose hook loads every one of them). The usual cause: tied weights (the token embedding and ``lm_head``) put
    on different devices in ``device_map``. Reads only the maps' key lists, no weights.

    Example:
        >>> from accelerate import cpu_offload
        >>> check_offload_map(cpu_offload(nn.Sequential(nn.Linear(2, 2)), execution_device=torch.device("cpu")))
    """
    keys_of: dict[int, set[str]] = {}
    missing = []
    for module_name, module in model.named_modules():
        for hook in _align_hooks(module):
            weights_map = getattr(hook, "weights_map", None)
            if not getattr(hook, "offload", False) or weights_map is None:
                continue
            base, prefix = weights_map, ""
            if hasattr(weights_map, "dataset") and hasattr(weights_map, "prefix"):  # accelerate's PrefixedDataset
                base, prefix = weights_map.dataset, weights_map.prefix
            if id(base) not in keys_of:
                keys_of[id(base)] = set(iter(base))  # key lists only (OffloadedWeightsLoader.all_keys, dict keys)
            recurse = bool(getattr(hook, "place_submodules", False))
            for name, _ in module.named_parameters(recurse=recurse):  # the hook loads each of them, meta or not
                if prefix + name not in keys_of[id(base)]:
                    missing.append(f"{module_name}.{name}" if module_name else name)
    if missing:
        raise OffloadError(
            f"accelerate offloaded {missing[:4]}{' ...' if len(missing) > 4 else ''} but its offload map holds no "
            "value for them, so the first forward would fail. The usual cause: weights tied to each other (the "
            "token embedding and lm_head when config.tie_word_embeddings is true) placed on different devices in "
            "device_map; give the tied modules the same entry (e.g. both 'disk'), or use device_map='auto' with "
            "max_memory."
        )
