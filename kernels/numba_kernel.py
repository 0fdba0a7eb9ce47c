"""Fused CPU kernel compiled by numba: gather and pool in one pass over the ids.

Each bag is pooled straight into its output row, so every gathered table row is read
once and never written back; an unfused ``take`` + ``sum`` moves about three times the
bytes. Bags run in parallel (``prange``). Inside a bag ids are added strictly in order,
which is PyTorch's accumulation order, so results match
``torch.nn.functional.embedding_bag`` bit for bit on float32 tables. Two things make it
as fast as PyTorch's FBGEMM loop on random rows: eight rows are added per pass over the
accumulator (``((acc + r0) + r1) + ...`` keeps the order while cutting accumulator
traffic and putting eight independent row loads in flight), and the first cache line of
the rows ``_PREFETCH`` ids ahead is prefetched (the hardware fetches the adjacent lines).
The functions release the GIL so the service can run them in a worker thread.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import numpy as np

from kernels.base import FloatArray, IndexArray, TableSpec

logger = logging.getLogger(__name__)

#: How many ids ahead a row is prefetched (measured best of 4-32 on the 3 bench shapes).
_PREFETCH = 8

_compile_lock = threading.Lock()
_compiled: dict[str, Any] | None = None


def available() -> bool:
    """Whether numba imports on this machine (the kernel is then usable)."""
    try:
        import numba  # noqa: F401
    except Exception:  # pragma: no cover - depends on the platform
        return False
    return True


def _prefetch_intrinsic() -> Any:
    """``prefetch_row(table, row)``: a read prefetch of the row's first cache line."""
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic

    @intrinsic  # type: ignore[misc]
    def prefetch_row(typingctx, table, row):  # type: ignore[no-untyped-def]
        def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
            table_type = signature.args[0]
            array = context.make_array(table_type)(context, builder, args[0])
            pointer = cgutils.get_item_pointer2(
                context, builder, data=array.data,
                shape=cgutils.unpack_tuple(builder, array.shape),
                strides=cgutils.unpack_tuple(builder, array.strides),
                layout=table_type.layout,
                inds=[args[1], context.get_constant(types.intp, 0)],
                wraparound=False,
            )
            byte_pointer = ir.IntType(8).as_pointer()
            i32 = ir.IntType(32)
            function = cgutils.get_or_insert_function(
                builder.module,
                ir.FunctionType(ir.VoidType(), [byte_pointer, i32, i32, i32]),
                "llvm.prefetch.p0i8",
            )
            # read, high temporal locality, data cache
            builder.call(function, [builder.bitcast(pointer, byte_pointer),
                                    ir.Constant(i32, 0), ir.Constant(i32, 3),
                                    ir.Constant(i32, 1)])
            return context.get_dummy_value()

        return types.void(table, row), codegen

    return prefetch_row


def _build() -> dict[str, Any]:
    """Compile the loops lazily so ``import kernels`` does not pay for numba."""
    import numba

    prefetch_row = _prefetch_intrinsic()
    ahead = _PREFETCH
    options = {"parallel": True, "nogil": True, "cache": True, "boundscheck": False}
    jit = numba.njit(**options)
    # "contract" lets LLVM fuse acc + w * row into one FMA, as PyTorch's weighted path does.
    jit_fma = numba.njit(fastmath={"contract"}, **options)

    @jit  # type: ignore[misc]
    def pool_sum(weight, indices, offsets, padding_idx, mean, out):  # type: ignore[no-untyped-def]
        dim = weight.shape[1]
        n = indices.shape[0]
        for b in numba.prange(offsets.shape[0] - 1):
            acc = out[b]
            for j in range(dim):
                acc[j] = 0
            k = offsets[b]
            end = offsets[b + 1]
            count = end - k
            if padding_idx >= 0:
                for q in range(k, end):
                    if indices[q] == padding_idx:
                        count -= 1
            if count == end - k:
                # No padding in this bag: the unrolled path.
                while k + 8 <= end:
                    if k + ahead + 7 < n:
                        for q in range(k + ahead, k + ahead + 8):
                            prefetch_row(weight, indices[q])
                    r0 = weight[indices[k]]
                    r1 = weight[indices[k + 1]]
                    r2 = weight[indices[k + 2]]
                    r3 = weight[indices[k + 3]]
                    r4 = weight[indices[k + 4]]
                    r5 = weight[indices[k + 5]]
                    r6 = weight[indices[k + 6]]
                    r7 = weight[indices[k + 7]]
                    for j in range(dim):
                        acc[j] = (((((((acc[j] + r0[j]) + r1[j]) + r2[j]) + r3[j]) + r4[j])
                                   + r5[j]) + r6[j]) + r7[j]
                    k += 8
            while k < end:
                if k + ahead < n:
                    prefetch_row(weight, indices[k + ahead])
                row_id = indices[k]
                k += 1
                if row_id == padding_idx:
                    continue
                row = weight[row_id]
                for j in range(dim):
                    acc[j] += row[j]
            if mean and count > 1:
                # float32 / int64 is computed in float64 and rounded once, which equals
                # the correctly rounded float32 division PyTorch performs.
                for j in range(dim):
                    acc[j] = acc[j] / count

    @jit_fma  # type: ignore[misc]
    def pool_weighted(weight, indices, offsets, scale, padding_idx, out):  # type: ignore[no-untyped-def]
        dim = weight.shape[1]
        n = indices.shape[0]
        for b in numba.prange(offsets.shape[0] - 1):
            acc = out[b]
            for j in range(dim):
                acc[j] = 0
            for k in range(offsets[b], offsets[b + 1]):
                if k + ahead < n:
                    prefetch_row(weight, indices[k + ahead])
                row_id = indices[k]
                if row_id == padding_idx:
                    continue
                row = weight[row_id]
                w = scale[k]
                for j in range(dim):
                    acc[j] += w * row[j]

    @jit  # type: ignore[misc]
    def pool_max(weight, indices, offsets, padding_idx, out):  # type: ignore[no-untyped-def]
        dim = weight.shape[1]
        n = indices.shape[0]
        for b in numba.prange(offsets.shape[0] - 1):
            acc = out[b]
            first = True
            for k in range(offsets[b], offsets[b + 1]):
                if k + ahead < n:
                    prefetch_row(weight, indices[k + ahead])
                row_id = indices[k]
                if row_id == padding_idx:
                    continue
                row = weight[row_id]
                if first:
                    for j in range(dim):
                        acc[j] = row[j]
                    first = False
                else:
                    # Strictly greater keeps the first maximum, as PyTorch does.
                    for j in range(dim):
                        if row[j] > acc[j]:
                            acc[j] = row[j]
            if first:  # empty bag, or only padding
                for j in range(dim):
                    acc[j] = 0

    return {"sum": pool_sum, "weighted": pool_weighted, "max": pool_max}


def _kernels() -> dict[str, Any]:
    global _compiled
    with _compile_lock:
        if _compiled is None:
            _compiled = _build()
        return _compiled


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

    def __init__(self, spec: TableSpec, num_threads: int | None = None) -> None:
        import numba

        limit = int(numba.config.NUMBA_NUM_THREADS)
        if num_threads is not None and not 1 <= num_threads <= limit:
            raise ValueError(f"num_threads must be in [1, {limit}]; got {num_threads}")
        self.spec = spec
        self.num_threads = num_threads
        self._set_threads = numba.set_num_threads
        self._loops = _kernels()
        # -1 never matches a validated id, so the loops need no Optional.
        self._padding = -1 if spec.padding_idx is None else spec.padding_idx

    def __call__(
        self,
        indices: IndexArray,
        offsets: IndexArray,
        per_sample_weights: FloatArray | None = None,
    ) -> FloatArray:
        weight = self.spec.weight
        num_bags = offsets.shape[0] - 1
        if num_bags == 0 or indices.shape[0] == 0:
            return np.zeros((num_bags, weight.shape[1]), dtype=weight.dtype)
        out = np.empty((num_bags, weight.shape[1]), dtype=weight.dtype)
        if self.num_threads is not None:
            # Thread-local in numba: set on every call because callers move between threads.
            self._set_threads(self.num_threads)
        if self.spec.mode == "max":
            self._loops["max"](weight, indices, offsets, self._padding, out)
        elif per_sample_weights is not None:
            self._loops["weighted"](weight, indices, offsets, per_sample_weights,
                                    self._padding, out)
        else:
            self._loops["sum"](weight, indices, offsets, self._padding,
                               self.spec.mode == "mean", out)
        return out
