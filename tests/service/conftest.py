"""In-process service fixtures: small deterministic models behind the real app."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from kernels import Kernel
from models import EmbeddingBag, write_safetensors
from service.app import create_app
from service.config import ModelSpec
from service.registry import LoadedModel
from service.settings import Settings

ROWS, DIM = 50, 8


def table(seed: int = 0, rows: int = ROWS, dim: int = DIM) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)


def loaded(name: str, mode: str = "mean", **options: Any) -> LoadedModel:
    bag = EmbeddingBag.from_pretrained(table(), mode=mode, **options)
    return LoadedModel(ModelSpec(name=name, mode=mode), bag)


class WrappedKernel:
    """A kernel double: delays and/or fails around the real kernel."""

    def __init__(self, inner: Kernel, delay: float = 0.0,
                 fail: Callable[[np.ndarray], bool] | None = None) -> None:
        self.inner, self.delay, self.fail = inner, delay, fail
        # Not a CPU kernel's name: a double that sleeps must not run on the event loop
        # (tiny batches of real CPU kernels do, see Batcher._inline).
        self.name, self.provider, self.spec = "wrapped", inner.provider, inner.spec
        self.calls: list[int] = []

    def __call__(self, indices: np.ndarray, offsets: np.ndarray,
                 per_sample_weights: np.ndarray | None = None) -> np.ndarray:
        self.calls.append(int(offsets.shape[0] - 1))
        if self.delay:
            time.sleep(self.delay)
        if self.fail is not None and self.fail(indices):
            raise RuntimeError("injected kernel fault")
        return self.inner(indices, offsets, per_sample_weights)


class WrappedBag(EmbeddingBag):
    """EmbeddingBag whose kernel is a :class:`WrappedKernel`."""

    wrapped: WrappedKernel

    @property
    def kernel(self) -> Kernel:
        return self.wrapped


def wrapped(name: str, mode: str = "sum", **kernel_options: Any) -> LoadedModel:
    bag = WrappedBag.from_pretrained(table(), mode=mode)
    assert isinstance(bag, WrappedBag)
    bag.wrapped = WrappedKernel(bag._kernel, **kernel_options)
    return LoadedModel(ModelSpec(name=name, mode=mode), bag)


def default_models() -> list[LoadedModel]:
    return [loaded("items", "mean"), loaded("weighted", "sum"), loaded("maxed", "max"),
            loaded("padded", "sum", padding_idx=0), loaded("last", "sum",
                                                           include_last_offset=True)]


@pytest.fixture
def make_client() -> Iterator[Callable[..., TestClient]]:
    clients: list[TestClient] = []

    def make(models: list[LoadedModel] | None = None, **settings: Any) -> TestClient:
        app = create_app(Settings(**settings), models=models or default_models())
        client = TestClient(app, raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client()


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "items.safetensors"
    write_safetensors(path, {"weight": table()})
    return path
