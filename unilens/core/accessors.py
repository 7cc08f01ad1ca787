"""Accessors: ``model.<name>[i]`` reads / assigns one standardized tensor of a layer inside a trace.

``LayerIndexed`` is the one base of every per-layer accessor (``LayerTensors`` and ``LayerModules`` here, the
attention hook points, the TransformerLens-style hook points and the weight views above): the layer index check
(``layer_index``: ints, negative from the end, one error message), ``len``, iteration and checked assignment (shape,
dtype, device, and finite values unless ``model.allow_nonfinite``).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import torch

from .layouts import ResidualLayout
from .protocol import StandardizedModel
from .tensors import _check_shape, _first, _with_first, layer_index

__all__ = ["LayerIndexed", "LayerModules", "LayerTensors"]


class LayerIndexed:
    """Base of ``model.<name>[i]``: ``self[i]`` checks ``i`` (``layer_index``, labelled ``name``) and reads
    ``self._get(i)``; ``self[i] = value`` checks it and calls ``self._set(i, value)``; ``len`` is the number of layers
    (``_count``); iteration reads every layer. Subclasses implement ``_get`` and, where a value can be assigned,
    ``_set`` (with ``_assign`` for the shape check).

    Example:
        >>> class Squares(LayerIndexed):
        ...     def _count(self): return 3
        ...     def _get(self, i): return i * i
        >>> sq = Squares(None, "squares")
        >>> len(sq), sq[-1], list(sq)
        (3, 4, [0, 1, 4])
        >>> sq[3]
        Traceback (most recent call last):
        ...
        IndexError: squares[3]: layer index out of range, the model has 3 layers (0..2).
    """

    def __init__(self, model: Any, name: str):
        self._model, self._name = model, name

    @property
    def model(self) -> Any:
        """The model the accessor reads from."""
        return self._model

    def _count(self) -> int:
        """The number of layers (valid indices ``-n..n-1``)."""
        return self._model.num_layers

    def _index(self, i: int) -> int:
        return layer_index(self._name, i, self._count())

    def _label(self, i: int | None) -> str:
        """How messages name the tensor of layer ``i`` (``None``: a whole-model tensor)."""
        return self._name if i is None else f"{self._name}[{i}]"

    def _get(self, i: int) -> Any:
        raise NotImplementedError

    def _set(self, i: int, value: Any) -> None:
        raise TypeError(f"{self._label(i)} cannot be assigned: it is not a tensor of the forward.")

    def _allow_nonfinite(self) -> bool:
        """Whether NaN / inf may be assigned (``model.allow_nonfinite = True``; refused by default)."""
        return bool(getattr(self._model, "allow_nonfinite", False))

    def _assign(self, envoy: Any, label: str, value: torch.Tensor) -> None:
        """``envoy.output = value`` after checking ``value`` has the shape, dtype and device the model computes, and
        finite values (unless ``model.allow_nonfinite``)."""
        # same rule as layers_output: a tensor missing the batch dimension would broadcast silently
        _check_shape(label, value, envoy.output, self._allow_nonfinite())
        envoy.output = value

    def __getitem__(self, i: int) -> Any:
        return self._get(self._index(i))

    def __setitem__(self, i: int, value: Any) -> None:
        self._set(self._index(i), value)

    def __len__(self) -> int:
        return self._count()

    def __iter__(self) -> Iterator[Any]:
        return (self[i] for i in range(len(self)))


class LayerTensors(LayerIndexed):
    """``model.<name>[i]``: read (``.save()``) or assign one standardized tensor of layer ``i`` inside a trace.

    The tensor is always the plain ``(batch, seq, hidden)`` tensor, never the module's tuple. ``layout`` says how the
    residual stream lies in a layer's own tensor (``unilens.core.layouts``: XLNet's ``(seq, batch, hidden)``,
    ProphetNet's main stream before its n-gram streams); reads return the standardized view and writes put it back
    in place. ``read_only``: why the tensor cannot be assigned (a write is refused with it). ``argument``: the keyword
    argument of the module's forward holding an input tensor where it is not the first input (Reformer's layers take
    the other reversible stream first: ``Architecture.layer_input_argument``). An output's own type is kept on a
    write (a namedtuple stays one).

    Example:
        >>> from unilens import StandardizedTransformer
        >>> from unilens.testing import tiny_model
        >>> model = StandardizedTransformer(*tiny_model("llama"), check=False)
        >>> with model.trace("The cat sat"):
        ...     out = model.layers_output[-1].save()
        >>> out.shape[-1] == model.hidden_size, len(model.layers_output) == model.num_layers
        (True, True)
    """

    def __init__(
        self, model: "StandardizedModel", name: str, envoy_of: Callable[[int], Any], io: str, kind: str = "",
        layout: ResidualLayout | None = None, read_only: str | None = None, argument: str | None = None,
    ):
        super().__init__(model, name)
        self._envoy_of, self._io = envoy_of, io
        self._copy = io == "output" and kind in model.architecture.mutated_in_place
        self._layout = layout or ResidualLayout()
        self._read_only = read_only
        self._argument = argument if io == "input" else None

    def _input(self, envoy: Any) -> torch.Tensor:
        """The module's input tensor: its first input, or the keyword argument ``argument``."""
        if self._argument is None:
            return envoy.input
        _, kwargs = envoy.inputs
        return kwargs[self._argument]

    def _write_input(self, envoy: Any, value: torch.Tensor) -> None:
        if self._argument is None:
            envoy.input = value
            return
        args, kwargs = envoy.inputs
        envoy.inputs = (args, {**kwargs, self._argument: value})

    def _standard(self, tensor: torch.Tensor) -> torch.Tensor:
        """The module's tensor as ``(batch, seq, hidden)``: tokens unflattened, the residual stream's layout undone."""
        return self._layout.to_residual(self._model._unflatten_tokens(tensor))

    def _get(self, i: int) -> torch.Tensor:
        self._model._note_read(self._name, i)
        envoy = self._envoy_of(i)
        value = self._standard(_first(envoy.output if self._io == "output" else self._input(envoy)))
        return value.clone() if self._copy else value

    def _set(self, i: int, value: torch.Tensor) -> None:
        self._model._note_read(self._name, i)
        label = self._label(i)
        if self._read_only is not None:
            raise TypeError(f"{label} cannot be assigned on this {self._model.architecture.model_type} model: "
                            f"{self._read_only}")
        envoy = self._envoy_of(i)
        if self._io == "input":
            current = self._input(envoy)
            _check_shape(label, value, self._standard(current), self._allow_nonfinite())
            self._write_input(envoy, self._layout.to_module(value, current).reshape(current.shape))
            return
        current = envoy.output
        first = _first(current)
        _check_shape(label, value, self._standard(first), self._allow_nonfinite())
        value = self._layout.to_module(value, first).reshape(first.shape)
        envoy.output = _with_first(current, value)


class LayerModules(LayerIndexed):
    """``model.attentions[i]`` / ``model.mlps[i]``: the nnsight envoys of a standardized module per layer.

    Example:
        >>> from unilens import StandardizedTransformer
        >>> from unilens.testing import tiny_model
        >>> model = StandardizedTransformer(*tiny_model("llama"), check=False)
        >>> type(model.attentions[0]._module).__name__, len(model.mlps) == model.num_layers
        ('LlamaAttention', True)
    """

    def __init__(self, model: "StandardizedModel", name: str, envoy_of: Callable[[int], Any]):
        super().__init__(model, name)
        self._envoy_of = envoy_of

    def _get(self, i: int) -> Any:
        return self._envoy_of(i)

    def _set(self, i: int, value: Any) -> None:
        raise TypeError(f"{self._label(i)} is a module, not a tensor: assign its output instead, e.g. "
                        f"model.{self._name}[{i}].output = value.")
