"""Text models: texts/s and tokens/s next to model2vec's ``encode``, in process and over HTTP.

    python benchmarks/bench_text.py [--model FOLDER] [--rounds 20]

The model is the one inside the ``tokenlearn-static-model`` wheel (the test extra
installs it: 10,000 x 64 int8, vocabulary-quantized, a 276k-piece Unigram tokenizer)
unless ``--model`` names another model2vec folder. Texts: short (5-20 words) and long
(200-500 words) drawn from a fixed word list with a seeded generator. model2vec 0.10 is
installed by the benchmark's user, not by the project (``pip install model2vec==0.10.0``).

- In process: ``models.text.StaticModel.encode`` against model2vec's ``encode`` on the
  same 1,000 texts, interleaved, medians.
- HTTP (a ``bagserve serve`` process, one worker): one ``/v1/embeddings`` request of 1,000
  short texts (httpx, JSON floats and base64) against model2vec's in-process ``encode`` of
  the same texts; one short text per request on one connection (median latency); 64
  concurrent one-text requests with ``hey`` against a bare FastAPI endpoint that parses the
  same body and answers constant vectors (``benchmarks/bare_app.py``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script

WORDS = ("the quick brown fox jumps over a lazy dog while embedding tables of token vectors "
         "pool static models into sentence vectors for search ranking and retrieval systems "
         "that serve many users every day with small fast cheap machines").split()


def texts(count: int, low: int, high: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, int(rng.integers(low, high + 1))))
            for _ in range(count)]


def model_folder(named: str | None) -> Path:
    if named:
        return Path(named)
    spec = importlib.util.find_spec("static_model")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("install tokenlearn-static-model (the test extra) or pass --model")
    return Path(spec.submodule_search_locations[0]) / "model"


def _median(call: Any, rounds: int) -> float:
    call()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def in_process(folder: Path, rounds: int) -> dict[str, float]:
    from model2vec import StaticModel as Model2Vec

    from models.text import StaticModel

    ours, theirs = StaticModel.from_pretrained(folder), Model2Vec.from_pretrained(folder)
    result = {}
    for label, batch in (("short", texts(1000, 5, 20)), ("long", texts(1000, 200, 500))):
        np.testing.assert_array_equal(ours.encode(batch[:50]),
                                      theirs.encode(batch[:50]).astype(np.float32))
        tokens = int(ours.token_arrays(batch)[1].sum())
        mine = _median(lambda batch=batch: ours.encode(batch), rounds)
        model2vec = _median(lambda batch=batch: theirs.encode(batch), rounds)
        result[f"{label} model2vec"] = model2vec
        print(f"in process, 1,000 {label} texts ({tokens:,} tokens): model2vec "
              f"{1000 / model2vec:,.0f} texts/s ({tokens / model2vec:,.0f} tokens/s), ours "
              f"{1000 / mine:,.0f} texts/s ({tokens / mine:,.0f} tokens/s): "
              f"{model2vec / mine:.2f}x", flush=True)
    return result


def over_http(folder: Path, rounds: int, model2vec_short: float) -> None:
    import httpx

    from benchmarks.bench_load import _start, _stop, scratch
    from tests.integration.conftest import BAGSERVE, free_port

    work = scratch("bench-text-")
    (work / "models.toml").write_text(f'[[models]]\nname = "potion"\ncheckpoint = "{folder}"\n')
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = _start([BAGSERVE, "serve", "--config", str(work / "models.toml"), "--port",
                     str(port)], f"{url}/v2/health/ready")
    try:
        batch = texts(1000, 5, 20, seed=1)
        with httpx.Client(base_url=url, timeout=60) as client:
            for encoding in ("float", "base64"):
                body = {"model": "potion", "input": batch, "encoding_format": encoding}
                seconds = _median(lambda body=body: client.post(
                    "/v1/embeddings", json=body).raise_for_status(), rounds)
                print(f"HTTP, one request of 1,000 short texts ({encoding}): "
                      f"{1000 / seconds:,.0f} texts/s, {model2vec_short / seconds:.2f}x "
                      "model2vec's in-process encode", flush=True)
            one = {"model": "potion", "input": batch[0]}
            latency = _median(lambda: client.post("/v1/embeddings", json=one)
                              .raise_for_status(), max(rounds * 20, 200))
            print(f"HTTP, one short text on one connection: median {latency * 1e3:.2f} ms",
                  flush=True)
        if shutil.which("hey"):
            ours = _hey(f"{url}/v1/embeddings", one)
            bare = _bare(one)
            print(f"HTTP, 64 concurrent one-text requests (hey, 10 s): ours {ours:,.0f} req/s, "
                  f"bare FastAPI {bare:,.0f} req/s: {ours / bare:.2f}x", flush=True)
    finally:
        _stop(server)


def _hey(url: str, body: dict[str, Any]) -> float:
    with tempfile.NamedTemporaryFile(suffix=".json") as file:
        file.write(json.dumps(body).encode())
        file.flush()
        output = subprocess.run(["hey", "-z", "10s", "-c", "64", "-m", "POST", "-T",
                                 "application/json", "-D", file.name, url],
                                capture_output=True, text=True, check=True).stdout
    match = re.search(r"Requests/sec:\s+([\d.]+)", output)
    assert match is not None and "[200]" in output, output
    return float(match.group(1))


def _bare(body: dict[str, Any]) -> float:
    from benchmarks.bench_load import _start, _stop
    from tests.integration.conftest import free_port

    port = free_port()
    process = _start([sys.executable, "-m", "uvicorn", "benchmarks.bare_app:app", "--port",
                      str(port), "--log-level", "warning"], f"http://127.0.0.1:{port}/docs",
                     env={"BARE_DIM": "64"})
    try:
        return _hey(f"http://127.0.0.1:{port}/v1/embeddings", body)
    finally:
        _stop(process)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model")
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    os.environ.setdefault("BAGSERVE_LOG_LEVEL", "warning")
    print(f"# {platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
          f"{time.strftime('%Y-%m-%d')}")
    folder = model_folder(args.model)
    result = in_process(folder, args.rounds)
    over_http(folder, args.rounds, result["short model2vec"])


if __name__ == "__main__":
    main()
