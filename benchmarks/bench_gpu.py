"""ONNX Runtime CUDA kernel next to torch CUDA embedding_bag and a device copy, one run.

Needs a CUDA machine with torch (reference and copy bandwidth) and onnxruntime-gpu:

    python benchmarks/bench_gpu.py [--rows 8388608] [--dim 128] [--bags 2048,16384]

Default table: 8,388,608 x 128 float32 = 4.3 GB (>= 4 GB, past protobuf's 2 GB: it is a
bound input, never an initializer). Timings are medians of CUDA-synchronised wall time.
Two torch columns: ids already on the device and output left there ("device"), and the
same round trip the ONNX kernel makes (host ids in, host output out: "host"). Useful
bytes are the gathered rows (bags x ids x dim x itemsize); the device copy's bandwidth
counts bytes read plus written, the roofline for an unfused Gather -> Reduce.
"""

from __future__ import annotations

import argparse
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


def _calls(torch: Any, kernels: dict[str, Any], table_gpu: Any, ids: np.ndarray,
           offsets: np.ndarray) -> dict[str, Callable[[], Any]]:
    ids_gpu = torch.from_numpy(ids).cuda()
    starts = offsets[:-1].copy()
    starts_gpu = torch.from_numpy(starts).cuda()
    bag = torch.nn.functional.embedding_bag
    return {
        "torch (device)": lambda: bag(ids_gpu, table_gpu, starts_gpu, mode="sum"),
        "torch (host)": lambda: bag(torch.from_numpy(ids).cuda(), table_gpu,
                                    torch.from_numpy(starts).cuda(), mode="sum").cpu(),
        "onnx cuda fp32": lambda: kernels["float32"](ids, offsets),
        "onnx cuda fp16": lambda: kernels["float16"](ids, offsets),
    }


def main() -> None:
    import torch

    from kernels import TableSpec
    from kernels.onnx_kernel import CUDA, OnnxKernel, cuda_status

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=8_388_608)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--ids-per-bag", type=int, default=32)
    parser.add_argument("--bags", default="2048,16384")
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    usable, reason = cuda_status()
    if not usable:
        raise SystemExit(f"CUDA EP not usable: {reason}")
    sync = torch.cuda.synchronize
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d')}")
    copy_gbs = _copy_bandwidth(torch, sync)
    print(f"device copy: {copy_gbs:,.0f} GB/s (read + write)")
    generator = torch.Generator(device="cuda").manual_seed(0)
    table_gpu = torch.randn(args.rows, args.dim, device="cuda", generator=generator)
    table = table_gpu.cpu().numpy()
    print("| bags | impl | ms | bags/s | useful GB/s | % of copy | x torch (device) |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    kernels = {dtype: OnnxKernel(TableSpec(table, "sum"), device="cuda", table_dtype=dtype)
               for dtype in ("float32", "float16")}
    for kernel in kernels.values():
        assert kernel.provider == CUDA
    for bags in (int(b) for b in args.bags.split(",")):
        rng = np.random.default_rng(bags)
        ids = rng.integers(0, args.rows, bags * args.ids_per_bag, dtype=np.int64)
        offsets = np.arange(0, ids.size + 1, args.ids_per_bag, dtype=np.int64)
        calls = _calls(torch, kernels, table_gpu, ids, offsets)
        reference = calls["torch (device)"]().cpu().numpy()
        np.testing.assert_allclose(calls["onnx cuda fp32"](), reference, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(calls["onnx cuda fp16"](), reference, rtol=1e-2, atol=1e-2)
        results = {name: _median_ms(call, sync, args.repeats) for name, call in calls.items()}
        for name, ms in results.items():
            itemsize = 2 if name.endswith("fp16") else 4
            useful = bags * args.ids_per_bag * args.dim * itemsize / ms / 1e6
            print(f"| {bags} | {name} | {ms:.3f} | {bags / ms * 1e3:,.0f} | {useful:,.0f} | "
                  f"{100 * useful / copy_gbs:.1f} | {results['torch (device)'] / ms:.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
