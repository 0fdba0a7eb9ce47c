"""Fused CPU kernel compiled by numba: gather and pool in one pass over the ids.

Each bag is pooled straight into its output row, so every gathered table row is read
once and never written back; an unfused ``take`` + ``sum`` moves about three times the
bytes. Bags run in parallel (``prange``). Inside a bag ids are added strictly in order,
which is PyTorch's accumulation order, so results match
``torch.nn.functional.embedding_bag`` bit for bit on float32 tables. Two things make it
as fast as PyTorch's FBGEMM loop on random rows: eight rows are added per pass over the
accumulator (``((acc + r0) + r1) + ...`` keeps the order while cutting accumulator
traffic and putting eight independent row loads in flight), and the rows ``PREFETCH``
ids ahead are prefetched: whole rows when the table mostly fits the last-level cache,
only the first line of each for tables served from DRAM (the hardware fetches the
adjacent lines, and whole rows there issue more prefetches than a core keeps in flight).
The functions release the GIL so the service can run them in a worker thread.
"""

from __future__ import annotations

import functools
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np

from kernels.base import FloatArray, IndexArray, TableSpec

logger = logging.getLogger(__name__)

_CACHE_LINE = 64
#: Tables up to this many times the last-level cache have most rows there: prefetching
#: whole rows then hides the cache latency of every line (measured 1.15-1.42x faster on
#: 24 MB and 44 MB tables, 32 MB L3). Bigger tables come from DRAM, where prefetching only
#: the first line and letting the hardware fetch the adjacent ones is as fast or faster
#: (whole rows measured 0.95-0.98x on 61-488 MB tables).
_CACHED_TABLE_FACTOR = 1.5

_compile_lock = threading.Lock()
_compiled: dict[str, Any] | None = None


def available() -> bool:
    """Whether numba imports on this machine (the kernel is then usable)."""
    try:
        import numba  # noqa: F401
    except Exception:  # pragma: no cover - depends on the platform
        return False
    return True


def _kernels() -> dict[str, Any]:
    global _compiled
    with _compile_lock:
        if _compiled is None:
            from kernels import numba_loops  # imports numba and compiles on first use

            _compiled = numba_loops.build()
        return _compiled


@functools.lru_cache(maxsize=1)
def _last_level_cache_bytes() -> int:
    """The largest CPU cache the OS lists (sysfs), or 32 MiB where it lists none."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    sizes = [0]
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = entry.read_text().strip()
            sizes.append(int(text[:-1]) * units[text[-1]] if text[-1] in units
                         else int(text))
        except (OSError, ValueError, IndexError):
            continue
    return max(sizes) or 32 << 20


def _read_only(array: Any) -> Any:
    """A read-only view: numba compiles one specialisation per mix of writable and
    read-only arguments (~1 s each), so every input reaches the loops read-only."""
    if array.flags.writeable:
        array = array.view()
        array.flags.writeable = False
    return array


class NumbaKernel:
    """Fused, parallel CPU kernel (the default CPU path).

    Args:
        spec: the table and its pooling.
        num_threads: threads used per call (``None``: numba's default, all cores).

    Raises:
        ImportError: numba is not installed.
        ValueError: ``num_threads`` is not in ``[1, numba.config.NUMBA_NUM_THREADS]``.
    """

    name = "numba"
    provider = "numba-cpu"

    def __init__(self, spec: TableSpec, num_threads: int | None = None) -> None:
        import numba

        limit = int(numba.config.NUMBA_NUM_THREADS)  # type: ignore[attr-defined]
        if num_threads is not None and not 1 <= num_threads <= limit:
            raise ValueError(f"num_threads must be in [1, {limit}]; got {num_threads}")
        self.spec = spec
        self.num_threads = num_threads
        self._set_threads = numba.set_num_threads
        self._loops = _kernels()
        self._table = _read_only(spec.weight)
        # Leading elements of a row to prefetch: all of it, or its first cache line.
        self._span = min(spec.embedding_dim, max(1, _CACHE_LINE // spec.weight.itemsize))
        if spec.weight.nbytes <= _CACHED_TABLE_FACTOR * _last_level_cache_bytes():
            self._span = spec.embedding_dim
        # -1 never matches a validated id, so the loops need no Optional.
        self._padding = -1 if spec.padding_idx is None else spec.padding_idx

    def __call__(
        self,
        indices: IndexArray,
        offsets: IndexArray,
        per_sample_weights: FloatArray | None = None,
    ) -> FloatArray:
        weight = self._table
        num_bags = offsets.shape[0] - 1
        if num_bags == 0 or indices.shape[0] == 0:
            return np.zeros((num_bags, weight.shape[1]), dtype=weight.dtype)
        out = np.empty((num_bags, weight.shape[1]), dtype=weight.dtype)
        if self.num_threads is not None:
            # Thread-local in numba: set on every call because callers move between threads.
            self._set_threads(self.num_threads)
        indices, offsets = _read_only(indices), _read_only(offsets)
        if self.spec.mode == "max":
            self._loops["max"](weight, indices, offsets, self._padding, self._span, out)
        elif per_sample_weights is not None:
            self._loops["weighted"](weight, indices, offsets, _read_only(per_sample_weights),
                                    self._padding, self._span, out)
        else:
            self._loops["sum"](weight, indices, offsets, self._padding,
                               self.spec.mode == "mean", self._span, out)
        return out
