"""The numba-compiled loops behind :class:`kernels.numba_kernel.NumbaKernel`.

This file is compiled by numba, not run as Python, so mypy skips it (see pyproject.toml);
its inputs are typed and checked in ``numba_kernel``. See that module's docstring for why
the loops look the way they do.
"""

from __future__ import annotations

from typing import Any

import numba
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

#: How many ids ahead a row is prefetched (measured best of 4-32 on the 3 bench shapes).
PREFETCH = 8


def _prefetch_intrinsic() -> Any:
    """``prefetch(table, row, col)``: a read prefetch of the cache line holding
    ``table[row, col]``."""
    @intrinsic
    def prefetch(typingctx, table, row, col):
        def codegen(context, builder, signature, args):
            table_type = signature.args[0]
            array = context.make_array(table_type)(context, builder, args[0])
            pointer = cgutils.get_item_pointer2(
                context, builder, data=array.data,
                shape=cgutils.unpack_tuple(builder, array.shape),
                strides=cgutils.unpack_tuple(builder, array.strides),
                layout=table_type.layout,
                inds=[args[1], args[2]],
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

        return types.void(table, row, col), codegen

    return prefetch


def build() -> dict[str, Any]:
    """Compile the loops lazily so ``import kernels`` does not pay for numba."""
    prefetch = _prefetch_intrinsic()
    ahead = PREFETCH

    @numba.njit(inline="always")
    def prefetch_row(weight, row, span):
        # span: the row's leading elements to prefetch, one prefetch per 64-byte line
        # (a compile-time step: the itemsize is part of the array type).
        for col in range(0, span, 64 // weight.itemsize):
            prefetch(weight, row, col)

    options = {"parallel": True, "nogil": True, "cache": True, "boundscheck": False}
    jit = numba.njit(**options)
    # "contract" lets LLVM fuse acc + w * row into one FMA, as PyTorch's weighted path does.
    jit_fma = numba.njit(fastmath={"contract"}, **options)

    @jit
    def pool_sum(weight, indices, offsets, padding_idx, mean, span, out):
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
                            prefetch_row(weight, indices[q], span)
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
                    prefetch_row(weight, indices[k + ahead], span)
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

    @jit_fma
    def pool_weighted(weight, indices, offsets, scale, padding_idx, span, out):
        dim = weight.shape[1]
        n = indices.shape[0]
        for b in numba.prange(offsets.shape[0] - 1):
            acc = out[b]
            for j in range(dim):
                acc[j] = 0
            for k in range(offsets[b], offsets[b + 1]):
                if k + ahead < n:
                    prefetch_row(weight, indices[k + ahead], span)
                row_id = indices[k]
                if row_id == padding_idx:
                    continue
                row = weight[row_id]
                w = scale[k]
                for j in range(dim):
                    acc[j] += w * row[j]

    @jit
    def pool_max(weight, indices, offsets, padding_idx, span, out):
        dim = weight.shape[1]
        n = indices.shape[0]
        for b in numba.prange(offsets.shape[0] - 1):
            acc = out[b]
            first = True
            for k in range(offsets[b], offsets[b + 1]):
                if k + ahead < n:
                    prefetch_row(weight, indices[k + ahead], span)
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
