"""``NnterpMethods``: the members nnterp's ``StandardizedTransformer`` has beyond the standardized view
(``probs_to_dict``, ``get_topk_closest_tokens``, ``attn_probs_available``, ``add_prefix_false_tokenizer``,
``detect_layer_output_type``), as a mixin of ``unilens.model.StandardizedTransformer``."""

from __future__ import annotations

import torch
from transformers import AutoTokenizer

__all__ = ["NnterpMethods"]


class NnterpMethods:
    """nnterp's model helpers (mixed into ``StandardizedTransformer``)."""

    @property
    def _model(self):
        """The wrapped HF model: nnsight 0.7's name for it, which nnterp code reads (``model._model``); nnsight 0.8
        calls it ``_module``."""
        return self._module

    @property
    def attn_probs_available(self) -> bool:
        return bool(self.architecture.attention_layers)

    def detect_layer_output_type(self) -> None:
        """nnterp's probe of whether layers return tuples; unilens's ``layers_output`` is always the plain tensor,
        so there is nothing to detect (kept so nnterp scripts run)."""
        return None

    @property
    def add_prefix_false_tokenizer(self):
        """The tokenizer, loaded with ``add_prefix_space=False`` where it has that option (``get_first_tokens``
        reads ``"word"`` and ``" word"`` with it); the model's own tokenizer when it adds no prefix space."""
        cached = self.__dict__.get("_add_prefix_false_tokenizer")
        if cached is not None:
            return cached
        tok = self.tokenizer
        if getattr(tok, "add_prefix_space", False):
            source = getattr(tok, "name_or_path", None)
            try:
                tok = AutoTokenizer.from_pretrained(source, add_prefix_space=False)
            except Exception as err:  # a tokenizer built in memory has no files to reload
                raise ValueError(
                    f"add_prefix_false_tokenizer: the tokenizer adds a prefix space and cannot be reloaded from "
                    f"{source!r} without it ({err}); pass a tokenizer loaded with add_prefix_space=False."
                ) from err
        object.__setattr__(self, "_add_prefix_false_tokenizer", tok)
        return tok

    def probs_to_dict(self, tokens: torch.Tensor, probs: torch.Tensor) -> dict[str, float]:
        """``{token string: probability}`` for token ids ``tokens`` ``(k,)`` and their probabilities ``(k,)``."""
        names = self.tokenizer.convert_ids_to_tokens([int(t) for t in tokens])
        return {name: float(p) for name, p in zip(names, torch.as_tensor(probs).detach().tolist())}

    def get_topk_closest_tokens(self, hidden_state: torch.Tensor, k: int = 5) -> dict[str, float] | list[dict[str, float]]:
        """The ``k`` most likely tokens when ``hidden_state`` ``(hidden,)`` or ``(batch, hidden)`` is projected on the
        vocabulary (final norm + unembedding + softmax): ``{token: probability}``, or a list of them (nnterp's result).

        Example:
            >>> from unilens import StandardizedTransformer
            >>> from unilens.testing import tiny_model
            >>> model = StandardizedTransformer(*tiny_model("llama"))
            >>> len(model.get_topk_closest_tokens(torch.randn(model.hidden_size), k=3))
            3
        """
        if not isinstance(hidden_state, torch.Tensor):
            raise TypeError(f"get_topk_closest_tokens takes a hidden-state tensor (hidden,) or (batch, hidden), got "
                            f"{type(hidden_state).__name__}.")
        if hidden_state.ndim == 0 or hidden_state.shape[-1] != self.hidden_size:
            raise ValueError(f"get_topk_closest_tokens: the hidden state has shape {tuple(hidden_state.shape)}, but "
                             f"this model's hidden size is {self.hidden_size}: pass ({self.hidden_size},) or (batch, "
                             f"{self.hidden_size}).")
        if hidden_state.ndim not in (1, 2):
            raise ValueError(f"hidden state must be (hidden,) or (batch, hidden), got {tuple(hidden_state.shape)}.")
        if isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(f"get_topk_closest_tokens: k must be an int, got {type(k).__name__} {k!r}.")
        if not 1 <= k <= self.vocab_size:
            raise ValueError(f"get_topk_closest_tokens: k={k} is outside 1..{self.vocab_size} (the vocabulary size); "
                             "pass a k in that range.")
        unembed = self.module_accessor.get_unembed().weight
        with torch.no_grad():
            logits = self.module_accessor.project_on_vocab(hidden_state.to(unembed.device, unembed.dtype))
        top = logits.float().softmax(-1).topk(k, dim=-1)
        if hidden_state.ndim == 1:
            return self.probs_to_dict(top.indices, top.values)
        return [self.probs_to_dict(i, v) for i, v in zip(top.indices, top.values)]
