"""Text models through the service: OpenAI strings (dimensions, usage), native texts,
KServe BYTES in JSON and binary, the tokenize route, limits, and ids still working; every
answer equal to model2vec 0.10's (tests/golden/text)."""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from fastapi.testclient import TestClient

from service.config import ConfigError, ModelSpec, load_config
from service.registry import load_model
from tests.service.conftest import loaded

GOLDEN = Path(__file__).parents[1] / "golden" / "text"


def _golden(case: str) -> tuple[list[str], np.ndarray, list[list[int]]]:
    folder = GOLDEN / case
    return (json.loads((folder / "texts.json").read_text()),
            np.load(folder / "expected.npy").astype(np.float32),
            json.loads((folder / "tokens.json").read_text()))


@pytest.fixture(scope="module")
def models() -> list[Any]:
    return [load_model(ModelSpec(name="m2v", checkpoint=GOLDEN / "wordpiece_f32" / "model")),
            load_model(ModelSpec(name="normed", checkpoint=GOLDEN
                                 / "wordpiece_f32_norm_weights" / "model"))]


@pytest.fixture
def client(make_client: Callable[..., TestClient], models: list[Any]) -> TestClient:
    return make_client([*models, loaded("items", "mean")], max_texts_per_request=64,
                       max_text_chars=5000)


def test_openai_strings(client: TestClient) -> None:
    texts, expected, tokens = _golden("wordpiece_f32")
    answer = client.post("/v1/embeddings", json={"model": "m2v", "input": texts})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    np.testing.assert_array_equal(np.array([d["embedding"] for d in body["data"]], np.float32),
                                  expected)
    assert body["usage"]["prompt_tokens"] == sum(map(len, tokens))
    one = client.post("/v1/embeddings", json={"model": "m2v", "input": texts[2],
                                              "encoding_format": "base64"}).json()
    vector = np.frombuffer(base64.b64decode(one["data"][0]["embedding"]), "<f4")
    np.testing.assert_array_equal(vector, expected[2])


def test_openai_dimensions_keep_the_first_components(client: TestClient) -> None:
    texts, expected, _ = _golden("wordpiece_f32_norm_weights")
    body = client.post("/v1/embeddings", json={"model": "normed", "input": texts[2:5],
                                               "dimensions": 5}).json()
    vectors = np.array([d["embedding"] for d in body["data"]], np.float32)
    first = expected[2:5, :5]
    np.testing.assert_allclose(vectors, first / np.linalg.norm(first, axis=1, keepdims=True),
                               rtol=1e-6)
    plain = client.post("/v1/embeddings", json={"model": "m2v", "input": ["hello world"],
                                                "dimensions": 3}).json()
    _, unnormed, _ = _golden("wordpiece_f32")
    np.testing.assert_array_equal(np.array(plain["data"][0]["embedding"], np.float32),
                                  unnormed[2, :3])
    for bad in (0, 13, 2.5, True):
        answer = client.post("/v1/embeddings", json={"model": "m2v", "input": "x",
                                                     "dimensions": bad})
        assert answer.status_code == 422 and "1 to 12" in answer.json()["error"]["message"]


def test_native_texts_and_ids(client: TestClient) -> None:
    texts, expected, tokens = _golden("wordpiece_f32")
    body = client.post("/v1/models/m2v/embed", json={"texts": texts}).json()
    assert body["dim"] == 12
    np.testing.assert_array_equal(np.array(body["embeddings"], np.float32), expected)
    # Token ids still work: the ids a text becomes give its vector.
    ids = client.post("/v1/models/m2v/embed", json={"bags": tokens[2:5]}).json()
    np.testing.assert_array_equal(np.array(ids["embeddings"], np.float32), expected[2:5])
    raw = client.post("/v1/models/m2v/embed", json={"texts": texts},
                      headers={"Accept": "application/octet-stream"})
    np.testing.assert_array_equal(np.frombuffer(raw.content, "<f4").reshape(expected.shape),
                                  expected)


def test_tokenize_route(client: TestClient) -> None:
    texts, _, tokens = _golden("wordpiece_f32")
    body = client.post("/v1/models/m2v/tokenize", json={"texts": texts}).json()
    assert body == {"model": "m2v", "ids": tokens}
    answer = client.post("/v1/models/items/tokenize", json={"texts": ["a"]})
    assert answer.status_code == 422 and "no tokenizer" in answer.json()["error"]["message"]


@pytest.mark.parametrize("binary", [False, True])
def test_kserve_bytes(client: TestClient, binary: bool) -> None:
    texts, expected, _ = _golden("wordpiece_f32")
    spec: dict[str, Any] = {"name": "text", "datatype": "BYTES", "shape": [len(texts)]}
    tail = b""
    if binary:
        tail = b"".join(struct.pack("<I", len(t.encode())) + t.encode() for t in texts)
        spec["parameters"] = {"binary_data_size": len(tail)}
    else:
        spec["data"] = texts
    head = orjson.dumps({"inputs": [spec], "outputs": [
        {"name": "embeddings", "parameters": {"binary_data": binary}}]})
    headers = {"Inference-Header-Content-Length": str(len(head))} if binary else {}
    answer = client.post("/v2/models/m2v/infer", content=head + tail, headers=headers)
    assert answer.status_code == 200, answer.text
    if binary:
        size = int(answer.headers["inference-header-content-length"])
        rows = np.frombuffer(answer.content[size:], "<f4").reshape(expected.shape)
    else:
        rows = np.array(answer.json()["outputs"][0]["data"], np.float32).reshape(expected.shape)
    np.testing.assert_array_equal(rows, expected)
    meta = client.get("/v2/models/m2v").json()
    assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]


@pytest.mark.parametrize(("route", "body", "status", "message"), [
    ("/v1/embeddings", {"model": "m2v", "input": ["x"] * 65}, 422, "max_texts_per_request"),
    ("/v1/embeddings", {"model": "m2v", "input": ["x", "y" * 5001]}, 413,
     "text 1 holds 5001 characters; the limit is 5000"),
    ("/v1/embeddings", {"model": "m2v", "input": ["x", 3]}, 422, r"input\[1\] must be a string"),
    ("/v1/embeddings", {"model": "items", "input": "hello"}, 422, "has no tokenizer"),
    ("/v1/models/m2v/embed", {"texts": []}, 422, "non-empty list of strings"),
    ("/v1/models/m2v/embed", {"texts": ["a", None]}, 422, r"texts\[1\] must be a string"),
    ("/v1/models/m2v/embed", {"texts": ["a"], "bags": [[1]]}, 422, "unknown field"),
    ("/v1/models/m2v/embed", {"bags": [[100000]]}, 422, "out of range"),
])
def test_refusals(client: TestClient, route: str, body: Any, status: int,
                  message: str) -> None:
    import re

    answer = client.post(route, json=body)
    assert answer.status_code == status, answer.text
    assert re.search(message, answer.json()["error"]["message"])


def test_kserve_refusals(client: TestClient) -> None:
    bad = {"inputs": [{"name": "indices", "datatype": "INT64", "shape": [1], "data": [1]}]}
    answer = client.post("/v2/models/m2v/infer", json=bad)
    assert answer.status_code == 422 and "one input, 'text'" in answer.json()["error"]
    spec = {"name": "text", "datatype": "BYTES", "shape": [2], "data": ["a"]}
    answer = client.post("/v2/models/m2v/infer", json={"inputs": [spec]})
    assert answer.status_code == 422 and "1 strings for shape [2]" in answer.json()["error"]


def test_concurrent_texts_share_batches(make_client: Callable[..., TestClient],
                                        models: list[Any]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    client = make_client(list(models))
    texts, expected, _ = _golden("wordpiece_f32")
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: client.post(
            "/v1/models/m2v/embed", json={"texts": [texts[i % len(texts)]]}), range(64)))
    for i, answer in enumerate(answers):
        np.testing.assert_array_equal(np.array(answer.json()["embeddings"], np.float32),
                                      expected[i % len(texts) : i % len(texts) + 1])


def test_config(tmp_path: Path) -> None:
    folder = GOLDEN / "wordpiece_f32" / "model"
    config = tmp_path / "models.toml"
    config.write_text(f'[[models]]\nname = "t"\ncheckpoint = "{folder}"\nnormalize = true\n'
                      'max_length = 4\n')
    model = load_model(load_config(config)[0])
    assert model.kind == "text" and model.describe()["normalize"] is True
    assert model.describe()["max_length"] == 4
    file = tmp_path / "t.npy"
    np.save(file, np.zeros((2, 2), np.float32))
    config.write_text('[[models]]\nname = "t"\ncheckpoint = "t.npy"\nnormalize = true\n')
    with pytest.raises(ConfigError, match="apply to text models"):
        load_config(config)
    config.write_text(f'[[models]]\nname = "t"\ncheckpoint = "{folder}"\nmax_length = 0\n')
    with pytest.raises(ConfigError, match="max_length must be a positive"):
        load_config(config)


def test_user_slips(client: TestClient, tmp_path: Path) -> None:
    """What the new-user walkthrough tripped on: table options on a text model, a
    Triton-style [B, 1] shape, one model's facts, a model folder's file as a checkpoint."""
    folder = GOLDEN / "wordpiece_f32" / "model"
    config = tmp_path / "models.toml"
    config.write_text(f'[[models]]\nname = "t"\ncheckpoint = "{folder}"\nmode = "sum"\n')
    with pytest.raises(ConfigError, match="mode apply to tables, not to a text model"):
        load_config(config)
    texts, expected, _ = _golden("wordpiece_f32")
    spec = {"name": "text", "datatype": "BYTES", "shape": [3, 1], "data": texts[2:5]}
    answer = client.post("/v2/models/m2v/infer", json={"inputs": [spec]})
    assert answer.status_code == 200, answer.text
    rows = np.array(answer.json()["outputs"][0]["data"], np.float32).reshape(3, -1)
    np.testing.assert_array_equal(rows, expected[2:5])
    facts = client.get("/v1/models/m2v").json()
    assert facts["id"] == "m2v" and facts["kind"] == "text" and facts["object"] == "model"
    assert client.get("/v1/models/ghost").status_code == 404
    answer = client.post("/v1/models/m2v/tokenize", json={"texts": ["a", "b" * 5001]})
    assert answer.status_code == 413
    assert answer.json()["error"]["message"].startswith("text 1 holds 5001 characters")
    from service.registry import ModelLoadError

    int8 = GOLDEN / "wordpiece_int8_mapping" / "model"  # no float table to serve as one
    with pytest.raises(ModelLoadError, match="set checkpoint to the folder"):
        load_model(ModelSpec(name="x", checkpoint=int8 / "model.safetensors"))
