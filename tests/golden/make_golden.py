"""Regenerate the golden fixtures with PyTorch (a tool here, never a dependency).

    pip install torch==2.13.0 && python tests/golden/make_golden.py

Writes, next to this file:
- ``cases.json`` + ``cases.npz``: EmbeddingBag calls and ``torch.nn.EmbeddingBag``'s
  outputs (every mode and option, 1-D and 2-D input, empty bags, float32 and float64);
- ``checkpoints/hostile/``: tiny files that claim huge or endlessly nested tables;
- ``checkpoints/``: small ``torch.save`` files (state dict, nested, bare tensor,
  non-contiguous, bfloat16, float16, compressed) and their expected tables.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).parent


def _case(rng: np.random.Generator, *, mode: str, dtype: str = "float32", two_d: bool = False,
          padding_idx: int | None = None, weighted: bool = False, include_last_offset: bool =
          False, max_norm: float | None = None, norm_type: float = 2.0, empty_bags: bool =
          False, num_embeddings: int = 13, dim: int = 5, bags: int = 6, int32: bool = False,
          empty_input: bool = False, cancelling: bool = False) -> tuple[dict[str, Any],
                                                                         dict[str, np.ndarray]]:
    weight = rng.standard_normal((num_embeddings, dim)).astype(dtype)
    if cancelling:
        weight[::2] *= 1e4
        weight[1::2] = -weight[::2][: num_embeddings // 2] + rng.standard_normal(
            (num_embeddings // 2, dim)).astype(dtype)
    if two_d:
        ids = rng.integers(0, num_embeddings, (bags, 4))
        offsets = None
    else:
        lengths = rng.integers(0 if empty_bags else 1, 6, bags)
        if empty_input:
            lengths[:] = 0
        ids = rng.integers(0, num_embeddings, int(lengths.sum()))
        starts = np.concatenate(([0], np.cumsum(lengths)))
        offsets = starts if include_last_offset else starts[:-1]
    if padding_idx is not None and ids.size:
        flat = ids.reshape(-1)
        flat[rng.random(flat.size) < 0.3] = padding_idx % num_embeddings
        if not two_d and offsets is not None and len(lengths) > 1 and lengths[1]:
            flat[starts[1] : starts[2]] = padding_idx % num_embeddings  # a bag of only padding
    weights = rng.standard_normal(ids.shape).astype(dtype) if weighted else None
    index_dtype = np.int32 if int32 else np.int64
    module = torch.nn.EmbeddingBag.from_pretrained(
        torch.from_numpy(weight.copy()), mode=mode, padding_idx=padding_idx,
        include_last_offset=include_last_offset, max_norm=max_norm, norm_type=norm_type)
    expected = module(torch.from_numpy(ids.astype(index_dtype)),
                      None if offsets is None else torch.from_numpy(offsets.astype(index_dtype)),
                      None if weights is None else torch.from_numpy(weights)).detach().numpy()
    options = {"mode": mode, "padding_idx": padding_idx,
               "include_last_offset": include_last_offset, "max_norm": max_norm,
               "norm_type": norm_type}
    arrays = {"weight": weight, "input": ids.astype(index_dtype), "expected": expected}
    if offsets is not None:
        arrays["offsets"] = offsets.astype(index_dtype)
    if weights is not None:
        arrays["per_sample_weights"] = weights
    return options, arrays


def make_cases() -> None:
    rng = np.random.default_rng(20261124)
    specs: list[dict[str, Any]] = []
    for mode in ("sum", "mean", "max"):
        for two_d in (False, True):
            for dtype in ("float32", "float64"):
                specs.append({"mode": mode, "two_d": two_d, "dtype": dtype})
            for padding_idx in (0, 4, -1, -13):
                specs.append({"mode": mode, "two_d": two_d, "padding_idx": padding_idx})
            for max_norm, norm_type in ((1.0, 2.0), (0.5, 1.0), (2.0, 0.5), (0.7, float("inf")),
                                        (1.5, 3.0)):
                specs.append({"mode": mode, "two_d": two_d, "max_norm": max_norm,
                              "norm_type": norm_type})
        specs += [
            {"mode": mode, "empty_bags": True},
            {"mode": mode, "empty_bags": True, "include_last_offset": True},
            {"mode": mode, "include_last_offset": True, "padding_idx": 2},
            {"mode": mode, "empty_input": True},
            {"mode": mode, "empty_input": True, "include_last_offset": True},
            {"mode": mode, "int32": True},
            {"mode": mode, "cancelling": True, "bags": 20},
            {"mode": mode, "num_embeddings": 300, "dim": 33, "bags": 40},
            {"mode": mode, "padding_idx": 1, "max_norm": 1.0, "empty_bags": True},
        ]
    for two_d in (False, True):
        for dtype in ("float32", "float64"):
            specs.append({"mode": "sum", "weighted": True, "two_d": two_d, "dtype": dtype})
        specs += [
            {"mode": "sum", "weighted": True, "two_d": two_d, "padding_idx": 3},
            {"mode": "sum", "weighted": True, "two_d": two_d, "max_norm": 1.0},
        ]
    specs += [
        {"mode": "sum", "weighted": True, "empty_bags": True, "include_last_offset": True},
        {"mode": "sum", "weighted": True, "empty_input": True},
    ]
    manifest, arrays = [], {}
    for number, spec in enumerate(specs):
        options, case_arrays = _case(rng, **spec)
        name = f"case{number:03d}"
        manifest.append({"name": name, "spec": spec, "options": options})
        arrays.update({f"{name}/{key}": value for key, value in case_arrays.items()})
    (HERE / "cases.json").write_text(json.dumps(manifest, indent=1) + "\n")
    np.savez_compressed(HERE / "cases.npz", **arrays)
    print(f"wrote {len(manifest)} cases")


def make_checkpoints() -> None:
    folder = HERE / "checkpoints"
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(7)
    table = torch.from_numpy(rng.standard_normal((11, 6)).astype(np.float32))
    expected: dict[str, np.ndarray] = {}

    module = torch.nn.EmbeddingBag.from_pretrained(table, mode="sum")
    torch.save(module.state_dict(), folder / "state_dict.pt")
    expected["state_dict.pt"] = table.numpy()
    torch.save({"model": {"emb": {"weight": table.double()}, "step": 3},
                "bias": torch.zeros(6)}, folder / "nested.pth")
    expected["nested.pth"] = table.double().numpy()
    torch.save(table.t().contiguous().t(), folder / "transposed.pt")  # non-contiguous strides
    expected["transposed.pt"] = table.numpy()
    torch.save(table[2:9], folder / "view.bin")  # a view: non-zero storage offset
    expected["view.bin"] = table[2:9].numpy()
    torch.save({"weight": table.bfloat16()}, folder / "bfloat16.pt")
    expected["bfloat16.pt"] = table.bfloat16().float().numpy()
    torch.save({"weight": table.half()}, folder / "float16.pt")
    expected["float16.pt"] = table.half().float().numpy()
    torch.save(torch.nn.Parameter(table), folder / "parameter.pt")
    expected["parameter.pt"] = table.numpy()
    # The same archive re-packed with deflate: read without memory mapping.
    with zipfile.ZipFile(folder / "state_dict.pt") as source, \
            zipfile.ZipFile(folder / "compressed.pt", "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            target.writestr(info.filename, source.read(info))
    expected["compressed.pt"] = table.numpy()
    np.savez(folder / "expected.npz", **expected)
    print(f"wrote {len(expected)} checkpoints")


def make_hostile() -> None:
    """``checkpoints/hostile/``: small torch.save files that must be refused quickly."""
    folder = HERE / "checkpoints" / "hostile"
    folder.mkdir(parents=True, exist_ok=True)
    # One stored row viewed as 10**12 rows (stride 0): 512 bytes claiming 512 TB.
    torch.save({"weight": torch.zeros(1, 128).expand(10**12, 128)}, folder / "expanded.pt")
    # One container shared twice at each of 40 levels: 2**40 paths to one tensor.
    tree: object = [torch.ones(3, 2)]
    for _ in range(40):
        tree = [tree, tree]
    torch.save({"tree": tree}, folder / "shared.pt")
    print("wrote hostile checkpoints")


if __name__ == "__main__":
    make_cases()
    make_checkpoints()
    make_hostile()
