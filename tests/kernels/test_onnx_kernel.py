"""The ONNX Runtime kernel: provider detection, fp16 tables, determinism, buckets, CUDA."""

from __future__ import annotations

import numpy as np
import pytest

from kernels import BackendError, NumpyKernel, TableSpec, make_kernel, onnx_kernel
from kernels.numba_kernel import NumbaKernel
from kernels.onnx_graph import padded_model, scanned_model
from kernels.onnx_kernel import CPU, CUDA, OnnxKernel, _buckets, cuda_status
from kernels.storage import store
from models.renorm import renormed_table

CUDA_USABLE, CUDA_REASON = cuda_status()
needs_cuda = pytest.mark.skipif(not CUDA_USABLE, reason=f"CUDA not usable: {CUDA_REASON}")


def _devices() -> list[object]:
    return ["cpu", pytest.param("cuda", marks=needs_cuda)]


def _batch(seed: int, rows: int = 2000, bags: int = 300, max_len: int = 30
           ) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, max_len, bags)
    offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)
    return rng.integers(0, rows, int(offsets[-1])).astype(np.int64), offsets


@pytest.fixture(scope="module")
def table() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((2000, 24)).astype(np.float32)


def test_provider_names_what_really_runs(table: np.ndarray) -> None:
    kernel = OnnxKernel(TableSpec(table, "sum"))
    assert kernel.provider == (CUDA if CUDA_USABLE else CPU)
    assert OnnxKernel(TableSpec(table, "sum"), device="cpu").provider == CPU
    if not CUDA_USABLE:
        assert CUDA_REASON  # says why


@pytest.mark.parametrize("device", _devices())
def test_self_test_passes_where_the_graph_is_right(device: str) -> None:
    # cuda_status() trusts this check; a graph layout change must keep it true.
    assert onnx_kernel._self_test(device)


@pytest.mark.skipif(CUDA_USABLE, reason="CUDA is usable here")
def test_demanding_cuda_without_it_fails_loudly(table: np.ndarray) -> None:
    with pytest.raises(BackendError, match="device='cuda' requested but CUDA is not usable"):
        make_kernel(TableSpec(table, "sum"), "onnx", device="cuda")


@pytest.mark.skipif(CUDA_USABLE, reason="CUDA is usable here")
def test_auto_backend_without_cuda_is_the_fused_cpu_kernel(table: np.ndarray) -> None:
    assert make_kernel(TableSpec(table, "mean"), "auto").name == "numba"


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_thread_count_never_changes_results(table: np.ndarray, mode: str) -> None:
    indices, offsets = _batch(1)
    spec = TableSpec(table, mode)  # type: ignore[arg-type]
    one = OnnxKernel(spec, device="cpu", num_threads=1)(indices, offsets)
    two = OnnxKernel(spec, device="cpu", num_threads=2)(indices, offsets)
    np.testing.assert_array_equal(one, two)
    np.testing.assert_array_equal(one, NumbaKernel(spec)(indices, offsets))


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_float16_table_accumulates_in_float32(table: np.ndarray, mode: str) -> None:
    indices, offsets = _batch(2)
    kernel = OnnxKernel(TableSpec(table, mode, 5), device="cpu",  # type: ignore[arg-type]
                        table_dtype="float16")
    out = kernel(indices, offsets)
    assert out.dtype == np.float32
    rounded = TableSpec(table.astype(np.float16).astype(np.float32), mode, 5)  # type: ignore[arg-type]
    np.testing.assert_allclose(out, NumbaKernel(rounded)(indices, offsets), rtol=1e-6,
                               atol=1e-5)


def test_one_long_bag_splits_into_buckets(table: np.ndarray) -> None:
    lengths = np.array([1, 2, 0, 3, 900, 2, 1], dtype=np.int64)
    groups = _buckets(lengths)
    assert len(groups) > 1
    np.testing.assert_array_equal(np.sort(np.concatenate(groups)), [0, 1, 3, 4, 5, 6])
    offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)
    indices = np.random.default_rng(3).integers(0, 2000, int(offsets[-1])).astype(np.int64)
    spec = TableSpec(table, "mean")
    np.testing.assert_array_equal(OnnxKernel(spec, device="cpu")(indices, offsets),
                                  NumbaKernel(spec)(indices, offsets))


def test_even_bags_run_in_one_group() -> None:
    assert len(_buckets(np.full(64, 32, dtype=np.int64))) == 1
    assert _buckets(np.zeros(3, dtype=np.int64)) == []


@pytest.mark.parametrize(("mode", "weighted"),
                         [("sum", False), ("sum", True), ("mean", False), ("max", False)])
def test_kernel_graph_holds_only_ops_with_cuda_kernels_and_no_table(mode: str,
                                                                    weighted: bool) -> None:
    model = padded_model(mode, 128, np.float16, sentinel=10, padding_idx=3,
                         weighted=weighted)
    ops = {node.op_type for node in model.graph.node}
    # No Shape/Range subgraphs: onnxruntime pins those to the CPU, which
    # disable_cpu_ep_fallback turns into a load failure on CUDA.
    assert ops <= {"Unsqueeze", "Add", "Less", "Where", "Gather", "Equal", "Not", "And",
                   "Transpose", "Cast", "Mul", "ReduceSum", "ReduceMax", "Max", "Div"}, ops
    # The table is a bound input, so tables over protobuf's 2 GB limit work.
    assert "table" in {i.name for i in model.graph.input}
    assert model.ByteSize() < 2000


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_cpu_graph_scans_the_padded_tail_over_steps(mode: str) -> None:
    model = scanned_model(mode, 64, np.float32, weighted=mode == "sum")
    (scan,) = model.graph.node
    assert scan.op_type == "Scan"
    body = next(a.g for a in scan.attribute if a.name == "body")
    padded = padded_model(mode, 64, np.float32, sentinel=5, weighted=mode == "sum")
    # The padded graph lays its ids out on the device first, then runs the same tail.
    body_ops = [n.op_type for n in body.node]
    assert [n.op_type for n in padded.graph.node][-len(body_ops):] == body_ops
    assert [i.name for i in model.graph.input][0] == "table"  # bound, never an initializer
    assert model.ByteSize() < 2000


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("storage", ["float32", "float16", "int8", "int4", "int4-max_norm",
                                     "float16-max_norm"])
@pytest.mark.parametrize("bags", ["ragged", "even-7", "one"])
@pytest.mark.parametrize(("mode", "padding_idx", "weighted"),
                         [("sum", None, False), ("sum", 7, True), ("mean", 7, False),
                          ("max", None, False), ("max", 7, False)])
def test_padded_graph_matches_numba_and_leaves_the_callers_arrays(
        device: str, storage: str, bags: str, mode: str, padding_idx: int | None,
        weighted: bool) -> None:
    # The CUDA graph (ids [B, L], transposed in the graph) also runs on the CPU EP: even
    # bags hand over the caller's ids block as it is, ragged ones are taken row by row.
    rng = np.random.default_rng(8)
    lengths = {"ragged": np.concatenate((rng.integers(0, 13, 60), [0, 40])),
               "even-7": np.full(50, 7), "one": np.array([5])}[bags]
    offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)
    indices = rng.integers(0, 300, int(offsets[-1])).astype(np.int64)
    indices[::4] = 7
    weights = rng.standard_normal(indices.size).astype(np.float32) if weighted else None
    storage, _, renorm = storage.partition("-")
    stored = store(rng.standard_normal((300, 9)).astype(np.float32), storage)  # type: ignore[arg-type]
    if renorm:  # a factor per row, multiplied in the graph
        stored = renormed_table(stored, 2.0, 2.0)
        assert stored.row_scale is not None
    spec = TableSpec(stored, mode, padding_idx)  # type: ignore[arg-type]
    before = (indices.copy(), offsets.copy(), None if weights is None else weights.copy())
    kernel = OnnxKernel(spec, device=device, graph="padded")
    out = kernel(indices, offsets, weights)
    np.testing.assert_allclose(out, NumbaKernel(spec)(indices, offsets, weights),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(indices, before[0])
    np.testing.assert_array_equal(offsets, before[1])
    if weights is not None:
        np.testing.assert_array_equal(weights, before[2])


def test_graph_choice_is_checked(table: np.ndarray) -> None:
    with pytest.raises(ValueError, match="graph must be 'padded', 'scanned' or None"):
        OnnxKernel(TableSpec(table, "sum"), device="cpu", graph="flat")  # type: ignore[arg-type]


@pytest.mark.parametrize("step_bytes", [1, 3000, 1 << 20])
@pytest.mark.parametrize("bags", ["ragged", "even-5", "even-20"])
@pytest.mark.parametrize(("mode", "padding_idx", "weighted"),
                         [("sum", None, False), ("sum", 7, True), ("mean", 7, False),
                          ("max", None, False), ("max", 7, False)])
def test_cpu_steps_shares_and_padding_bags_match_numba(
        table: np.ndarray, monkeypatch: pytest.MonkeyPatch, step_bytes: int, bags: str,
        mode: str, padding_idx: int | None, weighted: bool) -> None:
    # Tiny steps force many Scan steps, uneven shares and padding bags in the last step;
    # bags of 9-16 ids take the sum path padded to 17 rows; even bags read their ids as
    # one transposed block.
    monkeypatch.setattr(onnx_kernel, "_CPU_STEP_BYTES", step_bytes)
    rng = np.random.default_rng(6)
    lengths = (np.concatenate((rng.integers(0, 17, 97), [0, 12, 16, 9])) if bags == "ragged"
               else np.full(101, int(bags.split("-")[1])))
    offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)
    indices = rng.integers(0, 2000, int(offsets[-1])).astype(np.int64)
    indices[::5] = 7
    weights = rng.standard_normal(indices.size).astype(np.float32) if weighted else None
    spec = TableSpec(table, mode, padding_idx)  # type: ignore[arg-type]
    expected = NumbaKernel(spec)(indices, offsets, weights)
    for threads in (1, 3):
        out = OnnxKernel(spec, device="cpu", num_threads=threads)(indices, offsets, weights)
        if weighted:  # numba fuses weight * row + sum into one FMA (torch does too)
            np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
        else:
            np.testing.assert_array_equal(out, expected)


def test_weight_view_shares_the_uploaded_table(table: np.ndarray) -> None:
    kernel = OnnxKernel(TableSpec(table, "sum"), device="cpu")
    np.testing.assert_array_equal(kernel.spec.weight, table)
    assert not np.shares_memory(kernel.spec.weight, table)  # a copy with the sentinel row


@needs_cuda
@pytest.mark.parametrize("table_dtype", [None, "float16"])
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_cuda_matches_cpu(table: np.ndarray, mode: str, table_dtype: str | None) -> None:
    indices, offsets = _batch(4)
    weights = np.random.default_rng(5).standard_normal(indices.size).astype(np.float32)
    spec = TableSpec(table, mode)  # type: ignore[arg-type]
    cuda = OnnxKernel(spec, device="cuda", table_dtype=table_dtype)
    cpu = OnnxKernel(spec, device="cpu", table_dtype=table_dtype)
    assert cuda.provider == CUDA
    np.testing.assert_allclose(cuda(indices, offsets), cpu(indices, offsets), rtol=1e-5,
                               atol=1e-5)
    if mode == "sum":
        np.testing.assert_allclose(cuda(indices, offsets, weights),
                                   cpu(indices, offsets, weights), rtol=1e-5, atol=1e-5)


@needs_cuda
def test_cuda_golden_cases_match_torch() -> None:
    # Every golden case (made by PyTorch) through the CUDA EP; the GPU reduces in its own
    # order, so results hold to the bag's magnitude rather than bit for bit.
    from models import EmbeddingBag, flatten_inputs
    from tests.conftest import assert_close_to_bag, load_golden

    for case in load_golden():
        bag = EmbeddingBag.from_pretrained(case.arrays["weight"], **case.options)
        kernel = OnnxKernel(TableSpec(bag.weight, bag.mode, bag.padding_idx), device="cuda")
        assert kernel.provider == CUDA, case.name
        batch = flatten_inputs(*case.call, num_embeddings=bag.num_embeddings, mode=bag.mode,
                               include_last_offset=bag.include_last_offset,
                               dtype=bag.weight.dtype)
        actual = kernel(batch.indices, batch.offsets, batch.per_sample_weights)
        expected = case.arrays["expected"]
        assert_close_to_bag(actual, expected, scale=np.abs(expected) + 1.0, rtol=1e-5)


@pytest.mark.parametrize("lengths", [[1, 1, 1], [4], [2, 2]])
def test_padding_never_writes_into_the_callers_ids(lengths: list[int]) -> None:
    table = np.arange(40, dtype=np.float32).reshape(10, 4)
    kernel = OnnxKernel(TableSpec(table, "sum", padding_idx=3), device="cpu")
    offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)
    ids = np.full(int(offsets[-1]), 3, np.int64)
    ids[0] = 1
    before = ids.copy()
    kernel(ids, offsets)
    np.testing.assert_array_equal(ids, before)


@pytest.mark.parametrize("storage", ["bfloat16", "int8", "int4"])
def test_stored_tables_run_through_the_onnx_graphs(storage: str) -> None:
    rng = np.random.default_rng(21)
    stored = store(rng.standard_normal((60, 11)).astype(np.float32), storage)  # type: ignore[arg-type]
    ids = rng.integers(0, 60, 40).astype(np.int64)
    offsets = np.array([0, 5, 5, 17, 40], np.int64)
    for mode in ("sum", "mean", "max"):
        spec = TableSpec(stored, mode)  # type: ignore[arg-type]
        kernel = make_kernel(spec, "onnx", device="cpu")
        assert kernel.spec.table is stored  # no float copy of the table is kept
        np.testing.assert_allclose(kernel(ids, offsets), NumpyKernel(spec)(ids, offsets),
                                   rtol=1e-6, atol=1e-6)


def test_auto_serves_quantized_tables_on_the_cpu_kernel() -> None:
    stored = store(np.ones((8, 8), np.float32), "int8")
    assert make_kernel(TableSpec(stored, "sum"), "auto").name == "numba"
