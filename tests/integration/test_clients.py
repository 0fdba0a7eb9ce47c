"""The official clients against a real server process: the same vectors as the engine."""

from __future__ import annotations

import numpy as np
import pytest

from models import EmbeddingBag
from tests.integration.conftest import Server
from tests.service.conftest import table

BAGS = [[1, 2, 3], [4, 5], [6]]


def _expected(mode: str = "mean") -> np.ndarray:
    ids = np.array([i for bag in BAGS for i in bag])
    return EmbeddingBag.from_pretrained(table(), mode=mode)(ids, [0, 3, 5])


@pytest.mark.parametrize("encoding", ["base64", "float"])
def test_openai_client(server: Server, encoding: str) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    kwargs = {} if encoding == "base64" else {"encoding_format": "float"}  # base64: default
    response = client.embeddings.create(model="items", input=BAGS, **kwargs)  # type: ignore[arg-type]
    vectors = np.array([d.embedding for d in response.data], np.float32)
    np.testing.assert_array_equal(vectors, _expected())
    assert response.usage.prompt_tokens == 6
    assert {m.id for m in client.models.list()} == {"items", "weighted"}


def test_openai_client_sees_errors(server: Server) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.UnprocessableEntityError, match="out of range"):
        client.embeddings.create(model="items", input=[[1, 999]])
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="ghost", input=[[1]])


@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_http(server: Server, binary: bool) -> None:
    import tritonclient.http as triton

    client = triton.InferenceServerClient(url=server.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("items")
    metadata = client.get_model_metadata("items")
    assert metadata["outputs"][0]["shape"] == [-1, 8]
    ids = np.array([i for bag in BAGS for i in bag], np.int64)
    offsets = np.array([0, 3, 5], np.int64)
    inputs = [triton.InferInput("indices", list(ids.shape), "INT64"),
              triton.InferInput("offsets", list(offsets.shape), "INT64")]
    inputs[0].set_data_from_numpy(ids, binary_data=binary)
    inputs[1].set_data_from_numpy(offsets, binary_data=binary)
    outputs = [triton.InferRequestedOutput("embeddings", binary_data=binary)]
    result = client.infer("items", inputs, outputs=outputs)
    np.testing.assert_array_equal(result.as_numpy("embeddings"), _expected())
    weights = np.linspace(0.5, 3.0, ids.size).astype(np.float32)
    weighted = triton.InferInput("per_sample_weights", list(weights.shape), "FP32")
    weighted.set_data_from_numpy(weights, binary_data=binary)
    result = client.infer("weighted", [*inputs, weighted], outputs=outputs)
    expected = EmbeddingBag.from_pretrained(table(), mode="sum")(ids, [0, 3, 5], weights)
    np.testing.assert_array_equal(result.as_numpy("embeddings"), expected)


def test_tritonclient_sees_errors(server: Server) -> None:
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    client = triton.InferenceServerClient(url=server.url.removeprefix("http://"))
    bad = triton.InferInput("indices", [1], "INT64")
    bad.set_data_from_numpy(np.array([500], np.int64))
    offsets = triton.InferInput("offsets", [1], "INT64")
    offsets.set_data_from_numpy(np.array([0], np.int64))
    with pytest.raises(InferenceServerException, match="index 500 out of range"):
        client.infer("items", [bad, offsets])


def test_tritonclient_controls_the_repository(server: Server) -> None:
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    client = triton.InferenceServerClient(url=server.url.removeprefix("http://"))
    index = {entry["name"]: entry for entry in client.get_model_repository_index()}
    assert index["items"]["state"] == "READY"
    version = int(index["items"]["version"])
    client.load_model("items")
    assert client.is_model_ready("items", str(version + 1))
    assert not client.is_model_ready("items", str(version))
    ids = np.array([i for bag in BAGS for i in bag], np.int64)
    inputs = [triton.InferInput("indices", [ids.size], "INT64"),
              triton.InferInput("offsets", [3], "INT64")]
    inputs[0].set_data_from_numpy(ids)
    inputs[1].set_data_from_numpy(np.array([0, 3, 5], np.int64))
    result = client.infer("items", inputs)
    assert result.get_response()["model_version"] == str(version + 1)
    np.testing.assert_array_equal(result.as_numpy("embeddings"), _expected())
    with pytest.raises(InferenceServerException, match="unsupported parameter"):
        client.load_model("items", config='{"max_batch_size": 8}')
    client.unload_model("items")
    assert not client.is_model_ready("items")
    with pytest.raises(InferenceServerException, match="is not loaded"):
        client.infer("items", inputs)
    client.load_model("items")
    assert client.is_model_ready("items", str(version + 2))
