"""The compiled reader of ``{"bags": [[id, ...], ...]}`` agrees with orjson + the general
path on every body it accepts, and declines every body it cannot prove."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.jsonbags import parse_bags, parse_kjt
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


# -- {"kjt": {"keys", "values", "lengths"}, "encoding"} -------------------------------------

names = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters='"\\',
                              min_codepoint=32), max_size=6)


@settings(max_examples=300, deadline=None)
@given(st.lists(names, max_size=4), st.lists(ids, max_size=12),
       st.lists(st.integers(0, 10**6), max_size=8),
       st.sampled_from([None, "float", "base64", "other"]), st.booleans(), st.booleans(),
       spaces)
def test_every_plain_kjt_reads_as_orjson_reads_it(
        keys: list[str], values: list[int], lengths: list[int], encoding: str | None,
        encoding_first: bool, reordered: bool, space: str) -> None:
    fields = {"keys": keys, "values": values, "lengths": lengths}
    if reordered:
        fields = dict(reversed(fields.items()))
    members: dict[str, Any] = {"kjt": fields}
    if encoding is not None:
        members = {"encoding": encoding, **members} if encoding_first else {
            **members, "encoding": encoding}
    body = json.dumps(members, ensure_ascii=False,
                      separators=("," + space, space + ":" + space)).encode()
    parsed = parse_kjt(body)
    assert parsed is not None, body
    expected = orjson.loads(body)
    assert parsed.keys == expected["kjt"]["keys"]
    assert parsed.encoding == expected.get("encoding")
    np.testing.assert_array_equal(parsed.values, np.array(values, np.int64).reshape(-1))
    np.testing.assert_array_equal(parsed.lengths, np.array(lengths, np.int64).reshape(-1))
    assert parsed.values.dtype == np.int64 and parsed.lengths.dtype == np.int64


KJT = b'"keys": ["a", "b"], "values": [1, 2], "lengths": [1, 1]'


@pytest.mark.parametrize("body", [
    b'{"kjt": {' + KJT + b', "offsets": [0, 1, 2]}}',
    b'{"kjt": {' + KJT + b', "weights": [1.0, 2.0]}}',
    b'{"kjt": {"keys": ["a"], "values": [1], "offsets": [0, 1]}}',
    b'{"kjt": {"keys": ["a"], "values": [1]}}', b'{"kjt": {"keys": ["a"], "lengths": [0]}}',
    b'{"kjt": {"values": [1], "lengths": [1]}}', b'{"kjt": {}}', b'{"kjt": null}',
    b'{"kjt": {' + KJT + b', "keys": ["c"]}}', b'{"kjt": {' + KJT + b', "values": [3, 4]}}',
    b'{"kjt": {' + KJT + b', "lengths": [2, 0]}}', b'{"kjt": {' + KJT + b'}, "kjt": {}}',
    b'{"kjt": {' + KJT + b'}, "encoding": "float", "encoding": "base64"}',
    b'{"kjt": {' + KJT + b'}, "encoding": null}', b'{"kjt": {' + KJT + b'}, "encoding": 1}',
    b'{"kjt": {' + KJT + b'}, "features": {}}', b'{"kjt": {' + KJT + b'}, "x": 1}',
    b'{"kjt": {"keys": ["a\\u0062"], "values": [1], "lengths": [1]}}',
    b'{"kjt": {"keys": ["a\\"b"], "values": [1], "lengths": [1]}}',
    b'{"kjt": {"keys": ["a\tb"], "values": [1], "lengths": [1]}}',
    b'{"kjt": {"keys": ["\xff"], "values": [1], "lengths": [1]}}',
    b'{"kjt": {"keys": [1], "values": [1], "lengths": [1]}}',
    b'{"kjt": {"keys": "a", "values": [1], "lengths": [1]}}',
    b'{"kjt": {"keys": ["a"], "values": [1.5], "lengths": [1]}}',
    b'{"kjt": {"keys": ["a"], "values": [true], "lengths": [1]}}',
    b'{"kjt": {"keys": ["a"], "values": [1], "lengths": [1e0]}}',
    b'{"kjt": {"keys": ["a"], "values": [[1]], "lengths": [1]}}',
    b'{"kjt": {"keys": ["a"], "values": [1234567890123456789], "lengths": [1]}}',
    b'{"kjt": {"keys": ["a",], "values": [1], "lengths": [1]}}',
    b'{"kjt": {"keys": ["a"], "values": [1], "lengths": [1],}}',
    b'{"kjt": {' + KJT + b'}}x', b'{"kjt": {' + KJT + b'}', b'{"kjt": {' + KJT,
    b'{"kj\\u0074": {' + KJT + b'}}', b'{"bags": [[1]]}', b"[]", b"", b"{}",
])
def test_any_other_kjt_is_left_to_the_general_parser(body: bytes) -> None:
    assert parse_kjt(body) is None


def test_a_large_kjt_sizes_its_arrays_from_its_separators() -> None:
    values = np.arange(40_000) % 997
    body = orjson.dumps({"kjt": {"keys": [f"f{i}" for i in range(100)],
                                 "values": values.tolist(), "lengths": [400] * 100}})
    assert len(body) > 64 << 10
    parsed = parse_kjt(body)
    assert parsed is not None and len(parsed.keys) == 100
    np.testing.assert_array_equal(parsed.values, values)
    np.testing.assert_array_equal(parsed.lengths, np.full(100, 400))
