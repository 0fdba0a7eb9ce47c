"""Write the collection golden fixtures (needs torch; not a dependency of the project).

TorchRec's ``EmbeddingBagCollection.forward`` pools each feature with one
``torch.nn.functional.embedding_bag`` call over the feature's slice of the
KeyedJaggedTensor (``include_last_offset=True``, the table's pooling, the KJT's weights
for weighted tables) and concatenates the results, tables in config order and each
table's features in its ``feature_names`` order. ``torchrec`` cannot load its fbgemm ops
beside torch 2.13 here, so this follows that documented forward with plain torch; the
state-dict keys (``embedding_bags.<table>.weight``) are TorchRec's.

Each case directory holds the checkpoint, ``config.toml`` (the service's config),
``request.json`` (keyed features and weights) and ``expected.npy`` (``[B, sum of dims]``).

    python tests/golden/make_collections.py
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).parent / "collections"


def _bags(rng: np.random.Generator, samples: int, rows: int, longest: int,
          oov: int = 0) -> list[list[int]]:
    """Ragged bags with empty ones; ``oov`` ids per feature beyond the table."""
    bags = [[int(x) for x in rng.integers(0, rows, rng.integers(0, longest + 1))]
            for _ in range(samples)]
    for _ in range(oov):
        bag = bags[int(rng.integers(0, samples))]
        bag.insert(int(rng.integers(0, len(bag) + 1)), int(rows + rng.integers(0, 50)))
    return bags


def _pool(weight: np.ndarray, bags: list[list[int]], pooling: str,
          weights: list[list[float]] | None, padding_idx: int | None, oov: str
          ) -> np.ndarray:
    """One feature as TorchRec pools it (after the table's oov policy)."""
    rows = weight.shape[0]
    if oov == "hash":
        bags = [[i % rows for i in bag] for bag in bags]
    elif oov == "zero":
        keep = [[0 <= i < rows for i in bag] for bag in bags]
        if weights is not None:
            weights = [[w for w, k in zip(ws, ks, strict=True) if k]
                       for ws, ks in zip(weights, keep, strict=True)]
        bags = [[i for i, k in zip(bag, ks, strict=True) if k]
                for bag, ks in zip(bags, keep, strict=True)]
    values = torch.tensor([i for bag in bags for i in bag], dtype=torch.long)
    offsets = torch.tensor(np.cumsum([0] + [len(b) for b in bags]), dtype=torch.long)
    per_sample = (None if weights is None else
                  torch.tensor([w for ws in weights for w in ws], dtype=torch.float32))
    pooled = torch.nn.functional.embedding_bag(
        values, torch.from_numpy(weight), offsets, mode=pooling, per_sample_weights=per_sample,
        include_last_offset=True, padding_idx=padding_idx)
    return pooled.numpy()


def _case(name: str, tables: list[dict[str, Any]], samples: int, seed: int,
          fmt: str = "pt") -> None:
    rng = np.random.default_rng(seed)
    folder = HERE / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    state: dict[str, torch.Tensor] = {}
    features: dict[str, list[list[int]]] = {}
    weights: dict[str, list[list[float]]] = {}
    pooled = []
    for table in tables:
        weight = rng.standard_normal((table["rows"], table["dim"])).astype(np.float32)
        if table.get("padding_idx") is not None:
            weight[table["padding_idx"]] = 0
        state[f"embedding_bags.{table['name']}.weight"] = torch.from_numpy(weight)
        for feature in table["features"]:
            bags = _bags(rng, samples, table["rows"], table.get("longest", 4),
                         table.get("oov_ids", 0))
            if table.get("padding_idx") is not None:
                for bag in bags[::3]:
                    bag.append(table["padding_idx"])
            features[feature] = bags
            w = None
            if table.get("weighted"):
                w = [[round(float(x), 3) for x in rng.uniform(0.1, 2.0, len(bag))]
                     for bag in bags]
                weights[feature] = w
            pooled.append(_pool(weight, bags, table["pooling"], w, table.get("padding_idx"),
                                table.get("oov", "error")))
    # Request keys in an order other than the output's: the service must reorder them.
    order = list(features)[::-1]
    request = {"features": {k: features[k] for k in order}, "weights": weights}
    (folder / "request.json").write_text(json.dumps(request))
    np.save(folder / "expected.npy", np.concatenate(pooled, axis=1))
    checkpoint = "ebc.pt" if fmt == "pt" else "ebc.safetensors"
    if fmt == "pt":
        # TorchRec's module tree: ``embedding_bags`` is a ModuleDict of one EmbeddingBag
        # per table, so ``state_dict()`` is the OrderedDict (with its ``_metadata``)
        # that ``torch.save(ebc.state_dict())`` writes.
        module = torch.nn.Module()
        module.embedding_bags = torch.nn.ModuleDict({
            key.split(".")[1]: torch.nn.EmbeddingBag.from_pretrained(tensor)
            for key, tensor in state.items()})
        torch.save(module.state_dict(), folder / checkpoint)
    else:
        from safetensors.torch import save_file

        save_file(state, str(folder / checkpoint))
    lines = ["[[models]]", f'name = "{name}"', f'checkpoint = "{checkpoint}"', 'backend = "numpy"']
    for table in tables:
        lines += ["", "[[models.tables]]", f'name = "{table["name"]}"',
                  f"features = {json.dumps(table['features'])}",
                  f'pooling = "{table["pooling"]}"']
        for key in ("padding_idx", "oov"):
            if key in table:
                lines.append(f"{key} = {json.dumps(table[key])}")
    (folder / "config.toml").write_text("\n".join(lines) + "\n")


def main() -> None:
    _case("ranker", [
        {"name": "t_user", "rows": 40, "dim": 8, "features": ["user_id"], "pooling": "sum",
         "longest": 1},
        {"name": "t_item", "rows": 60, "dim": 12, "features": ["history", "candidates"],
         "pooling": "mean", "longest": 6},
        {"name": "t_cat", "rows": 10, "dim": 5, "features": ["category"], "pooling": "max"},
        {"name": "t_tag", "rows": 30, "dim": 4, "features": ["tags"], "pooling": "sum",
         "weighted": True},
    ], samples=9, seed=1)
    _case("padded", [
        {"name": "t_words", "rows": 25, "dim": 16, "features": ["title", "body"],
         "pooling": "mean", "padding_idx": 0, "longest": 8},
        {"name": "t_max", "rows": 20, "dim": 3, "features": ["clicks"], "pooling": "max",
         "padding_idx": 19},
        {"name": "t_sum", "rows": 15, "dim": 7, "features": ["query"], "pooling": "sum",
         "padding_idx": 2, "weighted": True},
    ], samples=7, seed=2, fmt="safetensors")
    _case("hashed", [
        {"name": "t_hash", "rows": 17, "dim": 6, "features": ["site", "app"],
         "pooling": "sum", "oov": "hash", "oov_ids": 4},
        {"name": "t_skip", "rows": 23, "dim": 10, "features": ["device"], "pooling": "mean",
         "oov": "zero", "oov_ids": 3},
        {"name": "t_plain", "rows": 9, "dim": 2, "features": ["hour"], "pooling": "max"},
    ], samples=6, seed=3)


if __name__ == "__main__":
    main()
