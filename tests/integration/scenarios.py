"""Load scenarios shared by the tests (which assert on them) and
benchmarks/reliability.py (which reports them in RELIABILITY.md)."""

from __future__ import annotations

import asyncio
import os
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


def pattern_table(path: Path, rows: int, dim: int, version: int) -> None:
    """Write ``path`` (.npy, memory-mapped) with row ``i`` column ``j`` =
    ``version + ((31 i + j) mod 97) / 97``: two versions differ in every value, and a
    client can compute any bag's sum without the table."""
    table = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, dim))
    columns = np.arange(dim)
    for start in range(0, rows, 1 << 16):
        ids = np.arange(start, min(rows, start + (1 << 16)))
        table[start : start + ids.size] = version + ((31 * ids[:, None] + columns) % 97) / 97
    table.flush()
    del table


def pattern_sum(ids: np.ndarray, dim: int, version: int) -> np.ndarray:
    """What :func:`pattern_table` of ``version`` pools for one bag ``ids`` (sum mode)."""
    rows = version + ((31 * ids[:, None] + np.arange(dim)) % 97) / 97
    return rows.astype(np.float32).sum(axis=0, dtype=np.float64)


@dataclass
class SwapOutcome:
    """What clients saw while a model was swapped between two table versions."""

    statuses: Counter[str] = field(default_factory=Counter)
    #: Answers by the table they matched (``0``/``1``), or ``wrong`` for neither.
    matched: Counter[str] = field(default_factory=Counter)
    versions: Counter[str] = field(default_factory=Counter)
    swaps: list[tuple[int, str]] = field(default_factory=list)
    rss_before_mib: float = 0.0
    rss_after_mib: float = 0.0


def processes_rss_mib(pid: int) -> float:
    """VmRSS of ``pid`` and its children (workers), summed."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return rss_mib(pid) + sum(rss_mib(int(child)) for child in children)


def swap_under_load(server: Server, folder: Path, *, rows: int, dim: int, seconds: float,
                    clients: int, swaps: int, corrupt_at: int | None = None) -> SwapOutcome:
    """``clients`` threads post 8-id bags to model ``m`` (sum) over ``folder/table.npy``
    while it is swapped ``swaps`` times between ``v0.npy`` and ``v1.npy`` (a hard link
    renamed over the served name, then ``POST .../load``), evenly over ``seconds``. Swap
    number ``corrupt_at`` first tries a corrupt file (it must fail and change nothing).
    Every 200 is checked against both versions."""
    outcome = SwapOutcome()
    stop = threading.Event()
    lock = threading.Lock()

    def client(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with httpx.Client(base_url=server.url, timeout=60) as http:
            while not stop.is_set():
                ids = rng.integers(0, rows, 8)
                try:
                    response = http.post("/v1/models/m/embed", json={"bags": [ids.tolist()]})
                except httpx.TransportError:
                    with lock:
                        outcome.statuses["lost"] += 1
                    continue
                status = str(response.status_code)
                match = "-"
                if response.status_code == 200:
                    got = np.array(response.json()["embeddings"][0], np.float64)
                    match = next((str(v) for v in (0, 1) if np.allclose(
                        got, pattern_sum(ids, dim, v), rtol=1e-5, atol=1e-4)), "wrong")
                with lock:
                    outcome.statuses[status] += 1
                    if match != "-":
                        outcome.matched[match] += 1
                        outcome.versions[response.headers.get("X-Model-Version", "?")] += 1

    def swap_to(source: str) -> None:
        link = folder / ".staged.npy"
        link.unlink(missing_ok=True)
        os.link(folder / source, link)
        link.replace(folder / "table.npy")

    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(clients)]
    for thread in threads:
        thread.start()
    time.sleep(seconds / (swaps + 1))
    outcome.rss_before_mib = processes_rss_mib(server.process.pid)
    for number in range(swaps):
        if number == corrupt_at:
            swap_to("corrupt.npy")
            response = httpx.post(f"{server.url}/v2/repository/models/m/load", timeout=120)
            outcome.swaps.append((response.status_code, "corrupt"))
        source = f"v{(number + 1) % 2}.npy"
        swap_to(source)
        response = httpx.post(f"{server.url}/v2/repository/models/m/load", timeout=120)
        outcome.swaps.append((response.status_code, source))
        time.sleep(seconds / (swaps + 1))
    stop.set()
    for thread in threads:
        thread.join()
    time.sleep(2)  # the last old version retires once its requests are answered
    outcome.rss_after_mib = processes_rss_mib(server.process.pid)
    return outcome
