"""Model control: the KServe repository extension, versions and atomic swaps."""

from __future__ import annotations

import gc
import threading
import weakref
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from models import EmbeddingBag, write_safetensors
from service.app import create_app
from service.settings import Settings
from tests.service.conftest import table, wrapped

BAGS = {"bags": [[1, 2, 3], [4]]}


def _expected(seed: int) -> np.ndarray:
    bag = EmbeddingBag.from_pretrained(table(seed), mode="mean")
    return bag([1, 2, 3, 4], [0, 3])


def _config(folder: Path, *names: str) -> Path:
    config = folder / "models.toml"
    config.write_text("".join(f'[[models]]\nname = "{name}"\ncheckpoint = "{name}.safetensors"'
                              '\nmode = "mean"\n' for name in names))
    return config


def _write(folder: Path, name: str, seed: int) -> None:
    # A new file replacing the old one, as a deploy would (the old one may be mapped).
    staged = folder / f".{name}.tmp"
    write_safetensors(staged, {"weight": table(seed)})
    staged.replace(folder / f"{name}.safetensors")


@pytest.fixture
def served(tmp_path: Path) -> Callable[..., TestClient]:
    clients: list[TestClient] = []

    def serve(**settings: object) -> TestClient:
        _write(tmp_path, "items", 0)
        client = TestClient(create_app(Settings(config=_config(tmp_path, "items"),
                                                **settings)), raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        return client

    yield serve
    for client in clients:
        client.__exit__(None, None, None)


def _embed(client: TestClient, name: str = "items") -> tuple[np.ndarray, str]:
    response = client.post(f"/v1/models/{name}/embed", json=BAGS)
    assert response.status_code == 200, response.text
    return np.array(response.json()["embeddings"], np.float32), response.headers[
        "X-Model-Version"]


def test_load_swaps_in_the_rewritten_checkpoint_and_counts_the_version(
        served: Callable[..., TestClient], tmp_path: Path) -> None:
    client = served()
    rows, version = _embed(client)
    np.testing.assert_allclose(rows, _expected(0), rtol=1e-6)
    assert version == "1"
    _write(tmp_path, "items", 1)
    response = client.post("/v2/repository/models/items/load")
    assert response.status_code == 200, response.text
    assert response.headers["X-Model-Version"] == "2"
    rows, version = _embed(client)
    np.testing.assert_allclose(rows, _expected(1), rtol=1e-6)
    assert version == "2"
    assert client.get("/v1/models").json()["data"][0]["version"] == 2
    assert client.get("/v2/models/items").json()["versions"] == ["2"]
    assert client.get("/v2/models/items/versions/2/ready").status_code == 200
    assert client.get("/v2/models/items/versions/1/ready").status_code == 404
    infer = client.post("/v2/models/items/infer", json={"inputs": [
        {"name": "indices", "datatype": "INT64", "shape": [4], "data": [1, 2, 3, 4]},
        {"name": "offsets", "datatype": "INT64", "shape": [2], "data": [0, 3]}]})
    assert infer.json()["model_version"] == "2"
    assert client.post("/v2/repository/index").json() == [
        {"name": "items", "version": "2", "state": "READY", "reason": ""}]


def test_a_failed_load_keeps_the_old_version_serving(served: Callable[..., TestClient],
                                                     tmp_path: Path) -> None:
    client = served()
    # Replaced by rename, as deploys do: the serving table maps the old file, which a
    # rewrite in place would change under it (README, "Model control").
    staged = tmp_path / "staged"
    staged.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{corrupt")
    staged.replace(tmp_path / "items.safetensors")
    response = client.post("/v2/repository/models/items/load")
    assert response.status_code == 400
    assert "items.safetensors" in response.json()["error"]
    rows, version = _embed(client)  # the table read at start-up, still mapped
    np.testing.assert_allclose(rows, _expected(0), rtol=1e-6)
    assert version == "1"
    (entry,) = client.post("/v2/repository/index").json()
    assert entry["state"] == "READY"
    assert entry["reason"].startswith("version 1 serving; the last load failed: ")


def test_a_broken_config_file_fails_the_load_with_its_reason(
        served: Callable[..., TestClient], tmp_path: Path) -> None:
    client = served()
    for broken, reason in (("[[models]]\nname = ", "invalid TOML"),
                           ('[[models]]\nname = "items"\nmodee = "max"\n',
                            "unknown field(s) modee")):
        (tmp_path / "models.toml").write_text(broken)
        response = client.post("/v2/repository/models/items/load")
        assert response.status_code == 400, response.text
        assert reason in response.json()["error"]
        assert _embed(client)[1] == "1"


def test_unload_then_load_again(served: Callable[..., TestClient]) -> None:
    client = served()
    assert client.post("/v2/repository/models/items/unload",
                       json={"parameters": {"unload_dependents": False}}).status_code == 200
    response = client.post("/v1/models/items/embed", json=BAGS)
    assert response.status_code == 404
    assert "not loaded (unloaded)" in response.json()["error"]["message"]
    assert "/v2/repository/models/items/load" in response.json()["error"]["message"]
    assert client.post("/v2/repository/index").json() == [
        {"name": "items", "version": "1", "state": "UNAVAILABLE", "reason": "unloaded"}]
    assert client.post("/v2/repository/index", json={"ready": True}).json() == []
    assert client.post("/v2/repository/models/items/unload").status_code == 404
    assert client.post("/v2/repository/models/items/load").status_code == 200
    assert _embed(client)[1] == "2"


def test_load_picks_up_a_model_added_to_the_config(served: Callable[..., TestClient],
                                                   tmp_path: Path) -> None:
    client = served()
    missing = client.post("/v2/repository/models/users/load")
    assert missing.status_code == 404
    assert "not in" in missing.json()["error"] and "items" in missing.json()["error"]
    _write(tmp_path, "users", 2)
    _config(tmp_path, "items", "users")
    assert client.post("/v2/repository/models/users/load").status_code == 200
    np.testing.assert_allclose(_embed(client, "users")[0], _expected(2), rtol=1e-6)


@pytest.mark.parametrize(("body", "message"), [
    ({"parameters": {"config": "{}"}}, "unsupported parameter(s) 'config'"),
    ([1], "must be a JSON object"),
    ({"parameters": []}, "parameters must be an object")])
def test_load_refuses_what_it_cannot_honour(served: Callable[..., TestClient], body: object,
                                            message: str) -> None:
    response = served().post("/v2/repository/models/items/load", json=body)
    assert response.status_code == 422
    assert message in response.json()["error"]


def test_control_routes_need_the_api_key(served: Callable[..., TestClient]) -> None:
    client = served(api_key="secret")
    for path in ("/v2/repository/index", "/v2/repository/models/items/load",
                 "/v2/repository/models/items/unload"):
        assert client.post(path).status_code == 401
    assert client.post("/v2/repository/index",
                       headers={"Authorization": "Bearer secret"}).status_code == 200


def test_requests_admitted_before_a_swap_finish_on_the_old_table() -> None:
    # The serving model is slow (0.3 s a batch): a request admitted before the load is
    # still computing when the new version is swapped in, and answers from the old one.
    old = wrapped("items", mode="mean", delay=0.3)
    app = create_app(Settings(), models=[old])
    with TestClient(app, raise_server_exceptions=False) as client:
        state = app.state.service
        answers: list[tuple[np.ndarray, str]] = []
        slow = threading.Thread(target=lambda: answers.append(_embed(client)))
        slow.start()
        while not state.batchers["items"].holders:
            threading.Event().wait(0.005)
        old_batcher = state.batchers["items"]
        # No config file: the entry it started with (the built-in demo table).
        assert client.post("/v2/repository/models/items/load").status_code == 200
        assert old_batcher.holders == 1  # the slow request is still on the old version
        rows, version = _embed(client)
        slow.join()
        assert version == "2" and rows.shape == (2, 64)
        (old_rows, old_version), = answers
        assert old_version == "1"
        np.testing.assert_allclose(old_rows, old.bag([1, 2, 3, 4], [0, 3]), rtol=1e-6)
        for _ in range(200):  # retired once its last request let go
            if not state._retiring:
                break
            threading.Event().wait(0.01)
        assert not state._retiring and old_batcher.holders == 0
        # Nothing keeps the old version's table alive (the app took over the list of
        # preloaded models): its memory goes back.
        table_ref = weakref.ref(old.bag)
        del old, old_batcher
        gc.collect()
        assert table_ref() is None


def test_a_reload_retries_a_model_whose_last_load_failed(
        served: Callable[..., TestClient], tmp_path: Path) -> None:
    client = served()
    state = client.app.state.service  # type: ignore[attr-defined]
    config = tmp_path / "models.toml"
    good = config.read_text()
    config.write_text(good.replace("items.safetensors", "missing.safetensors"))
    client.portal.call(state.reload_config)  # type: ignore[union-attr]
    assert "missing.safetensors" in state.last_error["items"]
    # The config back as it was: nothing differs from the serving version, yet the
    # failed load is tried again, succeeds and clears its error.
    config.write_text(good)
    client.portal.call(state.reload_config)  # type: ignore[union-attr]
    assert "items" not in state.last_error
    rows, version = _embed(client)
    assert version == "2"
    np.testing.assert_array_equal(rows, _expected(0))
