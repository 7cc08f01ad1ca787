"""``memoize``: a per-process cache for pure functions of one hashable argument (a class, a config key).

Unlike ``functools.lru_cache``, the cached function ships by value: remote mode sends unilens's code to a server
where unilens is not installed (``nnsight.register``), and cloudpickle pickles an ``lru_cache`` wrapper by reference
(an import of unilens on the server). The cache itself pickles empty: the server fills its own.
"""

from __future__ import annotations

import functools
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
    return memoized
