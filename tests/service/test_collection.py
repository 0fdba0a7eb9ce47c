"""Collections through the service: the golden fixtures through every request form (native
keyed, KJT, base64, raw bytes, KServe v2 JSON and binary), metadata, limits, the oov
header and metrics, and every refusal naming the feature."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from fastapi.testclient import TestClient

from service.config import ConfigError, load_config
from service.registry import ModelLoadError, load_model
from tests.models.test_collection import CASES, GOLDEN, as_kjt
from tests.service.conftest import loaded

CASE_DATA = {case: (json.loads((GOLDEN / case / "request.json").read_text()),
                    np.load(GOLDEN / case / "expected.npy")) for case in CASES}


@pytest.fixture(scope="module")
def models() -> list[Any]:
    return [load_model(load_config(GOLDEN / case / "config.toml")[0]) for case in CASES]


@pytest.fixture
def client(make_client: Callable[..., TestClient], models: list[Any]) -> TestClient:
    return make_client([*models, loaded("items", "mean")])


def _close(actual: Any, expected: np.ndarray) -> None:
    np.testing.assert_allclose(np.asarray(actual, np.float32), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", CASES)
def test_native_keyed_and_kjt(client: TestClient, case: str) -> None:
    request, expected = CASE_DATA[case]
    answer = client.post(f"/v1/models/{case}/embed", json=request)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert list(body) == ["model", "keys", "dims", "offset_per_key", "embeddings"]
    assert body["offset_per_key"][-1] == expected.shape[1] == sum(body["dims"])
    _close(body["embeddings"], expected)
    kjt = as_kjt(request, list(request["features"]))
    answer = client.post(f"/v1/models/{case}/embed", json={"kjt": kjt, "encoding": "base64"})
    assert answer.status_code == 200, answer.text
    rows = [np.frombuffer(base64.b64decode(r), "<f4") for r in answer.json()["embeddings"]]
    _close(rows, expected)
    raw = client.post(f"/v1/models/{case}/embed", json=request,
                      headers={"Accept": "application/octet-stream"})
    assert raw.headers["x-embeddings-shape"] == f"{expected.shape[0]},{expected.shape[1]}"
    _close(np.frombuffer(raw.content, "<f4").reshape(expected.shape), expected)


@pytest.mark.parametrize("case", CASES)
def test_plain_kjt_reads_as_the_general_parser_reads_it(client: TestClient, case: str) -> None:
    # Keys, values and lengths alone take the compiled reader; the same KJT with offsets
    # the general one: the same rows, bit for bit.
    request, expected = CASE_DATA[case]
    kjt = as_kjt(request, list(request["features"]))
    plain = {"keys": kjt["keys"], "values": kjt["values"], "lengths": kjt["lengths"]}
    general = {"keys": kjt["keys"], "values": kjt["values"],
               "offsets": np.concatenate([[0], np.cumsum(kjt["lengths"])]).tolist()}
    rows = []
    for body in (plain, general):
        answer = client.post(f"/v1/models/{case}/embed", content=orjson.dumps(
            {"kjt": body, "encoding": "base64"}))
        assert answer.status_code == 200, answer.text
        rows.append([base64.b64decode(r) for r in answer.json()["embeddings"]])
    assert rows[0] == rows[1]
    if not request["weights"]:
        _close([np.frombuffer(r, "<f4") for r in rows[0]], expected)


def _kserve_inputs(request: dict[str, Any], binary: bool, offsets: bool = False
                   ) -> tuple[bytes, dict[str, str]]:
    inputs, tail = [], b""
    for feature, bags in request["features"].items():
        values = np.array([i for b in bags for i in b], np.int64)
        lengths = np.array([len(b) for b in bags], np.int32)
        parts = [("values", "INT64", values),
                 ("offsets", "INT32", np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
                 if offsets else ("lengths", "INT32", lengths)]
        if feature in request["weights"]:
            parts.append(("weights", "FP32", np.array([w for ws in request["weights"][feature]
                                                       for w in ws], np.float32)))
        for part, datatype, array in parts:
            spec: dict[str, Any] = {"name": f"{feature}__{part}", "datatype": datatype,
                                    "shape": [int(array.shape[0])]}
            if binary:
                spec["parameters"] = {"binary_data_size": array.nbytes}
                tail += array.tobytes()
            else:
                spec["data"] = array.tolist()
            inputs.append(spec)
    header = orjson.dumps({"inputs": inputs, "outputs": [
        {"name": "embeddings", "parameters": {"binary_data": binary}}]})
    if binary:
        return header + tail, {"Inference-Header-Content-Length": str(len(header))}
    return header, {"Content-Type": "application/json"}


@pytest.mark.parametrize(("binary", "offsets"), [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("case", CASES)
def test_kserve(client: TestClient, case: str, binary: bool, offsets: bool) -> None:
    # Binary lengths take the compiled reader (unless a case sends weights), the rest the
    # general one.
    request, expected = CASE_DATA[case]
    body, headers = _kserve_inputs(request, binary, offsets=offsets)
    answer = client.post(f"/v2/models/{case}/infer", content=body, headers=headers)
    assert answer.status_code == 200, answer.text
    if binary:
        size = int(answer.headers["inference-header-content-length"])
        rows = np.frombuffer(answer.content[size:], "<f4").reshape(expected.shape)
    else:
        output = answer.json()["outputs"][0]
        assert output["shape"] == list(expected.shape)
        rows = np.array(output["data"], np.float32).reshape(expected.shape)
    _close(rows, expected)


def test_kserve_metadata_lists_feature_inputs(client: TestClient) -> None:
    meta = client.get("/v2/models/ranker").json()
    names = {i["name"] for i in meta["inputs"]}
    assert {"user_id__values", "user_id__lengths", "user_id__offsets",
            "tags__weights"} <= names
    assert "history__weights" not in names  # mean-pooled: no weights
    assert meta["outputs"] == [{"name": "embeddings", "datatype": "FP32", "shape": [-1, 41]}]
    assert meta["parameters"]["keys"] == ["user_id", "history", "candidates", "category",
                                          "tags"]
    assert meta["parameters"]["offset_per_key"] == [0, 8, 20, 32, 37, 41]
    listed = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert listed["ranker"]["kind"] == "collection"
    assert listed["ranker"]["dims"] == [8, 12, 12, 5, 4]
    assert listed["items"]["kind"] == "table"


def test_oov_header_and_metrics(client: TestClient) -> None:
    request, _ = CASE_DATA["hashed"]
    answer = client.post("/v1/models/hashed/embed", json=request)
    assert answer.headers["x-oov-ids"] == "site=4,app=4,device=3"
    metrics = client.get("/metrics").text
    assert 'bagserve_oov_ids_total{action="hashed",feature="site",model="hashed"} 4.0' in metrics
    assert ('bagserve_oov_ids_total{action="skipped",feature="device",model="hashed"} 3.0'
            in metrics)


def test_a_sample_never_depends_on_its_batch(client: TestClient) -> None:
    request, expected = CASE_DATA["ranker"]
    features = request["features"]
    for sample in range(expected.shape[0]):
        one = {"features": {k: [v[sample]] for k, v in features.items()},
               "weights": {k: [v[sample]] for k, v in request["weights"].items()}}
        answer = client.post("/v1/models/ranker/embed", json=one)
        _close(answer.json()["embeddings"], expected[sample : sample + 1])


@pytest.mark.parametrize(("body", "message"), [
    ({"features": {"user_id": [[999]]}}, "missing"),
    ({"bags": [[1]]}, "is a collection of features.*POST /v1/models/ranker/embed"),
    ({"features": {"ghost": [[1]]}}, "unknown feature.*'ghost'"),
    ({"features": [[1]]}, "features must be an object"),
    ({"features": {"user_id": [[1]]}, "extra": 1}, "unknown field"),
    ({"kjt": {"keys": ["user_id"], "values": [1]}}, r"lengths \(F \* B .* offsets .* missing"),
    ({"kjt": {"keys": ["user_id"], "values": [1], "lengths": [1], "x": 1}}, "unknown field"),
    ({"kjt": [1]}, "kjt must be an object"),
    ({"kjt": {"keys": ["user_id"], "lengths": [1]}}, "kjt needs values"),
    ({"features": {"user_id": [[True]]}},
     r"features.user_id\[0\]\[0\] must be an integer; got true"),
    ({"features": {"user_id": [[1.5]]}}, r"features.user_id\[0\]\[0\] must be an integer"),
    ({"features": {"user_id": [1]}}, r"features.user_id\[0\] must be a list"),
    ({"features": {"user_id": 3}}, "features.user_id must be a list of lists"),
    ({"features": {"user_id": [[1]], "tags": [[1], [2]]}}, "same number of samples"),
    ({"features": {"tags": [[1, 2]]}, "weights": {"tags": [[0.5]]}},
     r"weights.tags\[0\] has 1 weights for 2 ids"),
    ({"features": {"tags": [[1]]}, "weights": {"ghost": [[0.5]]}}, "'ghost'.*not in features"),
    ({"features": {"tags": [[1]]}, "weights": [1]}, "weights must be an object"),
])
def test_native_refusals(client: TestClient, body: dict[str, Any], message: str) -> None:
    answer = client.post("/v1/models/ranker/embed", json=body)
    assert answer.status_code == 422, answer.text
    assert re.search(message, answer.json()["error"]["message"]), answer.json()


def test_out_of_range_id_names_feature_sample_position(client: TestClient) -> None:
    request, _ = CASE_DATA["ranker"]
    features = {k: [list(b) for b in v] for k, v in request["features"].items()}
    features["category"][2] = [1, 10]
    answer = client.post("/v1/models/ranker/embed", json={"features": features,
                                                          "weights": request["weights"]})
    assert answer.status_code == 422
    assert ("feature 'category', sample 2, position 1: id 10 is outside [0, 10) of table "
            "'t_cat'") in answer.json()["error"]["message"]


def test_table_route_refusals(client: TestClient) -> None:
    answer = client.post("/v1/embeddings", json={"model": "ranker", "input": [[1]]})
    assert answer.status_code == 422
    assert "/v1/models/ranker/embed" in answer.json()["error"]["message"]
    answer = client.post("/v1/models/items/embed", json={"features": {"a": [[1]]}})
    assert answer.status_code == 422
    assert "single table" in answer.json()["error"]["message"]
    body = {"inputs": [{"name": "user_id__ids", "datatype": "INT64", "shape": [1],
                        "data": [1]}]}
    answer = client.post("/v2/models/ranker/infer", json=body)
    assert answer.status_code == 422 and "unknown input 'user_id__ids'" in answer.json()["error"]
    body = {"inputs": [{"name": "user_id__values", "datatype": "INT64", "shape": [1],
                        "data": [1]}]}
    answer = client.post("/v2/models/ranker/infer", json=body)
    assert answer.status_code == 422 and "history__values" in answer.json()["error"]
    request, _ = CASE_DATA["ranker"]
    header, _ = _kserve_inputs(request, binary=False)
    inputs = [i for i in orjson.loads(header)["inputs"] if i["name"] != "tags__lengths"]
    answer = client.post("/v2/models/ranker/infer", json={"inputs": inputs})
    assert answer.status_code == 422
    assert "feature 'tags' needs exactly one of" in answer.json()["error"]


def test_limits_count_every_feature(make_client: Callable[..., TestClient],
                                    models: list[Any]) -> None:
    client = make_client(list(models), max_bags_per_request=20, max_batch_bags=20)
    request, _ = CASE_DATA["ranker"]  # 9 samples x 5 features = 45 bags
    answer = client.post("/v1/models/ranker/embed", json=request)
    assert answer.status_code == 422 and "limit" in answer.json()["error"]["message"]
    kjt = as_kjt(request, list(request["features"]))
    answer = client.post("/v1/models/ranker/embed", json={"kjt": kjt})
    assert answer.status_code == 422 and "limit" in answer.json()["error"]["message"]
    del kjt["weights"]  # the compiled reader's form: the same refusal
    answer = client.post("/v1/models/ranker/embed", content=orjson.dumps({"kjt": kjt}))
    assert answer.status_code == 422
    assert answer.json()["error"]["message"] == "request holds 45 lengths; the limit is 20 bags"


def test_config_refusals(tmp_path: Path) -> None:
    def config(text: str) -> Path:
        path = tmp_path / "models.toml"
        path.write_text(text)
        return path

    head = '[[models]]\nname = "r"\ncheckpoint = "x.pt"\n'
    with pytest.raises(ConfigError, match="features is required"):
        load_config(config(head + '[[models.tables]]\nname = "a"\n'))
    with pytest.raises(ConfigError, match="'b' has no features"):
        load_config(config(head + '[[models.tables]]\nname = "b"\nfeatures = []\n'))
    with pytest.raises(ConfigError, match="feature 'x' is named twice"):
        load_config(config(head + '[[models.tables]]\nname = "a"\nfeatures = ["x"]\n'
                           '[[models.tables]]\nname = "b"\nfeatures = ["x"]\n'))
    with pytest.raises(ConfigError, match=r"mode \(there: pooling\) belong"):
        load_config(config(head + 'mode = "sum"\n[[models.tables]]\nname = "a"\n'
                           'features = ["x"]\n'))
    with pytest.raises(ConfigError, match="pooling must be one of sum, mean, max; got 'median'"):
        load_config(config(head + '[[models.tables]]\nname = "a"\nfeatures = ["x"]\n'
                           'pooling = "median"\n'))
    with pytest.raises(ConfigError, match="unknown field.*colour"):
        load_config(config(head + '[[models.tables]]\nname = "a"\nfeatures = ["x"]\n'
                           'colour = 1\n'))


def test_load_refuses_missing_table_naming_model_and_key(tmp_path: Path) -> None:
    source = GOLDEN / "ranker"
    text = (source / "config.toml").read_text().replace(
        'checkpoint = "ebc.pt"', f'checkpoint = "{source / "ebc.pt"}"')
    text += '\n[[models.tables]]\nname = "t_ghost"\nfeatures = ["ghost"]\n'
    path = tmp_path / "models.toml"
    path.write_text(text)
    with pytest.raises(ModelLoadError, match="model 'ranker'.*table 't_ghost' needs tensor "
                       "'embedding_bags.t_ghost.weight'.*holds embedding_bags.t_cat.weight"):
        load_model(load_config(path)[0])


def test_zero_samples_answer_no_rows(client: TestClient) -> None:
    request, _ = CASE_DATA["ranker"]
    empty = {"features": {key: [] for key in request["features"]}}
    answer = client.post("/v1/models/ranker/embed", json=empty)
    assert answer.status_code == 200, answer.text
    assert answer.json()["embeddings"] == []
    kjt = {"kjt": {"keys": list(request["features"]), "values": [], "lengths": []}}
    assert client.post("/v1/models/ranker/embed", json=kjt).json()["embeddings"] == []
    body, headers = _kserve_inputs({**empty, "weights": {}}, binary=True)
    answer = client.post("/v2/models/ranker/infer", content=body, headers=headers)
    assert answer.status_code == 200, answer.text
    size = int(answer.headers["inference-header-content-length"])
    assert orjson.loads(answer.content[:size])["outputs"][0]["shape"][0] == 0
    assert len(answer.content) == size


def test_torchrec_field_names_and_reload(tmp_path: Path,
                                         make_client: Callable[..., TestClient]) -> None:
    source = GOLDEN / "ranker"
    text = (source / "config.toml").read_text().replace(
        'checkpoint = "ebc.pt"', f'checkpoint = "{source / "ebc.pt"}"').replace(
        "features = ", "feature_names = ").replace('pooling = "sum"', 'pooling = "SUM"')
    path = tmp_path / "models.toml"
    path.write_text(text)
    specs = load_config(path)
    assert specs[0].tables is not None
    assert specs[0].tables[1].feature_names == ("history", "candidates")
    client = make_client([load_model(specs[0])], config=path)
    request, expected = CASE_DATA["ranker"]
    # Reloading swaps in a new version that answers the same.
    assert client.post("/v2/repository/models/ranker/load").status_code == 200
    answer = client.post("/v1/models/ranker/embed", json=request)
    assert answer.headers["x-model-version"] == "2"
    _close(answer.json()["embeddings"], expected)


class _SlowKernel:
    """The collection's kernel behind a delay, named so the batcher never runs it on the
    event loop: concurrent requests then share batches."""

    def __init__(self, inner: Any, delay: float) -> None:
        self.inner, self.delay = inner, delay
        self.name, self.provider, self.spec = "wrapped", inner.provider, inner.spec

    def __call__(self, *args: Any) -> Any:
        import time

        time.sleep(self.delay)
        return self.inner(*args)


def test_concurrent_requests_share_batches_and_get_their_own_rows(
        make_client: Callable[..., TestClient]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from models.collection import EmbeddingBagCollection

    reference = load_model(load_config(GOLDEN / "ranker" / "config.toml")[0]).bag
    slow = load_model(load_config(GOLDEN / "ranker" / "config.toml")[0])
    assert isinstance(reference, EmbeddingBagCollection)
    assert isinstance(slow.bag, EmbeddingBagCollection)
    slow.bag._kernel = _SlowKernel(slow.bag._kernel, 0.02)
    client = make_client([slow])
    rng = np.random.default_rng(7)
    rows = {"user_id": 40, "history": 60, "candidates": 60, "category": 10, "tags": 30}
    requests = []
    for i in range(40):
        samples = int(rng.integers(1, 4))
        features = {f: [[int(x) for x in rng.integers(0, n, rng.integers(0, 4))]
                        for _ in range(samples)] for f, n in rows.items()}
        body: dict[str, Any] = {"features": features}
        if i % 2:  # weighted and unweighted requests mixed in one batch
            body["weights"] = {"tags": [[float(w) for w in rng.uniform(0.5, 2, len(b))]
                                        for b in features["tags"]]}
        requests.append(body)
    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(
            lambda body: client.post("/v1/models/ranker/embed", json=body), requests))
    batch_bags = []
    for body, response in zip(requests, responses, strict=True):
        assert response.status_code == 200, response.text
        expected = reference(body["features"], weights=body.get("weights")).values()
        np.testing.assert_array_equal(np.array(response.json()["embeddings"], np.float32),
                                      expected)
        batch_bags.append(int(response.headers["x-batch-bags"]))
    assert max(batch_bags) > 3 * 5  # several requests' samples in one batch
