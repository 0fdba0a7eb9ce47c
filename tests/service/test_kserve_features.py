"""The compiled reader of a collection's binary KServe inputs agrees with the general
reader on every request it accepts, and declines every request it cannot prove (the
general reader then words the refusal)."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.inputs import InvalidInputError
from service.errors import InvalidRequest
from service.kserve_features import binary_features, collect_features
from service.protocols.kserve import _tensors

FEATURES = ("user", "item", "history")
WIDTHS = {"INT64": "<i8", "INT32": "<i4"}


def _request(lengths: np.ndarray, ids: np.ndarray, value_type: str = "INT64",
             length_type: str = "INT64", order: list[int] | None = None
             ) -> tuple[list[dict[str, Any]], bytes]:
    """Binary KServe inputs for ``lengths`` [F, B] and feature-major ``ids``."""
    parts, start = [], 0
    for f, feature in enumerate(FEATURES):
        count = int(lengths[f].sum())
        parts.append((f"{feature}__values", value_type, ids[start : start + count]))
        parts.append((f"{feature}__lengths", length_type, lengths[f]))
        start += count
    if order is not None:
        parts = [parts[i] for i in order]
    inputs, tail = [], b""
    for name, datatype, array in parts:
        data = np.asarray(array).astype(WIDTHS[datatype]).tobytes()
        inputs.append({"name": name, "datatype": datatype, "shape": [len(array)],
                       "parameters": {"binary_data_size": len(data)}})
        tail += data
    return inputs, tail


def _general(inputs: list[Any], tail: bytes) -> Any:
    return collect_features(_tensors(inputs, tail, FEATURES), FEATURES)


def _agree(inputs: list[Any], tail: bytes) -> Any:
    """The fast reader's features, checked equal to the general reader's; ``None`` when it
    declined (then the general reader must decide)."""
    fast = binary_features(inputs, tail, FEATURES)
    try:
        general = _general(inputs, tail)
    except (InvalidRequest, InvalidInputError):
        assert fast is None, "the fast reader accepted what the general one refuses"
        return None
    if fast is not None:
        assert fast.keys == general.keys and fast.weights is None
        assert fast.values.dtype == np.int64 and fast.lengths.dtype == np.int64
        np.testing.assert_array_equal(fast.values, general.values)
        np.testing.assert_array_equal(fast.lengths, general.lengths)
    return fast


requests = st.tuples(
    st.integers(0, 5),  # samples
    st.sampled_from(sorted(WIDTHS)), st.sampled_from(sorted(WIDTHS)),
    st.randoms(use_true_random=False))


@settings(max_examples=300, deadline=None)
@given(requests)
def test_every_well_formed_request_reads_as_the_general_reader_reads_it(
        request: tuple[int, str, str, Any]) -> None:
    samples, value_type, length_type, rng = request
    lengths = np.array([[rng.choice([0, 1, 1, 2, 7]) for _ in range(samples)]
                        for _ in FEATURES], np.int64).reshape(len(FEATURES), samples)
    low = -(2**31) if value_type == "INT32" else -(2**63)
    ids = np.array([rng.randint(low, -low - 1) for _ in range(int(lengths.sum()))],
                   np.int64)
    order = list(range(2 * len(FEATURES)))
    rng.shuffle(order)
    inputs, tail = _request(lengths, ids, value_type, length_type, order)
    assert _agree(inputs, tail) is not None, (inputs, tail)


def test_int32_lengths_after_an_odd_count_are_read_unaligned() -> None:
    # One sample: each INT32 lengths tensor is 4 bytes, so every INT64 values tensor after
    # the first starts off its 8-byte grid and is read byte by byte.
    lengths = np.array([[1], [2], [3]], np.int64)
    ids = np.array([-1, 2**40, -(2**62), 5, 0, 2**63 - 1], np.int64)
    read = _agree(*_request(lengths, ids, "INT64", "INT32"))
    assert read is not None
    np.testing.assert_array_equal(read.values, ids)


def _mutations() -> list[tuple[str, Any]]:
    """(what, change of (inputs, tail)) for requests the fast reader must decline."""
    def spec(index: int, **changes: Any) -> Any:
        def change(inputs: list[Any], tail: bytes) -> tuple[list[Any], bytes]:
            inputs[index].update(changes)
            return inputs, tail
        return change

    def size(index: int, value: Any) -> Any:
        def change(inputs: list[Any], tail: bytes) -> tuple[list[Any], bytes]:
            inputs[index]["parameters"]["binary_data_size"] = value
            return inputs, tail
        return change

    def lengths_to_offsets(inputs: list[Any], tail: bytes) -> tuple[list[Any], bytes]:
        inputs[1]["name"] = "user__offsets"
        return inputs, tail

    return [
        ("a name twice", spec(3, name="user__lengths")),
        ("an unknown name", spec(0, name="nobody__values")),
        ("a name not a string", spec(0, name=["user__values"])),
        ("offsets instead of lengths", lengths_to_offsets),
        ("FP32 values", spec(0, datatype="FP32")),
        ("an unknown datatype", spec(0, datatype="INT8")),
        ("a 2-D shape", spec(1, shape=[2, 1])),
        ("a bool in the shape", spec(1, shape=[True])),
        ("a float in the shape", spec(1, shape=[2.0])),
        ("a negative shape", spec(1, shape=[-2])),
        ("a shape not a list", spec(1, shape=2)),
        ("an empty shape", spec(1, shape=[])),
        ("no binary size", spec(0, parameters={})),
        ("parameters not an object", spec(0, parameters=[8])),
        ("data instead of binary", spec(0, parameters=None, data=[1, 2, 3])),
        ("a size off by one", size(0, 23)),
        ("a negative size", size(0, -24)),
        ("a size as a string", size(0, "24")),
        ("an input not an object", lambda i, t: ([*i[:-1], "history__lengths"], t)),
        ("an input missing", lambda i, t: (i[:-1], t[:-16])),
        ("a byte too many", lambda i, t: (i, t + b"\0")),
        ("a byte too few", lambda i, t: (i, t[:-1])),
        ("mixed value datatypes", _retyped("item__values", "INT32")),
        ("ragged samples", _ragged),
        ("a negative length", _negative_length),
        ("lengths not adding up", _lengths_off),
    ]


def _retyped(name: str, datatype: str) -> Any:
    def change(inputs: list[Any], tail: bytes) -> tuple[list[Any], bytes]:
        lengths = np.array([[1, 2], [0, 3], [2, 2]])
        ids = np.arange(int(lengths.sum()))
        inputs, tail = _request(lengths, ids)
        parts, start = [], 0
        for spec in inputs:
            data = tail[start : start + spec["parameters"]["binary_data_size"]]
            start += len(data)
            if spec["name"] == name:
                data = np.frombuffer(data, "<i8").astype(WIDTHS[datatype]).tobytes()
                spec.update(datatype=datatype, parameters={"binary_data_size": len(data)})
            parts.append(data)
        return inputs, b"".join(parts)
    return change


def _ragged(inputs: list[Any], tail: bytes) -> tuple[list[Any], bytes]:
    parts, start = [], 0
    for spec in inputs:
        size = spec["parameters"]["binary_data_size"]
        data = tail[start : start + size]
        start += size
        if spec["name"] == "history__lengths":  # one bag more, holding nothing
            data += np.zeros(1, "<i8").tobytes()
            spec.update(shape=[spec["shape"][0] + 1],
                        parameters={"binary_data_size": len(data)})
        parts.append(data)
    return inputs, b"".join(parts)


def _rewrite_lengths(inputs: list[Any], tail: bytes, first: int, second: int
                     ) -> tuple[list[Any], bytes]:
    """``user__lengths`` (two samples) set to ``[first, second]``."""
    at = 0
    for spec in inputs:
        if spec["name"] == "user__lengths":
            data = bytearray(tail)
            data[at : at + 16] = np.array([first, second], "<i8").tobytes()
            return inputs, bytes(data)
        at += spec["parameters"]["binary_data_size"]
    raise AssertionError("no user__lengths")


def _negative_length(inputs: list[Any], tail: bytes) -> tuple[list[Any], bytes]:
    return _rewrite_lengths(inputs, tail, -1, 4)  # still adding up to the 3 ids


def _lengths_off(inputs: list[Any], tail: bytes) -> tuple[list[Any], bytes]:
    return _rewrite_lengths(inputs, tail, 2, 2)


@pytest.mark.parametrize(("what", "change"), _mutations(), ids=[m[0] for m in _mutations()])
def test_declines_every_other_request(what: str, change: Any) -> None:
    lengths = np.array([[1, 2], [0, 3], [2, 2]])
    inputs, tail = change(*copy.deepcopy(_request(lengths, np.arange(int(lengths.sum())))))
    assert binary_features(inputs, tail, FEATURES) is None, what
    _agree(inputs, tail)  # the general reader decides: refuses, or reads the same


def test_no_samples_and_empty_bags() -> None:
    for lengths in (np.zeros((3, 0), np.int64), np.zeros((3, 4), np.int64)):
        read = _agree(*_request(lengths, np.zeros(0, np.int64)))
        assert read is not None and read.lengths.shape == lengths.shape
