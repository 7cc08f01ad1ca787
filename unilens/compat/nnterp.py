"""nnterp's ``rename_utils`` names on unilens's discovery: ``RenameConfig`` overrides what discovery finds,
``AttnProbFunction`` supplies attention probabilities from a source you name, ``RenamingError`` reports a bad map.

nnterp finds a model's parts by a table of known module names and renames them with nnsight; unilens finds them by
structure (``unilens.discovery``) and checks the result against HF's own outputs at load. So here:

* ``RenameConfig(attn_name=..., mlp_name=..., layers_name=..., ln_final_name=..., lm_head_name=...)`` *steers*
  discovery: the named modules replace what discovery found (and the load-time check then verifies them: a wrong
  name is a ``RenamingError``, never a silently wrong tensor). ``model_name`` adds an nnsight alias only (unilens
  needs no container name). ``ignore_mlp`` / ``ignore_attn`` drop the MLP / attention accessors (they raise,
  saying the config ignored them). ``*_config_key`` set where the head count, hidden size and vocabulary size come
  from (an int, a config key or a list of keys); hidden and vocabulary sizes are checked against the weights.
* ``AttnProbFunction`` is honoured: with ``RenameConfig(attn_prob_source=fn)`` the accessor
  ``model.attention_probabilities[i]`` reads and writes ``fn(model.attentions[i]).output`` (nnterp's contract), and
  the load-time check compares it with unilens's own probabilities (its attention implementation, checked against
  HF's eager attention elsewhere). Without one, unilens's general mechanism (``unilens.attention``) serves every
  model, so nnterp's per-architecture source functions are all the same function here.

Example:
    >>> from unilens import StandardizedTransformer
    >>> from unilens.testing import tiny_model
    >>> hf, tok = tiny_model("llama")
    >>> model = StandardizedTransformer(hf, tokenizer=tok, rename_config=RenameConfig(mlp_name="mlp", ignore_attn=True))
    >>> model.architecture.attention_layers
    []
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import Enum
from typing import Any, Literal

import torch
from torch import nn

from ..arch.discovery import (
    _NORM_CLASS,
    Architecture,
    ArchitectureError,
    LayerParts,
    _find_attention,
    _find_mlp,
    discover,
)
from ..arch.discovery import get_rename_dict as _discovery_rename
from ..arch.structure import computes_softmax_attention, owns_projection
from ..core import config as _config
from ..core.protocol import StandardizedModel
from ..hooks.attention import AttentionHookAccessor

__all__ = [
    "ATTENTION_NAMES",
    "AttentionProbabilitiesAccessor",
    "AttnProbFunction",
    "EMBED_TOKENS_NAMES",
    "IGNORE_MLP_MODELS",
    "IOType",
    "IgnoreType",
    "LAYER_NAMES",
    "LM_HEAD_NAMES",
    "LN_NAMES",
    "LayerAccessor",
    "MLP_NAMES",
    "MODEL_NAMES",
    "RenameConfig",
    "RenamingError",
    "apply_rename_config",
    "bloom_attention_prob_source",
    "check_io",
    "check_model_renaming",
    "default_attention_prob_source",
    "default_attn_head_config_keys",
    "default_hidden_size_config_keys",
    "default_vocab_size_config_keys",
    "expand_path_with_model",
    "get_hidden_size",
    "get_ignores",
    "get_num_attention_heads",
    "get_rename_dict",
    "get_vocab_size",
    "gpt2_attention_prob_source",
    "gptj_attention_prob_source",
    "resolve_rename_options",
    "text_config",
]

IgnoreType = Literal["mlp", "attention"]


class RenamingError(ArchitectureError):
    """A module map (discovered, or given by RenameConfig / rename=) does not give the standardized tensors."""


class _NoSuchModule(RenamingError):
    """A RenameConfig name that names no module of the model (nnterp ignores it: discovery's finding is kept)."""


def _or_discovered(resolve: Any, kept: str) -> Any:
    """``resolve()``, or None with a warning when the name it resolves names no module: as in nnterp, where such a
    name is an unused entry of the rename dict, the module discovery found (``kept``) stays."""
    try:
        return resolve()
    except _NoSuchModule as err:
        warnings.warn(f"{err} Ignored, as nnterp ignores it: keeping {kept}, found by discovery.", UserWarning,
                      stacklevel=4)
        return None


class AttnProbFunction(ABC):
    """nnterp's attention-probability source: ``fn(attention_envoy)`` returns the nnsight envoy (a module, or an
    operation of ``.source``) whose ``.output`` is the probabilities ``(batch, heads, query, key)``.

    Example (Bloom computes its probabilities inline and drops them out through ``self.attention_dropout``)::

        class BloomProbs(AttnProbFunction):
            def get_attention_prob_source(self, attention_module, return_module_source=False):
                if return_module_source:
                    return attention_module.source
                return attention_module.source.self_attention_dropout_0

        model = StandardizedTransformer("bigscience/bloom-560m", rename_config=RenameConfig(attn_prob_source=BloomProbs()))
    """

    @abstractmethod
    def get_attention_prob_source(self, attention_module: Any, return_module_source: bool = False) -> Any:
        """The envoy whose ``.output`` is the probabilities (or, with ``return_module_source``, the source it sits in)."""

    def __call__(self, attention_module: Any, return_module_source: bool = False) -> Any:
        return self.get_attention_prob_source(attention_module, return_module_source)


@dataclass
class RenameConfig:
    """Overrides of what discovery finds, nnterp's fields (each a name, a list of candidate names, or None).

    ``attn_name`` / ``mlp_name``: the attention / MLP module inside a decoder layer (a child name or a dotted path
    relative to the layer); ``layers_name``: the decoder-layer list; ``ln_final_name`` / ``lm_head_name``: the final
    norm / unembedding (a dotted path from the root, or a module name found anywhere outside the layers);
    ``model_name``: an nnsight alias ``model`` for a container; ``attn_prob_source``: an ``AttnProbFunction``;
    ``ignore_mlp`` / ``ignore_attn``: drop those accessors; ``attn_head_config_key`` / ``hidden_size_config_key`` /
    ``vocab_size_config_key``: an int, or config key(s) to read.

    Example:
        >>> RenameConfig(attn_name="custom_attention", mlp_name=["feed_forward", "ffn"]).mlp_name
        ['feed_forward', 'ffn']
    """

    attn_name: str | list[str] | None = None
    mlp_name: str | list[str] | None = None
    ln_final_name: str | list[str] | None = None
    lm_head_name: str | list[str] | None = None
    model_name: str | list[str] | None = None
    layers_name: str | list[str] | None = None
    attn_prob_source: AttnProbFunction | None = None
    ignore_mlp: bool | None = None
    ignore_attn: bool | None = None
    attn_head_config_key: str | list[str] | int | None = None
    hidden_size_config_key: str | list[str] | int | None = None
    vocab_size_config_key: str | list[str] | int | None = None


# ---------------------------------------------------------------------------------------------------------------
# The names unilens's model-free rename dict knows (discovery needs none of them; they serve nnsight's aliases)
# ---------------------------------------------------------------------------------------------------------------

# containers holding the decoder stack under the root (GPT-2, GPT-NeoX, OPT, multimodal wrappers)
MODEL_NAMES = ["transformer", "gpt_neox", "decoder", "language_model"]


def expand_path_with_model(paths: list[str]) -> list[str]:
    """``paths`` plus, for each ``model.x``, ``model.<container>.x`` for every container of ``MODEL_NAMES``.

    Example:
        >>> expand_path_with_model(["h", "model.layers"])[:3]
        ['h', 'model.layers', 'model.transformer.layers']
    """
    nested = [p.replace("model.", f"model.{container}.", 1) for container in MODEL_NAMES for p in paths
              if p.startswith("model.")]
    return list(paths) + nested


def _generic_names(alias: str) -> list[str]:

    return [path for path, target in _discovery_rename().items() if target == alias]


LAYER_NAMES = _generic_names("layers")
LN_NAMES = _generic_names("ln_final")
LM_HEAD_NAMES = _generic_names("lm_head")
EMBED_TOKENS_NAMES = _generic_names("embed_tokens")
ATTENTION_NAMES = _generic_names("self_attn")
MLP_NAMES = _generic_names("mlp")

# nnterp drops the MLP of OPT (its MLP is bare fc1 -> fc2 linears). unilens finds that span by structure
# (mlps_input = fc1's input, mlps_output = fc2's output), so no model type needs its MLP ignored.
IGNORE_MLP_MODELS: tuple[type, ...] = ()


def default_attn_head_config_keys() -> list[str]:
    """Config keys read, in order, for the number of attention heads.

    Example:
        >>> default_attn_head_config_keys()[0]
        'num_attention_heads'
    """
    return list(_config.NUM_HEADS_KEYS)


def default_hidden_size_config_keys() -> list[str]:
    """Config keys read, in order, for the hidden size.

    Example:
        >>> "n_embd" in default_hidden_size_config_keys()
        True
    """
    return list(_config.HIDDEN_SIZE_KEYS)


def default_vocab_size_config_keys() -> list[str]:
    """Config keys read, in order, for the vocabulary size.

    Example:
        >>> default_vocab_size_config_keys()
        ['vocab_size', 'n_vocab']
    """
    return list(_config.VOCAB_SIZE_KEYS)


def text_config(model: Any) -> Any:
    """The language model's config (the text sub-config of a multimodal model; ``unilens.core.config.text_config``).

    Example:
        >>> from unilens.testing import tiny_model
        >>> hf, _ = tiny_model("llama")
        >>> text_config(hf) is hf.config
        True
    """
    return _config.text_config(model.config)


def _config_lookup(model: Any, defaults: list[str], override: Any, what: str, field: str, raise_error: bool):
    keys = list(defaults)
    if isinstance(override, bool):
        raise TypeError(f"RenameConfig.{field} must be an int, a config key or a list of keys, got a bool")
    if isinstance(override, int):
        return override
    if isinstance(override, str):
        keys.insert(0, override)
    elif isinstance(override, (list, tuple)):
        keys[:0] = list(override)
    elif override is not None:
        raise ValueError(f"RenameConfig.{field}={override!r}: expected None, an int, a config key or a list of keys")
    value = _config.config_value(model.config, *keys)
    if value is not None:
        return value
    if raise_error:
        raise RenamingError(
            f"{type(model).__name__}: none of the config keys {keys} gives the {what}; pass it as an int or name the "
            f"key: RenameConfig({field}=...)."
        )
    return None


def get_num_attention_heads(model: Any, raise_error: bool = True, rename_config: RenameConfig | None = None):
    """Number of attention heads from the (text) config, or RenameConfig.attn_head_config_key (an int or key(s)).

    Example:
        >>> from unilens.testing import tiny_model
        >>> hf, _ = tiny_model("llama")
        >>> get_num_attention_heads(hf) == hf.config.num_attention_heads, get_num_attention_heads(hf, rename_config=RenameConfig(attn_head_config_key=7))
        (True, 7)
    """
    override = rename_config.attn_head_config_key if rename_config is not None else None
    return _config_lookup(model, default_attn_head_config_keys(), override, "number of attention heads",
                          "attn_head_config_key", raise_error)


def get_hidden_size(model: Any, raise_error: bool = True, rename_config: RenameConfig | None = None):
    """Hidden size from the (text) config, or RenameConfig.hidden_size_config_key.

    Example:
        >>> from unilens.testing import tiny_model
        >>> hf, _ = tiny_model("gpt2")
        >>> get_hidden_size(hf) == hf.config.n_embd
        True
    """
    override = rename_config.hidden_size_config_key if rename_config is not None else None
    return _config_lookup(model, default_hidden_size_config_keys(), override, "hidden size", "hidden_size_config_key",
                          raise_error)


def get_vocab_size(model: Any, raise_error: bool = True, rename_config: RenameConfig | None = None):
    """Vocabulary size from the (text) config, or RenameConfig.vocab_size_config_key.

    Example:
        >>> from unilens.testing import tiny_model
        >>> hf, _ = tiny_model("gpt2")
        >>> get_vocab_size(hf) == hf.config.vocab_size
        True
    """
    override = rename_config.vocab_size_config_key if rename_config is not None else None
    return _config_lookup(model, default_vocab_size_config_keys(), override, "vocabulary size", "vocab_size_config_key",
                          raise_error)


# ---------------------------------------------------------------------------------------------------------------
# RenameConfig / rename= -> discovery
# ---------------------------------------------------------------------------------------------------------------

# nnterp's constructor keywords of earlier releases, still named in its error messages -> RenameConfig fields
LEGACY_RENAME_KWARGS = {
    "attn_rename": "attn_name",
    "mlp_rename": "mlp_name",
    "ln_final_rename": "ln_final_name",
    "lm_head_rename": "lm_head_name",
    "model_rename": "model_name",
    "layers_rename": "layers_name",
}
# rename= values that name a standardized part -> the RenameConfig field they steer
_RENAME_TARGETS = {"layers": "layers_name", "self_attn": "attn_name", "mlp": "mlp_name", "ln_final": "ln_final_name",
                   "lm_head": "lm_head_name", "model": "model_name"}


def _names(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise TypeError(f"a RenameConfig name must be a string or a list of strings, got {value!r}")


def resolve_rename_options(
    rename_config: RenameConfig | dict | None, rename: dict[str, str] | None, kwargs: dict[str, Any]
) -> tuple[RenameConfig | None, dict[str, str]]:
    """Fold the constructor's rename options into one RenameConfig and one nnsight alias dict.

    ``rename_config`` may be a RenameConfig, or (unilens's earlier form) a dict of aliases; ``rename`` is nnterp's
    dict merged into the defaults; ``attn_rename=`` / ``mlp_rename=`` / ... are popped from ``kwargs``. A ``rename``
    entry whose value is a standardized part (``layers``, ``self_attn``, ``mlp``, ``ln_final``, ``lm_head``) also
    steers discovery, like the matching RenameConfig field (a field set in both raises).

    Example:
        >>> cfg, aliases = resolve_rename_options(None, {"my_block": "mlp"}, {"attn_rename": "mixer"})
        >>> cfg.mlp_name, cfg.attn_name, aliases
        ('my_block', 'mixer', {'my_block': 'mlp'})
    """
    aliases: dict[str, str] = {}
    if isinstance(rename_config, dict):
        aliases.update(rename_config)
        rename_config = None
    if rename_config is not None and not isinstance(rename_config, RenameConfig):
        raise TypeError(f"rename_config must be a unilens.rename_utils.RenameConfig, got {type(rename_config).__name__}")
    if rename is not None:
        if not isinstance(rename, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in rename.items()):
            raise TypeError(f"rename must be a dict of module path -> alias (str -> str), got {rename!r}")
        aliases.update(rename)
    fields: dict[str, list[str]] = {}
    for kw, field in LEGACY_RENAME_KWARGS.items():
        if kw in kwargs:
            fields.setdefault(field, []).extend(_names(kwargs.pop(kw)))
    for path, alias in aliases.items():
        if alias in _RENAME_TARGETS:
            fields.setdefault(_RENAME_TARGETS[alias], []).append(path)
    if not fields:
        return rename_config, aliases
    config = rename_config if rename_config is not None else RenameConfig()
    values = dict(vars(config))
    for field, names in fields.items():
        if values.get(field) is not None:
            raise ValueError(
                f"RenameConfig.{field}={values[field]!r} and rename / {field.replace('_name', '_rename')}= "
                f"{names!r} both name the same part; give it once."
            )
        values[field] = names[0] if len(names) == 1 else names
    return RenameConfig(**values), aliases


def _resolve_in(root: nn.Module, candidates: list[str], what: str, field: str, exclude: str | None = None) -> str:
    """Dotted path (from ``root``) of the first candidate that names a module: an exact path, else the shallowest
    module whose path ends with ``.<name>`` (outside ``exclude``)."""
    paths = [n for n, _ in root.named_modules() if n]
    for name in candidates:
        if name in paths:
            return name
        ends = [p for p in paths if p.endswith("." + name) and not (exclude and (p == exclude or p.startswith(exclude + ".")))]
        if ends:
            return min(ends, key=lambda p: (p.count("."), paths.index(p)))
    top = ", ".join(n for n, _ in root.named_children())
    raise _NoSuchModule(
        f"RenameConfig.{field}={candidates if len(candidates) > 1 else candidates[0]!r}: no module of "
        f"{type(root).__name__} has that name or path (its children: {top}). Name the {what} module by its path, "
        "e.g. print(model) to see the module tree."
    )


def apply_rename_config(
    hf_model: nn.Module, arch: Architecture, rename_config: RenameConfig | None, after_probe: bool = False
) -> Architecture:
    """Replace discovery's findings by the modules ``rename_config`` names (updates ``arch`` in place).

    Call once after ``discover`` (layers, attention, MLP, unembedding, ignores) and once with ``after_probe=True``
    after ``probe_dataflow`` (the final norm, which the data-flow probe would otherwise settle itself).

    Example:
        >>> from unilens.discovery import discover
        >>> from unilens.testing import tiny_model
        >>> hf, _ = tiny_model("llama")
        >>> arch = apply_rename_config(hf, discover(hf), RenameConfig(ignore_mlp=True))
        >>> arch.layers[0].mlp_in is None
        True
    """
    if rename_config is None:
        return arch
    cfg = rename_config
    if after_probe:
        if cfg.ln_final_name is not None:
            layers = arch.layers_path
            path = _or_discovered(lambda: _resolve_in(hf_model, _names(cfg.ln_final_name), "final norm",
                                                      "ln_final_name", exclude=layers), arch.final_norm_path)
            if path is not None:
                arch.final_norm_path, arch.head_chain, arch.head_error = path, [path], None
        return arch
    path = None
    if cfg.layers_name is not None:
        path = _or_discovered(lambda: _resolve_in(hf_model, _names(cfg.layers_name), "decoder-layer list",
                                                  "layers_name"), arch.layers_path)
    if path is not None:
        stack = hf_model.get_submodule(path)
        if not isinstance(stack, nn.ModuleList) or len(stack) == 0:
            raise RenamingError(
                f"RenameConfig.layers_name: {path} is a {type(stack).__name__}, not a non-empty nn.ModuleList of "
                "decoder layers."
            )
        arch.layers_path = path
        parts = []
        for layer in stack:
            attention = _find_attention(layer)
            mlp, mlp_in, mlp_out = _find_mlp(layer, attention)
            parts.append(LayerParts(attention=attention, mlp=mlp, mlp_in=mlp_in, mlp_out=mlp_out))
        arch.layers = parts
    stack = hf_model.get_submodule(arch.layers_path)
    named_attention = named_mlp = None
    if cfg.attn_name is not None:
        named_attention = _or_discovered(lambda: _resolve_layer_parts(stack, _names(cfg.attn_name), "attention",
                                                                      "attn_name"), "the attention modules")
        for parts, path in zip(arch.layers, named_attention or ()):
            parts.attention = parts.attention_out = path
    if cfg.mlp_name is not None:
        named_mlp = _or_discovered(lambda: _resolve_layer_parts(stack, _names(cfg.mlp_name), "MLP", "mlp_name"),
                                   "the MLPs")
        for parts, path in zip(arch.layers, named_mlp or ()):
            parts.mlp = parts.mlp_in = parts.mlp_out = path
    if cfg.lm_head_name is not None:
        arch.lm_head_path = _or_discovered(lambda: _resolve_in(
            hf_model, _names(cfg.lm_head_name), "unembedding", "lm_head_name", exclude=arch.layers_path),
            arch.lm_head_path) or arch.lm_head_path
    if cfg.ignore_attn:
        for parts in arch.layers:
            parts.attention = parts.attention_out = None
    if cfg.ignore_mlp:
        for parts in arch.layers:
            parts.mlp = parts.mlp_in = parts.mlp_out = None
    _check_named_parts(stack, arch, cfg, named_attention is not None, named_mlp is not None)
    return arch


def _check_named_parts(stack: nn.ModuleList, arch: Architecture, cfg: RenameConfig, attention_named: bool,
                       mlp_named: bool) -> None:
    """A named attention must compute softmax attention and own a projection; a named MLP must own a projection and
    be no norm (the load-time check compares the residual stream with HF's, not the branches, so this is checked
    here): a wrong name is a RenamingError, never a silently wrong tensor."""
    for i, parts in enumerate(arch.layers):
        layer = stack[i]
        if attention_named and parts.attention is not None:
            module = layer.get_submodule(parts.attention)
            if not (owns_projection(module) and computes_softmax_attention(module)):
                raise RenamingError(
                    f"RenameConfig.attn_name: {parts.attention} ({type(module).__name__}) in layer {i} is not a softmax "
                    "attention module (it computes no attention probabilities from its own projections)."
                )
        if mlp_named and parts.mlp is not None:
            module = layer.get_submodule(parts.mlp)
            inside_attention = parts.attention is not None and (
                parts.attention == parts.mlp or parts.attention.startswith(parts.mlp + "."))
            # projections: Linear modules, or the weight matrices of fused experts (MoE)
            if _NORM_CLASS.search(type(module).__name__) or inside_attention or not any(
                    p.dim() >= 2 for p in module.parameters()):
                raise RenamingError(
                    f"RenameConfig.mlp_name: {parts.mlp} ({type(module).__name__}) in layer {i} is not an MLP (a norm, "
                    "the attention, or a module without weight matrices)."
                )


def _resolve_layer_parts(stack: nn.ModuleList, candidates: list[str], what: str, field: str) -> list[str | None]:
    """Per layer: the path (relative to the layer) of the first candidate it has; None on layers without one."""
    found: list[str | None] = []
    for layer in stack:
        paths = [n for n, _ in layer.named_modules() if n]
        hit = None
        for name in candidates:
            if name in paths:
                hit = name
                break
            ends = [p for p in paths if p.endswith("." + name)]
            if ends:
                hit = min(ends, key=lambda p: (p.count("."), paths.index(p)))
                break
        found.append(hit)
    if all(h is None for h in found):
        children = ", ".join(n for n, _ in stack[0].named_children())
        raise _NoSuchModule(
            f"RenameConfig.{field}={candidates if len(candidates) > 1 else candidates[0]!r}: no decoder layer has a "
            f"module of that name (layer 0's children: {children}). Name the {what} module inside a layer."
        )
    return found


def check_config_sizes(model: "StandardizedModel", rename_config: RenameConfig | None) -> None:
    """Hidden / vocabulary sizes a RenameConfig names must be the sizes of the weights (else RenamingError).

    Example:
        >>> from unilens import StandardizedTransformer
        >>> from unilens.testing import tiny_model
        >>> model = StandardizedTransformer(*tiny_model("llama"))
        >>> check_config_sizes(model, RenameConfig(hidden_size_config_key=3))
        Traceback (most recent call last):
        ...
        unilens.compat.nnterp.RenamingError: RenameConfig.hidden_size_config_key=3 gives 3, but the model's weights have 64 (embedding / unembedding shape); fix the key or the value.
    """
    if rename_config is None:
        return
    hf = model.module_accessor.model
    for field, getter, actual in (
        ("hidden_size_config_key", get_hidden_size, model.hidden_size),
        ("vocab_size_config_key", get_vocab_size, model.vocab_size),
    ):
        if getattr(rename_config, field) is None:
            continue
        value = getter(hf, raise_error=True, rename_config=rename_config)
        if int(value) != int(actual):
            raise RenamingError(
                f"RenameConfig.{field}={getattr(rename_config, field)!r} gives {value}, but the model's weights have "
                f"{actual} (embedding / unembedding shape); fix the key or the value."
            )


def get_rename_dict(
    rename_config: RenameConfig | dict | nn.Module | None = None,
    model: nn.Module | None = None,
    architecture: Architecture | None = None,
) -> dict[str, str]:
    """Module renames for nnsight's ``LanguageModel(..., rename=...)``: nnterp's signature (``rename_config`` first)
    on unilens's discovery.

    With a model (``model=``, or a model passed first as unilens's earlier form did) the dict is exact (built by
    discovery, steered by the RenameConfig); without one, the common HF names plus the config's names.

    Example:
        >>> get_rename_dict(RenameConfig(attn_name="mixer"))["mixer"]
        'self_attn'
        >>> from unilens.testing import tiny_model
        >>> hf, _ = tiny_model("gpt2")
        >>> get_rename_dict(model=hf)["transformer.h"]
        'layers'
    """
    if isinstance(rename_config, nn.Module):  # unilens's earlier positional form get_rename_dict(model, ...)
        model, rename_config = rename_config, None
    config, aliases = resolve_rename_options(rename_config, None, {})
    if model is None:
        rename = _discovery_rename()
        if config is not None:
            for field, alias in ((f, a) for a, f in _RENAME_TARGETS.items()):
                for name in _names(getattr(config, field)):
                    rename[name] = alias
        rename.update(aliases)
        return rename
    arch = architecture
    if arch is None:
        arch = apply_rename_config(model, discover(model), config)
        apply_rename_config(model, arch, config, after_probe=True)
    extra = dict(aliases)
    if config is not None:
        for name in _names(config.model_name):
            extra[name] = "model"
    return _discovery_rename(model, extra or None, architecture=arch)


def get_ignores(model: Any, rename_config: RenameConfig | None = None) -> list[str]:
    """The standardized parts this model has no accessor for: ``"mlp"`` / ``"attention"`` when ``rename_config``
    ignores them, or when no layer has one (``model``: a StandardizedTransformer or a plain HF model).

    Example:
        >>> from unilens.testing import tiny_model
        >>> hf, _ = tiny_model("opt")
        >>> get_ignores(hf), get_ignores(hf, RenameConfig(ignore_mlp=True))
        ([], ['mlp'])
    """
    arch = getattr(model, "architecture", None)
    if not isinstance(arch, Architecture):
        arch = apply_rename_config(model, discover(model), rename_config)
    ignores = []
    if (rename_config is not None and rename_config.ignore_mlp) or all(p.mlp_in is None for p in arch.layers):
        ignores.append("mlp")
    if (rename_config is not None and rename_config.ignore_attn) or not arch.attention_layers:
        ignores.append("attention")
    return ignores


# ---------------------------------------------------------------------------------------------------------------
# nnterp's accessor classes, over unilens's accessors
# ---------------------------------------------------------------------------------------------------------------


class IOType(Enum):
    """Input or output of a module (nnterp's LayerAccessor argument)."""

    INPUT = "input"
    OUTPUT = "output"


_ACCESSORS = {
    (None, "input"): "layers_input", (None, "output"): "layers_output",
    ("self_attn", "input"): "attentions_input", ("self_attn", "output"): "attentions_output",
    ("mlp", "input"): "mlps_input", ("mlp", "output"): "mlps_output",
    ("self_attn", None): "attentions", ("mlp", None): "mlps",
}


class LayerAccessor:
    """nnterp's ``LayerAccessor(model, attr_name, io_type)``: the model's standardized accessor for that module and
    direction (``attr_name`` None: the layer; ``"self_attn"``; ``"mlp"``; ``io_type`` None: the module itself).
    Values are always the plain ``(batch, seq, hidden)`` tensor (unilens unpacks tuples), so ``returns_tuple`` is False.

    Example:
        >>> from unilens import StandardizedTransformer
        >>> from unilens.testing import tiny_model
        >>> model = StandardizedTransformer(*tiny_model("llama"))
        >>> with model.trace("Hello there"):
        ...     h = LayerAccessor(model, None, IOType.OUTPUT)[0].save()
        >>> h.shape[-1] == model.hidden_size
        True
    """

    def __init__(self, model: "StandardizedModel", attr_name: str | None, io_type: IOType | None):
        io = io_type.value if isinstance(io_type, IOType) else io_type
        key = (attr_name, io)
        if key not in _ACCESSORS:
            raise ValueError(f"LayerAccessor: attr_name must be None, 'self_attn' or 'mlp' and io_type an IOType or "
                             f"None (not None with attr_name None); got {attr_name!r}, {io_type!r}.")
        self.model, self.attr_name, self.io_type = model, attr_name, io_type
        self._target = getattr(model, _ACCESSORS[key])

    def get_module(self, layer: int) -> Any:
        """The envoy of the module (the layer, its attention or its MLP)."""
        if self.attr_name is None:
            return self.model.layers[layer]
        return getattr(self.model, "attentions" if self.attr_name == "self_attn" else "mlps")[layer]

    def __getitem__(self, layer: int) -> Any:
        return self._target[layer]

    def __setitem__(self, layer: int, value: torch.Tensor) -> None:
        if self.io_type is None:
            raise ValueError(f"cannot set a module; did you mean {self.attr_name or 'layers'}_input / _output?")
        self._target[layer] = value

    def __call__(self, layer: int) -> Any:
        return self[layer]

    @property
    def returns_tuple(self) -> bool:
        return False


def _unilens_probabilities(attention_module: Any, return_module_source: bool = False) -> Any:
    """unilens's general source: the attention's ``unilens_hooks.probabilities`` point (served, with the layer's
    request, by ``model.attention_probabilities``); with ``return_module_source``, the attention module's source."""
    if return_module_source:
        return attention_module.source
    return attention_module.unilens_hooks.probabilities


# nnterp picks one source per architecture (the op that drops probabilities out in each model's code); unilens's
# attention implementation serves every model the same way, so these are all the one general source.
default_attention_prob_source = _unilens_probabilities
bloom_attention_prob_source = _unilens_probabilities
gpt2_attention_prob_source = _unilens_probabilities
gptj_attention_prob_source = _unilens_probabilities


class AttentionProbabilitiesAccessor:
    """``model.attention_probabilities``: ``[i]`` reads / sets layer i's probabilities ``(batch, heads, query, key)``.

    With ``RenameConfig(attn_prob_source=fn)`` they come from ``fn(model.attentions[i]).output`` (nnterp's
    contract); otherwise from unilens's attention implementation (any model, sdpa kept where nothing asks). Every
    other attribute (``print_source``...) is the general accessor's. ``check_source`` is nnterp's check.

    Example:
        >>> from unilens import StandardizedTransformer
        >>> from unilens.testing import tiny_model
        >>> model = StandardizedTransformer(*tiny_model("llama"))
        >>> model.attention_probabilities.check_source()   # shape, rows sum to 1, editing changes the logits
        >>> model.attention_probabilities.enabled
        True
    """

    def __init__(self, model: "StandardizedModel", rename_config: RenameConfig | None = None,
                 initialized_with_enable: bool = False, general: Any = None):
        object.__setattr__(self, "model", model)
        object.__setattr__(self, "initialized_with_enable", initialized_with_enable)
        source = rename_config.attn_prob_source if rename_config is not None else None
        if source is not None and not callable(source):
            raise TypeError(f"RenameConfig.attn_prob_source must be an AttnProbFunction (callable), got {source!r}")
        object.__setattr__(self, "source_attr", source or _unilens_probabilities)
        object.__setattr__(self, "custom", source is not None and source is not _unilens_probabilities)
        if general is None:

            general = AttentionHookAccessor(model, "probabilities")
        object.__setattr__(self, "general", general)
        object.__setattr__(self, "enabled", True)

    def __getattr__(self, name: str) -> Any:  # print_source, hook_name, ...: the general accessor's
        return getattr(object.__getattribute__(self, "general"), name)

    def disable(self) -> None:
        """Refuse every later read (nnterp's switch)."""
        object.__setattr__(self, "enabled", False)

    def _check_enabled(self) -> None:
        if not self.enabled:
            raise RenamingError("attention probabilities were disabled on this model (attention_probabilities.disable()).")

    def _source(self, layer: int) -> Any:
        arch = self.model.architecture
        n = arch.num_layers
        if not isinstance(layer, int) or not -n <= layer < n:
            raise IndexError(f"attention_probabilities[{layer!r}]: layer index out of range (0..{n - 1}).")
        if arch.layers[layer].attention is None:
            raise RenamingError(f"layer {layer % n} has no attention (layers with attention: {arch.attention_layers}).")
        return self.source_attr(self.model.attentions[layer])

    def __getitem__(self, layer: int) -> torch.Tensor:
        self._check_enabled()
        if not self.custom:
            return self.general[layer]
        return self._source(layer).output

    def __setitem__(self, layer: int, value: torch.Tensor) -> None:
        self._check_enabled()
        if not self.custom:
            self.general[layer] = value
            return
        self._source(layer).output = value

    def __len__(self) -> int:
        return self.model.num_layers

    def print_source(self, layer: int = 0, allow_dispatch: bool = True) -> None:
        """Print where layer ``layer``'s probabilities come from (a custom source: the envoy and its module source)."""
        if not self.custom:
            self.general.print_source(layer)
            return
        print(f"attention_probabilities[{layer}] = RenameConfig.attn_prob_source(model.attentions[{layer}]).output:")
        print(self._source(layer))
        print("\nFull module source:")
        print(self.source_attr(self.model.attentions[layer], return_module_source=True))

    def check_source(self, layer: int = 0, allow_dispatch: bool = True, use_trace: bool = True) -> None:
        """nnterp's check: on a short input, the probabilities of ``layer`` (on a stack whose layer 0 has no
        attention, layer 0 means the first layer with attention) have
        shape ``(batch, heads, seq, seq)``; with ``use_trace`` also rows sum to 1 and replacing them changes the
        logits; a custom source must also equal unilens's own probabilities. Raises RenamingError.
        ``allow_dispatch`` is accepted for nnterp's signature (the model is already loaded: nothing to dispatch)."""
        self._check_enabled()
        arch = self.model.architecture
        if not arch.attention_layers:
            raise RenamingError(f"this {arch.model_type} model has no softmax attention layer: no probabilities.")
        if layer == 0 and arch.layers[0].attention is None:
            layer = arch.attention_layers[0]
        text = "The quick brown fox jumps"
        saved: dict[str, torch.Tensor] = {}
        try:
            with torch.no_grad(), self.model.trace(text):
                saved["probs"] = self[layer].save()
                saved["clean"] = self.model.logits.save()
        except RenamingError:
            raise
        except Exception as err:
            if not self.custom:
                raise
            # e.g. nnterp's own sources drill into eager_attention_forward, a function this model never calls
            raise RenamingError(
                f"RenameConfig.attn_prob_source could not be read at layer {layer}: {type(err).__name__}: {err}. The "
                "model runs unilens's attention function, not transformers' eager_attention_forward, so a source inside "
                "attention_interface does not exist here; drop attn_prob_source (model.attention_probabilities gives "
                "the probabilities of every model without it), or name an operation of the attention module's own "
                "forward (see model.attention_probabilities.print_source())."
            ) from err
        probs = saved["probs"]
        batch, seq = self.model.input_ids.shape if self.model.input_ids is not None else (1, probs.shape[-1])
        heads = probs.shape[1] if probs.dim() == 4 else None
        expected = (batch, heads, seq, seq)
        if probs.dim() != 4 or tuple(probs.shape[:1]) + tuple(probs.shape[2:]) != (batch, seq, seq):
            raise RenamingError(
                f"attention probabilities of layer {layer} have shape {tuple(probs.shape)}, expected "
                f"(batch, heads, seq, seq) = {expected}: the source does not give probabilities."
            )
        if not use_trace:
            return
        sums = probs.float().sum(-1)
        module = self.model._attention_modules[layer]
        if getattr(module, "sinks", None) is not None:  # attention sinks (GPT-OSS) take part of each row's mass
            sums = torch.where(sums <= 1 + 1e-3, torch.ones_like(sums), sums)
        if not torch.allclose(sums, torch.ones_like(sums), atol=1e-3):
            raise RenamingError(f"attention probabilities of layer {layer} do not sum to 1 over the keys "
                                f"(row sums {float(sums.min()):.4g}..{float(sums.max()):.4g}).")
        if self.custom:
            with torch.no_grad(), self.model.trace(text):
                saved["own"] = self.general[layer].save()
            if saved["own"].shape != probs.shape or not torch.allclose(saved["own"].float(), probs.float(), atol=1e-4):
                raise RenamingError(
                    f"RenameConfig.attn_prob_source gives tensors that differ from the attention probabilities the "
                    f"model computes at layer {layer}; point it at the operation whose output is softmax(scores)."
                )
        noise = torch.rand(probs.shape, generator=torch.Generator().manual_seed(0)).to(probs.device, probs.dtype)
        noise = noise / noise.sum(-1, keepdim=True)
        with torch.no_grad(), self.model.trace(text):
            self[layer] = noise
            saved["edited"] = self.model.logits.save()
        if torch.allclose(saved["edited"], saved["clean"]):
            raise RenamingError(f"replacing the attention probabilities of layer {layer} does not change the logits: "
                                "the source is not the one the model uses.")


# ---------------------------------------------------------------------------------------------------------------
# nnterp's renaming checks, on the loaded model
# ---------------------------------------------------------------------------------------------------------------


def check_io(std_model: "StandardizedModel", model_name: str, ignores: list[str]) -> None:
    """nnterp's shape check: every standardized tensor of layer 0 is ``(batch, seq, hidden)``, ``ln_final`` output too,
    logits ``(batch, seq, vocab)``. Runs one short trace; raises RenamingError naming the first wrong one.

    Example:
        >>> from unilens import StandardizedTransformer
        >>> from unilens.testing import tiny_model
        >>> check_io(StandardizedTransformer(*tiny_model("gpt2")), "gpt2", ignores=[])   # silent: shapes are right
    """
    names = ["layers_input", "layers_output"]
    if "attention" not in ignores:
        names[1:1] = ["attentions_input", "attentions_output"]
    if "mlp" not in ignores:
        names[-1:-1] = ["mlps_input", "mlps_output"]
    saved: dict[str, torch.Tensor] = {}
    layer = std_model.architecture.attention_layers[0] if "attention" not in ignores else 0
    with torch.no_grad(), std_model.trace("a b c"):
        saved["token_embeddings"] = std_model.token_embeddings.save()
        for name in names:
            saved[name] = getattr(std_model, name)[layer].save()
        saved["logits"] = std_model.logits.save()
    batch, seq = std_model.input_ids.shape
    for name, value in saved.items():
        width = std_model.vocab_size if name == "logits" else std_model.hidden_size
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != (batch, seq, width):
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise RenamingError(f"{model_name}: {name} has shape {shape}, expected {(batch, seq, width)}.")


def check_model_renaming(
    std_model: "StandardizedModel", model_name: str, ignores: list[str], allow_dispatch: bool,
    allow_multimodal: bool = False,
) -> None:
    """nnterp's renaming check: the standardized parts exist and have the right shapes (``check_io``); unilens's
    load-time validation (``unilens.validation``) goes further, comparing the values with HF's outputs.
    ``allow_dispatch`` / ``allow_multimodal`` are nnterp's switches: the model is loaded (nothing to dispatch), and
    unilens serves stacks of mixed layer types layer by layer (``architecture.attention_layers``).

    Example:
        >>> from unilens import StandardizedTransformer
        >>> from unilens.testing import tiny_model
        >>> model = StandardizedTransformer(*tiny_model("llama"), rename_config=RenameConfig(ignore_attn=True))
        >>> check_model_renaming(model, "llama", ignores=[], allow_dispatch=True)
        Traceback (most recent call last):
        ...
        unilens.compat.nnterp.RenamingError: llama: no attention module found; name it with RenameConfig(attn_name=...).
    """
    arch = std_model.architecture
    if "attention" not in ignores and not arch.attention_layers:
        raise RenamingError(f"{model_name}: no attention module found; name it with RenameConfig(attn_name=...).")
    if "mlp" not in ignores and all(p.mlp_in is None for p in arch.layers):
        raise RenamingError(f"{model_name}: no MLP found; name it with RenameConfig(mlp_name=...).")
    check_io(std_model, model_name, ignores)


def nnsight_aliases(rename_config: RenameConfig | None, aliases: dict[str, str] | None) -> dict[str, str] | None:
    """The extra nnsight aliases to merge into discovery's rename dict: the user's ``rename=`` entries and
    ``RenameConfig.model_name`` -> ``model``.

    Example:
        >>> nnsight_aliases(RenameConfig(model_name="transformer"), {"h": "layers"})
        {'h': 'layers', 'transformer': 'model'}
    """
    extra = dict(aliases or {})
    if rename_config is not None:
        for name in _names(rename_config.model_name):
            extra[name] = "model"
    return extra or None


def nnterp_paths(model: nn.Module, arch: Architecture, rename: dict[str, Any]) -> dict[str, Any]:
    """``rename`` plus the aliases that give nnterp's renamed tree: the backbone as ``model`` and, on it, the layer
    stack as ``layers`` and the final norm as ``ln_final`` (nnterp's ``model.model.layers[i].self_attn``,
    ``model.model.ln_final`` on any architecture, as its renaming gives). A name the module already has is left
    alone; a backbone deeper than one level (OPT's ``model.decoder``) gets only the root aliases.

    Example:
        >>> from unilens.testing import tiny_model
        >>> hf, _ = tiny_model("gpt2")
        >>> arch = discover(hf)
        >>> paths = nnterp_paths(hf, arch, {"transformer.h": "layers"})
        >>> paths["transformer"], paths["transformer.h"], paths["transformer.ln_f"]
        ('model', ['layers', 'transformer.layers'], 'transformer.ln_final')
    """
    out: dict[str, Any] = dict(rename)

    def add(path: str, alias: str) -> None:  # one alias stays a string, several become nnsight's list form
        current = out.get(path)
        names = [] if current is None else [current] if isinstance(current, str) else list(current)
        if alias not in names:
            out[path] = alias if not names else names + [alias]

    base, _, rest = arch.layers_path.partition(".")
    if not rest or "." in rest:  # the stack at the root, or under a deeper backbone
        return out
    backbone = model.get_submodule(base)
    if base != "model" and not hasattr(model, "model"):
        add(base, "model")
    if rest != "layers" and not hasattr(backbone, "layers"):
        add(arch.layers_path, f"{base}.layers")
    norm = arch.final_norm_path
    if norm and norm.startswith(base + ".") and "." not in norm[len(base) + 1:] and not hasattr(backbone, "ln_final"):
        add(norm, f"{base}.ln_final")
    return out
