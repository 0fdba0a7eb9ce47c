"""The native route: formats, options, exact results, timing headers."""

from __future__ import annotations

import base64

import numpy as np
from fastapi.testclient import TestClient

from models import EmbeddingBag
from tests.service.conftest import DIM, table

BAGS = [[1, 2, 3], [4], [], [5, 5, 49]]


def _engine(mode: str = "mean", **options: object) -> EmbeddingBag:
    return EmbeddingBag.from_pretrained(table(), mode=mode, **options)  # type: ignore[arg-type]


def test_bags_match_the_engine_exactly(client: TestClient) -> None:
    response = client.post("/v1/models/items/embed", json={"bags": BAGS})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "items" and body["dim"] == DIM
    expected = _engine()(np.concatenate([np.array(b, np.int64) for b in BAGS]),
                         [0, 3, 4, 4])
    np.testing.assert_array_equal(np.array(body["embeddings"], np.float32), expected)
    for header in ("x-queue-ms", "x-compute-ms", "x-batch-bags"):
        assert float(response.headers[header]) >= 0


def test_indices_and_offsets_with_weights(client: TestClient) -> None:
    payload = {"indices": [1, 2, 3, 4], "offsets": [0, 1],
               "per_sample_weights": [0.5, 1.0, -2.0, 4.0]}
    response = client.post("/v1/models/weighted/embed", json=payload)
    assert response.status_code == 200, response.text
    expected = _engine("sum")([1, 2, 3, 4], [0, 1], np.array([0.5, 1.0, -2.0, 4.0]))
    np.testing.assert_array_equal(np.array(response.json()["embeddings"], np.float32), expected)


def test_ragged_weights_follow_bags(client: TestClient) -> None:
    payload = {"bags": [[1, 2], [3]], "per_sample_weights": [[1.0, 2.0], [3.0]]}
    response = client.post("/v1/models/weighted/embed", json=payload)
    assert response.status_code == 200
    expected = _engine("sum")([1, 2, 3], [0, 2], np.array([1.0, 2.0, 3.0]))
    np.testing.assert_array_equal(np.array(response.json()["embeddings"], np.float32), expected)


def test_base64_rows_are_little_endian_float32(client: TestClient) -> None:
    response = client.post("/v1/models/items/embed", json={"bags": BAGS, "encoding": "base64"})
    rows = [np.frombuffer(base64.b64decode(r), "<f4") for r in response.json()["embeddings"]]
    plain = client.post("/v1/models/items/embed", json={"bags": BAGS}).json()["embeddings"]
    np.testing.assert_array_equal(np.stack(rows), np.array(plain, np.float32))


def test_octet_stream_returns_raw_rows_with_shape(client: TestClient) -> None:
    response = client.post("/v1/models/items/embed", json={"bags": BAGS},
                           headers={"Accept": "application/octet-stream"})
    assert response.headers["content-type"] == "application/octet-stream"
    assert response.headers["x-embeddings-shape"] == f"{len(BAGS)},{DIM}"
    rows = np.frombuffer(response.content, "<f4").reshape(len(BAGS), DIM)
    plain = client.post("/v1/models/items/embed", json={"bags": BAGS}).json()["embeddings"]
    np.testing.assert_array_equal(rows, np.array(plain, np.float32))


def test_models_own_offsets_convention_and_override(client: TestClient) -> None:
    last = client.post("/v1/models/last/embed", json={"indices": [1, 2, 3], "offsets": [0, 1, 3]})
    assert last.status_code == 200, last.text
    assert len(last.json()["embeddings"]) == 2
    plain = client.post("/v1/models/last/embed", json={"indices": [1, 2, 3], "offsets": [0, 1],
                                                       "include_last_offset": False})
    np.testing.assert_array_equal(last.json()["embeddings"], plain.json()["embeddings"])


def test_padding_model_skips_padding(client: TestClient) -> None:
    response = client.post("/v1/models/padded/embed", json={"bags": [[0, 0], [0, 3]]})
    rows = np.array(response.json()["embeddings"], np.float32)
    np.testing.assert_array_equal(rows[0], np.zeros(DIM, np.float32))
    np.testing.assert_array_equal(rows[1], table()[3])


def test_models_listing_reports_backend_and_provider(client: TestClient) -> None:
    data = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert set(data) == {"items", "weighted", "maxed", "padded", "last"}
    assert data["items"]["dim"] == DIM and data["items"]["rows"] == 50
    assert data["items"]["mode"] == "mean" and data["padded"]["padding_idx"] == 0
    assert data["items"]["provider"] in ("numba-cpu", "numpy-cpu")


def test_the_compiled_bags_reader_and_the_general_parser_answer_alike(
        client: TestClient) -> None:
    # {"bags": ...} alone takes the compiled reader; an explicit encoding, the general path.
    fast = client.post("/v1/models/items/embed", content=b'{"bags": [[1,2,3],[4],[],[5,5,49]]}')
    general = client.post("/v1/models/items/embed", json={"bags": BAGS, "encoding": "float"})
    assert fast.status_code == general.status_code == 200
    assert fast.content == general.content


def test_errors_in_a_bags_body_are_worded_by_the_general_parser(client: TestClient) -> None:
    for body, words in ((b'{"bags": [[1, 2.5]]}', "bags[0][1] must be an integer"),
                        (b'{"bags": [[1, 99999]]}', "99999"),
                        (b'{"bags": [[-1]]}', "-1")):
        response = client.post("/v1/models/items/embed", content=body)
        assert response.status_code == 422, response.text
        assert words in response.json()["error"]["message"], response.text
