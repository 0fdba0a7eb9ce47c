"""Regenerate the storage fixtures with PyTorch (a tool here, never a dependency).

    pip install torch==2.13.0 && python tests/golden/make_quantized.py

Writes ``quantized.npz`` next to this file:
- ``<name>/weight``: float32 tables (one with a constant row and one with a range that
  underflows float16, the quantizers' corner cases);
- ``<name>/byte``, ``<name>/4bit``: ``torch.ops.quantized.embedding_bag_byte_prepack`` /
  ``embedding_bag_4bit_prepack`` of it (4-bit only for even dims: PyTorch refuses odd
  ones), and ``<name>/byte_unpacked``, ``<name>/4bit_unpacked``, their dequantized tables;
- ``<name>/float16``, ``<name>/bfloat16``: ``weight.half()`` and ``weight.bfloat16()``
  bit patterns (uint16);
- calls ``<name>/<call>/{input,offsets,per_sample_weights}`` and what PyTorch answers:
  ``byte_sum`` / ``4bit_sum`` from the ``*_rowwise_offsets`` ops (sum, weighted sum,
  int32 and int64 ids, ``include_last_offset``), ``<storage>_<mode>`` from
  ``embedding_bag`` on the dequantized (int8/int4) or widened (float16/bfloat16) table.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).parent
MODES = ("sum", "mean", "max")


def _tables(rng: np.random.Generator) -> dict[str, np.ndarray]:
    wide = rng.standard_normal((40, 16)).astype(np.float32) * 3
    wide[3] = 1.5  # constant row: scale 0 (int8) or 1 (int4)
    wide[5] = rng.standard_normal(16).astype(np.float32) * 1e-9  # scale underflows float16
    odd = rng.standard_normal((20, 7)).astype(np.float32)
    small = rng.standard_normal((12, 6)).astype(np.float32)
    return {"wide": wide, "odd": odd, "small": small}


def _calls(rng: np.random.Generator, rows: int) -> dict[str, dict[str, np.ndarray]]:
    calls = {}
    for index_dtype in (np.int64, np.int32):
        for last in (False, True):
            for weighted in (False, True):
                lengths = rng.integers(0, 7, 9)  # empty bags included
                starts = np.concatenate(([0], np.cumsum(lengths)))
                ids = rng.integers(0, rows, int(starts[-1])).astype(index_dtype)
                call = {"input": ids,
                        "offsets": (starts if last else starts[:-1]).astype(index_dtype)}
                if weighted:
                    call["per_sample_weights"] = rng.standard_normal(ids.size).astype(
                        np.float32)
                name = (f"{np.dtype(index_dtype).name}{'_last' if last else ''}"
                        f"{'_weighted' if weighted else ''}")
                calls[name] = call
    return calls


def _torch_bag(table: torch.Tensor, call: dict[str, np.ndarray], mode: str,
               last: bool) -> np.ndarray:
    weights = call.get("per_sample_weights")
    return torch.nn.functional.embedding_bag(
        torch.from_numpy(call["input"]), table, torch.from_numpy(call["offsets"]), mode=mode,
        include_last_offset=last,
        per_sample_weights=None if weights is None else torch.from_numpy(weights)).numpy()


def main() -> None:
    rng = np.random.default_rng(20261125)
    arrays: dict[str, np.ndarray] = {}
    ops = torch.ops.quantized
    for name, weight in _tables(rng).items():
        arrays[f"{name}/weight"] = weight
        source = torch.from_numpy(weight)
        packed = {"byte": ops.embedding_bag_byte_prepack(source)}
        if weight.shape[1] % 2 == 0:
            packed["4bit"] = ops.embedding_bag_4bit_prepack(source)
        unpacked = {"byte": ops.embedding_bag_byte_unpack(packed["byte"])}
        if "4bit" in packed:
            unpacked["4bit"] = ops.embedding_bag_4bit_unpack(packed["4bit"])
        for kind in packed:
            arrays[f"{name}/{kind}"] = packed[kind].numpy()
            arrays[f"{name}/{kind}_unpacked"] = unpacked[kind].numpy()
        half = {"float16": source.half(), "bfloat16": source.bfloat16()}
        arrays[f"{name}/float16"] = half["float16"].view(torch.int16).numpy().view(np.uint16)
        arrays[f"{name}/bfloat16"] = half["bfloat16"].view(torch.int16).numpy().view(
            np.uint16)
        for call_name, call in _calls(rng, weight.shape[0]).items():
            last = "_last" in call_name
            weighted = "per_sample_weights" in call
            for key, value in call.items():
                arrays[f"{name}/{call_name}/{key}"] = value
            for kind in packed:
                op = (ops.embedding_bag_byte_rowwise_offsets if kind == "byte"
                      else ops.embedding_bag_4bit_rowwise_offsets)
                weights = call.get("per_sample_weights")
                arrays[f"{name}/{call_name}/{kind}_sum"] = op(
                    packed[kind], torch.from_numpy(call["input"]),
                    torch.from_numpy(call["offsets"]), False, 0, False,
                    None if weights is None else torch.from_numpy(weights), None,
                    last).numpy()
            tables = {kind: unpacked[kind] for kind in unpacked}
            tables.update({kind: table.float() for kind, table in half.items()})
            for kind, table in tables.items():
                for mode in (("sum",) if weighted else MODES):
                    arrays[f"{name}/{call_name}/{kind}_{mode}_dequantized"] = _torch_bag(
                        table, call, mode, last)
    np.savez_compressed(HERE / "quantized.npz", **arrays)
    print(f"wrote {len(arrays)} arrays to {HERE / 'quantized.npz'}")


if __name__ == "__main__":
    main()
