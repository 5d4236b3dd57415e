"""The routes: thin. Parse, call the store or runner, render."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Header, Query, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST
from sse_starlette import EventSourceResponse

from . import events as ev
from . import jsonsafe
from .errors import InvalidSpec
from .spec import JobPage, JobStatus, JobView, SectioningSpec, VotingSpec, check_against
from .state import AppState
from .store import TERMINAL_JOB

router = APIRouter()
MAX_EVENT_ID = 2**31 - 1  # event sequence numbers are 32-bit integers in the table

# --- OpenAPI declarations: the error responses of each route (``app`` gives every one
# the ``Problem`` schema), and the links from a created job to what can be done with it.

PROBLEMS = {
    400: "the body cannot be decoded (not UTF-8)",
    401: "no API key, or an unknown one",
    404: "no such job for this tenant",
    409: "the job has already finished",
    413: "the request body is over the cap",
    422: "the request is invalid or over a cap; `errors` names each failing field",
    429: "over the tenant's rate limit",
    503: "not ready: the database is unreachable or not migrated",
}


def problems(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """Declared error responses: the given ones, plus 401 and 429 on every ``/v1`` route."""
    return {
        status: {"description": PROBLEMS[status], "content": {"application/problem+json": {}}}
        for status in sorted({401, *statuses, 429})
    }


def _link(path: str, method: str) -> dict[str, Any]:
    pointer = path.replace("/", "~1").replace("{", "%7B").replace("}", "%7D")
    return {
        "operationRef": f"#/paths/{pointer}/{method}",
        "parameters": {"job_id": "$response.body#/id"},
    }


JOB_LINKS = {
    "GetJob": _link("/v1/jobs/{job_id}", "get"),
    "CancelJob": _link("/v1/jobs/{job_id}/cancel", "post"),
    "JobEvents": _link("/v1/jobs/{job_id}/events", "get"),
}
SPEC_EXAMPLES: dict[str, Any] = {
    "voting": {
        "summary": "self-consistency: 5 votes, majority on the number",
        "value": {
            "mode": "voting",
            "n": 5,
            "task": {
                "model": "gpt-4o-mini",
                "temperature": 0.8,
                "messages": [{"role": "user", "content": "What is 17*23? End with 'Answer: N'."}],
            },
            "aggregate": {"kind": "majority", "extract": "number"},
        },
    },
    "sectioning": {
        "summary": "a draft and a safety check in parallel; the check gates the output",
        "value": {
            "mode": "sectioning",
            "sections": [
                {
                    "name": "draft",
                    "task": {
                        "model": "gpt-4o-mini",
                        "messages": [{"role": "user", "content": "Write a haiku about rain."}],
                    },
                },
                {
                    "name": "safety",
                    "task": {
                        "model": "gpt-4o-mini",
                        "messages": [
                            {"role": "system", "content": "Answer 'safe' or 'unsafe'."},
                            {"role": "user", "content": "A haiku about rain."},
                        ],
                    },
                    "gate": {"block_if": "(?i)\\bunsafe\\b"},
                },
            ],
        },
    },
    "fake-llm": {
        "summary": "a vote against the simulator (`fanout fake-llm`)",
        "value": {
            "mode": "voting",
            "n": 3,
            "task": {
                "model": "fake?answers=391:2,392:1",
                "messages": [{"role": "user", "content": "What is 17*23?"}],
            },
            "aggregate": {"kind": "majority", "extract": "number"},
        },
    },
}
CREATED: dict[int | str, dict[str, Any]] = {
    202: {
        "description": "the job (for a repeated Idempotency-Key, the job it created)",
        "headers": {
            "Location": {"required": True, "schema": {"type": "string"}, "description": "the job"}
        },
        "links": JOB_LINKS,
    },
}


def state(request: Request) -> AppState:
    app_state: AppState = request.app.state.fanout
    return app_state


async def caller(request: Request) -> str:
    """The caller's tenant, from ``Authorization: Bearer <key>`` (or ``?key=``, for
    browsers' EventSource, which cannot send headers); also charges its rate limit.

    ``async`` although it never waits: FastAPI runs a plain ``def`` dependency on a
    worker thread, a hop per request (and the rate limiter's buckets would then be
    updated from several threads at once)."""
    s = state(request)
    key = None
    authorization = request.headers.get("authorization", "")
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        key = credentials.strip()
    elif "key" in request.query_params:
        key = request.query_params["key"]
    tenant = s.tenants.tenant_for(key)
    s.limiter.check(tenant)
    return tenant


Tenant = Annotated[str, Depends(caller)]


@router.post(
    "/v1/jobs",
    status_code=202,
    response_model=JobView,
    responses={**CREATED, **problems(400, 413, 422)},
    tags=["jobs"],
)
async def create_job(
    request: Request,
    response: Response,
    tenant: Tenant,
    spec: Annotated[
        VotingSpec | SectioningSpec, Body(discriminator="mode", openapi_examples=SPEC_EXAMPLES)
    ],
    idempotency_key: Annotated[
        str | None, Header(max_length=255, pattern=r"^[\x20-\x7e]+$")
    ] = None,
) -> JobView:
    """Create a job; it runs at once. ``Location`` names the job.

    With ``Idempotency-Key``, the same key and body return the same job (no second
    one); the same key with another body is a 422. Keys are per tenant.
    """
    s = state(request)
    refuse_unstorable(await request.json())
    check_against(spec, s.settings)
    idempotency = None
    if idempotency_key is not None:
        canonical = spec.model_dump_json(by_alias=True, exclude_none=True)
        idempotency = (idempotency_key, hashlib.sha256(canonical.encode()).hexdigest())
    job, created = await s.store.create_job(
        spec,
        tenant,
        idempotency=idempotency,
        max_in_flight=s.settings.max_jobs_in_flight,
        idempotency_ttl_s=s.settings.idempotency_ttl_s,
    )
    if created and s.runner is not None:
        s.runner.wake()
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return job


def unstorable(body: Any) -> list[dict[str, Any]]:
    """Field errors for the strings and numbers of a JSON body that JSON cannot carry
    back out (see :mod:`service.jsonsafe`)."""
    return [
        {"loc": ["body", *loc], "msg": msg, "type": "unstorable"}
        for loc, msg in jsonsafe.problems(body)
    ]


def refuse_unstorable(body: Any) -> None:
    if errors := unstorable(body):
        raise InvalidSpec(errors)


@router.get("/v1/jobs", response_model=JobPage, responses=problems(422), tags=["jobs"])
async def list_jobs(
    request: Request,
    tenant: Tenant,
    status: JobStatus | None = None,
    cursor: str | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> JobPage:
    """The caller's jobs, newest first. Pass ``next_cursor`` back as ``cursor`` for more."""
    jobs, next_cursor = await state(request).store.list_jobs(
        tenant, status=status.value if status else None, cursor=cursor, limit=limit
    )
    return JobPage(jobs=jobs, next_cursor=next_cursor)


@router.get("/v1/jobs/{job_id}", response_model=JobView, responses=problems(404), tags=["jobs"])
async def get_job(request: Request, tenant: Tenant, job_id: str) -> JobView:
    return await state(request).store.get_job(job_id, tenant)


@router.post(
    "/v1/jobs/{job_id}/cancel",
    status_code=202,
    response_model=JobView,
    responses=problems(404, 409, 413),
    tags=["jobs"],
)
async def cancel_job(request: Request, tenant: Tenant, job_id: str) -> JobView:
    """Cancel a job: running lanes are stopped. A finished job is ``409``."""
    s = state(request)
    await s.store.cancel_job(job_id, tenant)
    return await s.store.get_job(job_id, tenant)


@router.get(
    "/v1/jobs/{job_id}/events",
    response_class=EventSourceResponse,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "the job's events"},
        **problems(404, 422),
    },
    tags=["jobs"],
)
async def job_events(
    request: Request,
    tenant: Tenant,
    job_id: str,
    last_event_id: Annotated[str | None, Header()] = None,
    after: Annotated[
        int | None, Query(ge=0, le=MAX_EVENT_ID, description="like Last-Event-ID")
    ] = None,
) -> EventSourceResponse:
    """Server-sent events: every event after ``Last-Event-ID``, then live ones; closes
    after the final ``job.succeeded`` / ``job.failed`` / ``job.cancelled``."""
    s = state(request)
    # 404 before the stream starts. The status also answers the stream's one question
    # about the job's end without another read: a job that had not finished now has its
    # final event still to come, after the stream's subscription, so the replay or the
    # live events deliver it; a finished one stays finished.
    finished = await s.store.job_status(job_id, tenant) in TERMINAL_JOB

    async def is_finished(_job_id: str) -> bool:
        return finished

    start = after or 0
    if last_event_id is not None:
        digits = last_event_id.isascii() and last_event_id.isdigit()  # not "²" nor "٣"
        start = int(last_event_id) if digits else -1
        if not 0 <= start <= MAX_EVENT_ID:
            raise InvalidSpec(
                [{"loc": ["header", "Last-Event-ID"], "msg": "must be an event id (an integer)"}]
            )

    async def sse() -> AsyncIterator[bytes]:
        # Frames are encoded once for every client, and sse-starlette sends bytes as
        # they are: one write per batch, whatever the number of events in it.
        async for batch in ev.batches(s.hub, job_id, start, s.store.events_after, is_finished):
            yield b"".join(frame.body for frame in batch)

    return EventSourceResponse(
        sse(),
        ping=s.settings.keepalive_s,
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        send_timeout=30,
    )


@router.get("/healthz", tags=["ops"])
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", tags=["ops"], responses={503: {"description": PROBLEMS[503]}})
async def readyz(request: Request) -> JSONResponse:
    problem = await state(request).readiness()
    if problem is None:
        return JSONResponse({"status": "ready"})
    return JSONResponse(
        {"type": "about:blank", "title": "Service Unavailable", "status": 503, "detail": problem},
        status_code=503,
        media_type="application/problem+json",
    )


@router.get("/metrics", tags=["ops"], response_class=PlainTextResponse)
async def metrics(request: Request) -> PlainTextResponse:
    """Prometheus metrics of this process."""
    s = state(request)
    s.metrics.stream_clients.set(s.hub.subscriber_count)
    return PlainTextResponse(s.metrics.render(), media_type=CONTENT_TYPE_LATEST)
