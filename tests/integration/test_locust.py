"""The users' load-test kit runs headless against a real server without failures."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

from tests.integration.conftest import Server

ROOT = Path(__file__).parent.parent.parent


def test_locustfile_runs_10s_without_failures(server: Server, tmp_path: Path) -> None:
    result = subprocess.run(
        [str(Path(sys.executable).parent / "locust"), "-f", str(ROOT / "loadtest" /
                                                                "locustfile.py"),
         "--host", server.url, "--headless", "-u", "16", "-r", "16", "-t", "10s",
         "--csv", str(tmp_path / "run"), "--only-summary", "--exit-code-on-error", "1"],
        capture_output=True, text=True, timeout=120, env={"BAGSERVE_MODEL": "weighted",
                                                          "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with (tmp_path / "run_stats.csv").open() as file:
        rows = {row["Name"]: row for row in csv.DictReader(file)}
    total = rows["Aggregated"]
    assert int(total["Request Count"]) > 100
    assert int(total["Failure Count"]) == 0
    names = {"native json", "native base64", "native raw", "openai", "kserve json",
             "kserve binary"}
    assert names <= set(rows), set(rows)
