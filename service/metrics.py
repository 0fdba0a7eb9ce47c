"""Prometheus metrics, one registry per app (so several apps can live in one process).

With ``--workers N`` the parent sets ``PROMETHEUS_MULTIPROC_DIR`` before anything imports
prometheus_client: every worker then keeps its values in files there and each scrape,
whichever worker answers it, adds them all up (prometheus-client's multiprocess mode), so
counters and histograms are the service's totals.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

#: The variable prometheus-client reads, at import, to keep values in shared files.
MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_mode() -> bool:
    """Whether values live in files shared by worker processes."""
    return bool(os.environ.get(MULTIPROCESS_DIR))

_LATENCY = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 65536,
          262144)


@dataclass(frozen=True)
class Metrics:
    registry: CollectorRegistry
    requests: Counter
    queue_ids: Gauge
    batch_bags: Histogram
    batch_ids: Histogram
    queue_seconds: Histogram
    compute_seconds: Histogram
    request_seconds: Histogram
    table_bytes: Gauge
    oov_ids: Counter

    @classmethod
    def create(cls) -> Metrics:
        registry = CollectorRegistry()
        return cls(
            registry=registry,
            requests=Counter("bagserve_requests", "Inference requests by model and outcome "
                             "(ok, invalid, overloaded, deadline, disconnected, failed)",
                             ["model", "outcome"], registry=registry),
            queue_ids=Gauge("bagserve_queue_ids", "Ids waiting in the model's queue",
                            ["model"], registry=registry, multiprocess_mode="livesum"),
            batch_bags=Histogram("bagserve_batch_bags", "Bags per computed batch", ["model"],
                                 buckets=_SIZES, registry=registry),
            batch_ids=Histogram("bagserve_batch_ids", "Ids per computed batch", ["model"],
                                buckets=_SIZES, registry=registry),
            queue_seconds=Histogram("bagserve_queue_seconds", "Time from admission to the "
                                    "start of the request's batch", ["model"],
                                    buckets=_LATENCY, registry=registry),
            compute_seconds=Histogram("bagserve_compute_seconds", "Kernel time per batch",
                                      ["model"], buckets=_LATENCY, registry=registry),
            request_seconds=Histogram("bagserve_request_seconds", "End-to-end time of "
                                      "answered inference requests", ["model"],
                                      buckets=_LATENCY, registry=registry),
            table_bytes=Gauge("bagserve_model_table_bytes", "Bytes the model's table takes "
                              "in memory, in its storage dtype", ["model", "table_dtype"],
                              registry=registry, multiprocess_mode="max"),
            oov_ids=Counter("bagserve_oov_ids", "Collection ids beyond their table, skipped "
                            "(oov = zero) or hashed (oov = hash), by feature",
                            ["model", "feature", "action"], registry=registry),
        )

    def exposition(self) -> bytes:
        """The text a scrape gets: this registry, or every worker's values together."""
        if not multiprocess_mode():
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
