"""nnterp's `nnsight_utils` functions (same names, arguments and shapes) on unilens's standardized view.

Code written as ``from nnterp.nnsight_utils import get_layer_output`` runs with ``from unilens.nnsight_utils import
get_layer_output``. Each function takes a ``StandardizedTransformer`` (the standardized accessors: plain
``(batch, seq, hidden)`` tensors, checked) or, as nnterp's do, any nnsight model, e.g. a plain ``LanguageModel``
loaded with ``rename=get_rename_dict()``: its modules are found by nnterp's names (``layers`` / ``model.layers``,
``self_attn``, ``mlp``, ``ln_final`` / ``model.norm``, ``lm_head``), else by unilens's discovery of the wrapped HF
model, and read as nnterp reads them (a module's output, its first element when a tuple).
Where nnterp's behaviour is a bug, these keep the correct one (docs/coming-from-nnterp.md lists it):
``get_next_token_probs`` reads each row's last real token under either padding side (nnterp reads the last
position, a pad under right padding), and a negative ``idx`` in ``get_token_activations`` counts from each row's
last real token under right padding too (nnterp refuses it).

Example:
    >>> from unilens import StandardizedTransformer
    >>> from unilens.testing import tiny_model
    >>> model = StandardizedTransformer(*tiny_model("llama"), check=False)
    >>> acts = get_token_activations(model, ["The capital of France is", "Hi"])
    >>> tuple(acts.shape) == (model.num_layers, 2, model.hidden_size)
    True
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Sequence

import torch
from nnsight import NNsight
from torch import nn

from ..arch.discovery import Architecture, ArchitectureError, ModuleMap, discover, probe_dataflow
from ..core.protocol import StandardizedModel
from ..core.tensors import last_real_positions, rows_position
from .nnterp import apply_rename_config, get_rename_dict, resolve_rename_options

__all__ = [
    "GetModuleOutput",
    "ModuleAccessor",
    "collect_last_token_activations_session",
    "collect_token_activations_batched",
    "compute_next_token_probs",
    "get_attention",
    "get_attention_output",
    "get_embed_tokens",
    "get_layer",
    "get_layer_input",
    "get_layer_output",
    "get_layers",
    "get_logits",
    "get_mlp",
    "get_mlp_output",
    "get_next_token_probs",
    "get_num_layers",
    "get_token_activations",
    "get_unembed",
    "get_unembed_norm",
    "project_on_vocab",
    "set_layer_output",
]

# (model, layer) -> the tensor to collect, read inside a trace (nnterp's GetModuleOutput)
GetModuleOutput = Callable[[Any, int], torch.Tensor]


class ModuleAccessor(ModuleMap):
    """Plain torch modules of an HF model under the standardized names (no nnsight): nnterp's
    ``ModuleAccessor(model, rename_config=None, rename=None)``; a RenameConfig / ``rename`` dict steers discovery
    as in ``StandardizedTransformer``.

    Example:
        >>> from unilens.testing import tiny_model
        >>> hf, _ = tiny_model("gpt2")
        >>> acc = ModuleAccessor(hf)
        >>> acc.get_attention(0) is hf.transformer.h[0].attn, acc.ln_final is hf.transformer.ln_f
        (True, True)
    """

    def __init__(self, model: Any, rename_config: Any = None, rename: dict[str, str] | None = None,
                 architecture: Any = None):
        if architecture is None:
            config, _ = resolve_rename_options(rename_config, rename, {})
            architecture = apply_rename_config(model, discover(model), config)
            # the final norm, settled by data flow; a model on the meta device (nnsight's lazy load) cannot run, so
            # its structure alone decides, as nnterp's renaming does
            if not any(p.is_meta for p in model.parameters()):
                probe_dataflow(model, architecture)
            apply_rename_config(model, architecture, config, after_probe=True)
        super().__init__(model, architecture)

    def get_attention(self, layer: int):
        """The attention module of decoder layer ``layer``."""
        return super().get_attention(layer)

    def get_mlp(self, layer: int):
        """The MLP module of decoder layer ``layer``."""
        return super().get_mlp(layer)

    @property
    def nn_model(self) -> Any:
        """The HF model wrapped by nnsight under the standardized names (nnterp's ``ModuleAccessor.nn_model``),
        built on first use."""
        wrapped = self.__dict__.get("_nn_model")
        if wrapped is None:
            wrapped = self.__dict__["_nn_model"] = NNsight(self.model, rename=get_rename_dict(
                model=self.model, architecture=self.architecture))
        return wrapped

    def __getattr__(self, name: str) -> nn.Module:
        """nnterp's fallback: ``accessor.<name>`` is the module ``nn_model.<name>`` names (an AttributeError when
        that is no module)."""
        if name.startswith("_") or name in ("model", "architecture"):
            raise AttributeError(name)
        value = getattr(self.nn_model, name)
        if not isinstance(getattr(value, "_module", None), nn.Module):
            raise AttributeError(f"Attribute {name} is not a module")
        return value._module

    @property
    def embed_tokens(self):
        return self.get_embed_tokens()

    @property
    def ln_final(self):
        return self.get_unembed_norm()

    @property
    def lm_head(self):
        return self.get_unembed()


def _is_standardized(model: Any) -> bool:
    return isinstance(model, StandardizedModel)


# a plain nnsight model's discovered architecture, per wrapped HF module (structure only: no forward, so a model
# nnsight loaded lazily on the meta device is found without dispatching it)
_PLAIN_ARCHITECTURES: "weakref.WeakKeyDictionary[nn.Module, Architecture]" = weakref.WeakKeyDictionary()


def _hf_module(model: Any) -> nn.Module:
    module = getattr(model, "_module", None)
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"unilens.nnsight_utils works on a unilens.StandardizedTransformer or an nnsight model (LanguageModel, "
            f"NNsight), got {type(model).__name__}; wrap the model first: StandardizedTransformer(hf_model, "
            "tokenizer=tokenizer)."
        )
    return module


def _plain_architecture(model: Any) -> Architecture:
    module = _hf_module(model)
    arch = _PLAIN_ARCHITECTURES.get(module)
    if arch is None:
        arch = _PLAIN_ARCHITECTURES[module] = discover(module)
    return arch


def _named(envoy: Any, *paths: str) -> Any:
    """The envoy at the first of ``paths`` (dotted, nnterp's standardized names) that ``envoy`` has, else None."""
    for path in paths:
        node = envoy
        try:
            for part in path.split("."):
                node = getattr(node, part)
        except AttributeError:
            continue
        if hasattr(node, "_module"):
            return node
    return None


def _at(envoy: Any, path: str) -> Any:
    """The envoy at a dotted path of the wrapped module (its own names: a renamed model keeps them too)."""
    node = envoy
    for part in path.split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node


def _unpack(value: Any) -> Any:
    """nnterp's ``unpack_tuple``: a module's output, its first element when it is a tuple."""
    return value[0] if isinstance(value, tuple) else value


def get_embed_tokens(model: Any):
    """The token embedding module (an nnsight envoy)."""
    if _is_standardized(model):
        return model.embed_tokens
    return _named(model, "embed_tokens", "model.embed_tokens") or _at(model, _plain_architecture(model).embed_path)


def get_layers(model: Any):
    """The decoder layers (nnsight envoys), indexable and iterable.

    Example:
        >>> from nnsight import LanguageModel
        >>> from unilens.testing import tiny_model
        >>> hf, tok = tiny_model("gpt2")
        >>> plain = LanguageModel(hf, tokenizer=tok, rename=get_rename_dict())   # nnterp's renamed plain model
        >>> get_layers(plain)._module is hf.transformer.h, get_num_layers(plain)
        (True, 2)
    """
    if _is_standardized(model):
        return model.layers
    layers = _named(model, "layers", "model.layers")
    return layers if layers is not None else _at(model, _plain_architecture(model).layers_path)


def get_num_layers(nn_model: Any) -> int:
    """The number of decoder layers."""
    if _is_standardized(nn_model):
        return nn_model.num_layers
    return len(get_layers(nn_model))


def get_layer(nn_model: Any, layer: int):
    """Decoder layer ``layer`` (an nnsight envoy)."""
    return get_layers(nn_model)[layer]


def _layer_part(nn_model: Any, layer: int, name: str, part: str) -> Any:
    """A plain model's attention (``name="self_attn"``) or MLP of ``layer``: nnterp's name, else discovery's."""
    envoy = get_layer(nn_model, layer)
    found = _named(envoy, name)
    if found is not None:
        return found
    arch = _plain_architecture(nn_model)
    path = getattr(arch.layers[layer % arch.num_layers], part)
    if path is None:
        raise ArchitectureError(f"layer {layer} of this {arch.model_type} model has no single {part} module.")
    return _at(envoy, path)


def get_layer_input(nn_model: Any, layer: int) -> torch.Tensor:
    """Inside a trace: the residual stream entering layer ``layer``, ``(batch, seq, hidden)``."""
    if _is_standardized(nn_model):
        return nn_model.layers_input[layer]
    return get_layer(nn_model, layer).input


def get_layer_output(nn_model: Any, layer: int) -> torch.Tensor:
    """Inside a trace: the residual stream after layer ``layer``, ``(batch, seq, hidden)``."""
    if _is_standardized(nn_model):
        return nn_model.layers_output[layer]
    return _unpack(get_layer(nn_model, layer).output)


def get_attention(nn_model: Any, layer: int):
    """The attention module of layer ``layer`` (an nnsight envoy)."""
    if _is_standardized(nn_model):
        return nn_model.attentions[layer]
    return _layer_part(nn_model, layer, "self_attn", "attention")


def get_attention_output(nn_model: Any, layer: int) -> torch.Tensor:
    """Inside a trace: the attention branch's output of layer ``layer`` (on a StandardizedTransformer never
    including the residual; on a plain model the attention module's output, as nnterp reads it)."""
    if _is_standardized(nn_model):
        return nn_model.attentions_output[layer]
    return _unpack(get_attention(nn_model, layer).output)


def get_mlp(nn_model: Any, layer: int):
    """The MLP module of layer ``layer`` (an nnsight envoy)."""
    if _is_standardized(nn_model):
        return nn_model.mlps[layer]
    return _layer_part(nn_model, layer, "mlp", "mlp")


def get_mlp_output(nn_model: Any, layer: int) -> torch.Tensor:
    """Inside a trace: the MLP branch's output of layer ``layer``."""
    if _is_standardized(nn_model):
        return nn_model.mlps_output[layer]
    return _unpack(get_mlp(nn_model, layer).output)


def get_logits(nn_model: Any) -> torch.Tensor:
    """Inside a trace: the logits ``(batch, seq, vocab)``."""
    if _is_standardized(nn_model):
        return nn_model.logits
    return nn_model.output.logits


def get_unembed_norm(nn_model: Any):
    """The final norm before the unembedding (an nnsight envoy)."""
    if _is_standardized(nn_model):
        return nn_model.ln_final
    found = _named(nn_model, "ln_final", "model.ln_final", "model.norm")
    if found is not None:
        return found
    path = _plain_architecture(nn_model).final_norm_path
    if path is None:
        raise ArchitectureError("this model has no final norm before its unembedding.")
    return _at(nn_model, path)


def get_unembed(nn_model: Any):
    """The unembedding (lm_head, an nnsight envoy)."""
    if _is_standardized(nn_model):
        return nn_model.lm_head
    return _named(nn_model, "lm_head") or _at(nn_model, _plain_architecture(nn_model).lm_head_path)


def project_on_vocab(nn_model: Any, h: torch.Tensor) -> torch.Tensor:
    """Final norm + unembedding of hidden states ``(..., hidden)`` -> logits ``(..., vocab)``."""
    if _is_standardized(nn_model):
        return nn_model.project_on_vocab(h)
    return get_unembed(nn_model)(get_unembed_norm(nn_model)(h))


def get_next_token_probs(nn_model: Any) -> torch.Tensor:
    """Inside a trace: next-token probabilities ``(batch, vocab)`` at each row's last real token (a plain model:
    at the last position, as nnterp reads it; with left padding that is each row's last token)."""
    if _is_standardized(nn_model):
        return nn_model.next_token_probs
    return get_logits(nn_model)[:, -1, :].softmax(-1)


def set_layer_output(nn_model: Any, layer: int, tensor: torch.Tensor) -> None:
    """Inside a trace: replace the residual stream after layer ``layer`` (shape-checked on a StandardizedTransformer)."""
    if _is_standardized(nn_model):
        nn_model.layers_output[layer] = tensor
        return
    envoy = get_layer(nn_model, layer)
    output = envoy.output
    envoy.output = (tensor, *output[1:]) if isinstance(output, tuple) else tensor


def _select(model: Any, value: torch.Tensor, idx: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``value[:, idx]`` where a negative ``idx`` counts from each row's last real token (either padding side). An
    ``idx`` that is not a real token of every row (beyond a short row's start, or a padding column) is refused
    (``ValueError`` naming the row), not clamped to token 0 or read from padding. ``mask``: the batch's attention
    mask where the caller tokenized it (a plain nnsight model); else a StandardizedTransformer's running forward's."""
    if mask is None and _is_standardized(model):
        mask = model.attention_mask  # this forward's (read after the value: the forward is running)
    batch, seq = value.shape[:2]
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[0] == batch and mask.shape[1] >= seq:
        real = mask[:, mask.shape[1] - seq:].bool().cpu()
    else:  # no padding in this forward
        real = torch.ones(batch, seq, dtype=torch.bool)
    right_padded = bool(seq) and not bool(real[:, -1].all())
    if idx < 0 and right_padded:
        columns = last_real_positions(real.long()) + 1 + idx
    else:
        columns = torch.full((batch,), idx if idx >= 0 else seq + idx)
    for row in range(batch):
        column = int(columns[row])
        if not (0 <= column < seq and bool(real[row, column])):
            count = int(real[row].sum())
            padding = f" ({'right' if right_padded else 'left'}-padded to {seq})" if count < seq else ""
            raise ValueError(
                f"get_token_activations: idx={idx} is not a token of prompt {row}, which has {count} token"
                f"{'s' if count != 1 else ''}{padding}; pass an idx every prompt has (negative counts from each "
                f"prompt's last token: -1 is the last)."
            )
    index = rows_position(mask, idx)  # (batch,), or None: plain indexing is right
    if index is None:
        return value[:, idx]
    return value[torch.arange(value.shape[0], device=value.device), index.to(value.device)]


def get_token_activations(
    nn_model: Any,
    prompts: str | Sequence[str] | None = None,
    layers: Sequence[int] | None = None,
    get_activations: GetModuleOutput | None = None,
    remote: bool = False,
    idx: int | None = None,
    tracer: Any = None,
) -> torch.Tensor:
    """The activation at token ``idx`` (default the last real one) of each prompt at each of ``layers`` (default
    all), ``(len(layers), num_prompts, hidden)`` on the CPU; ``get_activations(model, layer)`` picks the tensor
    (default the layer output). Inside an open trace, pass ``tracer=`` and no prompts (the values are not saved).
    """
    model = nn_model
    if tracer is None and prompts is None:
        raise ValueError("pass prompts, or call this inside a trace with tracer=")
    trace_kwargs = _remote_kwargs(model, remote)
    get_activations = get_activations or get_layer_output
    idx = -1 if idx is None else idx
    n = get_num_layers(model)
    layers = list(range(n)) if layers is None else [layer % n for layer in layers]
    # read in forward order (nnsight's rule), return in the order asked
    order = sorted(range(len(layers)), key=lambda k: layers[k])
    if tracer is not None:
        acts: list[Any] = [None] * len(layers)
        for k in order:
            acts[k] = _select(model, get_activations(model, layers[k]), idx)
        return torch.stack(acts)
    batch, mask = _batch(model, prompts)
    saved: dict[int, torch.Tensor] = {}  # built outside the trace: only saved values leave it
    with torch.no_grad(), model.trace(batch, **trace_kwargs):
        for k in order:
            saved[k] = _select(model, get_activations(model, layers[k]), idx, mask).cpu().save()
    return torch.stack([saved[k] for k in range(len(layers))])


def _remote_kwargs(model: Any, remote: bool) -> dict[str, Any]:
    """``remote=`` of nnterp's functions: a StandardizedTransformer runs remotely only in remote mode; a plain
    nnsight model gets nnsight's own ``remote=True``."""
    if not remote:
        return {}
    if _is_standardized(model):
        if not model.__dict__.get("_remote_mode"):
            raise NotImplementedError("remote=True needs a model loaded in remote mode, StandardizedTransformer("
                                      "repo_id, remote=True): its traces all run remotely (docs/remote.md).")
        return {}
    return {"remote": True}


def _batch(model: Any, prompts: str | Sequence[str]) -> tuple[Any, torch.Tensor | None]:
    """What to trace, and its attention mask where this function tokenizes (a plain nnsight model: the mask is
    not readable from the model inside the trace); a StandardizedTransformer tokenizes and tracks it itself."""
    if _is_standardized(model):
        return prompts, None
    _hf_module(model)  # an nnsight model, or a TypeError that says what to pass
    enc = model.tokenizer([prompts] if isinstance(prompts, str) else list(prompts), padding=True,
                          return_tensors="pt")
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    return batch, enc["attention_mask"]


def collect_token_activations_batched(
    nn_model: Any,
    prompts: Sequence[str],
    batch_size: int,
    layers: Sequence[int] | None = None,
    get_activations: GetModuleOutput | None = None,
    remote: bool = False,
    idx: int | None = None,
    tqdm: Callable | None = None,
    use_session: bool = True,
) -> torch.Tensor:
    """``get_token_activations`` over ``prompts`` in batches of ``batch_size``: ``(layers, num_prompts, hidden)``.
    ``tqdm``: a progress-bar factory (e.g. ``tqdm.auto.tqdm``). ``use_session`` is accepted for nnterp's signature
    (nnsight sessions only save round trips to a remote server)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    starts = range(0, len(prompts), batch_size)
    if tqdm is not None:
        starts = tqdm(starts)
    acts = [get_token_activations(nn_model, list(prompts[i:i + batch_size]), layers, get_activations, remote, idx)
            for i in starts]
    return torch.cat(acts, dim=1)


def collect_last_token_activations_session(
    nn_model: Any,
    prompts: Sequence[str],
    batch_size: int,
    layers: Sequence[int] | None = None,
    get_activations: GetModuleOutput | None = None,
    remote: bool = False,
    idx: int | None = None,
) -> torch.Tensor:
    """nnterp's session variant of ``collect_token_activations_batched`` (same result)."""
    return collect_token_activations_batched(nn_model, prompts, batch_size, layers, get_activations, remote, idx)


def compute_next_token_probs(nn_model: Any, prompt: str | Sequence[str],
                             remote: bool = False) -> torch.Tensor:
    """Next-token probabilities ``(batch, vocab)`` of ``prompt`` at each row's last real token, on the CPU."""
    model = nn_model
    trace_kwargs = _remote_kwargs(model, remote)
    batch, mask = _batch(model, prompt)
    saved: dict[str, torch.Tensor] = {}
    with torch.no_grad(), model.trace(batch, **trace_kwargs):
        if mask is None:
            saved["probs"] = model.next_token_probs.cpu().save()
        else:  # a plain model: each row's last real token, read from the mask this function tokenized
            saved["probs"] = _select(model, get_logits(model), -1, mask).softmax(-1).cpu().save()
    return saved["probs"]
