"""Remote execution (NDIF): the remote-mode build, what a server's plain model supports, refusals before a request is
sent, the load-time remote check, and the offline loopback server the tests run requests against."""

from __future__ import annotations

import ast
import contextlib
import copy
import io
import json
import math
import pickle
import sys
import time
import types
import warnings
import zipfile
from collections import OrderedDict
from typing import Any, Iterator

import torch
from nnsight import LanguageModel
from nnsight.intervention.backends.remote import RemoteBackend
from nnsight.schema.response import ResponseModel, Status
from transformers import AutoTokenizer, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.utils import ModelOutput

from ..arch.discovery import discover, get_rename_dict, probe_dataflow, probe_parallel
from ..core.names import (
    CATALOGUE,
    NO_HOOK_POINTS,
    POINT,
    RemoteUnsupportedError,
    remote_refusal,
)
from .build import Parts
from .loopback import Loopback, RemoteTimeoutError, _fresh_class_trackers
from .validation import ValidationError, _tol

# The columns of remote mode's support table (docs/remote.md): every standardized name but the hook points, which
# are one column ("hook_points").
REMOTE_TABLE_NAMES: tuple[str, ...] = tuple(n for n, e in CATALOGUE.items() if e.kind != POINT)

__all__ = [
    "DEFAULT_REMOTE_TIMEOUT",
    "Loopback",
    "RemoteReplyError",
    "RemoteTimeoutError",
    "RemoteUnsupportedError",
    "load_reply",
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


# ------------------------------------------------------------------------------------------------------------------
# Requests: a timeout, and replies read without running code from them
# ------------------------------------------------------------------------------------------------------------------

DEFAULT_REMOTE_TIMEOUT = 3600.0  # seconds a remote request may take (queueing included); None: no limit


class RemoteReplyError(pickle.UnpicklingError):
    """A server's reply holds something other than saved values (tensors, numbers, strings, containers,
    transformers' outputs and caches): unilens does not load it, since unpickling it could run code here."""


def check_timeout(value: Any) -> float | None:
    """``remote_timeout=``: seconds (a positive number) or None (no limit).

    Example:
        >>> check_timeout(600), check_timeout(None)
        (600.0, None)
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"remote_timeout= takes seconds (a positive number) or None (no limit); got "
                        f"{type(value).__name__} {value!r}.")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"remote_timeout= takes seconds (a positive number) or None (no limit); got {value!r}.")
    return float(value)


def remote_timeout_option(kwargs: dict, remote: Any) -> float | None:
    """Take ``remote_timeout=`` out of ``StandardizedTransformer``'s keyword arguments (checked; default
    ``DEFAULT_REMOTE_TIMEOUT``); refused on a model loaded without ``remote=``.

    Example:
        >>> kwargs = {"remote_timeout": 600, "revision": "main"}
        >>> remote_timeout_option(kwargs, remote=True), kwargs
        (600.0, {'revision': 'main'})
    """
    if "remote_timeout" not in kwargs:
        return DEFAULT_REMOTE_TIMEOUT
    value = check_timeout(kwargs.pop("remote_timeout"))
    if not remote:
        raise TypeError("remote_timeout= applies to remote mode only: pass it with remote= (a local model runs no "
                        "requests).")
    return value


# the builtins a reply may hold beyond torch's weights-only set (a saved slice, range, frozenset, complex)
_REPLY_BUILTINS: dict[str, Any] = {f"builtins.{t.__name__}": t for t in (slice, range, frozenset, complex)}


class _OutputStandIn:
    """Stands in for a transformers ``ModelOutput`` class while a reply is read: torch's weights-only unpickler
    fills only plain dicts, so the output is read as an ``OrderedDict`` and rebuilt as its class afterwards."""

    def __init__(self, cls: type, made: dict) -> None:
        self.cls, self.made = cls, made

    def __call__(self, *args: Any) -> OrderedDict:
        stand_in: OrderedDict = OrderedDict()
        self.made[id(stand_in)] = (self.cls, stand_in)
        return stand_in


def _reply_global(name: str, made: dict | None) -> Any:
    """The object a reply may name as ``name`` (module.attribute) beyond torch's weights-only set, or None: refused.
    A ``ModelOutput`` class is given as a stand-in (``made``: its records) for torch's weights-only unpickler, as
    itself (``made=None``) for the restricted one."""
    if name in _REPLY_BUILTINS:
        return _REPLY_BUILTINS[name]
    if name == f"{Status.__module__}.{Status.__qualname__}":
        return Status
    module_name, _, attr = name.rpartition(".")
    if not module_name.startswith("transformers."):
        return None
    module = sys.modules.get(module_name)  # a module this process loaded already: a reply never imports one
    found = getattr(module, attr, None) if module is not None else None
    if isinstance(found, type) and issubclass(found, ModelOutput):
        return found if made is None else (_OutputStandIn(found, made), name)
    if isinstance(found, type) and issubclass(found, (Cache, CacheLayerMixin)):
        return found
    return None


def _refused(name: str) -> RemoteReplyError:
    return RemoteReplyError(
        f"the server's reply holds {name}, which is not a saved value (tensor, number, string, container, "
        "transformers output or cache): unilens does not load it, since unpickling it could run code on this "
        "machine. Save tensors and plain values in the traced block, and use a server you trust.")


def _rebuild_outputs(value: Any, made: dict, memo: dict) -> Any:
    """``value`` with every stand-in ``OrderedDict`` rebuilt as its ``ModelOutput`` class (containers walked)."""
    key = id(value)
    if key in memo:
        return memo[key]
    if key in made and made[key][1] is value:
        out = made[key][0](**{k: _rebuild_outputs(v, made, memo) for k, v in value.items()})
    elif type(value) in (dict, OrderedDict):
        out = type(value)((k, _rebuild_outputs(v, made, memo)) for k, v in value.items())
    elif type(value) in (list, tuple):
        out = type(value)(_rebuild_outputs(v, made, memo) for v in value)
    else:
        out = value
    memo[key] = out
    return out


def _pickle_protocol(content: bytes) -> int:
    """The pickle protocol of a ``torch.save`` archive's ``data.pkl``; refuses what is not such an archive (or is
    a TorchScript archive, which ``torch.load`` would hand to ``torch.jit.load``)."""
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as archive:
            names = archive.namelist()
            data = [n for n in names if n.endswith("/data.pkl")]
            if any(n.endswith("/constants.pkl") or "/code/" in n for n in names) or len(data) != 1:
                raise RemoteReplyError(f"the server's reply is not a torch.save archive of saved values (it holds "
                                       f"{names[:4]}); unilens does not load it.")
            head = archive.read(data[0])[:2]
    except zipfile.BadZipFile:
        raise RemoteReplyError(f"the server's reply ({len(content):,} bytes) is not a torch.save archive; is the "
                               "remote= address an NDIF server?") from None
    return head[1] if len(head) == 2 and head[0] == pickle.PROTO[0] else 0


def _load_restricted(content: bytes) -> Any:
    """``torch.load`` through a restricted unpickler (stdlib ``pickle`` with ``find_class`` answering only torch's
    weights-only globals and ``_reply_global``'s): for pickles of protocol 3+ (nnsight's binary status frames use 4),
    whose opcodes torch's weights-only unpickler cannot parse."""
    allowed = dict(torch._weights_only_unpickler._get_allowed_globals())

    class RestrictedUnpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            full = f"{module}.{name}"
            found = allowed.get(full) or _reply_global(full, None)
            if found is None:
                raise _refused(full)
            return found

    def load(file: Any, **kwargs: Any) -> Any:
        return RestrictedUnpickler(file, **kwargs).load()

    module = types.SimpleNamespace(__name__="unilens_restricted_pickle", Unpickler=RestrictedUnpickler, load=load)
    return torch.load(io.BytesIO(content), map_location="cpu", weights_only=False, pickle_module=module)


def load_reply(content: bytes) -> Any:
    """Read a server's reply (``torch.save`` bytes of the saved values) without running code from it:
    ``torch.load(weights_only=True)``, with a narrow allow-list for what a traced block legitimately saves beyond
    tensors, numbers, strings and containers: transformers' outputs (``model.output``) and caches (classes of
    modules this process has loaded already), and ``slice`` / ``range`` / ``frozenset`` / ``complex``. A reply
    pickled with protocol 3+ (which torch's weights-only unpickler cannot parse) is read by a restricted unpickler
    with the same allow-list. Anything else (a pickled call of ``os.system``...) raises ``RemoteReplyError``
    before anything is built.

    Example:
        >>> buffer = io.BytesIO(); torch.save({"h": torch.ones(2), "n": [1, "a"]}, buffer)
        >>> load_reply(buffer.getvalue())["n"]
        [1, 'a']
    """
    if _pickle_protocol(content) > 2:
        return _load_restricted(content)
    made: dict = {}
    allowed = []
    for name in torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(content)):
        found = _reply_global(name, made)
        if found is None:
            raise _refused(name)
        allowed.append(found)
    try:
        with torch.serialization.safe_globals(allowed):
            result = torch.load(io.BytesIO(content), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = [line.strip() for line in str(err).splitlines() if line.strip()]
        raise RemoteReplyError(f"the server's reply cannot be read safely ({(reason or ['?'])[-1][:200]}); unilens "
                               "reads replies with torch.load(weights_only=True): save tensors and plain values.") \
            from None
    return _rebuild_outputs(result, made, {}) if made else result


class _NdifBackend(RemoteBackend):
    """nnsight's ``RemoteBackend`` (NDIF) with two changes: a deadline for the whole blocking request (``timeout``
    seconds: connecting, queueing, running, downloading), and replies read by ``load_reply`` (nnsight 0.8.1 reads
    both the result and a binary status frame with ``torch.load(weights_only=False)``)."""

    def __init__(self, *args: Any, timeout: float | None = None, **kwargs: Any) -> None:
        RemoteBackend.__init__(self, *args, **kwargs)
        self.timeout = timeout

    @staticmethod
    def parse(message: str | bytes) -> ResponseModel:
        """A status frame: JSON text, or a binary frame carrying the result (read by ``load_reply``)."""
        if isinstance(message, (bytes, bytearray)):
            return ResponseModel(**load_reply(bytes(message)))
        return ResponseModel.model_validate_json(message)

    def finalize(self, content: bytes) -> Any:
        """Decompress (if the request was compressed) and read the result with ``load_reply``."""
        self._log(f"result: {len(content):,} bytes")
        if self.compress:
            import zstandard as zstd

            content = zstd.ZstdDecompressor().decompress(content)
        return load_reply(content)

    def _left(self, deadline: float | None, job: str | None) -> float | None:
        """Seconds left before ``deadline`` (None: no limit); past it, ``RemoteTimeoutError``."""
        if deadline is None:
            return None
        left = deadline - time.monotonic()
        if left <= 0:
            where = f"NDIF job {job}" if job else "the request to NDIF"
            raise RemoteTimeoutError(
                f"{where} did not complete within remote_timeout={self.timeout:g} s (it may still run on the "
                "server); raise the limit (remote_timeout=None: no limit), or submit with blocking=False and poll.")
        return left

    def request(self, request: Any, tracer: Any) -> Any:
        """nnsight's blocking request (subscribe, POST, stream status updates until COMPLETED) with a deadline."""
        import websocket

        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        blob = self._serialize(tracer)
        connection = websocket.create_connection(
            f"{self.ws_host}/subscribe", header={"ndif-api-key": self.api_key} if self.api_key else None,
            timeout=self._left(deadline, None))
        job = None
        try:
            request.session_id = json.loads(connection.recv())["session_id"]
            response = self._post(request, blob)
            job = response.id
            self.handle(response)
            while True:
                left = self._left(deadline, job)
                wait = [t for t in (0.1 if self.display.enabled else None, left) if t is not None]
                connection.settimeout(min(wait) if wait else None)
                try:
                    message = connection.recv()
                except websocket.WebSocketTimeoutException:
                    self.display.refresh()
                    continue
                response = self.parse(message)
                result = self.handle(response)
                if response.status == Status.COMPLETED:
                    return result
        finally:
            connection.close()


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

        register("unilens")  # unilens is not installed on NDIF: its code travels with the request
        if self.target == "local":  # nnsight's dry run deserializes in this process: keep the live classes intact
            from nnsight.intervention.backends.local import LocalSimulationBackend

            with _fresh_class_trackers():
                return LocalSimulationBackend(self.model, verbose=self.options.get("verbose", False))(tracer)

        backend = _NdifBackend(  # as nnsight's Remotable._remote_backend builds it, with the deadline and safe reads
            self.model.to_model_key(), host=self.target if isinstance(self.target, str) else None,
            env=self.model._remoteable_get_env(), blocking=self.options.get("blocking", True),
            job_id=self.options.get("job_id"), verbose=self.options.get("verbose", False),
            timeout=self.options.get("remote_timeout", DEFAULT_REMOTE_TIMEOUT))
        return backend(tracer)

    def _loopback(self, tracer: Any) -> dict:
        from nnsight import register
        from nnsight.schema.request import RequestModel

        register("unilens")
        blob = RequestModel.serialize(tracer, compress=False)
        reply = self.target.run(blob, timeout=self.options.get("remote_timeout", DEFAULT_REMOTE_TIMEOUT))
        result = load_reply(reply)
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
    first, outputs, lens = first.detach(), [o.detach() for o in outputs], None if lens is None else lens.detach()
    if hidden is not None:  # the server ran its forward with autograd on: compare values, not graphs
        hidden = [h.detach() for h in hidden]
    logits = reference.logits.detach()
    if hidden is None or len(hidden) != n + 1:
        raise ValidationError(f"{model.architecture.model_type}: the server returned "
                              f"{None if hidden is None else len(hidden)} hidden states for {n} discovered layers.")
    errors["layers_input[0] vs hidden_states[0]"] = float((first - hidden[0]).abs().max())
    for i in range(n - 1):
        errors[f"layers_output[{i}] vs hidden_states[{i + 1}]"] = float((outputs[i] - hidden[i + 1]).abs().max())
    if lens is not None:
        errors["project_on_vocab(layers_output[-1]) vs logits"] = float((lens - logits).abs().max())
    tol = _tol(logits.dtype) * max(1.0, float(logits.abs().max()))
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
    unknown = set(kwargs) - {"attn_implementation", "revision", "remote_timeout"}
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


def _remote_options(kwargs: dict, default_timeout: float | None) -> dict:
    """Take the per-call remote options out of trace / session kwargs (the model's server is fixed at load):
    nnsight's ``blocking`` / ``job_id`` / ``verbose``, and ``remote_timeout`` (default: the model's)."""
    kwargs.pop("remote", None)
    options = {k: kwargs.pop(k) for k in ("blocking", "job_id", "verbose") if k in kwargs}
    options["remote_timeout"] = check_timeout(kwargs.pop("remote_timeout")) if "remote_timeout" in kwargs \
        else default_timeout
    return options


class RemoteMode:
    """Remote mode (NDIF, nnsight's ``"local"`` dry run, or a ``Loopback`` server) for ``StandardizedTransformer``:
    every trace / session goes to the model's server, what its plain model cannot serve is refused before a request
    is sent, and the class ships by value (the server has no unilens: nothing here imports unilens at run time, and
    no zero-argument ``super()``)."""

    def _enter_remote_mode(self, target: Any, repo_id: str, revision: str | None, check: bool,
                           timeout: float | None = DEFAULT_REMOTE_TIMEOUT) -> None:
        """After ``unilens.model.build.attach``: remember the server and the request timeout (seconds, None: no
        limit), refuse what it cannot serve, and check the view with one remote trace (or warn when ``check=False``)."""
        object.__setattr__(self, "_remote_mode", True)
        object.__setattr__(self, "_remote_target", target)
        object.__setattr__(self, "_remote_timeout", check_timeout(timeout))
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
        """nnsight's ``trace``; in remote mode every trace goes to the model's server (``remote=`` at load), and
        ``remote_timeout=`` (seconds, None: no limit) overrides the model's request timeout for this trace."""
        target = self.__dict__.get("_remote_target")
        if target is not None and kwargs.get("backend") is None:
            options = _remote_options(kwargs, self.__dict__.get("_remote_timeout", DEFAULT_REMOTE_TIMEOUT))
            kwargs["backend"] = remote_backend(self, target, **options)
        elif kwargs.get("remote") and not self.__dict__.get("_remote_mode"):
            raise ValueError(f"trace(remote={kwargs['remote']!r}) on a model loaded locally: load it in remote mode "
                             "instead, StandardizedTransformer(repo_id, remote=True) (or remote='local' with a loaded "
                             "model object), so unilens builds the view a server's plain model can serve.")
        return LanguageModel.trace(self, *inputs, **kwargs)

    def session(self, *args: Any, **kwargs: Any) -> Any:
        """nnsight's ``session``; in remote mode the whole session is one request to the model's server
        (``remote_timeout=`` as for ``trace``)."""
        target = self.__dict__.get("_remote_target")
        if target is not None and kwargs.get("backend") is None:
            options = _remote_options(kwargs, self.__dict__.get("_remote_timeout", DEFAULT_REMOTE_TIMEOUT))
            kwargs["backend"] = remote_backend(self, target, **options)
        return LanguageModel.session(self, *args, **kwargs)

    def _remoteable_class(self) -> type:
        """NDIF serves plain nnsight deployments: the model key names nnsight's class (unilens ships by value)."""
        return LanguageModel._remoteable_class(self)

    def __getstate__(self) -> dict:
        state = LanguageModel.__getstate__(self)
        state.pop("_remote_target", None)  # the client's connection (a loopback server holds a whole model)
        return state
