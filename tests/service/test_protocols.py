"""OpenAI-compatible and KServe v2 routes in process (the real clients run in
tests/integration against a server process)."""

from __future__ import annotations

import base64

import numpy as np
import orjson
import pytest
from fastapi.testclient import TestClient

from models import EmbeddingBag
from tests.service.conftest import DIM, table


def _items(ids: list[int], offsets: list[int]) -> np.ndarray:
    return EmbeddingBag.from_pretrained(table(), mode="mean")(ids, offsets)


def test_openai_float_and_base64(client: TestClient) -> None:
    request = {"model": "items", "input": [[1, 2], [3, 4, 5]]}
    body = client.post("/v1/embeddings", json=request).json()
    assert body["object"] == "list" and body["model"] == "items"
    assert body["usage"] == {"prompt_tokens": 5, "total_tokens": 5}
    assert [d["index"] for d in body["data"]] == [0, 1]
    assert all(d["object"] == "embedding" for d in body["data"])
    expected = _items([1, 2, 3, 4, 5], [0, 2])
    np.testing.assert_array_equal(np.array([d["embedding"] for d in body["data"]], np.float32),
                                  expected)
    encoded = client.post("/v1/embeddings", json={**request, "encoding_format": "base64"})
    rows = [np.frombuffer(base64.b64decode(d["embedding"]), "<f4")
            for d in encoded.json()["data"]]
    np.testing.assert_array_equal(np.stack(rows), expected)


def test_openai_single_id_list_is_one_input(client: TestClient) -> None:
    body = client.post("/v1/embeddings", json={"model": "items", "input": [7, 8, 9]}).json()
    assert len(body["data"]) == 1
    np.testing.assert_array_equal(np.array(body["data"][0]["embedding"], np.float32),
                                  _items([7, 8, 9], [0])[0])


@pytest.mark.parametrize(
    ("request_body", "status", "message"),
    [
        ({"model": "items", "input": "hello"}, 422, "has no tokenizer: it embeds ids"),
        ({"model": "items", "input": ["a", "b"]}, 422, "has no tokenizer: it embeds ids"),
        ({"model": "items", "input": []}, 422, "non-empty list"),
        ({"model": "items"}, 422, "input is required"),
        ({"input": [1]}, 422, "model must be the name of a served model"),
        ({"model": "items", "input": [1], "dimensions": 3}, 422,
         f"dimensions=3 is not supported: model 'items' returns {DIM}"),
        ({"model": "items", "input": [1], "encoding_format": "int8"}, 422,
         "encoding_format must be"),
        ({"model": "ghost", "input": [1]}, 404, "model 'ghost' not found"),
        ({"model": "items", "input": [[1], [99]]}, 422, "index 99 out of range"),
    ],
)
def test_openai_errors(client: TestClient, request_body: dict[str, object], status: int,
                       message: str) -> None:
    response = client.post("/v1/embeddings", json=request_body)
    assert response.status_code == status
    assert message in response.json()["error"]["message"]


def test_kserve_metadata_and_readiness(client: TestClient) -> None:
    assert client.get("/v2").json()["extensions"] == ["binary_tensor_data", "model_repository"]
    assert client.get("/v2/health/live").status_code == 200
    assert client.get("/v2/health/ready").status_code == 200
    meta = client.get("/v2/models/items").json()
    assert meta["name"] == "items"
    assert {i["name"] for i in meta["inputs"]} == {"indices", "offsets", "per_sample_weights"}
    assert meta["outputs"] == [{"name": "embeddings", "datatype": "FP32", "shape": [-1, DIM]}]
    assert client.get("/v2/models/items/ready").status_code == 200
    assert client.get("/v2/models/items/versions/1/ready").status_code == 200
    assert client.get("/v2/models/items/versions/7/ready").status_code == 404
    assert client.get("/v2/models/ghost").json()["error"].startswith(
        "model 'ghost' not found; available: ")


def _infer_json(ids: list[int], offsets: list[int], datatype: str = "INT64") -> dict[str, object]:
    return {"id": "r1", "inputs": [
        {"name": "indices", "shape": [len(ids)], "datatype": datatype, "data": ids},
        {"name": "offsets", "shape": [len(offsets)], "datatype": datatype, "data": offsets}]}


@pytest.mark.parametrize("datatype", ["INT64", "INT32"])
def test_kserve_json_infer(client: TestClient, datatype: str) -> None:
    body = client.post("/v2/models/items/infer", json=_infer_json([1, 2, 3], [0, 1],
                                                                    datatype)).json()
    assert body["model_name"] == "items" and body["id"] == "r1"
    (output,) = body["outputs"]
    assert output["name"] == "embeddings" and output["shape"] == [2, DIM]
    np.testing.assert_array_equal(np.array(output["data"], np.float32).reshape(2, DIM),
                                  _items([1, 2, 3], [0, 1]))


def test_kserve_2d_indices_are_equal_bags(client: TestClient) -> None:
    request = {"inputs": [{"name": "indices", "shape": [2, 2], "datatype": "INT64",
                           "data": [[1, 2], [3, 4]]}]}
    output = client.post("/v2/models/items/infer", json=request).json()["outputs"][0]
    np.testing.assert_array_equal(np.array(output["data"], np.float32).reshape(2, DIM),
                                  _items([1, 2, 3, 4], [0, 2]))


def _binary_request(ids: np.ndarray, offsets: np.ndarray, binary_output: bool = True,
                    lie: int = 0) -> tuple[bytes, dict[str, str]]:
    header = {"inputs": [
        {"name": "indices", "shape": [ids.size], "datatype": "INT64",
         "parameters": {"binary_data_size": ids.nbytes}},
        {"name": "offsets", "shape": [offsets.size], "datatype": "INT64",
         "parameters": {"binary_data_size": offsets.nbytes}}],
        "outputs": [{"name": "embeddings", "parameters": {"binary_data": binary_output}}]}
    head = orjson.dumps(header)
    body = head + ids.astype("<i8").tobytes() + offsets.astype("<i8").tobytes()
    return body, {"Inference-Header-Content-Length": str(len(head) + lie)}


def test_kserve_binary_in_and_out(client: TestClient) -> None:
    ids, offsets = np.array([1, 2, 3, 4]), np.array([0, 3])
    body, headers = _binary_request(ids, offsets)
    response = client.post("/v2/models/items/infer", content=body, headers=headers)
    assert response.status_code == 200, response.text
    length = int(response.headers["inference-header-content-length"])
    head = orjson.loads(response.content[:length])
    assert head["outputs"][0]["parameters"]["binary_data_size"] == 2 * DIM * 4
    rows = np.frombuffer(response.content[length:], "<f4").reshape(2, DIM)
    np.testing.assert_array_equal(rows, _items([1, 2, 3, 4], [0, 3]))


@pytest.mark.parametrize("lie", [-5, 3, 10_000, 10**12])
def test_kserve_lying_header_length_is_422(client: TestClient, lie: int) -> None:
    body, headers = _binary_request(np.array([1, 2]), np.array([0]), lie=lie)
    response = client.post("/v2/models/items/infer", content=body, headers=headers)
    assert response.status_code == 422
    assert set(response.json()) == {"error"}


@pytest.mark.parametrize(
    ("request_body", "message"),
    [
        ({"inputs": [{"name": "indices", "shape": [2], "datatype": "FP32", "data": [1, 2]}]},
         "input 'indices' must be INT64 or INT32; got 'FP32'"),
        ({"inputs": [{"name": "ids", "shape": [1], "datatype": "INT64", "data": [1]}]},
         "unknown input 'ids'"),
        ({"inputs": [{"name": "indices", "shape": [3], "datatype": "INT64", "data": [1]}]},
         "input 'indices' holds 1 values for shape [3]"),
        ({"inputs": [{"name": "indices", "shape": [-1], "datatype": "INT64", "data": [1]}]},
         "needs a shape of 1 or 2 ints in [0, 2147483647]"),
        ({"inputs": []}, "inputs must be a non-empty list"),
        ({"inputs": [{"name": "indices", "shape": [1], "datatype": "INT64", "data": [60]},
                     {"name": "offsets", "shape": [1], "datatype": "INT64", "data": [0]}]},
         "index 60 out of range [0, 50)"),
        ({"inputs": [{"name": "indices", "shape": [1], "datatype": "INT64", "data": [1]}]},
         "offsets has to be a 1D array when input is 1D; got None"),
        ({"inputs": [{"name": "indices", "shape": [1], "datatype": "INT64", "data": [1]}],
          "outputs": [{"name": "scores"}]}, "unknown output"),
    ],
)
def test_kserve_errors_use_the_v2_shape(client: TestClient, request_body: dict[str, object],
                                        message: str) -> None:
    response = client.post("/v2/models/items/infer", json=request_body)
    assert response.status_code == 422
    assert message in response.json()["error"]


def test_kserve_binary_size_mismatch(client: TestClient) -> None:
    ids = np.array([1, 2], "<i8")
    header = orjson.dumps({"inputs": [{"name": "indices", "shape": [3], "datatype": "INT64",
                                       "parameters": {"binary_data_size": ids.nbytes}}]})
    response = client.post("/v2/models/items/infer", content=header + ids.tobytes(),
                           headers={"Inference-Header-Content-Length": str(len(header))})
    assert response.status_code == 422
    assert "binary_data_size 16 is not shape [3] x 8 bytes" in response.json()["error"]


def test_openapi_documents_every_route(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    paths = schema["paths"]
    for path in ("/v1/models/{name}/embed", "/v1/embeddings", "/v2/models/{name}/infer",
                 "/v1/models", "/metrics", "/v2/health/ready"):
        assert path in paths, path
    body = paths["/v1/embeddings"]["post"]["requestBody"]["content"]["application/json"]
    assert "input" in body["schema"]["properties"]
