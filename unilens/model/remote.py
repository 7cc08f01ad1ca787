"""Remote execution (NDIF): the remote-mode build, what a server's plain model supports, refusals before a request is
sent, the load-time remote check, and the offline loopback server the tests run requests against."""

from __future__ import annotations

import ast
import contextlib
import copy
import copyreg
import functools
import io
import json
import math
import pickle
import sys
import threading
import time
import types
import warnings
import weakref
import zipfile
from collections import OrderedDict
from typing import Any, Iterator

import torch
from nnsight import TransformersModel
from nnsight.intervention.backends.remote import RemoteBackend
from nnsight.schema.response import ResponseModel, Status
from transformers import AutoTokenizer, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.utils import ModelOutput

from ..arch.discovery import discover, get_rename_dict, probe_dataflow, probe_parallel
from ..arch.structure import find_output_projection, is_projection, is_quantized, uses_attention_interface
from ..core.accessors import LayerIndexed
from ..core.names import (
    ATTENTION,
    CATALOGUE,
    NO_HOOK_POINTS,
    POINT,
    RemoteUnsupportedError,
    names_of_kind,
    remote_refusal,
)
from ..hooks.attention import _output_projection_weight, recompute_attention
from .build import Parts
from .loopback import Loopback, RemoteTimeoutError, _fresh_class_trackers
from .validation import ValidationError, _tol, hf_positions, residual_pairs

# The columns of remote mode's support table (docs/remote.md): every standardized name but the hook points, which
# are one column ("hook_points").
REMOTE_TABLE_NAMES: tuple[str, ...] = tuple(n for n, e in CATALOGUE.items() if e.kind != POINT)
_ATTENTION_NAMES = frozenset(names_of_kind(ATTENTION))  # served remotely, read-only

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
        (False, False, True)
    """
    return remote_refusal(name) is not None


def refusal(name: str) -> str:
    """The message for a refused accessor / method ``name`` in remote mode.

    Example:
        >>> refusal("mlps_pre_activation").split(":")[0]
        'mlps_pre_activation is refused in remote mode'
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

    Walks the block's syntax (``tracer.node``) for attributes (or strings) named like a refused accessor (hook
    points, ``unilens_hooks``) and for assignments to an attention name (read-only remotely); raises
    ``RemoteUnsupportedError`` naming the first one and why. A name the block only computes at run time is refused on
    the server by the same accessor (same message).

    Example:
        >>> import ast
        >>> class T: node = ast.parse("p = model.mlps_pre_activation[0].save()")
        >>> try:
        ...     check_block(None, T())
        ... except RemoteUnsupportedError as err:
        ...     print(str(err).split(":")[0])
        mlps_pre_activation is refused in remote mode
    """
    node = getattr(tracer, "node", None)
    if node is None:
        return
    for sub in ast.walk(node):  # model.attention_probabilities[i] = ...: attention is read-only remotely
        if isinstance(sub, ast.Subscript) and isinstance(sub.ctx, ast.Store) and isinstance(sub.value, ast.Attribute) \
                and sub.value.attr in _ATTENTION_NAMES:
            raise RemoteUnsupportedError(_ASSIGN_REFUSAL.format(name=sub.value.attr)
                                         + f" (line {getattr(sub, 'lineno', '?')} of the traced block)")
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


def _reduce_cached_property(prop: functools.cached_property) -> tuple:
    """A ``functools.cached_property`` of a class that travels by value, rebuilt from its function: pickled as is
    it would carry its ``RLock`` (Python 3.11), which cannot be pickled, and every request would fail."""
    return functools.cached_property, (prop.func,), {"attrname": prop.attrname, "__doc__": prop.__doc__}


def _reduce_empty(value: Any) -> tuple:
    """A module-level ``threading.local`` or weak-keyed cache that travels with by-value code: a new, empty one on
    the server (per-thread / per-live-object bookkeeping of this process means nothing there; it cannot be pickled
    as is)."""
    return type(value), ()


@contextlib.contextmanager
def _picklable_class_attributes() -> Iterator[None]:
    """While inside, pickling (nnsight's request serialization) rebuilds ``cached_property`` attributes of by-value
    classes from their function instead of failing on their lock, and sends a ``threading.local`` or a weak-keyed
    cache as a new, empty one."""
    reducers = {functools.cached_property: _reduce_cached_property, threading.local: _reduce_empty,
                weakref.WeakKeyDictionary: _reduce_empty, weakref.WeakValueDictionary: _reduce_empty,
                weakref.WeakSet: _reduce_empty}
    previous = {cls: copyreg.dispatch_table.get(cls) for cls in reducers}
    for cls, reduce in reducers.items():
        copyreg.pickle(cls, reduce)
    try:
        yield
    finally:
        for cls, before in previous.items():
            if before is None:
                copyreg.dispatch_table.pop(cls, None)
            else:
                copyreg.dispatch_table[cls] = before


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
        with _cached_sources(), _picklable_class_attributes():
            try:
                return self._send(tracer)
            except NotImplementedError as err:
                # raised on the server by a by-value copy of RemoteUnsupportedError (the loopback and the dry run
                # hand it back as is): the caller catches this process's class
                if type(err).__name__ != RemoteUnsupportedError.__name__ or isinstance(err, RemoteUnsupportedError):
                    raise
                raise RemoteUnsupportedError(str(err)) from None

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
                 "position_embed_path", "prefix_positions", "residual_streams", "layer_input_argument"):
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
        embedded = model.token_embeddings.save()  # the embedding module's output (Mamba-style hidden states)
        first = model.layers_input[0].save()
        outputs = [model.layers_output[i] for i in range(n)]
        outputs = nnsight_save(outputs)
        lens = model.project_on_vocab(outputs[-1]).save() if model.architecture.head_chain is not None else None
        # the two fields only: the output also holds the model's cache (a recurrent state object on Mamba-style
        # models), which the reply's safe loader does not unpickle
        hidden = model.output.hidden_states.save()
        logits = model.output.logits.save()
    errors: dict[str, float] = {}
    first, outputs, lens = first.detach(), [o.detach() for o in outputs], None if lens is None else lens.detach()
    p = model.architecture.prefix_positions  # HF keeps the input's positions only (validate_model)
    first, outputs, lens = hf_positions(first, p), [hf_positions(o, p) for o in outputs], hf_positions(lens, p)
    if hidden is not None:  # the server ran its forward with autograd on: compare values, not graphs
        hidden = [h.detach() for h in hidden]
    logits = logits.detach()
    if hidden is None or len(hidden) != n + 1:
        raise ValidationError(f"{model.architecture.model_type}: the server returned "
                              f"{None if hidden is None else len(hidden)} hidden states for {n} discovered layers.")
    for check, (ours, theirs) in residual_pairs(hidden, first, outputs, embedded.detach(), _tol(logits.dtype)).items():
        errors[check] = float((ours - theirs).abs().max())
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
        >>> support["layers_output"], support["attention_probabilities"], support["hook_points"].split(":")[0]
        ('supported', 'supported', 'refused')
    """
    arch = model.architecture
    plans = getattr(model, "attention_plans", None)  # given (the docs table) or read from the model's accessor
    plans = plans if plans is not None else getattr(getattr(model, "attention_probabilities", None), "plans", None)
    if plans is None:  # a local model: plan from its own modules (the same code as the server's)
        plans = attention_plans(model, arch, model.num_heads)
    out: dict[str, str] = {}
    for name in REMOTE_TABLE_NAMES:
        entry = CATALOGUE[name]
        if entry.remote is not None:
            out[name] = "refused: " + entry.remote
        elif entry.kind == ATTENTION:
            out[name] = _attention_support(entry.site, [plans[i] for i in arch.attention_layers])
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


def _attention_support(site: str, plans: list[dict[str, Any]]) -> str:
    """The support-table cell of attention hook point ``site`` over the plans of the layers with attention."""
    if not plans:
        return "n/a: no softmax attention layer"
    refused = [p["refused"] for p in plans if p["route"] is None]
    if refused:
        return "refused: " + refused[0]
    if site in ("queries", "keys", "values") and all(p["route"] == "softmax" for p in plans):
        return "n/a: " + _QKV_INLINE
    missing = [p.get("heads_refused") for p in plans if "projection" not in p]
    if site in ("heads", "head_results") and missing:
        return "n/a: " + missing[0]
    unsplit = [p["results_refused"] for p in plans if "results_refused" in p]
    if site == "head_results" and unsplit:
        return "n/a: " + unsplit[0]
    return "supported"


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
# Attention in remote mode: read from the deployment's own attention call
# ------------------------------------------------------------------------------------------------------------------

# the attention implementations whose masks the recomputation reads (eager: additive float; sdpa: boolean or None)
_RECOMPUTABLE = ("eager", "sdpa")
_SOFTMAX_OPS = ("F_softmax_", "torch_softmax_", "torch_nn_functional_softmax_", "nn_functional_softmax_")
_SDPA_OPS = ("torch_nn_functional_scaled_dot_product_attention_", "F_scaled_dot_product_attention_")
_QKV_INLINE = ("the class computes q/k/v inline (no attention-interface call), so rotated queries / keys / values "
               "are not exposed (locally neither)")


def _ops(names: tuple[str, ...], prefixes: tuple[str, ...]) -> list[str]:
    return [n for n in names if n.startswith(prefixes) and n.rpartition("_")[2].isdigit()]


def _envoy_path(root: Any, path: str) -> Any:
    """The nnsight envoy at a dotted module path under ``root`` (an index for a digit)."""
    envoy = root
    for part in path.split("."):
        envoy = envoy[int(part)] if part.isdigit() else getattr(envoy, part)
    return envoy


def attention_plan(envoy: Any, heads: int) -> dict[str, Any]:
    """Where remote mode reads one attention module's tensors on the server: the nnsight ``.source`` operations of
    its forward that compute them, found on the client from the module's code (``envoy``: its nnsight envoy; no
    weights needed, the meta structure serves). ``heads``: the number of query heads.

    ``route`` is ``"interface"`` (the class calls transformers' attention function: ``call`` names that call, whose
    arguments are q / k / v and the mask the model built, and whose second output is the probabilities under eager),
    ``"softmax"`` (inline attention: ``softmax`` names the softmax call, ``sdpa`` a direct
    ``scaled_dot_product_attention`` call an sdpa deployment makes instead), or ``None`` with ``refused`` saying why.
    ``projection`` (the output projection, whose input is z) serves ``attention_heads`` and
    ``attention_head_results``; else ``heads_refused`` (and ``results_refused``) say why not.

    Example:
        >>> from unilens import StandardizedTransformer
        >>> from unilens.testing import tiny_model
        >>> model = StandardizedTransformer(*tiny_model("llama"), check=False)
        >>> plan = attention_plan(model.attentions[0], model.num_heads)
        >>> plan["route"], plan["call"], plan["projection"]
        ('interface', 'attention_interface_1', 'o_proj')
    """
    module = envoy._module
    compiled = envoy.source.compiled
    lines = compiled.source.splitlines()
    plan: dict[str, Any] = {"route": None, "heads": int(heads)}
    if uses_attention_interface(module):
        calls = [n for n in _ops(compiled.names, ("attention_interface_",))
                 if "attention_interface(" in lines[compiled.lines[n] - 1]
                 and "get_interface" not in lines[compiled.lines[n] - 1]]
        if len(calls) == 1:
            plan.update(route="interface", call=calls[0])
        else:
            plan["refused"] = (f"{type(module).__name__}.forward calls its attention function {len(calls)} times "
                               f"({calls}); unilens reads attention remotely from exactly one call")
    else:
        softmax, sdpa = _ops(compiled.names, _SOFTMAX_OPS), _ops(compiled.names, _SDPA_OPS)
        alibi = getattr(getattr(module, "config", None), "alibi", None)
        if alibi is not None and len(softmax) == 2 and len(sdpa) in (0, 2):
            # Falcon: one branch with rotary positions, one with ALiBi; the config says which one runs
            pick = 1 if alibi else 0
            softmax, sdpa = [softmax[pick]], sdpa[pick:pick + 1]
        if len(softmax) == 1 and len(sdpa) <= 1:
            plan.update(route="softmax", softmax=softmax[0], sdpa=sdpa[0] if sdpa else None)
        else:
            plan["refused"] = (f"{type(module).__name__}.forward makes {len(softmax)} softmax and {len(sdpa)} "
                               "scaled_dot_product_attention calls; unilens cannot tell which computes attention")
    try:
        name, projection = find_output_projection(module)
    except ValueError as err:
        plan["heads_refused"] = str(err)
    else:
        plan["projection"] = name
        if not is_projection(projection) or is_quantized(projection):
            plan["results_refused"] = (f"its output projection {name!r} is not a linear map of z (it mixes in other "
                                       "inputs), so z does not split into per-head results")
    return plan


def attention_plans(root: Any, arch: Any, heads: int) -> list[dict[str, Any]]:
    """``attention_plan`` of every layer of a model (``root``: an nnsight envoy of the HF model, ``arch`` its
    ``Architecture``); a layer without softmax attention gets a plan that refuses with the reason."""
    return [attention_plan(_envoy_path(root, f"{arch.layers_path}.{i}.{p.attention}"), heads)
            if p.attention is not None else
            {"route": None, "refused": f"layer {i} has no softmax attention (layers with attention: "
                                       f"{arch.attention_layers})"}
            for i, p in enumerate(arch.layers)]


def _implementation(module: Any) -> str | None:
    """The attention implementation the server's module runs (its config's, as transformers dispatches on it)."""
    return getattr(getattr(module, "config", None), "_attn_implementation", None)


class RemoteAttention(LayerIndexed):
    """``model.attention_<name>[i]`` in remote mode: read inside the trace, on the server, from the attention code the
    deployment runs (nothing of unilens is installed there).

    - probabilities under eager attention: the second output of the model's attention-function call (what HF returns
      as attention weights), or the inline softmax's output (Bloom, Falcon);
    - otherwise (sdpa: no probabilities exist) q / k / v, scores and probabilities are recomputed on the server by
      ``unilens.hooks.attention.recompute_attention`` (the local hookable path) from that call's own arguments: the
      mask the model built (causal, padding, sliding window), scaling, softcap, sinks, GQA;
    - heads (z): the output projection's input, per head; head results: z times that projection's weight per head.

    Read-only: assigning an attention tensor remotely is refused before the request is sent (``check_block``).

    Example:
        >>> from unilens import StandardizedTransformer
        >>> from unilens.testing import tiny_model
        >>> hf, tok = tiny_model("llama")
        >>> remote = StandardizedTransformer(hf, tokenizer=tok, remote=Loopback(tiny_model("llama")[0], tok))
        >>> with remote.trace("The cat sat"):
        ...     probs = remote.attention_probabilities[1].save()  # (batch, heads, query, key)
        >>> probs.shape[1] == remote.num_heads, bool(torch.allclose(probs.sum(-1), torch.ones(1)))
        (True, True)
    """

    def __init__(self, model: Any, site: str, plans: list):
        LayerIndexed.__init__(self, model, f"attention_{site}")
        self.site, self.plans = site, plans

    def _refuse(self, i: int, reason: str) -> None:
        raise RemoteUnsupportedError(f"{self._label(i)} is not available remotely for this "
                                     f"{self._model.architecture.model_type} model: {reason}.")

    def _get(self, i: int) -> torch.Tensor:
        plan = self.plans[i]
        if plan.get("route") is None:
            self._refuse(i, plan["refused"])
        if not self._model.interleaver.interleaving:  # on the client: the body runs on the server, in a trace
            raise ValueError(f"{self._label(i)} can only be read inside `with model.trace(...)`: outside one there is "
                             "no forward to take it from.")
        self._model._note_read(self._name, i)
        attention = self._model.attentions[i]
        if self.site in ("heads", "head_results"):
            return self._heads(i, plan, attention)
        implementation = _implementation(attention._module)
        if plan["route"] == "interface":
            call = getattr(attention.source, plan["call"])
            if self.site == "probabilities" and implementation == "eager":
                return call.output[1]  # eager attention returns its probabilities: (batch, heads, query, key)
            if implementation not in _RECOMPUTABLE:
                self._refuse(i, f"the deployment runs {implementation!r} attention, whose mask unilens cannot read "
                                "to recompute it (eager and sdpa deployments are served)")
            args, kwargs = call.inputs  # (module, query, key, value, attention_mask), scaling= ...
            return recompute_attention(*args, **kwargs)[self.site]
        if self.site in ("queries", "keys", "values"):
            self._refuse(i, _QKV_INLINE)
        if plan["sdpa"] is not None and implementation == "sdpa":  # the inline class calls sdpa itself (Falcon)
            args, kwargs = getattr(attention.source, plan["sdpa"]).inputs
            query, key, value = args[:3]
            mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
            values = recompute_attention(attention._module, query, key, value, mask, scaling=kwargs.get("scale"),
                                         is_causal=bool(kwargs.get("is_causal", False)))
            return values[self.site]
        softmax = getattr(attention.source, plan["softmax"])
        if self.site == "scores":
            args, _ = softmax.inputs
            return args[0]  # (batch, heads, query, key), what the model's softmax reads
        return softmax.output

    def _heads(self, i: int, plan: dict, attention: Any) -> torch.Tensor:
        if "projection" not in plan:
            self._refuse(i, plan["heads_refused"])
        if self.site == "head_results" and "results_refused" in plan:
            self._refuse(i, plan["results_refused"])
        projection = attention
        for part in plan["projection"].split("."):
            projection = getattr(projection, part)
        z = projection.input  # (batch, seq, heads * head_dim)
        z = z.reshape(*z.shape[:-1], plan["heads"], z.shape[-1] // plan["heads"])  # (batch, seq, heads, head_dim)
        if self.site == "heads":
            return z
        weight = _output_projection_weight(projection._module, plan["heads"]).to(z.device, z.dtype)
        return torch.einsum("...hd,hdm->...hm", z, weight)  # (batch, seq, heads, hidden)

    def _set(self, i: int, value: Any) -> None:
        raise RemoteUnsupportedError(_ASSIGN_REFUSAL.format(name=self._label(i)))


_ASSIGN_REFUSAL = ("{name} cannot be assigned in remote mode: remote mode reads attention from the deployment's "
                   "own attention call, which runs unchanged (no unilens hook point exists on the server to write "
                   "into). Edit attention on a local model, or assign a module output (attentions_output[i]).")


def remote_attention_accessors(model: Any) -> dict[str, RemoteAttention]:
    """The attention accessors of a remote-mode model, one per attention name of the catalogue, over one plan per
    layer (``attention_plans``)."""
    # attention-free stacks (Mamba, RWKV) have no head count: every layer's plan refuses with the reason
    heads = model.num_heads if model.architecture.attention_layers else 0
    plans = attention_plans(model, model.architecture, heads)
    return {name: RemoteAttention(model, CATALOGUE[name].site, plans) for name in names_of_kind(ATTENTION)}


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
        for name, accessor in remote_attention_accessors(self).items():  # read from the deployment's attention
            object.__setattr__(self, name, accessor)
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
            return TransformersModel.interleave(self, fn, *args, **kwargs)
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
        return TransformersModel.trace(self, *inputs, **kwargs)

    def session(self, *args: Any, **kwargs: Any) -> Any:
        """nnsight's ``session``; in remote mode the whole session is one request to the model's server
        (``remote_timeout=`` as for ``trace``)."""
        target = self.__dict__.get("_remote_target")
        if target is not None and kwargs.get("backend") is None:
            options = _remote_options(kwargs, self.__dict__.get("_remote_timeout", DEFAULT_REMOTE_TIMEOUT))
            kwargs["backend"] = remote_backend(self, target, **options)
        return TransformersModel.session(self, *args, **kwargs)

    def _remoteable_class(self) -> type:
        """NDIF serves plain nnsight deployments: the model key names nnsight's class (unilens ships by value)."""
        return TransformersModel

    def __getstate__(self) -> dict:
        state = TransformersModel.__getstate__(self)
        state.pop("_remote_target", None)  # the client's connection (a loopback server holds a whole model)
        return state
