"""The embedding_bag cases of PyTorch's own suite (test/nn/test_embedding.py), ported.

PyTorch checks its kernels against a per-bag reference built from ``embedding``; here
the reference is :func:`tests.reference.reference_bag`. Where PyTorch raises
RuntimeError we raise ValueError with a message naming the argument.
"""

from __future__ import annotations

import numpy as np
import pytest

from models import EmbeddingBag
from tests.conftest import assert_close_to_bag, runner
from tests.reference import reference_bag


def _table(rows: int = 10, dim: int = 5, dtype: type = np.float32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, dim)).astype(dtype)


def _check(implementation: str, weight: np.ndarray, *call: object, **options: object) -> None:
    expected = reference_bag(weight, *call, **options).astype(weight.dtype)  # type: ignore[arg-type]
    actual = runner(implementation, weight, **options)(*call)
    assert_close_to_bag(actual, expected, rtol=1e-5)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
def test_per_sample_weights_and_offsets(implementation: str, dtype: type,
                                        index_dtype: type) -> None:
    weight = _table(dtype=dtype)
    ids = np.array([3, 1, 1, 9, 0, 4, 4, 7], index_dtype)
    offsets = np.array([0, 0, 3, 3, 6], index_dtype)
    weights = np.random.default_rng(1).standard_normal(8).astype(dtype)
    _check(implementation, weight, ids, offsets, weights, mode="sum")


@pytest.mark.parametrize("index_dtypes", [(np.int32, np.int64), (np.int64, np.int32)])
def test_per_sample_weights_and_new_offsets(implementation: str,
                                            index_dtypes: tuple[type, type]) -> None:
    weight = _table()
    ids = np.array([3, 1, 1, 9, 0, 4, 4, 7], index_dtypes[0])
    offsets = np.array([0, 0, 3, 3, 6, 8], index_dtypes[1])
    weights = np.random.default_rng(2).standard_normal(8).astype(np.float32)
    _check(implementation, weight, ids, offsets, weights, mode="sum", include_last_offset=True)


def test_per_sample_weights_and_no_offsets(implementation: str) -> None:
    weight = _table()
    ids = np.array([[3, 1, 1], [9, 0, 4], [4, 7, 2]])
    weights = np.random.default_rng(3).standard_normal((3, 3)).astype(np.float32)
    _check(implementation, weight, ids, None, weights, mode="sum")


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_empty_per_sample_weights_and_offsets(implementation: str, mode: str) -> None:
    weight = _table()
    weights = np.zeros(0, np.float32) if mode == "sum" else None
    out = runner(implementation, weight, mode=mode)(np.zeros(0, np.int64),
                                                    np.zeros(5, np.int64), weights)
    np.testing.assert_array_equal(out, np.zeros((5, 5), np.float32))


@pytest.mark.parametrize("offsets", [[0], [0, 0]])
def test_empty_input_gives_zero_bags(implementation: str, offsets: list[int]) -> None:
    out = runner(implementation, _table(4, 3), mode="mean")(np.zeros(0, np.int64), offsets)
    np.testing.assert_array_equal(out, np.zeros((len(offsets), 3), np.float32))


@pytest.mark.parametrize(("mode", "weighted"),
                         [("sum", False), ("sum", True), ("mean", False), ("max", False)])
@pytest.mark.parametrize("padding_idx", [0, 3, -1, -10])
def test_1d_padding_idx(implementation: str, mode: str, padding_idx: int,
                        weighted: bool) -> None:
    rng = np.random.default_rng(4)
    weight = _table()
    ids = rng.integers(0, 10, 30)
    ids[rng.random(30) < 0.4] = padding_idx % 10
    ids[5:9] = padding_idx % 10  # one bag of only padding
    offsets = np.array([0, 5, 9, 9, 20])
    weights = rng.standard_normal(30).astype(np.float32) if weighted else None
    _check(implementation, weight, ids, offsets, weights, mode=mode, padding_idx=padding_idx)


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("padding_idx", [1, -2])
def test_2d_padding_idx(implementation: str, mode: str, padding_idx: int) -> None:
    rng = np.random.default_rng(5)
    ids = rng.integers(0, 10, (6, 7))
    ids[rng.random((6, 7)) < 0.5] = padding_idx % 10
    ids[2] = padding_idx % 10
    _check(implementation, _table(), ids, mode=mode, padding_idx=padding_idx)


def test_docs_example_with_padding_idx() -> None:
    weight = _table(10, 3)
    bag = EmbeddingBag.from_pretrained(weight, mode="sum", padding_idx=2)
    out = bag(np.array([2, 2, 2, 2, 4, 3, 2, 9]), np.array([0, 4]))
    np.testing.assert_array_equal(out[0], np.zeros(3, np.float32))
    np.testing.assert_allclose(out[1], weight[4] + weight[3] + weight[9], rtol=1e-6)


@pytest.mark.parametrize("padding_idx", [None, 0])
@pytest.mark.parametrize("bad", [4, -1])
def test_out_of_bounds_idx(padding_idx: int | None, bad: int) -> None:
    bag = EmbeddingBag.from_pretrained(_table(4, 2), mode="sum", padding_idx=padding_idx)
    with pytest.raises(ValueError, match=f"index {bad} out of range \\[0, 4\\) at position "
                                         r"\(0, 0\)"):
        bag(np.array([[bad, 1]]))


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_include_last_offset_matches_plain_offsets(implementation: str, mode: str) -> None:
    weight = _table()
    ids = np.array([0, 1, 2, 3, 4, 5, 6, 7])
    last = runner(implementation, weight, mode=mode, include_last_offset=True)(ids, [0, 2, 2, 5, 8])
    plain = runner(implementation, weight, mode=mode)(ids, [0, 2, 2, 5])
    np.testing.assert_array_equal(last, plain)


def test_dimension_errors() -> None:
    bag = EmbeddingBag.from_pretrained(np.zeros((2, 6)), mode="sum")
    with pytest.raises(ValueError, match="input has to be 1D or 2D"):
        bag(np.full((2, 0, 0, 6, 6), 2), np.full((2, 0, 0, 6, 6), 0))
    with pytest.raises(ValueError, match="offsets has to be a 1D array"):
        bag(np.full((2,), 1), np.full((2, 0, 0, 6, 6), 0))
    with pytest.raises(ValueError, match="embeddings must be 2-D"):
        EmbeddingBag.from_pretrained(np.zeros((2, 2, 2)))


def test_per_sample_weights_failures() -> None:
    with pytest.raises(ValueError, match="only supported for mode='sum'"):
        EmbeddingBag.from_pretrained(_table(), mode="mean")([3, 2], [0], [1.0, 2.0])
    with pytest.raises(ValueError, match="must have the shape of input"):
        EmbeddingBag.from_pretrained(_table(), mode="sum")([3, 2], [0], [[1.0, 2.0]])


def test_from_pretrained_options_max_norm() -> None:
    table = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], np.float32)
    caller_copy = table.copy()
    bag = EmbeddingBag.from_pretrained(table, max_norm=2.0, norm_type=0.5, mode="max",
                                       scale_grad_by_freq=False, sparse=False)
    output = bag(np.array([[0, 1]]))
    np.testing.assert_array_equal(table, caller_copy)  # never the caller's array
    norms = np.linalg.norm(bag.weight.astype(np.float64), ord=0.5, axis=1)
    assert (norms <= 2.0).all(), norms
    np.testing.assert_array_equal(output[0], bag.weight.max(axis=0))
    assert (bag.weight != table).all()


def test_non_contiguous_weight(implementation: str) -> None:
    wide = _table(10, 8)
    weight = wide[:, ::2]
    assert not weight.flags["C_CONTIGUOUS"]
    _check(implementation, weight, np.array([1, 2, 3, 4]), np.array([0, 2]), mode="mean")


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_embedding_bag_matches_embedding_per_bag(implementation: str, mode: str) -> None:
    rng = np.random.default_rng(6)
    weight = _table(50, 7)
    ids = rng.integers(0, 50, (9, 6))
    expected = {"sum": weight[ids].sum(1), "mean": weight[ids].mean(1),
                "max": weight[ids].max(1)}[mode]
    assert_close_to_bag(runner(implementation, weight, mode=mode)(ids), expected, rtol=1e-6)
