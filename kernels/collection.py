"""Collections: many tables and many features per sample pooled in one call, concatenated
in TorchRec's ``EmbeddingBagCollection`` order.

A collection batch has the flat layout of a table batch with ``F`` bags per sample, sample
major: bag ``s * F + f`` is feature ``f`` of sample ``s``, and its ids are rows of that
feature's table. A kernel returns float32 ``[B, sum of feature dims]``: feature ``f`` of
sample ``s`` lands in ``out[s, cols[f] : cols[f] + dim]``, features ordered by table (config
order) then by their place in the table's feature list (see :class:`CollectionSpec`).

- :class:`FusedCollectionKernel` (numba): one pass over every bag of every feature and
  table, written straight into the output (FBGEMM's table-batched embeddings).
- :class:`TableByTableKernel` (NumPy, ONNX Runtime): one table kernel call per table,
  each over all of its features' bags at once (their columns are adjacent).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from kernels import numba_kernel
from kernels.base import FloatArray, IndexArray, Kernel, TableSpec

#: Collections compute and answer in float32, as TorchRec's modules do.
COMPUTE_DTYPE = np.dtype(np.float32)


@dataclass(frozen=True)
class CollectionSpec:
    """The tables of a collection and which table each feature reads.

    Attributes:
        tables: each table with its pooling and ``padding_idx``, in output order. None
            may be float64 (collections compute in float32).
        features: feature names in output order: every table's features together, tables
            in order.
        feature_tables: for each feature, the index of its table in ``tables``
            (non-decreasing: a table's features are adjacent).
    """

    tables: tuple[TableSpec, ...]
    features: tuple[str, ...]
    feature_tables: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.tables:
            raise ValueError("a collection needs at least one table")
        if len(self.features) != len(self.feature_tables):
            raise ValueError("features and feature_tables differ in length")
        if list(self.feature_tables) != sorted(self.feature_tables) or any(
                not 0 <= t < len(self.tables) for t in self.feature_tables):
            raise ValueError("feature_tables must list table indices in table order")
        unused = set(range(len(self.tables))) - set(self.feature_tables)
        if unused:
            raise ValueError(f"table(s) {sorted(unused)} have no feature")
        for spec in self.tables:
            if spec.table.storage == "float64":
                raise ValueError("collection tables compute in float32; store float64 "
                                 "tables as float32 (the default table_dtype)")

    @property
    def dims(self) -> tuple[int, ...]:
        """Each feature's embedding dim."""
        return tuple(self.tables[t].embedding_dim for t in self.feature_tables)

    @property
    def cols(self) -> tuple[int, ...]:
        """Where each feature's columns start in a sample's vector."""
        return tuple(int(c) for c in np.cumsum((0, *self.dims))[:-1])

    @property
    def total_dim(self) -> int:
        return sum(self.dims)

    @property
    def table_bytes(self) -> int:
        return sum(spec.table.nbytes for spec in self.tables)


class FusedCollectionKernel:
    """Every bag of every feature in one numba pass (see :mod:`kernels.numba_collection`).

    Tables of one stored form share a pass; a collection mixing forms (say int8 and
    float16 tables) runs one pass per form, each writing its own columns.

    Args:
        spec: the collection.
        num_threads: threads per call (``None``: numba's default, all cores).

    Raises:
        ImportError: numba is not installed.
        ValueError: ``num_threads`` out of range.
    """

    name = "numba"
    provider = "numba-cpu"

    def __init__(self, spec: CollectionSpec, num_threads: int | None = None) -> None:
        self._set_threads, self._get_threads = numba_kernel.thread_control(num_threads)
        self.spec = spec
        self.num_threads = num_threads
        self._loops = _compiled()
        tables = spec.tables
        dims = np.array([t.embedding_dim for t in tables], dtype=np.int64)
        padding = np.array([-1 if t.padding_idx is None else t.padding_idx for t in tables],
                           dtype=np.int64)
        prefetch = np.array([numba_kernel.table_prefetch(t.table) for t in tables],
                            dtype=np.int64)
        self._cols = np.array(spec.cols, dtype=np.int64)
        self._feature_tables = np.array(spec.feature_tables, dtype=np.int64)
        #: Mean bytes an id gathers: sizes a call for the serial-or-parallel choice.
        self._id_bytes = float(np.mean([numba_kernel.id_bytes(tables[t].table)
                                        for t in spec.feature_tables]))
        self._total_dim = spec.total_dim
        #: Each table's rows keyed in one id space, for max_norm's per-row factors.
        scaled = np.array([t.table.row_scale is not None for t in tables])
        self._row_scale: npt.NDArray[np.float32] | None = None
        if scaled.any():
            self._row_base = np.cumsum([0] + [t.num_embeddings for t in tables])[:-1]
            self._row_scale = np.concatenate([
                t.table.row_scale if t.table.row_scale is not None
                else np.ones(t.num_embeddings, np.float32) for t in tables])
        modes = np.array([t.mode for t in tables])
        self._passes = []
        for storage in dict.fromkeys(t.table.storage for t in tables):
            members = [i for i, t in enumerate(tables) if t.table.storage == storage]
            view = numba_kernel.VIEWS[storage]
            arrays = [numba_kernel._read_only(tables[i].table.data.view(view))
                      for i in members]
            # Padded to a power of two with a table no feature reads: numba compiles one
            # loop per tuple length, so 3..4 tables share one, 5..8 the next, ...
            arrays += [arrays[0]] * ((1 << (len(arrays) - 1).bit_length()) - len(arrays))
            local = {table: position for position, table in enumerate(members)}
            feature_table = np.array([local.get(t, -1) for t in spec.feature_tables],
                                     dtype=np.int64)
            # Positions in this pass's tuple -> per-table facts.
            lookup = np.array(members + [members[0]] * (len(arrays) - len(members)))
            self._passes.append(_Pass(tuple(arrays), feature_table, dims[lookup],
                                      padding[lookup], prefetch[lookup], modes[lookup],
                                      scaled[lookup]))

    def __call__(self, indices: IndexArray, offsets: IndexArray,
                 per_sample_weights: FloatArray | None = None) -> FloatArray:
        """Pool a validated batch; returns float32 ``[B, total_dim]``.

        Args:
            indices: int64 ``[N]`` ids, sample major (each in its feature's table).
            offsets: int64 ``[B * F + 1]``.
            per_sample_weights: float32 ``[N]`` or ``None``; weights of ids of tables that
                do not sum must be 1.

        Raises:
            ValueError: the batch was not validated (an id outside its table, bad offsets).
        """
        features = len(self.spec.features)
        samples = (offsets.shape[0] - 1) // features
        out = np.empty((samples, self._total_dim), dtype=COMPUTE_DTYPE)
        if samples == 0:
            return out
        indices = numba_kernel._writable(indices)
        offsets = numba_kernel._writable(offsets)
        scale = per_sample_weights
        if self._row_scale is not None:
            scale = self._row_factors(indices, offsets, samples, scale)
        dummy = scale is None
        scale = numba_kernel._writable(np.empty(0, COMPUTE_DTYPE) if scale is None
                                       else np.ascontiguousarray(scale, COMPUTE_DTYPE))
        serial = numba_kernel.runs_serially(samples, indices.shape[0] * self._id_bytes)
        invalid = 0
        for step in self._passes:
            ops = step.weighted_ops if not dummy else step.plain_ops
            if serial:
                invalid += self._loops[0](
                    step.tables, indices, offsets, scale, 0, samples, step.feature_table,
                    self._cols, step.dims, ops, step.padding, step.prefetch, out)
            else:
                threads = numba_kernel.call_threads(self.num_threads, self._get_threads,
                                                    self._set_threads)
                starts = np.ascontiguousarray(offsets[::features])
                invalid += self._loops[1](
                    step.tables, indices, offsets, starts, scale, min(threads, samples),
                    step.feature_table, self._cols, step.dims, ops, step.padding,
                    step.prefetch, out)
        if invalid:
            raise ValueError(f"{invalid} bag(s) hold ids outside their table or bad "
                             "offsets: the kernel's input must be validated first")
        return out

    def _row_factors(self, indices: IndexArray, offsets: IndexArray, samples: int,
                     weights: FloatArray | None) -> FloatArray:
        """Each id's max_norm factor (times its weight): the row's factor in its table."""
        table_of_bag = np.tile(self._feature_tables, samples)
        table_of_id = np.repeat(table_of_bag, np.diff(offsets))
        rows = self._row_base[table_of_id] + indices
        assert self._row_scale is not None
        factors = np.take(self._row_scale, rows, mode="clip")
        return factors if weights is None else factors * weights

    def warm_up(self) -> None:
        """Compile (or load from numba's cache) the serial and parallel loops."""
        features = len(self.spec.features)
        offsets = np.arange(0, 2 * features + 1, dtype=np.int64)
        ids = np.zeros(2 * features, dtype=np.int64)
        for step in self._passes:
            for weighted in (False, True):
                scale = np.ones(ids.shape[0] if weighted else 0, COMPUTE_DTYPE)
                ops = step.weighted_ops if weighted else step.plain_ops
                out = np.empty((2, self.spec.total_dim), COMPUTE_DTYPE)
                self._loops[0](step.tables, ids, offsets, scale, 0, 2, step.feature_table,
                               self._cols, step.dims, ops, step.padding, step.prefetch, out)
                self._loops[1](step.tables, ids, offsets, offsets[::features].copy(), scale,
                               2, step.feature_table, self._cols, step.dims, ops,
                               step.padding, step.prefetch, out)


@dataclass(frozen=True)
class _Pass:
    """The tables of one stored form and their per-table facts, as the loop takes them."""

    tables: tuple[Any, ...]
    feature_table: npt.NDArray[np.int64]
    dims: npt.NDArray[np.int64]
    padding: npt.NDArray[np.int64]
    prefetch: npt.NDArray[np.int64]
    modes: npt.NDArray[Any]
    scaled: npt.NDArray[np.bool_]
    #: :meth:`ops` for calls without and with a scale array, worked out once.
    plain_ops: npt.NDArray[np.int64] = field(init=False)
    weighted_ops: npt.NDArray[np.int64] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "plain_ops", self.ops(False))
        object.__setattr__(self, "weighted_ops", self.ops(True))

    def ops(self, weighted: bool) -> npt.NDArray[np.int64]:
        """Each table's op for a call with (``weighted``) or without a scale array: sum
        tables weigh their ids when the call has weights, max_norm factors (``scaled``)
        weigh every id of their table."""
        from kernels import numba_collection as nc

        ops = np.empty(len(self.modes), dtype=np.int64)
        for position, (mode, scaled) in enumerate(zip(self.modes, self.scaled, strict=True)):
            if mode == "max":
                ops[position] = nc.OP_SCALED_MAX if scaled and weighted else nc.OP_MAX
            elif mode == "mean":
                ops[position] = nc.OP_WEIGHTED_MEAN if scaled and weighted else nc.OP_MEAN
            else:
                ops[position] = nc.OP_WEIGHTED_SUM if weighted else nc.OP_SUM
        return ops


_compile_lock = threading.Lock()
_loops: tuple[Any, Any] | None = None


def _compiled() -> tuple[Any, Any]:
    """(serial, parallel) loops, imported (and so compiled or loaded) on first use."""
    global _loops
    with _compile_lock:
        if _loops is None:
            from kernels import numba_collection

            _loops = (numba_collection.serial_samples, numba_collection.parallel_samples)
        return _loops


class TableByTableKernel:
    """One table kernel call per table, each over every bag of its features.

    Serves collections on the NumPy and ONNX Runtime backends. A table's features sit side
    by side in the output, so its ``[B * features, D]`` result is ``[B, features * D]``
    and lands in one slice.

    Args:
        spec: the collection.
        kernels: one table kernel per ``spec.tables`` entry.
    """

    def __init__(self, spec: CollectionSpec, kernels: list[Kernel]) -> None:
        self.spec = spec
        self.kernels = kernels
        first = kernels[0]
        self.name = first.name
        self.provider = first.provider
        features = np.array(spec.feature_tables)
        self._members = [np.flatnonzero(features == t) for t in range(len(spec.tables))]
        self._cols = [spec.cols[int(members[0])] for members in self._members]
        self._widths = [len(m) * spec.tables[t].embedding_dim
                        for t, m in enumerate(self._members)]

    def __call__(self, indices: IndexArray, offsets: IndexArray,
                 per_sample_weights: FloatArray | None = None) -> FloatArray:
        """As :meth:`FusedCollectionKernel.__call__`."""
        features = len(self.spec.features)
        samples = (offsets.shape[0] - 1) // features
        out = np.empty((samples, self.spec.total_dim), dtype=COMPUTE_DTYPE)
        if samples == 0:
            return out
        lengths = np.diff(offsets)
        for table, kernel in enumerate(self.kernels):
            members = self._members[table]
            bags = (np.arange(samples)[:, None] * features + members[None, :]).reshape(-1)
            ids, bag_offsets, picked = select_bags(indices, offsets, lengths, bags)
            weights = None
            if per_sample_weights is not None and self.spec.tables[table].mode == "sum":
                weights = per_sample_weights[picked].astype(kernel.spec.compute_dtype)
            pooled = kernel(ids, bag_offsets, weights)
            col = self._cols[table]
            out[:, col : col + self._widths[table]] = pooled.reshape(samples, -1)
        return out

    def warm_up(self) -> None:
        for kernel in self.kernels:
            warm = getattr(kernel, "warm_up", None)
            if warm is not None:
                warm()


def select_bags(indices: npt.NDArray[Any], offsets: IndexArray, lengths: IndexArray,
                bags: IndexArray) -> tuple[npt.NDArray[Any], IndexArray, IndexArray]:
    """The ids of ``bags`` back to back, without a Python loop: ``(ids, offsets
    [len(bags) + 1], positions)``, ``positions`` where each id sits in ``indices``
    (``offsets`` are the bags' starts there, ``lengths`` their lengths)."""
    picked_lengths = lengths[bags]
    bag_offsets = np.zeros(bags.shape[0] + 1, dtype=np.int64)
    np.cumsum(picked_lengths, out=bag_offsets[1:])
    total = int(bag_offsets[-1])
    # Position of each picked id in ``indices``: its bag's start plus its place in the bag.
    positions = (np.arange(total, dtype=np.int64)
                 + np.repeat(offsets[bags] - bag_offsets[:-1], picked_lengths))
    return indices[positions], bag_offsets, positions


def make_collection_kernel(spec: CollectionSpec, backend: str = "auto", *,
                           device: str = "auto", num_threads: int | None = None) -> Any:
    """The kernel for a collection on ``backend`` (see :func:`kernels.make_kernel`):
    ``"numpy"`` and ``"auto"`` run the fused numba pass when numba imports, else (for
    ``"auto"``, also without numba) ONNX Runtime's CPU EP or one NumPy call per table;
    ``"onnx"`` runs each table's graph on ONNX Runtime (CUDA when it works), one run per
    table. ``auto`` never picks CUDA for a collection: one table's run of 256 bags took 0.27-0.43
    ms on the lent H100 (BENCHMARKS.md, GPU), mostly copies and launches; 22 tables' runs
    take longer than the fused pass over 512 samples of all 26 features on two CPU cores
    (1.2 ms).

    Raises:
        BackendError: unknown backend or one that cannot run here.
    """
    from kernels.select import BACKENDS, BackendError, make_kernel

    if backend not in BACKENDS:
        raise BackendError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if backend in ("auto", "numpy") and numba_kernel.available():
        return FusedCollectionKernel(spec, num_threads=num_threads)
    if backend == "auto":
        backend = "numpy"
    kernels = [make_kernel(table, backend, device=device, num_threads=num_threads)
               for table in spec.tables]
    return TableByTableKernel(spec, kernels)
