"""Pure NumPy kernel: the portable fallback and the reference the fused kernel is held to.

Strategy (see the kernel notes in DESIGN.md): bags are grouped by padded length, each
group is gathered with one ``np.take(..., mode="clip")`` into a reused ``(n, L, D)``
buffer and reduced over axis 1. Reducing a C-contiguous buffer over its middle axis adds
rows one after another, so sums keep PyTorch's in-bag order exactly. Positions past a
bag's end and ``padding_idx`` occurrences are neutralised in the buffer (0 for sums,
``-inf`` for max) instead of appending a sentinel row, which would copy the whole table.
``np.add.reduceat`` is not used: it is slow on 2-D data and wrong for empty bags.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from kernels.base import FloatArray, IndexArray, TableSpec

#: Bytes of gathered rows per chunk: small enough that the reduction reads them from cache.
_CHUNK_BYTES = 1 << 21


def padded_length(lengths: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """Round bag lengths up so there are at most 8 distinct lengths per octave.

    Lengths up to 16 stay exact; above, rounding wastes less than 1/8 of the gather.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    bits = np.zeros_like(lengths)
    positive = lengths > 0
    bits[positive] = np.floor(np.log2(lengths[positive])).astype(np.int64) + 1
    step = np.left_shift(1, np.maximum(bits - 4, 0))
    return -(-lengths // step) * step


class NumpyKernel:
    """Portable kernel built on ``np.take``; thread-safe (no shared mutable state)."""

    name = "numpy"
    provider = "numpy-cpu"

    def __init__(self, spec: TableSpec) -> None:
        self.spec = spec

    def __call__(
        self,
        indices: IndexArray,
        offsets: IndexArray,
        per_sample_weights: FloatArray | None = None,
    ) -> FloatArray:
        spec = self.spec
        num_bags = offsets.shape[0] - 1
        out = np.zeros((num_bags, spec.embedding_dim), dtype=spec.compute_dtype)
        if num_bags == 0 or indices.shape[0] == 0:
            return out
        lengths = np.diff(offsets)
        keys = padded_length(lengths)
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        starts = np.concatenate(([0], np.flatnonzero(np.diff(sorted_keys)) + 1))
        ends = np.concatenate((starts[1:], [order.shape[0]]))
        row_bytes = spec.embedding_dim * spec.compute_dtype.itemsize
        for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
            width = int(sorted_keys[start])
            if width == 0:
                continue  # empty bags stay zero
            per_chunk = max(1, _CHUNK_BYTES // (width * row_bytes))
            for lo in range(start, end, per_chunk):
                bags = order[lo : min(end, lo + per_chunk)]
                out[bags] = self._pool(indices, offsets[bags], lengths[bags], width,
                                       per_sample_weights)
        return out

    def _pool(
        self,
        indices: IndexArray,
        starts: IndexArray,
        lengths: IndexArray,
        width: int,
        per_sample_weights: FloatArray | None,
    ) -> FloatArray:
        """Pool ``len(starts)`` bags of at most ``width`` ids; returns ``(n, D)``."""
        spec = self.spec
        positions = starts[:, None] + np.arange(width, dtype=np.int64)
        ids = np.take(indices, positions, mode="clip")
        dead = positions >= (starts + lengths)[:, None]
        if spec.padding_idx is not None:
            dead |= ids == spec.padding_idx
        # One range check happened in validation, so the cheaper clip mode is safe here;
        # stored rows are decoded as they are gathered, a chunk at a time.
        rows = spec.table.gather(ids)
        any_dead = bool(dead.any())
        if per_sample_weights is not None:
            scale = np.take(per_sample_weights, positions, mode="clip")
            if any_dead:
                scale[dead] = 0
            rows *= scale[:, :, None]
        elif any_dead:
            rows[dead] = -np.inf if spec.mode == "max" else 0
        pooled: FloatArray
        if spec.mode == "max":
            pooled = rows.max(axis=1)
            if any_dead:
                pooled[dead.all(axis=1)] = 0  # bags of only padding
            return pooled
        pooled = rows.sum(axis=1)
        if spec.mode == "mean":
            counts = width - dead.sum(axis=1) if any_dead else np.full(len(starts), width)
            pooled /= np.maximum(counts, 1).astype(pooled.dtype)[:, None]
        return pooled
