"""The heap policy: batch-sized buffers are reused, not faulted in again per batch."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from service.heap import _glibc

pytestmark = pytest.mark.skipif(_glibc() is None, reason="not glibc")

# What a kernel call does to the heap: a 1 MB result and two 512 KB scratch arrays,
# allocated, written and freed once per batch.
CHURN = textwrap.dedent("""
    import resource, sys
    import numpy as np
    from service.heap import keep_batch_buffers

    if sys.argv[1] == "keep":
        assert keep_batch_buffers()

    def batch():
        out = np.zeros((2048, 128), np.float32)
        positions = np.arange(65536, dtype=np.int64)
        ids = positions * 2
        out[:] = 1.0
        del positions, ids

    for _ in range(5):
        batch()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(100):
        batch()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 100)
""")


def _faults_per_batch(policy: str) -> float:
    done = subprocess.run([sys.executable, "-c", CHURN, policy], capture_output=True,
                          text=True, check=True)
    return float(done.stdout)


def test_batch_buffers_are_reused_without_page_faults() -> None:
    default, kept = _faults_per_batch("default"), _faults_per_batch("keep")
    assert kept < 1, kept
    # The check has teeth: glibc's defaults fault the pages in again on every batch.
    assert default > 100, default


def test_a_started_app_hides_its_long_lived_objects_from_the_collector() -> None:
    import gc

    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    gc.unfreeze()
    with TestClient(create_app(Settings())) as client:
        assert client.post("/v1/models/demo/embed", json={"bags": [[1]]}).status_code == 200
        assert gc.get_freeze_count() > 10_000
    gc.unfreeze()


def test_frozen_objects_in_a_cycle_are_collected_by_the_next_freeze() -> None:
    import gc
    import weakref

    from service.heap import freeze_long_lived

    class Node:
        pass

    node = Node()
    node.self = node  # type: ignore[attr-defined]
    ref = weakref.ref(node)
    freeze_long_lived()
    del node
    gc.collect()
    assert ref() is not None  # frozen: a full collection does not see it
    freeze_long_lived()
    assert ref() is None
    gc.unfreeze()
