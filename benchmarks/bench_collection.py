"""Collections: the fused pass next to TorchRec's unfused loop, and over HTTP one collection
request next to the single-table requests it replaces.

    python benchmarks/bench_collection.py [--threads 2] [--samples 1,64,512,2048] [--scale 1]
    python benchmarks/bench_collection.py --http [--samples 64] [--requests 200]

The collection is Criteo-like: 26 sparse features over 22 tables (four tables shared by
two features each), dims 16 to 128, rows log-spaced from 1,000 to 4,000,000 (``--scale``
shrinks them), ids Zipf-skewed within each table. Most features are one-hot (one id a
sample), five are multi-hot with ragged bags (Poisson lengths, means 5 to 40, empty bags
included); poolings sum, mean (the histories) and max (one feature).

Kernel: ``FusedCollectionKernel`` on ``--threads`` threads next to what an unfused
``EmbeddingBagCollection`` does, one ``torch.nn.functional.embedding_bag`` per feature
(``include_last_offset=True``) then ``torch.cat``, torch on the same threads, inputs
already split per feature (in its favour); also ``EmbeddingBagCollection`` from the KJT
arrays (layout and id checks included). Interleaved in one process (``bench_kernels.
measure``), 8 id sets cycled so calls do not reuse each other's rows.

``--http``: a ``bagserve serve`` process holding the collection and one single-table model
per table; per round, one collection request of ``--samples`` samples against the 26
single-table requests (one per feature, the shared tables' features as their own
requests) that a client needs without collections, sent one after another on one
keep-alive connection, as a client that must concatenate would.
"""

from __future__ import annotations

import argparse
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
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script

from benchmarks.bench_kernels import measure  # noqa: E402
from models.collection import (  # noqa: E402
    EmbeddingBagCollection,
    EmbeddingBagConfig,
    JaggedFeatures,
)

#: (table rows at scale 1, dim, pooling, features, mean bag length; 0 = one-hot)
TABLES: list[tuple[int, int, str, tuple[str, ...], int]] = []
_ROWS = np.geomspace(1_000, 4_000_000, 22).astype(int)
_DIMS = (16, 32, 64, 128)
for _t in range(22):
    _features: tuple[str, ...] = (f"c{_t}",)
    if _t in (5, 11, 16, 21):
        _features = (f"c{_t}", f"c{_t}_b")  # shared by two features
    _pooling, _mean = "sum", 0
    if _t in (16, 21):
        _pooling, _mean = "mean", 20 if _t == 16 else 40  # histories
    elif _t in (3, 9):
        _mean = 5
    elif _t == 7:
        _pooling, _mean = "max", 8
    TABLES.append((int(_ROWS[_t]), _DIMS[_t % 4], _pooling, _features, _mean))


def collection(scale: float, threads: int, backend: str = "numpy"
               ) -> tuple[EmbeddingBagCollection, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    configs, weights = [], {}
    for t, (rows, dim, pooling, features, _) in enumerate(TABLES):
        rows = max(16, int(rows * scale))
        configs.append(EmbeddingBagConfig(f"t{t}", features, pooling))
        weights[f"t{t}"] = rng.standard_normal((rows, dim), dtype=np.float32)
    return EmbeddingBagCollection(configs, weights, backend=backend,
                                  num_threads=threads), weights


def requests(ebc: EmbeddingBagCollection, samples: int, count: int, seed: int = 1
             ) -> list[JaggedFeatures]:
    """``count`` KJT batches of ``samples`` samples, features in output order."""
    rng = np.random.default_rng(seed)
    means = {f: mean for _, _, _, features, mean in TABLES for f in features}
    out = []
    for _ in range(count):
        values, lengths = [], []
        for feature, table in zip(ebc.keys, ebc.spec.feature_tables, strict=True):
            rows = ebc.spec.tables[table].num_embeddings
            mean = means[feature]
            counts = (np.ones(samples, np.int64) if mean == 0
                      else rng.poisson(mean, samples).astype(np.int64))
            ids = (rng.zipf(1.2, int(counts.sum())) - 1) % rows
            # Zipf's head is id 0..k: scatter it over the table as hashed ids are.
            values.append((ids * 2_654_435_761) % rows)
            lengths.append(counts)
        out.append(JaggedFeatures(ebc.keys, np.concatenate(values).astype(np.int64),
                                  np.stack(lengths)))
    return out


def _torch_loop(ebc: EmbeddingBagCollection, weights: dict[str, np.ndarray],
                batches: list[JaggedFeatures]) -> Any:
    import torch

    tables = [torch.from_numpy(weights[c.name]) for c in ebc.tables]
    modes = [c.pooling for c in ebc.tables]
    split = []
    for batch in batches:
        per_feature, start = [], 0
        for f, table in enumerate(ebc.spec.feature_tables):
            counts = batch.lengths[f]
            end = start + int(counts.sum())
            offsets = np.concatenate([[0], np.cumsum(counts)])
            per_feature.append((table, torch.from_numpy(batch.values[start:end]),
                                torch.from_numpy(offsets)))
            start = end
        split.append(per_feature)

    def call(index: int) -> Any:
        with torch.inference_mode():
            return torch.cat([torch.nn.functional.embedding_bag(
                ids, tables[t], offsets, mode=modes[t], include_last_offset=True)
                for t, ids, offsets in split[index % len(split)]], dim=1)

    return call


def kernel_rows(scale: float, threads: int, samples_list: list[int], repeats: int
                ) -> list[dict[str, Any]]:
    import torch

    torch.set_num_threads(threads)
    ebc, weights = collection(scale, threads)
    ebc.kernel.warm_up()
    kernel = ebc.kernel
    rows = []
    for samples in samples_list:
        batches = requests(ebc, samples, 8)
        laid = [ebc.batch(b).batch for b in batches]
        # Same answers first: a fast wrong kernel is no result.
        torch_call = _torch_loop(ebc, weights, batches)
        np.testing.assert_allclose(ebc.kernel(laid[0].indices, laid[0].offsets),
                                   torch_call(0).numpy(), rtol=1e-5, atol=1e-5)

        def fused(index: int, laid: Any = laid) -> Any:
            batch = laid[index % len(laid)]
            return kernel(batch.indices, batch.offsets)

        def module(index: int, batches: Any = batches) -> Any:
            return ebc(batches[index % len(batches)])

        times = measure({"torch": torch_call, "fused": fused, "module": module}, repeats, 8)
        ids = int(laid[0].indices.shape[0])
        row = {"samples": samples, "ids": ids, **{k: v * 1e3 for k, v in times.items()},
               "fused_x": times["torch"] / times["fused"],
               "module_x": times["torch"] / times["module"]}
        rows.append(row)
        print(f"{samples:>6} samples {ids:>8} ids  torch {row['torch']:8.3f} ms  fused "
              f"{row['fused']:8.3f} ms ({row['fused_x']:.2f}x)  module "
              f"{row['module']:8.3f} ms ({row['module_x']:.2f}x)", flush=True)
    return rows


def http_rows(scale: float, samples: int, rounds: int) -> None:
    import httpx

    from benchmarks.bench_load import _start, _stop, scratch
    from models import write_safetensors
    from tests.integration.conftest import BAGSERVE, free_port

    ebc, weights = collection(scale, 1)
    folder = scratch("bench-collection-")
    write_safetensors(folder / "ebc.safetensors",
                      {f"embedding_bags.{name}.weight": w for name, w in weights.items()})
    lines = ['[[models]]', 'name = "ranker"', 'checkpoint = "ebc.safetensors"']
    for config in ebc.tables:
        lines += ["[[models.tables]]", f'name = "{config.name}"',
                  f"features = {list(config.feature_names)!r}".replace("'", '"'),
                  f'pooling = "{config.pooling}"']
    for config in ebc.tables:
        lines += ["[[models]]", f'name = "{config.name}"', 'checkpoint = "ebc.safetensors"',
                  f'tensor = "embedding_bags.{config.name}.weight"',
                  f'mode = "{config.pooling}"']
    (folder / "models.toml").write_text("\n".join(lines) + "\n")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = _start([BAGSERVE, "serve", "--config", str(folder / "models.toml"), "--port",
                     str(port)], f"{url}/v2/health/ready")
    try:
        batches = requests(ebc, samples, 16)
        bodies = []
        for batch in batches:
            features, single, start = {}, [], 0
            for f, (key, table) in enumerate(zip(ebc.keys, ebc.spec.feature_tables,
                                                 strict=True)):
                counts = batch.lengths[f]
                ids = batch.values[start : start + int(counts.sum())].tolist()
                start += int(counts.sum())
                bags, at = [], 0
                for c in counts.tolist():
                    bags.append(ids[at : at + c])
                    at += c
                features[key] = bags
                single.append((ebc.tables[table].name, {"bags": bags}))
            bodies.append(({"features": features}, single))
        with httpx.Client(base_url=url, timeout=30) as client:
            for form, encoding in (("keyed", "float"), ("keyed", "base64"),
                                   ("kjt", "base64")):
                _http_cell(client, bodies, batches, ebc.keys, form, encoding, rounds,
                           samples)
        _triton_cell(url, ebc, batches, rounds, samples)
        _client_cells(url, ebc, batches[0], samples)
    finally:
        _stop(server)


def _http_cell(client: Any, bodies: list[Any], batches: list[JaggedFeatures],
               keys: tuple[str, ...], form: str, encoding: str, rounds: int, samples: int
               ) -> None:
    """Median time of one collection request and of its 26 single-table requests, each
    round the one then the others; both answer in ``encoding``."""
    one, many = [], []
    for round_ in range(rounds + 5):
        collection_body, single = bodies[round_ % len(bodies)]
        if form == "kjt":
            batch = batches[round_ % len(batches)]
            collection_body = {"kjt": {"keys": list(keys), "values": batch.values.tolist(),
                                       "lengths": batch.lengths.reshape(-1).tolist()}}
        start = time.perf_counter()
        answer = client.post("/v1/models/ranker/embed",
                             json={**collection_body, "encoding": encoding})
        middle = time.perf_counter()
        parts = [client.post(f"/v1/models/{name}/embed", json={**body, "encoding": encoding})
                 for name, body in single]
        end = time.perf_counter()
        assert answer.status_code == 200 and all(p.status_code == 200 for p in parts)
        if round_ >= 5:
            one.append(middle - start)
            many.append(end - middle)
    if encoding == "float":
        joined = np.concatenate([np.array(p.json()["embeddings"], np.float32) for p in parts],
                                axis=1)
        np.testing.assert_allclose(np.array(answer.json()["embeddings"], np.float32), joined,
                                   rtol=1e-6, atol=1e-6)
    a, b = statistics.median(one) * 1e3, statistics.median(many) * 1e3
    print(f"HTTP {samples:>4} samples, {form:>5} {encoding:>6}: one collection request "
          f"{a:6.2f} ms, {len(single)} single-table requests {b:6.2f} ms: {b / a:5.1f}x",
          flush=True)


def _triton_cell(url: str, ebc: EmbeddingBagCollection, batches: list[JaggedFeatures],
                 rounds: int, samples: int) -> None:
    """As :func:`_http_cell` with ``tritonclient.http`` and binary tensors both ways: one
    infer with every ``<feature>__values`` / ``__lengths`` against one infer per feature
    (``indices`` + ``offsets``) on the tables' own models."""
    import tritonclient.http as triton

    client = triton.InferenceServerClient(url=url.removeprefix("http://"))
    output = [triton.InferRequestedOutput("embeddings", binary_data=True)]

    def tensor(name: str, array: np.ndarray, datatype: str) -> Any:
        item = triton.InferInput(name, list(array.shape), datatype)
        item.set_data_from_numpy(array, binary_data=True)
        return item

    requests_ = []
    for batch in batches:
        inputs, single, start = [], [], 0
        for f, (key, table) in enumerate(zip(ebc.keys, ebc.spec.feature_tables, strict=True)):
            counts = batch.lengths[f]
            ids = batch.values[start : start + int(counts.sum())]
            start += int(counts.sum())
            inputs += [tensor(f"{key}__values", ids, "INT64"),
                       tensor(f"{key}__lengths", counts, "INT64")]
            offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
            single.append((ebc.tables[table].name, [tensor("indices", ids, "INT64"),
                                                     tensor("offsets", offsets, "INT64")]))
        requests_.append((inputs, single))
    one, many = [], []
    for round_ in range(rounds + 5):
        inputs, single = requests_[round_ % len(requests_)]
        start = time.perf_counter()
        answer = client.infer("ranker", inputs, outputs=output).as_numpy("embeddings")
        middle = time.perf_counter()
        parts = [client.infer(name, items, outputs=output).as_numpy("embeddings")
                 for name, items in single]
        end = time.perf_counter()
        if round_ >= 5:
            one.append(middle - start)
            many.append(end - middle)
    np.testing.assert_allclose(answer, np.concatenate(parts, axis=1), rtol=1e-6, atol=1e-6)
    client.close()
    a, b = statistics.median(one) * 1e3, statistics.median(many) * 1e3
    print(f"HTTP {samples:>4} samples, kserve binary (tritonclient): one collection request "
          f"{a:6.2f} ms, {len(ebc.keys)} single-table requests {b:6.2f} ms: {b / a:5.1f}x",
          flush=True)


def _hey(url: str, body: bytes, headers: list[str]) -> float:
    """Median milliseconds of 1,000 requests of ``body`` from ``hey`` on one connection
    (hey prints them to 0.1 ms)."""
    with tempfile.NamedTemporaryFile(suffix=".body") as file:
        file.write(body)
        file.flush()
        extra = [part for header in headers for part in ("-H", header)]
        output = subprocess.run(["hey", "-n", "1000", "-c", "1", "-m", "POST", "-T",
                                 "application/json", *extra, "-D", file.name, url],
                                capture_output=True, text=True, check=True).stdout
    match = re.search(r"50%+ in ([\d.]+)", output)
    assert match is not None and "[200]" in output and output.count("responses") == 1, output
    return float(match.group(1)) * 1e3


WRK_SCRIPT = """
local f = io.open("{body}", "rb")
wrk.body = f:read("*all")
f:close()
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
{headers}
"""


def _wrk(url: str, body: bytes, headers: list[str]) -> float:
    """Median milliseconds of ``body`` sent for 2 s by ``wrk`` (C) on one connection (wrk
    prints them to 0.01 ms)."""
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "body").write_bytes(body)
        lines = [f'wrk.headers["{name}"] = "{value.strip()}"'
                 for name, _, value in (h.partition(":") for h in headers)]
        script = Path(folder) / "script.lua"
        script.write_text(WRK_SCRIPT.format(body=Path(folder) / "body",
                                            headers="\n".join(lines)))
        output = subprocess.run(["wrk", "-t", "1", "-c", "1", "-d", "2s", "--latency", "-s",
                                 str(script), url], capture_output=True, text=True,
                                check=True).stdout
    match = re.search(r"^\s+50%\s+([\d.]+)(us|ms|s)\s*$", output, re.M)
    assert match is not None and "Non-2xx" not in output, output
    return float(match.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[match.group(2)]


def _kserve_body(parts: list[tuple[str, np.ndarray, str]]) -> tuple[bytes, list[str]]:
    inputs, tail = [], b""
    for name, array, datatype in parts:
        inputs.append({"name": name, "datatype": datatype, "shape": [int(array.shape[0])],
                       "parameters": {"binary_data_size": array.nbytes}})
        tail += array.tobytes()
    head = orjson.dumps({"inputs": inputs, "outputs": [
        {"name": "embeddings", "parameters": {"binary_data": True}}]})
    return head + tail, [f"Inference-Header-Content-Length: {len(head)}"]


def _client_cells(url: str, ebc: EmbeddingBagCollection, batch: JaggedFeatures,
                  samples: int) -> None:
    """Server and wire time without a Python client: ``hey`` (Go) and ``wrk`` (C) send one
    collection request, then each single-table request, on one connection; the sum of
    the 26 medians against the collection's. Binary KServe tensors, and KJT JSON answered
    in raw bytes."""
    parts, singles, start = [], [], 0
    for f, (key, table) in enumerate(zip(ebc.keys, ebc.spec.feature_tables, strict=True)):
        counts = batch.lengths[f].astype(np.int64)
        ids = batch.values[start : start + int(counts.sum())]
        start += int(counts.sum())
        parts += [(f"{key}__values", ids, "INT64"), (f"{key}__lengths", counts, "INT64")]
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        bags = np.split(ids, np.cumsum(counts)[:-1])
        singles.append((ebc.tables[table].name,
                        _kserve_body([("indices", ids, "INT64"), ("offsets", starts, "INT64")]),
                        orjson.dumps({"bags": [bag.tolist() for bag in bags]})))
    body, headers = _kserve_body(parts)
    raw = ["Accept: application/octet-stream"]
    kjt = orjson.dumps({"kjt": {"keys": list(ebc.keys), "values": batch.values.tolist(),
                                "lengths": batch.lengths.reshape(-1).tolist()}})
    for tool, median in (("hey", _hey), ("wrk", _wrk)):
        if not shutil.which(tool):
            continue
        one = median(f"{url}/v2/models/ranker/infer", body, headers)
        many = sum(median(f"{url}/v2/models/{name}/infer", *kserve)
                   for name, kserve, _ in singles)
        print(f"HTTP {samples:>4} samples, kserve binary ({tool}): one collection request "
              f"{one:6.2f} ms, {len(singles)} single-table requests {many:6.2f} ms: "
              f"{many / one:5.1f}x", flush=True)
        one = median(f"{url}/v1/models/ranker/embed", kjt, raw)
        many = sum(median(f"{url}/v1/models/{name}/embed", bags, raw)
                   for name, _, bags in singles)
        print(f"HTTP {samples:>4} samples,   kjt  bytes ({tool}): one collection request "
              f"{one:6.2f} ms, {len(singles)} single-table requests {many:6.2f} ms: "
              f"{many / one:5.1f}x", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--samples", default="1,64,512,2048")
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--http", action="store_true")
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}, scale {args.scale}")
    samples = [int(s) for s in args.samples.split(",")]
    if args.http:
        for count in samples:
            http_rows(args.scale, count, args.requests)
    else:
        kernel_rows(args.scale, args.threads, samples, args.repeats)


if __name__ == "__main__":
    main()
