"""bagserve next to its peers over HTTP: the bare floor, and the torch + FastAPI server a
competent user would write, with wrk and hey, each number read twice.

    apt-get install wrk hey && pip install torch safetensors
    python benchmarks/bench_peers.py [--duration 5] [--workers 2]

Servers, one at a time on the same port (never sharing the cores): ``bare`` (FastAPI
parsing the same JSON and answering a constant array of the right shape:
``benchmarks/bare_app.py``), bagserve with one worker and with ``--workers``, and
``torch + FastAPI`` (``benchmarks/peer_torch_app.py``: one EmbeddingBag call a request, no
batching) with one and with ``--workers`` uvicorn workers. Table 100,000 x 128 float32,
mean. Workloads: 1 bag and 64 bags of 32 ids a request, JSON, at 1, 16 and 64
connections. wrk rotates among 64 different bodies (no cache flatters anyone); hey sends
one body. Every cell is measured twice, the second pass with the servers in reverse
order. Prints Markdown: requests/s of both passes and the p50 and p99 (ms) of the first.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_load import _start, _stop, scratch  # noqa: E402
from models import write_safetensors  # noqa: E402

ROWS, DIM, IDS, BODIES = 100_000, 128, 32, 64
LUA = """
local bodies = {{}}
for i = 0, {count} - 1 do
  local f = io.open(string.format("{prefix}-%d.json", i), "rb")
  bodies[i + 1] = f:read("*all")
  f:close()
end
local n = 0
request = function()
  n = n % #bodies + 1
  return wrk.format("POST", nil, {{["Content-Type"] = "application/json"}}, bodies[n])
end
"""


def _wrk(url: str, script: Path, connections: int, duration: int
         ) -> tuple[float, float, float]:
    output = subprocess.run(["wrk", "-t", str(min(connections, 2)), "-c", str(connections),
                             "-d", f"{duration}s", "--latency", "-s", str(script), url],
                            capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]

    def quantile(label: str) -> float:
        match = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)\s*$", output, re.M)
        return (float(match.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[match.group(2)]
                if match else float("nan"))

    if re.search(r"Non-2xx or 3xx responses: (\d+)", output):
        raise SystemExit(f"non-2xx answers from {url}:\n{output}")
    return rps, quantile("50"), quantile("99")


def _hey(url: str, body: Path, connections: int, duration: int
         ) -> tuple[float, float, float]:
    output = subprocess.run(["hey", "-z", f"{duration}s", "-c", str(connections), "-m",
                             "POST", "-T", "application/json", "-D", str(body), url],
                            capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
    statuses = re.findall(r"\[(\d+)\]\s+\d+ responses", output)
    if set(statuses) - {"200"}:
        raise SystemExit(f"non-200 answers from {url}:\n{output}")

    def quantile(label: str) -> float:
        match = re.search(rf"{label}% in ([\d.]+) secs", output)
        return float(match.group(1)) * 1e3 if match else float("nan")

    return rps, quantile("50"), quantile("99")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--concurrency", default="1,16,64")
    args = parser.parse_args()
    for tool in ("wrk", "hey"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found: apt-get install {tool}")
    folder = scratch("bagserve-peers-")
    rng = np.random.default_rng(0)
    table = folder / "table.safetensors"
    write_safetensors(table, {"weight": rng.standard_normal((ROWS, DIM), dtype=np.float32)})
    (folder / "models.toml").write_text(f'[[models]]\nname = "items"\ncheckpoint = "{table}"'
                                        '\nmode = "mean"\n')
    scripts, firsts = {}, {}
    for bags in (1, 64):
        prefix = folder / f"bags{bags}"
        for i in range(BODIES):
            (folder / f"bags{bags}-{i}.json").write_bytes(
                orjson.dumps({"bags": rng.integers(0, ROWS, (bags, IDS)).tolist()}))
        scripts[bags] = folder / f"bags{bags}.lua"
        scripts[bags].write_text(LUA.format(count=BODIES, prefix=prefix))
        firsts[bags] = folder / f"bags{bags}-0.json"
    port, python = 8793, sys.executable
    base = f"http://127.0.0.1:{port}"
    uvicorn = [python, "-m", "uvicorn", "--port", str(port), "--log-level", "warning"]
    servers = {
        "bare": (uvicorn + ["benchmarks.bare_app:app"], f"{base}/docs", {}),
        "bagserve": ([str(Path(python).parent / "bagserve"), "serve", "--config",
                      str(folder / "models.toml"), "--port", str(port)],
                     f"{base}/v2/health/ready", {"BAGSERVE_LOG_LEVEL": "warning"}),
        f"bagserve x{args.workers}": (
            [str(Path(python).parent / "bagserve"), "serve", "--config",
             str(folder / "models.toml"), "--port", str(port), "--workers",
             str(args.workers)], f"{base}/v2/health/ready", {"BAGSERVE_LOG_LEVEL": "warning"}),
        "torch + FastAPI": (uvicorn + ["benchmarks.peer_torch_app:app"], f"{base}/docs",
                            {"BAGSERVE_PEER_TABLE": str(table)}),
        f"torch + FastAPI x{args.workers}": (
            uvicorn + ["--workers", str(args.workers), "benchmarks.peer_torch_app:app"],
            f"{base}/docs", {"BAGSERVE_PEER_TABLE": str(table)}),
    }
    levels = [int(c) for c in args.concurrency.split(",")]
    results: dict[tuple[str, str, int, int], list[tuple[float, float, float]]] = {}
    for order in (list(servers), list(reversed(servers))):
        for name in order:
            command, ready, env = servers[name]
            process = _start(command, ready, {**env, "PYTHONPATH": str(ROOT)})
            try:
                for bags in (1, 64):
                    url = f"{base}/v1/models/items/embed"
                    for level in levels:
                        for tool in ("wrk", "hey"):
                            run = (_wrk(url, scripts[bags], level, args.duration)
                                   if tool == "wrk" else
                                   _hey(url, firsts[bags], level, args.duration))
                            results.setdefault((name, tool, bags, level), []).append(run)
            finally:
                _stop(process)
    print(f"# {os.cpu_count()} cores, {args.duration} s a cell, {time.strftime('%Y-%m-%d')}; "
          "req/s of both passes (p50 / p99 ms of the first)")
    for tool in ("wrk", "hey"):
        print(f"\n{tool}:\n")
        print("| workload | conc. | " + " | ".join(servers) + " | bagserve x bare | "
              f"bagserve x torch | bagserve x{args.workers} x torch x{args.workers} |")
        print("|---|---:|" + "---:|" * (len(servers) + 3))
        for bags in (1, 64):
            for level in levels:
                cells, mean = [], {}
                for name in servers:
                    runs = results[(name, tool, bags, level)]
                    mean[name] = sum(r[0] for r in runs) / len(runs)
                    cells.append(" / ".join(f"{r[0]:,.0f}" for r in runs)
                                 + f" ({runs[0][1]:.2f} / {runs[0][2]:.1f})")
                many = f"x{args.workers}"
                ratios = [mean["bagserve"] / mean["bare"],
                          mean["bagserve"] / mean["torch + FastAPI"],
                          mean[f"bagserve {many}"] / mean[f"torch + FastAPI {many}"]]
                print(f"| {bags} bag{'s' if bags > 1 else ''} x {IDS} | {level} | "
                      + " | ".join(cells) + " | " + " | ".join(f"{r:.2f}" for r in ratios)
                      + " |")


if __name__ == "__main__":
    main()
