"""A real static text model served by a real process: the model shipped inside the
``tokenlearn-static-model`` wheel (10,000 x 64 int8 rows, vocabulary-quantized, a
276k-piece Unigram tokenizer; installed by the test extra), reached with the ``openai``
client in strings, httpx on the native route and tritonclient with BYTES; every vector
model2vec 0.10's own (tests/golden/text/tokenlearn, made by make_text.py)."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.integration.conftest import Server, start_server

GOLDEN = Path(__file__).parents[1] / "golden" / "text" / "tokenlearn"


def _model_folder() -> Path:
    spec = importlib.util.find_spec("static_model")
    assert spec is not None and spec.submodule_search_locations, (
        "tokenlearn-static-model is part of the test extra: pip install -e '.[test]'")
    return Path(spec.submodule_search_locations[0]) / "model"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("text")
    (folder / "models.toml").write_text(
        f'[[models]]\nname = "potion"\ncheckpoint = "{_model_folder()}"\n')
    running = start_server(tmp_path_factory.mktemp("logs"), "--config",
                           str(folder / "models.toml"))
    yield running
    assert running.stop() == 0, running.log.read_text()


def _golden() -> tuple[list[str], np.ndarray]:
    return (json.loads((GOLDEN / "texts.json").read_text()),
            np.load(GOLDEN / "expected.npy").astype(np.float32))


@pytest.mark.parametrize("encoding", ["base64", "float"])
def test_openai_client_in_strings(served: Server, encoding: str) -> None:
    import openai

    texts, expected = _golden()
    client = openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0)
    kwargs = {} if encoding == "base64" else {"encoding_format": "float"}
    response = client.embeddings.create(model="potion", input=texts, **kwargs)  # type: ignore[arg-type]
    vectors = np.array([d.embedding for d in response.data], np.float32)
    np.testing.assert_array_equal(vectors, expected)
    assert response.usage.prompt_tokens > 0
    assert client.models.retrieve("potion").id == "potion"
    one = client.embeddings.create(model="potion", input=texts[2], dimensions=16)
    first = expected[2, :16]
    np.testing.assert_allclose(one.data[0].embedding, first / np.linalg.norm(first),
                               rtol=1e-6)


def test_native_and_tokenize(served: Server) -> None:
    texts, expected = _golden()
    with httpx.Client(base_url=served.url) as client:
        body = client.post("/v1/models/potion/embed", json={"texts": texts}).json()
        np.testing.assert_array_equal(np.array(body["embeddings"], np.float32), expected)
        ids = client.post("/v1/models/potion/tokenize", json={"texts": texts[2:4]}).json()["ids"]
        again = client.post("/v1/models/potion/embed", json={"bags": ids}).json()
        np.testing.assert_array_equal(np.array(again["embeddings"], np.float32),
                                      expected[2:4])


@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_bytes(served: Server, binary: bool) -> None:
    import tritonclient.http as triton

    texts, expected = _golden()
    client = triton.InferenceServerClient(url=served.url.removeprefix("http://"))
    metadata = client.get_model_metadata("potion")
    assert metadata["inputs"][0]["datatype"] == "BYTES"
    item = triton.InferInput("text", [len(texts)], "BYTES")
    item.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=np.object_),
                             binary_data=binary)
    result = client.infer("potion", [item], outputs=[
        triton.InferRequestedOutput("embeddings", binary_data=binary)])
    np.testing.assert_array_equal(result.as_numpy("embeddings"), expected)
