"""Architecture discovery: find the parts of any HF causal LM from its module tree, not from a per-model table.

The rules, in order of trust:

* embeddings and unembedding come from the model's own ``get_input_embeddings()`` /
  ``get_output_embeddings()`` (the one table of a one-codebook audio LM's per-codebook list: ``token_table``);
* the decoder-layer list is the ``nn.ModuleList`` holding the most parameters (MoE expert lists live
  *inside* layers, so they always hold fewer);
* inside a layer, the attention module is the shallowest module whose class name says "Attention"
  (never "CrossAttention") and that owns a projection (a Linear / Conv1D child); the MLP is the
  shallowest module whose class or attribute name says MLP / feed-forward / MoE and that does not
  contain the attention. Layers whose MLP is a bare ``fc1 -> act -> fc2`` (OPT, BioGPT) get an
  MLP *span*: its input is ``fc1``'s input, its output ``fc2``'s output;
* the final norm is the norm module registered beside the layer list, after it;
* learned absolute position embeddings (GPT-2's ``wpe``, OPT's ``embed_positions``): an embedding table outside
  the layer stack, other than the token embedding, whose output the probe sees added to layer 0's input
  (``probe_position_embedding``); rotary / ALiBi models have none.

Every guess is checked at load time against HF's ``output_hidden_states`` (``unilens.validation``), so a
wrong guess is an error, never a silently wrong tensor.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field

import torch
from nnsight.intervention.envoy import Envoy
from torch import nn

from ..core.layouts import LEADING_STREAM, SEQ_FIRST, ResidualLayout
from .probe import Probe, probe_ids
from .structure import (
    computes_softmax_attention,
    find_output_projection,
    is_projection,
    owns_projection,
    token_table,
)

__all__ = [
    "Architecture",
    "ArchitectureError",
    "ModuleMap",
    "get_rename_dict",
    "discover",
    "NO_POSITION_EMBEDDING",
    "probe_position_embedding",
    "probe_residual_layout",
    "probe_prefix_positions",
    "probe_residual_streams",
]

# The one reason given for ``position_embeddings`` on every model without such a tensor (the same sentence on all).
NO_POSITION_EMBEDDING = (
    "the model has no learned absolute position embedding added to the token embeddings before layer 0 (positions "
    "enter inside attention instead, as rotary / ALiBi, or not at all); blocks.0 / layers_input[0] is the first "
    "residual stream"
)


class ArchitectureError(ValueError):
    """The model's structure does not fit the standardized view (raised before any wrong tensor is read)."""


_ATTENTION_CLASS = re.compile(r"attention|attn", re.IGNORECASE)
_NOT_SELF_ATTENTION = re.compile(r"cross|encoder_attn|encdec", re.IGNORECASE)  # decoder cross-attention
_SIDE_TOWER = re.compile(r"vision|visual|image|audio|speech|patch_embed", re.IGNORECASE)
_ENCODER_STACK = re.compile(r"encoder\.", re.IGNORECASE)  # an encoder's stack: the LM's only if no other one is
_MLP_NAME = re.compile(r"^(mlp|feed_forward|ffn|ff|block_sparse_moe|moe|mixer_mlp)$", re.IGNORECASE)
_MLP_CLASS = re.compile(r"mlp|feedforward|moe|experts|ffn", re.IGNORECASE)
_NORM_CLASS = re.compile(r"norm", re.IGNORECASE)
_MLP_PART_NAME = re.compile(r"mlp|ffn|feed_forward|expert|moe", re.IGNORECASE)
_SPLIT_MLP = (("fc1", "fc2"), ("c_fc", "c_proj"), ("dense_h_to_4h", "dense_4h_to_h"))

# Config attributes that change the logits after the unembedding: name -> how to apply it.
# These are the only post-unembedding steps in transformers 5 causal LMs (checked at load time,
# so a new one shows up as a validation error, not as wrong numbers).
LOGIT_POSTPROCESSING = {
    "logit_scale": "multiply",  # Cohere / Cohere2: logits * logit_scale
    "logits_scaling": "divide",  # Granite family: logits / logits_scaling
    "final_logit_softcapping": "softcap",  # Gemma 2/3: tanh(logits / cap) * cap
    "output_multiplier_scale": "multiply",  # some MuP-style models
    "logits_soft_cap": "softcap",  # RecurrentGemma
    "output_logit_soft_cap": "softcap",  # xLSTM
}


def _param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@dataclass
class LayerParts:
    """Where the standardized pieces live inside one decoder layer (paths relative to the layer)."""

    attention: str | None  # e.g. "self_attn", "norm_attn_norm.attn"; None on non-attention layers
    mlp: str | None  # e.g. "mlp"; None when the MLP is a span of bare linears
    mlp_in: str | None  # module whose *input* is the MLP input (== mlp when there is an MLP module)
    mlp_out: str | None  # module whose *output* is the MLP output
    attention_out: str | None = None  # module whose output is the attention branch (== attention unless the
    # attention module adds the residual itself, as Bloom's does: then its last projection; see probe_dataflow)
    # the token mixer: the softmax attention, or the SSM / recurrent / linear-attention block of a layer that has no
    # softmax attention (Mamba's "mixer", RWKV's "attention", xLSTM's "mlstm_layer", Jamba's "mamba"); None when the
    # layer has none (an MLP-only layer of Nemotron-H) or two in parallel (Falcon-H1: attention + Mamba, summed)
    mixer: str | None = None
    # the mixer's output projection (Mamba's out_proj, RWKV's output, attention's o_proj): its input is the mixer's
    # last hidden state before it returns to the residual width (the gated SSM output; z on attention layers)
    mixer_projection: str | None = None

    def __post_init__(self):
        if self.attention_out is None:
            self.attention_out = self.attention

    @property
    def mixer_out(self) -> str | None:
        """The module whose output is the mixer branch (``attention_out`` when the mixer is the attention)."""
        return self.attention_out if self.mixer is not None and self.mixer == self.attention else self.mixer


@dataclass
class Architecture:
    """The standardized map of one HF causal LM: dotted paths from the root model.

    Example:
        >>> from unilens.testing import tiny_model
        >>> hf, tok = tiny_model("gpt2")
        >>> Architecture.from_model(hf).layers_path
        'transformer.h'
    """

    model_type: str
    embed_path: str
    layers_path: str
    final_norm_path: str | None
    lm_head_path: str
    layers: list[LayerParts] = field(default_factory=list)
    parallel: bool = False  # attention and MLP read the same layer input (GPT-J, Phi, Falcon, Cohere, NeoX)
    logit_postprocessing: dict[str, float] = field(default_factory=dict)
    # standardized outputs the model later modifies in place (Falcon: ``mlp_output += attention_output``);
    # accessors return a copy of these, or a saved tensor would silently change after it was read
    mutated_in_place: set[str] = field(default_factory=set)
    # the modules applied, in order, between the last layer and lm_head: usually just the final norm; BERT-style
    # heads add dense + activation + LayerNorm (``cls.predictions.transform``). Found by probe_dataflow.
    head_chain: list[str] | None = field(default_factory=list)  # None: not reproducible (see head_error)
    head_error: str | None = None
    # the learned absolute position embedding whose output is added to the token embeddings before layer 0 (GPT-2's
    # ``transformer.wpe``); None on rotary / ALiBi models. Found by probe_position_embedding.
    position_embed_path: str | None = None
    # positions the model prepends to the input inside its forward (CPM-Ant's learned prompt): every per-layer tensor
    # has prefix_positions + seq positions, the prepended ones first, while HF's hidden states, attentions and logits
    # keep the input's (the last seq). Found by probe_prefix_positions.
    prefix_positions: int = 0
    # how the residual stream lies in the layers' tensors: (batch, seq, hidden), XLNet's (seq, batch, hidden) or
    # ProphetNet's main stream before its n-gram streams (unilens.core.layouts). Found by probe_residual_layout.
    residual_layout: ResidualLayout = field(default_factory=ResidualLayout)
    # where a layer is no one module but the i-th entries of parallel lists run by the model's forward loop (XLM:
    # attentions, layer_norm1, ffns, layer_norm2): the list whose entries' input is the layers' input, while
    # ``layers_path`` is the list whose entries' output is their output. None: ``layers_path``'s entries are layers
    layer_input_path: str | None = None
    # why the attention accessors cannot serve the attention this model has (XLNet's relative attention projects with
    # raw weight tensors; XLM's attentions sit in a list beside the layer-output list): set by discovery, None where
    # they can or where the model has no softmax attention (then its absence is the reason)
    attention_refusal: str | None = None
    # hidden-wide residual streams side by side in the layers' tensors: hyper-connections (Qwen4-Exp) run the layers on
    # (batch, seq, streams * hidden), the token embeddings repeated once per stream, and a module of the head
    # (model.hyper_connection_mixer) merges them before the unembedding. layers_input / layers_output are the whole
    # tensor, as in HF's hidden states; project_on_vocab takes that width. Found by probe_residual_streams.
    residual_streams: int = 1
    # the keyword argument of a layer's forward that carries the residual stream (the previous layer's layers_output)
    # where it is not the layer's first input: Reformer's reversible layers are called as
    # layer(prev_attn_output=..., hidden_states=...), the other stream first. None: the first input. Found by
    # probe_residual_streams.
    layer_input_argument: str | None = None

    def __post_init__(self):
        if not self.head_chain and self.final_norm_path:
            self.head_chain = [self.final_norm_path]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def attention_layers(self) -> list[int]:
        """Indices of layers that have softmax attention (all of them except on hybrid models)."""
        return [i for i, p in enumerate(self.layers) if p.attention is not None]

    @property
    def layer_input_refusal(self) -> str | None:
        """Why ``layers_input`` cannot be assigned on this model (parallel layer lists), or None where it can."""
        if self.layer_input_path is None:
            return None
        return (f"its layers are parallel module lists combined in the model's forward loop, which adds the output of "
                f"{self.layer_input_path}[i] to its own copy of the residual stream, so a write to that module's input "
                "would reach the attention branch only; assign layers_output[i - 1] instead")

    @classmethod
    def from_model(cls, model: nn.Module) -> "Architecture":
        return discover(model)


def _path_of(root: nn.Module, target: nn.Module) -> str | None:
    for name, module in root.named_modules():
        if module is target:
            return name
    return None


def _find_layers(model: nn.Module) -> str:
    best, best_params = None, (-1, -1)
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        # the language stack, not a vision / audio tower of a multimodal wrapper (which may be bigger)
        # (GIT's text stack is `git.encoder.layer`: a stack named encoder still beats its vision tower's)
        rank = 0 if _SIDE_TOWER.search(name + ".") else 1 if _ENCODER_STACK.search(name + ".") else 2
        params = (rank, _param_count(module))
        if params > best_params:
            best, best_params = name, params
    if best is None:
        raise ArchitectureError(
            f"{type(model).__name__}: found no nn.ModuleList of decoder layers. unilens needs a stack of "
            "layers; pass a transformers causal LM (AutoModelForCausalLM)."
        )
    return best


def _parallel_lists(model: nn.Module, layers_path: str) -> tuple[str, str | None]:
    """``(layers_path, layer_input_path)`` where each layer is no one module but the i-th entries of parallel lists
    that the model's forward loop combines (XLM: ``attentions``, ``layer_norm1``, ``ffns``, ``layer_norm2``): the
    biggest list's entries hold no token mixer, and a list beside it, as long, holds the attentions. The layer's
    output is then the last registered list's entry output (XLM's ``layer_norm2[i]``: post-norm, the residual), its
    input the first one's entry input; a structural guess, checked at load against HF's hidden states. Elsewhere
    ``(layers_path, None)``.
    """
    parent_path, _, _ = layers_path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    stack = model.get_submodule(layers_path)
    lists = [(name, child) for name, child in parent.named_children()
             if isinstance(child, nn.ModuleList) and len(child) == len(stack)]
    entry = stack[0]
    mlp_parts = _find_mlp(entry, None)
    holds_mixer = _find_attention(entry) is not None or _find_mixer(entry, None, mlp_parts) is not None
    attentions = [name for name, child in lists
                  if _ATTENTION_CLASS.search(type(child[0]).__name__) and owns_projection(child[0])]
    if len(lists) < 2 or holds_mixer or not attentions:
        return layers_path, None
    prefix = f"{parent_path}." if parent_path else ""
    return prefix + lists[-1][0], prefix + lists[0][0]


def _find_attention(layer: nn.Module) -> str | None:

    # shallowest first: named_modules() is depth-first, so sort by depth
    candidates = []
    for order, (name, module) in enumerate(layer.named_modules()):
        if not name:
            continue
        cls = type(module).__name__
        if _NOT_SELF_ATTENTION.search(name) or _NOT_SELF_ATTENTION.search(cls):
            continue  # cross-attention shares the class with self-attention in BART-style decoders
        if _ATTENTION_CLASS.search(cls) and owns_projection(module) and computes_softmax_attention(module):
            # linear / delta / recurrent mixers named "attention" have no probabilities: not attention layers
            candidates.append((name.count("."), order, name))  # shallowest, then first registered
    if not candidates:
        return None
    return min(candidates)[2]


def _find_mlp(layer: nn.Module, attention: str | None) -> tuple[str | None, str | None, str | None]:
    candidates = []
    for name, module in layer.named_modules():
        if not name or (attention and (attention == name or attention.startswith(name + "."))):
            continue
        if attention and name.startswith(attention + "."):
            continue
        leaf = name.rsplit(".", 1)[-1]
        cls = type(module).__name__
        if _NORM_CLASS.search(cls) or isinstance(module, nn.ModuleList):
            continue  # e.g. Qwen2MoeRMSNorm says "Moe" but is a norm
        if _MLP_NAME.match(leaf) or _MLP_CLASS.search(cls):
            candidates.append((name.count("."), name))
    if candidates:
        mlp = min(candidates)[1]
        return mlp, mlp, mlp
    children = dict(layer.named_children())
    for first, last in _SPLIT_MLP:
        if first in children and last in children:
            return None, first, last
    return None, None, None


def _find_mixer(layer: nn.Module, attention: str | None, mlp_parts: tuple[str | None, ...]) -> str | None:
    """The layer's token mixer (see ``LayerParts.mixer``): among the layer's direct children that hold parameters
    and are neither norms, bare linears nor the MLP, the one that is left; the softmax attention when it is that one.
    """
    taken = {path.split(".")[0] for path in (attention, *mlp_parts) if path}
    others = [
        name for name, child in layer.named_children()
        if name not in taken and any(True for _ in child.parameters())
        and not isinstance(child, (nn.Linear, nn.ModuleList))
        and not _NORM_CLASS.search(type(child).__name__)
        and not _MLP_PART_NAME.search(name)  # a second MLP beside the found one (Granite-MoE-Hybrid's shared_mlp)
    ]
    if attention is not None:
        return attention if not others else None
    return others[0] if len(others) == 1 else None


def _mixer_projection(layer: nn.Module, mixer: str | None) -> str | None:
    """Path (relative to the layer) of the mixer's output projection, or None where it has no linear one."""
    if mixer is None:
        return None
    try:
        name, module = find_output_projection(layer.get_submodule(mixer))
    except ValueError:
        return None
    return f"{mixer}.{name}" if is_projection(module) else None


def _find_final_norm(model: nn.Module, layers_path: str) -> str | None:
    """Structural first guess: the last norm registered beside the layer list (confirmed by ``probe_final_norm``)."""
    parent_path, _, layers_name = layers_path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    norms = [n for n, c in parent.named_children() if n != layers_name and _NORM_CLASS.search(type(c).__name__)]
    if not norms:
        return None
    return f"{parent_path}.{norms[-1]}" if parent_path else norms[-1]


def discover(model: nn.Module) -> Architecture:
    """Find the standardized parts of ``model`` (a transformers causal LM) by structure.

    Example:
        >>> from unilens.testing import tiny_model
        >>> hf, _ = tiny_model("llama")
        >>> arch = discover(hf)
        >>> arch.layers_path, arch.layers[0].attention, arch.layers[0].mlp
        ('model.layers', 'self_attn', 'mlp')
    """
    if not hasattr(model, "get_input_embeddings") or not hasattr(model, "get_output_embeddings"):
        raise ArchitectureError(
            f"{type(model).__name__} is not a transformers PreTrainedModel; load a causal LM with "
            "AutoModelForCausalLM or pass a hub id / folder / .gguf file."
        )
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", type(model).__name__)
    lm_head = model.get_output_embeddings()
    if lm_head is None:
        raise ArchitectureError(
            f"{type(model).__name__} ({model_type}) has no output embeddings (lm_head): it is not a causal "
            "language model. Load it with AutoModelForCausalLM."
        )
    try:  # a one-codebook audio LM keeps its one embedding / head in a per-codebook ModuleList (MusicGen)
        embed, lm_head = token_table(model.get_input_embeddings()), token_table(lm_head)
    except ValueError as err:
        raise ArchitectureError(f"{type(model).__name__} ({model_type}) has {err}") from None
    embed_path = _path_of(model, embed)
    lm_head_path = _path_of(model, lm_head)
    layers_path, layer_input_path = _parallel_lists(model, _find_layers(model))
    layers = model.get_submodule(layers_path)
    parts = []
    for layer in layers:
        attention = _find_attention(layer)
        mlp, mlp_in, mlp_out = _find_mlp(layer, attention)
        mixer = _find_mixer(layer, attention, (mlp, mlp_in, mlp_out))
        parts.append(LayerParts(attention=attention, mlp=mlp, mlp_in=mlp_in, mlp_out=mlp_out, mixer=mixer,
                                mixer_projection=_mixer_projection(layer, mixer)))
    # recurrent-only stacks (Mamba, RWKV) have neither: the residual stream view still holds (validated at
    # load); attention and MLP accessors raise a clear error for them
    post = {}
    for key in LOGIT_POSTPROCESSING:
        value = getattr(config, key, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value not in (0,):
            post[key] = float(value)
    return Architecture(
        model_type=model_type,
        embed_path=embed_path,
        layers_path=layers_path,
        final_norm_path=_find_final_norm(model, layers_path),
        lm_head_path=lm_head_path,
        layers=parts,
        logit_postprocessing=post,
        layer_input_path=layer_input_path,
        attention_refusal=_attention_refusal(layers, parts, layers_path, layer_input_path),
    )


def _attention_refusal(layers: nn.ModuleList, parts: list[LayerParts], layers_path: str,
                       layer_input_path: str | None) -> str | None:
    """Why the model's attention is out of the attention accessors' reach though it has one (``Architecture.
    attention_refusal``), or None."""
    if any(p.attention is not None for p in parts):
        return None
    if layer_input_path is not None:
        return (f"the attentions are the list {layer_input_path}, beside the layer-output list {layers_path} (parallel "
                "lists combined in the model's forward loop), so no layer module holds them; hook "
                f"{layer_input_path}[i] directly")
    for layer, p in zip(layers, parts):
        mixer = layer.get_submodule(p.mixer) if p.mixer is not None else None
        if mixer is not None and _ATTENTION_CLASS.search(type(mixer).__name__) and not owns_projection(mixer):
            return (f"its attention ({type(mixer).__name__}) projects queries, keys and values with raw weight "
                    "tensors, not Linear modules, and unilens's attention hooks sit on those projections")
    return None


def apply_logit_postprocessing(logits: torch.Tensor, post: dict[str, float]) -> torch.Tensor:
    """Apply the config-level steps that turn ``lm_head`` output into the model's logits."""
    for key, value in post.items():
        how = LOGIT_POSTPROCESSING[key]
        if how == "multiply":
            logits = logits * value
        elif how == "divide":
            logits = logits / value
        elif how == "softcap":
            logits = torch.tanh(logits / value) * value
    return logits


def _envoy_path(path: str) -> str:
    """``path`` as nnsight's envoys spell it: a module named after an attribute every envoy serves (GIT's unembedding
    is a module named ``output``) is mounted as ``E_<name>`` (nnsight's ``Envoy.OVERLOAD_PREFIX``), so a rename
    of the plain path would alias the envoy's ``.output`` itself."""
    prefix = getattr(Envoy, "OVERLOAD_PREFIX", None)  # nnsight releases without it mount no such module at all
    if prefix is None:
        return path
    parts = path.split(".")
    reserved = [not p.startswith("_") and inspect.isdatadescriptor(getattr(Envoy, p, None)) for p in parts]
    return ".".join(f"{prefix}{p}" if r else p for p, r in zip(parts, reserved))


def get_rename_dict(
    model: nn.Module | None = None,
    rename_config: dict[str, str] | None = None,
    architecture: Architecture | None = None,
) -> dict[str, str]:
    """Module renames for nnsight's ``LanguageModel(..., rename=...)`` / ``NNsight(...)``.

    With a model, the dict is exact (built by discovery); without one, it lists the common HF names.

    Example:
        >>> from nnsight import NNsight
        >>> from unilens.testing import tiny_model
        >>> hf, _ = tiny_model("gpt2")
        >>> renamed = NNsight(hf, rename=get_rename_dict(hf))
        >>> type(renamed.layers._module).__name__
        'ModuleList'
    """
    if model is not None:
        arch = architecture or discover(model)
        rename = {arch.layers_path: "layers", arch.lm_head_path: "lm_head", arch.embed_path: "embed_tokens"}
        if arch.final_norm_path:
            rename[arch.final_norm_path] = "ln_final"
        first = arch.layers[arch.attention_layers[0]] if arch.attention_layers else arch.layers[0]
        if first.attention and "." not in first.attention and first.attention != "self_attn":
            rename[first.attention] = "self_attn"
        if first.mlp and "." not in first.mlp and first.mlp != "mlp":
            rename[first.mlp] = "mlp"
        rename = {_envoy_path(path): name for path, name in rename.items()}
    else:
        rename = {
            "transformer.h": "layers",
            "model.layers": "layers",
            "gpt_neox.layers": "layers",
            "model.decoder.layers": "layers",
            "transformer.blocks": "layers",
            "transformer.ln_f": "ln_final",
            "model.norm": "ln_final",
            "gpt_neox.final_layer_norm": "ln_final",
            "model.decoder.final_layer_norm": "ln_final",
            "transformer.norm_f": "ln_final",
            "model.final_layernorm": "ln_final",
            "transformer.wte": "embed_tokens",
            "gpt_neox.embed_in": "embed_tokens",
            "transformer.word_embeddings": "embed_tokens",
            "embed_out": "lm_head",
            "attn": "self_attn",
            "self_attention": "self_attn",
            "attention": "self_attn",
            "feed_forward": "mlp",
            "ffn": "mlp",
            "block_sparse_moe": "mlp",
        }
    if rename_config:
        rename.update(rename_config)
    if model is not None:
        rename = {path: alias for path, alias in rename.items() if not _alias_collides(model, path, alias)}
    return rename


def _alias_collides(model: nn.Module, path: str, alias: str) -> bool:
    """Whether nnsight's alias would shadow an existing, different attribute (nnsight refuses those)."""
    if path == alias:
        return True
    if "." in path:  # a full path: the alias is bound on the root
        existing = getattr(model, alias, None)
        return existing is not None and existing is not model.get_submodule(path)
    for _, module in model.named_modules():  # a child name: the alias is bound on each parent having it
        if hasattr(module, path) and isinstance(getattr(module, path), nn.Module) and alias in dict(module.named_children()):
            return True
    return False


class ModuleMap:
    """Plain torch modules of any HF causal LM under the standardized names (no nnsight, no overhead).

    Example:
        >>> from unilens.testing import tiny_model
        >>> hf, _ = tiny_model("llama")
        >>> acc = ModuleMap(hf)
        >>> len(acc.layers) == hf.config.num_hidden_layers
        True
    """

    def __init__(self, model: nn.Module, architecture: Architecture | None = None):
        self.model = model
        self.architecture = architecture or discover(model)

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.get_submodule(self.architecture.layers_path)

    def get_layers(self) -> nn.ModuleList:
        return self.layers

    def _check(self, i: int) -> int:
        n = self.architecture.num_layers
        if not -n <= i < n:
            raise IndexError(f"layer {i} is out of range: this {self.architecture.model_type} model has {n} layers (0..{n - 1}).")
        return i % n

    def get_layer(self, i: int) -> nn.Module:
        return self.layers[self._check(i)]

    def get_attention(self, i: int) -> nn.Module:
        i = self._check(i)
        path = self.architecture.layers[i].attention
        if path is None:
            raise ArchitectureError(
                f"layer {i} of this {self.architecture.model_type} model has no softmax attention "
                f"(hybrid stack); attention layers are {self.architecture.attention_layers}."
            )
        return self.layers[i].get_submodule(path)

    def get_mlp(self, i: int) -> nn.Module:
        i = self._check(i)
        path = self.architecture.layers[i].mlp
        if path is None:
            raise ArchitectureError(
                f"layer {i} of this {self.architecture.model_type} model has no single MLP module "
                f"(its MLP is the span {self.architecture.layers[i].mlp_in} -> {self.architecture.layers[i].mlp_out}); "
                "use mlps_input / mlps_output."
            )
        return self.layers[i].get_submodule(path)

    def get_embed_tokens(self) -> nn.Module:
        return self.model.get_submodule(self.architecture.embed_path)

    def get_unembed_norm(self) -> nn.Module | None:
        path = self.architecture.final_norm_path
        return self.model.get_submodule(path) if path else None

    def project_on_vocab(self, hidden: torch.Tensor) -> torch.Tensor:
        """Plain torch: the modules between the last layer and lm_head, lm_head, and the logit post-processing."""
        if self.architecture.head_chain is None:
            raise ArchitectureError(self.architecture.head_error)
        for path in self.architecture.head_chain:
            hidden = self.model.get_submodule(path)(hidden)
        logits = self.get_unembed()(hidden)
        return apply_logit_postprocessing(logits, self.architecture.logit_postprocessing)

    def get_unembed(self) -> nn.Module:
        return self.model.get_submodule(self.architecture.lm_head_path)


@torch.no_grad()
def probe_parallel(model: nn.Module, arch: Architecture) -> bool:
    """Whether attention and MLP run in parallel, found from data flow rather than a list of model types.

    Runs the model up to the first MLP twice on the probe ids, the second time with the first attention's
    output perturbed: if the MLP input does not change, the MLP does not read the attention output, so the
    block is parallel (GPT-J, Phi, Falcon, Cohere, GPT-NeoX with ``use_parallel_residual``).
    """
    layer_index = next(
        (i for i, p in enumerate(arch.layers) if p.attention is not None and p.mlp_in is not None), None
    )
    if layer_index is None:
        return False
    layer = model.get_submodule(arch.layers_path)[layer_index]
    attention = layer.get_submodule(arch.layers[layer_index].attention)
    mlp_in = layer.get_submodule(arch.layers[layer_index].mlp_in)
    seen: list[torch.Tensor] = []
    perturb = [False]

    def on_attention(module, args, output):
        if not perturb[0]:
            return None
        if isinstance(output, torch.Tensor):
            return output + 1.0
        if hasattr(output, "_fields"):  # a namedtuple (Reformer's LocalSelfAttentionOutput): fields by name
            return output._replace(**{output._fields[0]: output[0] + 1.0})
        return type(output)([output[0] + 1.0, *output[1:]])

    def on_mlp(module, args, kwargs):
        x = args[0] if args else next(iter(kwargs.values()))
        seen.append(x.detach().clone())

    with Probe(model) as probe:
        probe.forward_hook(attention, on_attention)
        probe.pre_hook(mlp_in, on_mlp, with_kwargs=True, stop=True)
        for flag in (False, True):
            perturb[0] = flag
            probe.run()
    if len(seen) != 2:
        raise ArchitectureError(f"{arch.model_type}: the MLP of layer {layer_index} did not run in a forward pass.")
    return bool(torch.equal(seen[0], seen[1]))


def _first_tensor(value):
    while isinstance(value, (tuple, list)) and value:
        value = value[0]
    return value if isinstance(value, torch.Tensor) else None


def _head_chain(calls, final: torch.Tensor | None, target: torch.Tensor, arch: Architecture) -> list[str]:
    """The modules that carry the last layer's output to lm_head's input, each reading the previous one's output.

    Picks, step by step, the shallowest module called after the last layer whose input is the current tensor
    (skipping lm_head's ancestors, which also read it but contain lm_head). Refuses (raises) when functional
    code between modules breaks the chain: then project_on_vocab could not reproduce the model's logits.
    """
    ancestors = {arch.lm_head_path.rsplit(".", k)[0] for k in range(1, arch.lm_head_path.count(".") + 1)}
    chain, x = [], final
    while x is not None and not _same(x, target):
        steps = [
            (name.count("."), order, name, out)
            for order, (name, inp, out) in enumerate(calls)
            if name not in ancestors and name != arch.lm_head_path and isinstance(inp, torch.Tensor)
            and isinstance(out, torch.Tensor) and _same(inp, x) and not any(name.startswith(c + ".") for c in chain)
        ]
        if not steps:
            raise ArchitectureError(
                f"{arch.model_type}: cannot find the modules that take the last layer's output to the unembedding "
                f"({arch.lm_head_path}); functional code between them is not reproducible by project_on_vocab."
            )
        _, _, name, x = min(steps, key=lambda s: (s[0], s[1]))
        chain.append(name)
        if len(chain) > 8:
            raise ArchitectureError(f"{arch.model_type}: the unembedding head is longer than 8 modules; not supported.")
    return chain


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (a.shape == b.shape and torch.equal(a, b))


def _last_projection(module: nn.Module, calls: list[tuple[str, torch.Tensor]], prefix: str) -> tuple[str, torch.Tensor] | None:
    inside = [(n, out) for n, out in calls if n.startswith(prefix + ".")]
    return inside[-1] if inside else None


@torch.no_grad()
def probe_dataflow(model: nn.Module, arch: Architecture) -> None:
    """Settle, from one 4-token forward, what structure alone cannot tell (updates ``arch`` in place).

    * the final norm: the norm module outside the layers whose output *is* the unembedding input
      (registration order is not enough: OPT registers ``final_layer_norm`` before its layers, OLMo's norm has
      no parameters); ``None`` when the unembedding reads the last layer's output directly;
    * branch modules that add the residual themselves (Bloom's attention and MLP end in ``dropout_add(x,
      residual)``): their standardized output moves to their last projection, so ``attentions_output`` /
      ``mlps_output`` are the branch, never branch + residual;
    * the learned absolute position embedding, if any (``probe_position_embedding``);
    * positions the model prepends to the input inside its forward, if any (``probe_prefix_positions``), first:
      the final norm's output feeds the unembedding at the input's positions only;
    * how the residual stream lies in the layers' tensors (``probe_residual_layout``), first: the head is found
      from the last layer's residual stream;
    * several residual streams per layer: side by side in its tensor (hyper-connections), or the residual stream
      passed to a layer as another argument than its first (Reformer's reversible layers) (``probe_residual_streams``).
    """
    probe_residual_layout(model, arch)
    probe_residual_streams(model, arch)
    probe_prefix_positions(model, arch)
    layers_prefix = arch.layers_path + "."
    norms = {
        name: m
        for name, m in model.named_modules()
        if name and _NORM_CLASS.search(type(m).__name__) and not (name == arch.layers_path or name.startswith(layers_prefix))
    }
    index = next((i for i, p in enumerate(arch.layers) if p.attention is not None), 0)
    layer_path = f"{arch.layers_path}.{index}"
    layer = model.get_submodule(layer_path)
    parts = arch.layers[index]
    branches = {k: v for k, v in (("attention", parts.attention), ("mlp", parts.mlp)) if v}
    outputs: dict[str, torch.Tensor] = {}
    versions: dict[str, tuple[torch.Tensor, int]] = {}
    projection_calls: list[tuple[str, torch.Tensor]] = []
    unembed_input: list[torch.Tensor] = []
    norm_inputs: dict[str, torch.Tensor] = {}
    head_calls: list[tuple[str, torch.Tensor | None, torch.Tensor | None]] = []  # (path, input, output) in order
    after_last_layer = [False]
    last_layer_output: list[torch.Tensor] = []

    branch_inputs: dict[str, list[torch.Tensor]] = {}

    def remember(key, args, kwargs, out):
        first = _first_tensor(out)
        if first is None:
            return
        outputs["branch:" + key] = first.clone()
        versions[key] = (first, first._version)
        branch_inputs[key] = [t.clone() for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]

    def on_projection(name, out):
        if isinstance(out, torch.Tensor):
            projection_calls.append((name, out))

    def on_call(mod, args, kwargs, out, name):
        if after_last_layer[0]:
            head_calls.append((name, _first_tensor(args) if args else _first_tensor(list(kwargs.values())), _first_tensor(out)))

    def on_last_layer(mod, args, out) -> None:  # returns None: a hook's return value would replace the output
        last_layer_output.append(_first_tensor(out))
        after_last_layer[0] = True

    watched = dict(branches)
    watched["layer"] = ""
    if parts.mlp_out and parts.mlp_out != parts.mlp:
        watched["mlp"] = parts.mlp_out
    with Probe(model) as probe:
        for name, m in norms.items():
            probe.forward_hook(m, lambda mod, a, out, name=name: outputs.__setitem__(name, out))
        for name, m in norms.items():
            probe.pre_hook(m, lambda mod, a, name=name: norm_inputs.__setitem__(name, _first_tensor(a)))
        for key, path in watched.items():
            module = layer.get_submodule(path) if path else layer
            probe.forward_hook(module, lambda mod, a, kw, out, key=key: remember(key, a, kw, out), with_kwargs=True)
        for name, m in layer.named_modules():
            if name and is_projection(m):
                probe.forward_hook(m, lambda mod, a, out, name=name: on_projection(name, out))
        probe.pre_hook(model.get_submodule(arch.lm_head_path), lambda mod, a: unembed_input.append(a[0]))
        for name, m in model.named_modules():
            if name and not (name == arch.layers_path or name.startswith(layers_prefix)):
                probe.forward_hook(m, lambda mod, a, kw, out, name=name: on_call(mod, a, kw, out, name), with_kwargs=True)
        probe.forward_hook(model.get_submodule(arch.layers_path)[-1], on_last_layer)
        probe.run()
    if not unembed_input:
        raise ArchitectureError(f"{arch.model_type}: the unembedding {arch.lm_head_path} did not run in a forward pass.")
    target = unembed_input[-1]
    final = arch.residual_layout.to_residual(last_layer_output[-1]) if last_layer_output else None
    # the final norm reads the last layer's output and its output is what the unembedding reads (at the input's
    # positions: a model that prepends positions of its own drops them before its position-wise head, CPM-Ant)
    p = arch.prefix_positions

    def kept(t: torch.Tensor) -> torch.Tensor:
        return t[:, p:] if p and t.dim() >= 2 else t

    feeding = [
        n for n, out in outputs.items()
        if not n.startswith("branch:") and isinstance(out, torch.Tensor) and _same(kept(out), target)
        and final is not None and isinstance(norm_inputs.get(n), torch.Tensor) and _same(norm_inputs[n], final)
    ]
    if feeding:
        arch.final_norm_path, arch.head_chain = feeding[-1], [feeding[-1]]
    elif final is not None and _same(target, kept(final)):
        arch.final_norm_path, arch.head_chain = None, []
    else:
        arch.final_norm_path = None
        try:
            arch.head_chain = _head_chain(head_calls, final, target, arch)
        except ArchitectureError as err:  # the residual view stays valid; only project_on_vocab is refused
            arch.head_chain, arch.head_error = None, (_other_stream_head(arch, target)
                                                      or _wider_head(arch, final, target) or str(err))
    arch.mutated_in_place = {key for key, (tensor, version) in versions.items() if tensor._version != version}
    for key, path in branches.items():
        branch = outputs.get("branch:" + key)
        last = _last_projection(layer, projection_calls, path)
        if key == "layer" or branch is None or last is None or last[1].shape != branch.shape or torch.allclose(branch, last[1]):
            continue
        # the module's output is its last projection's plus one of its own inputs: it adds the residual it was
        # given (Bloom's dropout_add(x, residual)). Any other difference is the branch's own computation (a gate
        # after the last projection, RWKV's sigmoid(r) * v; a shared expert added to the routed ones): no move.
        added = branch - last[1]
        if not any(t.shape == added.shape and torch.allclose(added, t, atol=1e-5) for t in branch_inputs.get(key, [])):
            continue
        for p in arch.layers:
            if key == "attention" and p.attention == path:
                p.attention_out = last[0]
            elif key == "mlp" and p.mlp_out == path:
                p.mlp_out = last[0]
    probe_position_embedding(model, arch)


@torch.no_grad()
def probe_prefix_positions(model: nn.Module, arch: Architecture) -> int:
    """Positions the model prepends to its input inside the forward, found by data flow (sets and returns
    ``arch.prefix_positions``).

    CPM-Ant prepends its learned prompt: its layers see ``prompt_length + seq`` positions, and HF keeps the last
    ``seq`` in its hidden states, attentions and logits. A prefix of ``p`` positions qualifies when layer 0's input
    has ``p`` more positions than the input ids, and its first ``p`` stay the same when every token changes (the
    model's own positions, not the input's) while the others change.

    Example:
        >>> from unilens.testing import tiny_model
        >>> hf, _ = tiny_model("cpmant")
        >>> probe_prefix_positions(hf, discover(hf)) == hf.config.prompt_length
        True
        >>> llama, _ = tiny_model("llama")
        >>> probe_prefix_positions(llama, discover(llama))
        0
    """
    arch.prefix_positions = 0
    seen: list[torch.Tensor | None] = []

    def on_layer(mod, args, kwargs):
        x = _first_tensor(args) if args else kwargs.get("hidden_states")
        seen.append(x.detach().clone() if isinstance(x, torch.Tensor) else None)

    ids = probe_ids(model)
    with Probe(model) as probe:
        probe.pre_hook(model.get_submodule(arch.layers_path)[0], on_layer, with_kwargs=True, stop=True)
        for other in (False, True):
            probe.run(probe_ids(model, other=other))
    if len(seen) != 2 or seen[0] is None or seen[1] is None or seen[0].dim() != 3 or seen[0].shape != seen[1].shape:
        return 0
    extra = seen[0].shape[1] - ids.shape[-1]  # (batch, positions, hidden)
    if extra > 0 and torch.equal(seen[0][:, :extra], seen[1][:, :extra]) and not torch.equal(
        seen[0][:, extra:], seen[1][:, extra:]
    ):
        arch.prefix_positions = extra
    return arch.prefix_positions


@torch.no_grad()
def probe_residual_streams(model: nn.Module, arch: Architecture) -> int:
    """Layers that carry several residual streams, found by data flow (sets ``arch.residual_streams`` and
    ``arch.layer_input_argument``; returns the number of streams side by side).

    * side by side in one tensor: layer 0's input is ``(batch, seq, k * hidden)``, k equal copies of a hidden-wide
      tensor (hyper-connections, Qwen4-Exp: every stream starts as the token embeddings). ``layers_output`` is then
      the whole tensor, as HF's hidden states are, and project_on_vocab takes it (the head merges the streams);
    * one per argument: layer 1 receives layer 0's output (its first tensor, HF's hidden state) through a keyword
      argument other than its first input (Reformer's reversible layers, ``layer(prev_attn_output=...,
      hidden_states=...)``): ``layer_input_argument`` names it, so ``layers_input[i]`` is the stream that
      ``layers_output[i - 1]`` is, and a write to either reaches the same argument.

    Example:
        >>> from unilens.testing import tiny_model
        >>> hf, _ = tiny_model("qwen4_exp_text")
        >>> arch = discover(hf)
        >>> probe_residual_streams(hf, arch), arch.layer_input_argument
        (2, None)
        >>> hf, _ = tiny_model("reformer")
        >>> arch = discover(hf)
        >>> probe_residual_streams(hf, arch), arch.layer_input_argument
        (1, 'hidden_states')
    """
    arch.residual_streams, arch.layer_input_argument = 1, None
    if arch.layer_input_path is not None or not arch.residual_layout.is_standard:
        return 1  # parallel layer lists (XLM) or another layout (XLNet, ProphetNet): one stream in its own place
    layers = model.get_submodule(arch.layers_path)
    inputs: list[tuple[tuple, dict]] = []  # (args, kwargs) of layer 0, then of layer 1
    first_output: list[torch.Tensor | None] = []

    def on_input(mod, args, kwargs) -> None:
        inputs.append((args, dict(kwargs)))

    def on_output(mod, args, out) -> None:
        first_output.append(_first_tensor(out))

    with Probe(model) as probe:
        probe.pre_hook(layers[0], on_input, with_kwargs=True)
        probe.forward_hook(layers[0], on_output)
        if len(layers) > 1:
            probe.pre_hook(layers[1], on_input, with_kwargs=True, stop=True)
        probe.run()
    if not inputs:
        return 1
    args, kwargs = inputs[0]
    x = _first_tensor(args) if args else _first_tensor(list(kwargs.values()))  # (batch, seq, k * hidden)
    table = getattr(model.get_submodule(arch.embed_path), "weight", None)
    hidden = table.shape[-1] if isinstance(table, torch.Tensor) else None
    if hidden and isinstance(x, torch.Tensor) and x.dim() == 3 and x.shape[-1] > hidden and x.shape[-1] % hidden == 0:
        streams = x.unflatten(-1, (x.shape[-1] // hidden, hidden))  # (batch, seq, k, hidden)
        if all(torch.equal(streams[..., 0, :], streams[..., k, :]) for k in range(1, streams.shape[-2])):
            arch.residual_streams = streams.shape[-2]
    if len(inputs) < 2 or not first_output or first_output[0] is None:
        return arch.residual_streams
    out, (args, kwargs) = first_output[0], inputs[1]
    first = _first_tensor(args) if args else _first_tensor(list(kwargs.values()))
    if isinstance(first, torch.Tensor) and _same(first, out):
        return arch.residual_streams  # the usual case: the residual stream is the first input
    arch.layer_input_argument = next(
        (name for name, value in kwargs.items() if isinstance(value, torch.Tensor) and _same(value, out)), None
    )
    return arch.residual_streams


def _wider_head(arch: Architecture, final: torch.Tensor | None, unembed_input: torch.Tensor) -> str | None:
    """Why project_on_vocab is refused where the unembedding reads a wider tensor than the last layer's output and no
    module takes one to the other (Reformer: its final norm and unembedding read both reversible streams, concatenated
    by functional code, while the layer's output is one of them, HF's hidden state), else None."""
    if final is None or final.shape[-1] == unembed_input.shape[-1]:
        return None
    return (f"{arch.model_type}: the unembedding ({arch.lm_head_path}) reads a {unembed_input.shape[-1]}-wide tensor "
            f"that the model's forward builds from more than the last layer's {final.shape[-1]}-wide output (HF's "
            "hidden state), e.g. another residual stream concatenated beside it, with no module that merges them, so "
            "project_on_vocab of a layer's output cannot reproduce the model's logits; read model.logits.")


def _other_stream_head(arch: Architecture, unembed_input: torch.Tensor) -> str | None:
    """Why project_on_vocab is refused where the layers carry several streams and the unembedding reads another
    one than the residual stream (ProphetNet's logits are its first n-gram prediction stream's), else None."""
    if arch.residual_layout.kind != LEADING_STREAM:
        return None
    return (f"{arch.model_type}: the unembedding ({arch.lm_head_path}) reads the layers' other streams (input shape "
            f"{tuple(unembed_input.shape)}: the prediction streams after the first, residual one), not the residual "
            "stream, so project_on_vocab of a layer's output cannot reproduce the model's logits; read model.logits.")


@torch.no_grad()
def probe_residual_layout(model: nn.Module, arch: Architecture) -> ResidualLayout:
    """How the residual stream lies in the layers' tensors, found by data flow (sets and returns
    ``arch.residual_layout``; ``unilens.core.layouts``).

    On the probe ids ``(1, 4)``, a layer 0 input of shape ``(1, 4, hidden)`` is the standardized view. Any other
    3-D shape that fits a known layout (``(4, 1, hidden)``: sequence first; ``(1, k * 4, hidden)``: k streams along
    the sequence) is taken only when that layout's view of it is exactly HF's ``hidden_states[0]`` (HF's own
    reading of its layers' tensors); else the layout stays ``batch_first`` and the load check reports what differs.

    Example:
        >>> from unilens.testing import tiny_model
        >>> hf, _ = tiny_model("xlnet")
        >>> probe_residual_layout(hf, discover(hf)).kind
        'seq_first'
        >>> llama, _ = tiny_model("llama")
        >>> probe_residual_layout(llama, discover(llama)).kind
        'batch_first'
    """
    arch.residual_layout = ResidualLayout()
    first = model.get_submodule(arch.layer_input_path or arch.layers_path)[0]
    seen: list[torch.Tensor | None] = []

    def on_layer(mod, args, kwargs):
        seen.append(_first_tensor(args) if args else _first_tensor(list(kwargs.values())))

    ids = probe_ids(model)  # (1, 4)
    batch, seq = ids.shape
    with Probe(model) as probe:
        probe.pre_hook(first, on_layer, with_kwargs=True, stop=True)
        probe.run(ids)
    x = seen[0] if seen else None
    if x is None or x.dim() != 3 or tuple(x.shape[:2]) == (batch, seq):
        return arch.residual_layout  # the usual (batch, seq, hidden), or a tensor no layout describes
    candidates = []
    if tuple(x.shape[:2]) == (seq, batch):
        candidates.append(ResidualLayout(SEQ_FIRST))
    if x.shape[0] == batch and x.shape[1] > seq and x.shape[1] % seq == 0:
        candidates.append(ResidualLayout(LEADING_STREAM, streams=x.shape[1] // seq))
    if not candidates:
        return arch.residual_layout
    try:
        hidden_states = model(input_ids=ids, output_hidden_states=True).hidden_states
    except Exception:  # noqa: BLE001 - no hidden states to read the layout from: the load check will tell
        return arch.residual_layout
    if not hidden_states or not isinstance(hidden_states[0], torch.Tensor):
        return arch.residual_layout
    for layout in candidates:
        view = layout.to_residual(x)
        if view.shape == hidden_states[0].shape and torch.equal(view, hidden_states[0]):
            arch.residual_layout = layout
            break
    return arch.residual_layout


def _position_candidates(model: nn.Module, arch: Architecture) -> list[str]:
    """Embedding tables outside the layer stack other than the token embedding, as wide as the hidden size."""
    embed = model.get_submodule(arch.embed_path)
    hidden = embed.weight.shape[-1]
    layers_prefix = arch.layers_path + "."
    out = []
    for name, module in model.named_modules():
        if not name or module is embed or name == arch.layers_path or name.startswith(layers_prefix):
            continue
        weight = getattr(module, "weight", None)
        is_table = isinstance(module, nn.Embedding) or "embed" in type(module).__name__.lower()
        if is_table and isinstance(weight, nn.Parameter) and weight.dim() == 2 and weight.shape[-1] == hidden:
            out.append(name)  # rotary "embeddings" hold no table (an inv_freq buffer): never candidates
    return out


@torch.no_grad()
def probe_position_embedding(model: nn.Module, arch: Architecture) -> str | None:
    """The learned absolute position embedding, found by data flow (sets and returns ``arch.position_embed_path``).

    A candidate (``_position_candidates``) qualifies when its output differs between positions but not between
    token ids (a position table, not a token-type or second token table), and adding a random tensor ``delta`` to
    its output changes layer 0's input by exactly ``delta``: its output is added, unscaled, to the (scaled) token
    embeddings before the first layer (GPT-2 ``wte(ids) + wpe(pos)``, OPT ``embed_tokens(ids) * scale +
    embed_positions(mask)``).

    Example:
        >>> from unilens.testing import tiny_model
        >>> hf, _ = tiny_model("gpt2")
        >>> probe_position_embedding(hf, discover(hf))
        'transformer.wpe'
        >>> llama, _ = tiny_model("llama")
        >>> probe_position_embedding(llama, discover(llama)) is None  # rotary: no position tensor
        True
    """
    arch.position_embed_path = None
    candidates = _position_candidates(model, arch)
    if not candidates:
        return None
    first_layer = model.get_submodule(arch.layers_path)[0]
    ids = probe_ids(model)
    generator = torch.Generator().manual_seed(0)
    for name in candidates:
        module = model.get_submodule(name)
        seen: list[torch.Tensor] = []
        deltas: list[torch.Tensor] = []

        def on_output(mod, args, out):
            if not deltas or not isinstance(out, torch.Tensor):
                return None
            return out + deltas[0].to(out.device, out.dtype).expand_as(out)

        def on_layer(mod, args, kwargs):
            x = _first_tensor(args) if args else kwargs.get("hidden_states")
            seen.append(x.detach().clone() if isinstance(x, torch.Tensor) else None)

        outputs: list[torch.Tensor] = []
        with Probe(model) as probe:
            probe.forward_hook(module, lambda mod, a, out: outputs.append(out) if isinstance(out, torch.Tensor) else None)
            probe.forward_hook(module, on_output)
            probe.pre_hook(first_layer, on_layer, with_kwargs=True, stop=True)
            for step in ("plain", "other tokens", "perturbed"):
                if step == "perturbed":
                    if len(outputs) != 2 or outputs[0].dim() != 3:
                        break
                    deltas.append(torch.randn(outputs[0].shape, generator=generator))
                probe.run(ids if step != "other tokens" else probe_ids(model, other=True))
        if len(seen) != 3 or any(x is None for x in seen) or seen[0].shape != seen[2].shape:
            continue
        # a position embedding depends on the position, not on the tokens (unlike a token-type or second token table)
        if not torch.equal(outputs[0], outputs[1]) or torch.equal(outputs[0][..., 0, :], outputs[0][..., 1, :]):
            continue
        seen = [seen[0], seen[2]]
        delta = deltas[0].to(seen[0].device, torch.float32)
        change = (seen[1] - seen[0]).float()
        if delta.shape[0] == 1:
            delta = delta.expand_as(change) if delta.dim() == change.dim() else delta
        if change.shape == delta.shape and torch.allclose(change, delta, atol=1e-3 * (1 + float(delta.abs().max()))):
            arch.position_embed_path = name
            return name
    return None
