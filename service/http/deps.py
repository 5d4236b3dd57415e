"""What a route depends on: the running process and the caller's tenant."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Query, Request

from ..errors import KeyInUrl
from ..process import Process
from .tenants import RateLimiter, Tenants


@dataclass
class Context:
    """The process, and who may call it how often (``app.state.fanout``)."""

    process: Process
    tenants: Tenants
    limiter: RateLimiter
    # /metrics needs this key when set (FANOUT_METRICS_KEY).
    metrics_key: bytes | None = None
    # Set when the process was told to stop: new jobs are refused (503) from then on.
    draining: bool = False

    def stop(self) -> None:
        """The process was told to stop: refuse new jobs, claim no more work (the
        lifespan's end drains what runs), and end the open event streams, whose clients
        reconnect elsewhere (the server waits for open responses before it stops)."""
        self.draining = True
        if self.process.runner is not None:
            self.process.runner.stop_claiming()
        self.process.hub.close()


def context(request: Request) -> Context:
    found: Context = request.app.state.fanout
    return found


def bearer_token(request: Request) -> str | None:
    """The credentials of ``Authorization: Bearer <credentials>``, if given."""
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return None


async def caller(request: Request) -> str:
    """The caller's tenant, from ``Authorization: Bearer <key>``; also charges its rate
    limit. A key in the URL (``?key=``) is refused: logs would keep it.

    ``async`` although it never waits: FastAPI runs a plain ``def`` dependency on a
    worker thread, a hop per request (and the rate limiter's buckets would then be
    updated from several threads at once)."""
    ctx = context(request)
    if "key" in request.query_params:
        raise KeyInUrl()
    tenant = ctx.tenants.tenant_for(bearer_token(request))
    ctx.limiter.check(tenant)
    return tenant


async def reader(
    request: Request,
    job_id: str,
    token: Annotated[
        str | None,
        Query(
            description="the job's `stream_token`, instead of an API key: for a browser's "
            "page and EventSource, which cannot send headers (it expires)",
        ),
    ] = None,
) -> str:
    """The tenant reading the job ``job_id``: by API key, or by the job's stream token
    (``?token=``, for a page and its EventSource)."""
    if token is None or bearer_token(request) is not None:
        return await caller(request)
    ctx = context(request)
    tenant = ctx.tenants.tenant_of_token(token, job_id, ctx.process.settings.stream_token_ttl_s)
    ctx.limiter.check(tenant)
    return tenant


Tenant = Annotated[str, Depends(caller)]
Reader = Annotated[str, Depends(reader)]
