"""Direct logit attribution: each component's (embeddings, attention heads, MLPs) contribution to a logit."""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
from torch import nn

from ..arch.discovery import LOGIT_POSTPROCESSING
from ..arch.offload import detached_copy, module_device
from .arguments import _as_index, _encode, _position_list

__all__ = ["direct_logit_attribution"]


def _norm_eps(norm: nn.Module) -> float:
    for name in ("eps", "variance_epsilon", "epsilon", "layer_norm_eps", "norm_eps"):
        value = getattr(norm, name, None)
        if isinstance(value, (int, float)):
            return float(value)
    raise ValueError(
        f"direct_logit_attribution: cannot find the epsilon of the final norm {type(norm).__name__} "
        "(looked for eps / variance_epsilon / epsilon)."
    )


def _frozen_norm(norm: nn.Module | None, x: torch.Tensor):
    """The final norm at ``x`` ``(hidden,)`` as an affine map with its scale frozen: ``y = gain * P(c) / scale + bias``.

    ``P`` subtracts the mean (LayerNorm-like) or is the identity (RMSNorm-like). The gain, bias and
    centering are read by probing the module (so ``1 + weight`` norms and weightless norms work) and the
    map is checked against the module at ``x``. Returns ``(gain, bias, center, scale)`` in float64.
    """
    hidden = x.shape[-1]
    x64 = x.double()
    if norm is None:
        return torch.ones_like(x64), torch.zeros_like(x64), False, 1.0
    device = module_device(norm) if next(norm.parameters(), None) is not None else x.device
    # probed in float64 (a copy without accelerate's hooks, offloaded weights loaded): a bfloat16 norm's own
    # rounding (~4e-3 relative) would otherwise hide its shape
    norm = detached_copy(norm).to(device, torch.float64)

    def run(v: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return norm(v.to(device, torch.float64)[None]).double()[0].to(x.device)

    eps = _norm_eps(norm)
    bias = run(torch.zeros(hidden, dtype=torch.float64, device=x.device))
    probe = torch.randn(hidden, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(x.device)
    center = bool(torch.allclose(run(probe + 3.0) - bias, run(probe) - bias, rtol=1e-3, atol=1e-4))
    if center:  # LayerNorm: a +-1 probe has mean 0 (even hidden) and variance 1
        signs = torch.ones(hidden, dtype=torch.float64, device=x.device)
        signs[1::2] = -1.0
        signs -= signs.mean()
        var = signs.pow(2).mean()
        gain = (run(signs) - bias) * torch.sqrt(var + eps) / signs
        scale = math.sqrt(float(x64.var(unbiased=False)) + eps)
        centered = x64 - x64.mean()
    else:  # RMSNorm: ones have rms 1
        gain = (run(torch.ones(hidden, dtype=torch.float64, device=x.device)) - bias) * math.sqrt(1.0 + eps)
        scale = math.sqrt(float(x64.pow(2).mean()) + eps)
        centered = x64
    rebuilt = gain * centered / scale + bias
    actual = run(x64)
    if not torch.allclose(rebuilt, actual, rtol=1e-3, atol=1e-3 * float(actual.abs().max())):
        raise ValueError(
            f"direct_logit_attribution: the final norm {type(norm).__name__} is neither RMSNorm- nor "
            f"LayerNorm-like (max error {float((rebuilt - actual).abs().max()):.3g} rebuilding it), so its "
            "contributions cannot be split linearly."
        )
    return gain, bias, center, scale


def direct_logit_attribution(
    model, prompt: str, token: int | str, position: int = -1, heads: bool = True
) -> dict[str, torch.Tensor | list[str] | float]:
    """Direct logit attribution: each component's direct contribution to ``token``'s logit at ``position``.

    The final residual is a sum: ``embed`` (``layers_input[0]``) + each layer's attention and MLP output.
    Each part goes straight through the final norm with its scale FROZEN at the value of the full forward
    (``scale = rms(x)`` for RMSNorm, ``std(x)`` for LayerNorm, whose mean-centering is linear and applied per
    part), then through ``W_U[:, token]``: ``contribution(c) = (W_U[:, token] * gain) . P(c) / scale``.
    ``bias`` holds the norm's bias and the unembedding bias terms, so
    ``embed + layers.sum() + bias == logit``. Linear logit scaling is applied to every term; with a
    soft-cap (Gemma 2) the terms add up to the logit BEFORE the soft-cap.

    Returns a dict: ``layers`` ``(2 * n_layers,)`` = [attn 0, mlp 0, attn 1, ...] with ``labels``;
    ``attn``, ``mlp`` ``(n_layers,)``; ``heads`` ``(n_layers, n_heads)`` (per-head output ``z_h @ W_O[h]``)
    and ``head_bias`` ``(n_layers,)`` (the attention output bias, ``heads.sum(-1) + head_bias == attn``);
    ``embed``, ``bias``, ``logit`` (scalars, float64 tensors).

    Example:
        >>> from unilens import StandardizedTransformer
        >>> from unilens.testing import tiny_model
        >>> model = StandardizedTransformer(*tiny_model("llama"))
        >>> dla = direct_logit_attribution(model, "The capital of France is", " Paris")
        >>> total = dla["embed"] + dla["layers"].sum() + dla["bias"]
        >>> bool(torch.isclose(total, dla["logit"], atol=1e-4))
        True
    """
    if not isinstance(prompt, str) and not (isinstance(prompt, (list, tuple)) and len(prompt) == 1):
        raise TypeError(f"direct_logit_attribution takes one prompt string, got {type(prompt).__name__} "
                        f"{prompt!r:.60}; call it once per prompt.")
    token = _token_id(model, token)
    batch = _encode(model, prompt, "prompt")
    (position,) = _position_list(_as_index(position, "position"), batch["input_ids"].shape[1])
    n = model.num_layers
    parts, attn_out, z, final, logits = _read_parts(model, batch, position, heads)
    _check_residual_sum(model, parts, final)
    readout = _Readout.build(model, token, final.to(parts.device))
    contributions = readout(parts)  # (1 + 2n,)
    result: dict[str, torch.Tensor | list[str] | float] = {
        "embed": contributions[0],
        "layers": contributions[1:],
        "labels": [f"L{i} {kind}" for i in range(n) for kind in ("attn", "mlp")],
        "attn": contributions[1::2],
        "mlp": contributions[2::2],
        "bias": readout.bias,
        "logit": _logit_before_softcap(logits[token].double(), model.architecture.logit_postprocessing),
    }
    if heads:
        result["heads"], result["head_bias"] = _head_contributions(model, z, attn_out, readout)
    return result


def _token_id(model, token: int | str):
    """``token`` as a checked vocabulary id (a string must be one token); checked before any forward."""
    if isinstance(token, str):
        ids = model.tokenizer(token, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise ValueError(f"token {token!r} is {len(ids)} tokens {ids}; pass one token (its id or string).")
        token = ids[0]
    elif isinstance(token, bool) or isinstance(token, float) or (
            isinstance(token, torch.Tensor) and (token.numel() != 1 or token.is_floating_point())):
        raise TypeError(f"token must be a token id (int) or a one-token string, got {type(token).__name__} "
                        f"{token!r:.40}; e.g. token=model.tokenizer(' Paris').input_ids[0].")
    else:
        try:
            token = operator.index(token.reshape(()) if isinstance(token, torch.Tensor) else token)
        except TypeError:
            raise TypeError(f"token must be a token id (int) or a one-token string, got {type(token).__name__} "
                            f"{token!r:.40}; e.g. token=model.tokenizer(' Paris').input_ids[0].") from None
    if not 0 <= int(token) < model.vocab_size:
        raise IndexError(f"token id {token} out of range (vocab size {model.vocab_size}).")
    return token


def _read_parts(model, batch: dict[str, torch.Tensor], position: int, heads: bool):
    """One no-grad trace reading the residual's parts at ``position`` (prompt 0).

    Returns ``parts`` ``(1 + 2 * n_layers, hidden)`` float64 = [embed, attn 0, mlp 0, attn 1, ...], the attention
    outputs (``(hidden,)`` each, model dtype), the per-head ``z`` (``(heads, head_dim)`` each; empty without
    ``heads``), the final residual ``(hidden,)`` and the logits ``(vocab,)``.
    """
    n = model.num_layers
    attn_out, mlp_out, z = [], [], []
    with torch.no_grad(), model.trace(batch):
        embed = model.layers_input[0][0, position].save()
        for i in range(n):
            if heads:
                z.append(model.attention_heads[i][0, position].save())  # (heads, head_dim)
            attn_out.append(model.attentions_output[i][0, position].save())  # (hidden,)
            mlp_out.append(model.mlps_output[i][0, position].save())
        final = model.layers_output[n - 1][0, position].save()
        logits = model.logits[0, position].save()
    parts = torch.stack([embed] + [v for pair in zip(attn_out, mlp_out) for v in pair]).double()  # (1+2n, hidden)
    return parts, attn_out, z, final, logits


def _check_residual_sum(model, parts: torch.Tensor, final: torch.Tensor) -> None:
    """Raise unless the final residual ``(hidden,)`` is the sum of ``parts`` ``(1 + 2n, hidden)``, up to rounding."""
    final64 = final.double()
    residual_error = float((parts.sum(0) - final64).abs().max())
    # The model adds its branches to the residual in its own dtype, rounding after every addition; replaying those
    # additions in that dtype reproduces its rounding. Accept either the float32-era rule (1e-3 of the scale) or a
    # replay within 2 units of the dtype's rounding at the residual's scale: bfloat16's spacing at |x| ~ 400 is 2,
    # far above 1e-3 * 400, while a residual scaling or a missed branch is off by a sizeable fraction of |x|.
    replay = parts[0].to(final.dtype)
    for part in parts[1:]:
        replay = replay + part.to(final.dtype)
    scale = float(final64.abs().max())
    replay_error = float((replay.double() - final64).abs().max())
    if residual_error > 1e-3 * scale + 1e-5 and replay_error > 2 * torch.finfo(final.dtype).eps * scale:
        raise ValueError(
            f"direct_logit_attribution: this {model.architecture.model_type} model's final residual is not the sum "
            f"of the embedding and the attention / MLP outputs (max error {residual_error:.3g}); DLA needs a "
            "pre-norm residual stream without residual scaling."
        )


@dataclass
class _Readout:
    """The map from a residual part to its share of one token's logit: the final norm with its scale frozen, the
    unembedding column and the linear logit scaling, ``factor * (W_U[:, token] * gain / scale) . P(c)``."""

    direction: torch.Tensor  # (hidden,) float64: W_U[:, token] * gain / scale
    center: bool  # LayerNorm-like: parts are mean-centered first
    factor: float  # linear logit post-processing (scale / divide); a soft-cap is undone on the logit instead
    bias: torch.Tensor  # float64 scalar: the norm's bias and the unembedding bias, through the same map

    @classmethod
    def build(cls, model, token: int, final: torch.Tensor) -> _Readout:
        """The readout at the full forward's final residual ``final`` ``(hidden,)``, on its device."""
        arch = model.architecture
        if arch.head_chain is None or len(arch.head_chain) > 1 or (
            arch.head_chain and arch.head_chain[0] != arch.final_norm_path
        ):
            raise ValueError(
                f"direct_logit_attribution: this {arch.model_type} model maps the residual to logits through "
                f"{arch.head_chain or arch.head_error}, not a single final norm; DLA through it is not linearizable "
                "here."
            )
        norm = model.module_accessor.get_unembed_norm() if arch.final_norm_path is not None else None
        gain, norm_bias, center, scale = _frozen_norm(norm, final)
        head = model.module_accessor.get_unembed()
        w_u = model.weights.W_U[:, token].detach().double().to(final.device)  # (hidden,)
        head_bias = getattr(head, "bias", None)
        factor = 1.0
        for key, value in arch.logit_postprocessing.items():
            how = LOGIT_POSTPROCESSING[key]
            factor = factor * value if how == "multiply" else factor / value if how == "divide" else factor
        bias = factor * (w_u @ norm_bias)
        if head_bias is not None:
            bias = bias + factor * float(head_bias[token])
        return cls(w_u * gain / scale, center, factor, bias)

    def __call__(self, c: torch.Tensor) -> torch.Tensor:  # (..., hidden) -> (...)
        c = c.double().to(self.direction.device)
        if self.center:
            c = c - c.mean(dim=-1, keepdim=True)
        return self.factor * (c @ self.direction)


def _logit_before_softcap(logit: torch.Tensor, post: dict[str, float]) -> torch.Tensor:
    """The logit with a soft-cap (Gemma 2) undone, the value the contributions add up to; else ``logit``."""
    if any(LOGIT_POSTPROCESSING[key] == "softcap" for key in post):
        cap = next(v for k, v in post.items() if LOGIT_POSTPROCESSING[k] == "softcap")
        logit = cap * torch.atanh((logit / cap).clamp(-1 + 1e-12, 1 - 1e-12))
    return logit


def _head_contributions(
    model, z: list[torch.Tensor], attn_out: list[torch.Tensor], readout: _Readout
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per layer, each head's contribution ``z_h @ W_O[h]`` through ``readout`` ``(n_layers, n_heads)`` and the
    attention output bias's ``(n_layers,)``, checked to add up to the layer's attention output."""
    device = readout.direction.device
    per_head, b_o = [], []
    for i in range(model.num_layers):
        w_o = model.weights[i].W_O.detach().double().to(device)  # (heads, head_dim, hidden)
        vectors = torch.einsum("hd,hdm->hm", z[i].double().to(device), w_o)  # (heads, hidden)
        bias_o = model.weights[i].b_O
        bias_o = torch.zeros_like(vectors[0]) if bias_o is None else bias_o.detach().double().to(vectors.device)
        error = float((vectors.sum(0) + bias_o - attn_out[i].double().to(vectors.device)).abs().max())
        # the projection's output is rounded once to the model's dtype: 1e-3 of the scale in float32, two
        # units of rounding in half precision (bfloat16: 2 * 2**-7 = 1.6 %)
        rtol = max(1e-3, 2 * torch.finfo(attn_out[i].dtype).eps)
        if error > rtol * float(attn_out[i].abs().max()) + 1e-5:
            raise ValueError(
                f"direct_logit_attribution: layer {i}'s heads (z @ W_O + b_O) do not add up to its attention "
                f"output (max error {error:.3g}); pass heads=False for layer-level attribution."
            )
        per_head.append(readout(vectors))
        b_o.append(readout(bias_o))
    return torch.stack(per_head), torch.stack(b_o)
