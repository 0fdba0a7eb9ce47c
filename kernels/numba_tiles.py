"""Register-tile loops for the fused CPU kernel, written in LLVM IR through numba.

One *tile* is ``vectors`` SIMD registers of one bag's output row: :data:`VECTOR_BYTES`, 64
(16 float32 or 8 float64 lanes, AVX-512's zmm registers) where numba compiles for a CPU
with AVX-512, else 32 (8 or 4 lanes, AVX2's ymm). A tile call walks the bag's ids once and
keeps its accumulators in registers for the whole bag, so a gathered row costs one
load-and-add per register and no accumulator traffic through memory (a plain numba loop
over the columns reloads and stores the accumulator for every row: 0.5-0.8x torch's FBGEMM
loop on cache-resident rows). Each lane still adds its column strictly in bag order, with
IEEE adds (no fast-math reassociation), so sums and means stay bit-identical to PyTorch's;
weighted sums use one fused multiply-add per row, as FBGEMM does; max keeps the first
maximum (``x > acc`` selects, so an equal or NaN later row never replaces the kept one).

The caller (``numba_loops``) cuts a row into passes of up to :data:`MOST_VECTORS` whole
registers; the last pass also carries a masked register for the last ``dim % lanes``
columns, so any embedding dim works and each column is read in exactly one pass (a row of
12 floats is one pass of a whole and a masked register, not two passes).

These are numba ``@intrinsic`` functions: they compile into the calling loop, inlined, and
only exist inside numba-compiled code.
"""

from __future__ import annotations

import platform
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from kernels import numba_decode

LINE_BYTES = 64
_X86_64 = platform.machine().lower() in ("x86_64", "amd64")
_I8P = ir.IntType(8).as_pointer()
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)


def _vector_bytes() -> int:
    """64 where numba compiles for a CPU with AVX-512 (its target's features: the host's,
    or ``NUMBA_CPU_FEATURES``), else 32.

    torch's FBGEMM kernels use zmm registers there: with ymm tiles on a Xeon with
    AVX-512 (Emerald Rapids), sums of cache-resident rows ran 0.74-0.97x torch, 0.88-1.15x
    with zmm (dims 32-1,024; BENCHMARKS.md). Passes stay at most 8 registers (a row of 128
    float32): passes of 16 or 24 zmm registers measured no better at dims 256-1,024.
    """
    from numba.core import codegen, config

    features = getattr(config, "CPU_FEATURES", None)  # set from NUMBA_CPU_FEATURES
    if features is None:
        features = codegen.get_host_cpu_features()
    flags = set(features.split(","))
    return 64 if "+avx512f" in flags and "-evex512" not in flags else 32


#: Bytes of one SIMD register of the tiles (see :func:`_vector_bytes`).
VECTOR_BYTES = _vector_bytes()


#: The lines of a row part a negative ``prefetch`` still prefetches (the first 128 bytes).
#: Rows gathered from the caches run faster prefetched only so far: the core's own
#: prefetchers fetch the rest as the loads reach it, and each prefetch skipped is a load
#: slot and a fill buffer freed; rows read from memory need every line prefetched.
#: ``numba_calls`` picks per kernel by timing both (see ``kernels.numba_calls.TRIAL_CALLS``).
#: Measured (float32, Zipf 1.1, sums, 2 threads; lead lines only x torch against every
#: line's, one process each): dim 128 16,384 bags hot (rows in the L2 and L3) 1.19-1.21
#: against 1.02-1.03 with 2 lines, 1.11-1.17 with 1 and 1.11-1.18 with 4; 2,048 bags cold
#: (rows in the L3) 1.18-1.20 against 1.04-1.05 (1.10-1.13 with 4); dim 64 16,384 hot
#: 1.10-1.15 against 1.02-1.05; dim 96 hot 3 lines 1.15-1.17, 4 lines 1.11-1.14,
#: every line 1.00; rows from memory (16,384 bags cold) 0.95 with 2, 0.97 with 4, 0.88
#: with 1, against 0.99-1.01 for every line.
LEAD_LINES = 2


def _prefetch(builder: ir.IRBuilder, pointer: ir.Value) -> None:
    function = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.VoidType(), [_I8P, _I32, _I32, _I32]),
        "llvm.prefetch.p0i8")
    # read, high temporal locality, data cache
    builder.call(function, [builder.bitcast(pointer, _I8P), ir.Constant(_I32, 0),
                            ir.Constant(_I32, 3), ir.Constant(_I32, 1)])


def _function(builder: ir.IRBuilder, name: str, returns: ir.Type,
              arguments: list[ir.Type]) -> ir.Function:
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(returns, arguments),
                                          name)


def _splat(builder: ir.IRBuilder, value: ir.Value, vector: ir.VectorType) -> ir.Value:
    lanes = builder.insert_element(ir.Constant(vector, ir.Undefined), value,
                                   ir.Constant(_I32, 0))
    return builder.shuffle_vector(lanes, ir.Constant(vector, ir.Undefined),
                                  ir.Constant(ir.VectorType(_I32, vector.count), None))


def _rolled(module: ir.Module) -> ir.Value:
    """A fresh loop id telling LLVM not to unroll the loop: a tile's body is already a
    row wide, and an unrolled copy plus its remainder cost short bags more per bag than
    it saves (bags of 8 ids: 3% from cache, 17% on an L1-resident table)."""
    disable = module.add_metadata([ir.MetaDataString(module, "llvm.loop.unroll.disable")])
    # A loop id refers to itself; add_metadata caches by operands, so start from a unique
    # placeholder and point the node at itself afterwards.
    loop = module.add_metadata([ir.MetaDataString(module, f"tile.loop.{len(module.metadata)}")])
    loop.operands = (loop, disable)
    return loop


@contextmanager
def _loop(builder: ir.IRBuilder, start: ir.Value, stop: ir.Value) -> Iterator[ir.Value]:
    """``for position in range(start, stop)``, kept rolled (see :func:`_rolled`)."""
    header = builder.append_basic_block("tile.cond")
    body = builder.append_basic_block("tile.body")
    end = builder.append_basic_block("tile.end")
    entry = builder.basic_block
    builder.branch(header)
    with builder.goto_block(header):
        position = builder.phi(_I64, name="position")
        builder.cbranch(builder.icmp_signed("<", position, stop), body, end)
    with builder.goto_block(body):
        yield position
        latch = builder.basic_block
        following = builder.add(position, ir.Constant(_I64, 1))
        builder.branch(header).set_metadata("llvm.loop", _rolled(builder.module))
    position.add_incoming(start, entry)
    position.add_incoming(following, latch)
    builder.position_at_end(end)


class _Tile:
    """Emits one pass's loop; see :func:`make_pass` for the arguments."""

    def __init__(self, context: Any, builder: ir.IRBuilder, signature: Any,
                 args: list[ir.Value], op: str, vectors: int, masked: bool) -> None:
        self.builder = builder
        self.op = op
        self.maximum = op in ("max", "scaled_max")
        weight_type, index_type, scale_type = signature.args[:3]
        self.weight = context.make_array(weight_type)(context, builder, args[0])
        self.indices = context.make_array(index_type)(context, builder, args[1])
        self.scale = context.make_array(scale_type)(context, builder, args[2])
        out_type = signature.args[7]
        #: ``padding`` is None for tables without ``padding_idx``: their loops compile
        #: without the compare (an id loop 5-20% faster on cache-resident rows of 12-64
        #: floats, one thread).
        self.skips_padding = _names_padding(signature.args[5])
        self.out = context.make_array(out_type)(context, builder, args[7])
        (self.start, self.end, self.padding, self.col, self.bag, self.prefetch,
         self.divisor, self.tail, self.stores) = (args[3], args[4], args[5], args[6], args[8],
                                                  args[9], args[10], args[11], args[13])
        # Registers hold the output's dtype: float64 for float64 tables, else float32.
        self.element = context.get_data_type(out_type.dtype)
        self.itemsize = out_type.dtype.bitwidth // 8
        self.vector = ir.VectorType(self.element, VECTOR_BYTES // self.itemsize)
        #: Whole registers, then (``masked``) one register of the row's last ``tail``
        #: columns: a row's tail rides in the same pass over the bag as its last whole
        #: registers instead of a pass of its own.
        self.vectors = vectors
        self.registers = vectors + int(masked)
        # LLVM's name for the vector type in intrinsic names: v8f32, v4f64.
        self.suffix = f"v{self.vector.count}f{self.itemsize * 8}"
        self.mask = None
        if masked:
            # Lane numbers as integers of the lanes' own width: the compare is then one
            # instruction whose result vmaskmov takes as it is (with i64 lanes for float32,
            # LLVM packed the mask anew for every row: eight instructions an id).
            width = ir.IntType(8 * self.itemsize)
            positions = ir.VectorType(width, self.vector.count)
            lanes = ir.Constant(positions, list(range(self.vector.count)))
            tail = builder.trunc(self.tail, width) if self.itemsize < 8 else self.tail
            self.mask = builder.icmp_signed("<", lanes, _splat(builder, tail, positions))
        dim = builder.extract_value(self.out.shape, 1)
        kind = numba_decode.kind_of(weight_type.dtype)
        self.decoder = numba_decode.Decoder(builder, kind, self.vector, None, dim)
        self.tail_decoder = (numba_decode.Decoder(builder, kind, self.vector, self.mask, dim)
                             if masked else None)
        self.col_bytes = self.decoder.column_bytes(self.col)
        #: int4 tiles of whole register pairs read 8 bytes (16 codes) at once and keep even
        #: and odd columns in separate registers (no shuffle per row; one per bag at the
        #: end, in :meth:`write`).
        self.paired = (kind == "int4" and vectors > 0 and vectors % 2 == 0
                       and self.vector.count == 8)
        self.out_col_bytes = builder.mul(self.col, ir.Constant(_I64, self.itemsize))
        self.row_stride = builder.extract_value(self.weight.strides, 0)
        self.table = builder.bitcast(self.weight.data, _I8P)

    def row(self, position: ir.Value) -> ir.Value:
        """``i8*`` to the start of the row ``indices[position]``."""
        builder = self.builder
        row_id = builder.load(builder.gep(self.indices.data, [position]))
        return self.row_of(row_id)

    def row_of(self, row_id: ir.Value) -> ir.Value:
        builder = self.builder
        return builder.gep(self.table, [builder.mul(row_id, self.row_stride)])

    def _pointer(self, base: ir.Value, vector: int) -> ir.Value:
        builder = self.builder
        return builder.bitcast(builder.gep(base, [ir.Constant(_I64, vector * VECTOR_BYTES)]),
                               self.vector.as_pointer())

    def loads(self, base: ir.Value) -> list[ir.Value]:
        """This tile's registers of the row part at ``base``, in accumulator order (see
        :attr:`paired`)."""
        decoder = self.decoder
        registers: list[ir.Value] = []
        if not self.paired:
            registers = [decoder.load(base, vector) for vector in range(self.vectors)]
        else:
            for pair in range(self.vectors // 2):
                registers += decoder.load_pair(base, pair)
        if self.tail_decoder is not None:
            registers.append(self.tail_decoder.load(base, self.vectors))
        return registers

    def values(self, row: ir.Value) -> list[ir.Value]:
        """This tile's registers of the row starting at ``row``, decoded to values (a
        quantized code ``q`` becomes ``fma(q, scale, bias)``, as the dequantized table)."""
        builder = self.builder
        decoder = self.decoder
        base = builder.gep(row, [self.col_bytes])
        loaded = self.loads(base)
        if not decoder.quantized:
            return loaded
        scale, bias = decoder.row_scale(row, None)
        bias = _splat(builder, bias, self.vector)
        fma = _function(builder, f"llvm.fma.{self.suffix}", self.vector, [self.vector] * 3)
        return [builder.call(fma, [codes, scale, bias]) for codes in loaded]

    def store(self, base: ir.Value, vector: int, value: ir.Value) -> None:
        builder = self.builder
        pointer = self._pointer(base, vector)
        if self.mask is None or vector != self.vectors:
            stream = builder.icmp_signed("==", self.stores, ir.Constant(_I64, STORE_STREAM))
            with builder.if_else(stream) as (streamed, plain):
                with streamed:
                    # The caller's promise: ``pointer`` is a register's width aligned.
                    store = builder.store(value, pointer, align=VECTOR_BYTES)
                    store.set_metadata("nontemporal", builder.module.add_metadata(
                        [ir.Constant(_I32, 1)]))
                with plain:
                    builder.store(value, pointer, align=self.itemsize)
            return
        # The tail register: whole when the caller allows it (``STORE_WHOLE``: the lanes past
        # the row's end land on rows it writes later), else only its first ``tail``
        # lanes. A masked store is microcoded on AMD's cores: ~3.5 ns a bag here, 10-12%
        # of a bag of 8 ids at dims 12 and 50.
        whole = builder.icmp_signed("==", self.stores, ir.Constant(_I64, STORE_WHOLE))
        with builder.if_else(whole, likely=True) as (plain, masked):
            with plain:
                builder.store(value, pointer, align=self.itemsize)
            with masked:
                function = _function(builder, f"llvm.masked.store.{self.suffix}.p0",
                                     ir.VoidType(), [self.vector, pointer.type, _I32,
                                                     self.mask.type])
                builder.call(function, [value, pointer, ir.Constant(_I32, self.itemsize),
                                        self.mask])

    def emit(self) -> ir.Value:
        """Emit the loop; returns 1 when an id outside the table was skipped, else 0."""
        builder = self.builder
        accumulators = [cgutils.alloca_once(builder, self.vector)
                        for _ in range(self.registers)]
        self.invalid = cgutils.alloca_once(builder, _I64)
        builder.store(ir.Constant(_I64, 0), self.invalid)
        self.biases = cgutils.alloca_once(builder, self.element)
        builder.store(ir.Constant(self.element, 0), self.biases)
        self.rows = builder.extract_value(self.weight.shape, 0)
        first = self.start
        if self.maximum:
            # The caller passes the first non-padding id as ``start``: its row is the
            # starting maximum, as PyTorch's first-row copy.
            values = self.values(self.row(first))
            if self.op == "scaled_max":
                factor = _splat(builder, builder.load(builder.gep(self.scale.data, [first])),
                                self.vector)
                values = [builder.fmul(value, factor) for value in values]
            for accumulator, value in zip(accumulators, values, strict=True):
                builder.store(value, accumulator)
            first = builder.add(first, ir.Constant(_I64, 1))
        else:
            for accumulator in accumulators:
                builder.store(ir.Constant(self.vector, None), accumulator)
        # Ids before ``limit`` prefetch the row ``prefetch`` ids on (the ids after it are
        # the call's last: none is left to prefetch). One loop with a predictable branch,
        # not a loop before ``limit`` and one after: with a pass compiled for every
        # register count, the second loop cost 20% of the compile time and no speed.
        # The clamps into [first, end] look redundant beside the loop's own bounds, but
        # without them weighted sums of short rows ran 15-20% slower (A/B, dims 12 and
        # 100, hot): LLVM uses the bound.
        # A negative ``prefetch`` (-d) prefetches d ids ahead, only each row part's first
        # LEAD_LINES lines (see LEAD_LINES).
        off = ir.Constant(_I64, 0)
        every_line = builder.icmp_signed(">", self.prefetch, off)
        distance = builder.select(every_line, self.prefetch, builder.neg(self.prefetch))
        count = builder.extract_value(self.indices.shape, 0)
        bound = builder.sub(count, distance)
        bound = builder.select(builder.icmp_signed("<", bound, self.end), bound, self.end)
        limit = builder.select(builder.icmp_signed(">", distance, off), bound, first)
        limit = builder.select(builder.icmp_signed("<", limit, first), first, limit)
        tile_bytes = self.registers * self.decoder.vector_bytes
        lead_bytes = LEAD_LINES * LINE_BYTES
        scale_line = None
        # Only in the wide tiles a row of 64+ codes starts with: the check alone cost the
        # short rows' tiles (int8 dim 16) 5-10%.
        if self.decoder.quantized and self.vectors >= 8:
            # A quantized row's first tile reads its scale and bias at once: when they sit
            # past the lines this tile prefetches, prefetch their line too (int8 dim 128:
            # bytes 128-135, a third line; cold calls missed on it for every row).
            offset = self.decoder.scale_offset()
            scale_line = builder.and_(
                builder.icmp_signed("==", self.col, ir.Constant(_I64, 0)),
                builder.icmp_signed(">=", offset,
                                    ir.Constant(_I64, max(tile_bytes, LINE_BYTES))))
        straddles = None
        if tile_bytes % LINE_BYTES == 0:
            # Rows need not start on a line: NumPy's large arrays start 16 bytes past one,
            # safetensors' tensors 8-aligned. Such a part of a row spans one line more
            # than its size, and its last byte's line is prefetched too (without it, dim
            # 128 on a NumPy table ran 8-14% slower and dim 32 cold 25%). Rows on lines
            # (torch's tables) skip that redundant prefetch: the test is loop-invariant.
            start_bytes = builder.add(builder.ptrtoint(self.table, _I64), self.col_bytes)
            straddles = builder.icmp_signed(
                "!=", builder.and_(builder.or_(start_bytes, self.row_stride),
                                   ir.Constant(_I64, LINE_BYTES - 1)), ir.Constant(_I64, 0))
        with _loop(builder, first, self.end) as position:
            with builder.if_then(builder.icmp_signed("<", position, limit), likely=True):
                ahead = self.row(builder.add(position, distance))
                data = builder.gep(ahead, [self.col_bytes])
                for line in range(0, min(tile_bytes, lead_bytes), LINE_BYTES):
                    _prefetch(builder, builder.gep(data, [ir.Constant(_I64, line)]))
                # The lines past the lead: all of them, or none on a negative prefetch.
                with builder.if_then(every_line if tile_bytes > lead_bytes
                                     else ir.Constant(ir.IntType(1), 1)):
                    for line in range(lead_bytes, tile_bytes, LINE_BYTES):
                        _prefetch(builder, builder.gep(data, [ir.Constant(_I64, line)]))
                    if straddles is not None:
                        with builder.if_then(straddles):
                            _prefetch(builder, builder.gep(
                                data, [ir.Constant(_I64, tile_bytes - 1)]))
                if scale_line is not None:
                    with builder.if_then(scale_line):
                        _prefetch(builder, builder.gep(ahead, [offset]))
            self.add_row(position, accumulators)
        self.write(accumulators)
        return builder.load(self.invalid)

    def add_row(self, position: ir.Value, accumulators: list[ir.Value]) -> None:
        builder = self.builder
        row_id = builder.load(builder.gep(self.indices.data, [position]))
        # A negative id is a huge unsigned one: one compare finds both ends of the range.
        inside = builder.icmp_unsigned("<", row_id, self.rows)
        with builder.if_then(builder.not_(inside), likely=False):
            builder.store(ir.Constant(_I64, 1), self.invalid)
        wanted = inside
        if self.skips_padding:
            wanted = builder.and_(inside, builder.icmp_signed("!=", row_id, self.padding))
        with builder.if_then(wanted, likely=True):
            row = self.row_of(row_id)
            fma = _function(builder, f"llvm.fma.{self.suffix}", self.vector,
                            [self.vector] * 3)
            weight = None
            if self.op in ("weighted", "scaled_max"):
                weight = builder.load(builder.gep(self.scale.data, [position]))
            if self.decoder.quantized and not self.maximum:
                # One fused multiply-add of the codes by the scale (times the weight) a
                # register; the row's bias (times the weight) goes to one scalar sum,
                # added once at the end (FBGEMM adds it to every register, every row).
                scale, bias = self.decoder.row_scale(row, weight)
                base = builder.gep(row, [self.col_bytes])
                for accumulator, codes in zip(accumulators, self.loads(base), strict=True):
                    builder.store(builder.call(fma, [codes, scale, builder.load(accumulator)]),
                                  accumulator)
                builder.store(builder.fadd(builder.load(self.biases), bias), self.biases)
                return
            for accumulator, value in zip(accumulators, self.values(row), strict=True):
                total = builder.load(accumulator)
                if self.op == "sum":
                    total = builder.fadd(total, value)
                elif self.op == "weighted":
                    total = builder.call(fma, [_splat(builder, weight, self.vector), value,
                                               total])
                else:
                    if weight is not None:  # scaled_max: the row times its factor
                        value = builder.fmul(value, _splat(builder, weight, self.vector))
                    total = builder.select(builder.fcmp_ordered(">", value, total), value,
                                           total)
                builder.store(total, accumulator)

    def write(self, accumulators: list[ir.Value]) -> None:
        builder = self.builder
        out_stride = builder.extract_value(self.out.strides, 0)
        base = builder.gep(builder.bitcast(self.out.data, _I8P),
                           [builder.add(builder.mul(self.bag, out_stride),
                                        self.out_col_bytes)])
        totals = [builder.load(accumulator) for accumulator in accumulators]
        if self.decoder.quantized and not self.maximum:
            biases = _splat(builder, builder.load(self.biases), self.vector)
            totals = [builder.fadd(total, biases) for total in totals]
        if self.paired:
            # Back from (even columns, odd columns) to column order.
            lanes = self.vector.count
            low = [k // 2 + (lanes if k % 2 else 0) for k in range(lanes)]
            high = [lane + lanes // 2 for lane in low]
            ordered = []
            whole = totals[:self.vectors]
            for even, odd in zip(whole[0::2], whole[1::2], strict=True):
                for mask in (low, high):
                    ordered.append(builder.shuffle_vector(
                        even, odd, ir.Constant(ir.VectorType(_I32, lanes), mask)))
            totals = ordered + totals[self.vectors:]
        divide = builder.icmp_signed(">", self.divisor, ir.Constant(_I64, 1))
        with builder.if_else(divide, likely=False) as (mean, plain):
            with mean:
                # A correctly rounded division by the count, as PyTorch's mean.
                divisor = _splat(builder, builder.sitofp(self.divisor, self.element),
                                 self.vector)
                for vector, total in enumerate(totals):
                    self.store(base, vector, builder.fdiv(total, divisor))
            with plain:
                for vector, total in enumerate(totals):
                    self.store(base, vector, total)


#: Most whole registers in one pass over a bag, and in a pass of a row of more than
#: :data:`WIDE_FROM` whole registers. Measured (float32, 2,048 bags, api x torch): a
#: dim-128 row in one pass of 16 ran 3-10% slower than two passes of 8, and 12 + 4 was 7%
#: slower hot; at dim 384 passes of 12 lost 3-4% to passes of 8; from dim 512 up passes of
#: 12 won (dim 1,024 hot 0.85 -> 1.00x torch: half the passes, each with its id loop and
#: bag setup), 16 no more than 12 and only for sums (others need spare registers).
MOST_VECTORS = 8
WIDE_VECTORS = 12
WIDE_FROM = 48


#: How a pass stores its results (``make_pass``'s ``stores``): plain stores with the
#: tail register masked; plain stores with the tail register whole; non-temporal
#: (streaming) stores, which write whole lines without reading them first and leave the
#: caches to the rows being gathered (see ``numba_loops.streams`` for when they pay).
STORE_MASKED, STORE_WHOLE, STORE_STREAM = 0, 1, 2


def make_pass(op: str, tailed: bool = False) -> Any:
    """A numba intrinsic pooling one pass of one bag into ``out[bag, col:...]``: ``vectors``
    whole registers (0 to :data:`MOST_VECTORS`, or :data:`WIDE_VECTORS` with no tail) and,
    when ``tail`` > 0, one more register of which the first ``tail`` lanes are written (a
    row's last ``dim % lanes`` columns). Each (vectors, masked) pair compiles its own
    loop; the call picks one at run time.

    Call it from numba code as ``run(weight, indices, scale, start, end, padding, col,
    out, bag, prefetch, divisor, tail, vectors, stores)``:

    - ``weight``: the stored rows (C-contiguous), viewed as :mod:`kernels.numba_decode`
      says (float32/float64 tables as they are); ``indices``: int64 ids; ``scale``:
      per-id weights of ``out``'s dtype (read only by ``"weighted"``, which adds
      ``scale[i] * row``, and ``"scaled_max"``, which compares ``scale[i] * row``; pass
      any array of that dtype otherwise);
    - ids ``indices[start:end]`` are pooled, those equal to ``padding`` skipped (``None``
      or ``-1`` skips none; None compiles no compare) and those outside the table skipped
      and reported: the call returns 1 if any was, else 0; for the max ops, ``start``
      must be a valid non-padding id;
    - columns ``col`` to ``col + vectors * lanes + tail`` are written to row ``bag`` of
      ``out``, ``(B, dim)`` float64 for float64 tables, else float32;
    - ``prefetch``: prefetch the pass's lines of the row that many ids ahead (0: none);
      ``divisor`` > 1 divides the result (mean);
    - ``stores``: how the results reach ``out``: :data:`STORE_MASKED` (plain stores, only
      the ``tail`` lanes of the tail register), :data:`STORE_WHOLE` (the tail register
      stored whole, its lanes past the row's end landing on the elements of ``out`` that
      follow: the caller's promise that they exist and it writes them afterwards) or
      :data:`STORE_STREAM` (whole registers stored past the caches; the caller's promise:
      each one's address is :data:`VECTOR_BYTES`-aligned, and it calls
      :func:`fence_stores` before the results are read).

    ``op`` is ``"sum"``, ``"weighted"``, ``"max"`` or ``"scaled_max"``. Arguments are
    int64 where integer; any other ``vectors`` (or 0 with no tail) pools nothing and
    returns 0. ``tailed``: the caller always passes a ``tail`` > 0 (known only at run
    time), so only the cases with the masked register compile; a call with no tail then
    pools nothing.
    """
    if op not in ("sum", "weighted", "max", "scaled_max"):
        raise ValueError(f"op must be sum, weighted, max or scaled_max; got {op!r}")

    # Literal arguments reach the typer as literals (``prefer_literal``): a call with a
    # literal register count and tail then compiles only its own case of the switch.
    @intrinsic(prefer_literal=True)
    def run(typingctx: Any, weight: Any, indices: Any, scale: Any, start: Any, end: Any,
            padding: Any, col: Any, out: Any, bag: Any, prefetch: Any, divisor: Any,
            tail: Any, vectors: Any, stores: Any) -> Any:
        signature = types.int64(weight, indices, scale, start, end, padding, col, out, bag,
                                prefetch, divisor, tail, vectors, stores)

        def codegen(context: Any, builder: ir.IRBuilder, signature: Any,
                    args: list[ir.Value]) -> Any:
            args = list(args)
            masked = builder.icmp_signed(">", args[11], ir.Constant(_I64, 0))
            # Case 2 * vectors + masked.
            key = builder.add(builder.shl(args[12], ir.Constant(_I64, 1)),
                              builder.zext(masked, _I64))
            none = builder.append_basic_block("pass.none")
            done = builder.append_basic_block("pass.done")
            switch = builder.switch(key, none)
            results = []
            counts = _literal(signature.args[12])
            tails = _literal(signature.args[11])
            for vectors in (*range(MOST_VECTORS + 1), WIDE_VECTORS):
                for tail in (False, True):
                    if (vectors == 0 and not tail) or (vectors == WIDE_VECTORS and tail):
                        continue
                    if ((counts is not None and vectors != counts)
                            or (tails is not None and tail != (tails > 0))
                            or (tailed and not tail)):
                        continue  # a literal argument (or ``tailed``) rules this case out
                    case = builder.append_basic_block(f"pass.{vectors}.{int(tail)}")
                    switch.add_case(ir.Constant(_I64, 2 * vectors + tail), case)
                    builder.position_at_end(case)
                    invalid = _Tile(context, builder, signature, args, op, vectors,
                                    tail).emit()
                    results.append((invalid, builder.basic_block))
                    builder.branch(done)
            builder.position_at_end(none)
            builder.branch(done)
            builder.position_at_end(done)
            invalid = builder.phi(_I64)
            for value, block in results:
                invalid.add_incoming(value, block)
            invalid.add_incoming(ir.Constant(_I64, 0), none)
            return invalid

        return signature, codegen

    return run


def _literal(numba_type: Any) -> int | None:
    """The value of an integer literal type, else None."""
    return (numba_type.literal_value if isinstance(numba_type, types.IntegerLiteral)
            else None)


@intrinsic
def lanes(typingctx: Any, weight: Any) -> Any:
    """Lanes of one register for a table view (``VECTOR_BYTES // 8`` for float64, else
    ``VECTOR_BYTES // 4``), a compile-time constant (a division at run time costs one
    per call)."""
    signature = types.int64(weight)
    count = VECTOR_BYTES // (8 if str(weight.dtype) == "float64" else 4)

    def codegen(context: Any, builder: ir.IRBuilder, signature: Any,
                args: list[ir.Value]) -> Any:
        return ir.Constant(_I64, count)

    return signature, codegen


def _names_padding(padding_type: Any) -> bool:
    """Whether a loop's ``padding`` argument can name a row (an int64), rather than being
    None: a table without ``padding_idx``, whose loops compile with no padding compare."""
    return not isinstance(padding_type, types.NoneType)


@intrinsic
def skips(typingctx: Any, padding: Any) -> Any:
    """Whether ``padding`` names a row to skip: a non-negative int64; never for None (a
    compile-time false)."""
    signature = types.boolean(padding)

    def codegen(context: Any, builder: ir.IRBuilder, signature: Any,
                args: list[ir.Value]) -> Any:
        if not _names_padding(signature.args[0]):
            return ir.Constant(ir.IntType(1), 0)
        return builder.icmp_signed(">=", args[0], ir.Constant(_I64, 0))

    return signature, codegen


@intrinsic
def is_padding(typingctx: Any, row_id: Any, padding: Any) -> Any:
    """``row_id == padding`` for an int64 ``padding``; a compile-time false for None."""
    signature = types.boolean(row_id, padding)

    def codegen(context: Any, builder: ir.IRBuilder, signature: Any,
                args: list[ir.Value]) -> Any:
        if not _names_padding(signature.args[1]):
            return ir.Constant(ir.IntType(1), 0)
        return builder.icmp_signed("==", args[0], args[1])

    return signature, codegen


#: Whether passes may stream their stores (:data:`STORE_STREAM`): on x86-64, where an
#: ``sfence`` (:func:`fence_stores`) orders them before the results are read.
STREAMS = _X86_64


@intrinsic
def fence_stores(typingctx: Any) -> Any:
    """An ``sfence`` where :data:`STREAMS` (else nothing): the streaming stores before it
    reach memory before any store after it, so a thread's results are all visible once
    its loop returns. Returns 0."""
    signature = types.int64()

    def codegen(context: Any, builder: ir.IRBuilder, signature: Any,
                args: list[ir.Value]) -> Any:
        if STREAMS:
            builder.call(_function(builder, "llvm.x86.sse.sfence", ir.VoidType(), []), [])
        return ir.Constant(_I64, 0)

    return signature, codegen


#: Whether :func:`cycles` reads a clock: x86-64's time-stamp counter (constant-rate on
#: every x86-64 CPU this runs on). Elsewhere LLVM's cycle counter may be a register user
#: code cannot read (AArch64's PMCCNTR_EL0 traps), so it reads nothing.
HAS_CYCLES = _X86_64


@intrinsic
def cycles(typingctx: Any) -> Any:
    """The time-stamp counter (``rdtsc``) as an int64 where :data:`HAS_CYCLES`, else 0:
    a clock cheap enough (~20 cycles) to time one kernel call from compiled code."""
    signature = types.int64()

    def codegen(context: Any, builder: ir.IRBuilder, signature: Any,
                args: list[ir.Value]) -> Any:
        if not HAS_CYCLES:
            return ir.Constant(_I64, 0)
        return builder.call(_function(builder, "llvm.readcyclecounter", _I64, []), [])

    return signature, codegen
