"""Answers as JSON text: ``service.floatjson`` next to ``orjson.dumps``, in process.

    python benchmarks/bench_json.py [--rounds 5]

For each answer shape and value distribution, 64 different answers are encoded in turn
(fresh values every call: a branch predictor that has seen one answer many times makes
any encoder look faster than it is), ``rounds`` times, interleaving the two encoders;
medians of the per-round times, per answer and per float. Every text is checked equal
to orjson's first. Distributions: mean-pooled embeddings (normal, sd 0.3), unit rows
(normalized, as text models answer), sums of many rows (sd 30), values of a quantized
table (multiples of 1/64), and float32 bit patterns drawn uniformly (every magnitude).
Columns: orjson alone, the compiled writer alone (``rows_json``), and what the service
does (``rows_value``: the writer where a sample of the values suits it, else orjson).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service.floatjson import rows_json, rows_value  # noqa: E402

NUMPY = orjson.OPT_SERIALIZE_NUMPY
SHAPES = [(1, 128), (1, 1024), (64, 128), (256, 384), (1024, 64)]


def _answers(kind: str, shape: tuple[int, int], rng: np.random.Generator
             ) -> list[np.ndarray]:
    def one() -> np.ndarray:
        if kind == "mean pooled":
            return (rng.standard_normal(shape) * 0.3).astype(np.float32)
        if kind == "unit rows":
            rows = rng.standard_normal(shape)
            return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)
        if kind == "sums":
            return (rng.standard_normal(shape) * 30).astype(np.float32)
        if kind == "quantized":
            return (rng.integers(-128, 128, shape) / 64).astype(np.float32)
        bits = rng.integers(0, 2**32, shape, dtype=np.uint64).astype(np.uint32)
        values = bits.view(np.float32)
        return np.where(np.isfinite(values), values, np.float32(1.5))
    return [one() for _ in range(64)]


def _time(encode: Callable[[np.ndarray], object], answers: list[np.ndarray]) -> float:
    started = time.perf_counter()
    for answer in answers:
        encode(answer)
    return (time.perf_counter() - started) / len(answers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)

    def theirs(a: np.ndarray) -> bytes:
        return orjson.dumps(a, option=NUMPY)

    def served(a: np.ndarray) -> bytes:
        return orjson.dumps(rows_value(a), option=NUMPY)

    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"numpy {np.__version__}, orjson {orjson.__version__}, "
          f"{time.strftime('%Y-%m-%d')}; median of {args.rounds} rounds of 64 answers")
    print("| values | shape | orjson us | floatjson us | served us | ns/float orjson | "
          "ns/float served | served x orjson |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for kind in ("mean pooled", "unit rows", "sums", "quantized", "any bits"):
        for shape in SHAPES:
            answers = _answers(kind, shape, rng)
            for answer in answers:
                if rows_json(answer) != theirs(answer) or served(answer) != theirs(answer):
                    raise SystemExit(f"{kind} {shape}: text differs from orjson's")
            times: dict[str, list[float]] = {"orjson": [], "floatjson": [], "served": []}
            for _ in range(args.rounds):
                times["orjson"].append(_time(theirs, answers))
                times["floatjson"].append(_time(rows_json, answers))
                times["served"].append(_time(served, answers))
            median = {name: statistics.median(t) for name, t in times.items()}
            floats = shape[0] * shape[1]
            print(f"| {kind} | {shape[0]} x {shape[1]} | {median['orjson'] * 1e6:,.1f} | "
                  f"{median['floatjson'] * 1e6:,.1f} | {median['served'] * 1e6:,.1f} | "
                  f"{median['orjson'] * 1e9 / floats:.1f} | "
                  f"{median['served'] * 1e9 / floats:.1f} | "
                  f"{median['orjson'] / median['served']:.2f} |")


if __name__ == "__main__":
    main()
