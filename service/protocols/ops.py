"""Operations: Prometheus metrics and plain health endpoints (never behind the API key)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from service.inference import service_state

router = APIRouter(tags=["operations"])


@router.get("/metrics", summary="Prometheus metrics")
async def metrics(request: Request) -> Response:
    return Response(service_state(request).metrics.exposition(),
                    media_type=CONTENT_TYPE_LATEST)


@router.head("/health/live", include_in_schema=False)
@router.get("/health/live", summary="Liveness")
async def live() -> Response:
    return Response(b'{"live":true}', media_type="application/json")


@router.head("/health/ready", include_in_schema=False)
@router.get("/health/ready", summary="Readiness: every model loaded and warmed up")
async def ready(request: Request) -> Response:
    is_ready = service_state(request).ready
    return Response(b'{"ready":%s}' % (b"true" if is_ready else b"false"),
                    status_code=200 if is_ready else 503, media_type="application/json")
