"""The probe forward: one forward of the plain HF model on a few token ids (``probe_ids``), with torch hooks (and
``forward`` wrappers) that exist only for it and are always removed, optionally stopped early by a hook.

Everything unilens finds by data flow runs through it: discovery's probes (parallel blocks, the final norm, branch
outputs, learned position embeddings), the hook points' parts (``unilens.hooks.points``) and the forward order of the
standardized tensors (``unilens.hooks.reads``).

Example:
    >>> from unilens.testing import tiny_model
    >>> hf, _ = tiny_model("llama")
    >>> seen = []
    >>> with Probe(hf) as probe:
    ...     probe.pre_hook(hf.model.layers[1], lambda mod, args: seen.append(args[0].shape), stop=True)
    ...     probe.run()  # stopped before layer 1: False
    False
    >>> seen, hf.model.layers[1]._forward_pre_hooks  # the hook is gone
    ([torch.Size([1, 4, 64])], OrderedDict())
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from .offload import module_device
from .structure import token_table

__all__ = ["PROBE_LENGTH", "Probe", "StopForward", "probe_ids"]

# Tokens in a probe input: more than one (masks are causal, positions differ), few enough to cost one small forward.
PROBE_LENGTH = 4


class StopForward(Exception):
    """Raised by a probe hook to end the forward there (``Probe.run`` catches it)."""


def probe_ids(model: nn.Module, length: int = PROBE_LENGTH, other: bool = False) -> torch.Tensor:
    """``(1, length)`` token ids of a probe forward, on the device the model takes its inputs on.

    ``(arange(length) * 7 + 3) % vocab``: distinct tokens, clear of the special ids 0..2 of small vocabularies.
    ``other=True``: ``(ids * 5 + 11) % vocab``, another token at every position (a table whose output changes with
    these ids is a token table, not a position table).

    Example:
        >>> from unilens.testing import tiny_model
        >>> hf, _ = tiny_model("gpt2")
        >>> probe_ids(hf).tolist(), probe_ids(hf, other=True).tolist()
        ([[3, 10, 17, 24]], [[26, 61, 96, 131]])
    """
    embed = token_table(model.get_input_embeddings())  # a one-codebook audio LM's ModuleList: its one table
    vocab = embed.weight.shape[0]
    ids = (torch.arange(length, device=module_device(embed)).unsqueeze(0) * 7 + 3) % vocab  # accelerate's execution
    return (ids * 5 + 11) % vocab if other else ids  # device under device_map


class Probe:
    """Temporary torch hooks on a model and forwards of it on ``probe_ids``; leaving the ``with`` block (or
    ``remove()``) removes every hook and restores every wrapped ``forward``, whatever happened.

    ``stop=True`` on a hook raises ``StopForward`` once the hook has run: the forward ends there and ``run`` returns
    False (the rest of the model does not run).

    Example:
        >>> from unilens.testing import tiny_model
        >>> hf, _ = tiny_model("gpt2")
        >>> outputs = []
        >>> with Probe(hf) as probe:
        ...     probe.forward_hook(hf.transformer.h[0].attn, lambda mod, args, out: outputs.append(out[0].shape))
        ...     probe.run()
        True
        >>> outputs
        [torch.Size([1, 4, 64])]
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self._handles: list[Any] = []
        self._wrapped: list[tuple[nn.Module, Any]] = []

    def __enter__(self) -> "Probe":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    @staticmethod
    def _stopping(fn: Callable | None) -> Callable:
        def hook(*args: Any, **kwargs: Any) -> None:
            if fn is not None:
                fn(*args, **kwargs)
            raise StopForward

        return hook

    def forward_hook(self, module: nn.Module, fn: Callable | None, *, with_kwargs: bool = False,
                     prepend: bool = False, stop: bool = False) -> None:
        """``module.register_forward_hook(fn, ...)`` for this probe (a return value other than None replaces the
        module's output); ``stop``: end the forward after it."""
        fn = self._stopping(fn) if stop else fn
        self._handles.append(module.register_forward_hook(fn, with_kwargs=with_kwargs, prepend=prepend))

    def pre_hook(self, module: nn.Module, fn: Callable | None, *, with_kwargs: bool = False,
                 stop: bool = False) -> None:
        """``module.register_forward_pre_hook(fn, ...)`` for this probe; ``stop``: end the forward there, before the
        module runs."""
        fn = self._stopping(fn) if stop else fn
        self._handles.append(module.register_forward_pre_hook(fn, with_kwargs=with_kwargs))

    def wrap_forward(self, module: nn.Module, wrap: Callable[[Callable], Callable]) -> None:
        """Replace ``module.forward`` by ``wrap(module.forward)`` for this probe. It sits where nnsight hands a
        module's input and output to a trace: after the forward pre-hooks, before the forward hooks."""
        self._wrapped.append((module, module.__dict__.get("forward", _UNSET)))
        module.__dict__["forward"] = wrap(module.forward)

    def run(self, input_ids: torch.Tensor | None = None) -> bool:
        """One forward without autograd on ``input_ids`` (default ``probe_ids(model)``); False when a hook stopped
        it (``StopForward``), True when it ran to the end."""
        ids = probe_ids(self.model) if input_ids is None else input_ids
        try:
            with torch.no_grad():
                self.model(input_ids=ids)
        except StopForward:
            return False
        return True

    def remove(self) -> None:
        """Remove every hook and restore every wrapped ``forward`` (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module, previous in reversed(self._wrapped):
            if previous is _UNSET:
                del module.__dict__["forward"]
            else:
                module.__dict__["forward"] = previous
        self._wrapped.clear()


_UNSET = object()
