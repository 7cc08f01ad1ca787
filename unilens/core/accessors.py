"""Accessors: ``model.<name>[i]`` reads / assigns one standardized tensor of a layer inside a trace."""

from __future__ import annotations

from typing import Any, Callable

import torch

from .protocol import StandardizedModel
from .tensors import _check_shape, _first, layer_index


class LayerAccessor:
    """``model.<name>[i]``: read (``.save()``) or assign one standardized tensor of layer ``i`` inside a trace.

    The tensor is always the plain ``(batch, seq, hidden)`` tensor, never the module's tuple.
    """

    def __init__(
        self, model: "StandardizedModel", name: str, envoy_of: Callable[[int], Any], io: str, kind: str = ""
    ):
        self._model, self._name, self._envoy_of, self._io = model, name, envoy_of, io
        self._copy = io == "output" and kind in model.architecture.mutated_in_place

    def _index(self, i: int) -> int:
        return layer_index(self._name, i, self._model.num_layers)

    def __len__(self) -> int:
        return self._model.num_layers

    def __getitem__(self, i: int) -> torch.Tensor:
        self._model._note_read(self._name, self._index(i))
        envoy = self._envoy_of(self._index(i))
        value = _first(envoy.output if self._io == "output" else envoy.input)
        value = self._model._unflatten_tokens(value)
        return value.clone() if self._copy else value

    def __setitem__(self, i: int, value: torch.Tensor) -> None:
        i = self._index(i)
        self._model._note_read(self._name, i)
        envoy = self._envoy_of(i)
        label = f"{self._name}[{i}]"
        if self._io == "input":
            current = envoy.input
            _check_shape(label, value, self._model._unflatten_tokens(current))
            envoy.input = value.reshape(current.shape)
            return
        current = envoy.output
        first = _first(current)
        _check_shape(label, value, self._model._unflatten_tokens(first))
        value = value.reshape(first.shape)
        envoy.output = (value, *current[1:]) if isinstance(current, tuple) else value

    def __iter__(self):
        return (self[i] for i in range(self._model.num_layers))


class ModuleList:
    """``model.attentions[i]`` / ``model.mlps[i]``: the nnsight envoys of a standardized module per layer."""

    def __init__(self, model: "StandardizedModel", name: str, envoy_of: Callable[[int], Any]):
        self._model, self._name, self._envoy_of = model, name, envoy_of

    def __getitem__(self, i: int):
        n = self._model.num_layers
        if not isinstance(i, int) or not -n <= i < n:
            raise IndexError(f"{self._name}[{i}]: layer index out of range, the model has {n} layers (0..{n - 1}).")
        return self._envoy_of(i % n)

    def __len__(self) -> int:
        return self._model.num_layers

    def __iter__(self):
        return (self[i] for i in range(len(self)))


