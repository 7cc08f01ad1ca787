"""``memoize``: a per-process cache for pure functions of one hashable argument (a class, a config key).

Unlike ``functools.lru_cache``, the cached function ships by value: remote mode sends unilens's code to a server
where unilens is not installed (``nnsight.register``), and cloudpickle pickles an ``lru_cache`` wrapper by reference
(an import of unilens on the server). The cache itself pickles empty: the server fills its own.
"""

from __future__ import annotations

import functools
import threading
import weakref
from typing import Any, Callable, TypeVar

T = TypeVar("T")


class ProcessCache(dict):
    """A dict that pickles empty: what one process memoized is not sent to another."""

    def __reduce__(self) -> tuple:
        return (type(self), ())


def memoize(fn: Callable[[Any], T]) -> Callable[[Any], T]:
    """Cache ``fn(key)`` per process; ``fn.cache`` is the cache.

    Example:
        >>> @memoize
        ... def square(x):
        ...     return x * x
        >>> square(3), square.cache
        (9, {3: 9})
    """
    cache = ProcessCache()

    @functools.wraps(fn)
    def memoized(key: Any) -> T:
        try:
            return cache[key]
        except KeyError:
            value = cache[key] = fn(key)
            return value

    memoized.cache = cache  # type: ignore[attr-defined]
    # Remote mode ships this wrapper by its own source (nnsight compiles the `def` named like the function, with its
    # globals; `fn` travels as its closure, by its own source): so no `__wrapped__` (inspect would follow it to
    # `fn`'s source, run with this module's globals) and the wrapper's own name (the `def` nnsight looks up).
    del memoized.__wrapped__
    memoized.__name__, memoized.__qualname__ = "memoized", "memoize.<locals>.memoized"
    return memoized


class ProcessWeakKeyDictionary(weakref.WeakKeyDictionary):
    """A ``WeakKeyDictionary`` that pickles empty (per-process bookkeeping about live modules; a plain one cannot be
    pickled at all, and remote mode ships the functions that use it by value)."""

    def __reduce__(self) -> tuple:
        return (type(self), ())


class ProcessWeakSet(weakref.WeakSet):
    """A ``WeakSet`` that pickles empty (see ``ProcessWeakKeyDictionary``)."""

    def __reduce__(self) -> tuple:
        return (type(self), ())


class ProcessLock:
    """A re-entrant lock that pickles as a new, unlocked lock (a ``threading.RLock`` cannot be pickled; remote mode
    ships the functions that use it by value).

    Example:
        >>> import pickle
        >>> lock = ProcessLock()
        >>> with lock:
        ...     copy = pickle.loads(pickle.dumps(lock))
        >>> copy.acquire(blocking=False)
        True
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        return self._lock.acquire(blocking, timeout)

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> bool:
        return self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()

    def __reduce__(self) -> tuple:
        return (type(self), ())
