"""The fused collection pass against one NumPy kernel call per table (itself checked
against torch by the table tests): every pooling, dims that fill no register, padding,
weights, mixed storages, serial and parallel calls."""

from __future__ import annotations

import numpy as np
import pytest

from kernels.base import TableSpec
from kernels.collection import (
    CollectionSpec,
    FusedCollectionKernel,
    TableByTableKernel,
    make_collection_kernel,
)
from kernels.numba_kernel import NumbaKernel
from kernels.numpy_kernel import NumpyKernel
from kernels.storage import store


def _spec(storages: tuple[str, ...], seed: int = 0) -> CollectionSpec:
    rng = np.random.default_rng(seed)
    shapes = [(300, 16, "sum", None), (50, 5, "mean", 3), (1000, 33, "max", None),
              (20, 128, "sum", 0), (7, 1, "mean", None)]
    tables = tuple(
        TableSpec(store(rng.standard_normal((rows, dim)).astype(np.float32),
                        storages[i % len(storages)]), mode, padding)  # type: ignore[arg-type]
        for i, (rows, dim, mode, padding) in enumerate(shapes))
    feature_tables = (0, 1, 1, 2, 3, 3, 3, 4)
    return CollectionSpec(tables, tuple(f"f{i}" for i in range(8)), feature_tables)


def _batch(spec: CollectionSpec, samples: int, seed: int = 1, longest: int = 6
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    features = len(spec.features)
    lengths = rng.integers(0, longest + 1, samples * features)
    rows = np.array([spec.tables[t].num_embeddings for t in spec.feature_tables])
    bound = np.repeat(np.tile(rows, samples), lengths)
    ids = (rng.random(bound.shape[0]) * bound).astype(np.int64)
    # Padding ids, often: every table's padding row shows up.
    ids[::5] = np.where(bound[::5] > 3, 3, 0)[: ids[::5].shape[0]]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    weights = rng.uniform(0.5, 2, ids.shape[0]).astype(np.float32)
    # Only sum tables weigh their ids; the others carry 1.
    table_of_id = np.repeat(np.tile(np.array(spec.feature_tables), samples), lengths)
    summed = np.array([spec.tables[t].mode == "sum" for t in range(len(spec.tables))])
    weights[~summed[table_of_id]] = 1
    return ids, offsets, weights


def _reference(spec: CollectionSpec) -> TableByTableKernel:
    return TableByTableKernel(spec, [NumpyKernel(t) for t in spec.tables])


@pytest.mark.parametrize("storages", [("float32",), ("float16",), ("int8",),
                                      ("float32", "int8", "bfloat16"), ("int4", "float32")])
@pytest.mark.parametrize("samples", [1, 3, 700])
@pytest.mark.parametrize("weighted", [False, True])
def test_fused_equals_table_by_table(storages: tuple[str, ...], samples: int,
                                     weighted: bool) -> None:
    spec = _spec(storages)
    ids, offsets, weights = _batch(spec, samples)
    fused = FusedCollectionKernel(spec)
    scale = weights if weighted else None
    out = fused(ids, offsets, scale)
    assert out.shape == (samples, spec.total_dim) and out.dtype == np.float32
    # The same tiles one table at a time: the same bits.
    per_table = TableByTableKernel(spec, [NumbaKernel(t) for t in spec.tables])
    np.testing.assert_array_equal(out, per_table(ids, offsets, scale))
    # NumPy decodes quantized rows before adding: the last bits of cancelling sums differ.
    np.testing.assert_allclose(out, _reference(spec)(ids, offsets, scale), rtol=1e-5,
                               atol=1e-5)


def test_parallel_threads_agree_with_serial() -> None:
    spec = _spec(("float32",))
    ids, offsets, _ = _batch(spec, 3000, longest=20)
    one = FusedCollectionKernel(spec, num_threads=1)(ids, offsets)
    two = FusedCollectionKernel(spec, num_threads=2)(ids, offsets)
    np.testing.assert_array_equal(one, two)


def test_empty_bags_and_no_samples() -> None:
    spec = _spec(("float32",))
    fused = FusedCollectionKernel(spec)
    offsets = np.zeros(2 * len(spec.features) + 1, np.int64)
    np.testing.assert_array_equal(fused(np.zeros(0, np.int64), offsets),
                                  np.zeros((2, spec.total_dim), np.float32))
    assert fused(np.zeros(0, np.int64), np.zeros(1, np.int64)).shape == (0, spec.total_dim)


def test_unvalidated_ids_raise_not_read() -> None:
    spec = _spec(("float32",))
    ids, offsets, _ = _batch(spec, 4)
    ids[np.argmax(offsets[1:] > 0)] = 10**9
    with pytest.raises(ValueError, match="validated first"):
        FusedCollectionKernel(spec)(ids, offsets)


def test_spec_refusals() -> None:
    table = TableSpec(store(np.zeros((2, 2), np.float32), "float32"), "sum")
    with pytest.raises(ValueError, match="no feature"):
        CollectionSpec((table, table), ("a",), (0,))
    with pytest.raises(ValueError, match="table order"):
        CollectionSpec((table, table), ("a", "b"), (1, 0))
    wide = TableSpec(store(np.zeros((2, 2)), "float64"), "sum")
    with pytest.raises(ValueError, match="float32"):
        CollectionSpec((wide,), ("a",), (0,))


def test_backends() -> None:
    spec = _spec(("float32",))
    assert isinstance(make_collection_kernel(spec, "numpy"), FusedCollectionKernel)
    onnx = make_collection_kernel(spec, "onnx", device="cpu")
    assert isinstance(onnx, TableByTableKernel) and onnx.name == "onnx"
    ids, offsets, weights = _batch(spec, 5)
    np.testing.assert_allclose(onnx(ids, offsets, weights),
                               _reference(spec)(ids, offsets, weights), rtol=2e-6, atol=2e-6)
    with pytest.raises(ValueError, match="backend must be"):
        make_collection_kernel(spec, "tpu")
