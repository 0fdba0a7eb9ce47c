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
