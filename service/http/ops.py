"""Operations: liveness, readiness, Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST

from .deps import context
from .openapi import PROBLEMS
from .problems import problem

router = APIRouter()


@router.get("/healthz", tags=["ops"])
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", tags=["ops"], responses={503: {"description": PROBLEMS[503]}})
async def readyz(request: Request) -> JSONResponse:
    why_not = await context(request).process.readiness()
    if why_not is None:
        return JSONResponse({"status": "ready"})
    return problem(503, why_not)


@router.get("/metrics", tags=["ops"], response_class=PlainTextResponse)
async def metrics(request: Request) -> PlainTextResponse:
    """Prometheus metrics of this process."""
    process = context(request).process
    process.metrics.stream_clients.set(process.hub.subscriber_count)
    return PlainTextResponse(process.metrics.render(), media_type=CONTENT_TYPE_LATEST)
