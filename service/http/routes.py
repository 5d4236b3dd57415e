"""The job routes: thin. Parse, call the store (or wake the runner), render."""

from __future__ import annotations

import hashlib
from typing import Annotated

from fastapi import APIRouter, Body, Header, Query, Request, Response

from .. import events as ev
from ..admission import check_against
from ..errors import Unavailable
from ..spec import LANE_NAME_PATTERN, JobSpec
from ..states import JobStatus, LaneStatus
from ..store.jobs import CURSOR_PATTERN, LANE_CURSOR_PATTERN
from ..views import JobPage, JobView, LanePage
from .deps import Context, Reader, Tenant, context
from .openapi import CREATED, EVENTS_DESCRIPTION, SPEC_EXAMPLES, problems
from .problems import refuse_unstorable
from .stream import EventStream

router = APIRouter()
WITH_LANES = (
    "false: the job without its lanes (`lanes` is empty; `progress` counts them by status; "
    "`GET /v1/jobs/{id}/lanes` pages them)"
)
MAX_EVENT_ID = 2**31 - 1  # event sequence numbers are 32-bit integers in the table


@router.post(
    "/v1/jobs",
    status_code=202,
    response_model=JobView,
    responses={**CREATED, **problems(413, 415, 422, 503)},
    tags=["jobs"],
    operation_id="createJob",
)
async def create_job(
    request: Request,
    response: Response,
    tenant: Tenant,
    spec: Annotated[JobSpec, Body(discriminator="mode", openapi_examples=SPEC_EXAMPLES)],
    idempotency_key: Annotated[
        str | None, Header(max_length=255, pattern=r"^[\x20-\x7e]+$")
    ] = None,
    lanes: Annotated[bool, Query(description=WITH_LANES)] = True,
) -> JobView:
    """Create a job; it runs at once. ``Location`` names the job.

    With ``Idempotency-Key``, the same key and body return the same job (no second
    one); the same key with another body is a 422. Keys are per tenant.
    """
    ctx = context(request)
    if ctx.draining:
        raise Unavailable("shutting down: send it again (to another replica)", retry_after_s=1)
    process = ctx.process
    settings = process.settings
    refuse_unstorable(await request.json())
    check_against(spec, settings)
    idempotency = None
    if idempotency_key is not None:
        canonical = spec.model_dump_json(by_alias=True, exclude_none=True)
        idempotency = (idempotency_key, hashlib.sha256(canonical.encode()).hexdigest())
    runner = process.runner
    job, created = await process.store.jobs.create(
        spec,
        tenant,
        idempotency=idempotency,
        max_in_flight=settings.max_jobs_in_flight,
        idempotency_ttl_s=settings.idempotency_ttl_s,
        with_lanes=lanes,
        # This process's runner starts what it can as the job is stored.
        starter=runner.lanes if runner is not None else None,
    )
    if created and runner is not None and job.progress.get(LaneStatus.QUEUED):
        runner.wake()
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    return _with_token(ctx, tenant, job)


def _with_token(ctx: Context, tenant: str, job: JobView) -> JobView:
    token = ctx.tenants.stream_token(tenant, job.id)
    return job.model_copy(update={"stream_token": token}) if token else job


@router.get(
    "/v1/jobs",
    response_model=JobPage,
    responses=problems(422),
    tags=["jobs"],
    operation_id="listJobs",
)
async def list_jobs(
    request: Request,
    tenant: Tenant,
    status: JobStatus | None = None,
    cursor: Annotated[
        str | None,
        Query(
            pattern=CURSOR_PATTERN,
            description="a page's `next_cursor`, as it came: the next page starts after it",
        ),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    results: Annotated[
        bool,
        Query(
            description="true: each job also carries its `result` (once it has succeeded) "
            "or `error` (once it has failed or been cancelled)",
        ),
    ] = False,
) -> JobPage:
    """The caller's jobs, newest first. Pass ``next_cursor`` back as ``cursor`` for more.
    With ``results=true``, each job also has its ``result`` or ``error`` when it has one."""
    jobs, next_cursor = await context(request).process.store.jobs.page(
        tenant, status=status, cursor=cursor, limit=limit, with_results=results
    )
    return JobPage(jobs=jobs, next_cursor=next_cursor)


@router.get(
    "/v1/jobs/{job_id}",
    response_model=JobView,
    responses=problems(404, 422),
    tags=["jobs"],
    operation_id="getJob",
)
async def get_job(
    request: Request,
    tenant: Reader,
    job_id: str,
    lanes: Annotated[bool, Query(description=WITH_LANES)] = True,
) -> JobView:
    """The job, its lanes and, once it has ended, its result or error. With
    ``lanes=false``, ``lanes`` is empty (``[]``) and ``progress`` still counts the lanes
    per status: a big job is then cheap to follow, and its lanes are read a page at a
    time from ``GET /v1/jobs/{job_id}/lanes``."""
    ctx = context(request)
    job = await ctx.process.store.jobs.get(job_id, tenant, with_lanes=lanes)
    return _with_token(ctx, tenant, job)


@router.get(
    "/v1/jobs/{job_id}/lanes",
    response_model=LanePage,
    responses=problems(404, 422),
    tags=["jobs"],
    operation_id="listJobLanes",
)
async def list_job_lanes(
    request: Request,
    tenant: Reader,
    job_id: str,
    status: Annotated[LaneStatus | None, Query(description="only lanes of this status")] = None,
    name: Annotated[
        str | None,
        Query(
            min_length=1,
            max_length=200,
            pattern=LANE_NAME_PATTERN,
            description="only the lane of this name (a section's name, an item's id)",
        ),
    ] = None,
    cursor: Annotated[
        str | None,
        Query(
            pattern=LANE_CURSOR_PATTERN,
            description="a page's `next_cursor`, as it came (the index of its last lane, "
            "in digits): the next page starts after it",
        ),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> LanePage:
    """The job's lanes in lane order, a page at a time: pass ``next_cursor`` back as
    ``cursor`` for more (``null``: the last page). ``status`` and ``name`` filter them."""
    lanes, next_cursor = await context(request).process.store.jobs.lane_page(
        job_id, tenant, status=status, name=name, cursor=cursor, limit=limit
    )
    return LanePage(lanes=lanes, next_cursor=next_cursor)


@router.post(
    "/v1/jobs/{job_id}/cancel",
    status_code=202,
    response_model=JobView,
    responses=problems(404, 409, 413),
    tags=["jobs"],
    operation_id="cancelJob",
)
async def cancel_job(
    request: Request,
    tenant: Tenant,
    job_id: str,
    lanes: Annotated[bool, Query(description=WITH_LANES)] = True,
) -> JobView:
    """Cancel a job: running lanes are stopped. A finished job is ``409``."""
    jobs = context(request).process.store.jobs
    await jobs.cancel(job_id, tenant)
    return await jobs.get(job_id, tenant, with_lanes=lanes)


@router.get(
    "/v1/jobs/{job_id}/events",
    response_class=EventStream,
    status_code=200,
    responses={
        200: {
            "content": {
                "text/event-stream": {
                    "itemSchema": {"$ref": "#/components/schemas/JobEvent"},
                }
            },
            "description": EVENTS_DESCRIPTION,
        },
        204: {"description": "nothing after Last-Event-ID: the job has ended (stop)"},
        **problems(404, 422),
    },
    tags=["jobs"],
    operation_id="streamJobEvents",
)
async def job_events(
    request: Request,
    tenant: Reader,
    job_id: str,
    last_event_id: Annotated[
        str | None,
        Header(
            pattern=r"^[0-9]{0,20}$",
            description="the id of the last event seen: the stream resumes after it "
            "(empty: from the start)",
        ),
    ] = None,
    after: Annotated[
        int | None, Query(ge=0, le=MAX_EVENT_ID, description="like Last-Event-ID")
    ] = None,
) -> EventStream:
    """Server-sent events: every event after ``Last-Event-ID``, then live ones; closes
    after the final ``job.succeeded`` / ``job.failed`` / ``job.cancelled``. Asked again
    after that final event, ``204``: a browser's EventSource then stops reconnecting."""
    process = context(request).process
    # 404 before the stream starts. The status also answers the stream's one question
    # about the job's end without another read: a job that had not finished now has its
    # final event still to come, after the stream's subscription, so the replay or the
    # live events deliver it; a finished one stays finished.
    status = await process.store.jobs.status(job_id, tenant)
    finished = status.terminal

    async def is_finished(_job_id: str) -> bool:
        return finished

    start = after or 0
    if last_event_id:  # empty is none, as SSE says; past the last event, the end
        start = min(int(last_event_id), MAX_EVENT_ID)
    if finished and start and not await process.store.log.after(job_id, start, limit=1):
        return Response(status_code=204)  # type: ignore[return-value]

    hangup = ev.Hangup()
    # Frames are encoded once for every client and sent as they are.
    frames = ev.batches(
        process.hub,
        job_id,
        start,
        process.store.log.stored,
        is_finished,
        keepalive_s=process.settings.keepalive_s,
        hangup=hangup,
    )
    return EventStream(
        frames, hangup=hangup, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
