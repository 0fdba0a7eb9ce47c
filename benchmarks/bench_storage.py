"""Storage dtypes: kernel speed next to torch's quantized ops, and a server's memory.

    python benchmarks/bench_storage.py [--threads 2] [--rows 1000000] [--dims 128,...]
    python benchmarks/bench_storage.py --memory [--rows 1000000] [--dim 128]

Default: sum over the same Zipf-skewed ids (Poisson bag lengths, mean 20) from one table
stored as float32, float16, bfloat16, int8 and int4, hot (the same ids every call) and
cold (id sets cycled, enough of them that a cycle's float32 rows are 4x the last-level
cache: 49 sets at 256 bags of dim 128 here, 8 at 2,048; with 8 sets at 256 bags the
float32 rows of a cycle, 20 MB, stayed in the 32 MB L3), next to torch's
``embedding_bag`` (float32) and its quantized ops ``embedding_bag_byte_rowwise_offsets``
/ ``embedding_bag_4bit_rowwise_offsets`` on the same rows, in one process, interleaved
(``bench_kernels.measure``). Prints bags/s, bytes per row and the ratios the storage
issue names.

``--memory``: starts ``bagserve serve`` on the table written as float32 safetensors with
each ``table_dtype``, touches every row through the API, and reads the server's resident
memory (VmRSS) minus that of a server holding a 100 x 8 table.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script

from benchmarks import traffic  # noqa: E402
from benchmarks.bench_kernels import ID_SETS, cold_sets, measure  # noqa: E402
from kernels import TableSpec  # noqa: E402
from kernels.numba_kernel import NumbaKernel  # noqa: E402
from kernels.storage import STORAGE_DTYPES, row_bytes, store  # noqa: E402
from models import write_safetensors  # noqa: E402

STORAGES = ("float32", "float16", "bfloat16", "int8", "int4")


def _torch_calls(weight: np.ndarray, sets: list[tuple[np.ndarray, np.ndarray]]
                 ) -> dict[str, Callable[[int], Any]]:
    import torch

    table = torch.from_numpy(weight)
    packed = {"int8": torch.ops.quantized.embedding_bag_byte_prepack(table),
              "int4": torch.ops.quantized.embedding_bag_4bit_prepack(table)}
    ops = {"int8": torch.ops.quantized.embedding_bag_byte_rowwise_offsets,
           "int4": torch.ops.quantized.embedding_bag_4bit_rowwise_offsets}
    tensors = [(torch.from_numpy(ids), torch.from_numpy(offsets)) for ids, offsets in sets]

    def dense(index: int) -> Any:
        ids, offsets = tensors[index % len(tensors)]
        with torch.inference_mode():
            return torch.nn.functional.embedding_bag(ids, table, offsets, mode="sum",
                                                     include_last_offset=True)

    def quantized(storage: str) -> Callable[[int], Any]:
        def call(index: int) -> Any:
            ids, offsets = tensors[index % len(tensors)]
            return ops[storage](packed[storage], ids, offsets, False, 0, False, None, None,
                                True)
        return call

    return {"torch float32": dense, "torch int8": quantized("int8"),
            "torch int4": quantized("int4")}


def run_kernels(args: argparse.Namespace) -> None:
    print("| table | cache | bags | impl | bytes/row | ms | bags/s | x torch same dtype | "
          "x our float32 |")
    print("|---|---|---:|---|---:|---:|---:|---:|---:|")
    for dim in (int(d) for d in args.dims.split(",")):
        # At most 512 MiB as float32 (past the L3 whatever the dim).
        _run_table(args, min(args.rows, (512 << 20) // (4 * dim)), dim)


def _run_table(args: argparse.Namespace, rows: int, dim: int) -> None:
    import numba
    import torch

    torch.set_num_threads(args.threads)
    numba.set_num_threads(args.threads)
    weight = np.random.default_rng(0).standard_normal((rows, dim), dtype=np.float32)
    kernels = {storage: NumbaKernel(TableSpec(store(weight, storage), "sum"),
                                    num_threads=args.threads) for storage in STORAGES}
    flow = traffic.Traffic("zipf1.1", "poisson", 20)
    label = f"{rows:,} x {dim}"
    print(f"# {platform.machine()}, {args.threads} threads, table {label} "
          f"({weight.nbytes / 2**20:.0f} MiB as float32), {time.strftime('%Y-%m-%d')}")
    for bags in (int(b) for b in args.bags.split(",")):
        for hot in (True, False):
            source = traffic.IdSource(flow.ids, rows, bags)
            sets = []
            count = 1 if hot else ID_SETS
            while len(sets) < count:
                ids, starts, _ = traffic.batch(source, flow, bags)
                sets.append((ids, np.append(starts, ids.size)))
                if not hot and len(sets) == 1:
                    # Cold: enough sets that one cycle's float32 rows are 4x the L3.
                    count = cold_sets(ids.size, 4 * dim)
            calls = _torch_calls(weight, sets)
            for storage, kernel in kernels.items():
                calls[f"ours {storage}"] = (
                    lambda index, k=kernel, s=sets: k(*s[index % len(s)]))
            seconds = measure(calls, args.repeats, len(sets))
            for name, value in seconds.items():
                storage = name.split()[1]
                same = {"float32": "torch float32", "int8": "torch int8",
                        "int4": "torch int4"}.get(storage)
                versus = (f"{seconds[same] / value:.2f}" if name.startswith("ours") and same
                          else "")
                ours = (f"{seconds['ours float32'] / value:.2f}" if name.startswith("ours")
                        else "")
                print(f"| {label} | {'hot' if hot else 'cold'} | {bags} | {name} | "
                      f"{row_bytes(storage, dim)} | {value * 1e3:.4f} | "  # type: ignore[arg-type]
                      f"{bags / value:,.0f} | {versus} | {ours} |", flush=True)


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def _serve(folder: Path, config: str, port: int) -> subprocess.Popen[bytes]:
    path = folder / f"models-{port}.toml"
    path.write_text(config)
    process = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--config",
                                str(path), "--port", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready").status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit("server did not start")


def _touch_every_row(port: int, rows: int) -> None:
    step = 50_000
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        for start in range(0, rows, step):
            ids = list(range(start, min(rows, start + step)))
            bags = [ids[i : i + 500] for i in range(0, len(ids), 500)]
            client.post("/v1/models/m/embed", json={"bags": bags}).raise_for_status()


def run_memory(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        weight = np.random.default_rng(0).standard_normal((args.rows, args.dim),
                                                          dtype=np.float32)
        write_safetensors(folder / "t.safetensors", {"weight": weight})
        write_safetensors(folder / "tiny.safetensors", {"weight": weight[:100, :8].copy()})
        del weight
        port = 18700
        tiny = _serve(folder, '[[models]]\nname = "m"\ncheckpoint = "tiny.safetensors"\n',
                      port)
        base = _rss_kib(tiny.pid)
        tiny.send_signal(signal.SIGTERM)
        tiny.wait()
        print(f"# {args.rows:,} x {args.dim} table, every row touched; baseline: a server "
              f"holding a 100 x 8 table, {base / 1024:.0f} MiB; {time.strftime('%Y-%m-%d')}")
        print("| table_dtype | table bytes | RSS above baseline, MiB | x float32 |")
        print("|---|---:|---:|---:|")
        first = None
        for offset, storage in enumerate(s for s in STORAGE_DTYPES if s != "float64"):
            port += 1 + offset
            process = _serve(folder, f'[[models]]\nname = "m"\ncheckpoint = "t.safetensors"\n'
                             f'mode = "sum"\ntable_dtype = "{storage}"\n', port)
            _touch_every_row(port, args.rows)
            above = (_rss_kib(process.pid) - base) / 1024
            process.send_signal(signal.SIGTERM)
            process.wait()
            first = first or above
            print(f"| {storage} | {args.rows * row_bytes(storage, args.dim):,} | {above:.0f} | "
                  f"{above / first:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=128, help="--memory: the table's dim")
    parser.add_argument("--dims", default="128", help="kernel table dims")
    parser.add_argument("--bags", default="256,2048,16384")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--memory", action="store_true", help="server memory per dtype")
    args = parser.parse_args()
    os.environ.setdefault("BAGSERVE_LOG_LEVEL", "warning")
    if args.memory:
        run_memory(args)
    else:
        run_kernels(args)


if __name__ == "__main__":
    main()
