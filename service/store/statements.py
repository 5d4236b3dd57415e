"""Hot statements, built once: SQLAlchemy then reuses their cache keys and compiled SQL."""

from __future__ import annotations

from sqlalchemy import bindparam, func, insert, select, update

from ..states import OPEN_JOB, JobStatus, LaneStatus
from .tables import events, jobs, lanes

BUMP_SEQ = (
    update(jobs)
    .where(jobs.c.id == bindparam("job_id"))
    .values(last_seq=jobs.c.last_seq + bindparam("count"))
    .returning(jobs.c.last_seq)
)
INSERT_EVENTS = insert(events)
INSERT_JOB = insert(jobs)
INSERT_LANES = insert(lanes)
IN_FLIGHT = select(func.count()).where(
    jobs.c.tenant == bindparam("tenant"), jobs.c.status.in_(OPEN_JOB)
)
# Every open job, with its lanes ready to start now and running: what a claim shares
# out (jobs with nothing ready still count for their tenant's lanes in flight).
_ready = (
    select(func.count())
    .where(
        lanes.c.job_id == jobs.c.id,
        lanes.c.status == LaneStatus.QUEUED,
        lanes.c.available_at <= bindparam("now"),
    )
    .scalar_subquery()
)
_running = (
    select(func.count())
    .where(lanes.c.job_id == jobs.c.id, lanes.c.status == LaneStatus.RUNNING)
    .scalar_subquery()
)
RUNNABLE = select(
    jobs.c.id, jobs.c.tenant, jobs.c.created_at, jobs.c.max_concurrency, _ready, _running
).where(jobs.c.status.in_((JobStatus.QUEUED, JobStatus.RUNNING)))
# A job's first k lanes ready to start.
READY_LANES = (
    select(lanes.c.idx, lanes.c.provider)
    .where(
        lanes.c.job_id == bindparam("j"),
        lanes.c.status == LaneStatus.QUEUED,
        lanes.c.available_at <= bindparam("now"),
    )
    .order_by(lanes.c.available_at, lanes.c.idx)
    .limit(bindparam("k"))
)
# (Bound names must differ from the updated table's columns: "j", not "job_id".)
CLAIM_LANES = (
    update(lanes)
    .where(
        lanes.c.job_id == bindparam("j"),
        lanes.c.idx.in_(bindparam("idxs", expanding=True)),
        lanes.c.status == LaneStatus.QUEUED,
    )
    .values(
        status=LaneStatus.RUNNING,
        attempts=lanes.c.attempts + 1,
        started_at=func.coalesce(lanes.c.started_at, bindparam("now")),
        lease_owner=bindparam("owner"),
        lease_expires_at=bindparam("expires"),
    )
    .returning(lanes.c.idx, lanes.c.name, lanes.c.attempts, lanes.c.available_at)
)
RESERVE_TOKENS = (
    update(lanes)
    .where(lanes.c.job_id == bindparam("j"), lanes.c.idx == bindparam("i"))
    .values(reserved_tokens=bindparam("r"))
)
START_JOB = (
    update(jobs)
    .where(jobs.c.id == bindparam("j"))
    .values(status=JobStatus.RUNNING, started_at=bindparam("now"))
)
JOB_STATUS = select(jobs.c.status).where(jobs.c.id == bindparam("job_id"))
TENANT_JOB_STATUS = JOB_STATUS.where(jobs.c.tenant == bindparam("tenant"))
EVENTS_AFTER = (
    select(events.c.seq, events.c.type, events.c.data)
    .where(events.c.job_id == bindparam("job_id"), events.c.seq > bindparam("after"))
    .order_by(events.c.seq)
    .limit(bindparam("limit"))
)

OUTCOME_UPDATE = (
    update(lanes)
    .where(lanes.c.job_id == bindparam("j"), lanes.c.idx == bindparam("i"))
    .values(
        status=bindparam("status"),
        output=bindparam("output"),
        answer_key=bindparam("answer_key"),
        error_type=bindparam("error_type"),
        error_message=bindparam("error_message"),
        prompt_tokens=lanes.c.prompt_tokens + bindparam("p"),
        completion_tokens=lanes.c.completion_tokens + bindparam("c"),
        total_tokens=lanes.c.total_tokens + bindparam("t"),
        finished_at=bindparam("finished_at"),
        available_at=bindparam("available_at"),
        lease_owner=bindparam("lease_owner"),
        lease_expires_at=None,
    )
)
