"""ONNX Runtime CUDA kernel next to torch CUDA embedding_bag and a device copy, one run.

Needs a CUDA machine with torch (reference and copy bandwidth) and onnxruntime-gpu:

    python benchmarks/bench_gpu.py [--rows 8388608] [--dim 128] [--bags 256,2048,16384]
        [--shapes uniform,skewed] [--storages float32,float16,int8,int4] [--cpu]

Default table: 8,388,608 x 128 float32 = 4.3 GB (>= 4 GB, past protobuf's 2 GB: it is a
bound input, never an initializer), also stored as each of ``--storages``. Timings are
medians of CUDA-synchronised wall time. Two torch columns: ids already on the device and
output left there ("device"), and the same round trip the ONNX kernel makes (host ids
in, host output out: "host", the reference of the ratio column). ``--cpu`` adds the CPU
kernel on the machine's cores over the same stored tables (what ``auto`` weighs CUDA
against). Useful bytes are the gathered stored rows (ids x row bytes); the device copy's
bandwidth counts bytes read plus written, the roofline for an unfused Gather -> Reduce.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np


def _median_ms(call: Callable[[], Any], sync: Callable[[], None], repeats: int) -> float:
    call()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _copy_bandwidth(torch: Any, sync: Callable[[], None]) -> float:
    """Device-to-device copy of 1 GiB: GB/s counting bytes read plus written."""
    source = torch.empty(1 << 28, dtype=torch.float32, device="cuda")
    target = torch.empty_like(source)
    copy_ms = _median_ms(lambda: target.copy_(source), sync, 20)
    return 2 * source.numel() * 4 / copy_ms / 1e6


def _batch(rows: int, bags: int, ids_per_bag: int, shape: str, seed: int
           ) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, offsets)``: ``uniform`` (every bag ``ids_per_bag`` ids drawn uniformly) or
    ``skewed`` (ragged bags of 1 to 2x ``ids_per_bag`` ids, Zipf-like ids: a hot head and
    a long cold tail, as recommendation and text traffic sends)."""
    rng = np.random.default_rng(seed)
    if shape == "uniform":
        ids = rng.integers(0, rows, bags * ids_per_bag, dtype=np.int64)
        return ids, np.arange(0, ids.size + 1, ids_per_bag, dtype=np.int64)
    lengths = rng.integers(1, 2 * ids_per_bag, bags)
    offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)
    ranks = rng.zipf(1.1, int(offsets[-1])) - 1
    ids = rng.permutation(rows)[ranks % rows].astype(np.int64)
    return ids, offsets


def _torch_calls(torch: Any, table_gpu: Any, ids: np.ndarray, offsets: np.ndarray
                 ) -> dict[str, Callable[[], Any]]:
    ids_gpu = torch.from_numpy(ids).cuda()
    starts = offsets[:-1].copy()
    starts_gpu = torch.from_numpy(starts).cuda()
    bag = torch.nn.functional.embedding_bag
    return {
        "torch fp32 (device)": lambda: bag(ids_gpu, table_gpu, starts_gpu, mode="sum"),
        "torch fp32 (host)": lambda: bag(torch.from_numpy(ids).cuda(), table_gpu,
                                         torch.from_numpy(starts).cuda(), mode="sum").cpu(),
    }


def main() -> None:
    import torch

    from kernels import TableSpec, make_kernel
    from kernels.onnx_kernel import CUDA, OnnxKernel, cuda_status
    from kernels.storage import store

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=8_388_608)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--ids-per-bag", type=int, default=32)
    parser.add_argument("--bags", default="256,2048,16384")
    parser.add_argument("--shapes", default="uniform,skewed")
    parser.add_argument("--storages", default="float32,float16,int8,int4")
    parser.add_argument("--cpu", action="store_true",
                        help="also time the CPU kernel on this machine's cores, per storage")
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    usable, reason = cuda_status()
    if not usable:
        raise SystemExit(f"CUDA EP not usable: {reason}")
    sync = torch.cuda.synchronize
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d')}, {args.rows:,} x {args.dim} table")
    copy_gbs = _copy_bandwidth(torch, sync)
    print(f"device copy: {copy_gbs:,.0f} GB/s (read + write)")
    generator = torch.Generator(device="cuda").manual_seed(0)
    table_gpu = torch.randn(args.rows, args.dim, device="cuda", generator=generator)
    table = table_gpu.cpu().numpy()
    storages = args.storages.split(",")
    stored = {name: store(table, name) for name in storages}  # type: ignore[arg-type]
    kernels: dict[str, Callable[..., Any]] = {}
    for name in storages:
        kernel = OnnxKernel(TableSpec(stored[name], "sum"), device="cuda")
        assert kernel.provider == CUDA
        kernels[f"onnx cuda {name}"] = kernel
        if args.cpu:
            kernels[f"cpu kernel {name}"] = make_kernel(TableSpec(stored[name], "sum"))
    print("| shape | bags | impl | ms | bags/s | useful GB/s | % of copy | x torch (host) |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for shape in args.shapes.split(","):
        for bags in (int(b) for b in args.bags.split(",")):
            ids, offsets = _batch(args.rows, bags, args.ids_per_bag, shape, bags)
            calls = _torch_calls(torch, table_gpu, ids, offsets)
            for name, kernel in kernels.items():
                calls[name] = functools.partial(kernel, ids, offsets)
            for name in kernels:
                # Each storage against the CPU kernel over the same stored table.
                storage = name.rsplit(" ", 1)[1]
                expected = make_kernel(TableSpec(stored[storage], "sum"))(ids, offsets)
                tolerance = 1e-4 * (1 + np.abs(expected).max())
                np.testing.assert_allclose(calls[name](), expected, rtol=1e-4,
                                           atol=tolerance, err_msg=name)
            results = {name: _median_ms(call, sync, args.repeats)
                       for name, call in calls.items()}
            for name, ms in results.items():
                row_bytes = stored[name.rsplit(" ", 1)[1]].row_bytes if name in kernels \
                    else args.dim * 4
                useful = ids.size * row_bytes / ms / 1e6
                print(f"| {shape} | {bags} | {name} | {ms:.3f} | {bags / ms * 1e3:,.0f} | "
                      f"{useful:,.0f} | {100 * useful / copy_gbs:.1f} | "
                      f"{results['torch fp32 (host)'] / ms:.2f} |", flush=True)


if __name__ == "__main__":
    main()
