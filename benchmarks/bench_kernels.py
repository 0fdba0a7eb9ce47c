"""Kernel throughput next to torch.nn.functional.embedding_bag, in one process.

    python benchmarks/bench_kernels.py [--threads 2] [--repeats 60] [--shapes a,b,c]

Every implementation runs the same ids on the same table with the same thread count;
calls are interleaved round-robin so machine noise hits all of them alike, and the
median is reported. GB/s counts the gathered rows (bags x ids x dim x 4 bytes), the
bytes any kernel must read. torch is a reference here, never a dependency: when it is
not importable its column is left out.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from kernels import TableSpec
from kernels.numba_kernel import NumbaKernel
from kernels.numpy_kernel import NumpyKernel
from kernels.onnx_kernel import OnnxKernel


@dataclass(frozen=True)
class Shape:
    name: str
    rows: int
    dim: int
    bags: int
    ids_per_bag: int


SHAPES = {
    "a": Shape("a", 1_000_000, 128, 2048, 32),
    "b": Shape("b", 30_522, 384, 256, 16),
    "c": Shape("c", 100_000, 64, 4096, 8),
}


#: Id sets cycled through, so no call finds the rows of the call before it in cache.
ID_SETS = 8


def _torch_call(weight: np.ndarray, batches: list[tuple[np.ndarray, np.ndarray]], mode: str,
                threads: int) -> Callable[[int], Any] | None:
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(threads)
    table = torch.from_numpy(weight)
    tensors = [(torch.from_numpy(indices), torch.from_numpy(offsets[:-1].copy()))
               for indices, offsets in batches]
    embedding_bag = torch.nn.functional.embedding_bag

    def call(batch: int) -> Any:
        ids, starts = tensors[batch]
        with torch.inference_mode():
            return embedding_bag(ids, table, starts, mode=mode)

    return call


def measure(calls: dict[str, Callable[[int], Any]], repeats: int) -> dict[str, float]:
    """Median seconds per call, interleaving the implementations in short blocks.

    Each round runs every implementation in turn: two untimed calls, then three timed
    ones. Thread pools that spin after a call (torch's and numba's OpenMP threads do)
    would otherwise steal a core from whichever implementation comes next (measured: up
    to 2x slower, and the ratios then depended on the order), and the vCPUs of these VMs
    wake slowly from idle; so each implementation is timed in its own steady state, as it
    runs under load. Consecutive calls take different id sets, so the rows a call gathers
    are not left in cache by the call before.
    """
    times: dict[str, list[float]] = {name: [] for name in calls}
    for call in calls.values():
        call(0)  # warm-up: JIT compilation, first-touch page faults
    batch = 0
    for _ in range(repeats):
        for name, call in calls.items():
            for timed in (False, False, True, True, True):
                batch = (batch + 1) % ID_SETS
                start = time.perf_counter()
                call(batch)
                if timed:
                    times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def run(shape: Shape, modes: list[str], threads: int, repeats: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((shape.rows, shape.dim), dtype=np.float32)
    offsets = np.arange(0, shape.bags * shape.ids_per_bag + 1, shape.ids_per_bag,
                        dtype=np.int64)
    batches = [(rng.integers(0, shape.rows, offsets[-1], dtype=np.int64), offsets)
               for _ in range(ID_SETS)]
    gathered = offsets[-1] * shape.dim * weight.itemsize
    rows = []
    for mode in modes:
        spec = TableSpec(weight, mode)  # type: ignore[arg-type]
        kernels: dict[str, Callable[[np.ndarray, np.ndarray], Any]] = {
            "numba": NumbaKernel(spec, num_threads=threads),
            "numpy": NumpyKernel(spec),
            "onnx-cpu": OnnxKernel(spec, device="cpu", num_threads=threads),
        }
        calls: dict[str, Callable[[int], Any]] = {
            name: (lambda batch, k=kernel: k(*batches[batch]))
            for name, kernel in kernels.items()}
        torch_call = _torch_call(weight, batches, mode, threads)
        if torch_call is not None:
            calls["torch"] = torch_call
            reference = np.asarray(torch_call(0))
            for name, kernel in kernels.items():
                np.testing.assert_allclose(kernel(*batches[0]), reference, rtol=1e-4,
                                           atol=1e-4, err_msg=name)
        medians = measure(calls, repeats)
        for name, seconds in medians.items():
            rows.append({"shape": shape.name, "mode": mode, "impl": name,
                         "ms": seconds * 1e3, "bags_per_s": shape.bags / seconds,
                         "gb_per_s": gathered / seconds / 1e9,
                         "vs_torch": medians["torch"] / seconds if "torch" in medians else None})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--shapes", default="a,b,c")
    parser.add_argument("--modes", default="sum,mean,max")
    args = parser.parse_args()
    import numba

    numba.set_num_threads(args.threads)
    print(f"# {platform.processor() or platform.machine()}, {args.threads} threads, "
          f"numpy {np.__version__}, numba {numba.__version__}, "
          f"{time.strftime('%Y-%m-%d')}")
    print("| shape | mode | impl | ms | bags/s | GB/s gathered | x torch |")
    print("|---|---|---|---:|---:|---:|---:|")
    for key in args.shapes.split(","):
        shape = SHAPES[key]
        label = f"{shape.name}: {shape.rows:,}x{shape.dim}, {shape.bags}x{shape.ids_per_bag}"
        for row in run(shape, args.modes.split(","), args.threads, args.repeats):
            ratio = "" if row["vs_torch"] is None else f"{row['vs_torch']:.2f}"
            print(f"| {label} | {row['mode']} | {row['impl']} | {row['ms']:.3f} | "
                  f"{row['bags_per_s']:,.0f} | {row['gb_per_s']:.1f} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
