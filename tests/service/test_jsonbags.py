"""The compiled reader of ``{"bags": [[id, ...], ...]}`` agrees with orjson + the general
path on every body it accepts, and declines every body it cannot prove."""

from __future__ import annotations

import json

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.jsonbags import parse_bags
from service.wire import ragged_ints

ids = st.integers(min_value=-(10**18) + 1, max_value=10**18 - 1)
bags = st.lists(st.lists(ids, max_size=8), max_size=8)
spaces = st.sampled_from(["", " ", "\n", "\t", "\r\n  "])


def _general(body: bytes) -> tuple[np.ndarray, np.ndarray]:
    return ragged_ints(orjson.loads(body)["bags"], "bags")


@settings(max_examples=300, deadline=None)
@given(bags, spaces, st.booleans())
def test_every_integer_body_reads_as_orjson_reads_it(value: list[list[int]], space: str,
                                                     indent: bool) -> None:
    body = (json.dumps({"bags": value}, indent=2 if indent else None)
            .replace(" ", space if not indent else " ").encode())
    parsed = parse_bags(body)
    assert parsed is not None, body
    expected = _general(body)
    np.testing.assert_array_equal(parsed[0], expected[0])
    np.testing.assert_array_equal(parsed[1], expected[1])
    assert parsed[0].dtype == np.int64 and parsed[1].dtype == np.int64


@pytest.mark.parametrize("body", [
    b'{"bags": []}', b'{"bags": [[]]}', b'{"bags":[[0],[],[1,2]]}', b'{"bags": [[-0]]}',
    b' \t\r\n{ "bags" : [ [ 7 , 8 ] ] } \n', b'{"bags": [[999999999999999999]]}',
])
def test_edge_forms_read_exactly(body: bytes) -> None:
    parsed = parse_bags(body)
    assert parsed is not None
    expected = _general(body)
    np.testing.assert_array_equal(parsed[0], expected[0])
    np.testing.assert_array_equal(parsed[1], expected[1])


@pytest.mark.parametrize("body", [
    b"", b"[]", b"{}", b'{"bags": [[1.0]]}', b'{"bags": [[1e3]]}', b'{"bags": [[1E3]]}',
    b'{"bags": [[01]]}', b'{"bags": [[-]]}', b'{"bags": [[+1]]}', b'{"bags": [[true]]}',
    b'{"bags": [[null]]}', b'{"bags": [["1"]]}', b'{"bags": [[1],]}', b'{"bags": [[1,]]}',
    b'{"bags": [[1]],}', b'{"bags": [1]}', b'{"bags": [[[1]]]}', b'{"bags": [[1]]}x',
    b'{"bags": [[1]]', b'{"bags": [[1]', b'{"bags": [[1', b'{"bags": [[1]], "bags": []}',
    b'{"bags": [[1]], "encoding": "float"}', b'{"encoding": "float", "bags": [[1]]}',
    b'{"b\\u0061gs": [[1]]}', b'\xef\xbb\xbf{"bags": [[1]]}', b'{"bags": [[1234567890123456789]]}',
    b'{"bags": [[1]]}\x00', b'{"bags"\x0b: [[1]]}', b'{"bags": [[1 2]]}',
])
def test_anything_else_is_left_to_the_general_parser(body: bytes) -> None:
    assert parse_bags(body) is None


def test_a_large_body_sizes_its_arrays_from_its_separators() -> None:
    value = np.arange(60_000).reshape(-1, 30) % 1000
    body = orjson.dumps({"bags": value.tolist()})
    assert len(body) > 64 << 10
    parsed = parse_bags(body)
    assert parsed is not None
    np.testing.assert_array_equal(parsed[0], value.reshape(-1))
    np.testing.assert_array_equal(parsed[1], np.arange(0, 60_001, 30))
