"""Remote execution (NDIF): the remote-mode build, what a server's plain model supports, refusals before a request is
sent, the load-time remote check, and the offline loopback server the tests run requests against."""

from __future__ import annotations

import ast
import contextlib
import copy
import io
import types
import warnings
from typing import Any, Iterator

import torch
from nnsight import LanguageModel
from transformers import AutoTokenizer, PretrainedConfig, PreTrainedModel

from ..arch.discovery import discover, get_rename_dict, probe_dataflow, probe_parallel
from ..core.names import (
    CATALOGUE,
    NO_HOOK_POINTS,
    POINT,
    RemoteUnsupportedError,
    remote_refusal,
)
from .build import Parts
from .loopback import Loopback, _fresh_class_trackers
from .validation import ValidationError, _tol

# The columns of remote mode's support table (docs/remote.md): every standardized name but the hook points, which
# are one column ("hook_points").
REMOTE_TABLE_NAMES: tuple[str, ...] = tuple(n for n, e in CATALOGUE.items() if e.kind != POINT)

__all__ = [
    "Loopback",
    "RemoteUnsupportedError",
    "check_block",
    "meta_structure",
    "refusal",
    "refused_name",
    "remote_support",
    "support_table",
    "validate_remote",
]

# model methods refused in remote mode: they read the weights (which stay on the server) or are not routed remotely.
# Which standardized tensors remote mode serves is the catalogue's `remote` flag (unilens.core.names).
_LOCAL_ONLY_METHODS = {
    "weights": "the weight views read the weights, which stay on the server (the local structure is on the meta "
               "device)",
    "generate": "unilens does not route generation through a remote backend yet (tried as is, the request fails "
                "to serialize); run one model.trace per step, or generate on a local model",
}


def refused_name(name: str) -> bool:
    """Whether ``name`` is an accessor remote mode refuses (the catalogue's ``remote`` flag).

    Example:
        >>> refused_name("attention_scores"), refused_name("layers_output"), refused_name("mlps_pre_activation")
        (True, False, True)
    """
    return remote_refusal(name) is not None


def refusal(name: str) -> str:
    """The message for a refused accessor / method ``name`` in remote mode.

    Example:
        >>> "hook points" in refusal("attention_probabilities")
        True
    """
    if name in _LOCAL_ONLY_METHODS:
        return (f"model.{name} is not available in remote mode: {_LOCAL_ONLY_METHODS[name]}. Use it on a model "
                "loaded locally (StandardizedTransformer(source) without remote=).")
    return remote_refusal(name) or f"{name} is refused in remote mode: it is not supported remotely."


class RefusedAccessor:
    """Stands in for an accessor remote mode cannot serve: any use raises ``RemoteUnsupportedError``."""

    def __init__(self, name: str):
        self._name = name

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise RemoteUnsupportedError(refusal(self._name))

    __getitem__ = __setitem__ = __call__ = __iter__ = __len__ = _refuse


def check_block(model: Any, tracer: Any) -> None:
    """Refuse, before serialization, a traced block that uses a feature the server's plain model lacks.

    Walks the block's syntax (``tracer.node``) for attributes (or strings) named like a refused accessor
    (``attention_*``, ``unilens_hooks``); raises ``RemoteUnsupportedError`` naming the first one and why. A name the
    block only computes at run time is refused on the server by the same accessor (same message).

    Example:
        >>> import ast
        >>> class T: node = ast.parse("p = model.attention_probabilities[0].save()")
        >>> try:
        ...     check_block(None, T())
        ... except RemoteUnsupportedError as err:
        ...     print(str(err).split(":")[0])
        attention_probabilities is refused in remote mode
    """
    node = getattr(tracer, "node", None)
    if node is None:
        return
    for sub in ast.walk(node):  # model.attention_scores, or getattr(model, "attention_scores")
        name = sub.attr if isinstance(sub, ast.Attribute) else None
        if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
            name = sub.value.partition(".")[0]  # also model.read-style names, "attention_scores.3"
        if name is not None and refused_name(name):
            raise RemoteUnsupportedError(refusal(name) + f" (line {getattr(sub, 'lineno', '?')} of the traced block)")


_SOURCES: dict = {}  # function -> inspect.getsourcelines of it


@contextlib.contextmanager
def _cached_sources() -> Iterator[None]:
    """While inside, ``inspect.getsourcelines`` answers from a per-function cache. nnsight ships every unilens
    function by its source, read with ``inspect`` (tokenizing the file) twice per function and request: ~0.9 s of
    a tiny model's request. A function's code is fixed, so the cached source is also the right answer when the file
    changed on disk since the function was loaded (inspect would read the new file against the old line numbers)."""
    import inspect

    original = inspect.getsourcelines

    def cached(obj: Any) -> Any:
        if not isinstance(obj, types.FunctionType):  # keyed by the function itself: decorator wrappers share code
            return original(obj)
        if obj not in _SOURCES:
            _SOURCES[obj] = original(obj)
        return _SOURCES[obj]

    inspect.getsourcelines = cached
    try:
        yield
    finally:
        inspect.getsourcelines = original


class _RemoteBackend:
    """The client side of a remote-mode trace: refuse unsupported features, then send to NDIF / a loopback /
    nnsight's local simulation."""

    def __init__(self, model: Any, target: Any, **options: Any):
        self.model, self.target, self.options = model, target, options

    def __call__(self, tracer: Any) -> Any:
        check_block(self.model, tracer)
        _return_filled_containers(tracer)
        with _cached_sources():
            return self._send(tracer)

    def _send(self, tracer: Any) -> Any:
        if isinstance(self.target, Loopback):
            return self._loopback(tracer)
        from nnsight import register
        from nnsight.modeling.mixins.remotable import Remotable

        register("unilens")  # unilens is not installed on NDIF: its code travels with the request
        if self.target == "local":  # nnsight's dry run deserializes in this process: keep the live classes intact
            from nnsight.intervention.backends.local import LocalSimulationBackend

            with _fresh_class_trackers():
                return LocalSimulationBackend(self.model, verbose=self.options.get("verbose", False))(tracer)

        backend = Remotable._remote_backend(self.model, self.target, self.options.get("blocking", True),
                                            self.options.get("job_id"), self.options.get("verbose", False))
        return backend(tracer)

    def _loopback(self, tracer: Any) -> dict:
        from nnsight import register
        from nnsight.intervention.backends.remote import RemoteBackend
        from nnsight.schema.request import RequestModel

        register("unilens")
        blob = RequestModel.serialize(tracer, compress=False)
        result = torch.load(io.BytesIO(self.target.run(blob)), map_location="cpu", weights_only=False)
        RemoteBackend._push(None, result, tracer)  # like a real response: mark saved, write into the frame
        return result


_MUTATORS = {"append", "extend", "insert", "update", "setdefault", "add"}
_SAVE_NAME = "__unilens_save__"


def _return_filled_containers(tracer: Any) -> None:
    """Make the "build a dict / list outside the trace, fill it inside" idiom work remotely: nnsight sends back
    saved NAMES only, so a container the block fills (``saved[k] = ...``, ``out.append(...)``) would come back
    empty. The block sent is a copy of the captured one ending in ``name = save(name)`` for each such container the
    caller's frame holds; the server's filled copy then replaces the caller's variable (locally: the same object)."""
    node = getattr(tracer, "node", None)
    frame = getattr(getattr(tracer, "info", None), "frame", None)
    if node is None or frame is None:
        return
    filled = []
    for sub in ast.walk(node):
        target = None
        if isinstance(sub, ast.Subscript) and isinstance(sub.ctx, ast.Store) and isinstance(sub.value, ast.Name):
            target = sub.value.id
        elif (isinstance(sub, ast.Call) and isinstance(sub.func, ast.Attribute) and sub.func.attr in _MUTATORS
              and isinstance(sub.func.value, ast.Name)):
            target = sub.func.value.id
        if target and target not in filled and isinstance(frame.f_locals.get(target), (dict, list, set)):
            filled.append(target)
    if not filled:
        return
    node = copy.deepcopy(node)  # the captured node is memoized per call site: never edit it in place
    extra = ast.parse(f"from nnsight import save as {_SAVE_NAME}\n"
                      + "".join(f"{n} = {_SAVE_NAME}({n})\n" for n in filled)).body
    last = node.body[-1]
    for stmt in extra:
        ast.copy_location(stmt, last)
        ast.fix_missing_locations(stmt)
    node.body = [*node.body, *extra]
    tracer.node = node


def remote_backend(model: Any, target: Any, **options: Any) -> _RemoteBackend:
    """The backend a remote-mode model's traces use (``target``: True, a host URL, ``"local"`` or a Loopback);
    ``StandardizedTransformer.trace`` / ``session`` pass it for every trace of a remote-mode model (internal)."""
    return _RemoteBackend(model, target, **options)


# ------------------------------------------------------------------------------------------------------------------
# The remote-mode build
# ------------------------------------------------------------------------------------------------------------------


def meta_structure(source: Any, trust_remote_code: bool = False, attn_implementation: str | None = None) -> Any:
    """The model's module tree on the meta device (no weights), from a hub id, a folder or a config.

    Example:
        >>> from unilens.testing import tiny_config
        >>> meta_structure(tiny_config("llama")).lm_head.weight.device.type
        'meta'
    """
    from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

    config = source if isinstance(source, PretrainedConfig) else AutoConfig.from_pretrained(
        str(source), trust_remote_code=trust_remote_code
    )
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, **kwargs)
    return model.eval()


_PROBE_VOCAB = 1024  # a probe copy's vocabulary when the model's is larger: the probes read 4 token ids below it


def _build_random(config: Any) -> Any:
    from transformers import AutoModelForCausalLM

    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    finally:
        torch.random.set_rng_state(state)


def probe_copy(structure: Any, arch: Any) -> tuple[Any, int]:
    """A randomly initialised CPU copy of ``structure``'s architecture for discovery's data-flow probes (what runs in
    parallel, where the final norm is, which branch adds the residual itself): these depend on the code and the
    config, not on the weights. The copy keeps only the layers up to the first one with attention and an MLP (the
    layers the probes read) and at most ``_PROBE_VOCAB`` tokens, so a 70B model's probe is one layer's size; where
    the config does not allow that (its discovered layers would differ), the full config is built. Returns
    ``(model, layers kept)``.

    Example:
        >>> from unilens.discovery import discover
        >>> structure = meta_structure(__import__("unilens.testing").testing.tiny_config("llama"))
        >>> copy_, kept = probe_copy(structure, discover(structure))
        >>> kept, next(copy_.parameters()).device.type
        (1, 'cpu')
    """
    n = arch.num_layers
    both = [i for i, p in enumerate(arch.layers) if p.attention is not None and p.mlp_in is not None]
    keep = min(n, (both or arch.attention_layers or [0])[0] + 1)
    config = copy.deepcopy(structure.config)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = getattr(text, "vocab_size", None)
    if keep < n:
        for name, value in list(vars(text).items()):
            if isinstance(value, (list, tuple)) and len(value) == n:  # per-layer settings (layer_types, ...)
                setattr(text, name, type(value)(value[:keep]))
        text.num_hidden_layers = keep
    if isinstance(vocab, int) and vocab > _PROBE_VOCAB:
        text.vocab_size = _PROBE_VOCAB
        for name, value in list(vars(text).items()):
            if name.endswith("token_id") and isinstance(value, int) and value >= _PROBE_VOCAB:
                setattr(text, name, None)
    try:
        small = _build_random(config)
        if discover(small).layers != arch.layers[:keep] or (keep < n and discover(small).num_layers != keep):
            raise ValueError("the reduced config builds other layers")
        return small, keep
    except Exception:  # noqa: BLE001 - a config that cannot be reduced: probe the full architecture
        return _build_random(copy.deepcopy(structure.config)), n


def remote_architecture(structure: Any) -> Any:
    """The ``Architecture`` of a model known only by its structure (meta device): ``discover`` on the structure, the
    data-flow probes on ``probe_copy`` and their findings carried over to every layer.

    Example:
        >>> from unilens.discovery import discover, probe_dataflow, probe_parallel
        >>> from unilens.testing import tiny_model
        >>> hf, _ = tiny_model("falcon")
        >>> local = discover(hf); local.parallel = probe_parallel(hf, local); probe_dataflow(hf, local)
        >>> remote_architecture(meta_structure(hf.config)) == local
        True
    """
    arch = discover(structure)
    small, kept = probe_copy(structure, arch)
    found = discover(small)
    before = copy.deepcopy(found.layers)
    found.parallel = probe_parallel(small, found)
    probe_dataflow(small, found)
    if kept == arch.num_layers:
        return found
    for name in ("parallel", "final_norm_path", "head_chain", "head_error", "mutated_in_place",
                 "position_embed_path"):
        setattr(arch, name, copy.deepcopy(getattr(found, name)))
    moved = {(b.attention, b.mlp, b.mlp_in, b.mlp_out): a for b, a in zip(before, found.layers)}
    for i, part in enumerate(arch.layers):  # the probes moved a branch's output to its last projection: same there
        after = moved.get((part.attention, part.mlp, part.mlp_in, part.mlp_out))
        if after is not None:
            arch.layers[i] = copy.deepcopy(after)
    return arch


def validate_remote(model: Any, text: str = "The quick brown fox jumps over the lazy dog") -> dict[str, float]:
    """The load-time check of a remote-mode model, as ONE small remote trace: every ``layers_output[i]`` against the
    server model's own ``output_hidden_states`` (every layer but the last, whose HF state may be normed),
    ``layers_input[0]`` against ``hidden_states[0]``, and ``project_on_vocab(layers_output[-1])`` against the
    logits. Returns the maximum absolute errors; raises ``ValidationError`` past the load check's tolerance.

    Example:
        >>> from unilens import StandardizedTransformer
        >>> from unilens.testing import tiny_model
        >>> hf, tok = tiny_model("gpt2")
        >>> model = StandardizedTransformer(hf, tokenizer=tok, remote=Loopback(tiny_model("gpt2")[0], tok))
        >>> max(validate_remote(model).values()) < 1e-5
        True
    """
    ids = model.tokenizer(text, return_tensors="pt")["input_ids"][:, :12]
    n = model.num_layers
    with torch.no_grad(), model.trace(ids, output_hidden_states=True):
        first = model.layers_input[0].save()
        outputs = [model.layers_output[i] for i in range(n)]
        outputs = nnsight_save(outputs)
        lens = model.project_on_vocab(outputs[-1]).save() if model.architecture.head_chain is not None else None
        reference = model.output.save()
    hidden = reference.hidden_states
    errors: dict[str, float] = {}
    if hidden is None or len(hidden) != n + 1:
        raise ValidationError(f"{model.architecture.model_type}: the server returned "
                              f"{None if hidden is None else len(hidden)} hidden states for {n} discovered layers.")
    errors["layers_input[0] vs hidden_states[0]"] = float((first - hidden[0]).abs().max())
    for i in range(n - 1):
        errors[f"layers_output[{i}] vs hidden_states[{i + 1}]"] = float((outputs[i] - hidden[i + 1]).abs().max())
    if lens is not None:
        errors["project_on_vocab(layers_output[-1]) vs logits"] = float((lens - reference.logits).abs().max())
    tol = _tol(reference.logits.dtype) * max(1.0, float(reference.logits.abs().max()))
    bad = {k: v for k, v in errors.items() if v > tol}
    if bad:
        raise ValidationError(f"remote load check failed for {model.architecture.model_type}: {bad} (tolerance "
                              f"{tol:.3g}); pass check=False to load anyway.")
    return errors


def nnsight_save(value: Any) -> Any:
    """``nnsight.save`` (a container built inside a trace comes back only when saved itself)."""
    from nnsight import save

    return save(value)


# ------------------------------------------------------------------------------------------------------------------
# The support table (docs/remote.md)
# ------------------------------------------------------------------------------------------------------------------


def remote_support(model: Any) -> dict[str, str]:
    """Per standardized accessor of ``model``: ``"supported"``, ``"refused: <why>"`` or ``"n/a: <why>"`` (the model
    has no such part, locally either). The hook points of ``unilens.hook_points`` are one entry, ``"hook_points"``.

    Example:
        >>> from unilens import StandardizedTransformer
        >>> from unilens.testing import tiny_model
        >>> support = remote_support(StandardizedTransformer(*tiny_model("llama"), check=False))
        >>> support["layers_output"], support["attention_probabilities"].split(":")[0]
        ('supported', 'refused')
    """
    arch = model.architecture
    out: dict[str, str] = {}
    for name in REMOTE_TABLE_NAMES:
        entry = CATALOGUE[name]
        if entry.remote is not None:
            out[name] = "refused: " + entry.remote
        elif name.startswith("attentions") and not arch.attention_layers:
            out[name] = "n/a: no softmax attention layer"
        elif name == "mlps_input" and not any(p.mlp_in for p in arch.layers):
            out[name] = "n/a: no MLP found"
        elif name == "mlps_output" and not any(p.mlp_out for p in arch.layers):
            out[name] = "n/a: no MLP found"
        elif name == "position_embeddings" and arch.position_embed_path is None:
            out[name] = "n/a: no learned absolute position embedding"
        else:
            out[name] = "supported"
    out["hook_points"] = "refused: " + NO_HOOK_POINTS  # one column for every TransformerLens-style hook point
    return out


def remote_parts(
    source: Any,
    tokenizer: Any,
    target: Any,
    *,
    trust_remote_code: bool = False,
    tokenizer_kwargs: dict | None = None,
    rename_config: dict[str, str] | None = None,
    **kwargs: Any,
) -> tuple[Parts, str]:
    """The parts of a remote-mode model (``unilens.model.build``) and its repo id: the structure without weights
    (meta device) for a hub id, folder or config, or the given model object; the standardized names discovered from
    it (data-flow probes on a random-weight copy); no hook point or attention function installed (the server has
    none).

    Example:
        >>> from unilens.testing import tiny_model
        >>> hf, tok = tiny_model("llama")
        >>> parts, repo_id = remote_parts(hf, tok, "local")
        >>> parts.architecture.layers_path, parts.attention_setup is None
        ('model.layers', True)
    """
    if not (target is True or isinstance(target, str) or isinstance(target, Loopback)):
        raise TypeError(f"remote= takes True (NDIF), a host URL, 'local' (nnsight's dry run against this process's "
                        f"model) or a unilens.remote.Loopback server; got {type(target).__name__}.")
    unknown = set(kwargs) - {"attn_implementation", "revision"}
    if unknown:
        raise TypeError(f"remote mode loads no weights here, so {sorted(unknown)} cannot apply; the deployment "
                        "decides dtype and devices.")
    if isinstance(source, PreTrainedModel):
        structure = probe_model = source
        if tokenizer is None:
            raise ValueError("a model object in remote mode needs its tokenizer: pass tokenizer=.")
        repo_id = getattr(source.config, "_name_or_path", "") or type(source).__name__
    else:
        if target == "local":
            raise ValueError("remote='local' runs requests against this process's own model: pass a loaded model "
                             "object (StandardizedTransformer(hf_model, tokenizer=tok, remote='local')).")
        structure = meta_structure(source, trust_remote_code, kwargs.get("attn_implementation"))
        probe_model = None  # the structure has no weights: remote_architecture probes a small random copy
        if tokenizer is None:
            if isinstance(source, PretrainedConfig):
                raise ValueError("a config in remote mode needs its tokenizer: pass tokenizer=.")
            tokenizer = AutoTokenizer.from_pretrained(str(source), trust_remote_code=trust_remote_code,
                                                      **(tokenizer_kwargs or {}))
        repo_id = str(getattr(source, "_name_or_path", source))
    if probe_model is not None:  # a model object: probe it as the local build does
        arch = discover(probe_model)
        arch.parallel = probe_parallel(probe_model, arch)
        probe_dataflow(probe_model, arch)
    else:
        arch = remote_architecture(structure)
    rename = get_rename_dict(structure, rename_config, architecture=arch)
    meta = next(structure.parameters()).device.type == "meta"
    if meta and getattr(structure, "hf_device_map", None) is None:
        structure.hf_device_map = {"": "meta"}  # placed already: transformers' pipeline must not move (copy) it
    no_hooks = [None] * arch.num_layers  # no hook points remotely
    return Parts(structure, tokenizer, arch, rename, no_hooks, rename_config=rename_config), repo_id


# ------------------------------------------------------------------------------------------------------------------
# The remote-mode capability of the model class
# ------------------------------------------------------------------------------------------------------------------


def _remote_options(kwargs: dict) -> dict:
    """Take nnsight's per-call remote options out of trace / session kwargs (the model's server is fixed at load)."""
    kwargs.pop("remote", None)
    return {k: kwargs.pop(k) for k in ("blocking", "job_id", "verbose") if k in kwargs}


class RemoteMode:
    """Remote mode (NDIF, nnsight's ``"local"`` dry run, or a ``Loopback`` server) for ``StandardizedTransformer``:
    every trace / session goes to the model's server, what its plain model cannot serve is refused before a request
    is sent, and the class ships by value (the server has no unilens: nothing here imports unilens at run time, and
    no zero-argument ``super()``)."""

    def _enter_remote_mode(self, target: Any, repo_id: str, revision: str | None, check: bool) -> None:
        """After ``unilens.model.build.attach``: remember the server, refuse what it cannot serve, and check the view
        with one remote trace (or warn when ``check=False``)."""
        object.__setattr__(self, "_remote_mode", True)
        object.__setattr__(self, "_remote_target", target)
        object.__setattr__(self, "repo_id", repo_id)
        if revision:
            object.__setattr__(self, "revision", revision)
        object.__setattr__(self, "generate", RefusedAccessor("generate"))  # shadows the method: refused, not pickled
        for name, entry in CATALOGUE.items():
            # per-layer names are instance attributes; whole-model ones (final_norm_*) are properties, refused there
            if entry.remote is not None and (entry.per_layer or name in self.__dict__):
                object.__setattr__(self, name, RefusedAccessor(name))
        if check:
            validate_remote(self)
        else:
            warnings.warn("remote mode with check=False: the standardized view was not checked against the server "
                          "model's own hidden states.", stacklevel=4)

    def _interleave_remote(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """The remote-mode run of one trace, on the server's plain model (or a local dry run): the batch's input ids
        and mask are remembered by a pre-hook that lives for this run only, and no attention request exists. Runs
        where unilens is not installed (shipped by value): no imports, no zero-argument ``super()``."""
        self._trace_reads.clear()
        handle = self._module.register_forward_pre_hook(self._remember_batch, with_kwargs=True)
        try:
            return LanguageModel.interleave(self, fn, *args, **kwargs)
        finally:
            handle.remove()

    def trace(self, *inputs: Any, **kwargs: Any) -> Any:
        """nnsight's ``trace``; in remote mode every trace goes to the model's server (``remote=`` at load)."""
        target = self.__dict__.get("_remote_target")
        if target is not None and kwargs.get("backend") is None:
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
            kwargs["backend"] = remote_backend(self, target, **_remote_options(kwargs))
        return LanguageModel.session(self, *args, **kwargs)

    def _remoteable_class(self) -> type:
        """NDIF serves plain nnsight deployments: the model key names nnsight's class (unilens ships by value)."""
        return LanguageModel._remoteable_class(self)

    def __getstate__(self) -> dict:
        state = LanguageModel.__getstate__(self)
        state.pop("_remote_target", None)  # the client's connection (a loopback server holds a whole model)
        return state
