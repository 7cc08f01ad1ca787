"""Assembling a ``StandardizedTransformer``: one path for local and remote models.

``local_parts`` loads an HF model, discovers its standardized parts and installs unilens's hook points in it;
``unilens.model.remote.remote_parts`` builds the structure without weights for a server's plain model. Both return
``Parts``, and ``attach`` wraps either with nnsight and sets the standardized view up, the same way::

    source --local_parts / remote_parts--> Parts --attach--> StandardizedTransformer (accessors from the catalogue)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from nnsight import TransformersModel
from torch import nn

from ..arch.discovery import (
    Architecture,
    ModuleMap,
    discover,
    get_rename_dict,
    probe_dataflow,
    probe_parallel,
)
from ..arch.loading import load_hf_model
from ..arch.offload import prepare_dispatched
from ..compat.nnterp import (
    AttentionProbabilitiesAccessor,
    apply_rename_config,
    check_config_sizes,
    check_model_renaming,
    get_ignores,
    nnsight_aliases,
    nnterp_paths,
    resolve_rename_options,
)
from ..core.traces import TraceGate
from ..hooks.attention import AttentionSetup, install_attention_hooks
from ..hooks.points import HookPointSetup, install_hook_points
from ..hooks.routing import RoutingSetup, install_routing
from .validation import validate_model

__all__ = ["Parts", "attach", "finish_local", "local_parts"]


@dataclass
class Parts:
    """What a standardized model is assembled from.

    ``module`` is what nnsight wraps: the loaded HF model, or (remote) its structure on the meta device.
    ``attention_modules[i]`` is layer ``i``'s attention module where unilens installed hook points (None elsewhere
    and in remote mode); the setups are None in remote mode (the server's plain model has none).
    """

    module: nn.Module
    tokenizer: Any
    architecture: Architecture
    rename: dict[str, str]
    attention_modules: list[nn.Module | None]
    attention_setup: AttentionSetup | None = None
    hook_point_setup: HookPointSetup | None = None
    rename_config: Any = None
    routing_setup: RoutingSetup | None = None  # sparse MoE routing hook points (unilens.hooks.routing)


def local_parts(
    source: Any,
    tokenizer: Any,
    unflatten_tokens: Callable,
    remember_batch: Callable | None = None,
    *,
    rename_config: Any = None,
    rename: dict[str, str] | None = None,
    tokenizer_kwargs: dict | None = None,
    trust_remote_code: bool = False,
    **kwargs: Any,
) -> Parts:
    """Load ``source`` (hub id, folder, ``.gguf``, or a loaded model), discover its parts (structure, then data-flow
    probes), and install the attention hook points and the TransformerLens-style hook points.

    ``unflatten_tokens`` is the model's ``(rows * seq, d) -> (rows, seq, d)`` callback for MLPs that run on flattened
    tokens (OPT); ``remember_batch`` a forward pre-hook (with kwargs) of the root module that records each forward's
    input ids and attention mask. nnterp's renaming options (a ``RenameConfig``, ``rename=``, ``attn_rename=``...) steer discovery.

    Example:
        >>> from unilens.testing import tiny_model
        >>> parts = local_parts(*tiny_model("llama"), unflatten_tokens=lambda value: value)
        >>> parts.architecture.layers_path, len(parts.attention_modules)
        ('model.layers', 2)
    """
    rename_config, user_rename = resolve_rename_options(rename_config, rename, kwargs)
    hf_model, tok = load_hf_model(
        source, tokenizer, tokenizer_kwargs=tokenizer_kwargs, trust_remote_code=trust_remote_code, **kwargs
    )
    arch = apply_rename_config(hf_model, discover(hf_model), rename_config)
    modules = ModuleMap(hf_model, arch)
    attention_modules = [modules.get_attention(i) if parts.attention else None for i, parts in enumerate(arch.layers)]
    arch.parallel = probe_parallel(hf_model, arch)
    probe_dataflow(hf_model, arch)
    apply_rename_config(hf_model, arch, rename_config, after_probe=True)
    # enable_attention_probs (always take the hookable path) is switched on after the load-time check, whose HF
    # oracle forward runs the model's original attention, where no hook point can be served
    attention_setup = install_attention_hooks(hf_model, attention_modules, always_materialize=False)
    hook_point_setup = install_hook_points(hf_model, arch, attention_modules, unflatten_tokens)
    routing_setup = install_routing(hf_model, arch)
    if remember_batch is not None:  # a root pre-hook runs in the model thread before any layer
        hf_model.register_forward_pre_hook(remember_batch, with_kwargs=True)
    prepare_dispatched(hf_model)  # device_map / offload_folder: see unilens.arch.offload
    rename = get_rename_dict(hf_model, nnsight_aliases(rename_config, user_rename), architecture=arch)
    rename = nnterp_paths(hf_model, arch, rename)  # nnterp's tree too: model.model.layers, model.model.ln_final
    return Parts(hf_model, tok, arch, rename, attention_modules, attention_setup, hook_point_setup, rename_config,
                 routing_setup)


def attach(model: Any, parts: Parts, padding_side: str | None = None) -> None:
    """Wrap ``parts.module`` with nnsight as ``model`` (a ``StandardizedTransformer`` being built) and set up the
    standardized view: the per-forward batch state, the architecture, and the accessors (from the catalogue).

    Example:
        >>> from unilens import StandardizedTransformer
        >>> from unilens.testing import tiny_model
        >>> model = StandardizedTransformer(*tiny_model("gpt2"), check=False)  # local_parts + attach
        >>> model.architecture.layers_path
        'transformer.h'
    """
    # the batch of the running forward (input ids, attention mask): next_token_probs needs each row's last real
    # token, whatever the padding side; and what the running trace reads, in order (to explain read-order errors)
    object.__setattr__(model, "_last_batch", {})
    object.__setattr__(model, "_trace_reads", [])
    # one trace of this model at a time across threads (unilens.core.traces): nnsight's interleaver is per model
    object.__setattr__(model, "_trace_gate", TraceGate())
    # nnsight's TransformersModel on the text-generation pipeline (what the deprecated LanguageModel pinned)
    TransformersModel.__init__(model, parts.module, tokenizer=parts.tokenizer, rename=parts.rename,
                               task="text-generation")
    if padding_side is not None:  # nnsight sets left padding on causal models; honour the user's choice
        model.tokenizer.padding_side = padding_side
    # set after nnsight's __init__: envoys route unknown attributes to the module tree
    object.__setattr__(model, "architecture", parts.architecture)
    object.__setattr__(model, "module_accessor", ModuleMap(parts.module, parts.architecture))
    object.__setattr__(model, "_attention_modules", parts.attention_modules)
    object.__setattr__(model, "_attention_setup", parts.attention_setup)
    object.__setattr__(model, "_hook_point_setup", parts.hook_point_setup)
    object.__setattr__(model, "_routing_setup", parts.routing_setup)
    object.__setattr__(model, "rename_config", parts.rename_config)
    model._build_accessors()


def finish_local(
    model: Any,
    *,
    check: bool = True,
    enable_attention_probs: bool = False,
    allow_dispatch: bool = True,
    allow_multimodal: bool = False,
    check_attn_probs_with_trace: bool = True,
) -> None:
    """The last steps of a local build: nnterp's attention-probabilities accessor and size checks, the load-time
    check against HF's own outputs (``check``), then ``enable_attention_probs`` and nnterp's renaming checks.

    Example:
        >>> from unilens import StandardizedTransformer
        >>> from unilens.testing import tiny_model
        >>> model = StandardizedTransformer(*tiny_model("gpt2"))  # local_parts, attach, finish_local
        >>> model.attn_probs_available
        True
    """
    arch, rename_config = model.architecture, model.rename_config
    object.__setattr__(model, "attention_probabilities", AttentionProbabilitiesAccessor(
        model, rename_config, enable_attention_probs, general=model.attention_probabilities))
    check_config_sizes(model, rename_config)
    if check:
        validate_model(model)
    # after the check: its HF oracle forward runs the model's original attention, where no hook point is served
    for module in model._attention_modules if enable_attention_probs else ():
        if module is not None and hasattr(module, "unilens_hooks"):
            module.unilens_hooks.always_materialize = True
    if check and rename_config is not None:  # nnterp's renaming check on the overridden parts (shapes)
        check_model_renaming(model, arch.model_type, get_ignores(model, rename_config), allow_dispatch,
                             allow_multimodal)
    if check:
        custom = getattr(rename_config, "attn_prob_source", None) is not None
        if (enable_attention_probs or custom) and arch.attention_layers:  # nnterp's probability check
            model.attention_probabilities.check_source(allow_dispatch=allow_dispatch,
                                                       use_trace=check_attn_probs_with_trace)
