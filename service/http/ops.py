"""Operations: liveness, readiness, Prometheus metrics."""

from __future__ import annotations

import hmac

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST

from ..errors import Unauthorized
from .deps import bearer_token, context
from .openapi import PROBLEMS
from .problems import problem

router = APIRouter()


# Seconds a client waits before asking an unready (or draining) process again.
UNREADY_RETRY_S = 1


@router.get("/healthz", tags=["ops"], operation_id="health")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    tags=["ops"],
    operation_id="readiness",
    responses={503: {"description": PROBLEMS[503]}},
)
async def readyz(request: Request) -> JSONResponse:
    ctx = context(request)
    why_not = "shutting down" if ctx.draining else await ctx.process.readiness()
    if why_not is None:
        return JSONResponse({"status": "ready"})
    return problem("unavailable", why_not, headers={"Retry-After": str(UNREADY_RETRY_S)})


@router.get(
    "/metrics",
    tags=["ops"],
    operation_id="metrics",
    response_class=PlainTextResponse,
    responses={401: {"description": PROBLEMS[401]}},
)
async def metrics(request: Request) -> PlainTextResponse:
    """Prometheus metrics of this process (``FANOUT_METRICS_KEY``: it needs that key)."""
    ctx = context(request)
    if ctx.metrics_key is not None:
        offered = bearer_token(request)
        if offered is None or not hmac.compare_digest(offered.encode(), ctx.metrics_key):
            raise Unauthorized(
                "/metrics needs its key (Authorization: Bearer <FANOUT_METRICS_KEY>)"
            )
    process = ctx.process
    process.metrics.stream_clients.set(process.hub.subscriber_count)
    return PlainTextResponse(process.metrics.render(), media_type=CONTENT_TYPE_LATEST)
