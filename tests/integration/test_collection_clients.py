"""A collection served by a real ``bagserve serve`` process, reached the way its users
reach it: httpx with keyed bags and KJT arrays, ``tritonclient`` with per-feature binary
and JSON tensors, ``openai`` (refused, pointing at the native route). Every golden case
in one config, so held-out cases of the same layout go through the same paths."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from tests.integration.conftest import Server, start_server
from tests.models.test_collection import CASES, GOLDEN, as_kjt


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("collections")
    configs = []
    for case in CASES:
        text = (GOLDEN / case / "config.toml").read_text()
        for file in (GOLDEN / case).glob("ebc.*"):
            shutil.copy(file, folder / f"{case}-{file.name}")
            text = text.replace(f'"{file.name}"', f'"{case}-{file.name}"')
        configs.append(text.replace('backend = "numpy"', 'backend = "auto"'))
    (folder / "models.toml").write_text("\n".join(configs))
    running = start_server(tmp_path_factory.mktemp("logs"), "--config",
                           str(folder / "models.toml"))
    yield running
    assert running.stop() == 0, running.log.read_text()


def _case(case: str) -> tuple[dict, np.ndarray]:  # type: ignore[type-arg]
    return (json.loads((GOLDEN / case / "request.json").read_text()),
            np.load(GOLDEN / case / "expected.npy"))


@pytest.mark.parametrize("case", CASES)
def test_httpx_keyed_and_kjt(served: Server, case: str) -> None:
    request, expected = _case(case)
    with httpx.Client(base_url=served.url) as client:
        body = client.post(f"/v1/models/{case}/embed", json=request).json()
        np.testing.assert_allclose(np.array(body["embeddings"], np.float32), expected,
                                   rtol=1e-6, atol=1e-6)
        kjt = as_kjt(request, list(request["features"]))
        raw = client.post(f"/v1/models/{case}/embed", json={"kjt": kjt},
                          headers={"Accept": "application/octet-stream"})
        np.testing.assert_allclose(np.frombuffer(raw.content, "<f4").reshape(expected.shape),
                                   expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("case", CASES)
def test_tritonclient(served: Server, case: str, binary: bool) -> None:
    import tritonclient.http as triton

    request, expected = _case(case)
    client = triton.InferenceServerClient(url=served.url.removeprefix("http://"))
    metadata = client.get_model_metadata(case)
    assert metadata["outputs"][0]["shape"] == [-1, expected.shape[1]]
    declared = {i["name"] for i in metadata["inputs"]}
    inputs = []
    for feature, bags in request["features"].items():
        values = np.array([i for b in bags for i in b], np.int64)
        lengths = np.array([len(b) for b in bags], np.int32)
        parts = [(f"{feature}__values", values, "INT64"),
                 (f"{feature}__lengths", lengths, "INT32")]
        if feature in request["weights"]:
            parts.append((f"{feature}__weights", np.array(
                [w for ws in request["weights"][feature] for w in ws], np.float32), "FP32"))
        for name, array, datatype in parts:
            assert name in declared
            item = triton.InferInput(name, list(array.shape), datatype)
            item.set_data_from_numpy(array, binary_data=binary)
            inputs.append(item)
    outputs = [triton.InferRequestedOutput("embeddings", binary_data=binary)]
    result = client.infer(case, inputs, outputs=outputs)
    np.testing.assert_allclose(result.as_numpy("embeddings"), expected, rtol=1e-6, atol=1e-6)


def test_tritonclient_sees_feature_errors(served: Server) -> None:
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    client = triton.InferenceServerClient(url=served.url.removeprefix("http://"))
    request, _ = _case("ranker")
    inputs = []
    for feature, bags in request["features"].items():
        values = np.array([i for b in bags for i in b], np.int64)
        if feature == "category":
            values[0] = 10_000
        for name, array in ((f"{feature}__values", values),
                            (f"{feature}__lengths", np.array([len(b) for b in bags]))):
            item = triton.InferInput(name, list(array.shape), "INT64")
            item.set_data_from_numpy(array.astype(np.int64))
            inputs.append(item)
    with pytest.raises(InferenceServerException, match="feature 'category'.*id 10000"):
        client.infer("ranker", inputs)


def test_openai_client_is_pointed_at_the_native_route(served: Server) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.UnprocessableEntityError, match="/v1/models/ranker/embed"):
        client.embeddings.create(model="ranker", input=[[1]])
    listed = {m.id for m in client.models.list()}
    assert set(CASES) <= listed
