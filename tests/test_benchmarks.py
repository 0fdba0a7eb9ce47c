"""The benchmark helpers answer like the service they stand in for."""

from __future__ import annotations

import numpy as np
from fastapi.testclient import TestClient

from benchmarks.bare_app import DIM, app


def test_the_bare_floor_answers_multi_bag_requests() -> None:
    with TestClient(app) as client:
        for bags in (1, 64):
            response = client.post("/v1/models/m/embed", json={"bags": [[1, 2]] * bags})
            assert response.status_code == 200, response.text
            assert np.array(response.json()["embeddings"]).shape == (bags, DIM)


def test_the_collection_benchmark_checks_against_torch_at_small_scale(capsys: object) -> None:
    import pytest

    pytest.importorskip("torch")
    from benchmarks.bench_collection import kernel_rows

    rows = kernel_rows(scale=0.001, threads=1, samples_list=[3], repeats=1)
    assert rows[0]["samples"] == 3 and rows[0]["fused"] > 0


def test_the_torch_made_cases_draw_skewed_calls_and_check_results() -> None:
    import pytest

    torch = pytest.importorskip("torch")
    from benchmarks.bench_kernels import _torch_made_call, _torch_made_cell

    generator = torch.Generator().manual_seed(0)
    table, ids, starts, weights = _torch_made_call(1000, 8, 4000, 6, "geometric", 1.5, True,
                                                   generator)
    lengths = np.diff(np.append(starts.numpy(), ids.numel()))
    assert table.shape == (1000, 8) and weights is not None and weights.shape == ids.shape
    assert (lengths == 0).any() and abs(lengths.mean() - 6) < 0.5
    # Zipf 1.5: the most drawn row takes a large share of the ids.
    counts = np.bincount(ids.numpy(), minlength=1000)
    assert counts.max() > 0.2 * ids.numel()
    for mode in ("sum", "max", "weighted"):
        ms = _torch_made_cell(500, 24, 16, 5, "poisson", 1.1, mode, generator)
        assert set(ms) == {"torch", "api", "kernel"} and min(ms.values()) > 0
