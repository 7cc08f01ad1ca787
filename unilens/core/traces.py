"""What every local trace of a standardized model goes through: one trace of a model at a time across threads
(``TraceGate``, ``GuardedTracer``), and a clear error where a value assigned inside a trace is used after it without
``.save()`` (``Unsaved``).

nnsight runs a trace body in a greenlet of the calling thread, interleaved with the forward, through ONE interleaver
per model: two threads tracing one model at once share its list of bodies, so one thread's forward runs the other's
body (raw greenlet errors: "Cannot switch to a different thread") or none (the ``with`` block is left without
running its body, its variables keep their previous values). ``GuardedTracer`` holds the model's ``TraceGate`` (a
re-entrant lock: the body runs in the same OS thread, so a trace or ad hoc call made from inside it is not blocked)
from ``__enter__`` to the end of ``__exit__``; a second thread waits its turn (``model.concurrent_traces = "wait"``,
the default) or gets a ``ConcurrentTraceError`` at once (``"error"``).
"""

from __future__ import annotations

import threading
from types import TracebackType
from typing import Any, Self

import nnsight.tracing.tracer as _nnsight_tracer  # a module: pickles by reference (its thread-local does not)
from nnsight.intervention.tracer import InterleavingTracer
from nnsight.tracing.tracer import _saves, skip_context, skippable
from nnsight.tracing.util import push

__all__ = ["ConcurrentTraceError", "GuardedTracer", "TraceGate", "Unsaved", "UnsavedValueError"]

CONCURRENT_MODES = ("wait", "error")


class ConcurrentTraceError(RuntimeError):
    """A second thread entered a trace of a model already tracing in another thread (``concurrent_traces="error"``)."""


class UnsavedValueError(NameError):
    """A value assigned inside a trace was used after it without ``.save()``."""


class TraceGate:
    """One model's trace lock: re-entrant, remembers which thread holds it (for the message), pickles as a new,
    unlocked gate (remote mode ships the model by value; a ``threading`` lock cannot be pickled).

    Example:
        >>> import pickle
        >>> gate = TraceGate()
        >>> gate.enter(); gate.enter(); gate.owner == threading.current_thread().name
        True
        >>> gate.exit(); gate.exit(); gate.owner is None
        True
        >>> pickle.loads(pickle.dumps(gate)).owner is None
        True
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self.owner: str | None = None
        self._depth = 0

    def enter(self, mode: str = "wait") -> None:
        """Hold the gate: wait for another thread's trace to end (``mode="wait"``) or raise ``ConcurrentTraceError``
        (``mode="error"``). The thread already holding it re-enters at once."""
        if mode not in CONCURRENT_MODES:
            raise ValueError(f"concurrent_traces must be one of {CONCURRENT_MODES}, got {mode!r}.")
        if not self._lock.acquire(blocking=False):
            if mode == "error":
                raise ConcurrentTraceError(
                    f"this model is already running a trace in thread {self.owner!r}; nnsight traces of one model "
                    "cannot overlap (they share the model's interleaver): use one model per thread, a lock of your "
                    "own, or model.concurrent_traces = 'wait' (traces then wait their turn)."
                )
            self._lock.acquire()
        if self._depth == 0:
            self.owner = threading.current_thread().name
        self._depth += 1

    def exit(self) -> None:
        """Release one ``enter``."""
        self._depth -= 1
        if self._depth == 0:
            self.owner = None
        self._lock.release()

    def __reduce__(self) -> tuple:
        return (type(self), ())


def _gate_of(model: Any) -> tuple[TraceGate | None, str]:
    return model.__dict__.get("_trace_gate"), getattr(model, "concurrent_traces", "wait")


class GuardedTracer(InterleavingTracer):
    """nnsight's tracer, holding the model's ``TraceGate`` from ``__enter__`` to the end of ``__exit__`` and, after
    the outermost trace, binding each name the body assigned but did not save to an ``Unsaved`` placeholder.

    Example:
        >>> from unilens import StandardizedTransformer
        >>> from unilens.testing import tiny_model
        >>> model = StandardizedTransformer(*tiny_model("llama"), check=False)
        >>> with model.trace("The cat sat") as tracer:
        ...     out = model.layers_output[0].save()
        >>> type(tracer).__name__, out.shape[0]
        ('GuardedTracer', 1)
    """

    def __enter__(self) -> Self:
        # Tracer.__enter__'s two steps, called from here: capture() and skip_context() find the user's frame two
        # frames up, which an extra super().__enter__() frame would shift
        gate, mode = _gate_of(self.envoy)
        if gate is not None:
            gate.enter(mode)
        try:
            self.capture()
            if skippable(self.node):
                skip_context(self)
        except BaseException:
            if gate is not None:
                gate.exit()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc_value: BaseException | None,
                 traceback: TracebackType | None) -> bool:
        gate = self.envoy.__dict__.get("_trace_gate") if self.envoy is not None else None
        try:
            return super().__exit__(exc_type, exc_value, traceback)
        finally:
            if gate is not None:
                gate.exit()

    def execute(self, code: Any) -> None:
        model = self.envoy
        frame = self.info.frame
        try:
            super().execute(code)
        finally:  # the model's interleave left this trace's bodies there (their scopes hold tensors: never keep them)
            bodies = model.__dict__.pop("_trace_bodies", None) or []
        if getattr(_nnsight_tracer._local, "depth", 0) == 1 and frame is not None:  # outermost: only saves leave
            mark_unsaved(frame, bodies)


def mark_unsaved(frame: Any, bodies: list) -> None:
    """Bind each name the trace ``bodies`` (nnsight mediators) assigned but did not save to an ``Unsaved`` in
    ``frame``: using it then says why it has no value, instead of a bare ``NameError`` / ``UnboundLocalError`` or,
    where the name was bound before the trace, its stale previous value."""
    saves = _saves()
    saved: set[str] = set()
    unsaved: set[str] = set()
    for body in bodies:
        for name, value in body.lcls.writes().items():
            (saved if id(value) in saves else unsaved).add(name)
    names = {name: Unsaved(name) for name in unsaved - saved if not name.startswith("__")}
    if names:
        push(frame, names)


class Unsaved:
    """Stands for a value assigned inside a trace without ``.save()``: any use raises ``UnsavedValueError`` (a
    ``NameError``) saying so; its repr says it too.

    Example:
        >>> x = Unsaved("h")
        >>> x.shape
        Traceback (most recent call last):
        ...
        unilens.core.traces.UnsavedValueError: 'h' was assigned inside the trace but not saved, so it has no value ...
    """

    __slots__ = ("_unsaved_name",)

    def __init__(self, name: str) -> None:
        object.__setattr__(self, "_unsaved_name", name)

    def _message(self) -> str:
        name = self._unsaved_name
        return (f"{name!r} was assigned inside the trace but not saved, so it has no value after it: values leave a "
                f"trace only when saved, e.g. `{name} = model.layers_output[3].save()`.")

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise UnsavedValueError(self._message())

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):  # protocol probes (copy, pickle, numpy): not a use
            raise AttributeError(name)
        self._refuse()

    def __setattr__(self, name: str, value: Any) -> None:
        self._refuse()

    def __repr__(self) -> str:
        return f"<unsaved: {self._message()}>"

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        for value in [*args, *(kwargs or {}).values()]:
            items = value if isinstance(value, (list, tuple)) else (value,)
            for item in items:
                if isinstance(item, Unsaved):
                    item._refuse()
        return NotImplemented


for _dunder in (
    "__bool__", "__len__", "__iter__", "__contains__", "__getitem__", "__setitem__", "__delitem__", "__call__",
    "__float__", "__int__", "__index__", "__complex__", "__format__", "__array__", "__neg__", "__pos__", "__abs__",
    "__invert__", "__lt__", "__le__", "__gt__", "__ge__", "__add__", "__radd__", "__iadd__", "__sub__", "__rsub__",
    "__isub__", "__mul__", "__rmul__", "__imul__", "__matmul__", "__rmatmul__", "__truediv__", "__rtruediv__",
    "__itruediv__", "__floordiv__", "__rfloordiv__", "__mod__", "__rmod__", "__pow__", "__rpow__", "__and__",
    "__rand__", "__or__", "__ror__", "__xor__", "__rxor__", "__lshift__", "__rshift__"
):
    setattr(Unsaved, _dunder, Unsaved._refuse)
del _dunder
