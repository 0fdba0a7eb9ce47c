"""The serving process's transport: a response's head and body leave together, and under
load every answer waits for the end of the loop's step; nothing is lost or reordered."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from service.batcher import loop_load
from service.server import CoalescingTransport


class Recording:
    """A transport double: what was sent, in calls."""

    def __init__(self) -> None:
        self.calls: list[list[bytes]] = []
        self.closed = False
        self.extra = {"peername": ("127.0.0.1", 1)}

    def writelines(self, data: Any) -> None:
        self.calls.append(list(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str) -> Any:
        return self.extra.get(name)


@pytest.mark.anyio
async def test_an_idle_loop_sends_a_head_and_its_body_at_once_in_one_call() -> None:
    inner = Recording()
    transport = CoalescingTransport(inner, asyncio.get_running_loop())
    transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
    assert inner.calls == []  # held for its body
    transport.write(b"body")
    assert inner.calls == [[b"HTTP/1.1 200 OK\r\n\r\n", b"body"]]
    transport.write(b"alone")
    assert transport.get_write_buffer_size() == 5
    await asyncio.sleep(0)  # the end of the step sends it
    assert inner.calls[-1] == [b"alone"]
    assert transport.get_extra_info("peername") == ("127.0.0.1", 1)


@pytest.mark.anyio
async def test_a_busy_loop_sends_at_the_end_of_the_step_in_order() -> None:
    inner = Recording()
    loop = asyncio.get_running_loop()
    transport = CoalescingTransport(inner, loop)
    load = loop_load(loop)
    load.busy = True
    try:
        for part in (b"head", b"body", b"more"):
            transport.write(part)
        assert inner.calls == []
        await asyncio.sleep(0)
        assert inner.calls == [[b"head", b"body", b"more"]]
    finally:
        load.busy = False


@pytest.mark.anyio
async def test_close_sends_what_is_pending_first_and_abort_drops_it() -> None:
    inner = Recording()
    transport = CoalescingTransport(inner, asyncio.get_running_loop())
    transport.write(b"last words")
    transport.close()
    assert inner.calls == [[b"last words"]] and inner.closed
    aborted = Recording()
    aborted.abort = lambda: setattr(aborted, "closed", True)  # type: ignore[attr-defined]
    transport = CoalescingTransport(aborted, asyncio.get_running_loop())
    transport.write(b"never")
    transport.abort()
    await asyncio.sleep(0)
    assert aborted.calls == [] and aborted.closed


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
