"""Overload: what admitted requests see when more clients come than one process serves.

    apt-get install hey
    python benchmarks/bench_overload.py [--duration 5] [--waits 500,50]

bagserve (one process, 100,000 x 128 float32, mean) under hey with 16 connections (the
reference: saturated, not overloaded), 80 (5x) and 320 (20x), for requests of 1 and of
64 bags of 32 ids, once per ``max_queue_wait_ms``. hey retries at once on 429 (it ignores
Retry-After), the hardest case for refusals. Prints Markdown: sent and answered requests/s,
the share refused with 429, other failures, and the admitted requests' p50 and p99 (from
hey's per-request CSV, so refusals do not flatter them).
"""

from __future__ import annotations

import argparse
import csv
import io
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

ROWS, DIM, IDS = 100_000, 128, 32


def _hey(url: str, body: Path, connections: int, duration: int) -> dict[str, float]:
    output = subprocess.run(["hey", "-z", f"{duration}s", "-c", str(connections), "-m",
                             "POST", "-T", "application/json", "-D", str(body), "-o", "csv",
                             url], capture_output=True, text=True, check=True).stdout
    rows = list(csv.DictReader(io.StringIO(output)))
    latency = np.array([float(r["response-time"]) for r in rows])
    status = np.array([int(r["status-code"]) for r in rows])
    seconds = max(float(r["offset"]) for r in rows)
    ok = status == 200
    return {"sent": len(rows) / seconds, "ok": ok.sum() / seconds,
            "refused": float(np.mean(status == 429)),
            "other": float(np.mean((status != 200) & (status != 429))),
            "p50": float(np.median(latency[ok])) * 1e3 if ok.any() else float("nan"),
            "p99": float(np.quantile(latency[ok], 0.99)) * 1e3 if ok.any() else float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--waits", default="500,50", help="max_queue_wait_ms values")
    parser.add_argument("--concurrency", default="16,80,320")
    args = parser.parse_args()
    if shutil.which("hey") is None:
        raise SystemExit("hey not found: apt-get install hey")
    folder = scratch("bagserve-overload-")
    rng = np.random.default_rng(0)
    table = folder / "table.safetensors"
    write_safetensors(table, {"weight": rng.standard_normal((ROWS, DIM), dtype=np.float32)})
    config = folder / "models.toml"
    config.write_text(f'[[models]]\nname = "items"\ncheckpoint = "{table}"\nmode = "mean"\n')
    bodies = {}
    for bags in (1, 64):
        bodies[bags] = folder / f"bags{bags}.json"
        bodies[bags].write_bytes(orjson.dumps(
            {"bags": rng.integers(0, ROWS, (bags, IDS)).tolist()}))
    port = 8794
    url = f"http://127.0.0.1:{port}/v1/models/items/embed"
    bagserve = str(Path(sys.executable).parent / "bagserve")
    print(f"# one process, hey, {args.duration} s a cell, {time.strftime('%Y-%m-%d')}\n")
    print("| max_queue_wait_ms | workload | conc. | sent/s | answered/s | 429 | other | "
          "admitted p50 ms | admitted p99 ms |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for wait in args.waits.split(","):
        process = _start([bagserve, "serve", "--config", str(config), "--port", str(port)],
                         f"http://127.0.0.1:{port}/v2/health/ready",
                         {"BAGSERVE_LOG_LEVEL": "warning", "BAGSERVE_MAX_QUEUE_WAIT_MS": wait,
                          "PYTHONPATH": str(ROOT)})
        try:
            _hey(url, bodies[1], 16, 2)  # warm
            for bags in (1, 64):
                for level in (int(c) for c in args.concurrency.split(",")):
                    r = _hey(url, bodies[bags], level, args.duration)
                    print(f"| {wait} | {bags} bag{'s' if bags > 1 else ''} x {IDS} | {level} "
                          f"| {r['sent']:,.0f} | {r['ok']:,.0f} | {r['refused']:.1%} | "
                          f"{r['other']:.1%} | {r['p50']:.1f} | {r['p99']:.1f} |", flush=True)
        finally:
            _stop(process)


if __name__ == "__main__":
    main()
