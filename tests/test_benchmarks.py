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
