"""Config files, settings and start-up failures that name the model and file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from models import write_safetensors
from service.app import create_app
from service.config import ConfigError, ModelSpec, load_config
from service.registry import ModelLoadError, load_model
from service.settings import Settings
from tests.service.conftest import table


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "models.toml"
    path.write_text(text)
    return path


def test_config_serves_several_models_with_their_options(tmp_path: Path) -> None:
    write_safetensors(tmp_path / "a.safetensors", {"weight": table(1)})
    np.save(tmp_path / "b.npy", table(2, rows=20, dim=4))
    config = _write(tmp_path, """
[[models]]
name = "a"
checkpoint = "a.safetensors"
mode = "sum"
padding_idx = 0

[[models]]
name = "b"
checkpoint = "b.npy"
mode = "max"
backend = "numpy"
""")
    specs = load_config(config)
    assert [s.name for s in specs] == ["a", "b"]
    assert specs[0].checkpoint == (tmp_path / "a.safetensors").resolve()
    with TestClient(create_app(Settings(config=config))) as client:
        models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
        assert models["a"]["mode"] == "sum" and models["b"]["dim"] == 4
        response = client.post("/v1/models/b/embed", json={"bags": [[1, 2]]})
        np.testing.assert_array_equal(np.array(response.json()["embeddings"][0], np.float32),
                                      table(2, rows=20, dim=4)[[1, 2]].max(axis=0))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[models]]\nname = 'a'\n", "checkpoint is required"),
        ("[[models]]\nname = 'a'\ncheckpoint = 'x.npy'\ncolour = 1\n", "unknown field(s) colour"),
        ("[[models]]\nname = 'a'\ncheckpoint = 3\n", "field 'checkpoint' must be str; got 3"),
        ("[[models]]\nname = 'a'\ncheckpoint = 'x'\npadding_idx = true\n",
         "field 'padding_idx' must be int; got True"),
        ("[[models]]\nname = '../etc'\ncheckpoint = 'x'\n", "name must match"),
        ("[[models]]\nname = 'a'\ncheckpoint = 'x'\n[[models]]\nname = 'a'\ncheckpoint = 'y'\n",
         "duplicate model name(s): a"),
        ("models = 3\n", "expected at least one [[models]] table"),
        ("[[models]\n", "invalid TOML"),
    ],
)
def test_bad_config_is_named(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=f"models.toml: .*{_escape(message)}"):
        load_config(_write(tmp_path, text))


def _escape(text: str) -> str:
    import re

    return re.escape(text)


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope.toml: cannot read config"):
        load_config(tmp_path / "nope.toml")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: None, "checkpoint not found"),
        (lambda p: p.write_bytes(b"garbage!"), "corrupt safetensors header"),
        (lambda p: write_safetensors(p, {"w": np.full((3, 2), np.nan, np.float32)}),
         "table row 0 holds NaN or infinite values"),
        (lambda p: write_safetensors(p, {"w": np.zeros(4, np.float32)}),
         "tensor 'w' is float32 [4]; an embedding table must be a 2-D float tensor"),
        (lambda p: (write_safetensors(p, {"w": np.ones((64, 8), np.float32)}),
                    p.write_bytes(p.read_bytes()[:-100])),
         "do not fit the 1948 data bytes (truncated or corrupt file)"),
        (lambda p: write_safetensors(p, {"w": np.ones((4, 2, 2), np.float32)}),
         "tensor 'w' is float32 [4, 2, 2]"),
    ],
)
def test_load_failure_names_model_and_file(tmp_path: Path, make: object, message: str) -> None:
    path = tmp_path / "t.safetensors"
    make(path)  # type: ignore[operator]
    with pytest.raises(ModelLoadError, match=f"model 'm' \\({_escape(str(path))}\\): .*"
                                             f"{_escape(message)}"):
        load_model(ModelSpec(name="m", checkpoint=path))


def test_options_that_do_not_fit_the_table_fail_at_load(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    write_safetensors(path, {"w": table()})
    with pytest.raises(ModelLoadError, match="padding_idx must be within num_embeddings"):
        load_model(ModelSpec(name="m", checkpoint=path, padding_idx=500))


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BAGSERVE_PORT", "9123")
    monkeypatch.setenv("BAGSERVE_MAX_BAG_LENGTH", "7")
    settings = Settings()
    assert settings.port == 9123 and settings.max_bag_length == 7
    with pytest.raises(ValueError, match="max_ids_per_request .* must not exceed max_batch_ids"):
        Settings(max_ids_per_request=10, max_batch_ids=5)


def test_metrics_count_outcomes_and_batches(client: TestClient) -> None:
    client.post("/v1/models/items/embed", json={"bags": [[1, 2]]})
    client.post("/v1/models/items/embed", json={"bags": [[99]]})
    text = client.get("/metrics").text
    assert 'bagserve_requests_total{model="items",outcome="ok"} 1.0' in text
    assert 'bagserve_requests_total{model="items",outcome="invalid"} 1.0' in text
    for name in ("bagserve_batch_bags_bucket", "bagserve_batch_ids_bucket",
                 "bagserve_queue_seconds_bucket", "bagserve_compute_seconds_bucket",
                 "bagserve_request_seconds_bucket", "bagserve_queue_ids"):
        assert f'{name}{{' in text, name


def test_onnx_backend_serves_the_same_numbers(tmp_path: Path) -> None:
    write_safetensors(tmp_path / "t.safetensors", {"weight": table(3)})
    config = _write(tmp_path, """
[[models]]
name = "viaonnx"
checkpoint = "t.safetensors"
mode = "sum"
backend = "onnx"
device = "cpu"

[[models]]
name = "vianumba"
checkpoint = "t.safetensors"
mode = "sum"
backend = "numpy"
""")
    body = {"bags": [[1, 2, 3], [], [4, 4]], "per_sample_weights": [[0.5, 1.0, 2.0], [],
                                                                    [1.0, -1.5]]}
    with TestClient(create_app(Settings(config=config))) as client:
        listed = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
        assert listed["viaonnx"]["provider"] == "CPUExecutionProvider"
        onnx = client.post("/v1/models/viaonnx/embed", json=body)
        numba = client.post("/v1/models/vianumba/embed", json=body)
    assert onnx.status_code == numba.status_code == 200
    np.testing.assert_allclose(np.array(onnx.json()["embeddings"], np.float32),
                               np.array(numba.json()["embeddings"], np.float32), rtol=1e-6,
                               atol=1e-6)


def test_a_reload_loads_what_changed_and_unloads_what_left(tmp_path: Path) -> None:
    from dataclasses import replace

    from service.config import checkpoint_stamp, config_changes

    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.npy").write_bytes(b"x")
    a, b, c = (ModelSpec(name=n, checkpoint=tmp_path / f"{n}.npy") for n in "abc")
    served = {"a": a, "b": b, "gone": ModelSpec(name="gone")}
    stamps = {name: checkpoint_stamp(spec) for name, spec in served.items()}
    assert config_changes([a, b], served, stamps, {"a", "b", "gone"}) == ([], ["gone"])
    assert config_changes([a, replace(b, mode="sum"), c], served, stamps,
                          {"a", "b"}) == (["b", "c"], [])
    staged = tmp_path / "staged"
    staged.write_bytes(b"new")
    staged.replace(tmp_path / "a.npy")  # rewritten: a new file under the same name
    assert config_changes([a, b], served, stamps, {"a", "b"}) == (["a"], [])
    assert config_changes([a, b], served, stamps, {"b"}) == (["a"], [])  # unloaded: loads


def test_every_refused_input_counts_once_as_invalid(client: TestClient) -> None:
    # Found while parsing (a float id, an unknown field, a KServe shape) or while
    # validating (an id past the table): each one invalid request, never two.
    client.post("/v1/models/items/embed", json={"bags": [[1, 2.5]]})
    client.post("/v1/models/items/embed", json={"bags": [[1]], "colour": "red"})
    client.post("/v1/models/items/embed", json={"bags": [[99]]})
    client.post("/v2/models/items/infer", json={"inputs": [{"name": "input", "shape": [1],
                                                            "datatype": "FP32", "data": [1]}]})
    # The OpenAI route names its model in the body: counted once it is submitted to it.
    client.post("/v1/embeddings", json={"model": "items", "input": [[99]]})
    client.post("/v1/models/items/embed", json={"bags": [[1]]})
    client.post("/v1/models/nowhere/embed", json={"bags": [[1]]})  # 404: no model to count
    text = client.get("/metrics").text
    assert 'bagserve_requests_total{model="items",outcome="invalid"} 5.0' in text
    assert 'bagserve_requests_total{model="items",outcome="ok"} 1.0' in text
