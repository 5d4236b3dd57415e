"""What a route depends on: the running process and the caller's tenant."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from ..process import Process
from .tenants import RateLimiter, Tenants


@dataclass
class Context:
    """The process, and who may call it how often (``app.state.fanout``)."""

    process: Process
    tenants: Tenants
    limiter: RateLimiter


def context(request: Request) -> Context:
    found: Context = request.app.state.fanout
    return found


async def caller(request: Request) -> str:
    """The caller's tenant, from ``Authorization: Bearer <key>`` (or ``?key=``, for
    browsers' EventSource, which cannot send headers); also charges its rate limit.

    ``async`` although it never waits: FastAPI runs a plain ``def`` dependency on a
    worker thread, a hop per request (and the rate limiter's buckets would then be
    updated from several threads at once)."""
    ctx = context(request)
    key = None
    authorization = request.headers.get("authorization", "")
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        key = credentials.strip()
    elif "key" in request.query_params:
        key = request.query_params["key"]
    tenant = ctx.tenants.tenant_for(key)
    ctx.limiter.check(tenant)
    return tenant


Tenant = Annotated[str, Depends(caller)]
