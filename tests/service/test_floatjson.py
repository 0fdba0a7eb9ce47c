"""The compiled float32 JSON writer gives orjson's bytes for every finite float32, and
each text reads back to the same float."""

from __future__ import annotations

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.floatjson import (
    MIN_FLOATS,
    list_json,
    list_value,
    row_texts,
    row_values,
    rows_json,
    rows_value,
)

NUMPY = orjson.OPT_SERIALIZE_NUMPY


def _orjson(values: np.ndarray) -> bytes:
    return orjson.dumps(values, option=NUMPY)


def _assert_same(values: np.ndarray) -> None:
    values = values.astype(np.float32)
    text = list_json(values)
    assert text is not None
    expected = _orjson(values)
    if text != expected:
        ours, theirs = text[1:-1].split(b","), expected[1:-1].split(b",")
        wrong = [(a, b) for a, b in zip(ours, theirs, strict=True) if a != b]
        pytest.fail(f"{len(wrong)} values differ from orjson, e.g. {wrong[:5]}")
    back = np.array(orjson.loads(text), dtype=np.float32)
    np.testing.assert_array_equal(back.view(np.uint32), values.view(np.uint32))


def _finite(bits: np.ndarray) -> np.ndarray:
    values = bits.astype(np.uint32).view(np.float32)
    return values[np.isfinite(values)]


def test_random_bit_patterns_match_orjson() -> None:
    rng = np.random.default_rng(0)
    _assert_same(_finite(rng.integers(0, 2**32, 400_000, dtype=np.uint64)))


def test_embedding_like_values_match_orjson() -> None:
    rng = np.random.default_rng(1)
    for scale in (1e-3, 0.05, 0.3, 1.0, 40.0, 1e5):
        _assert_same(rng.standard_normal(20_000) * scale)


def test_edges_of_every_layout_and_interval_match_orjson() -> None:
    powers_of_ten = np.array([10.0**k for k in range(-45, 39)], dtype=np.float32)
    powers_of_two = (2.0 ** np.arange(-149, 128)).astype(np.float32)
    special = np.array([0.0, -0.0, 1.0, -1.0, 0.1, 0.375, 1e-6, 1e-7, 9.9e-5, 1e13, 1e12,
                        123456789.0, 16777216.0, 16777217.0, 3.4028235e38, -3.4028235e38,
                        1.17549435e-38, 1.4e-45, 5e-40], dtype=np.float32)
    for values in (powers_of_ten, powers_of_two, special):
        with np.errstate(over="ignore"):  # the largest float's next is infinite
            neighbours = [np.nextafter(values, np.float32(np.inf)),
                          np.nextafter(values, np.float32(0))]
        for each in (values, *neighbours):
            _assert_same(each[np.isfinite(each)])
            _assert_same(-each[np.isfinite(each)])
    # Integers from 2**24 on: intervals end on integers, so short decimals hit their ends
    # exactly (123456784 prints as 123456780.0).
    _assert_same(np.arange(2**24 - 100, 2**24 + 400_000, 7, dtype=np.float32))
    _assert_same(np.arange(2**27 - 4096, 2**27 + 2**20, 64, dtype=np.float32))
    _assert_same(np.geomspace(2**24, 1e17, 200_000).astype(np.float32))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), max_size=40))
def test_any_finite_floats_match_orjson(values: list[float]) -> None:
    _assert_same(np.array(values, dtype=np.float32))


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (64, 128), (2, 3000), (0, 4)])
def test_rows_read_as_orjson_writes_them(shape: tuple[int, int]) -> None:
    rows = (np.random.default_rng(2).standard_normal(shape) * 0.3).astype(np.float32)
    assert rows_json(rows) == _orjson(rows)
    texts = row_texts(rows)
    assert texts == [_orjson(row) for row in rows]
    assert list_json(rows) == _orjson(rows.reshape(-1))


def test_not_finite_values_are_left_to_orjson() -> None:
    rows = np.ones((40, 20), dtype=np.float32)
    rows[3, 7] = np.inf
    assert rows_json(rows) is None and row_texts(rows) is None and list_json(rows) is None
    assert rows.size >= MIN_FLOATS
    value = rows_value(rows)
    assert isinstance(value, np.ndarray)
    assert b"null" in orjson.dumps(value, option=NUMPY)
    rows[3, 7] = np.nan
    assert isinstance(list_value(rows), np.ndarray)


def test_payload_values_write_the_same_answer_either_way() -> None:
    rng = np.random.default_rng(3)
    for shape in [(1, 8), (8, 64), (64, 128), (5, 0)]:
        rows = rng.standard_normal(shape).astype(np.float32)
        strided = np.asfortranarray(rows)  # not C-contiguous: made contiguous first
        for given_rows in (rows, strided):
            assert (orjson.dumps({"e": rows_value(given_rows)}, option=NUMPY)
                    == orjson.dumps({"e": rows}, option=NUMPY))
            assert (orjson.dumps({"e": row_values(given_rows)}, option=NUMPY)
                    == orjson.dumps({"e": list(rows)}, option=NUMPY))
            assert (orjson.dumps({"e": list_value(given_rows)}, option=NUMPY)
                    == orjson.dumps({"e": rows.reshape(-1)}, option=NUMPY))
    # float64 rows are written as the float32 values they are sent as.
    wide = rng.standard_normal((16, 64))
    assert (orjson.dumps(rows_value(wide))
            == orjson.dumps(wide.astype(np.float32), option=NUMPY))


def test_the_writer_serves_pooled_values_and_leaves_the_rest_to_orjson() -> None:
    rng = np.random.default_rng(4)
    pooled = (rng.standard_normal((16, 64)) * 0.3).astype(np.float32)
    assert isinstance(rows_value(pooled), orjson.Fragment)
    assert isinstance(list_value(pooled), orjson.Fragment)
    assert all(isinstance(v, orjson.Fragment) for v in row_values(pooled))
    small = pooled[:1]  # under MIN_FLOATS: orjson's call is cheaper
    assert isinstance(rows_value(small), np.ndarray)
    sums = (rng.standard_normal((16, 64)) * 1e4).astype(np.float32)  # any scale below 2**24
    assert isinstance(rows_value(sums), orjson.Fragment)
    assert orjson.dumps(rows_value(sums)) == orjson.dumps(sums, option=NUMPY)
    quantized = (rng.integers(-128, 128, (16, 64)) / 64).astype(np.float32)
    huge = (rng.standard_normal((16, 64)) * 1e9).astype(np.float32)  # integers past 2**24
    for rows in (quantized, huge):
        assert isinstance(rows_value(rows), np.ndarray)
        assert (orjson.dumps(rows_value(rows), option=NUMPY)
                == orjson.dumps(rows, option=NUMPY))
