"""Validation: every invalid call raises ValueError naming the argument and value."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest

from models import EmbeddingBag, InvalidInputError, flatten_inputs


@pytest.fixture
def table() -> np.ndarray:
    return np.arange(40, dtype=np.float32).reshape(10, 4)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        ({"input": [0, 10], "offsets": [0]}, "index 10 out of range [0, 10) at position 1"),
        ({"input": [3, -1, 2], "offsets": [0]}, "index -1 out of range [0, 10) at position 1"),
        ({"input": [[0, 1], [2, 12]]}, "index 12 out of range [0, 10) at position (1, 1)"),
        ({"input": [2**40], "offsets": [0]}, f"index {2**40} out of range"),
        ({"input": [0, 1], "offsets": [1]}, "offsets[0] must be 0; got 1"),
        ({"input": [0, 1, 2], "offsets": [0, 2, 1]}, "offsets must not decrease; offsets[2] = 1"),
        ({"input": [0, 1], "offsets": [0, 3]}, "offsets[1] = 3 is past the end of input"),
        ({"input": [0, 1], "offsets": [[0]]}, "offsets has to be a 1D array"),
        ({"input": [0, 1]}, "offsets has to be a 1D array when input is 1D; got None"),
        ({"input": [[0, 1]], "offsets": [0]}, "if input is 2D, then offsets has to be None"),
        ({"input": np.zeros((1, 1, 1), np.int64)}, "input has to be 1D or 2D; got 3D"),
        ({"input": [0.0, 1.0], "offsets": [0]}, "input must hold integers (int32 or int64); "
                                               "got dtype float64"),
        ({"input": [True], "offsets": [0]}, "input must hold integers"),
        ({"input": [0], "offsets": [0.0]}, "offsets must hold integers"),
        ({"input": ["1"], "offsets": [0]}, "input must hold integers"),
        ({"input": [0, 1], "offsets": []}, "offsets is empty but input holds 2 ids"),
    ],
)
def test_invalid_call_names_argument_and_value(table: np.ndarray, call: dict[str, Any],
                                               message: str) -> None:
    bag = EmbeddingBag.from_pretrained(table, mode="sum")
    with pytest.raises(ValueError, match=re.escape(message)):
        bag(**call)


def test_include_last_offset_requires_last_offset_equal_to_length(table: np.ndarray) -> None:
    bag = EmbeddingBag.from_pretrained(table, mode="sum", include_last_offset=True)
    with pytest.raises(InvalidInputError, match=re.escape("must equal len(input) = 3; got 2")):
        bag([0, 1, 2], [0, 2])
    with pytest.raises(InvalidInputError, match="at least 1 entry"):
        bag([], [])


@pytest.mark.parametrize("mode", ["mean", "max"])
def test_weights_rejected_outside_sum_mode(table: np.ndarray, mode: str) -> None:
    bag = EmbeddingBag.from_pretrained(table, mode=mode)
    with pytest.raises(InvalidInputError,
                       match=f"only supported for mode='sum'; got mode='{mode}'"):
        bag([0, 1], [0], per_sample_weights=[1.0, 2.0])


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ([1.0], r"per_sample_weights must have the shape of input \(2,\); got \(1,\)"),
        ([[1.0, 2.0]], r"must have the shape of input \(2,\); got \(1, 2\)"),
        ([1, 2], "per_sample_weights must hold floats; got dtype int64"),
    ],
)
def test_bad_weights_are_named(table: np.ndarray, weights: Any, message: str) -> None:
    bag = EmbeddingBag.from_pretrained(table, mode="sum")
    with pytest.raises(InvalidInputError, match=message):
        bag([0, 1], [0], per_sample_weights=weights)


def test_rejected_call_mutates_nothing(table: np.ndarray) -> None:
    bag = EmbeddingBag.from_pretrained(table, mode="sum", padding_idx=2)
    ids = np.array([0, 2, 11], dtype=np.int32)
    offsets = np.array([0, 1], dtype=np.int64)
    weights = np.array([1.0, 2.0, 3.0], dtype=np.float64)
    before = [a.copy() for a in (table, ids, offsets, weights)]
    with pytest.raises(InvalidInputError):
        bag(ids, offsets, weights)
    for original, now in zip(before, (table, ids, offsets, weights), strict=True):
        np.testing.assert_array_equal(original, now)
        assert original.dtype == now.dtype
    np.testing.assert_array_equal(bag([0, 2], [0, 1]), table[[0, 2]] * [[1], [0]])


def test_flatten_produces_kernel_layout() -> None:
    batch = flatten_inputs(np.array([4, 5, 6], np.int32), np.array([0, 0, 2], np.int32),
                           [0.5, 1.5, 2.5], num_embeddings=7, mode="sum")
    np.testing.assert_array_equal(batch.indices, [4, 5, 6])
    np.testing.assert_array_equal(batch.offsets, [0, 0, 2, 3])
    assert batch.indices.dtype == batch.offsets.dtype == np.int64
    assert batch.per_sample_weights is not None
    assert batch.per_sample_weights.dtype == np.float32
    assert batch.num_bags == 3


def test_two_d_input_becomes_equal_bags() -> None:
    batch = flatten_inputs([[1, 2, 3], [4, 5, 6]], num_embeddings=7, mode="mean")
    np.testing.assert_array_equal(batch.offsets, [0, 3, 6])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_embeddings": 0, "embedding_dim": 3}, "num_embeddings must be a positive integer"),
        ({"num_embeddings": 3, "embedding_dim": 2.0}, "embedding_dim must be a positive integer"),
        ({"num_embeddings": 3, "embedding_dim": 2, "mode": "median"},
         "mode must be one of sum, mean, max; got 'median'"),
        ({"num_embeddings": 3, "embedding_dim": 2, "padding_idx": 3},
         r"padding_idx must be within num_embeddings: 3 is not in \[-3, 3\)"),
        ({"num_embeddings": 3, "embedding_dim": 2, "padding_idx": -4},
         "padding_idx must be within"),
        ({"num_embeddings": 3, "embedding_dim": 2, "max_norm": -1.0}, "max_norm must be a "
                                                                      "non-negative number"),
        ({"num_embeddings": 3, "embedding_dim": 2, "norm_type": "l2"},
         "norm_type must be a number"),
        ({"num_embeddings": 3, "embedding_dim": 2, "dtype": "float16"},
         "dtype must be float32 or float64; got float16"),
        ({"num_embeddings": 3, "embedding_dim": 2, "backend": "cuda"},
         "backend must be one of numpy, onnx, auto; got 'cuda'"),
    ],
)
def test_bad_constructor_arguments_are_named(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EmbeddingBag(**kwargs)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (np.zeros(3, np.float32), r"embeddings must be 2-D .* got shape \(3,\)"),
        (np.zeros((3, 2), np.int64), "embeddings must hold floats; got dtype int64"),
    ],
)
def test_from_pretrained_rejects_non_tables(table: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EmbeddingBag.from_pretrained(table)


def test_ragged_nested_lists_are_named_not_numpys_error() -> None:
    bag = EmbeddingBag.from_pretrained(np.ones((5, 2), np.float32), mode="sum")
    with pytest.raises(InvalidInputError, match="input is a ragged nested list .* pass 1-D "
                                                "ids with offsets instead"):
        bag([[1, 2], [3]])
    with pytest.raises(InvalidInputError, match="per_sample_weights is a ragged nested list"):
        bag([[1, 2], [3, 4]], per_sample_weights=[[1.0], [2.0, 3.0]])


def _outcome(call: Any) -> Any:
    """What a forward call gave: its error's words, or its rows."""
    try:
        return call().tolist()
    except InvalidInputError as error:
        return ("error", str(error))


def test_the_usual_call_takes_the_short_path_and_its_near_misses_the_general_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The usual call (1-D contiguous writable native int64 ids and offsets, float32
    weights) is recognised by type and identity tests and handed to the kernel as it is;
    every near miss is refused there, and every call, usual or not, gives what the
    general path gives (the same rows, the same refusal) and what the validated NumPy
    kernel gives."""
    from kernels import NumpyKernel, TableSpec
    from models import embedding_bag, inputs

    ids = np.array([1, 2, 3, 4, 5, 6], dtype=np.int64)
    starts = np.array([0, 2, 2], dtype=np.int64)
    weights = np.linspace(0.5, 3.0, 6, dtype=np.float32)
    f32 = np.dtype(np.float32)
    read_only = ids.copy()
    read_only.setflags(write=False)
    assert inputs.usual_bags(ids, starts, weights, "sum", False, f32) == 3
    assert inputs.usual_bags(ids, starts, None, "max", True, f32) == 2
    refused: list[tuple[Any, Any, Any, str]] = [
        (ids.astype(np.int32), starts, None, "sum"),
        (ids.astype(">i8"), starts.astype(">i8"), None, "sum"),  # byte-swapped
        (np.repeat(ids, 2)[::2], starts, None, "sum"),  # not contiguous
        (read_only, starts, None, "sum"),
        (ids.reshape(2, 3), None, None, "sum"),
        (ids.tolist(), starts.tolist(), None, "sum"),
        (ids, starts, weights.astype(np.float64), "sum"),
        (ids, starts, np.repeat(weights, 2)[::2], "sum"),
        (ids, starts, weights[:5], "sum"),
        (ids, starts, weights, "mean"),
    ]
    for input, offsets, scale, mode in refused:
        assert inputs.usual_bags(input, offsets, scale, mode, False, f32) == -1, (
            input, offsets, scale, mode)
    calls: list[tuple[Any, Any, Any, str, bool]] = [
        (ids, starts, None, "mean", False),
        (ids, starts, weights, "sum", False),
        (ids, np.array([0, 2, 6], np.int64), None, "max", True),
        (ids, np.array([0, 2, 5], np.int64), None, "sum", True),  # last offset not N
        (ids, np.array([1, 2], np.int64), None, "sum", False),  # first offset not 0
        (ids, np.array([0, 4, 2], np.int64), None, "sum", False),  # decreasing
        (ids, np.array([0, 2, 7], np.int64), None, "sum", False),  # past the end
        (ids, np.array([], np.int64), None, "sum", False),
        (np.array([], np.int64), np.array([0], np.int64), None, "sum", True),  # no bags
        (np.array([1, 9], np.int64), np.array([0, 1], np.int64), None, "sum", False),
        (ids, starts, weights[:5], "sum", False),  # shape differs: refused
        (ids, starts, weights, "mean", False),  # weights outside sum: refused
        (ids.astype(np.float32), starts, None, "sum", False),  # refused
        *((input, offsets, scale, mode, False) for input, offsets, scale, mode in refused),
    ]
    table = np.arange(8 * 3, dtype=np.float32).reshape(8, 3) - 7
    for input, offsets, scale, mode, last in calls:
        bag = EmbeddingBag.from_pretrained(table, mode=mode, include_last_offset=last)
        assert bag.kernel.name == "numba"

        def call(bag: Any = bag, input: Any = input, offsets: Any = offsets,
                 scale: Any = scale) -> Any:
            return bag(input, offsets, scale)

        def reference(input: Any = input, offsets: Any = offsets, scale: Any = scale,
                      mode: Any = mode, last: bool = last) -> Any:
            batch = flatten_inputs(input, offsets, scale, num_embeddings=8, mode=mode,
                                   include_last_offset=last)
            kernel = NumpyKernel(TableSpec(table, mode))
            return kernel(batch.indices, batch.offsets, batch.per_sample_weights)

        got = _outcome(call)
        assert got == _outcome(reference), (input, offsets, scale, mode, last)
        with monkeypatch.context() as patch:
            patch.setattr(embedding_bag, "usual_bags", lambda *args: -1)
            assert _outcome(call) == got, (input, offsets, scale, mode, last)
