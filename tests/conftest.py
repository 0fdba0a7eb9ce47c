"""Shared fixtures: golden cases and the CPU implementations every result is held to."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from kernels import TableSpec, make_kernel, numba_kernel
from models import EmbeddingBag, flatten_inputs

GOLDEN = Path(__file__).parent / "golden"

#: Ways to run a call: the pinned API, each CPU kernel directly, ONNX Runtime's CPU EP.
IMPLEMENTATIONS = ("api", "numba", "numpy", "onnx")


@pytest.fixture(autouse=True)
def _kernel_threads_reset() -> Any:
    """A service built in a test marks the test's thread serial for numba kernels (as it
    marks the event loop's in a server); later tests calling kernels on that thread must
    still reach the parallel loops."""
    yield
    numba_kernel._thread_state.__dict__.pop("parallel_min_bytes", None)


@dataclass(frozen=True)
class GoldenCase:
    name: str
    options: dict[str, Any]
    arrays: dict[str, npt.NDArray[Any]]

    @property
    def call(self) -> tuple[Any, Any, Any]:
        return (self.arrays["input"], self.arrays.get("offsets"),
                self.arrays.get("per_sample_weights"))


def load_golden() -> list[GoldenCase]:
    manifest = json.loads((GOLDEN / "cases.json").read_text())
    with np.load(GOLDEN / "cases.npz") as archive:
        arrays = {key: archive[key] for key in archive.files}
    return [GoldenCase(entry["name"], entry["options"],
                       {key.split("/", 1)[1]: value for key, value in arrays.items()
                        if key.startswith(entry["name"] + "/")})
            for entry in manifest]


def runner(implementation: str, weight: npt.NDArray[Any], **options: Any
           ) -> Callable[..., npt.NDArray[Any]]:
    """A callable ``(input, offsets, per_sample_weights) -> (B, D)`` for one implementation.

    ``api`` goes through ``EmbeddingBag.from_pretrained``; the others validate with the
    same ``flatten_inputs`` and call one kernel directly.
    """
    bag = EmbeddingBag.from_pretrained(weight, **options)
    if implementation == "api":
        return bag
    spec = TableSpec(bag.table, bag.mode, bag.padding_idx)
    if implementation == "onnx":
        kernel = make_kernel(spec, "onnx", device="cpu")
    else:
        kernel = make_kernel(spec, "numpy", fused=implementation == "numba")

    def call(input: Any, offsets: Any = None, per_sample_weights: Any = None) -> Any:
        batch = flatten_inputs(input, offsets, per_sample_weights,
                               num_embeddings=bag.num_embeddings, mode=bag.mode,
                               include_last_offset=bag.include_last_offset,
                               dtype=bag.compute_dtype)
        return kernel(batch.indices, batch.offsets, batch.per_sample_weights)

    return call


@pytest.fixture(params=IMPLEMENTATIONS)
def implementation(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def assert_close_to_bag(actual: npt.NDArray[Any], expected: npt.NDArray[Any],
                        scale: npt.NDArray[Any] | None = None, rtol: float = 1e-6) -> None:
    """Equal within ``rtol`` of each bag's magnitude (float32 sums in another order drift)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    magnitude = np.abs(expected) if scale is None else scale
    bound = rtol * np.maximum(magnitude.max(axis=1, keepdims=True, initial=0), 1.0)
    error = np.abs(actual.astype(np.float64) - expected)
    np.testing.assert_array_less(error, np.broadcast_to(bound + 1e-12, error.shape))
