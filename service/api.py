"""The routes: thin. Parse, call the store or runner, render."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, Query, Request, Response
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse, ServerSentEvent

from . import events as ev
from .errors import InvalidSpec
from .spec import JobPage, JobSpec, JobStatus, JobView, SectioningSpec, VotingSpec, check_against
from .state import AppState

router = APIRouter()

PROBLEM = {"content": {"application/problem+json": {}}, "description": "problem details"}
ERRORS: dict[int | str, dict[str, Any]] = {404: PROBLEM, 409: PROBLEM, 413: PROBLEM, 422: PROBLEM}


def state(request: Request) -> AppState:
    app_state: AppState = request.app.state.fanout
    return app_state


def tenant_of(_request: Request) -> str:
    """Every caller is the one local tenant until API keys are configured."""
    return "public"


@router.post("/v1/jobs", status_code=202, response_model=JobView, responses=ERRORS, tags=["jobs"])
async def create_job(
    request: Request,
    response: Response,
    spec: Annotated[VotingSpec | SectioningSpec, Body(discriminator="mode")],
) -> JobView:
    """Create a job; it runs at once. ``Location`` names the job."""
    s = state(request)
    check_against(spec, s.settings)
    job_id = await s.store.create_job(spec, tenant_of(request))
    if s.runner is not None:
        s.runner.wake()
    response.headers["Location"] = f"/v1/jobs/{job_id}"
    return await s.store.get_job(job_id, tenant_of(request))


@router.get("/v1/jobs", response_model=JobPage, responses=ERRORS, tags=["jobs"])
async def list_jobs(
    request: Request,
    status: JobStatus | None = None,
    cursor: str | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> JobPage:
    """The caller's jobs, newest first. Pass ``next_cursor`` back as ``cursor`` for more."""
    jobs, next_cursor = await state(request).store.list_jobs(
        tenant_of(request), status=status.value if status else None, cursor=cursor, limit=limit
    )
    return JobPage(jobs=jobs, next_cursor=next_cursor)


@router.get("/v1/jobs/{job_id}", response_model=JobView, responses=ERRORS, tags=["jobs"])
async def get_job(request: Request, job_id: str) -> JobView:
    return await state(request).store.get_job(job_id, tenant_of(request))


@router.post("/v1/jobs/{job_id}/cancel", status_code=202, response_model=JobView, responses=ERRORS, tags=["jobs"])
async def cancel_job(request: Request, job_id: str) -> JobView:
    """Cancel a job: running lanes are stopped. A finished job is ``409``."""
    s = state(request)
    await s.store.cancel_job(job_id, tenant_of(request))
    return await s.store.get_job(job_id, tenant_of(request))


@router.get(
    "/v1/jobs/{job_id}/events",
    responses={**ERRORS, 200: {"content": {"text/event-stream": {}}, "description": "event stream"}},
    tags=["jobs"],
)
async def job_events(
    request: Request,
    job_id: str,
    last_event_id: Annotated[str | None, Header()] = None,
    after: Annotated[int | None, Query(ge=0, description="like Last-Event-ID")] = None,
) -> EventSourceResponse:
    """Server-sent events: every event after ``Last-Event-ID``, then live ones; closes
    after the final ``job.succeeded`` / ``job.failed`` / ``job.cancelled``."""
    s = state(request)
    await s.store.job_status(job_id, tenant_of(request))  # 404 before the stream starts
    start = after or 0
    if last_event_id is not None:
        try:
            start = int(last_event_id)
        except ValueError:
            raise InvalidSpec(
                [{"loc": ["header", "Last-Event-ID"], "msg": "must be an event id (an integer)"}]
            ) from None

    async def sse() -> AsyncIterator[ServerSentEvent]:
        async for event in ev.stream(s.hub, job_id, start, s.store.events_after, s.store.is_finished):
            yield ServerSentEvent(
                data=json.dumps(event["data"], separators=(",", ":")),
                event=event["type"],
                id=str(event["seq"]) if event["seq"] else None,
            )

    return EventSourceResponse(
        sse(),
        ping=s.settings.keepalive_s,
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        send_timeout=30,
    )


@router.get("/healthz", tags=["ops"])
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", tags=["ops"], responses={503: PROBLEM})
async def readyz(request: Request) -> JSONResponse:
    problem = await state(request).readiness()
    if problem is None:
        return JSONResponse({"status": "ready"})
    return JSONResponse(
        {"type": "about:blank", "title": "Service Unavailable", "status": 503, "detail": problem},
        status_code=503,
        media_type="application/problem+json",
    )
