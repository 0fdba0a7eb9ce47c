"""Kernel throughput next to torch.nn.functional.embedding_bag, in one process.

    python benchmarks/bench_kernels.py [--threads 2] [--repeats 60] [--shapes a,b,c]
    python benchmarks/bench_kernels.py --matrix [--dims ...] [--bags ...] [--modes ...]
        [--traffic zipf1.1/poisson20,...] [--cache hot,cold] [--sweep]
    python benchmarks/bench_kernels.py --torch-made [--seed 1]

``--shapes`` times every implementation (numba, numpy, ONNX CPU EP) on three fixed
shapes with uniform ids. ``--matrix`` times what users send through the public API
(``EmbeddingBag.from_pretrained(W, mode=...)(ids, offsets=starts)``, validation
included) and the kernel alone, next to torch, on skewed ids and ragged bags (see
``benchmarks/traffic.py``): hot cache (the same ids every call) and cold (fresh ids
every call, 8 sets cycled); ``--sweep`` adds every id distribution and bag-length kind at
one shape. ``--torch-made`` times skewed cases whose tables, ids and bag lengths torch
draws (``TORCH_MADE``), hot, the same way.

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
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script

from benchmarks import traffic  # noqa: E402
from kernels import TableSpec  # noqa: E402
from kernels.caches import cache_bytes  # noqa: E402
from kernels.numba_kernel import NumbaKernel  # noqa: E402
from kernels.numpy_kernel import NumpyKernel  # noqa: E402
from kernels.onnx_kernel import OnnxKernel  # noqa: E402
from models import EmbeddingBag  # noqa: E402


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


def cold_sets(ids_per_set: int, row_bytes: int, most: int = 512) -> int:
    """How many id sets a cold cycle needs so that the rows it touches (``row_bytes``
    each) add up to four times the last-level cache: with fewer, rows gathered by the set
    before last are still cached when their set comes round again."""
    need = 4 * cache_bytes(3, 32 << 20)  # the L3, or 32 MiB where Linux does not say
    return max(ID_SETS, min(most, -(-need // max(1, ids_per_set * row_bytes))))


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


def measure(calls: dict[str, Callable[[int], Any]], repeats: int,
            id_sets: int = ID_SETS) -> dict[str, float]:
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
                batch = (batch + 1) % id_sets
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


#: Bytes of table per matrix cell: every table is far bigger than the 32 MB L3.
MATRIX_TABLE_BYTES = 256 << 20
MATRIX_ROWS_MAX = 1_000_000
ISSUE_CELLS = ((1_000_000, 128, 2048, 32), (30_522, 384, 256, 16), (100_000, 64, 4096, 8))


def _matrix_cell(weight: np.ndarray, flow: traffic.Traffic, bags: int, mode: str, hot: bool,
                 seed: int) -> dict[str, float]:
    """Median ms per call of torch, the public API and the kernel alone on one cell."""
    import torch

    weighted = mode == "weighted"
    pooling = "sum" if weighted else mode
    source = traffic.IdSource(flow.ids, weight.shape[0], seed)
    sets = [traffic.batch(source, flow, bags) for _ in range(1 if hot else ID_SETS)]
    # The API as users call it: no num_threads, so numba's count (main sets it to
    # --threads) is read on every parallel call.
    bag = EmbeddingBag.from_pretrained(weight, mode=pooling)
    kernel = bag.kernel
    table = torch.from_numpy(weight)
    tensors = [(torch.from_numpy(ids), torch.from_numpy(starts),
                torch.from_numpy(weights) if weighted else None)
               for ids, starts, weights in sets]
    flat = [(ids, np.append(starts, ids.size), weights if weighted else None)
            for ids, starts, weights in sets]
    embedding_bag = torch.nn.functional.embedding_bag

    def torch_call(index: int) -> Any:
        ids, starts, weights = tensors[index]
        with torch.inference_mode():
            return embedding_bag(ids, table, starts, mode=pooling, per_sample_weights=weights)

    def api_call(index: int) -> Any:
        ids, starts, weights = sets[index]
        return bag(ids, offsets=starts, per_sample_weights=weights if weighted else None)

    def kernel_call(index: int) -> Any:
        return kernel(*flat[index])

    return _checked_cell(torch_call, api_call, kernel_call, len(sets), exact=False)


def _checked_cell(torch_call: Callable[[int], Any], api_call: Callable[[int], Any],
                  kernel_call: Callable[[int], Any], id_sets: int, exact: bool
                  ) -> dict[str, float]:
    """Check the API's first answer against torch's (bit for bit when ``exact``, else
    within 1e-5), then time the three: median ms per call over ``id_sets`` id sets."""
    got, want = api_call(0), torch_call(0).numpy()
    if exact:
        np.testing.assert_array_equal(got, want)
    else:
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    start = time.perf_counter()
    torch_call(0)
    single = time.perf_counter() - start
    # About a third of a second per implementation, in 5-call blocks.
    repeats = int(min(100, max(6, 0.3 / max(single, 1e-6) / 5)))
    medians = measure({"torch": torch_call, "api": api_call, "kernel": kernel_call}, repeats,
                      id_sets)
    return {name: seconds * 1e3 for name, seconds in medians.items()}


def _table(rows: int, dim: int, cache: dict[tuple[int, int], np.ndarray], align: int
           ) -> np.ndarray:
    """A float32 (rows, dim) table whose data starts ``align`` bytes past a 64-byte line
    boundary modulo 64 (0: on a line, as torch allocates; NumPy's large arrays start 16
    past one)."""
    if (rows, dim) not in cache:
        cache.clear()  # one table at a time: they are large
        rng = np.random.default_rng(rows + dim)
        values = rng.standard_normal((rows, dim), dtype=np.float32)
        raw = np.empty(values.nbytes + 128, np.uint8)
        skip = (align - raw.ctypes.data) % 64
        table = raw[skip : skip + values.nbytes].view(np.float32).reshape(rows, dim)
        table[...] = values
        cache[(rows, dim)] = table
    return cache[(rows, dim)]


#: PyTorch-made cases, ``(rows, dim, bags, mean length, lengths, Zipf exponent, mode)``:
#: tables from ``torch.randn`` (torch's allocator: rows on cache lines, 4 KiB pages), ids
#: drawn by ``torch.multinomial`` over Zipf ranks scattered by ``torch.randperm``, bag
#: lengths by ``torch.poisson`` or a geometric law from 0; none of it from
#: ``benchmarks/traffic.py``, so the kernel's tuning never saw these exact inputs.
TORCH_MADE = (
    (1_000_000, 128, 2048, 32, "poisson", 1.1, "sum"),
    (1_000_000, 128, 2048, 32, "poisson", 1.1, "mean"),
    (1_000_000, 128, 2048, 32, "poisson", 1.1, "max"),
    (30_522, 384, 256, 16, "poisson", 1.2, "sum"),
    (30_522, 384, 256, 16, "poisson", 1.2, "mean"),
    (100_000, 64, 4096, 8, "poisson", 1.05, "sum"),
    (100_000, 64, 4096, 8, "poisson", 1.05, "max"),
    (1_000_000, 64, 2048, 32, "poisson", 1.2, "weighted"),
    (500_000, 32, 16384, 20, "poisson", 1.3, "sum"),
    (200_000, 256, 512, 40, "poisson", 0.9, "mean"),
    (200_000, 256, 512, 40, "poisson", 0.9, "sum"),
    (50_000, 100, 1024, 10, "geometric", 1.5, "sum"),
    (2_000_000, 16, 8192, 50, "poisson", 1.0, "sum"),
    (300_000, 128, 256, 64, "poisson", 1.1, "weighted"),
    (30_522, 768, 256, 16, "poisson", 1.2, "sum"),
    (100_000, 1024, 256, 8, "poisson", 1.1, "sum"),
    (250_000, 48, 2048, 12, "geometric", 1.3, "weighted"),
    # Short bags (a third of them empty): the per-bag work weighs as much as the rows.
    (1_000_000, 64, 65_536, 1, "poisson", 1.1, "sum"),
    (1_000_000, 16, 2048, 1, "poisson", 1.1, "weighted"),
)


def _torch_made_call(rows: int, dim: int, bags: int, length: int, lengths: str,
                     exponent: float, weighted: bool, generator: Any) -> tuple[Any, ...]:
    """One PyTorch-made call: ``(table, ids, starts, weights or None)`` as tensors."""
    import torch

    table = torch.randn(rows, dim, generator=generator)
    if lengths == "poisson":
        counts = torch.poisson(torch.full((bags,), float(length)), generator=generator)
    else:  # geometric from 0 with mean ``length``
        uniform = torch.rand(bags, generator=generator, dtype=torch.float64)
        counts = (uniform.log() / np.log(length / (length + 1))).floor()
    counts = counts.long()
    ranks = torch.arange(1, rows + 1, dtype=torch.float64).pow(-exponent)
    drawn = torch.multinomial(ranks / ranks.sum(), int(counts.sum()), replacement=True,
                              generator=generator)
    ids = torch.randperm(rows, generator=generator)[drawn]
    starts = torch.zeros(bags, dtype=torch.long)
    starts[1:] = counts.cumsum(0)[:-1]
    weights = torch.rand(ids.numel(), generator=generator) if weighted else None
    return table, ids, starts, weights


def _torch_made_cell(rows: int, dim: int, bags: int, length: int, lengths: str,
                     exponent: float, mode: str, generator: Any) -> dict[str, float]:
    """Median ms per call of torch, the public API and the kernel alone on one
    PyTorch-made case, after checking the API's result against torch's."""
    import torch

    weighted = mode == "weighted"
    pooling = "sum" if weighted else mode
    table, ids, starts, weights = _torch_made_call(rows, dim, bags, length, lengths,
                                                   exponent, weighted, generator)
    bag = EmbeddingBag.from_pretrained(table.numpy(), mode=pooling)
    ids_np, starts_np = ids.numpy(), starts.numpy()
    weights_np = None if weights is None else weights.numpy()
    flat = np.append(starts_np, ids_np.size)
    embedding_bag = torch.nn.functional.embedding_bag

    def torch_call(_: int) -> Any:
        with torch.inference_mode():
            return embedding_bag(ids, table, starts, mode=pooling, per_sample_weights=weights)

    def api_call(_: int) -> Any:
        return bag(ids_np, offsets=starts_np, per_sample_weights=weights_np)

    def kernel_call(_: int) -> Any:
        return bag.kernel(ids_np, flat, weights_np)

    return _checked_cell(torch_call, api_call, kernel_call, 1, exact=not weighted)


def run_torch_made(args: argparse.Namespace) -> None:
    """Print the PyTorch-made cases (:data:`TORCH_MADE`), hot: the same call repeated."""
    import torch

    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(args.seed)
    print("| table | bags x mean length | Zipf | mode | torch ms | api ms | kernel ms | "
          "api x torch | kernel x torch |")
    print("|---|---|---:|---|---:|---:|---:|---:|---:|")
    for rows, dim, bags, length, lengths, exponent, mode in TORCH_MADE:
        ms = _torch_made_cell(rows, dim, bags, length, lengths, exponent, mode, generator)
        print(f"| {rows:,}x{dim} | {bags}x{length} {lengths} | {exponent} | {mode} | "
              f"{ms['torch']:.4f} | {ms['api']:.4f} | {ms['kernel']:.4f} | "
              f"{ms['torch'] / ms['api']:.2f} | {ms['torch'] / ms['kernel']:.2f} |",
              flush=True)


def run_matrix(args: argparse.Namespace) -> None:
    """Print the traffic matrix: one row per (traffic, cache, table, bags, mode)."""
    import torch

    torch.set_num_threads(args.threads)
    print("| traffic | cache | table | bags | mode | torch ms | api ms | kernel ms | "
          "api x torch | kernel x torch |")
    print("|---|---|---|---:|---|---:|---:|---:|---:|---:|")
    cells: list[tuple[traffic.Traffic, int, int, int]] = []
    flows = [traffic.Traffic(*_parse_traffic(text)) for text in args.traffic.split(",")]
    for flow in flows:
        for dim in (int(d) for d in args.dims.split(",")):
            rows = min(MATRIX_ROWS_MAX, MATRIX_TABLE_BYTES // (dim * 4))
            cells += [(flow, rows, dim, int(b)) for b in args.bags.split(",")]
    if args.issue_cells:
        cells += [(traffic.Traffic("zipf1.1", "poisson", length), rows, dim, bags)
                  for rows, dim, bags, length in ISSUE_CELLS]
    if args.sweep:
        cells += [(traffic.Traffic(ids, lengths, 20), 1_000_000, 64, 2048)
                  for ids in traffic.DISTRIBUTIONS for lengths in traffic.LENGTHS]
    tables: dict[tuple[int, int], np.ndarray] = {}
    for seed, (flow, rows, dim, bags) in enumerate(cells):
        weight = _table(rows, dim, tables, args.align)
        for cache in args.cache.split(","):
            for mode in args.modes.split(","):
                ms = _matrix_cell(weight, flow, bags, mode, cache == "hot", seed)
                print(f"| {flow.label} | {cache} | {rows:,}x{dim} | {bags} | {mode} | "
                      f"{ms['torch']:.4f} | {ms['api']:.4f} | {ms['kernel']:.4f} | "
                      f"{ms['torch'] / ms['api']:.2f} | {ms['torch'] / ms['kernel']:.2f} |",
                      flush=True)


def _parse_traffic(text: str) -> tuple[str, str, int]:
    """``"zipf1.1/poisson20"`` -> ``("zipf1.1", "poisson", 20)``."""
    ids, _, lengths = text.partition("/")
    kind = lengths.rstrip("0123456789")
    return ids, kind, int(lengths[len(kind):] or 20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--shapes", default="a,b,c")
    parser.add_argument("--modes", default=None,
                        help="sum,mean,max (--shapes) or sum,mean,max,weighted (--matrix)")
    parser.add_argument("--matrix", action="store_true", help="the traffic matrix")
    parser.add_argument("--dims", default="16,32,64,128,384")
    parser.add_argument("--bags", default="1,16,256,2048,16384")
    parser.add_argument("--traffic", default="zipf1.1/poisson20",
                        help="ids/lengths: uniform|zipfA / fixed|poisson|geometric + mean")
    parser.add_argument("--cache", default="hot,cold")
    parser.add_argument("--align", type=int, default=0, choices=(0, 8, 16, 32),
                        help="matrix tables start this many bytes past a 64-byte line "
                             "(0: as torch allocates; 16: as NumPy does)")
    parser.add_argument("--sweep", action="store_true",
                        help="also every id distribution x bag-length kind at one shape")
    parser.add_argument("--issue-cells", action="store_true",
                        help="also the kernel issue's three measured cells")
    parser.add_argument("--torch-made", action="store_true",
                        help="the PyTorch-made skewed cases instead (tables, ids and "
                             "lengths drawn by torch)")
    parser.add_argument("--seed", type=int, default=1, help="--torch-made's generator seed")
    args = parser.parse_args()
    import numba

    numba.set_num_threads(args.threads)
    print(f"# {platform.processor() or platform.machine()}, {args.threads} threads, "
          f"numpy {np.__version__}, numba {numba.__version__}, "
          f"{time.strftime('%Y-%m-%d')}")
    if args.torch_made:
        run_torch_made(args)
        return
    if args.matrix:
        args.modes = args.modes or "sum,mean,max,weighted"
        run_matrix(args)
        return
    args.modes = args.modes or "sum,mean,max"
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
