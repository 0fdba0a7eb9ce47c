"""Stored rows to float registers, in LLVM IR, for the tiles of :mod:`kernels.numba_tiles`.

The loops tell a table's storage (see :mod:`kernels.storage`) by the dtype of the array
view they are given, so each storage compiles its own loops:

============  ==========  ==========================================================
view dtype    storage     one register of ``L`` lanes (8 float32 or 4 float64 with
                          AVX2, 16 or 8 with AVX-512) comes from
============  ==========  ==========================================================
float32/64    float       ``L`` floats (doubles), as they are
int16         float16     ``L`` halves (2L bytes), widened (vcvtph2ps)
uint16        bfloat16    ``L`` bfloat16 (2L bytes), shifted into float32's top half
uint8         int8        ``L`` codes (L bytes), converted; then ``q * scale + bias``
int8          int4        L/2 bytes of two codes each, low nibble first (with 8 lanes,
                          register pairs: 8 bytes, even and odd columns apart); then as
                          int8
============  ==========  ==========================================================

(:data:`kernels.numba_kernel.VIEWS` gives each storage its view.)

A quantized row's float32 scale and bias (int8) or float16 scale and bias (int4) follow
its codes; the row's last register may read codes past ``dim``, which stay inside the row
(its scale and bias follow) and land in lanes the masked store never writes.
"""

from __future__ import annotations

from typing import Any

from llvmlite import ir
from numba.core import cgutils

from kernels.numba_kernel import VIEWS

_I8 = ir.IntType(8)
_I16 = ir.IntType(16)
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_I8P = _I8.as_pointer()

#: numba dtype name of the view -> storage kind (float32 and float64 decode alike).
KINDS = {view.name: "float" if storage in ("float32", "float64") else storage
         for storage, view in VIEWS.items()}


def kind_of(dtype: Any) -> str:
    """The storage kind a loop compiles for, from the view's numba dtype."""
    kind = KINDS.get(str(dtype))
    if kind is None:
        raise TypeError(f"no tile decoding for tables viewed as {dtype}")
    return kind


def _splat(builder: ir.IRBuilder, value: ir.Value, vector: ir.VectorType) -> ir.Value:
    lanes = builder.insert_element(ir.Constant(vector, ir.Undefined), value,
                                   ir.Constant(_I32, 0))
    return builder.shuffle_vector(lanes, ir.Constant(vector, ir.Undefined),
                                  ir.Constant(ir.VectorType(_I32, vector.count), None))


def _function(builder: ir.IRBuilder, name: str, returns: ir.Type,
              arguments: list[ir.Type]) -> ir.Function:
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(returns, arguments),
                                          name)


class Decoder:
    """Loads registers of one storage kind.

    Args:
        builder: where the IR goes.
        kind: a value of :data:`KINDS`.
        vector: the float register type (``<8 x float>`` or ``<4 x double>``; twice the
            lanes with AVX-512).
        mask: ``<lanes x i1>`` of the lanes to read, for a row's masked tail; ``None``
            for whole registers.
        dim: the row's values (``D``), an ``i64`` (quantized kinds find the scale there).
    """

    def __init__(self, builder: ir.IRBuilder, kind: str, vector: ir.VectorType,
                 mask: ir.Value | None, dim: ir.Value) -> None:
        self.builder = builder
        self.kind = kind
        self.vector = vector
        self.lanes = vector.count
        self.mask = mask
        self.dim = dim
        self.quantized = kind in ("int8", "int4")
        element_bytes = 8 if isinstance(vector.element, ir.DoubleType) else 4
        #: Bytes of stored row one register covers.
        self.vector_bytes = {"float": self.lanes * element_bytes, "float16": 2 * self.lanes,
                             "bfloat16": 2 * self.lanes, "int8": self.lanes,
                             "int4": self.lanes // 2}[kind]

    def column_bytes(self, col: ir.Value) -> ir.Value:
        """Byte offset of column ``col`` (a multiple of the lanes) in a stored row."""
        builder = self.builder
        if self.kind == "int4":
            return builder.lshr(col, ir.Constant(_I64, 1))
        return builder.mul(col, ir.Constant(_I64, self.vector_bytes // self.lanes))

    def scale_offset(self) -> ir.Value:
        """Byte offset of a quantized row's scale and bias: after its codes."""
        if self.kind == "int8":
            return self.dim
        return self.builder.lshr(self.builder.add(self.dim, ir.Constant(_I64, 1)),
                                 ir.Constant(_I64, 1))

    def row_scale(self, row: ir.Value, weight: ir.Value | None) -> tuple[ir.Value, ir.Value]:
        """``(scale, bias)`` of the quantized row starting at ``row`` (``i8*``), both
        multiplied by ``weight`` (a float scalar) when given: the scale splatted across a
        register, the bias a scalar."""
        builder = self.builder
        where = builder.gep(row, [self.scale_offset()])
        if self.kind == "int8":
            pair = builder.bitcast(where, ir.VectorType(ir.FloatType(), 2).as_pointer())
            values = builder.load(pair, align=1)
        else:
            pair = builder.bitcast(where, ir.VectorType(ir.HalfType(), 2).as_pointer())
            values = builder.fpext(builder.load(pair, align=1),
                                   ir.VectorType(ir.FloatType(), 2))
        scale = builder.extract_element(values, ir.Constant(_I32, 0))
        bias = builder.extract_element(values, ir.Constant(_I32, 1))
        if weight is not None:
            scale, bias = builder.fmul(scale, weight), builder.fmul(bias, weight)
        return _splat(builder, scale, self.vector), bias

    def load(self, base: ir.Value, vector: int) -> ir.Value:
        """Register ``vector`` of the row part starting at ``base`` (``i8*``): values for
        the float kinds, codes (as floats) for the quantized ones."""
        builder = self.builder
        where = builder.gep(base, [ir.Constant(_I64, vector * self.vector_bytes)])
        kind = self.kind
        if kind == "float":
            return self._masked_load(where, self.vector)
        if kind in ("float16", "bfloat16"):
            bits = self._masked_load(where, ir.VectorType(_I16, self.lanes))
            if kind == "float16":
                return builder.fpext(builder.bitcast(bits, ir.VectorType(ir.HalfType(),
                                                                         self.lanes)),
                                     self.vector)
            wide = builder.zext(bits, ir.VectorType(_I32, self.lanes))
            wide = builder.shl(wide, ir.Constant(ir.VectorType(_I32, self.lanes), 16))
            return builder.bitcast(wide, self.vector)
        words = ir.VectorType(_I32, self.lanes)
        if kind == "int8":
            codes = builder.load(builder.bitcast(where, ir.VectorType(_I8, self.lanes)
                                                 .as_pointer()), align=1)
            wide = builder.zext(codes, words)
        else:
            half = self.lanes // 2
            pairs = builder.load(builder.bitcast(where, ir.VectorType(_I8, half).as_pointer()),
                                 align=1)
            # Lanes 2k and 2k + 1 both take byte k; even lanes keep its low nibble. The
            # shifts run on 32-bit lanes, which AVX2 shifts per lane (bytes it cannot).
            spread = builder.shuffle_vector(pairs, ir.Constant(pairs.type, ir.Undefined),
                                            ir.Constant(ir.VectorType(_I32, self.lanes),
                                                        [lane // 2 for lane in range(
                                                            self.lanes)]))
            shifts = ir.Constant(words, [4 * (lane % 2) for lane in range(self.lanes)])
            wide = builder.and_(builder.lshr(builder.zext(spread, words), shifts),
                                ir.Constant(words, 15))
        # Codes are small and positive: the signed conversion (one instruction) is exact.
        return builder.sitofp(wide, self.vector)

    def load_pair(self, base: ir.Value, pair: int) -> list[ir.Value]:
        """int4: registers ``2 * pair`` and ``2 * pair + 1`` of the row part at ``base``
        (``i8*``) from one 8-byte load, as codes of the even columns and of the odd ones
        (``[c0, c2, ..., c14]``, ``[c1, c3, ..., c15]``)."""
        builder = self.builder
        words = ir.VectorType(_I32, self.lanes)
        where = builder.gep(base, [ir.Constant(_I64, pair * 2 * self.vector_bytes)])
        packed = builder.load(builder.bitcast(where, ir.VectorType(_I8, self.lanes)
                                              .as_pointer()), align=1)
        wide = builder.zext(packed, words)
        low = builder.and_(wide, ir.Constant(words, 15))
        high = builder.lshr(wide, ir.Constant(words, 4))
        return [builder.sitofp(low, self.vector), builder.sitofp(high, self.vector)]

    def _masked_load(self, where: ir.Value, vector: ir.VectorType) -> ir.Value:
        builder = self.builder
        pointer = builder.bitcast(where, vector.as_pointer())
        element_bytes = 2 if isinstance(vector.element, ir.IntType) else (
            8 if isinstance(vector.element, ir.DoubleType) else 4)
        if self.mask is None:
            return builder.load(pointer, align=element_bytes)
        suffix = (f"v{vector.count}i16" if isinstance(vector.element, ir.IntType)
                  else f"v{vector.count}f{element_bytes * 8}")
        function = _function(builder, f"llvm.masked.load.{suffix}.p0", vector,
                             [pointer.type, _I32, self.mask.type, vector])
        return builder.call(function, [pointer, ir.Constant(_I32, element_bytes), self.mask,
                                       ir.Constant(vector, None)])
