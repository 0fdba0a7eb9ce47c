"""``numba.njit`` for the small compiled passes outside the kernels (request readers, id
checks), cached across processes.

Write them as module-level functions, never closures: numba keys a closure's cache
entry by the contents of its cells, and a compiled function in a cell pickles with a
fresh uuid in every process. Closures made every process compile again (0.4 s for the id
check alone at start) and add an entry to ``__pycache__`` (1,930 of them on this
machine). A function calling another of a module's compiled functions finds it as a
global; numba's cache then keys the caller by its file, so both live in one file.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

try:
    import numba
except Exception:  # pragma: no cover - depends on the platform
    numba = None  # type: ignore[assignment]

F = TypeVar("F", bound=Callable[..., Any])

#: Whether numba imports here; without it :func:`compiled` returns plain Python.
AVAILABLE = numba is not None


def compiled(function: F) -> F:
    """``numba.njit(nogil=True, cache=True, boundscheck=False)``, compiled on first call;
    the function itself when numba cannot be imported (callers check
    :data:`AVAILABLE` and take their NumPy or orjson path instead)."""
    if numba is None:  # pragma: no cover - numba is a dependency
        return function  # type: ignore[unreachable]
    return numba.njit(nogil=True, cache=True, boundscheck=False)(function)  # type: ignore[return-value]


def inlined(function: F) -> F:
    """As :func:`compiled`, inlined into each compiled caller (``inline="always"``): for
    a helper called per list or per bag, where a call would cost its argument arrays'
    reference counts every time."""
    if numba is None:  # pragma: no cover - numba is a dependency
        return function  # type: ignore[unreachable]
    return numba.njit(nogil=True, cache=True, boundscheck=False,  # type: ignore[return-value]
                      inline="always")(function)
