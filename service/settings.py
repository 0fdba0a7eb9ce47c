"""The one settings object: CLI flags, then ``BAGSERVE_*`` environment variables, then
defaults. Read once at start and passed explicitly (``app.state.settings``)."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, as a container's cpuset sets it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class Settings(BaseSettings):
    """Every knob of the service. Each field is also ``BAGSERVE_<NAME>`` in the environment."""

    model_config = SettingsConfigDict(env_prefix="BAGSERVE_", frozen=True, extra="forbid")

    config: Path | None = Field(None, description="TOML file of [[models]]; none serves the "
                                "built-in demo model 'demo'")
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on (0: any free one)")
    workers: int = Field(1, ge=1, le=64, description="server processes sharing the port; "
                         "they share the interpreter's pages and the memory-mapped tables. "
                         "'auto': one per usable core (2 cores: twice one process's "
                         "requests/s from 16 connections up, the same at 1; BENCHMARKS.md)")

    idle_timeout_s: float = Field(5.0, gt=0, description="close a connection that sends "
                                  "nothing for this long, new or kept alive: idle sockets "
                                  "cannot pile up")
    busy_poll_us: float = Field(200.0, ge=0, le=1e6, description="after each answer the "
                                "event loop polls for this long before it sleeps: a kept-alive "
                                "connection's next request is read without a wake-up (one-bag "
                                "requests at one connection +15-25%); costs up to this much "
                                "of a core per answer that no request follows (0: off; "
                                "off when workers outnumber the cores)")
    max_connections: int = Field(4096, ge=1, description="open connections per process; "
                                 "past it each new connection closes the oldest idle one")

    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="largest request body "
                                "(413 above)")
    body_timeout_s: float = Field(30.0, gt=0, description="a request body not fully received "
                                  "within this time gets 408: slow clients cannot hold "
                                  "the server")
    max_bags_per_request: int = Field(4096, ge=1, description="bags in one request (422 above)")
    max_ids_per_request: int = Field(131_072, ge=1, description="ids in one request (422 above)")
    max_bag_length: int = Field(65_536, ge=1, description="ids in one bag (422 above)")
    max_texts_per_request: int = Field(2048, ge=1, description="texts in one request to a "
                                       "text model (422 above)")
    max_text_chars: int = Field(100_000, ge=1, description="characters in one text (413 "
                                "above); a model keeps at most max_length tokens anyway")

    max_batch_ids: int = Field(262_144, ge=1, description="ids per computed batch")
    max_batch_bags: int = Field(8192, ge=1, description="bags per computed batch")
    max_queue_ids: int = Field(1_048_576, ge=1, description="ids waiting per model before "
                               "requests get 429")
    max_queue_bags: int = Field(65_536, ge=1, description="bags waiting per model before "
                                "requests get 429")
    max_queue_wait_ms: float = Field(500.0, ge=0, description="longest wait a request "
                                     "is admitted to: the batches queued requests make, "
                                     "each as long as batches lately held the queue, or "
                                     "the requests in flight on a saturated event loop at "
                                     "the rate it answers them; past it, 429, held for "
                                     "this long (longer, up to retry_after_s, while many "
                                     "refused clients retry) so that clients retrying at "
                                     "once are paced (an empty queue and an idle loop "
                                     "always admit; 0: no bound by time)")
    request_timeout_s: float = Field(30.0, gt=0, description="deadline from admission to "
                                     "answer; a request still queued then gets 503")
    retry_after_s: int = Field(1, ge=1, description="Retry-After seconds on 429 and 503")
    shutdown_grace_s: float = Field(30.0, ge=0, description="on SIGTERM, how long admitted "
                                    "requests may take to finish before the server exits")
    api_key: SecretStr | None = Field(None, description="if set, inference routes need "
                                      "'Authorization: Bearer <key>' (health and metrics open)")
    log_level: str = Field("info", pattern="^(debug|info|warning|error)$",
                           description="log level")
    log_format: str = Field("json", pattern="^(json|text)$", description="log line format")

    @field_validator("workers", mode="before")
    @classmethod
    def _auto_workers(cls, value: object) -> object:
        if value == "auto":
            return min(64, usable_cores())
        if isinstance(value, str) and not value.strip().isdigit():
            raise ValueError(f"workers must be a number from 1 to 64 or 'auto'; got {value!r}")
        return value

    @model_validator(mode="after")
    def _limits_fit_batches(self) -> Settings:
        if self.max_ids_per_request > self.max_batch_ids:
            raise ValueError(f"max_ids_per_request ({self.max_ids_per_request}) must not "
                             f"exceed max_batch_ids ({self.max_batch_ids})")
        if self.max_bags_per_request > self.max_batch_bags:
            raise ValueError(f"max_bags_per_request ({self.max_bags_per_request}) must not "
                             f"exceed max_batch_bags ({self.max_batch_bags})")
        if self.max_batch_ids > self.max_queue_ids or self.max_batch_bags > self.max_queue_bags:
            raise ValueError("the queue (max_queue_ids/bags) must hold at least one batch")
        return self
