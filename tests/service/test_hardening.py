"""Inputs that once answered 500 or garbage (the hardening issue's reproductions 1, 2, 3
and 8): each is now a 422 that names the problem; and a client leaving mid-body (7) is no
error."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from models import EmbeddingBag
from service.app import create_app
from service.config import ModelSpec
from service.registry import LoadedModel
from service.settings import Settings
from tests.service.conftest import default_models


def _with_deep(body: dict[str, Any], depth: int) -> bytes:
    """``body`` as JSON with its ``"DEEP"`` value replaced by a list nested ``depth``
    deep (built as text: JSON encoders stop short of such depths)."""
    return json.dumps(body).replace('"DEEP"', "[" * depth + "1" + "]" * depth).encode()


@pytest.mark.parametrize("declared", ["²", "1²", "¹³"])
def test_non_ascii_digits_in_the_header_length_are_422(client: TestClient,
                                                        declared: str) -> None:
    # Header bytes are read as latin-1: "²" arrives as a character isdigit() accepts.
    response = client.post("/v2/models/items/infer", content=b'{"inputs": []}',
                           headers={"Inference-Header-Content-Length":
                                    declared.encode("latin-1")})
    assert response.status_code == 422, response.text
    assert "Inference-Header-Content-Length" in response.json()["error"]


@pytest.mark.parametrize("shape", [[4294967296, 4294967296], [2**62, 4], [10**12, 0],
                                   [2**31]])
@pytest.mark.parametrize("binary", [False, True])
def test_kserve_shapes_past_any_limit_are_422(client: TestClient, shape: list[int],
                                              binary: bool) -> None:
    spec: dict[str, Any] = {"name": "indices", "datatype": "INT64", "shape": shape}
    if binary:
        spec["parameters"] = {"binary_data_size": 0}
    else:
        spec["data"] = []
    response = client.post("/v2/models/items/infer", json={"inputs": [spec]})
    assert response.status_code == 422, response.text
    assert "needs a shape of 1 or 2 ints in [0, 2147483647]" in response.json()["error"]


@pytest.mark.parametrize(("path", "field"), [
    ("/v1/models/items/embed", "bags"), ("/v1/models/items/embed", "encoding"),
    ("/v1/embeddings", "encoding_format"), ("/v2/models/items/infer", "shape")])
@pytest.mark.parametrize("depth", [257, 1000])
def test_deeply_nested_fields_are_422(client: TestClient, path: str, field: str,
                                      depth: int) -> None:
    deep = "DEEP"
    body: dict[str, Any] = {
        "bags": {"bags": deep},
        "encoding": {"bags": [[1]], "encoding": deep},
        "encoding_format": {"model": "items", "input": [1], "encoding_format": deep},
        "shape": {"inputs": [{"name": "indices", "datatype": "INT64", "shape": deep,
                              "data": [1]}]},
    }[field]
    response = client.post(path, content=_with_deep(body, depth),
                           headers={"Content-Type": "application/json"})
    assert response.status_code == 422, response.text


def test_a_sum_that_overflows_float32_is_422_not_null(client: TestClient) -> None:
    response = client.post("/v1/models/weighted/embed",
                           json={"bags": [[1], [1, 1]],
                                 "per_sample_weights": [[1.0], [3e38, 3e38]]})
    assert response.status_code == 422, response.text
    assert "bag 1 pools to values beyond float32's range" in response.json()["error"]["message"]
    assert client.post("/v1/models/weighted/embed",
                       json={"bags": [[1]], "per_sample_weights": [[2.0]]}).status_code == 200


def test_float64_rows_past_float32_are_422_not_null(
        make_client: Callable[..., TestClient]) -> None:
    # Finite in the float64 table and its sums, infinite once sent as float32.
    weight = np.full((4, 3), 1e30, dtype=np.float64)
    weight[2] = 1e39
    bag = EmbeddingBag.from_pretrained(weight, mode="sum")
    client = make_client([LoadedModel(ModelSpec(name="wide", mode="sum"), bag)])
    response = client.post("/v1/models/wide/embed", json={"bags": [[0, 1], [3, 2]]})
    assert response.status_code == 422, response.text
    assert "bag 1 pools to values beyond float32's range" in response.json()["error"]["message"]
    response = client.post("/v1/models/wide/embed", json={"bags": [[0, 1]],
                                                          "encoding": "base64"})
    assert response.status_code == 200, response.text
    rows = np.frombuffer(base64.b64decode(response.json()["embeddings"][0]), "<f4")
    np.testing.assert_array_equal(rows, np.float32(2e30))


def test_a_client_leaving_mid_body_is_no_error_in_the_log(
        caplog: pytest.LogCaptureFixture) -> None:
    app = create_app(Settings(), models=default_models())
    messages = iter([{"type": "http.request", "body": b'{"bags": [[1', "more_body": True},
                     {"type": "http.disconnect"}])
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return next(messages)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/models/items/embed",
             "raw_path": b"/v1/models/items/embed", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"host", b"test")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}

    async def run() -> None:
        async with app.router.lifespan_context(app):
            await app(scope, receive, send)

    with caplog.at_level("INFO"):
        asyncio.run(run())
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
    assert sent and sent[0]["status"] == 499


@pytest.mark.parametrize("binary", [False, True])
def test_a_shape_of_many_empty_bags_is_refused_before_it_is_built(client: TestClient,
                                                                 binary: bool) -> None:
    import time

    spec: dict[str, Any] = {"name": "indices", "datatype": "INT64", "shape": [100_000_000, 0]}
    if binary:
        spec["parameters"] = {"binary_data_size": 0}
    else:
        spec["data"] = []
    started = time.perf_counter()
    response = client.post("/v2/models/items/infer", json={"inputs": [spec]})
    assert time.perf_counter() - started < 1
    assert response.status_code == 422, response.text
    assert "request holds 100000000 bags; the limit is" in response.json()["error"]


@pytest.mark.parametrize("path", ["/v2/health/live", "/v2/health/ready", "/health/live",
                                  "/health/ready"])
def test_health_routes_answer_head(client: TestClient, path: str) -> None:
    response = client.head(path)
    assert response.status_code == 200 and response.content == b""


def test_a_trailing_slash_is_not_found_and_never_redirects_to_the_clients_host(
        client: TestClient) -> None:
    response = client.get("/v1/models/", headers={"Host": "evil.example"},
                          follow_redirects=False)
    assert response.status_code == 404
    assert "location" not in response.headers


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/models/items/embed", b'{"bags": [' + b"[]," * 2_999_999 + b"[]]}"),
    ("/v1/models/items/embed", b'{"indices": [' + b"1," * 2_999_999 + b'1], "offsets": [0]}'),
    ("/v1/embeddings", b'{"model": "items", "input": [' + b"[1]," * 1_999_999 + b"[1]]}"),
])
def test_list_limits_are_checked_before_the_lists_are_converted(
        client: TestClient, path: str, body: bytes) -> None:
    import time

    started = time.perf_counter()
    response = client.post(path, content=body, headers={"Content-Type": "application/json"})
    assert time.perf_counter() - started < 1.0
    assert response.status_code == 422, response.text
    assert "more than max_bags_per_request=4096 and max_ids_per_request" in response.text


def test_the_largest_valid_weighted_body_passes_the_structure_check(
        make_client: Any) -> None:
    bags = [[1] * 32] * 4096  # 131,072 ids: at both limits, weights for every id
    client = make_client(max_bags_per_request=4096, max_ids_per_request=131_072)
    response = client.post("/v1/models/weighted/embed",
                           json={"bags": bags, "per_sample_weights": [[0.5] * 32] * 4096})
    assert response.status_code == 200, response.text[:200]
    assert len(response.json()["embeddings"]) == 4096
