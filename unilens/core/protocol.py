"""``StandardizedModel``: the members of the standardized model that the tiers below it (hooks, compat, analysis,
scale) may rely on. Features type against this Protocol instead of importing the class, so no module below
``unilens.model`` imports it back; the private members listed here are the model's explicit callbacks for them."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class StandardizedModel(Protocol):
    """What features may use of a ``unilens.model.StandardizedTransformer`` (or a stand-in with the same members).

    Example:
        >>> from unilens import StandardizedTransformer
        >>> from unilens.testing import tiny_model
        >>> isinstance(StandardizedTransformer(*tiny_model("llama"), check=False), StandardizedModel)
        True
    """

    # --- structure (unilens.arch) ---
    architecture: Any  # unilens.arch.discovery.Architecture
    module_accessor: Any  # unilens.arch.discovery.ModuleMap over the HF model
    tokenizer: Any
    config: Any
    layers_output: Any  # accessor: layers_output[i] (batch, seq, hidden), readable and assignable in a trace
    allow_nonfinite: bool  # True: assignments / steering may write NaN / inf (refused by default)
    _attention_modules: list  # layer i's attention module with unilens's hook points, or None

    @property
    def num_layers(self) -> int: ...
    @property
    def num_heads(self) -> int: ...
    @property
    def num_kv_heads(self) -> int: ...
    @property
    def head_dim(self) -> int: ...
    @property
    def hidden_size(self) -> int: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def input_device(self) -> torch.device: ...
    @property
    def input_ids(self) -> torch.Tensor | None:
        """This forward's token ids ``(batch, seq)`` inside a trace (an invoke: its rows), the last forward's after."""
    @property
    def attention_mask(self) -> torch.Tensor | None:
        """This forward's attention mask ``(batch, seq)`` (None: no padding), as ``input_ids``."""

    # --- nnsight ---
    def trace(self, *inputs: Any, **kwargs: Any) -> Any: ...
    def generate(self, *inputs: Any, **kwargs: Any) -> Any: ...

    # --- callbacks the hooks tier uses while a trace runs ---
    def _envoy_at(self, path: str) -> Any:
        """The nnsight envoy of the module at a dotted path of the HF model."""

    def _note_read(self, accessor: str, layer: int | None) -> None:
        """Record a read of the running trace (to explain out-of-order reads)."""

    def _unflatten_tokens(self, value: torch.Tensor) -> torch.Tensor:
        """``(rows * seq, d)`` -> ``(rows, seq, d)`` for models whose MLPs run on flattened tokens."""
