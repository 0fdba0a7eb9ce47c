"""Load benchmark: the real server over loopback next to a bare FastAPI ceiling.

    apt-get install wrk    # the load generator (C, so it is not the bottleneck)
    python benchmarks/bench_load.py [--duration 10] [--concurrency 1,16,64]

Starts ``bagserve serve`` on a 100,000 x 128 float32 table (mean) and
``benchmarks/bare_app.py`` (parses the same JSON, returns an orjson array of the same
shape: the ceiling this machine's HTTP stack allows), one at a time so they never share
the cores, then drives each with wrk: one bag of 32 ids per request as JSON at each
concurrency, and 256 bags x 32 ids per request through the KServe v2 binary tensor route.
Prints a Markdown table: requests/s, bags/s, p50/p99 latency, and the ratio to the
bare endpoint at the same concurrency.
"""

from __future__ import annotations

import argparse
import atexit
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import orjson

from models import write_safetensors

ROWS, DIM, IDS = 100_000, 128, 32
LUA = """
local f = io.open("{body}", "rb")
wrk.method = "POST"
wrk.body = f:read("*all")
f:close()
{headers}
"""


def scratch(prefix: str) -> Path:
    """A new temporary folder that is removed when the benchmark exits.

    Removed at any normal exit, exception or Ctrl-C, and on SIGTERM (``timeout``'s signal),
    which this installs as an exit: the tables written there are up to gigabytes, and
    runs left behind once filled the disk.
    """
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    return folder


def _start(command: list[str], url: str, env: dict[str, str] | None = None
           ) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, **(env or {})})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return process
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit(f"{command[0]} did not start")


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    process.wait(60)


def _wrk(url: str, script: Path, connections: int, duration: int) -> dict[str, float]:
    output = subprocess.run(
        ["wrk", "-t", str(min(connections, 2)), "-c", str(connections), "-d", f"{duration}s",
         "--latency", "-s", str(script), url], capture_output=True, text=True, check=True).stdout
    def quantile(label: str) -> float:
        match = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)\s*$", output, re.M)
        if match is None:
            return float("nan")
        value, unit = float(match.group(1)), match.group(2)
        return value * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    return {"rps": rps, "p50": quantile("50"), "p99": quantile("99"),
            "errors": float(errors.group(1)) if errors else 0.0}


def _script(folder: Path, name: str, body: bytes, headers: dict[str, str]) -> Path:
    path = folder / f"{name}.body"
    path.write_bytes(body)
    lines = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items())
    script = folder / f"{name}.lua"
    script.write_text(LUA.format(body=path, headers=lines))
    return script


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--concurrency", default="1,16,64")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found: apt-get install wrk")
    levels = [int(c) for c in args.concurrency.split(",")]
    folder = scratch("bagserve-load-")
    rng = np.random.default_rng(0)
    write_safetensors(folder / "table.safetensors",
                      {"weight": rng.standard_normal((ROWS, DIM), dtype=np.float32)})
    (folder / "models.toml").write_text('[[models]]\nname = "items"\n'
                                        'checkpoint = "table.safetensors"\nmode = "mean"\n')
    one_bag = orjson.dumps({"bags": [rng.integers(0, ROWS, IDS).tolist()]})
    json_script = _script(folder, "json", one_bag, {"Content-Type": "application/json"})
    ids = rng.integers(0, ROWS, 256 * IDS).astype("<i8")
    offsets = np.arange(0, ids.size, IDS, dtype="<i8")
    header = orjson.dumps({"inputs": [
        {"name": "indices", "shape": [ids.size], "datatype": "INT64",
         "parameters": {"binary_data_size": ids.nbytes}},
        {"name": "offsets", "shape": [offsets.size], "datatype": "INT64",
         "parameters": {"binary_data_size": offsets.nbytes}}],
        "outputs": [{"name": "embeddings", "parameters": {"binary_data": True}}]})
    binary_script = _script(folder, "binary", header + ids.tobytes() + offsets.tobytes(),
                            {"Inference-Header-Content-Length": str(len(header)),
                             "Content-Type": "application/octet-stream"})
    port = 8791
    base = f"http://127.0.0.1:{port}"
    results: list[tuple[str, int, int, dict[str, float]]] = []
    bare = _start([sys.executable, "-m", "uvicorn", "benchmarks.bare_app:app", "--port",
                   str(port), "--log-level", "warning"], f"{base}/docs")
    try:
        for level in levels:
            results.append(("bare FastAPI, JSON, 1 bag", level, 1,
                            _wrk(f"{base}/v1/models/items/embed", json_script, level,
                                 args.duration)))
    finally:
        _stop(bare)
    server = _start([str(Path(sys.executable).parent / "bagserve"), "serve", "--config",
                     str(folder / "models.toml"), "--port", str(port)],
                    f"{base}/v2/health/ready", {"BAGSERVE_LOG_LEVEL": "warning"})
    try:
        for level in levels:
            results.append(("bagserve native, JSON, 1 bag", level, 1,
                            _wrk(f"{base}/v1/models/items/embed", json_script, level,
                                 args.duration)))
        for level in levels:
            results.append(("bagserve KServe binary, 256 bags", level, 256,
                            _wrk(f"{base}/v2/models/items/infer", binary_script, level,
                                 args.duration)))
    finally:
        _stop(server)
    ceiling = {level: r["rps"] for name, level, _, r in results if name.startswith("bare")}
    print(f"# loopback load, {os.cpu_count()} cores, wrk, {args.duration}s per row, "
          f"{time.strftime('%Y-%m-%d')}")
    print("| route | conc. | req/s | bags/s | p50 ms | p99 ms | non-2xx | req/s vs bare |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, level, bags, r in results:
        print(f"| {name} | {level} | {r['rps']:,.0f} | {r['rps'] * bags:,.0f} | "
              f"{r['p50']:.2f} | {r['p99']:.2f} | {r['errors']:.0f} | "
              f"{r['rps'] / ceiling[level]:.2f} |")


if __name__ == "__main__":
    main()
