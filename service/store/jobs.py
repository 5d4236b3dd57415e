"""Jobs as callers see them: created, read, listed, cancelled."""

from __future__ import annotations

import re
import time
import uuid
from decimal import Decimal
from typing import Any

from sqlalchemy import and_, delete, func, insert, or_, select
from sqlalchemy.exc import IntegrityError

from ..errors import BadCursor, IdempotencyConflict, JobFinished, JobNotFound, TenantAtCapacity
from ..policy import Stop
from ..spec import JobSpec, MapSpec, lane_names, lane_providers, stored
from ..states import (
    OPEN_LANE,
    TERMINAL_JOB,
    ErrorType,
    EventType,
    JobStatus,
    LaneStatus,
    WebhookStatus,
)
from ..views import NO_USAGE, JobSummary, JobView, LaneView, WebhookView
from .db import Conn, Database, Tx
from .decisions import Decisions
from .eventlog import EventLog, Item
from .jobrows import SpecCache, job_row, known_form, lock_jobs
from .outbox import WebhookOutbox
from .queue import LaneQueue, startable
from .rendering import job_summary, job_view, lane_view, progress_of
from .statements import (
    IN_FLIGHT,
    INSERT_JOB,
    INSERT_JOB_WITHIN_CAP,
    JOB_LANES,
    JOB_STATUS,
    JOB_TASKS,
    TENANT_JOB_STATUS,
    inserting,
)
from .tables import idempotency_keys, jobs, lanes
from .values import Claim, Starter


def new_job_id(now: float) -> str:
    """A UUID whose leading bits are the creation time, so ids sort by age."""
    bits = (int(now * 1000) << 80) | uuid.uuid4().int & ((1 << 80) - 1)
    return str(uuid.UUID(int=bits))


# A cursor names the last job of a page: its creation time (epoch seconds, positional
# digits that read back as the same float) and its id. Any string of this form is a
# position in the list, so the document can state the form and the server takes it.
CURSOR_PATTERN = (
    r"^[0-9]{1,20}(\.[0-9]{1,20})?_"
    r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
)
_CURSOR = re.compile(CURSOR_PATTERN)


def encode_cursor(created_at: float, job_id: str) -> str:
    return f"{Decimal(repr(created_at)):f}_{job_id}"


def decode_cursor(cursor: str) -> tuple[float, str]:
    """The (created_at, id) a cursor names; a string of another form is no cursor."""
    if _CURSOR.fullmatch(cursor) is None:
        raise BadCursor()
    created_at, job_id = cursor.split("_")
    return float(created_at), job_id


# A per-item map's vote k of every item is ready k steps of this after the job is
# stored: claims (which take lanes in the order they became ready) then take the
# items' first votes, then their second ones, and so on, so an item's votes come back
# one after another, and its stopping rule can stop it before its other lanes run.
VOTE_STAGGER_S = 1e-5

# A lane cursor is the index of the last lane of a page, in digits: every such string
# is a position (nine digits stay within the 32-bit index column).
LANE_CURSOR_PATTERN = r"^[0-9]{1,9}$"
_LANE_CURSOR = re.compile(LANE_CURSOR_PATTERN)


def decode_lane_cursor(cursor: str) -> int:
    """The lane index a lane cursor names; a string of another form is no cursor."""
    if _LANE_CURSOR.fullmatch(cursor) is None:
        raise BadCursor()
    return int(cursor)


class Jobs:
    def __init__(
        self,
        db: Database,
        log: EventLog,
        specs: SpecCache,
        decisions: Decisions,
        outbox: WebhookOutbox,
        queue: LaneQueue,
    ) -> None:
        self.db = db
        self.queue = queue
        self.log = log
        self.specs = specs
        self.decisions = decisions
        self.outbox = outbox

    async def create(
        self,
        spec: JobSpec,
        tenant: str,
        *,
        idempotency: tuple[str, str] | None = None,
        max_in_flight: int | None = None,
        idempotency_ttl_s: float = 86_400.0,
        with_lanes: bool = True,
        starter: Starter | None = None,
    ) -> tuple[JobView, bool]:
        """Store a job and its lanes; returns ``(the job as created, True)``.

        ``starter``: a runner in this process, which starts what lanes it can as the job
        is stored (:meth:`LaneQueue.start_new`); the view shows them running.

        ``idempotency`` is ``(key, request hash)``: a key seen before with the same
        hash returns that job as it is now (and False); with another hash it is an
        :class:`IdempotencyConflict`. Concurrent requests with one key race on the
        key's primary key: the losers' transactions roll back, job included, and they
        return the winner's job. Over ``max_in_flight`` open jobs of the tenant:
        :class:`TenantAtCapacity`. Without ``with_lanes``, the view's ``lanes`` are
        empty (a big map's are megabytes).
        """
        try:
            created = await self._create(
                spec, tenant, idempotency, max_in_flight, idempotency_ttl_s, with_lanes, starter
            )
        except IntegrityError:
            if idempotency is None:
                raise
            existing = await self._idempotent_job(tenant, idempotency)
            if existing is None:
                raise
            created = existing
        if isinstance(created, str):
            return await self.get(created, tenant, with_lanes=with_lanes), False
        return created, True

    async def _idempotent_job(self, tenant: str, idempotency: tuple[str, str]) -> str | None:
        key, request_hash = idempotency
        async with self.db.read() as conn:
            row = (
                await conn.execute(
                    select(idempotency_keys.c.request_hash, idempotency_keys.c.job_id).where(
                        idempotency_keys.c.tenant == tenant, idempotency_keys.c.key == key
                    )
                )
            ).first()
        if row is None:
            return None
        if row[0] != request_hash:
            raise IdempotencyConflict()
        return str(row[1])

    async def _create(
        self,
        spec: JobSpec,
        tenant: str,
        idempotency: tuple[str, str] | None,
        max_in_flight: int | None,
        idempotency_ttl_s: float,
        with_lanes: bool = True,
        starter: Starter | None = None,
    ) -> JobView | str:
        """The new job's view (built from what was written, not read back), or the id
        of the job an Idempotency-Key already names."""
        now = time.time()
        job_id = new_job_id(now)
        raw = stored(spec)
        deadline = now + spec.policy.deadline_s if spec.policy.deadline_s else None
        names = lane_names(spec)
        providers = lane_providers(spec)
        votes = spec.votes if isinstance(spec, MapSpec) else 1
        job = {
            "id": job_id,
            "tenant": tenant,
            "status": JobStatus.QUEUED,
            "mode": spec.mode,
            "spec": raw,
            "lanes_total": len(names),
            "created_at": now,
            "deadline_at": deadline,
            "max_concurrency": spec.policy.max_concurrency,
            **NO_USAGE.model_dump(),
            "started_at": None,
            "last_seq": 0,
            "reduce_attempts": 0,
        }
        lane_rows = [
            {
                "job_id": job_id,
                "idx": i,
                "name": name,
                "status": LaneStatus.QUEUED,
                "attempts": 0,
                **NO_USAGE.model_dump(),
                "queued_at": now,
                # A per-item map's votes become ready vote by vote (see VOTE_STAGGER_S).
                "available_at": now + (i % votes) * VOTE_STAGGER_S,
                "provider": providers[i],
                "reserved_tokens": 0,
                # (set when a lane starts with the job: LaneQueue.start_new)
                "started_at": None,
                "lease_owner": None,
                "lease_expires_at": None,
            }
            for i, name in enumerate(names)
        ]
        async with self.db.transaction() as tx:
            if idempotency is not None:
                key, request_hash = idempotency
                row = (
                    (
                        await tx.conn.execute(
                            select(idempotency_keys).where(
                                idempotency_keys.c.tenant == tenant, idempotency_keys.c.key == key
                            )
                        )
                    )
                    .mappings()
                    .first()
                )
                if row is not None and row["expires_at"] > now:
                    if row["request_hash"] != request_hash:
                        raise IdempotencyConflict()
                    return str(row["job_id"])
                if row is not None:
                    await tx.conn.execute(
                        delete(idempotency_keys).where(
                            idempotency_keys.c.tenant == tenant, idempotency_keys.c.key == key
                        )
                    )
            items: list[Item] = [(EventType.JOB_QUEUED, {"lanes": names})]
            self.specs.put(job_id, spec)
            if starter is not None:
                claims = await self._start(tx, starter, job, lane_rows, spec, now)
                if claims:
                    items.append((EventType.JOB_RUNNING, {}))
                    items.extend(
                        (EventType.LANE_STARTED, {"lane": c.idx, "name": c.name, "attempt": 1})
                        for c in claims
                    )
            job["last_seq"] = len(items)
            if max_in_flight is None:
                await tx.conn.execute(INSERT_JOB, job)
            else:
                within_cap = job | {"cap": max_in_flight}
                if not (await tx.conn.execute(INSERT_JOB_WITHIN_CAP, within_cap)).rowcount:
                    counted = await tx.conn.execute(IN_FLIGHT, {"tenant": tenant})
                    raise TenantAtCapacity(counted.scalar_one(), max_in_flight)
            await tx.conn.execute(*inserting(lanes, lane_rows, arrays=tx.binds_arrays))
            if idempotency is not None:
                await tx.conn.execute(
                    insert(idempotency_keys).values(
                        tenant=tenant,
                        key=idempotency[0],
                        request_hash=idempotency[1],
                        job_id=job_id,
                        expires_at=now + idempotency_ttl_s,
                    )
                )
            await self.log.append_new(tx, job_id, items, now)
        # The columns written as NULL (not started, no result...) read back as None.
        view = job_view(
            dict.fromkeys(jobs.c.keys()) | job,
            [dict.fromkeys(lanes.c.keys()) | row for row in lane_rows] if with_lanes else [],
            progress_of(lane_rows),
        )
        if spec.webhook is not None:
            view.webhook = WebhookView(
                url=raw["webhook"]["url"], status=WebhookStatus.WAITING, attempts=[]
            )
        return view

    async def _start(
        self,
        tx: Tx,
        starter: Starter,
        job: dict[str, Any],
        lane_rows: list[dict[str, Any]],
        spec: JobSpec,
        now: float,
    ) -> list[Claim]:
        """The lanes ``starter`` starts with the job (its slots held until the
        transaction is over, the claims handed to it if it commits)."""
        ready = startable(job, lane_rows, now)
        reserved = starter.reserve(len(ready))
        claims: list[Claim] = []
        tx.ended.append(lambda committed: starter.release(reserved, claims if committed else []))
        if reserved > 0:
            claims += await self.queue.start_new(tx, job, ready, spec, starter.owner, reserved, now)
        return claims

    async def get(
        self,
        job_id: str,
        tenant: str | None,
        *,
        with_lanes: bool = True,
        max_lanes: int | None = None,
    ) -> JobView:
        """The job. Without ``with_lanes`` (or when it has more than ``max_lanes``), its
        ``lanes`` are empty and no lane row is read: ``progress`` (lanes per status) is
        counted on the (status, job) index."""
        async with self.db.read() as conn:
            job = await job_row(conn, job_id, tenant)
            if max_lanes is not None and job["lanes_total"] > max_lanes:
                with_lanes = False
            if with_lanes:
                found = await conn.execute(JOB_LANES, {"job_id": job_id})
                lane_rows = found.mappings().all()
                progress = progress_of(lane_rows)
            else:
                lane_rows = []
                progress = (await self._progress(conn, [job_id])).get(job_id, {})
            webhook = await self.outbox.view(conn, job_id, job["spec"])
        view = job_view(job, lane_rows, progress)
        view.webhook = webhook
        return view

    async def lane_page(
        self,
        job_id: str,
        tenant: str | None,
        *,
        status: str | None = None,
        name: str | None = None,
        cursor: str | None = None,
        limit: int,
    ) -> tuple[list[LaneView], str | None]:
        """The job's lanes after ``cursor``, in lane order, at most ``limit``, of
        ``status`` and named ``name`` if given; and the cursor of the next page (None:
        this was the last). One range read of the lanes' primary key (job, index)."""
        known_form(job_id)
        after = decode_lane_cursor(cursor) if cursor is not None else -1
        query = (
            select(lanes)
            .where(lanes.c.job_id == job_id, lanes.c.idx > after)
            .order_by(lanes.c.idx)
            .limit(limit + 1)
        )
        if status is not None:
            query = query.where(lanes.c.status == status)
        if name is not None:
            query = query.where(lanes.c.name == name)
        async with self.db.read() as conn:
            found = (await conn.execute(JOB_TASKS, {"job_id": job_id})).first()
            if found is None or (tenant is not None and found.tenant != tenant):
                raise JobNotFound(job_id)
            rows = (await conn.execute(query)).mappings().all()
        tasks = len(found.tasks or ())
        page = [lane_view(row, tasks) for row in rows[:limit]]
        next_cursor = str(page[-1].index) if len(rows) > limit else None
        return page, next_cursor

    async def status(self, job_id: str, tenant: str | None) -> JobStatus:
        known_form(job_id)
        async with self.db.read() as conn:
            if tenant is None:
                found = await conn.execute(JOB_STATUS, {"job_id": job_id})
            else:
                found = await conn.execute(TENANT_JOB_STATUS, {"job_id": job_id, "tenant": tenant})
            status = found.scalar_one_or_none()
        if status is None:
            raise JobNotFound(job_id)
        return JobStatus(status)

    async def is_finished(self, job_id: str) -> bool:
        return (await self.status(job_id, None)).terminal

    async def page(
        self,
        tenant: str | None,
        *,
        status: str | None,
        cursor: str | None,
        limit: int,
        with_results: bool = False,
    ) -> tuple[list[JobSummary], str | None]:
        """The tenant's jobs after ``cursor``, newest first, and the next page's cursor;
        ``with_results``: each with its result or error (the row has them: no more reads)."""
        query = select(jobs).order_by(jobs.c.created_at.desc(), jobs.c.id.desc()).limit(limit + 1)
        if tenant is not None:
            query = query.where(jobs.c.tenant == tenant)
        if status is not None:
            query = query.where(jobs.c.status == status)
        if cursor is not None:
            created_at, job_id = decode_cursor(cursor)
            query = query.where(
                or_(
                    jobs.c.created_at < created_at,
                    and_(jobs.c.created_at == created_at, jobs.c.id < job_id),
                )
            )
        async with self.db.read() as conn:
            rows = (await conn.execute(query)).mappings().all()
            page = rows[:limit]
            progress = await self._progress(conn, [row["id"] for row in page])
        summaries = [
            job_summary(row, progress.get(row["id"], {}), with_result=with_results) for row in page
        ]
        next_cursor = (
            encode_cursor(page[-1]["created_at"], page[-1]["id"]) if len(rows) > limit else None
        )
        return summaries, next_cursor

    async def _progress(self, conn: Conn, job_ids: list[str]) -> dict[str, dict[str, int]]:
        if not job_ids:
            return {}
        query = (
            select(lanes.c.job_id, lanes.c.status, func.count())
            .where(lanes.c.status.in_(tuple(LaneStatus)), lanes.c.job_id.in_(job_ids))
            .group_by(lanes.c.job_id, lanes.c.status)
        )
        progress: dict[str, dict[str, int]] = {}
        for job_id, status, count in (await conn.execute(query)).all():
            progress.setdefault(job_id, {})[status] = count
        return progress

    async def cancel(self, job_id: str, tenant: str | None) -> None:
        """Cancel a job: every open lane ends ``cancelled`` and so does the job, at once.
        :class:`JobFinished` when it had ended already."""
        now = time.time()
        async with self.db.transaction() as tx:
            job = await job_row(tx.conn, job_id, tenant)
            if not tx.is_sqlite:
                await lock_jobs(tx, [job_id])
                job = await job_row(tx.conn, job_id, tenant)
            if job["status"] in TERMINAL_JOB:
                raise JobFinished(job_id, job["status"])
            stop = Stop(
                OPEN_LANE, LaneStatus.CANCELLED, ErrorType.CANCELLED, "the job was cancelled"
            )
            items = await self.decisions.stop_lanes(tx, job_id, stop, now)
            error = {"type": ErrorType.CANCELLED, "message": "the job was cancelled"}
            await self.decisions.finish(tx, job_id, JobStatus.CANCELLED, items, now, error=error)
            await self.log.append(tx, job_id, items, now)
