"""nnterp's `nnsight_utils` functions (same names, arguments and shapes) on unilens's standardized view.

Code written as ``from nnterp.nnsight_utils import get_layer_output`` runs with ``from unilens.nnsight_utils import
get_layer_output``. Where nnterp's behaviour is a bug, these keep the correct one (docs/coming-from-nnterp.md lists it):
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

from typing import Any, Callable, Sequence

import torch

from ..arch.discovery import ModuleMap, discover, probe_dataflow
from ..core.protocol import StandardizedModel
from ..core.tensors import last_real_positions, rows_position
from .nnterp import apply_rename_config, resolve_rename_options

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
GetModuleOutput = Callable[["StandardizedModel", int], torch.Tensor]


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
            probe_dataflow(model, architecture)  # the final norm, settled by data flow
            apply_rename_config(model, architecture, config, after_probe=True)
        super().__init__(model, architecture)

    def get_attention(self, layer: int):
        """The attention module of decoder layer ``layer``."""
        return super().get_attention(layer)

    def get_mlp(self, layer: int):
        """The MLP module of decoder layer ``layer``."""
        return super().get_mlp(layer)

    @property
    def embed_tokens(self):
        return self.get_embed_tokens()

    @property
    def ln_final(self):
        return self.get_unembed_norm()

    @property
    def lm_head(self):
        return self.get_unembed()


def _standardized(model: Any) -> "StandardizedModel":
    if not isinstance(model, StandardizedModel):
        raise TypeError(
            f"unilens.nnsight_utils works on a unilens.StandardizedTransformer, got {type(model).__name__}; wrap the "
            "model first: StandardizedTransformer(hf_model, tokenizer=tokenizer)."
        )
    return model


def get_embed_tokens(model: "StandardizedModel"):
    """The token embedding module (an nnsight envoy)."""
    return _standardized(model).embed_tokens


def get_layers(model: "StandardizedModel"):
    """The decoder layers (nnsight envoys), indexable and iterable."""
    return _standardized(model).layers


def get_num_layers(nn_model: "StandardizedModel") -> int:
    """The number of decoder layers."""
    return _standardized(nn_model).num_layers


def get_layer(nn_model: "StandardizedModel", layer: int):
    """Decoder layer ``layer`` (an nnsight envoy)."""
    return get_layers(nn_model)[layer]


def get_layer_input(nn_model: "StandardizedModel", layer: int) -> torch.Tensor:
    """Inside a trace: the residual stream entering layer ``layer``, ``(batch, seq, hidden)``."""
    return _standardized(nn_model).layers_input[layer]


def get_layer_output(nn_model: "StandardizedModel", layer: int) -> torch.Tensor:
    """Inside a trace: the residual stream after layer ``layer``, ``(batch, seq, hidden)``."""
    return _standardized(nn_model).layers_output[layer]


def get_attention(nn_model: "StandardizedModel", layer: int):
    """The attention module of layer ``layer`` (an nnsight envoy)."""
    return _standardized(nn_model).attentions[layer]


def get_attention_output(nn_model: "StandardizedModel", layer: int) -> torch.Tensor:
    """Inside a trace: the attention branch's output of layer ``layer`` (never including the residual)."""
    return _standardized(nn_model).attentions_output[layer]


def get_mlp(nn_model: "StandardizedModel", layer: int):
    """The MLP module of layer ``layer`` (an nnsight envoy)."""
    return _standardized(nn_model).mlps[layer]


def get_mlp_output(nn_model: "StandardizedModel", layer: int) -> torch.Tensor:
    """Inside a trace: the MLP branch's output of layer ``layer``."""
    return _standardized(nn_model).mlps_output[layer]


def get_logits(nn_model: "StandardizedModel") -> torch.Tensor:
    """Inside a trace: the logits ``(batch, seq, vocab)``."""
    return _standardized(nn_model).logits


def get_unembed_norm(nn_model: "StandardizedModel"):
    """The final norm before the unembedding (an nnsight envoy)."""
    return _standardized(nn_model).ln_final


def get_unembed(nn_model: "StandardizedModel"):
    """The unembedding (lm_head, an nnsight envoy)."""
    return _standardized(nn_model).lm_head


def project_on_vocab(nn_model: "StandardizedModel", h: torch.Tensor) -> torch.Tensor:
    """Final norm + unembedding of hidden states ``(..., hidden)`` -> logits ``(..., vocab)``."""
    return _standardized(nn_model).project_on_vocab(h)


def get_next_token_probs(nn_model: "StandardizedModel") -> torch.Tensor:
    """Inside a trace: next-token probabilities ``(batch, vocab)`` at each row's last real token."""
    return _standardized(nn_model).next_token_probs


def set_layer_output(nn_model: "StandardizedModel", layer: int, tensor: torch.Tensor) -> None:
    """Inside a trace: replace the residual stream after layer ``layer`` (shape-checked)."""
    _standardized(nn_model).layers_output[layer] = tensor


def _select(model: "StandardizedModel", value: torch.Tensor, idx: int) -> torch.Tensor:
    """``value[:, idx]`` where a negative ``idx`` counts from each row's last real token (either padding side). An
    ``idx`` that is not a real token of every row (beyond a short row's start, or a padding column) is refused
    (``ValueError`` naming the row), not clamped to token 0 or read from padding."""
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
    nn_model: "StandardizedModel",
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
    model = _standardized(nn_model)
    if tracer is None and prompts is None:
        raise ValueError("pass prompts, or call this inside a trace with tracer=")
    if remote and not model.__dict__.get("_remote_mode"):
        raise NotImplementedError("remote=True needs a model loaded in remote mode, StandardizedTransformer(repo_id, "
                                  "remote=True): its traces all run remotely (docs/remote.md).")
    get_activations = get_activations or get_layer_output
    idx = -1 if idx is None else idx
    n = model.num_layers
    layers = list(range(n)) if layers is None else [layer % n for layer in layers]
    # read in forward order (nnsight's rule), return in the order asked
    order = sorted(range(len(layers)), key=lambda k: layers[k])
    if tracer is not None:
        acts: list[Any] = [None] * len(layers)
        for k in order:
            acts[k] = _select(model, get_activations(model, layers[k]), idx)
        return torch.stack(acts)
    saved: dict[int, torch.Tensor] = {}  # built outside the trace: only saved values leave it
    with torch.no_grad(), model.trace(prompts):
        for k in order:
            saved[k] = _select(model, get_activations(model, layers[k]), idx).cpu().save()
    return torch.stack([saved[k] for k in range(len(layers))])


def collect_token_activations_batched(
    nn_model: "StandardizedModel",
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
    nn_model: "StandardizedModel",
    prompts: Sequence[str],
    batch_size: int,
    layers: Sequence[int] | None = None,
    get_activations: GetModuleOutput | None = None,
    remote: bool = False,
    idx: int | None = None,
) -> torch.Tensor:
    """nnterp's session variant of ``collect_token_activations_batched`` (same result)."""
    return collect_token_activations_batched(nn_model, prompts, batch_size, layers, get_activations, remote, idx)


def compute_next_token_probs(nn_model: "StandardizedModel", prompt: str | Sequence[str],
                             remote: bool = False) -> torch.Tensor:
    """Next-token probabilities ``(batch, vocab)`` of ``prompt`` at each row's last real token, on the CPU."""
    model = _standardized(nn_model)
    if remote and not model.__dict__.get("_remote_mode"):
        raise NotImplementedError("remote=True needs a model loaded in remote mode, StandardizedTransformer(repo_id, "
                                  "remote=True): its traces all run remotely (docs/remote.md).")
    saved: dict[str, torch.Tensor] = {}
    with torch.no_grad(), model.trace(prompt):
        saved["probs"] = model.next_token_probs.cpu().save()
    return saved["probs"]
