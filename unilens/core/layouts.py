"""How the residual stream lies in the layers' tensors, and the two maps between such a tensor and the
standardized ``(batch, seq, hidden)`` view that ``layers_input`` / ``layers_output`` (and every other per-layer module
tensor: ``attentions_output``, ``mlps_input``...) serve.

Almost every model runs its layers on ``(batch, seq, hidden)`` tensors. Two layouts differ (found by data flow at
load, ``unilens.arch.discovery.probe_residual_layout``, as the view of layer 0's input that HF's
``output_hidden_states`` reports); in both, the modules inside a layer run on tensors laid out as the layer's:

* ``seq_first``: ``(seq, batch, hidden)`` (XLNet's layers; HF transposes its hidden states back);
* ``leading_stream``: ``(batch, streams * seq, hidden)``, several streams concatenated along the sequence with the
  residual stream first (ProphetNet's decoder: the main stream, then one prediction stream per n-gram; HF's hidden
  states keep the main stream's positions).

Reading and writing agree: ``layout.to_module(layout.to_residual(t), t)`` is ``t``, and writing changes only the
residual stream's positions (the other streams are kept as the model computed them).

Example:
    >>> t = torch.arange(24.0).reshape(1, 6, 4)  # (batch, 2 streams * 3 tokens, hidden)
    >>> layout = ResidualLayout(LEADING_STREAM, streams=2)
    >>> layout.to_residual(t).shape
    torch.Size([1, 3, 4])
    >>> torch.equal(layout.to_module(layout.to_residual(t), t), t)
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["BATCH_FIRST", "LEADING_STREAM", "SEQ_FIRST", "ResidualLayout"]

BATCH_FIRST = "batch_first"  # (batch, seq, hidden): the standardized view itself
SEQ_FIRST = "seq_first"  # (seq, batch, hidden)
LEADING_STREAM = "leading_stream"  # (batch, streams * seq, hidden): the residual stream is the first seq positions

_KINDS = (BATCH_FIRST, SEQ_FIRST, LEADING_STREAM)


@dataclass(frozen=True)
class ResidualLayout:
    """The layout of the residual stream in a layer's tensor (``kind``, one of ``BATCH_FIRST`` / ``SEQ_FIRST`` /
    ``LEADING_STREAM``) and, for ``LEADING_STREAM``, how many streams share the sequence axis.

    Example:
        >>> x = torch.randn(5, 2, 8)  # XLNet: (seq, batch, hidden)
        >>> ResidualLayout(SEQ_FIRST).to_residual(x).shape
        torch.Size([2, 5, 8])
        >>> ResidualLayout().to_residual(x) is x  # batch_first: the tensor itself
        True
    """

    kind: str = BATCH_FIRST
    streams: int = 1

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"unknown residual layout {self.kind!r}; use one of {', '.join(_KINDS)}.")
        if self.streams < 1 or (self.kind == LEADING_STREAM) != (self.streams > 1):
            raise ValueError(f"a {self.kind} layout has {'several streams' if self.kind == LEADING_STREAM else 'one stream'}"
                             f", got streams={self.streams}.")

    @property
    def is_standard(self) -> bool:
        """Whether the layer's tensor is already ``(batch, seq, hidden)``."""
        return self.kind == BATCH_FIRST

    def to_residual(self, tensor: torch.Tensor) -> torch.Tensor:
        """The residual stream ``(batch, seq, hidden)`` of a layer's tensor in this layout (a view where possible)."""
        if self.kind == SEQ_FIRST and isinstance(tensor, torch.Tensor) and tensor.dim() == 3:
            return tensor.transpose(0, 1)  # (seq, batch, hidden) -> (batch, seq, hidden)
        if self.kind == LEADING_STREAM and isinstance(tensor, torch.Tensor) and tensor.dim() == 3:
            seq = tensor.shape[1] // self.streams
            return tensor[:, :seq]  # (batch, streams * seq, hidden) -> the first stream's positions
        return tensor

    def to_module(self, value: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
        """The layer's tensor with its residual stream replaced by ``value`` ``(batch, seq, hidden)``; ``current`` is
        the tensor the model computed (its other streams are kept)."""
        if not isinstance(current, torch.Tensor) or current.dim() != 3:
            return value  # as to_residual: only (.., .., hidden) tensors are laid out
        if self.kind == SEQ_FIRST:
            return value.transpose(0, 1)  # (batch, seq, hidden) -> (seq, batch, hidden)
        if self.kind == LEADING_STREAM:
            seq = current.shape[1] // self.streams
            return torch.cat([value, current[:, seq:]], dim=1)  # (batch, streams * seq, hidden)
        return value
