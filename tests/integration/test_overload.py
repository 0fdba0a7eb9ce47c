"""A flood at several times capacity against a real server: every admitted request is
answered correctly within the deadline, the rest get 429 at once, memory stays bounded."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import numpy as np

from models import EmbeddingBag
from service.registry import demo_table
from tests.integration.conftest import start_server


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def _flood(url: str, seconds: float, clients: int) -> list[tuple[int, float, bool]]:
    engine = EmbeddingBag.from_pretrained(demo_table(), mode="mean")
    results: list[tuple[int, float, bool]] = []
    stop = time.monotonic() + seconds

    async def client(seed: int) -> None:
        rng = np.random.default_rng(seed)
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            while time.monotonic() < stop:
                bags = rng.integers(0, 10_000, (256, 32))
                started = time.monotonic()
                response = await http.post("/v1/models/demo/embed",
                                           json={"bags": bags.tolist()})
                elapsed = time.monotonic() - started
                correct = response.status_code != 200 or np.array_equal(
                    np.array(response.json()["embeddings"], np.float32), engine(bags))
                results.append((response.status_code, elapsed, correct))

    await asyncio.gather(*(client(seed) for seed in range(clients)))
    return results


def test_flood_gets_429s_never_timeouts_or_wrong_answers(tmp_path: Path) -> None:
    # A small queue (about 4 requests of 256 bags) and a generous deadline.
    server = start_server(tmp_path, env={"BAGSERVE_MAX_QUEUE_BAGS": "1024",
                                         "BAGSERVE_MAX_BATCH_BAGS": "1024",
                                         "BAGSERVE_MAX_BAGS_PER_REQUEST": "256",
                                         "BAGSERVE_REQUEST_TIMEOUT_S": "10"})
    try:
        rss_before = _rss_mib(server.process.pid)
        results = asyncio.run(_flood(server.url, seconds=5, clients=48))
        rss_after = _rss_mib(server.process.pid)
        statuses = [status for status, _, _ in results]
        assert set(statuses) <= {200, 429}, set(statuses)
        assert statuses.count(200) > 20 and statuses.count(429) > 20, (
            statuses.count(200), statuses.count(429))
        assert all(correct for _, _, correct in results)
        admitted = sorted(elapsed for status, elapsed, _ in results if status == 200)
        assert admitted[-1] < 10  # within the deadline
        rejected = sorted(elapsed for status, elapsed, _ in results if status == 429)
        assert rejected[len(rejected) // 2] < 0.5  # refused at once, not queued
        assert rss_after - rss_before < 200, (rss_before, rss_after)  # bounded queue
        assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200
    finally:
        assert server.stop() == 0
