"""``HookedTransformer``: a TransformerLens-facing view of a standardized model, with TL 4.3 ``TransformerBridge``
semantics: ``model(input, return_type=...)`` returns logits (or the loss), ``cfg`` has TL's field names,
``blocks[i].attn.hook_z`` & co. are hook points that take ``add_hook``, hooks persist until ``reset_hooks``, and the
weights come stacked in TL's shapes (``W_Q (n_layers, n_heads, d_model, d_head)``, ``OV`` / ``QK`` as
``FactoredMatrix``).

The view holds no state of its own besides the hooks added to it: every forward goes through ``unilens.tl``'s one
forward (``run_with_cache`` / ``run_with_hooks``: the standardized tensors, edited where the forward computes them),
every weight is read from the HF model when asked. Whatever the view does not define comes from the standardized
model (``model.tl.read(...)``, ``model.tl.tokenizer``, ...). ``StandardizedTransformer(...)(...)`` itself keeps
nnsight's semantics (HF's output object).

Example:
    >>> from unilens import StandardizedTransformer
    >>> from unilens.testing import tiny_model
    >>> model = HookedTransformer(StandardizedTransformer(*tiny_model("llama"), check=False))
    >>> logits = model("The capital of France is")  # (batch, pos, d_vocab)
    >>> logits.shape[-1] == model.cfg.d_vocab, model.cfg.normalization_type, model.W_Q.shape
    (True, 'RMS', torch.Size([2, 4, 64, 16]))
"""

from __future__ import annotations

import contextlib
import inspect
import re
import warnings
from functools import partial
from typing import Any, Callable, ClassVar, Iterable, Iterator

import torch
from torch import nn

from ..arch.offload import parameter
from ..arch.weights import _linear_weight_out_in
from ..core import config as hf_config
from ..core.protocol import StandardizedModel
from . import tl
from .factored_matrix import FactoredMatrix
from .tl_names import TLNameError, get_act_name, hook_names, resolve
from .tl_tokens import _encode, default_prepend_bos, to_single_token

__all__ = ["HookedTransformer", "TLConfig", "TLHookPoint", "tl_config"]


# ----------------------------------------------------------------------------------------------------------------
# cfg: TL's config fields, derived from the HF config and the probed structure
# ----------------------------------------------------------------------------------------------------------------


class TLConfig:
    """TL's config object (``model.cfg``): attributes with TL's field names (``n_layers``, ``d_model``, ``n_heads``,
    ``d_head``, ``d_mlp``, ``d_vocab``, ``n_ctx``, ``act_fn``, ``normalization_type``, ...); ``to_dict()``.

    Example:
        >>> cfg = TLConfig(n_layers=2, d_model=32)
        >>> cfg.n_layers, cfg.to_dict()["d_model"]
        (2, 32)
    """

    def __init__(self, **fields: Any) -> None:
        self.__dict__.update(fields)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def __getitem__(self, key: str) -> Any:  # some TL code reads cfg["d_model"]
        return self.__dict__[key]

    def __contains__(self, key: str) -> bool:
        return key in self.__dict__

    def __repr__(self) -> str:
        return "TLConfig:\n{" + ",\n ".join(f"{k!r}: {v!r}" for k, v in self.__dict__.items()) + "}"


_ACT_KEYS = ("hidden_act", "activation_function", "hidden_activation", "activation", "ffn_act", "act_fn")
_ALIBI_TYPES = {"bloom", "mpt"}


def _positional_embedding_type(model: StandardizedModel) -> str:
    """TL's name for how positions enter: ``standard`` (learned absolute), ``rotary``, ``alibi`` or ``none``."""
    cfg = hf_config.text_config(model.config)
    if model.architecture.position_embed_path is not None:
        return "standard"
    if model.architecture.model_type in _ALIBI_TYPES or getattr(cfg, "alibi", False):
        return "alibi"
    rope = ("rope_theta", "rope_parameters", "rope_scaling", "rotary_dim", "rotary_pct", "partial_rotary_factor",
            "rotary_emb_base", "rope_pct")
    return "rotary" if any(getattr(cfg, k, None) is not None for k in rope) else "none"


def _norm_type(plan: Any) -> str | None:
    if plan is None:
        return None
    return "LN" if plan.center else "RMS"


def tl_config(model: StandardizedModel) -> TLConfig:
    """``model.cfg`` of the TL view: the bridge's field names, read from the HF config (``unilens.core.config``)
    and from what unilens probed at load (norm formulas, MLP projections, position embedding).

    Example:
        >>> from unilens import StandardizedTransformer
        >>> from unilens.testing import tiny_model
        >>> cfg = tl_config(StandardizedTransformer(*tiny_model("gpt2"), check=False))
        >>> cfg.normalization_type, cfg.positional_embedding_type, cfg.act_fn, cfg.gated_mlp
        ('LN', 'standard', 'gelu_new', False)
    """
    hf = model.module_accessor.model
    cfg = hf_config.text_config(model.config)
    setup = model.__dict__.get("_hook_point_setup")
    plans = setup.layers if setup is not None else []
    first = next((p.parts for p in plans if "mlp" in p.parts or "input_norm" in p.parts), {})
    mlp = first.get("mlp")
    norm = first.get("input_norm") or (setup.final_norm if setup is not None else None)
    final = setup.final_norm if setup is not None else None
    d_mlp = None
    if mlp is not None:
        d_mlp = int(_linear_weight_out_in(mlp.down).shape[1])
    positional = _positional_embedding_type(model)
    rotary_dim = None
    if positional == "rotary":
        rotary_dim = hf_config.config_value(cfg, "rotary_dim")
        factor = hf_config.config_value(cfg, "partial_rotary_factor", "rotary_pct", "rope_pct")
        if rotary_dim is None:
            rotary_dim = int(model.head_dim * factor) if factor is not None else model.head_dim
    rope = getattr(cfg, "rope_parameters", None) or {}
    rotary_base = rope.get("rope_theta") if isinstance(rope, dict) else None
    # TL's default (10000) where the config states none, rotary or not, as the bridge's cfg
    rotary_base = rotary_base or hf_config.config_value(cfg, "rope_theta", "rotary_emb_base") or 10000
    embed = model.module_accessor.get_embed_tokens()
    weight = parameter(embed, "weight")
    architectures = getattr(model.config, "architectures", None) or [type(hf).__name__]
    name = getattr(model.config, "name_or_path", None) or getattr(model.config, "_name_or_path", "") or ""
    tok = getattr(model, "tokenizer", None)
    kv = hf_config.num_kv_heads(model.config)
    fields = dict(
        n_layers=model.num_layers,
        d_model=model.hidden_size,
        n_ctx=hf_config.context_length(model.config),
        d_head=model.head_dim,
        model_name=str(name).rstrip("/").split("/")[-1] or type(hf).__name__,
        n_heads=model.num_heads,
        d_mlp=d_mlp,
        act_fn=hf_config.config_value(cfg, *_ACT_KEYS),
        d_vocab=int(weight.shape[0]),
        eps=float(norm.eps) if norm is not None else hf_config.config_value(cfg, *hf_config.NORM_EPS_KEYS),
        use_attn_result=False,
        use_split_qkv_input=False,
        use_hook_mlp_in=False,
        use_attn_in=False,
        normalization_type=_norm_type(norm),
        device=model.input_device,
        n_devices=1,
        attn_only=False,
        positional_embedding_type=positional,
        final_rms=_norm_type(final) == "RMS",
        d_vocab_out=model.vocab_size,
        parallel_attn_mlp=bool(model.architecture.parallel),
        rotary_dim=rotary_dim,
        rotary_base=rotary_base,
        gated_mlp=bool(mlp is not None and mlp.up is not None),
        dtype=weight.dtype,
        n_key_value_heads=kv,
        original_architecture=architectures[0],
        architecture=architectures[0],
        tokenizer_name=getattr(tok, "name_or_path", None),
        default_prepend_bos=default_prepend_bos(model),
        default_padding_side=getattr(tok, "padding_side", "right") if tok is not None else "right",
        tokenizer_prepends_bos=bool(tok is not None and tok.bos_token_id is not None
                                    and tok("a")["input_ids"][:1] == [tok.bos_token_id]),
        tie_word_embeddings=bool(getattr(model.config, "tie_word_embeddings", False)),
        output_logits_soft_cap=float(hf_config.config_value(cfg, "final_logit_softcapping") or -1.0),
        attn_scores_soft_cap=float(hf_config.config_value(cfg, "attn_logit_softcapping") or -1.0),
        eos_token_id=getattr(tok, "eos_token_id", None) if tok is not None else None,
    )
    return TLConfig(**fields)


# ----------------------------------------------------------------------------------------------------------------
# Hook points and the TL modules of the view
# ----------------------------------------------------------------------------------------------------------------


class TLHookPoint:
    """One TL hook point of the view: ``name``, ``layer()``, ``ctx`` (a dict a hook may keep state in),
    ``add_hook(fn, dir="fwd")`` (persists until ``reset_hooks``), ``remove_hooks()``.

    Example:
        >>> from unilens import StandardizedTransformer
        >>> from unilens.testing import tiny_model
        >>> model = HookedTransformer(StandardizedTransformer(*tiny_model("llama"), check=False))
        >>> model.blocks[0].hook_resid_post.add_hook(lambda x, hook: x * 0)
        >>> len(model.blocks[0].hook_resid_post.fwd_hooks)
        1
        >>> model.reset_hooks(); len(model.blocks[0].hook_resid_post.fwd_hooks)
        0
    """

    def __init__(self, view: "HookedTransformer", name: str) -> None:
        self._view = view
        self.name = name
        self.ctx: dict[Any, Any] = {}

    def layer(self) -> int | None:
        match = re.match(r"blocks\.(\d+)\.", self.name)
        return int(match.group(1)) if match else None

    def add_hook(self, hook: Callable, dir: str = "fwd", is_permanent: bool = False, level: Any = None,
                 prepend: bool = False) -> None:
        """Run ``hook(tensor, hook=this point)`` on every forward of the view until ``reset_hooks`` (``dir="bwd"``:
        on the gradient when the caller backpropagates; ``is_permanent``: also after ``reset_hooks``)."""
        self._view._register(self, hook, dir, is_permanent, prepend)

    def add_perma_hook(self, hook: Callable, dir: str = "fwd") -> None:
        self.add_hook(hook, dir=dir, is_permanent=True)

    def remove_hooks(self, dir: str = "fwd", including_permanent: bool = False, level: Any = None) -> None:
        self._view._unregister(lambda r: r.point is self, dir, including_permanent)

    def clear_context(self) -> None:
        self.ctx.clear()

    @property
    def fwd_hooks(self) -> list["_Registration"]:
        return [r for r in self._view._registrations if r.point is self and r.dir == "fwd"]

    @property
    def bwd_hooks(self) -> list["_Registration"]:
        return [r for r in self._view._registrations if r.point is self and r.dir == "bwd"]

    def __repr__(self) -> str:
        return f"TLHookPoint({self.name!r})"


class _Registration:
    """A hook added to the view: where, the function, its direction, whether ``reset_hooks`` keeps it."""

    def __init__(self, point: TLHookPoint, fn: Callable, dir: str, permanent: bool) -> None:
        self.point, self.fn, self.dir, self.permanent = point, fn, dir, permanent

    def entry(self) -> tuple[str, Callable]:
        """``(name, fn)`` for ``unilens.tl``'s runner, with this point (and its ``ctx``) as the ``hook`` argument."""
        return self.point.name, partial(_with_point, self.fn, self.point)

    def remove(self) -> None:  # TL's handle API
        self.point._view._unregister(lambda r: r is self, self.dir, True)


def _with_point(fn: Callable, point: TLHookPoint, value: Any, hook: Any = None) -> Any:
    return tl._call_hook(fn, value, point)


class _Component:
    """A TL module of the view (``blocks[i]``, ``blocks[i].attn``, ``ln_final``, ...): its hook points as
    attributes, ``original_component`` (the HF module, where there is one), and calling it runs that module."""

    def __init__(self, view: "HookedTransformer", name: str, module: nn.Module | None = None) -> None:
        self._view = view
        self.name = name
        self.original_component = module
        self._children: dict[str, Any] = {}

    def _child(self, key: str, value: Any) -> None:
        self._children[key] = value
        object.__setattr__(self, key, value)

    def hook_points(self) -> list[TLHookPoint]:
        out = []
        for value in self._children.values():
            out.extend([value] if isinstance(value, TLHookPoint) else value.hook_points())
        return out

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.original_component is None:
            raise TypeError(f"{self.name} has no module of its own to call on this model.")
        return self.original_component(*args, **kwargs)

    def __repr__(self) -> str:
        inner = type(self.original_component).__name__ if self.original_component is not None else "-"
        hooks = sorted(k for k in self._children if k.startswith("hook_"))
        return f"{type(self).__name__}({self.name}: {inner}; hooks {hooks})"


def _bias_or_zeros(module: nn.Module, rows: int, like: torch.Tensor) -> torch.Tensor:
    b = parameter(module, "bias")
    return b if isinstance(b, torch.Tensor) else torch.zeros(rows, dtype=like.dtype, device=like.device)


class _Attention(_Component):
    """``blocks[i].attn``: per-head weights in TL's shapes (``W_Q (n_heads, d_model, d_head)``, ``W_K`` / ``W_V``
    with the kv heads on GQA models, ``W_O (n_heads, d_head, d_model)``, biases as zeros where the model has none),
    and the head circuits ``OV`` / ``QK`` as FactoredMatrix (kv heads repeated to the query heads on GQA)."""

    def __init__(self, view: "HookedTransformer", i: int) -> None:
        super().__init__(view, f"blocks.{i}.attn", view.model._attention_modules[i])
        self.layer = i

    @property
    def _w(self):
        return self._view.model.weights[self.layer]

    W_Q = property(lambda self: self._w.W_Q)
    W_K = property(lambda self: self._w.W_K)
    W_V = property(lambda self: self._w.W_V)
    W_O = property(lambda self: self._w.W_O)
    b_Q = property(lambda self: self._w.b_Q)
    b_K = property(lambda self: self._w.b_K)
    b_V = property(lambda self: self._w.b_V)
    b_O = property(lambda self: self._w.b_O)

    @property
    def OV(self) -> FactoredMatrix:
        """``W_V[h] @ W_O[h]`` per head ``(n_heads, d_model, d_model)``, factored."""
        return FactoredMatrix(_per_query_head(self.W_V, self.W_O.shape[-3]), self.W_O)

    @property
    def QK(self) -> FactoredMatrix:
        """``W_Q[h] @ W_K[h]^T`` per head ``(n_heads, d_model, d_model)``, factored (before rotary embeddings)."""
        return FactoredMatrix(self.W_Q, _per_query_head(self.W_K, self.W_Q.shape[-3]).transpose(-2, -1))


def _per_query_head(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """kv-head weights ``(..., n_kv_heads, a, b)`` -> ``(..., n_heads, a, b)``: each kv head repeated for the query
    heads that share it (query head h reads kv head h // (n_heads // n_kv_heads), as HF's ``repeat_kv``)."""
    kv = w.shape[-3]
    return w if kv == n_heads else w.repeat_interleave(n_heads // kv, dim=-3)


class _MLP(_Component):
    """``blocks[i].mlp``: ``W_in (d_model, d_mlp)`` (the up projection on gated MLPs), ``W_gate`` (gated MLPs
    only, else None), ``W_out (d_mlp, d_model)``, ``b_in`` / ``b_out`` (zeros where the model has none)."""

    def __init__(self, view: "HookedTransformer", i: int, plan: Any, module: nn.Module | None) -> None:
        super().__init__(view, f"blocks.{i}.mlp", module)
        self._plan = plan

    def _plan_or_raise(self):
        if self._plan is None:
            raise NotImplementedError(f"{self.name}: unilens found no in / out projections of this MLP (its neurons "
                                      "are not available), so its weights have no TL form.")
        return self._plan

    def _in_rows(self, which: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight (d_mlp, d_model), bias (d_mlp,)) of the gate / up half."""
        plan = self._plan_or_raise()
        module = plan.gate if which == "gate" else plan.up
        w = _linear_weight_out_in(module)
        b = _bias_or_zeros(module, w.shape[0], w)
        if plan.fused_halves is None:
            return w, b
        half = w.shape[0] // 2
        first = (which == "gate") == (plan.fused_halves == "gate_up")
        sl = slice(0, half) if first else slice(half, None)
        return w[sl], b[sl]

    @property
    def W_in(self) -> torch.Tensor:
        plan = self._plan_or_raise()
        return self._in_rows("up" if plan.up is not None else "gate")[0].t()

    @property
    def b_in(self) -> torch.Tensor:
        plan = self._plan_or_raise()
        return self._in_rows("up" if plan.up is not None else "gate")[1]

    @property
    def W_gate(self) -> torch.Tensor | None:
        plan = self._plan_or_raise()
        return self._in_rows("gate")[0].t() if plan.up is not None else None

    @property
    def b_gate(self) -> torch.Tensor | None:
        plan = self._plan_or_raise()
        return self._in_rows("gate")[1] if plan.up is not None else None

    @property
    def W_out(self) -> torch.Tensor:
        return _linear_weight_out_in(self._plan_or_raise().down).t()

    @property
    def b_out(self) -> torch.Tensor:
        down = self._plan_or_raise().down
        w = _linear_weight_out_in(down)
        return _bias_or_zeros(down, w.shape[0], w)


class _Norm(_Component):
    """A norm (``ln1``, ``ln2``, ``ln_final``): ``w`` / ``b`` (the module's own weight and bias; None where it has
    none), calling it runs the HF norm."""

    w = property(lambda self: parameter(self.original_component, "weight") if self.original_component else None)
    b = property(lambda self: parameter(self.original_component, "bias") if self.original_component else None)


class _Embed(_Component):
    """``embed``: ``W_E (d_vocab, d_model)``; ``embed(tokens)`` is the HF token embedding's output."""

    W_E = property(lambda self: parameter(self.original_component, "weight"))


class _PosEmbed(_Component):
    """``pos_embed`` (learned absolute positions only): ``W_pos (n_ctx, d_model)``; ``pos_embed(tokens)`` the
    positions' rows ``(batch, pos, d_model)``."""

    W_pos = property(lambda self: parameter(self.original_component, "weight"))

    def __call__(self, tokens: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        tokens = torch.as_tensor(tokens)
        tokens = tokens[None] if tokens.dim() == 1 else tokens
        rows = self.W_pos[: tokens.shape[-1]]  # (pos, d_model)
        return rows[None].expand(tokens.shape[0], *rows.shape)


class _Unembed(_Component):
    """``unembed``: ``W_U (d_model, d_vocab)``, ``b_U (d_vocab,)`` (zeros where the head has no bias);
    ``unembed(resid)`` = ``resid @ W_U + b_U`` (the HF head, without the final norm or a logit soft-cap)."""

    @property
    def W_U(self) -> torch.Tensor:
        return _linear_weight_out_in(self.original_component).t()

    @property
    def b_U(self) -> torch.Tensor:
        w = _linear_weight_out_in(self.original_component)
        return _bias_or_zeros(self.original_component, w.shape[0], w)


class _Block(_Component):
    """``blocks[i]``: hook points (``hook_resid_pre``, ...), ``attn``, ``mlp``, ``ln1``, ``ln2``."""


# ----------------------------------------------------------------------------------------------------------------
# The view
# ----------------------------------------------------------------------------------------------------------------

# TL from_pretrained options that process weights (fold norms, centre writing weights): TL's bridge without
# compatibility mode does not process them either; accepted and ignored, with a warning when asked for.
_PROCESSING_OPTIONS = ("fold_ln", "center_writing_weights", "center_unembed", "refactor_factored_attn_matrices",
                       "fold_value_biases")
# TL loading options that have no meaning here (accepted and ignored)
_IGNORED_OPTIONS = ("n_devices", "move_to_device", "first_n_layers", "default_padding_side", "checkpoint_index",
                    "checkpoint_value", "n_ctx", "from_pretrained_kwargs")


class HookedTransformer:
    """TransformerLens's model surface over a standardized model (TL 4.3 ``TransformerBridge`` semantics).

    Build it as ``HookedTransformer(model)``, ``model.tl``, or ``HookedTransformer.from_pretrained(path_or_hf_model,
    **kwargs)`` (loads a ``StandardizedTransformer``). Everything it does not define comes from the standardized
    model (``to_tokens``, ``to_str_tokens``, ``tokenizer``, ``read``, ...).

    Example:
        >>> from unilens import StandardizedTransformer
        >>> from unilens.testing import tiny_model
        >>> model = HookedTransformer(StandardizedTransformer(*tiny_model("gpt2"), check=False))
        >>> loss = model("The cat sat on the mat", return_type="loss")
        >>> model.blocks[1].attn.hook_z.add_hook(lambda z, hook: z * 0)  # persists until reset_hooks()
        >>> bool(model("The cat sat on the mat", return_type="loss") != loss)
        True
        >>> model.reset_hooks(); bool(model("The cat sat on the mat", return_type="loss") == loss)
        True
    """

    #: the class ``from_pretrained`` loads with (``unilens.model`` sets it: compat sits below the model tier)
    model_class: ClassVar[Any] = None

    #: ``ActivationCache(cache_dict, view)`` unwraps the view to the model it wraps (``self.model``)
    wraps_standardized_model = True

    def __init__(self, model: StandardizedModel) -> None:
        if isinstance(model, HookedTransformer):
            model = model.model
        if not isinstance(model, StandardizedModel):
            raise TypeError(f"HookedTransformer wraps a unilens StandardizedTransformer, got {type(model).__name__}; "
                            "load one with HookedTransformer.from_pretrained(path_or_hf_model).")
        self.__dict__.update(model=model, _registrations=[], _cfg=None, _points=None, _blocks=None)

    # --- loading ----------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, model_name: Any, *, hf_model: Any = None, tokenizer: Any = None, device: Any = None,
                        dtype: Any = None, default_prepend_bos: bool | None = None, **kwargs: Any
                        ) -> "HookedTransformer":
        """Load a model (hub id in the local cache, folder, ``.gguf``, or a loaded HF model with ``tokenizer=``)
        as TL's ``from_pretrained`` / the bridge's ``boot_transformers``. TL's weight-processing options
        (``fold_ln``, ``center_writing_weights``, ...) are accepted and not applied (as the bridge without
        compatibility mode); other kwargs go to ``StandardizedTransformer``.

        Example:
            >>> from unilens.testing import tiny_model
            >>> hf, tok = tiny_model("llama")
            >>> HookedTransformer.from_pretrained(hf, tokenizer=tok).cfg.n_layers
            2
        """
        asked = [k for k in _PROCESSING_OPTIONS if kwargs.pop(k, False)]
        if asked:
            warnings.warn(f"HookedTransformer.from_pretrained: {', '.join(asked)} not applied: unilens runs the "
                          "HF weights as they are (as TL's TransformerBridge without compatibility mode).",
                          stacklevel=2)
        for key in _IGNORED_OPTIONS:
            kwargs.pop(key, None)
        if cls.model_class is None:
            raise RuntimeError("import unilens (which registers StandardizedTransformer) before from_pretrained.")
        if isinstance(model_name, cls.model_class):
            model = model_name
        else:
            if dtype is not None:
                kwargs["dtype"] = getattr(torch, dtype) if isinstance(dtype, str) else dtype
            model = cls.model_class(hf_model if hf_model is not None else model_name, tokenizer=tokenizer, **kwargs)
        if device is not None:
            model.to(device)
        view = cls(model)
        if default_prepend_bos is not None:  # text gets a BOS (or not) when prepend_bos is None, everywhere
            object.__setattr__(model, "_tl_default_prepend_bos", bool(default_prepend_bos))
            view.cfg.default_prepend_bos = bool(default_prepend_bos)
        return view

    from_pretrained_no_processing = from_pretrained
    boot_transformers = from_pretrained

    # --- delegation ---------------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or "model" not in self.__dict__:
            raise AttributeError(name)
        for klass in type(self).__mro__:  # a property of the view that raised: its own error, not the model's
            if name in klass.__dict__:
                return klass.__dict__[name].__get__(self, type(self))
        return getattr(self.__dict__["model"], name)

    def __dir__(self) -> list[str]:
        return sorted({*super().__dir__(), *dir(self.model)})

    def __repr__(self) -> str:
        return f"HookedTransformer({self.model!r})"

    @property
    def original_model(self) -> nn.Module:
        """The HF model itself (the bridge's ``original_model``)."""
        return self.model.module_accessor.model

    def to(self, *args: Any, **kwargs: Any) -> "HookedTransformer":
        self.model.to(*args, **kwargs)
        self.__dict__["_cfg"] = None  # device / dtype
        return self

    def cpu(self) -> "HookedTransformer":
        return self.to("cpu")

    def cuda(self, device: Any = None) -> "HookedTransformer":
        return self.to("cuda" if device is None else device)

    def eval(self) -> "HookedTransformer":
        self.model.module_accessor.model.eval()
        return self

    def train(self, mode: bool = True) -> "HookedTransformer":
        self.model.module_accessor.model.train(mode)
        return self

    # --- config ---------------------------------------------------------------------------------------
    @property
    def cfg(self) -> TLConfig:
        """TL's config (``n_layers``, ``d_model``, ``n_heads``, ``d_head``, ``d_mlp``, ``d_vocab``, ``n_ctx``,
        ``act_fn``, ``normalization_type``, ``positional_embedding_type``, ...), see ``tl_config``."""
        if self.__dict__["_cfg"] is None:
            self.__dict__["_cfg"] = tl_config(self.model)
        return self.__dict__["_cfg"]

    def set_use_attn_result(self, use_attn_result: bool) -> None:
        """Accepted (``hook_result`` is always available: read, it is computed in that forward)."""
        self.cfg.use_attn_result = bool(use_attn_result)

    def set_use_split_qkv_input(self, use_split_qkv_input: bool) -> None:
        """Accepted (``hook_q_input`` / ``hook_k_input`` / ``hook_v_input`` are always available)."""
        self.cfg.use_split_qkv_input = bool(use_split_qkv_input)

    def set_use_hook_mlp_in(self, use_hook_mlp_in: bool) -> None:
        """Accepted (``hook_mlp_in`` is always available)."""
        self.cfg.use_hook_mlp_in = bool(use_hook_mlp_in)

    def set_use_attn_in(self, use_attn_in: bool) -> None:
        """Accepted (``hook_attn_in`` is always available)."""
        self.cfg.use_attn_in = bool(use_attn_in)

    def enable_compatibility_mode(self, disable_warnings: bool = False, no_processing: bool = False,
                                  **processing: Any) -> None:
        """Accepted so bridge notebooks run; nothing changes: the weights stay the HF model's (TL's ``fold_ln``,
        ``center_writing_weights``, ... are not applied; a warning says so unless ``disable_warnings``)."""
        self.cfg.compatibility_mode = True
        if not disable_warnings and not no_processing:
            warnings.warn("enable_compatibility_mode: unilens does not process weights (fold_ln, "
                          "center_writing_weights, center_unembed, ...); the numbers stay those of the HF model, as "
                          "TL's TransformerBridge without compatibility mode.", stacklevel=2)

    def set_ungroup_grouped_query_attention(self, ungroup: bool) -> None:
        """Accepted; ``W_K`` / ``W_V`` keep the kv heads (as the bridge), ``OV`` / ``QK`` repeat them."""
        self.cfg.ungroup_grouped_query_attention = bool(ungroup)

    # --- modules and hook points ---------------------------------------------------------------------
    def _build(self) -> None:
        """The TL modules (blocks, attn, mlp, norms, embed, unembed) and a hook point object per TL name."""
        model = self.model
        arch = model.architecture
        setup = model.__dict__.get("_hook_point_setup")
        points = {name: TLHookPoint(self, name) for name in hook_names(model)}
        blocks = []
        for i in range(model.num_layers):
            parts = setup.layers[i].parts if setup is not None else {}
            block = _Block(self, f"blocks.{i}", model.module_accessor.model.get_submodule(f"{arch.layers_path}.{i}"))
            if arch.layers[i].attention is not None:
                block._child("attn", _Attention(self, i))
            mlp_path = arch.layers[i].mlp
            mlp_module = block.original_component.get_submodule(mlp_path) if mlp_path else None
            if arch.layers[i].mlp_in is not None or mlp_module is not None:
                block._child("mlp", _MLP(self, i, parts.get("mlp"), mlp_module))
            for key, role in (("ln1", "input_norm"), ("ln2", "mlp_norm")):
                plan = parts.get(role)
                block._child(key, _Norm(self, f"blocks.{i}.{key}", plan.module if plan is not None else None))
            blocks.append(block)
        accessor = model.module_accessor
        top: dict[str, _Component] = {"embed": _Embed(self, "embed", accessor.get_embed_tokens())}
        if arch.position_embed_path is not None:
            top["pos_embed"] = _PosEmbed(self, "pos_embed", accessor.model.get_submodule(arch.position_embed_path))
        final = setup.final_norm.module if setup is not None and setup.final_norm is not None else None
        if final is None and arch.final_norm_path:
            final = accessor.model.get_submodule(arch.final_norm_path)
        top["ln_final"] = _Norm(self, "ln_final", final)
        top["unembed"] = _Unembed(self, "unembed", accessor.get_unembed())
        loose: dict[str, TLHookPoint] = {}
        for name, point in points.items():
            *path, leaf = name.split(".")
            if path[:1] == ["blocks"]:
                node = blocks[int(path[1])]
                for key in path[2:]:
                    child = node._children.get(key)
                    if child is None:
                        child = _Component(self, f"{node.name}.{key}")
                        node._child(key, child)
                    node = child
                node._child(leaf, point)
            elif path and path[0] in top:
                top[path[0]]._child(leaf, point)
            else:
                loose[name] = point
        self.__dict__.update(_points=points, _blocks=blocks, _top_modules=top, _loose=loose)

    @property
    def hook_dict(self) -> dict[str, TLHookPoint]:
        """Every TL hook point of this model, by name, in forward order."""
        if self.__dict__["_points"] is None:
            self._build()
        return dict(self.__dict__["_points"])

    @property
    def mod_dict(self) -> dict[str, Any]:
        """Every TL module and hook point by name (``blocks.0``, ``blocks.0.attn``, ``blocks.0.attn.hook_z``, ...)."""
        self.hook_dict  # noqa: B018 - builds the modules
        out: dict[str, Any] = dict(self.__dict__["_top_modules"])
        out.update(self.__dict__["_loose"])

        def walk(node: _Component) -> None:
            out[node.name] = node
            for value in node._children.values():
                if isinstance(value, TLHookPoint):
                    out[value.name] = value
                else:
                    walk(value)

        for block in self.blocks:
            walk(block)
        for value in self.__dict__["_top_modules"].values():
            walk(value)
        return out

    def hook_points(self) -> list[TLHookPoint]:
        return list(self.hook_dict.values())

    @property
    def blocks(self) -> list[_Block]:
        """``blocks[i]`` with ``attn``, ``mlp``, ``ln1``, ``ln2`` and the block's hook points."""
        if self.__dict__["_blocks"] is None:
            self._build()
        return self.__dict__["_blocks"]

    def _top(self, key: str) -> _Component:
        self.blocks  # noqa: B018 - builds the modules
        if key not in self.__dict__["_top_modules"]:
            why = (f"no learned position embedding: positions are {self.cfg.positional_embedding_type}"
                   if key == "pos_embed" else "none found")
            raise AttributeError(f"this {self.model.architecture.model_type} model has no {key} ({why}).")
        return self.__dict__["_top_modules"][key]

    embed = property(lambda self: self._top("embed"))
    pos_embed = property(lambda self: self._top("pos_embed"))
    ln_final = property(lambda self: self._top("ln_final"))
    unembed = property(lambda self: self._top("unembed"))

    def __getitem__(self, name: str) -> Any:  # TL's model.mod_dict[name] spelled model[name] in a few notebooks
        return self.mod_dict[name]

    # --- hooks -----------------------------------------------------------------------------------------
    def _point(self, name: str) -> TLHookPoint:
        full = get_act_name(name)
        points = self.hook_dict
        if full not in points:
            resolve(self.model, full)  # raises with the reason
            raise TLNameError(f"{full} is not a hook point of this model.")
        return points[full]

    def _register(self, point: TLHookPoint, fn: Callable, dir: str, permanent: bool, prepend: bool = False
                  ) -> _Registration:
        if dir not in ("fwd", "bwd"):
            raise ValueError(f"dir must be 'fwd' or 'bwd', got {dir!r}.")
        if not callable(fn):
            raise TypeError(f"a hook is a function fn(tensor, hook), got {type(fn).__name__}.")
        info = resolve(self.model, point.name)
        tl._check_hooks(self.model, [info], backward=dir == "bwd")
        registration = _Registration(point, fn, dir, permanent)
        regs = self.__dict__["_registrations"]
        regs.insert(0, registration) if prepend else regs.append(registration)
        return registration

    def _unregister(self, which: Callable[[_Registration], bool], dir: str, including_permanent: bool) -> None:
        keep = []
        for r in self.__dict__["_registrations"]:
            if which(r) and dir in ("both", r.dir) and (including_permanent or not r.permanent):
                continue
            keep.append(r)
        self.__dict__["_registrations"] = keep

    def add_hook(self, name: str | Callable[[str], bool], hook: Callable, dir: str = "fwd",
                 is_permanent: bool = False, level: Any = None, prepend: bool = False) -> None:
        """Add ``hook(tensor, hook)`` at the hook point ``name`` (or at every point a filter on names picks): it
        runs on every forward of the view until ``reset_hooks()`` (``is_permanent=True``: until
        ``reset_hooks(including_permanent=True)``). ``dir="bwd"``: on the gradient of that tensor."""
        if isinstance(name, str):
            self._register(self._point(name), hook, dir, is_permanent, prepend)
            return
        for point_name, point in self.hook_dict.items():
            if name(point_name) and tl._hookable(self.model, resolve(self.model, point_name), dir == "bwd"):
                self._register(point, hook, dir, is_permanent, prepend)

    def add_perma_hook(self, name: str | Callable[[str], bool], hook: Callable, dir: str = "fwd") -> None:
        """``add_hook(..., is_permanent=True)``: survives ``reset_hooks()``."""
        self.add_hook(name, hook, dir=dir, is_permanent=True)

    def reset_hooks(self, clear_contexts: bool = True, direction: str = "both", including_permanent: bool = False,
                    level: Any = None) -> None:
        """Remove the hooks added to the view (not the permanent ones unless ``including_permanent``)."""
        self._unregister(lambda r: True, direction, including_permanent)
        if clear_contexts:
            for point in self.hook_dict.values():
                point.clear_context()

    def remove_all_hook_fns(self, direction: str = "both", including_permanent: bool = False, level: Any = None
                            ) -> None:
        self._unregister(lambda r: True, direction, including_permanent)

    def clear_contexts(self) -> None:
        for point in self.hook_dict.values():
            point.clear_context()

    @contextlib.contextmanager
    def hooks(self, fwd_hooks: Iterable = (), bwd_hooks: Iterable = (), reset_hooks_end: bool = True,
              clear_contexts: bool = False) -> Iterator["HookedTransformer"]:
        """``with model.hooks(fwd_hooks=[(name, fn)]):`` every forward inside runs them; they are removed at the
        end (``reset_hooks_end=False``: kept)."""
        added = self._add_entries(fwd_hooks, "fwd") + self._add_entries(bwd_hooks, "bwd")
        try:
            yield self
        finally:
            if reset_hooks_end:
                ids = {id(r) for r in added}
                self._unregister(lambda r: id(r) in ids, "both", True)
            if clear_contexts:
                self.clear_contexts()

    def _add_entries(self, entries: Iterable, dir: str) -> list[_Registration]:
        added = []
        for entry in entries:
            if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and callable(entry[1])):
                raise TypeError(f"each hooks entry is (name or name filter, fn(tensor, hook)), got {entry!r:.80}.")
            name, fn = entry
            before = len(self.__dict__["_registrations"])
            self.add_hook(name, fn, dir=dir)
            added.extend(self.__dict__["_registrations"][before:])
        return added

    def _active(self, dir: str) -> list[tuple[str, Callable]]:
        return [r.entry() for r in self.__dict__["_registrations"] if r.dir == dir]

    # --- running -----------------------------------------------------------------------------------------
    def forward(self, input: Any, return_type: str | None = "logits", loss_per_token: bool = False,
                prepend_bos: bool | None = None, padding_side: str | None = None, attention_mask: Any = None,
                start_at_layer: int | None = None, stop_at_layer: int | None = None, tokens: Any = None,
                **kwargs: Any) -> Any:
        """TL's forward: text (TL tokenization; several texts left-padded, as the bridge) or token ids ->
        ``return_type`` ``"logits"`` ``(batch, pos, d_vocab)``, ``"loss"`` (next-token cross-entropy; per token
        with ``loss_per_token``), ``"both"`` or None; ``stop_at_layer=k``: block k's input (the residual stream).
        The hooks added to the view run in it.

        Example:
            >>> from unilens import StandardizedTransformer
            >>> from unilens.testing import tiny_model
            >>> model = HookedTransformer(StandardizedTransformer(*tiny_model("llama"), check=False))
            >>> logits, loss = model("Hello world", return_type="both")
            >>> torch.allclose(loss, model.loss_fn(logits, model.to_tokens("Hello world")))
            True
        """
        if start_at_layer is not None:
            raise NotImplementedError("start_at_layer is not supported (as TL's TransformerBridge): run the forward "
                                      "with run_with_hooks and replace blocks.{k}.hook_resid_pre instead.")
        if kwargs:
            raise TypeError(f"HookedTransformer.forward got unknown keyword(s) {sorted(kwargs)}; it takes "
                            "return_type, loss_per_token, prepend_bos, padding_side, attention_mask, stop_at_layer.")
        if input is None:
            input = tokens
        return tl.run_with_hooks(self.model, input, self._active("fwd"), self._active("bwd"),
                                 prepend_bos=prepend_bos, padding_side=padding_side, attention_mask=attention_mask,
                                 return_type=return_type, loss_per_token=loss_per_token, stop_at_layer=stop_at_layer)

    def __call__(self, input: Any = None, *args: Any, **kwargs: Any) -> Any:
        return self.forward(input, *args, **kwargs)

    @staticmethod
    def loss_fn(logits: torch.Tensor, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None,
                per_token: bool = False) -> torch.Tensor:
        """TL's next-token cross-entropy (``unilens.tl.loss_fn``)."""
        return tl.loss_fn(logits, tokens, attention_mask, per_token)

    def run_with_cache(self, input: Any, *args: Any, names_filter: Any = None, return_type: str | None = "logits",
                       stop_at_layer: int | None = None, **kwargs: Any) -> tuple[Any, Any]:
        """TL's ``run_with_cache`` (``unilens.tl.run_with_cache``), with the hooks added to the view. Positional
        arguments after ``input`` are the bridge's: ``return_cache_object``, ``remove_batch_dim``."""
        if len(args) > 2:
            raise TypeError("run_with_cache(input, return_cache_object, remove_batch_dim, *, names_filter=, ...): "
                            f"got {len(args) + 1} positional arguments.")
        kwargs.update(zip(("return_cache_object", "remove_batch_dim"), args))
        return tl.run_with_cache(self.model, input, names_filter, return_type=return_type,
                                 stop_at_layer=stop_at_layer, fwd_hooks=self._active("fwd"),
                                 bwd_hooks=self._active("bwd"), **kwargs)

    def run_with_hooks(self, input: Any, fwd_hooks: Iterable = (), bwd_hooks: Iterable = (),
                       reset_hooks_end: bool = True, clear_contexts: bool = False, *,
                       return_type: str | None = "logits", **kwargs: Any) -> Any:
        """TL's ``run_with_hooks``: ``fwd_hooks`` (and the hooks added to the view) in one forward; they are
        removed afterwards unless ``reset_hooks_end=False``."""
        with self.hooks(fwd_hooks, bwd_hooks, reset_hooks_end=reset_hooks_end, clear_contexts=clear_contexts):
            return self.forward(input, return_type=return_type, **kwargs)

    # --- generation -------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input: Any = "", max_new_tokens: int = 10, stop_at_eos: bool = True,
                 eos_token_id: int | list[int] | None = None, do_sample: bool = True, top_k: int | None = None,
                 top_p: float | None = None, temperature: float = 1.0, freq_penalty: float = 0.0,
                 repetition_penalty: float = 1.0, use_past_kv_cache: bool = True, prepend_bos: bool | None = None,
                 padding_side: str | None = None, return_type: str | None = "input", verbose: bool = True,
                 **kwargs: Any) -> Any:
        """TL's ``generate``: text in, text out (the prompt and the continuation, special tokens dropped); token
        ids in, ids out (``return_type="str"`` / ``"tokens"`` to choose). Greedy with ``do_sample=False`` (or
        ``temperature=0``), else sampled with ``temperature`` / ``top_k`` / ``top_p`` / ``freq_penalty``. Without
        hooks on the view it runs the HF model with its key/value cache; with hooks, a full forward per token
        through them (``use_past_kv_cache`` and ``verbose`` are accepted).

        Example:
            >>> from unilens import StandardizedTransformer
            >>> from unilens.testing import tiny_model
            >>> model = HookedTransformer(StandardizedTransformer(*tiny_model("llama"), check=False))
            >>> text = model.generate("The cat", max_new_tokens=3, do_sample=False)
            >>> isinstance(text, str) and text.startswith("The cat")
            True
        """
        unknown = set(kwargs) - {"output_logits", "return_cache", "return_input_tokens", "names_filter", "device",
                                 "stop_strings", "stopping_criteria"}
        if unknown:
            raise TypeError(f"generate got unknown keyword(s) {sorted(unknown)}.")
        if any(kwargs.get(k) for k in ("output_logits", "return_cache", "return_input_tokens", "stop_strings",
                                        "stopping_criteria")):
            raise NotImplementedError("generate: output_logits / return_cache / return_input_tokens / stop_strings "
                                      "/ stopping_criteria are not supported; run run_with_cache on the output.")
        model = self.model
        if isinstance(input, str) or (isinstance(input, list) and input and isinstance(input[0], str)):
            texts = [input] if isinstance(input, str) else list(input)
            side = "left" if len(texts) > 1 else padding_side  # the bridge: a batch is generated left-padded
            tokens, mask = _encode(model, texts, prepend_bos, side, truncate=False)
            tokens, mask = tokens.to(model.input_device), mask.to(model.input_device)
            input_type = "str" if isinstance(input, str) else "list"
        else:
            tokens = torch.as_tensor(input).to(model.input_device)
            tokens = tokens[None] if tokens.dim() == 1 else tokens
            mask = None
            input_type = "tokens"
        if return_type == "input":
            return_type = "str" if input_type in ("str", "list") else "tokens"
        tok = model.tokenizer
        stop_ids: list[int] = []
        if stop_at_eos:
            eos = eos_token_id if eos_token_id is not None else getattr(tok, "eos_token_id", None)
            if eos is None:
                raise ValueError("stop_at_eos=True needs an eos token: pass eos_token_id= or stop_at_eos=False.")
            stop_ids = [eos] if isinstance(eos, int) else list(eos)
        pad_id = stop_ids[0] if stop_ids else 0
        greedy = not do_sample or temperature == 0.0
        mask = None if mask is None or bool(mask.all()) else mask  # (batch, pos); None: no padding
        hooked = bool(self.__dict__["_registrations"])
        hf = model.module_accessor.model
        # transformers 5.24 renamed the key/value cache argument (and output) `cache`; older: `past_key_values`
        cache_key = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"
        past = None
        finished = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
        for _ in range(max_new_tokens):
            if hooked:  # a full forward through the view's hooks
                logits = self.forward(tokens, attention_mask=mask)[:, -1]  # (batch, d_vocab)
            else:
                step = tokens if past is None else tokens[:, -1:]
                args: dict[str, Any] = {"input_ids": step, "use_cache": use_past_kv_cache}
                if not use_past_kv_cache:
                    args["input_ids"] = tokens
                if mask is not None:
                    args["attention_mask"] = mask
                    positions = mask.cumsum(-1) - 1
                    args["position_ids"] = positions.masked_fill(mask == 0, 1)[:, -args["input_ids"].shape[1]:]
                if past is not None and use_past_kv_cache:
                    args[cache_key] = past
                out = hf(**args)
                past = out.get(cache_key) if use_past_kv_cache else None
                logits = out.logits[:, -1]
            new = (logits.argmax(-1) if greedy else
                   _sample(logits.float(), tokens, top_k, top_p, temperature, freq_penalty, repetition_penalty))
            if stop_ids:
                new = torch.where(finished, torch.full_like(new, pad_id), new)
                finished |= torch.isin(new, torch.tensor(stop_ids, device=new.device))
            tokens = torch.cat([tokens, new[:, None]], dim=1)
            if mask is not None:
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            if stop_ids and bool(finished.all()):
                break
        if return_type == "str":
            decoded = [tok.decode(row, skip_special_tokens=True) for row in tokens]
            return decoded[0] if input_type == "str" or len(decoded) == 1 else decoded
        return tokens

    # --- weights ---------------------------------------------------------------------------------------
    def _stack(self, get: Callable[[Any], torch.Tensor], what: str) -> torch.Tensor:
        """One tensor per block that has ``what``, stacked ``(n_layers, ...)`` (hybrid models: those blocks)."""
        values = [get(block) for block in self.blocks if what in block._children]
        if not values:
            raise AttributeError(f"no block of this {self.model.architecture.model_type} model has an {what}.")
        if len(values) < len(self.blocks):
            warnings.warn(f"only {len(values)} of {len(self.blocks)} blocks have an {what}: the stack's index i is "
                          "the i-th of those blocks, not block i.", stacklevel=3)
        return torch.stack(values)

    W_Q = property(lambda self: self._stack(lambda b: b.attn.W_Q, "attn"),
                   doc="``(n_layers, n_heads, d_model, d_head)``")
    W_K = property(lambda self: self._stack(lambda b: b.attn.W_K, "attn"),
                   doc="``(n_layers, n_key_value_heads, d_model, d_head)``")
    W_V = property(lambda self: self._stack(lambda b: b.attn.W_V, "attn"),
                   doc="``(n_layers, n_key_value_heads, d_model, d_head)``")
    W_O = property(lambda self: self._stack(lambda b: b.attn.W_O, "attn"),
                   doc="``(n_layers, n_heads, d_head, d_model)``")
    b_Q = property(lambda self: self._stack(lambda b: b.attn.b_Q, "attn"), doc="``(n_layers, n_heads, d_head)``")
    b_K = property(lambda self: self._stack(lambda b: b.attn.b_K, "attn"))
    b_V = property(lambda self: self._stack(lambda b: b.attn.b_V, "attn"))
    b_O = property(lambda self: self._stack(lambda b: b.attn.b_O, "attn"), doc="``(n_layers, d_model)``")
    W_in = property(lambda self: self._stack(lambda b: b.mlp.W_in, "mlp"), doc="``(n_layers, d_model, d_mlp)``")
    W_out = property(lambda self: self._stack(lambda b: b.mlp.W_out, "mlp"), doc="``(n_layers, d_mlp, d_model)``")
    b_in = property(lambda self: self._stack(lambda b: b.mlp.b_in, "mlp"), doc="``(n_layers, d_mlp)``")
    b_out = property(lambda self: self._stack(lambda b: b.mlp.b_out, "mlp"), doc="``(n_layers, d_model)``")

    @property
    def W_gate(self) -> torch.Tensor | None:
        """``(n_layers, d_model, d_mlp)`` on gated MLPs; None otherwise (as the bridge)."""
        return self._stack(lambda b: b.mlp.W_gate, "mlp") if self.cfg.gated_mlp else None

    W_E = property(lambda self: self.embed.W_E, doc="``(d_vocab, d_model)``")
    W_U = property(lambda self: self.unembed.W_U, doc="``(d_model, d_vocab)``")
    b_U = property(lambda self: self.unembed.b_U, doc="``(d_vocab,)``, zeros where the head has no bias")
    W_pos = property(lambda self: self.pos_embed.W_pos, doc="``(n_ctx, d_model)``, learned positions only")

    @property
    def W_E_pos(self) -> torch.Tensor:
        """``W_E`` and ``W_pos`` concatenated ``(d_vocab + n_ctx, d_model)``."""
        return torch.cat([self.W_E, self.W_pos], dim=0)

    @property
    def OV(self) -> FactoredMatrix:
        """Every head's ``W_V @ W_O`` ``(n_layers, n_heads, d_model, d_model)``, factored (GQA: kv heads repeated
        for the query heads that read them)."""
        W_O = self.W_O
        return FactoredMatrix(_per_query_head(self.W_V, W_O.shape[-3]), W_O)

    @property
    def QK(self) -> FactoredMatrix:
        """Every head's ``W_Q @ W_K^T`` ``(n_layers, n_heads, d_model, d_model)``, factored (before rotary)."""
        W_Q = self.W_Q
        return FactoredMatrix(W_Q, _per_query_head(self.W_K, W_Q.shape[-3]).transpose(-2, -1))

    def accumulated_bias(self, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True
                         ) -> torch.Tensor:
        """The sum of the attention (``b_O``) and MLP (``b_out``) output biases of the blocks before ``layer``
        (``mlp_input``: also block ``layer``'s ``b_O``) ``(d_model,)``."""
        total = torch.zeros(self.cfg.d_model, device=self.W_E.device, dtype=self.W_E.dtype)
        for i in range(layer):
            block = self.blocks[i]
            if "attn" in block._children:
                total = total + block.attn.b_O.to(total.device)
            if include_mlp_biases and "mlp" in block._children and block.mlp._plan is not None:
                total = total + block.mlp.b_out.to(total.device)
        if mlp_input:
            if layer >= self.cfg.n_layers:
                raise ValueError(f"mlp_input=True: block {layer} does not exist ({self.cfg.n_layers} blocks).")
            if "attn" in self.blocks[layer]._children:
                total = total + self.blocks[layer].attn.b_O.to(total.device)
        return total

    def tokens_to_residual_directions(self, tokens: str | int | torch.Tensor) -> torch.Tensor:
        """The unembedding column(s) of ``tokens``: ``(d_model,)`` for one token, ``(..., d_model)`` for ids."""
        if isinstance(tokens, torch.Tensor) and tokens.numel() > 1:
            return self.W_U[:, tokens].movedim(0, -1)
        if isinstance(tokens, str):
            token = to_single_token(self.model, tokens)
        elif isinstance(tokens, int):
            token = tokens
        elif isinstance(tokens, torch.Tensor):
            token = int(tokens.item())
        else:
            raise TypeError(f"tokens is a string, an int or a tensor of ids, got {type(tokens).__name__}.")
        return self.W_U[:, token]

    def tl_parameters(self) -> dict[str, torch.Tensor]:
        """Every weight under TL's parameter name, as the bridge's ``tl_parameters()``: ``embed.W_E``,
        ``pos_embed.W_pos``, ``blocks.{i}.attn.W_Q`` ... (kv heads repeated to the query heads, missing biases as
        zeros), ``blocks.{i}.mlp.W_in`` ..., ``blocks.{i}.ln1.w``, ``ln_final.w``, ``unembed.W_U`` / ``b_U``."""
        c = self.cfg
        like = self.W_E
        zeros = lambda *shape: torch.zeros(*shape, dtype=like.dtype, device=like.device)  # noqa: E731
        params: dict[str, torch.Tensor] = {"embed.W_E": self.W_E}
        if "pos_embed" in self.__dict__["_top_modules"]:
            params["pos_embed.W_pos"] = self.W_pos
        elif c.positional_embedding_type != "rotary":  # as the bridge: zeros, except on rotary models (none)
            params["pos_embed.W_pos"] = zeros(c.n_ctx or 0, c.d_model)
        for i, block in enumerate(self.blocks):
            if "attn" in block._children:
                attn = block.attn
                for name in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V"):
                    value = getattr(attn, name)
                    if name in ("W_K", "W_V", "b_K", "b_V"):
                        value = _per_query_head(value if value.dim() == 3 else value[..., None], c.n_heads)
                        value = value if name.startswith("W") else value[..., 0]
                    params[f"blocks.{i}.attn.{name}"] = value
                params[f"blocks.{i}.attn.b_O"] = attn.b_O
            if "mlp" in block._children and block.mlp._plan is not None:
                mlp = block.mlp
                for name in ("W_in", "W_out", "b_in", "b_out"):
                    params[f"blocks.{i}.mlp.{name}"] = getattr(mlp, name)
                if mlp.W_gate is not None:
                    params[f"blocks.{i}.mlp.W_gate"] = mlp.W_gate
                    if isinstance(parameter(mlp._plan.gate, "bias"), torch.Tensor):  # as the bridge: only if any
                        params[f"blocks.{i}.mlp.b_gate"] = mlp.b_gate
            for key in ("ln1", "ln2"):
                norm = block._children.get(key)
                for attr in ("w", "b"):
                    value = getattr(norm, attr) if norm is not None else None
                    if isinstance(value, torch.Tensor):
                        params[f"blocks.{i}.{key}.{attr}"] = value
        for attr in ("w", "b"):
            value = getattr(self.ln_final, attr)
            if isinstance(value, torch.Tensor):
                params[f"ln_final.{attr}"] = value
        params["unembed.W_U"] = self.W_U
        params["unembed.b_U"] = self.b_U
        return params

    def tl_named_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` for each of ``tl_parameters()``."""
        yield from self.tl_parameters().items()

    get_params = tl_parameters

    # --- small TL helpers -----------------------------------------------------------------------------
    @property
    def all_head_labels(self) -> "_CallableList":
        """``["L0H0", "L0H1", ...]`` (a property as the bridge's; calling it works too, as HookedTransformer's)."""
        return _CallableList(f"L{l}H{h}" for l in range(self.cfg.n_layers) for h in range(self.cfg.n_heads))

    def get_token_position(self, single_token: str | int, input: str | torch.Tensor, mode: str = "first",
                           prepend_bos: bool | None = None, padding_side: str | None = None) -> int:
        """The position of ``single_token`` in ``input`` (text tokenized as ``to_tokens``, or ids ``(pos,)`` /
        ``(1, pos)``); ``mode="last"`` for the last occurrence."""
        tokens = self.model.to_tokens(input, prepend_bos=prepend_bos, padding_side=padding_side) \
            if isinstance(input, str) else torch.as_tensor(input)
        if tokens.dim() == 2:
            if tokens.shape[0] != 1:
                raise ValueError(f"get_token_position takes one sequence, got a batch of shape {tuple(tokens.shape)}.")
            tokens = tokens[0]
        token = to_single_token(self.model, single_token) if isinstance(single_token, str) else int(single_token)
        where = (tokens == token).nonzero().flatten()
        if len(where) == 0:
            raise ValueError(f"token {token} ({self.model.tokenizer.decode([token])!r}) does not occur in the input.")
        if mode not in ("first", "last"):
            raise ValueError(f"mode must be 'first' or 'last', not {mode!r}.")
        return int(where[0] if mode == "first" else where[-1])

    def to_single_str_token(self, int_token: int) -> str:
        """The string of one token id."""
        return self.model.tokenizer.decode([int(int_token)], clean_up_tokenization_spaces=False)

    def tokens_to_string(self, tokens: Any) -> Any:
        return self.model.to_string(tokens)


class _CallableList(list):
    """A list that returns itself when called (TL's ``all_head_labels`` is a method in HookedTransformer and a
    property in the bridge)."""

    def __call__(self) -> "_CallableList":
        return self


def _sample(logits: torch.Tensor, tokens: torch.Tensor, top_k: int | None, top_p: float | None,
            temperature: float, freq_penalty: float, repetition_penalty: float) -> torch.Tensor:
    """One sampled token per row from ``logits (batch, d_vocab)``: repetition penalty (HF's: seen tokens' positive
    logits divided, negative multiplied), temperature, frequency penalty (minus the count of each token so far),
    then top-k or top-p (nucleus) filtering."""
    if repetition_penalty != 1.0:
        seen = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, tokens, True)
        penalized = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
        logits = torch.where(seen, penalized, logits)
    logits = logits / temperature
    if freq_penalty:
        counts = torch.zeros_like(logits).scatter_add_(1, tokens, torch.ones_like(tokens, dtype=logits.dtype))
        logits = logits - freq_penalty * counts
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    elif top_p is not None:
        ordered, order = logits.sort(dim=-1, descending=True)
        cumulative = ordered.softmax(-1).cumsum(-1)
        drop = cumulative > top_p
        drop[..., 1:] = drop[..., :-1].clone()  # keep the token that crosses top_p
        drop[..., 0] = False
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return torch.distributions.Categorical(logits=logits).sample()
