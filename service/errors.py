"""One exception hierarchy, one status table, one handler for every route.

Native and OpenAI routes answer ``{"error": {"type": ..., "message": ...}}``; KServe v2
routes (``/v2``) answer ``{"error": "..."}``. Nothing a client sends produces a 500; an
unexpected server fault is logged with its traceback and answered without one.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response

from models import InvalidInputError

logger = logging.getLogger(__name__)


class ServiceError(Exception):
    """Base of every error the service answers on purpose."""

    status = 500
    type = "internal_error"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class Unauthorized(ServiceError):
    status, type = 401, "unauthorized"


class Forbidden(ServiceError):
    status, type = 403, "forbidden"


class ModelNotFound(ServiceError):
    status, type = 404, "model_not_found"


class RequestTimeout(ServiceError):
    status, type = 408, "request_timeout"


class BodyTooLarge(ServiceError):
    status, type = 413, "body_too_large"


class TextTooLong(ServiceError):
    """A text past ``max_text_chars``."""

    status, type = 413, "text_too_long"


class LoadFailed(ServiceError):
    """A model load failed; whatever served before keeps serving."""

    status, type = 400, "load_failed"


class InvalidRequest(ServiceError):
    status, type = 422, "invalid_request"


class Overloaded(ServiceError):
    """429. ``hold_s``: how long the answer is held before it goes out (a refusal by the
    wait it implies: about the target wait, longer while refused clients must be paced,
    at most Retry-After; see ``Batcher._refuse_if_late`` and ``LoopLoad.hold_s``); 0 for
    the size bounds, answered at once."""

    status, type = 429, "overloaded"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None,
                 hold_s: float = 0.0) -> None:
        super().__init__(message, headers=headers)
        self.hold_s = hold_s


class NotReady(ServiceError):
    status, type = 503, "not_ready"


class DeadlineExceeded(ServiceError):
    status, type = 503, "deadline_exceeded"


class ClientDisconnected(ServiceError):
    """The client went away while queued; the answer goes nowhere (nginx's 499)."""

    status, type = 499, "client_closed_request"


class ComputeFailed(ServiceError):
    status, type = 500, "compute_failed"


def error_response(request: Request, status: int, type_: str, message: str,
                   headers: dict[str, str] | None = None) -> Response:
    """The error body in the shape of the route's protocol."""
    body: Any
    if request.url.path.startswith("/v2"):
        body = {"error": message}
    else:
        body = {"error": {"type": type_, "message": message}}
    return Response(orjson.dumps(body), status_code=status, headers=headers,
                    media_type="application/json")


_HTTP_TYPES = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}


def exception_response(request: Request, exc: Exception) -> Response:
    """The one status table: any exception raised while serving ``request`` as a response."""
    if isinstance(exc, ServiceError):
        return error_response(request, exc.status, exc.type, exc.message, exc.headers)
    if isinstance(exc, InvalidInputError):
        return error_response(request, 422, InvalidRequest.type, str(exc))
    if isinstance(exc, RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                             for e in exc.errors())
        return error_response(request, 422, InvalidRequest.type, problems)
    if isinstance(exc, HTTPException):
        return error_response(request, exc.status_code,
                              _HTTP_TYPES.get(exc.status_code, "http_error"), str(exc.detail),
                              dict(exc.headers or {}))
    logger.exception("unexpected error on %s %s", request.method, request.url.path,
                     exc_info=exc)
    return error_response(request, 500, "internal_error", "internal server error")


def install_handlers(app: FastAPI) -> None:
    """Route every error through :func:`exception_response`. Each expected kind is named:
    a handler for plain ``Exception`` sits in Starlette's outermost middleware, which
    re-raises after answering (so the server logs it) — right for faults only."""

    async def handle(request: Request, exc: Exception) -> Response:
        return exception_response(request, exc)

    for kind in (ServiceError, InvalidInputError, HTTPException, RequestValidationError,
                 Exception):
        app.add_exception_handler(kind, handle)


__all__ = [
    "BodyTooLarge", "ClientDisconnected", "ComputeFailed", "DeadlineExceeded", "Forbidden",
    "InvalidRequest", "LoadFailed", "ModelNotFound", "NotReady", "Overloaded", "RequestTimeout",
    "ServiceError", "Unauthorized",
    "error_response", "exception_response", "install_handlers",
]
