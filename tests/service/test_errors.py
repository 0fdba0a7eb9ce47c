"""Every kind of bad input gets its 4xx and a message naming the problem; never a 500."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
import pytest
from fastapi.testclient import TestClient

EMBED = "/v1/models/items/embed"


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        ("/v1/models/nope/embed", {"bags": [[1]]}, 404, "model 'nope' not found; available: "),
        (EMBED, {"bags": [[1, 50]]}, 422, "index 50 out of range [0, 50) at position 1 "
                                          "(bag 0, item 1)"),
        (EMBED, {"bags": [[1], [2, -3]]}, 422, "index -3 out of range"),
        (EMBED, {"bags": [[1, 2.5]]}, 422, "bags[0][1] must be an integer; got 2.5"),
        (EMBED, {"bags": [[1, True]]}, 422, "bags[0][1] must be an integer; got true"),
        (EMBED, {"bags": [[1, "2"]]}, 422, 'bags[0][1] must be an integer; got "2"'),
        (EMBED, {"bags": [[1, [2]]]}, 422, "bags[0][1] must be an integer"),
        (EMBED, {"bags": [1, 2]}, 422, "bags[0] must be a list of integers; got 1"),
        (EMBED, {"bags": "1,2"}, 422, "bags must be a list of lists"),
        (EMBED, b'{"bags": [[18446744073709551615]]}', 422,
         "bags holds an integer outside int64"),
        (EMBED, b'{"bags": [[1180591620717411303424]]}', 422,
         "bags[0][0] is outside int64; got 1.1805916207174113e+21"),
        (EMBED, b'{"indices": [1, -9223372036854775809], "offsets": [0]}', 422,
         "indices[1] is outside int64; got -9.223372036854776e+18"),
        (EMBED, {"bags": [[1, 13.0]]}, 422, "bags[0][1] must be an integer; got 13.0"),
        (EMBED, {"indices": [1, 2], "offsets": [1]}, 422, "offsets[0] must be 0; got 1"),
        (EMBED, {"indices": [1, 2], "offsets": [0, 3]}, 422, "offsets[1] = 3 is past the end"),
        (EMBED, {"indices": [1, 2, 3], "offsets": [0, 2, 1]}, 422, "offsets must not decrease"),
        (EMBED, {"indices": [1, 2]}, 422, "indices needs offsets"),
        (EMBED, {"bags": [[1]], "indices": [1]}, 422, "either bags or indices + offsets"),
        (EMBED, {}, 422, "the body needs bags"),
        (EMBED, {"bags": [[1]], "colour": 1}, 422, "unknown field(s) colour"),
        (EMBED, {"bags": [[1]], "encoding": "hex"}, 422, "encoding must be 'float' or "
                                                         "'base64'; got 'hex'"),
        (EMBED, {"bags": [[1]], "per_sample_weights": [[1.0]]}, 422,
         "per_sample_weights is only supported for mode='sum'; got mode='mean'"),
        ("/v1/models/weighted/embed", {"bags": [[1, 2]], "per_sample_weights": [[1.0]]}, 422,
         "per_sample_weights[0] has 1 weights for 2 ids"),
        ("/v1/models/weighted/embed",
         b'{"indices": [1], "offsets": [0], "per_sample_weights": [NaN]}', 422,
         "request body is not valid JSON"),
        ("/v1/models/weighted/embed", {"indices": [1], "offsets": [0],
                                       "per_sample_weights": [1e300]}, 422,
         "per_sample_weights[0] = 1e+300 is not a finite float32"),
        (EMBED, [1, 2], 422, "request body must be a JSON object; got list"),
    ],
)
def test_bad_native_input_is_named(client: TestClient, path: str, body: Any, status: int,
                                   message: str) -> None:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    response = client.post(path, content=content)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert message in error["message"], error
    assert error["type"] in ("invalid_request", "model_not_found")
    assert client.post(EMBED, json={"bags": [[1]]}).status_code == 200  # still serving


@pytest.mark.parametrize("content", [b"", b"{", b"\xff\xfe", b'{"bags": [[1]]', b"[" * 2000])
def test_malformed_json_is_422(client: TestClient, content: bytes) -> None:
    response = client.post(EMBED, content=content)
    assert response.status_code == 422
    assert response.json()["error"]["type"] == "invalid_request"


@pytest.mark.parametrize(
    ("settings", "body", "message"),
    [
        ({"max_bags_per_request": 2}, {"bags": [[1], [2], [3]]},
         "request holds 3 bags; the limit is 2"),
        ({"max_ids_per_request": 3}, {"bags": [[1, 2], [3, 4]]},
         "request holds 4 ids; the limit is 3"),
        ({"max_bag_length": 2}, {"bags": [[1, 2, 3]]},
         "request holds 3 ids in one bag; the limit is 2"),
    ],
)
def test_per_request_limits(make_client: Callable[..., TestClient], settings: dict[str, int],
                            body: dict[str, Any], message: str) -> None:
    response = make_client(**settings).post(EMBED, json=body)
    assert response.status_code == 422
    assert message in response.json()["error"]["message"]


def test_body_too_large_is_413_by_header_and_by_stream(make_client: Callable[..., TestClient]
                                                       ) -> None:
    client = make_client(max_body_bytes=1024)
    big = b'{"bags": [[' + b"1," * 1000 + b"1]]}"
    response = client.post(EMBED, content=big)
    assert response.status_code == 413
    assert "exceeds the limit of 1024" in response.json()["error"]["message"]

    def chunks() -> Any:  # no Content-Length: the limit applies while streaming
        yield big[:600]
        yield big[600:]

    response = client.post(EMBED, content=chunks())
    assert response.status_code == 413


def test_unknown_route_and_method_use_the_error_shape(client: TestClient) -> None:
    response = client.get("/v1/nothing")
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found"
    response = client.get(EMBED)
    assert response.status_code == 405
    assert response.json()["error"]["type"] == "method_not_allowed"


def test_api_key_guards_inference_not_health(make_client: Callable[..., TestClient]) -> None:
    client = make_client(api_key="s3cret")
    response = client.post(EMBED, json={"bags": [[1]]})
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json()["error"]["type"] == "unauthorized"
    response = client.post(EMBED, json={"bags": [[1]]},
                           headers={"Authorization": "Bearer wrong"})
    assert response.status_code == 403
    assert client.post(EMBED, json={"bags": [[1]]},
                       headers={"Authorization": "Bearer s3cret"}).status_code == 200
    for open_path in ("/v2/health/live", "/v2/health/ready", "/health/ready", "/metrics"):
        assert client.get(open_path).status_code == 200, open_path
    assert client.get("/v2/models/items").status_code == 401
    assert client.get("/v2/models/items").json() == {
        "error": "missing API key: send 'Authorization: Bearer <key>'"}
