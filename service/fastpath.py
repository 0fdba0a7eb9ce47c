"""Pure-ASGI dispatch of the inference routes.

Profiled at 64 connections (py-spy), FastAPI's per-request route matching, dependency
solving and exception middleware cost the event loop about three times what parsing,
batching and answering a one-bag request cost. The inference routes are therefore
dispatched here, straight to the same handler functions FastAPI registers (so the
OpenAPI schema still documents them), with the same API-key check and the same error
table. Every other request, and every non-POST, goes down the FastAPI stack unchanged.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from service.batcher import loop_load
from service.errors import Overloaded, exception_response
from service.inference import count_refused, require_api_key

Handler = Callable[..., Awaitable[Response]]


class FastPath:
    """ASGI wrapper: ``POST`` paths matching one of ``routes`` skip FastAPI's stack.

    Args:
        app: the next ASGI app (FastAPI's stack).
        routes: ``(path regex with named groups, handler)``; groups become keyword
            arguments of the handler, beside ``request``.
    """

    def __init__(self, app: ASGIApp, routes: Sequence[tuple[str, Handler]]) -> None:
        self.app = app
        self.routes = [(re.compile(pattern), handler) for pattern, handler in routes]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            path = scope["path"]
            for pattern, handler in self.routes:
                match = pattern.fullmatch(path)
                if match is not None:
                    await self._dispatch(handler, match.groupdict(), scope, receive, send)
                    return
        await self.app(scope, receive, send)

    @staticmethod
    async def _dispatch(handler: Handler, arguments: dict[str, Any], scope: Scope,
                        receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        load = loop_load()
        load.in_flight += 1
        hold = 0.0
        try:
            try:
                await require_api_key(request)
                response = await handler(request=request, **arguments)
            except Exception as exc:  # noqa: BLE001 - the one error table answers everything
                response = exception_response(request, exc)
                count_refused(request, arguments.get("name"), exc)
                if isinstance(exc, Overloaded):
                    hold = exc.hold_s
            if not hold:
                await response(scope, receive, send)
        finally:
            load.in_flight -= 1
        if hold:  # a refusal by time: held out of the in-flight count, then answered
            load.held += 1
            try:
                await asyncio.sleep(hold)
            finally:
                load.held -= 1
            await response(scope, receive, send)
            return
        load.answered()
