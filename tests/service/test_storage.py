"""Half and quantized tables through the service: config, loading without widening,
prepacked checkpoints, answers, and what /v1/models, KServe metadata and metrics report."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from kernels.storage import store
from models import CheckpointError, EmbeddingBag, load_table, write_safetensors
from service.app import create_app
from service.config import ConfigError, ModelSpec, load_config
from service.registry import ModelLoadError, load_model
from service.settings import Settings
from tests.service.conftest import table

FIXTURES = Path(__file__).parents[1] / "golden" / "quantized.npz"


def _config(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "models.toml"
    path.write_text(body)
    return path


def test_each_storage_is_served_and_reported(tmp_path: Path) -> None:
    weight = table(3, rows=64, dim=16)
    write_safetensors(tmp_path / "t.safetensors", {"weight": weight})
    body = "".join(f'[[models]]\nname = "{s}"\ncheckpoint = "t.safetensors"\nmode = "sum"\n'
                   f'table_dtype = "{s}"\n\n'
                   for s in ("float32", "float16", "bfloat16", "int8", "int4"))
    with TestClient(create_app(Settings(config=_config(tmp_path, body)))) as client:
        listed = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
        metrics = client.get("/metrics").text
        for storage in ("float32", "float16", "bfloat16", "int8", "int4"):
            stored = store(weight, storage)  # type: ignore[arg-type]
            assert listed[storage]["table_dtype"] == storage
            assert listed[storage]["table_bytes"] == stored.nbytes
            assert listed[storage]["dtype"] == "float32"
            assert (f'bagserve_model_table_bytes{{model="{storage}",table_dtype="{storage}"}} '
                    f"{float(stored.nbytes)}") in metrics
            meta = client.get(f"/v2/models/{storage}").json()
            assert meta["parameters"] == {"table_dtype": storage, "table_bytes": stored.nbytes}
            answer = client.post(f"/v1/models/{storage}/embed",
                                 json={"bags": [[1, 2, 3], [5]]}).json()["embeddings"]
            decoded = stored.to_float()
            np.testing.assert_allclose(np.array(answer, np.float32),
                                       [decoded[[1, 2, 3]].sum(axis=0), decoded[5]],
                                       rtol=1e-6, atol=1e-5)


def test_prepacked_checkpoints_are_served_as_they_are(tmp_path: Path) -> None:
    with np.load(FIXTURES) as archive:
        packed, expected = archive["wide/byte"], archive["wide/int64/byte_sum"]
        ids, offsets = archive["wide/int64/input"], archive["wide/int64/offsets"]
    write_safetensors(tmp_path / "q.safetensors", {"emb": packed})
    spec = ModelSpec(name="q", checkpoint=tmp_path / "q.safetensors", mode="sum",
                     quantized_format="byte_rowwise", table_dtype="int8")
    model = load_model(spec)
    assert model.bag.table_dtype == "int8"
    np.testing.assert_array_equal(model.bag.table.data, packed)
    np.testing.assert_allclose(model.bag(ids, offsets=offsets), expected, rtol=1e-5, atol=1e-5)


def test_torchrec_codes_with_separate_scales_load(tmp_path: Path) -> None:
    weight = table(4, rows=30, dim=8)
    packed = store(weight, "int8").data
    scale_bias = packed[:, 8:].copy().view(np.float32)
    write_safetensors(tmp_path / "ebc.safetensors", {
        "embedding_bags.t.weight": packed[:, :8].copy(),
        "embedding_bags.t.weight_qscale": scale_bias[:, 0].astype(np.float16),
        "embedding_bags.t.weight_qbias": scale_bias[:, 1].astype(np.float16)})
    loaded = load_table(tmp_path / "ebc.safetensors", "embedding_bags.t.weight",
                        quantized_format="byte_rowwise")
    assert loaded.storage == "int8" and loaded.dim == 8
    np.testing.assert_array_equal(loaded.data[:, :8], packed[:, :8])
    # TorchRec keeps scales and biases in float16: the codes stand for those values.
    scale = scale_bias[:, :1].astype(np.float16).astype(np.float64)
    bias = scale_bias[:, 1:].astype(np.float16).astype(np.float64)
    np.testing.assert_allclose(loaded.to_float(), packed[:, :8] * scale + bias, rtol=1e-6)


@pytest.mark.parametrize(("storage", "quantized_format"),
                         [("int8", "torchrec_int8"), ("int4", "torchrec_int4")])
def test_torchrec_fused_rows_with_scale_and_bias_in_front(tmp_path: Path, storage: str,
                                                          quantized_format: str) -> None:
    # FBGEMM's table-batched inference rows, as TorchRec's quantized EBC state dict holds
    # them unsplit: float16 scale, float16 bias, then the codes.
    dim = 10
    weight = table(6, rows=30, dim=dim)
    packed = store(weight, storage).data  # type: ignore[arg-type]
    width = dim if storage == "int8" else dim // 2
    kind = np.float32 if storage == "int8" else np.float16
    scale_bias = packed[:, width:].copy().view(kind).astype(np.float16)
    fused = np.concatenate([scale_bias.view(np.uint8), packed[:, :width]], axis=1)
    write_safetensors(tmp_path / "qebc.safetensors", {"embedding_bags.t.weight": fused})
    loaded = load_table(tmp_path / "qebc.safetensors", "embedding_bags.t.weight",
                        quantized_format=quantized_format)
    assert loaded.storage == storage and loaded.dim == dim
    codes = packed[:, :width]
    if storage == "int4":  # low nibble first
        codes = np.stack([codes & 15, codes >> 4], axis=-1).reshape(len(codes), -1)
    scale, bias = (scale_bias[:, i : i + 1].astype(np.float64) for i in (0, 1))
    np.testing.assert_allclose(loaded.to_float(), codes * scale + bias, rtol=1e-6)
    expected = (codes * scale + bias)[[1, 2, 29]].sum(axis=0, keepdims=True)
    bag = EmbeddingBag.from_pretrained(loaded, mode="sum")
    np.testing.assert_allclose(bag([1, 2, 29], [0]), expected, rtol=1e-5)
    served = load_model(ModelSpec(name="t", checkpoint=tmp_path / "qebc.safetensors",
                                  tensor="embedding_bags.t.weight", mode="sum",
                                  quantized_format=quantized_format))
    assert served.bag.table_dtype == storage
    np.testing.assert_allclose(served.bag([1, 2, 29], [0]), expected, rtol=1e-5)
    with pytest.raises(CheckpointError, match="a torchrec_int8 table is uint8"):
        prepacked_path = tmp_path / "bad.safetensors"
        write_safetensors(prepacked_path, {"w": np.zeros((3, 4), np.uint8)})
        load_table(prepacked_path, quantized_format="torchrec_int8")


def test_half_checkpoints_keep_their_dtype_without_a_float32_copy(tmp_path: Path) -> None:
    weight = table(5, rows=40, dim=8).astype(np.float16)
    write_safetensors(tmp_path / "h.safetensors", {"weight": weight})
    loaded = load_table(tmp_path / "h.safetensors", table_dtype="float16")
    assert loaded.storage == "float16" and loaded.data.dtype == np.float16
    np.testing.assert_array_equal(loaded.data, weight)
    widened = load_table(tmp_path / "h.safetensors")
    assert widened.storage == "float32"
    np.testing.assert_array_equal(widened.data, weight.astype(np.float32))


def test_bfloat16_torch_checkpoint_stays_bfloat16() -> None:
    path = Path(__file__).parents[1] / "golden" / "checkpoints" / "bfloat16.pt"
    loaded = load_table(path, table_dtype="bfloat16")
    widened = load_table(path)
    assert loaded.storage == "bfloat16" and loaded.data.dtype == np.uint16
    np.testing.assert_array_equal(loaded.to_float(), widened.data)


@pytest.mark.parametrize(("fields", "message"), [
    ('table_dtype = "int2"', "table_dtype must be one of float32, float64, float16, "
                             "bfloat16, int8, int4; got 'int2'"),
    ('quantized_format = "nf4"', "quantized_format must be one of byte_rowwise, "
                                 "4bit_rowwise, torchrec_int8, torchrec_int4; got 'nf4'"),
    ('quantized_format = "4bit_rowwise"\ntable_dtype = "int8"',
     "quantized_format '4bit_rowwise' holds int4 rows; table_dtype 'int8' does not fit it"),
])
def test_bad_storage_config_is_named(tmp_path: Path, fields: str, message: str) -> None:
    body = f'[[models]]\nname = "m"\ncheckpoint = "x.npy"\n{fields}\n'
    with pytest.raises(ConfigError, match=r"models\.toml: models\[0\] \(m\): " +
                       message.replace("(", r"\(").replace(")", r"\)")):
        load_config(_config(tmp_path, body))


def test_a_file_that_cannot_be_the_format_is_refused_at_start_up(tmp_path: Path) -> None:
    path = tmp_path / "f.safetensors"
    write_safetensors(path, {"w": table()})
    with pytest.raises(ModelLoadError, match=r"model 'q' \(.*f\.safetensors\): .*holds a "
                                             r"float table .*not byte_rowwise rows"):
        load_model(ModelSpec(name="q", checkpoint=path, quantized_format="byte_rowwise"))
    write_safetensors(path, {"w": np.zeros((4, 6), np.uint8)})
    with pytest.raises(CheckpointError, match=r"f\.safetensors: a byte_rowwise table is uint8 "
                                              r"\(rows, bytes per row > 8\); got uint8 \[4, 6\]"):
        load_table(path, quantized_format="byte_rowwise")


def test_values_beyond_float16_are_refused_with_the_reason(tmp_path: Path) -> None:
    weight = table()
    weight[7, 0] = 1e6
    write_safetensors(tmp_path / "big.safetensors", {"w": weight})
    with pytest.raises(ModelLoadError, match="table row 7 holds NaN or infinite values as "
                                             "stored in float16"):
        load_model(ModelSpec(name="m", checkpoint=tmp_path / "big.safetensors",
                             table_dtype="float16"))


def test_misread_formats_get_the_right_advice(tmp_path: Path) -> None:
    from models.quantize import write_stored

    quantized = tmp_path / "q.safetensors"
    write_stored(store(table(), "int8"), quantized)
    with pytest.raises(CheckpointError, match=r"holds quantized rows \(weight \(uint8 "
                                              r"\[50, 16\]\)\) and no float table: serve it "
                                              r"with quantized_format = byte_rowwise"):
        load_table(quantized, table_dtype="int8")
    with pytest.raises(CheckpointError, match="was written as byte_rowwise rows .*"
                                              "quantized_format '4bit_rowwise' does not fit"):
        load_table(quantized, quantized_format="4bit_rowwise")
    floats = tmp_path / "f.safetensors"
    write_safetensors(floats, {"weight": table()})
    with pytest.raises(CheckpointError, match=r"holds a float table \(weight \(float32 "
                                              r"\[50, 8\]\)\), not byte_rowwise rows: drop "
                                              "quantized_format"):
        load_table(floats, quantized_format="byte_rowwise")
