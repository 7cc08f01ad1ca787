"""THE catalogue of standardized names: every tensor ``model.<name>`` serves, in one table.

Each entry says what the tensor is (shape, per layer or whole model), where unilens reads it (its hook site), whether
remote mode can serve it, how the activation store lays it out, and its TransformerLens names. Everything that lists
names derives from this table: the accessors the model builds, the forward-order reads (``model.read``), the hook
points and attention hook points installed, remote mode's refusals and support table, the activation store's
cacheable names and the TransformerLens alias table. Adding a hook point is one entry here plus the code that
computes it (docs/architecture.md, "Where to add").

Example:
    >>> CATALOGUE["attention_probabilities"].shape
    '(batch, heads, query, key)'
    >>> [n for n in LAYER_NAMES if CATALOGUE[n].kind == "attention"][:3]
    ['attention_queries', 'attention_keys', 'attention_values']
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "CATALOGUE",
    "LAYER_NAMES",
    "MODEL_NAMES",
    "Name",
    "RemoteUnsupportedError",
    "attention_hook_sites",
    "hook_point_sites",
    "names_of_kind",
    "remote_refusal",
]

# The kinds of entries: how a tensor is reached.
MODULE = "module"  # a module's input or output (``site``: (part, "input" | "output")), e.g. the layer, its MLP
ATTENTION = "attention"  # an identity module inside ``unilens_hooks`` of an attention (``site``: its child name)
POINT = "point"  # a TransformerLens-style hook point (``site``: (role of the host module, point name))
DERIVED = "derived"  # computed from other tensors by the accessor (``site``: the source name)
ROUTING = "routing"  # a hook point inside a sparse MoE block's ``unilens_routing`` (``site``: its child name)

# Layouts in the activation store (unilens.scale.store): rows are tokens.
TOKEN = "token"  # (batch, seq, ...) -> one row per real token
HEADS_FIRST = "heads_first"  # (batch, heads, seq, d) -> per token (seq, heads, d)
PROBS = "probs"  # (batch, heads, query, key) -> per query token, keys cut to the text's own

# TransformerLens layouts of an alias (unilens.compat.tl)
SAME = "same"
TL_HEADS_FIRST = "heads_first"  # unilens (batch, heads, seq, d) <-> TL (batch, pos, heads, d): transpose(1, 2)
# TL's hook_mlp_in: read from a residual tensor, an edit normalized (the MLP's norm, TL's formula) into the tensor
# the MLP reads, so only the MLP branch sees it, as in TL.
PRE_NORM = "pre_norm"

# Why remote mode refuses a name (the server runs the plain HF model).
NO_ATTENTION_HOOKS = (
    "the server runs the plain HF model, which has none of unilens's attention hook points (the `unilens_hooks` "
    "children) nor its registered attention implementation"
)
NO_HOOK_POINTS = (
    "unilens.hook_points installs these as modules inside the locally loaded model (TransformerLens-style points: "
    "pre-rotary q/k, per-head inputs, MLP neurons, norms); the server's plain model has none"
)
# Why the activation store refuses a name.
NO_ROUTING_HOOKS = (
    "the router logits, selected experts and per-expert outputs are hook points unilens installs inside each sparse "
    "MoE block of the locally loaded model (unilens.hooks.routing); the server's plain model has none"
)
NOT_STORED_INDICES = (
    "it holds integer expert ids and the store keeps floating-point rows; cache router_logits and expert_weights, "
    "or read expert_indices with model.read"
)
NOT_STORED_POINT = (
    "TransformerLens-style hook points are computed by hooks a trace installs, not stored yet; cache the module "
    "tensor it derives from (layers_input, attentions_input, mlps_input, attention_queries / keys) and apply the "
    "transformation after reading"
)


class RemoteUnsupportedError(NotImplementedError):
    """A feature the server's plain model cannot provide; raised on the client before the request is sent."""


@dataclass(frozen=True)
class Name:
    """One standardized tensor.

    ``store`` is the activation store's layout, or None with ``not_stored`` saying why it is refused; ``remote`` is
    None where remote mode serves the name, else why it is refused; ``tl`` holds (TransformerLens name, layout)
    pairs, block-relative (``"hook_resid_post"`` for ``blocks.{i}.hook_resid_post``) for per-layer names.
    """

    name: str
    per_layer: bool
    kind: str
    site: tuple[str, str] | str
    shape: str
    store: str | None = TOKEN
    not_stored: str | None = None
    remote: str | None = None
    tl: tuple[tuple[str, str], ...] = ()


def _entries() -> list[Name]:
    layer, model = True, False
    n = Name
    return [
        # --- per layer, in the nominal order of a pre-norm block (the real order is recorded per model) ---
        n("layers_input", layer, MODULE, ("layer", "input"), "(batch, seq, hidden)",
          tl=(("hook_resid_pre", SAME), ("hook_in", SAME))),  # TL 4.3's bridge: the block's hook_in too
        n("attentions_input", layer, MODULE, ("attention", "input"), "(batch, seq, hidden)",
          tl=(("attn.hook_in", SAME),)),
        n("attention_queries", layer, ATTENTION, "queries", "(batch, heads, seq, head_dim)", HEADS_FIRST,
          tl=(("attn.hook_rot_q", TL_HEADS_FIRST),)),
        n("attention_keys", layer, ATTENTION, "keys", "(batch, kv_heads, seq, head_dim)", HEADS_FIRST,
          tl=(("attn.hook_rot_k", TL_HEADS_FIRST),)),
        n("attention_values", layer, ATTENTION, "values", "(batch, kv_heads, seq, head_dim)", HEADS_FIRST,
          tl=(("attn.hook_v", TL_HEADS_FIRST),)),
        n("attention_scores", layer, ATTENTION, "scores", "(batch, heads, query, key)", None,
          "pre-softmax scores hold the model's masking constant at masked keys, which does not survive padding to "
          "a common key length; cache attention_probabilities instead",
          tl=(("attn.hook_attn_scores", SAME),)),
        n("attention_probabilities", layer, ATTENTION, "probabilities", "(batch, heads, query, key)", PROBS,
          tl=(("attn.hook_pattern", SAME),)),
        n("attention_heads", layer, ATTENTION, "heads", "(batch, seq, heads, head_dim)",
          tl=(("attn.hook_z", SAME),)),
        n("attention_head_results", layer, ATTENTION, "head_results", "(batch, seq, heads, hidden)",
          tl=(("attn.hook_result", SAME),)),
        n("attentions_output", layer, MODULE, ("attention_out", "output"), "(batch, seq, hidden)",
          tl=(("hook_attn_out", SAME), ("attn.hook_out", SAME))),
        # the token mixer: the attention, or the SSM / recurrent / linear-attention block of a layer without one
        n("mixers_input", layer, MODULE, ("mixer", "input"), "(batch, seq, hidden)"),
        n("mixers_projection_input", layer, MODULE, ("mixer_projection", "input"), "(batch, seq, mixer_width)"),
        n("mixers_output", layer, MODULE, ("mixer_out", "output"), "(batch, seq, hidden)"),
        n("mlps_input", layer, MODULE, ("mlp_in", "input"), "(batch, seq, hidden)",
          tl=(("hook_mlp_in", PRE_NORM), ("mlp.hook_in", SAME))),
        n("mlps_output", layer, MODULE, ("mlp_out", "output"), "(batch, seq, hidden)",
          tl=(("hook_mlp_out", SAME), ("mlp.hook_out", SAME))),
        n("layers_output", layer, MODULE, ("layer", "output"), "(batch, seq, hidden)",
          tl=(("hook_resid_post", SAME), ("hook_out", SAME))),
        # --- per layer, sparse mixture-of-experts routing (unilens.hooks.routing; refused on dense layers) ---
        n("router_logits", layer, ROUTING, "router_logits", "(batch, seq, experts)", remote=NO_ROUTING_HOOKS),
        n("expert_indices", layer, ROUTING, "expert_indices", "(batch, seq, k)", None, NOT_STORED_INDICES,
          NO_ROUTING_HOOKS),
        n("expert_weights", layer, ROUTING, "expert_weights", "(batch, seq, k)", remote=NO_ROUTING_HOOKS),
        n("expert_outputs", layer, ROUTING, "expert_outputs", "(batch, seq, experts, hidden)",
          remote=NO_ROUTING_HOOKS),
        n("shared_expert_output", layer, ROUTING, "shared_expert_output", "(batch, seq, hidden)",
          remote=NO_ROUTING_HOOKS),
        # --- per layer, TransformerLens-style hook points (unilens.hooks.points) ---
        *(n(name, layer, POINT, site, shape, None, NOT_STORED_POINT, NO_HOOK_POINTS, tl) for name, site, shape, tl in (
            ("attention_queries_pre_rotary", ("attention", "q"), "(batch, heads, seq, head_dim)",
             (("attn.hook_q", TL_HEADS_FIRST),)),
            ("attention_keys_pre_rotary", ("attention", "k"), "(batch, kv_heads, seq, head_dim)",
             (("attn.hook_k", TL_HEADS_FIRST),)),
            ("attention_inputs_per_head", ("attention", "attn_in"), "(batch, seq, heads, hidden)",
             (("hook_attn_in", SAME),)),
            ("attention_queries_input", ("attention", "q_input"), "(batch, seq, heads, hidden)",
             (("hook_q_input", SAME),)),
            ("attention_keys_input", ("attention", "k_input"), "(batch, seq, kv_heads, hidden)",
             (("hook_k_input", SAME),)),
            ("attention_values_input", ("attention", "v_input"), "(batch, seq, kv_heads, hidden)",
             (("hook_v_input", SAME),)),
            ("mlps_pre_activation", ("mlp", "pre"), "(batch, seq, d_mlp)", (("mlp.hook_pre", SAME),)),
            ("mlps_pre_linear", ("mlp", "pre_linear"), "(batch, seq, d_mlp)", (("mlp.hook_pre_linear", SAME),)),
            ("mlps_post_activation", ("mlp", "post"), "(batch, seq, d_mlp)", (("mlp.hook_post", SAME),)),
            ("layers_resid_mid", ("resid", "resid_mid"), "(batch, seq, hidden)", (("hook_resid_mid", SAME),)),
            ("input_norms_scale", ("input_norm", "scale"), "(batch, seq, 1)", (("ln1.hook_scale", SAME),)),
            ("input_norms_normalized", ("input_norm", "normalized"), "(batch, seq, hidden)",
             (("ln1.hook_normalized", SAME),)),
            ("post_attention_norms_scale", ("mlp_norm", "scale"), "(batch, seq, 1)", (("ln2.hook_scale", SAME),)),
            ("post_attention_norms_normalized", ("mlp_norm", "normalized"), "(batch, seq, hidden)",
             (("ln2.hook_normalized", SAME),)),
        )),
        # --- whole model: embeddings first, the logits (and what is computed from them) last ---
        n("token_embeddings", model, MODULE, ("embed", "output"), "(batch, seq, hidden)", tl=(("hook_embed", SAME),)),
        n("position_embeddings", model, MODULE, ("position_embed", "output"), "(batch, seq, hidden)",
          tl=(("hook_pos_embed", SAME),)),
        n("final_norm_scale", model, POINT, ("final_norm", "scale"), "(batch, seq, 1)", None, NOT_STORED_POINT,
          NO_HOOK_POINTS, (("ln_final.hook_scale", SAME),)),
        n("final_norm_normalized", model, POINT, ("final_norm", "normalized"), "(batch, seq, hidden)", None,
          NOT_STORED_POINT, NO_HOOK_POINTS, (("ln_final.hook_normalized", SAME),)),
        n("logits", model, MODULE, ("lm_head", "output"), "(batch, seq, vocab)",
          tl=(("hook_unembed", SAME), ("unembed.hook_out", SAME))),
        n("next_token_probs", model, DERIVED, "logits", "(batch, vocab)", None,
          "it is one row per text, not per token; cache logits and take the last row of each text"),
    ]


CATALOGUE: dict[str, Name] = {entry.name: entry for entry in _entries()}
LAYER_NAMES: tuple[str, ...] = tuple(n for n, e in CATALOGUE.items() if e.per_layer)
MODEL_NAMES: tuple[str, ...] = tuple(n for n, e in CATALOGUE.items() if not e.per_layer)


def names_of_kind(kind: str, per_layer: bool | None = None) -> tuple[str, ...]:
    """The names of one kind (``"module"``, ``"attention"``, ``"point"``, ``"routing"``, ``"derived"``), optionally
    per layer only (True) or whole-model only (False).

    Example:
        >>> names_of_kind("point", per_layer=False)
        ('final_norm_scale', 'final_norm_normalized')
    """
    return tuple(n for n, e in CATALOGUE.items() if e.kind == kind and (per_layer is None or e.per_layer == per_layer))


def attention_hook_sites() -> tuple[str, ...]:
    """The children of an attention's ``unilens_hooks`` module, one per attention name.

    Example:
        >>> attention_hook_sites()
        ('queries', 'keys', 'values', 'scores', 'probabilities', 'heads', 'head_results')
    """
    return tuple(CATALOGUE[n].site for n in names_of_kind(ATTENTION))  # type: ignore[misc]


def hook_point_sites(per_layer: bool = True) -> dict[str, tuple[str, str]]:
    """Hook point name -> (role of its host module, point name inside the host's ``unilens_points``).

    Example:
        >>> hook_point_sites()["layers_resid_mid"]
        ('resid', 'resid_mid')
    """
    return {n: CATALOGUE[n].site for n in names_of_kind(POINT, per_layer)}  # type: ignore[misc]


def remote_refusal(name: str) -> str | None:
    """Why remote mode refuses the standardized name ``name`` (the message it raises), or None where it serves it.

    The attention names are served remotely from the deployment's own attention call (``unilens.model.remote``);
    ``unilens_hooks`` (the local attention hook modules themselves) is refused.

    Example:
        >>> remote_refusal("layers_output") is None, remote_refusal("attention_scores") is None
        (True, True)
        >>> remote_refusal("unilens_hooks").split(":")[0]
        'unilens_hooks is refused in remote mode'
    """
    reason = NO_ATTENTION_HOOKS if name == "unilens_hooks" else getattr(CATALOGUE.get(name), "remote", None)
    if reason is None:
        return None
    fix = ""
    if reason == NO_ATTENTION_HOOKS:
        fix = (" Read attention through model.attention_probabilities[i] (and the other attention_* names): "
               "remote mode serves them from the deployment's own attention call.")
    return f"{name} is refused in remote mode: {reason}.{fix}"
