"""Hostile and random wire input, in process: never a 5xx, always the error shape, and the
server keeps answering. Hypothesis budgets are fixed and derandomised for CI."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import orjson
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROUTES = ["/v1/models/items/embed", "/v1/models/weighted/embed", "/v1/embeddings",
          "/v2/models/items/infer", "/v2/models/weighted/infer"]
FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(
        st.sampled_from(["bags", "indices", "offsets", "per_sample_weights", "encoding",
                         "model", "input", "inputs", "name", "shape", "datatype", "data",
                         "parameters", "outputs", "include_last_offset", "x"]),
        inner, max_size=6),
    max_leaves=30)


@pytest.fixture(scope="module")
def fuzz_client() -> Any:
    from service.app import create_app
    from service.settings import Settings
    from tests.service.conftest import default_models

    with TestClient(create_app(Settings(max_body_bytes=1 << 20), models=default_models()),
                    raise_server_exceptions=False) as client:
        yield client


def _assert_client_error(response: Any) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:300])
    if response.status_code >= 400:
        assert "error" in response.json()
        assert "Traceback" not in response.text


@FUZZ
@given(route=st.sampled_from(ROUTES), body=json_values)
def test_random_json_never_breaks_the_server(fuzz_client: TestClient, route: str,
                                             body: Any) -> None:
    # The standard library writes integers of any size (orjson stops at 64 bits).
    _assert_client_error(fuzz_client.post(route, content=json.dumps(body)))


@FUZZ
@given(route=st.sampled_from(ROUTES), body=st.binary(max_size=512))
def test_random_bytes_never_break_the_server(fuzz_client: TestClient, route: str,
                                             body: bytes) -> None:
    _assert_client_error(fuzz_client.post(route, content=body))


@FUZZ
@given(ids=st.lists(st.integers(-(2**63), 2**63 - 1), min_size=1, max_size=20),
       weights=st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32),
                        min_size=1, max_size=20),
       datatype=st.sampled_from(["INT64", "INT32", "FP32", "FP64", "BYTES", "UINT8"]),
       header_lie=st.integers(-50, 50), size_lie=st.integers(-9, 9),
       truncate=st.integers(0, 40))
def test_hostile_kserve_binary_requests(fuzz_client: TestClient, ids: list[int],
                                        weights: list[float], datatype: str, header_lie: int,
                                        size_lie: int, truncate: int) -> None:
    indices = np.array(ids, dtype="<i8")
    scale = np.array(weights, dtype="<f4")
    inputs = [{"name": "indices", "shape": [indices.size], "datatype": datatype,
               "parameters": {"binary_data_size": indices.nbytes + size_lie}},
              {"name": "offsets", "shape": [1], "datatype": "INT64",
               "parameters": {"binary_data_size": 8}},
              {"name": "per_sample_weights", "shape": [scale.size], "datatype": "FP32",
               "parameters": {"binary_data_size": scale.nbytes}}]
    header = orjson.dumps({"inputs": inputs})
    body = header + indices.tobytes() + np.zeros(1, "<i8").tobytes() + scale.tobytes()
    body = body[: max(0, len(body) - truncate)]
    response = fuzz_client.post("/v2/models/weighted/infer", content=body, headers={
        "Inference-Header-Content-Length": str(max(0, len(header) + header_lie))})
    _assert_client_error(response)
    valid = (datatype == "INT64" and header_lie == size_lie == truncate == 0
             and len(ids) == len(weights) and all(0 <= i < 50 for i in ids)
             and np.isfinite(scale).all())
    assert (response.status_code == 200) == valid, response.text[:300]


@pytest.mark.parametrize(("body", "status"), [
    (b'{"bags": ' + b"[" * 5000 + b"]" * 5000 + b"}", 422),   # deeply nested
    (b'{"bags": [[' + b"1," * 600_000 + b"1]]}", 413),        # over the body limit
    (b'{"bags": [[1, 2], [3]], "per_sample_weights": [[1e39, 1], [1]]}', 422),
    (b'{"indices": [1, -1], "offsets": [0]}', 422),
    (b'{"indices": [1, 9223372036854775807], "offsets": [0]}', 422),
    (b'{"indices": [1, 2], "offsets": [0, 1, -5]}', 422),
    (b'{"bags": [[1]], "encoding": null}', 422),
])
def test_extreme_json(fuzz_client: TestClient, body: bytes, status: int) -> None:
    response = fuzz_client.post("/v1/models/weighted/embed", content=body)
    assert response.status_code == status, response.text[:300]
    _assert_client_error(response)
    assert fuzz_client.post("/v1/models/items/embed", json={"bags": [[1]]}).status_code == 200


@pytest.mark.parametrize("name", ["..%2F..%2Fetc%2Fpasswd", "%2E%2E", "items%00",
                                  "items;rm -rf", "a" * 300])
def test_model_names_cannot_escape(fuzz_client: TestClient, name: str) -> None:
    response = fuzz_client.post(f"/v1/models/{name}/embed", json={"bags": [[1]]})
    assert response.status_code == 404
    response = fuzz_client.get(f"/v2/models/{name}")
    assert response.status_code == 404


@FUZZ
@given(shape=st.lists(st.integers(-(2**70), 2**70), max_size=3) | json_values,
       data=json_values, datatype=st.sampled_from(["INT64", "INT32", "FP32", "BYTES"]),
       name=st.sampled_from(["indices", "offsets", "per_sample_weights"]),
       binary=st.booleans(), size=st.integers(-(2**70), 2**70))
def test_hostile_kserve_shapes_and_sizes(fuzz_client: TestClient, shape: Any, data: Any,
                                         datatype: str, name: str, binary: bool,
                                         size: int) -> None:
    spec: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
    if binary:
        spec["parameters"] = {"binary_data_size": size}
    else:
        spec["data"] = data
    _assert_client_error(fuzz_client.post("/v2/models/items/infer",
                                          content=json.dumps({"inputs": [spec]})))


@FUZZ
@given(declared=st.text(st.characters(categories=["Nd", "No", "Nl"], max_codepoint=255),
                        min_size=1, max_size=4))
def test_header_lengths_in_any_kind_of_digit(fuzz_client: TestClient, declared: str) -> None:
    response = fuzz_client.post("/v2/models/items/infer", content=b'{"inputs": []}',
                                headers={"Inference-Header-Content-Length":
                                         declared.encode("latin-1")})
    _assert_client_error(response)


@FUZZ
@given(depth=st.integers(100, 1100),
       where=st.sampled_from(["bags", "indices", "per_sample_weights", "encoding", "input",
                              "shape", "data"]))
def test_nesting_at_any_depth_in_any_field(fuzz_client: TestClient, depth: int,
                                           where: str) -> None:
    deep = "[" * depth + "1" + "]" * depth
    route, body = {
        "input": ("/v1/embeddings", '{"model": "items", "input": DEEP}'),
        "shape": ("/v2/models/items/infer",
                  '{"inputs": [{"name": "indices", "datatype": "INT64", "shape": DEEP, '
                  '"data": [1]}]}'),
        "data": ("/v2/models/items/infer",
                 '{"inputs": [{"name": "indices", "datatype": "INT64", "shape": [1], '
                 '"data": DEEP}]}'),
    }.get(where, ("/v1/models/weighted/embed", '{"bags": [[1]], "WHERE": DEEP}'
                  .replace("WHERE", where)))
    _assert_client_error(fuzz_client.post(route, content=body.replace("DEEP", deep)))
