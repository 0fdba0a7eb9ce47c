"""Load scenarios shared by the tests (which assert on them) and
benchmarks/reliability.py (which reports them in RELIABILITY.md)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from models import EmbeddingBag
from service.registry import demo_table
from tests.integration.conftest import Server


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


@dataclass
class Outcomes:
    """What clients saw: a status (or ``lost`` / ``refused``) and latency per request."""

    statuses: Counter[str] = field(default_factory=Counter)
    latencies: dict[str, list[float]] = field(default_factory=dict)
    wrong: int = 0

    def add(self, status: str, seconds: float, correct: bool = True) -> None:
        self.statuses[status] += 1
        self.latencies.setdefault(status, []).append(seconds)
        self.wrong += not correct

    def quantile(self, status: str, q: float) -> float:
        values = sorted(self.latencies.get(status, [0.0]))
        return values[int(q * (len(values) - 1))]


#: Server settings for floods: a queue of about four 256-bag requests, a 10 s deadline.
FLOOD_ENV = {"BAGSERVE_MAX_QUEUE_BAGS": "1024", "BAGSERVE_MAX_BATCH_BAGS": "1024",
             "BAGSERVE_MAX_BAGS_PER_REQUEST": "256", "BAGSERVE_REQUEST_TIMEOUT_S": "10"}


def _demo_engine() -> EmbeddingBag:
    return EmbeddingBag.from_pretrained(demo_table(), mode="mean")


def _correct(response: httpx.Response, ids: np.ndarray, engine: EmbeddingBag) -> bool:
    """Non-200 answers carry no rows; a 200 must equal the engine's rows exactly."""
    return response.status_code != 200 or np.array_equal(
        np.array(response.json()["embeddings"], np.float32), engine(ids))


def flood(server: Server, *, seconds: float, clients: int, bags: int) -> Outcomes:
    """``clients`` async clients post ``bags`` x 32 random ids to the demo model as fast
    as they can for ``seconds``; every 200 is checked against the engine."""
    engine = _demo_engine()
    outcomes = Outcomes()
    stop = time.monotonic() + seconds

    async def client(seed: int) -> None:
        rng = np.random.default_rng(seed)
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            while time.monotonic() < stop:
                ids = rng.integers(0, 10_000, (bags, 32))
                started = time.monotonic()
                try:
                    response = await http.post("/v1/models/demo/embed",
                                               json={"bags": ids.tolist()})
                except httpx.TransportError:
                    outcomes.add("lost", time.monotonic() - started)
                    continue
                outcomes.add(str(response.status_code), time.monotonic() - started,
                             _correct(response, ids, engine))

    async def run() -> None:
        await asyncio.gather(*(client(seed) for seed in range(clients)))

    asyncio.run(run())
    return outcomes


def sigterm_under_load(server: Server, *, clients: int, after_s: float) -> tuple[Outcomes,
                                                                                 int]:
    """Clients post 64-bag requests until the server drains; SIGTERM after ``after_s``.
    Returns what they saw (``refused``: the connection closed before admission) and the
    server's exit code."""
    engine = _demo_engine()
    outcomes = Outcomes()
    stop = threading.Event()

    def client(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with httpx.Client(base_url=server.url, timeout=30) as http:
            while not stop.is_set():
                ids = rng.integers(0, 10_000, (64, 32))
                started = time.monotonic()
                try:
                    response = http.post("/v1/models/demo/embed", json={"bags": ids.tolist()})
                except httpx.TransportError:
                    outcomes.add("refused", time.monotonic() - started)
                    return
                outcomes.add(str(response.status_code), time.monotonic() - started,
                             _correct(response, ids, engine))
                if response.status_code == 503:
                    return

    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(clients)]
    for thread in threads:
        thread.start()
    time.sleep(after_s)
    code = server.stop(timeout=60)
    stop.set()
    for thread in threads:
        thread.join(30)
    return outcomes, code
