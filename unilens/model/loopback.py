"""The offline loopback server: a stand-in for an NDIF deployment that runs requests the way NDIF does, in this
process, with unilens hidden (no ``unilens`` module importable, no unilens attention function registered) and the
results serialized. The test suite and docs/remote.md run remote mode against it."""

from __future__ import annotations

import contextlib
import copy
import ctypes
import io
import linecache
import sys
import threading
from typing import Any, Iterator

import torch

from ..arch.loading import load_hf_model

__all__ = ["Loopback", "RemoteTimeoutError"]

_CANCEL_GRACE = 10.0  # seconds a cancelled loopback job has to stop (it stops at its next Python line)


class RemoteTimeoutError(TimeoutError):
    """A remote request did not finish within ``remote_timeout`` seconds (``StandardizedTransformer(...,
    remote_timeout=)`` or ``model.trace(..., remote_timeout=)``)."""


class _Cancelled(Exception):
    """Raised inside a loopback job that ran past its timeout (delivered at the job's next Python line)."""


def _raise_in(thread: threading.Thread, exception: type[BaseException]) -> None:
    """Raise ``exception`` in ``thread`` at its next Python line (CPython's asynchronous exception)."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(exception))


# transformers' global registries where unilens installs its attention implementation; the loopback server runs
# with unilens's entries taken out, as on a server where unilens is not installed
def _attention_registries() -> list[dict]:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    return [AttentionInterface._global_mapping, AttentionMaskInterface._global_mapping]


class _BlockUnilens:
    """A meta-path finder that makes ``import unilens...`` fail, as on a server without unilens installed."""

    def find_spec(self, name: str, path: Any = None, target: Any = None):
        if name == "unilens" or name.startswith("unilens."):
            raise ModuleNotFoundError(f"No module named {name!r} (the loopback server runs without unilens)", name=name)
        return None


@contextlib.contextmanager
def _fresh_class_trackers() -> Iterator[None]:
    """cloudpickle rebuilds a by-value class ONTO the class it was pickled from when that class lives in the same
    process (its class tracker), replacing the live class's methods with the shipped copies (whose globals lack
    ``__name__``, so every relative import in them fails afterwards). An in-process server must get its own copies,
    as a separate process would: while inside, the trackers are empty."""
    import weakref

    from cloudpickle import cloudpickle as cp

    trackers = cp._DYNAMIC_CLASS_TRACKER_BY_CLASS, cp._DYNAMIC_CLASS_TRACKER_BY_ID
    cp._DYNAMIC_CLASS_TRACKER_BY_CLASS = weakref.WeakKeyDictionary()
    cp._DYNAMIC_CLASS_TRACKER_BY_ID = weakref.WeakValueDictionary()
    try:
        yield
    finally:
        cp._DYNAMIC_CLASS_TRACKER_BY_CLASS, cp._DYNAMIC_CLASS_TRACKER_BY_ID = trackers


@contextlib.contextmanager
def _without_unilens() -> Iterator[None]:
    """While inside: no ``unilens`` module importable or imported, no unilens attention function registered, and
    by-value classes rebuilt as the server's own copies."""
    ours = [name for name in sys.modules if name == "unilens" or name.startswith("unilens.")]
    hidden = {name: sys.modules.pop(name) for name in ours}
    blocker = _BlockUnilens()
    sys.meta_path.insert(0, blocker)
    registries = _attention_registries()
    removed = [(r, k, r.pop(k)) for r in registries for k in [k for k in r if k.startswith("unilens")]]
    try:
        with _fresh_class_trackers():
            yield
    finally:
        sys.meta_path.remove(blocker)
        sys.modules.update(hidden)
        for registry, key, value in removed:
            registry[key] = value


class Loopback:
    """An offline stand-in for an NDIF deployment: a plain ``nnsight.TransformersModel`` (the
    text-generation task, as NDIF deploys causal LMs) over its own copy of the weights.

    Requests reach it the way they reach NDIF: the client serializes the traced block
    (``RequestModel.serialize``), the server deserializes it against its own model's persistent objects and runs
    it with no ``unilens`` module importable and no unilens attention function registered, and the saved values
    come back serialized (``torch.save`` / ``torch.load``). ``source``: a loaded ``PreTrainedModel`` (deep-copied:
    the server never shares modules with the client) or anything ``unilens.loading.load_hf_model`` reads.
    ``attn_implementation`` sets the deployment's attention (e.g. ``"eager"``).

    Example:
        >>> from unilens import StandardizedTransformer
        >>> from unilens.testing import tiny_model
        >>> hf, tok = tiny_model("llama")
        >>> server = Loopback(hf, tok)
        >>> model = StandardizedTransformer(hf, tokenizer=tok, remote=server)
        >>> with model.trace("The cat sat"):
        ...     h = model.layers_output[1].save()
        >>> h.shape[-1] == model.hidden_size
        True
    """

    def __init__(self, source: Any, tokenizer: Any = None, attn_implementation: str | None = None, **kwargs: Any):
        from nnsight import TransformersModel
        from transformers import PreTrainedModel

        if isinstance(source, PreTrainedModel):
            installed = [n for n, _ in source.named_modules() if n.endswith("unilens_hooks")]
            if installed or getattr(source.config, "_attn_implementation", None) == "unilens":
                raise ValueError("this model has unilens's hook points installed (a local StandardizedTransformer "
                                 "wraps it), which an NDIF server's model never has: give the loopback a fresh copy "
                                 "of the weights (load it again, or a folder).")
            hf = copy.deepcopy(source)
            hf.eval()
        else:
            hf, loaded_tok = load_hf_model(source, tokenizer, **kwargs)
            tokenizer = tokenizer if tokenizer is not None else loaded_tok
        if attn_implementation is not None:
            hf.set_attn_implementation(attn_implementation)
        self.server = TransformersModel(hf, tokenizer=tokenizer, task="text-generation")
        self.requests = 0  # requests served
        self.last_payload_bytes = 0
        self._stuck: threading.Thread | None = None  # a cancelled job still inside one long call

    def __repr__(self) -> str:
        return f"Loopback({type(self.server._module).__name__}, {self.requests} requests served)"

    def run(self, blob: bytes, timeout: float | None = None) -> bytes:
        """Serve one serialized request: deserialize, execute against the plain model, return the serialized saves.

        ``timeout``: seconds to wait for the job (None: no limit). Past it the job is cancelled, as a deployment
        cancels a job, and ``RemoteTimeoutError`` is raised; the job stops at its next Python line (a job blocked
        inside one long C call stops when that call returns; until then the server refuses new requests).
        """
        if self._stuck is not None and self._stuck.is_alive():
            raise RuntimeError("the loopback server is still stopping a request that timed out (it is inside one "
                               "long call); wait for it to return, or build a new Loopback.")
        self.requests += 1
        self.last_payload_bytes = len(blob)
        filename_cache = dict(linecache.cache)  # deserialize registers the block under the client's file name
        try:
            with _without_unilens():
                return self._run_within(blob, timeout)
        finally:
            linecache.cache.clear()
            linecache.cache.update(filename_cache)

    def _run_within(self, blob: bytes, timeout: float | None) -> bytes:
        """Run the job in a worker thread and wait at most ``timeout`` seconds for it."""
        outcome: dict[str, Any] = {}
        gate = threading.Lock()  # the job is cancelled only while it runs, never while it reports its outcome
        running = [True]

        def job() -> None:
            try:
                try:
                    try:
                        outcome["reply"] = self._execute(blob)
                    finally:
                        with gate:
                            running[0] = False
                except BaseException as err:  # noqa: BLE001 - handed to the waiting client
                    outcome["error"] = err
            except _Cancelled:  # a cancellation delivered while the outcome was being recorded
                pass

        def cancel() -> bool:
            with gate:
                if running[0]:
                    _raise_in(worker, _Cancelled)
            worker.join(_CANCEL_GRACE)
            self._stuck = worker if worker.is_alive() else None
            return "reply" not in outcome

        worker = threading.Thread(target=job, name="unilens-loopback-job", daemon=True)
        worker.start()
        try:
            worker.join(timeout)
        except BaseException:  # Ctrl-C while waiting: the job is cancelled too
            cancel()
            raise
        if worker.is_alive() and cancel():
            raise RemoteTimeoutError(
                f"the remote request did not finish within remote_timeout={timeout:g} s and was cancelled; look for "
                "a loop that never ends in the traced block, or raise the limit (remote_timeout=None: no limit).")
        if "error" in outcome:
            raise outcome["error"]
        return outcome["reply"]

    def _execute(self, blob: bytes) -> bytes:
        """Deserialize and run one request against the plain model (unilens already hidden); the saved values,
        serialized."""
        from nnsight.schema.request import RequestModel
        from nnsight.tracing.tracer import _saves, dec, inc

        tracer = RequestModel.deserialize(blob, self.server._remoteable_persistent_objects())
        inc()  # one outermost trace: only .save()d values come back, as on the server
        try:
            tracer.execute(tracer.info.code)
            marked = set(_saves())
            saves = {k: v for k, v in tracer.info.frame.f_locals.items() if id(v) in marked}
        finally:
            dec()
        buffer = io.BytesIO()
        torch.save(saves, buffer)
        return buffer.getvalue()
