"""Realistic traffic for a bagserve server, for users' load tests.

    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000 --headless -u 64 -r 16 -t 1m

Each simulated client picks a served model (``BAGSERVE_MODEL``, else the first one
``GET /v1/models`` lists), then sends bags whose lengths vary (geometric, mean ~12,
capped at 256) of ids drawn from a Zipf-skewed popularity over the table (a few rows
are hot, most are cold, as in recommendation and text traffic), over a mix of protocols:
native JSON (most), native base64 and raw bytes, OpenAI-compatible, KServe v2 JSON and
binary. A response counts as a failure unless it is a 200 with one row per bag.
"""

from __future__ import annotations

import os

import numpy as np
import orjson
from locust import FastHttpUser, between, task


class BagUser(FastHttpUser):
    wait_time = between(0.0, 0.01)

    def on_start(self) -> None:
        models = self.client.get("/v1/models").json()["data"]
        wanted = os.environ.get("BAGSERVE_MODEL")
        model = next(m for m in models if wanted in (None, m["id"]))
        self.model, self.rows, self.dim = model["id"], model["rows"], model["dim"]
        self.rng = np.random.default_rng()
        # Zipf popularity over a shuffled id order: hot rows are spread over the table.
        ranks = np.arange(1, self.rows + 1, dtype=np.float64)
        weights = ranks ** -1.1
        self.popularity = weights / weights.sum()
        self.order = self.rng.permutation(self.rows)

    def _bags(self, count: int) -> list[list[int]]:
        lengths = np.minimum(self.rng.geometric(1 / 12, count), 256)
        ids = self.order[self.rng.choice(self.rows, int(lengths.sum()), p=self.popularity)]
        bounds = np.concatenate(([0], np.cumsum(lengths)))
        return [ids[a:b].tolist() for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    def _check(self, response: object, bags: int, rows: int) -> None:
        if rows != bags:
            response.failure(f"{rows} rows for {bags} bags")  # type: ignore[attr-defined]

    @task(6)
    def native_json(self) -> None:
        bags = self._bags(int(self.rng.integers(1, 9)))
        with self.client.post(f"/v1/models/{self.model}/embed", json={"bags": bags},
                              name="native json", catch_response=True) as response:
            if response.status_code == 200:
                self._check(response, len(bags), len(response.json()["embeddings"]))

    @task(1)
    def native_base64(self) -> None:
        bags = self._bags(int(self.rng.integers(1, 33)))
        body = {"bags": bags, "encoding": "base64"}
        with self.client.post(f"/v1/models/{self.model}/embed", json=body,
                              name="native base64", catch_response=True) as response:
            if response.status_code == 200:
                self._check(response, len(bags), len(response.json()["embeddings"]))

    @task(1)
    def native_raw(self) -> None:
        bags = self._bags(64)
        with self.client.post(f"/v1/models/{self.model}/embed", json={"bags": bags},
                              headers={"Accept": "application/octet-stream"},
                              name="native raw", catch_response=True) as response:
            if response.status_code == 200:
                self._check(response, len(bags), len(response.content) // (4 * self.dim))

    @task(2)
    def openai(self) -> None:
        bags = self._bags(int(self.rng.integers(1, 5)))
        body = {"model": self.model, "input": bags, "encoding_format": "base64"}
        with self.client.post("/v1/embeddings", json=body, name="openai",
                              catch_response=True) as response:
            if response.status_code == 200:
                self._check(response, len(bags), len(response.json()["data"]))

    @task(1)
    def kserve_json(self) -> None:
        bags = self._bags(int(self.rng.integers(1, 9)))
        ids = [i for bag in bags for i in bag]
        offsets = np.cumsum([0] + [len(b) for b in bags[:-1]]).tolist()
        body = {"inputs": [
            {"name": "indices", "shape": [len(ids)], "datatype": "INT64", "data": ids},
            {"name": "offsets", "shape": [len(offsets)], "datatype": "INT64",
             "data": offsets}]}
        with self.client.post(f"/v2/models/{self.model}/infer", json=body,
                              name="kserve json", catch_response=True) as response:
            if response.status_code == 200:
                self._check(response, len(bags), response.json()["outputs"][0]["shape"][0])

    @task(1)
    def kserve_binary(self) -> None:
        bags = self._bags(256)
        ids = np.array([i for bag in bags for i in bag], dtype="<i8")
        offsets = np.cumsum([0] + [len(b) for b in bags[:-1]]).astype("<i8")
        header = orjson.dumps({"inputs": [
            {"name": "indices", "shape": [ids.size], "datatype": "INT64",
             "parameters": {"binary_data_size": ids.nbytes}},
            {"name": "offsets", "shape": [offsets.size], "datatype": "INT64",
             "parameters": {"binary_data_size": offsets.nbytes}}],
            "parameters": {"binary_data_output": True}})
        with self.client.post(f"/v2/models/{self.model}/infer",
                              data=header + ids.tobytes() + offsets.tobytes(),
                              headers={"Inference-Header-Content-Length": str(len(header))},
                              name="kserve binary", catch_response=True) as response:
            if response.status_code == 200:
                length = int(response.headers["Inference-Header-Content-Length"])
                self._check(response, len(bags),
                            (len(response.content) - length) // (4 * self.dim))
