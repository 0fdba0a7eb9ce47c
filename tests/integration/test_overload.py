"""A flood at several times capacity against a real server: every admitted request is
answered correctly within the deadline, the rest get 429, memory stays bounded."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.integration.conftest import start_server
from tests.integration.scenarios import FLOOD_ENV, flood, rss_mib


def test_flood_gets_429s_never_timeouts_or_wrong_answers(tmp_path: Path) -> None:
    server = start_server(tmp_path, env=FLOOD_ENV)
    try:
        rss_before = rss_mib(server.process.pid)
        seen = flood(server, seconds=5, clients=48, bags=256)
        rss_after = rss_mib(server.process.pid)
        assert set(seen.statuses) <= {"200", "429"}, seen.statuses
        assert seen.statuses["200"] > 20 and seen.statuses["429"] > 20, seen.statuses
        assert seen.wrong == 0
        assert seen.quantile("200", 1.0) < 10  # every admitted request within the deadline
        assert seen.quantile("429", 0.5) < seen.quantile("200", 0.5)  # refused sooner
        assert rss_after - rss_before < 200, (rss_before, rss_after)  # bounded queue
        assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200
    finally:
        assert server.stop() == 0
