"""Every query Fanout makes, behind one object.

Locking order, so two processes on PostgreSQL never deadlock: a write transaction
locks the job rows it touches first (sorted by id), then their lanes. Every lane
write made on behalf of a running attempt is fenced by (status, attempt, lease
owner): a worker that lost its lease cannot overwrite what another one recorded.
"""

from __future__ import annotations

import base64
import json
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydantic import TypeAdapter
from sqlalchemy import and_, bindparam, delete, func, insert, or_, select, tuple_, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from . import aggregate as agg
from .db import Database, Tx
from .errors import Conflict, InvalidSpec, NotFound
from .models import events, idempotency_keys, jobs, lanes, webhooks
from .policy import OPEN, Decision, Stop, Tally, decide
from .spec import (
    CollectAggregate,
    ErrorView,
    JobSpec,
    JobStatus,
    JobSummary,
    JobView,
    LaneView,
    MajorityAggregate,
    ReduceAggregate,
    ResultView,
    ScoreAggregate,
    SectioningSpec,
    Usage,
    VotingSpec,
    WebhookView,
    lane_names,
    lane_task,
)

_spec_adapter: TypeAdapter[VotingSpec | SectioningSpec] = TypeAdapter(JobSpec)
TERMINAL_JOB = ("succeeded", "failed", "cancelled")
OPEN_JOB = ("queued", "running", "aggregating")
FINAL_EVENTS = frozenset({"job.succeeded", "job.failed", "job.cancelled"})


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def new_job_id(now: float) -> str:
    """A UUID whose leading bits are the creation time, so ids sort by age."""
    bits = (int(now * 1000) << 80) | uuid.uuid4().int & ((1 << 80) - 1)
    return str(uuid.UUID(int=bits))


@dataclass(frozen=True)
class Claim:
    """A lane attempt this process now holds the lease on."""

    job_id: str
    idx: int
    name: str
    attempt: int
    spec: VotingSpec | SectioningSpec
    deadline_at: float | None
    waited_s: float = 0.0  # from claimable to claimed


@dataclass(frozen=True)
class Claimed:
    """What a claim took, and whether it left claimable lanes behind: lanes that a
    job's cap, a provider's limit, the batch size or another process kept from it."""

    claims: list[Claim]
    held_back: bool


@dataclass(frozen=True)
class Outcome:
    """How one attempt ended, as the runner reports it."""

    job_id: str
    idx: int
    attempt: int
    kind: str  # succeeded | failed | timed_out | retry
    output: Any = None
    error_type: str | None = None
    error_message: str | None = None
    retry_in: float = 0.0
    usage: tuple[int, int, int] = (0, 0, 0)
    started_at: float = 0.0
    finished_at: float = 0.0


@dataclass
class Recorded:
    """What a recording transaction leaves for the runner to do."""

    rejected: int = 0
    reduce_jobs: list[str] = field(default_factory=list)


class Store:
    def __init__(self, db: Database, *, lease_seconds: float) -> None:
        self.db = db
        self.lease_seconds = lease_seconds
        self._specs: OrderedDict[str, VotingSpec | SectioningSpec] = OrderedDict()

    # --- helpers -------------------------------------------------------------------

    def spec_of(self, job_id: str, raw: dict[str, Any]) -> VotingSpec | SectioningSpec:
        """Parsed specs are cached: the hot path reads them once per lane outcome."""
        spec = self._specs.get(job_id)
        if spec is None:
            spec = _spec_adapter.validate_python(raw)
            self._specs[job_id] = spec
            if len(self._specs) > 2048:
                self._specs.popitem(last=False)
        return spec

    async def _append(
        self, tx: Tx, job_id: str, items: Sequence[tuple[str, dict[str, Any]]], now: float
    ) -> None:
        """Append events to a job's log with consecutive sequence numbers."""
        if not items:
            return
        last = (
            await tx.conn.execute(_BUMP_SEQ, {"job_id": job_id, "count": len(items)})
        ).scalar_one()
        at = iso(now)
        rows = []
        for offset, (kind, fields) in enumerate(items):
            seq = last - len(items) + 1 + offset
            data = {"job_id": job_id, "seq": seq, "at": at, **fields}
            rows.append({"job_id": job_id, "seq": seq, "type": kind, "data": data})
        await tx.conn.execute(_INSERT_EVENTS, rows)
        tx.events.extend(rows)

    async def _lock_jobs(self, tx: Tx, job_ids: Iterable[str]) -> dict[str, Any]:
        ids = sorted(set(job_ids))
        query = select(jobs).where(jobs.c.id.in_(ids)).order_by(jobs.c.id)
        if not self.db.is_sqlite:
            query = query.with_for_update()
        rows = (await tx.conn.execute(query)).mappings().all()
        return {row["id"]: row for row in rows}

    # --- API side ------------------------------------------------------------------

    async def create_job(
        self,
        spec: VotingSpec | SectioningSpec,
        tenant: str,
        *,
        idempotency: tuple[str, str] | None = None,
        max_in_flight: int | None = None,
        idempotency_ttl_s: float = 86_400.0,
    ) -> tuple[JobView, bool]:
        """Store a job and its lanes; returns ``(the job as created, True)``.

        ``idempotency`` is ``(key, request hash)``: a key seen before with the same
        hash returns that job as it is now (and False); with another hash it is a 422.
        Concurrent requests with one key race on the key's primary key: the losers'
        transactions roll back, job included, and they return the winner's job.
        """
        try:
            created = await self._create_job(
                spec, tenant, idempotency, max_in_flight, idempotency_ttl_s
            )
        except IntegrityError:
            if idempotency is None:
                raise
            existing = await self._idempotent_job(tenant, idempotency)
            if existing is None:
                raise
            created = existing
        if isinstance(created, str):
            return await self.get_job(created, tenant), False
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
            raise _key_reused()
        return str(row[1])

    async def _create_job(
        self,
        spec: VotingSpec | SectioningSpec,
        tenant: str,
        idempotency: tuple[str, str] | None,
        max_in_flight: int | None,
        idempotency_ttl_s: float,
    ) -> JobView | str:
        """The new job's view (built from what was written, not read back), or the id
        of the job an Idempotency-Key already names."""
        now = time.time()
        job_id = new_job_id(now)
        raw = spec.model_dump(mode="json", by_alias=True, exclude_none=True)
        deadline = now + spec.policy.deadline_s if spec.policy.deadline_s else None
        names = lane_names(spec)
        job = {
            "id": job_id,
            "tenant": tenant,
            "status": "queued",
            "mode": spec.mode,
            "spec": raw,
            "lanes_total": len(names),
            "created_at": now,
            "deadline_at": deadline,
            "max_concurrency": spec.policy.max_concurrency,
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "total_tokens": 0,
            "last_seq": 0,
        }
        lane_rows = [
            {
                "job_id": job_id,
                "idx": i,
                "name": name,
                "status": "queued",
                "attempts": 0,
                "prompt_tokens": 0,
                "completion_tokens": 0,
                "total_tokens": 0,
                "queued_at": now,
                "available_at": now,
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
                        raise _key_reused()
                    return str(row["job_id"])
                if row is not None:
                    await tx.conn.execute(
                        delete(idempotency_keys).where(
                            idempotency_keys.c.tenant == tenant, idempotency_keys.c.key == key
                        )
                    )
            if max_in_flight is not None:
                in_flight = (await tx.conn.execute(_IN_FLIGHT, {"tenant": tenant})).scalar_one()
                if in_flight >= max_in_flight:
                    cap = f"{in_flight} jobs in flight: at the cap of {max_in_flight} per tenant"
                    raise InvalidSpec([{"loc": ["body"], "msg": cap}])
            await tx.conn.execute(_INSERT_JOB, job)
            await tx.conn.execute(_INSERT_LANES, lane_rows)
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
            await self._append(tx, job_id, [("job.queued", {"lanes": names})], now)
        self._specs[job_id] = spec
        # The columns written as NULL (not started, no result...) read back as None.
        view = job_view(
            dict.fromkeys(jobs.c.keys()) | job,
            [dict.fromkeys(lanes.c.keys()) | row for row in lane_rows],
        )
        if spec.webhook is not None:
            view.webhook = WebhookView(url=raw["webhook"]["url"], status="waiting", attempts=[])
        return view

    async def _job_row(self, conn: AsyncConnection, job_id: str, tenant: str | None) -> Any:
        _known_form(job_id)
        query = select(jobs).where(jobs.c.id == job_id)
        if tenant is not None:
            query = query.where(jobs.c.tenant == tenant)
        row = (await conn.execute(query)).mappings().first()
        if row is None:
            raise NotFound(f"no job {job_id!r}")
        return row

    async def get_job(self, job_id: str, tenant: str | None) -> JobView:
        async with self.db.read() as conn:
            job = await self._job_row(conn, job_id, tenant)
            lane_rows = (
                (
                    await conn.execute(
                        select(lanes).where(lanes.c.job_id == job_id).order_by(lanes.c.idx)
                    )
                )
                .mappings()
                .all()
            )
            webhook = None
            if job["spec"].get("webhook"):
                webhook = (
                    (await conn.execute(select(webhooks).where(webhooks.c.job_id == job_id)))
                    .mappings()
                    .first()
                )
        view = job_view(job, lane_rows)
        if job["spec"].get("webhook"):
            view.webhook = WebhookView(
                url=job["spec"]["webhook"]["url"],
                status=webhook["status"] if webhook else "waiting",
                attempts=webhook["history"] if webhook else [],
            )
        return view

    async def job_status(self, job_id: str, tenant: str | None) -> str:
        _known_form(job_id)
        async with self.db.read() as conn:
            if tenant is None:
                found = await conn.execute(_JOB_STATUS, {"job_id": job_id})
            else:
                found = await conn.execute(_TENANT_JOB_STATUS, {"job_id": job_id, "tenant": tenant})
            status = found.scalar_one_or_none()
        if status is None:
            raise NotFound(f"no job {job_id!r}")
        return str(status)

    async def is_finished(self, job_id: str) -> bool:
        return await self.job_status(job_id, None) in TERMINAL_JOB

    async def list_jobs(
        self, tenant: str | None, *, status: str | None, cursor: str | None, limit: int
    ) -> tuple[list[JobSummary], str | None]:
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
            JobSummary(
                id=row["id"],
                status=row["status"],
                mode=row["mode"],
                created_at=iso(row["created_at"]) or "",
                finished_at=iso(row["finished_at"]),
                progress=progress.get(row["id"], {}),
                usage=_usage(row),
                metadata=row["spec"].get("metadata", {}),
            )
            for row in page
        ]
        next_cursor = (
            encode_cursor(page[-1]["created_at"], page[-1]["id"]) if len(rows) > limit else None
        )
        return summaries, next_cursor

    async def _progress(
        self, conn: AsyncConnection, job_ids: list[str]
    ) -> dict[str, dict[str, int]]:
        if not job_ids:
            return {}
        query = (
            select(lanes.c.job_id, lanes.c.status, func.count())
            .where(lanes.c.job_id.in_(job_ids))
            .group_by(lanes.c.job_id, lanes.c.status)
        )
        progress: dict[str, dict[str, int]] = {}
        for job_id, status, count in (await conn.execute(query)).all():
            progress.setdefault(job_id, {})[status] = count
        return progress

    async def cancel_job(self, job_id: str, tenant: str | None) -> None:
        """Cancel a job: every open lane ends ``cancelled`` and so does the job, at once."""
        now = time.time()
        async with self.db.transaction() as tx:
            job = await self._job_row(tx.conn, job_id, tenant)
            if not self.db.is_sqlite:
                await self._lock_jobs(tx, [job_id])
                job = await self._job_row(tx.conn, job_id, tenant)
            if job["status"] in TERMINAL_JOB:
                raise Conflict(f"job {job_id!r} is already {job['status']}")
            items = await self._stop_lanes(
                tx, job_id, Stop(OPEN, "cancelled", "cancelled", "the job was cancelled"), now
            )
            items.append(("job.cancelled", {"usage": _usage(job).model_dump()}))
            await self._queue_webhook(tx, job_id, job["spec"], now)
            await tx.conn.execute(
                update(jobs)
                .where(jobs.c.id == job_id)
                .values(
                    status="cancelled",
                    finished_at=now,
                    error={"type": "cancelled", "message": "the job was cancelled"},
                    lease_owner=None,
                )
            )
            await self._append(tx, job_id, items, now)

    async def events_after(
        self, job_id: str, after: int, limit: int = 1000
    ) -> list[dict[str, Any]]:
        async with self.db.read() as conn:
            rows = (
                await conn.execute(
                    _EVENTS_AFTER, {"job_id": job_id, "after": after, "limit": limit}
                )
            ).all()
        return [
            {"job_id": job_id, "seq": seq, "type": kind, "data": data} for seq, kind, data in rows
        ]

    # --- runner side: claiming -----------------------------------------------------

    async def claim(
        self, owner: str, limit: int, admit: Callable[[str], bool] | None = None
    ) -> Claimed:
        """Take up to ``limit`` queued lanes whose time has come, respecting per-job caps.

        On PostgreSQL the candidate jobs are locked ``FOR UPDATE SKIP LOCKED``: two
        processes never claim from one job at once, and never wait on each other.
        """
        now = time.time()
        async with self.db.transaction() as tx:
            candidates = select(lanes.c.job_id, lanes.c.idx, lanes.c.available_at).where(
                lanes.c.status == "queued", lanes.c.available_at <= now
            )
            saturated = await self._saturated_jobs(tx.conn)
            # Lanes that a job's cap keeps queued become claimable as its lanes end.
            held_back = bool(saturated) and await self._any_queued(tx.conn, saturated)
            if saturated:
                candidates = candidates.where(lanes.c.job_id.not_in(saturated))
            rows = (
                await tx.conn.execute(
                    candidates.order_by(lanes.c.available_at, lanes.c.job_id, lanes.c.idx).limit(
                        limit
                    )
                )
            ).all()
            if not rows:
                return Claimed([], held_back)
            # A full page may have left more behind; so may jobs that another process
            # holds (skipped), caps and provider limits (below).
            held_back = held_back or len(rows) >= limit
            wanted: dict[str, list[int]] = {}
            available: dict[tuple[str, int], float] = {}
            for job_id, idx, available_at in rows:
                wanted.setdefault(job_id, []).append(idx)
                available[(job_id, idx)] = available_at
            job_query = select(jobs).where(jobs.c.id.in_(sorted(wanted))).order_by(jobs.c.id)
            if not self.db.is_sqlite:
                job_query = job_query.with_for_update(skip_locked=True)
            job_rows = (await tx.conn.execute(job_query)).mappings().all()
            held_back = held_back or len(job_rows) < len(wanted)
            running = await self._running_counts(
                tx.conn, [j["id"] for j in job_rows if j["max_concurrency"]]
            )
            claims: list[Claim] = []
            expires = now + self.lease_seconds
            for job in job_rows:
                job_id = job["id"]
                if job["status"] not in ("queued", "running"):
                    continue
                idxs = wanted[job_id]
                if job["max_concurrency"]:
                    idxs = idxs[: max(0, job["max_concurrency"] - running.get(job_id, 0))]
                spec = self.spec_of(job_id, job["spec"])
                if admit is not None:
                    # Lanes whose provider has no capacity now stay queued.
                    idxs = [i for i in idxs if admit(_provider_of(lane_task(spec, i)[1]))]
                held_back = held_back or len(idxs) < len(wanted[job_id])
                if not idxs:
                    continue
                claimed = (
                    await tx.conn.execute(
                        _CLAIM_LANES,
                        {"j": job_id, "idxs": idxs, "now": now, "owner": owner, "expires": expires},
                    )
                ).all()
                if not claimed:
                    continue
                claimed = sorted(claimed)
                items: list[tuple[str, dict[str, Any]]] = []
                if job["status"] == "queued":
                    await tx.conn.execute(_START_JOB, {"j": job_id, "now": now})
                    items.append(("job.running", {}))
                items.extend(
                    ("lane.started", {"lane": idx, "name": name, "attempt": attempt})
                    for idx, name, attempt in claimed
                )
                await self._append(tx, job_id, items, now)
                claims.extend(
                    Claim(
                        job_id,
                        idx,
                        name,
                        attempt,
                        spec,
                        job["deadline_at"],
                        now - available[(job_id, idx)],
                    )
                    for idx, name, attempt in claimed
                )
        return Claimed(claims, held_back)

    async def _any_queued(self, conn: AsyncConnection, job_ids: list[str]) -> bool:
        query = select(lanes.c.idx).where(lanes.c.job_id.in_(job_ids), lanes.c.status == "queued")
        return (await conn.execute(query.limit(1))).first() is not None

    async def _saturated_jobs(self, conn: AsyncConnection) -> list[str]:
        """Jobs with a concurrency cap that already have that many lanes running."""
        query = (
            select(lanes.c.job_id)
            .join(jobs, jobs.c.id == lanes.c.job_id)
            .where(lanes.c.status == "running", jobs.c.max_concurrency.is_not(None))
            .group_by(lanes.c.job_id, jobs.c.max_concurrency)
            .having(func.count() >= jobs.c.max_concurrency)
        )
        return list((await conn.execute(query)).scalars().all())

    async def _running_counts(self, conn: AsyncConnection, job_ids: list[str]) -> dict[str, int]:
        if not job_ids:
            return {}
        query = (
            select(lanes.c.job_id, func.count())
            .where(lanes.c.job_id.in_(job_ids), lanes.c.status == "running")
            .group_by(lanes.c.job_id)
        )
        return {job_id: count for job_id, count in (await conn.execute(query)).all()}

    async def renew_leases(self, owner: str) -> None:
        """Extend this process's leases (the heartbeat).

        Rows another transaction holds are skipped, not waited for: every other writer
        locks a job before its lanes, and this one locks no job, so waiting could close
        a lock cycle. A skipped lane is being recorded or taken away; if not, the next
        beat renews it.
        """
        expires = time.time() + self.lease_seconds
        held = select(lanes.c.job_id, lanes.c.idx).where(
            lanes.c.lease_owner == owner, lanes.c.status == "running"
        )
        reducing = select(jobs.c.id).where(
            jobs.c.lease_owner == owner, jobs.c.status == "aggregating"
        )
        if not self.db.is_sqlite:
            held = held.with_for_update(skip_locked=True)
            reducing = reducing.with_for_update(skip_locked=True)
        async with self.db.transaction() as tx:
            await tx.conn.execute(
                update(lanes)
                .where(tuple_(lanes.c.job_id, lanes.c.idx).in_(held))
                .values(lease_expires_at=expires)
            )
            await tx.conn.execute(
                update(jobs).where(jobs.c.id.in_(reducing)).values(lease_expires_at=expires)
            )

    async def release(self, owner: str) -> None:
        """Give back every lane this process holds (a graceful stop): they run again."""
        now = time.time()
        async with self.db.transaction() as tx:
            await self._requeue(
                tx, and_(lanes.c.lease_owner == owner, lanes.c.status == "running"), now
            )
            await tx.conn.execute(
                update(jobs)
                .where(jobs.c.lease_owner == owner, jobs.c.status == "aggregating")
                .values(lease_expires_at=now)
            )

    async def expire_all_leases(self) -> None:
        """SQLite runs one process: at its start, nobody else can hold a lease."""
        async with self.db.transaction() as tx:
            await tx.conn.execute(
                update(lanes).where(lanes.c.status == "running").values(lease_expires_at=0.0)
            )
            await tx.conn.execute(
                update(jobs).where(jobs.c.status == "aggregating").values(lease_expires_at=0.0)
            )

    async def _requeue(self, tx: Tx, where: Any, now: float) -> int:
        rows = (
            await tx.conn.execute(
                select(lanes.c.job_id, lanes.c.idx, lanes.c.name, lanes.c.attempts).where(where)
            )
        ).all()
        if not rows:
            return 0
        await self._lock_jobs(tx, {row[0] for row in rows})
        by_job: dict[str, list[tuple[str, dict[str, Any]]]] = {}
        for job_id, idx, name, attempts in rows:
            result = await tx.conn.execute(
                update(lanes)
                .where(
                    lanes.c.job_id == job_id,
                    lanes.c.idx == idx,
                    lanes.c.status == "running",
                    lanes.c.attempts == attempts,
                )
                .values(status="queued", available_at=now, lease_owner=None, lease_expires_at=None)
            )
            if result.rowcount:
                by_job.setdefault(job_id, []).append(
                    (
                        "lane.retrying",
                        {
                            "lane": idx,
                            "name": name,
                            "attempt": attempts,
                            "error": "lease_lost: the worker running this attempt went away",
                            "retry_in_s": 0.0,
                        },
                    )
                )
        for job_id in sorted(by_job):
            await self._append(tx, job_id, by_job[job_id], now)
        return sum(len(v) for v in by_job.values())

    async def reclaim_expired(self) -> int:
        """Requeue lanes whose worker stopped renewing its lease (crashed or hung)."""
        now = time.time()
        async with self.db.transaction() as tx:
            return await self._requeue(
                tx, and_(lanes.c.status == "running", lanes.c.lease_expires_at < now), now
            )

    # --- runner side: outcomes and decisions ---------------------------------------

    async def record(self, owner: str, outcomes: Sequence[Outcome]) -> Recorded:
        """Store a batch of attempt outcomes in one transaction, then decide each job.

        An outcome whose lane is no longer running under this owner and attempt (the
        lease expired and another process took it, or the job was stopped) is
        rejected: counted, not written.
        """
        now = time.time()
        recorded = Recorded()
        by_job: dict[str, list[Outcome]] = {}
        for outcome in outcomes:
            by_job.setdefault(outcome.job_id, []).append(outcome)
        async with self.db.transaction() as tx:
            job_rows = await self._lock_jobs(tx, by_job)
            for job_id in sorted(by_job):
                job = job_rows.get(job_id)
                if job is None or job["status"] not in ("queued", "running"):
                    recorded.rejected += len(by_job[job_id])
                    continue
                spec = self.spec_of(job_id, job["spec"])
                current = {
                    idx: (status, attempts, lease_owner, name)
                    for idx, status, attempts, lease_owner, name in (
                        await tx.conn.execute(
                            select(
                                lanes.c.idx,
                                lanes.c.status,
                                lanes.c.attempts,
                                lanes.c.lease_owner,
                                lanes.c.name,
                            ).where(
                                lanes.c.job_id == job_id,
                                lanes.c.idx.in_([o.idx for o in by_job[job_id]]),
                            )
                        )
                    ).all()
                }
                valid = []
                for outcome in by_job[job_id]:
                    state = current.get(outcome.idx)
                    if state is None or state[:3] != ("running", outcome.attempt, owner):
                        recorded.rejected += 1
                    else:
                        valid.append((outcome, state[3]))
                if not valid:
                    continue
                items, tokens = await self._write_outcomes(tx, job, spec, valid, now)
                job = {**job, "total_tokens": job["total_tokens"] + tokens}
                if await self._decide_and_apply(tx, job, spec, now, owner, items=items):
                    recorded.reduce_jobs.append(job_id)
        return recorded

    async def _write_outcomes(
        self,
        tx: Tx,
        job: Any,
        spec: VotingSpec | SectioningSpec,
        valid: list[tuple[Outcome, str]],
        now: float,
    ) -> tuple[list[tuple[str, dict[str, Any]]], int]:
        """Write the outcomes; returns their events (appended with the decision's, in
        one go) and the tokens they add to the job's total."""
        job_id = job["id"]
        rows = []
        items: list[tuple[str, dict[str, Any]]] = []
        gates = gate_patterns(spec)
        for outcome, name in valid:
            prompt, completion, total = outcome.usage
            row = {
                "j": job_id,
                "i": outcome.idx,
                "status": outcome.kind if outcome.kind != "retry" else "queued",
                "output": outcome.output,
                "answer_key": None,
                "error_type": outcome.error_type,
                # Upstream text may hold NUL, which PostgreSQL text refuses.
                "error_message": outcome.error_message
                and outcome.error_message.replace("\x00", ""),
                "p": prompt,
                "c": completion,
                "t": total,
                "finished_at": outcome.finished_at if outcome.kind != "retry" else None,
                "available_at": now + outcome.retry_in if outcome.kind == "retry" else now,
                "lease_owner": None,
            }
            usage = {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": total,
            }
            lane = {"lane": outcome.idx, "name": name, "attempt": outcome.attempt}
            duration = round(outcome.finished_at - outcome.started_at, 4)
            if outcome.kind == "succeeded":
                answer = answer_for(spec, outcome.idx, gates, outcome.output)
                row["answer_key"] = agg.answer_key(answer)
                fields = {**lane, "output": outcome.output, "usage": usage, "duration_s": duration}
                if answer is not None:
                    fields["answer"] = answer
                items.append(("lane.succeeded", fields))
            elif outcome.kind == "retry":
                error = f"{outcome.error_type}: {outcome.error_message}"
                items.append(
                    (
                        "lane.retrying",
                        {**lane, "error": error, "retry_in_s": round(outcome.retry_in, 3)},
                    )
                )
            else:
                error_view = {"type": outcome.error_type, "message": outcome.error_message}
                items.append(
                    (
                        f"lane.{outcome.kind}",
                        {**lane, "error": error_view, "usage": usage, "duration_s": duration},
                    )
                )
            rows.append(row)
        await tx.conn.execute(_OUTCOME_UPDATE, rows)
        sums = [sum(o.usage[k] for o, _ in valid) for k in range(3)]
        if any(sums):
            await tx.conn.execute(
                update(jobs)
                .where(jobs.c.id == job_id)
                .values(
                    prompt_tokens=jobs.c.prompt_tokens + sums[0],
                    completion_tokens=jobs.c.completion_tokens + sums[1],
                    total_tokens=jobs.c.total_tokens + sums[2],
                )
            )
        return items, sums[2]

    async def _tally(
        self, conn: AsyncConnection, job_id: str, spec: VotingSpec | SectioningSpec
    ) -> Tally:
        gates = gate_patterns(spec)
        by_status = {
            status: count
            for status, count in (
                await conn.execute(
                    select(lanes.c.status, func.count())
                    .where(lanes.c.job_id == job_id)
                    .group_by(lanes.c.status)
                )
            ).all()
        }
        votes: list[tuple[str, int, int]] = []
        if isinstance(spec.aggregate, MajorityAggregate):
            votes = [
                (key, count, first)
                for key, count, first in (
                    await conn.execute(
                        select(lanes.c.answer_key, func.count(), func.min(lanes.c.idx))
                        .where(
                            lanes.c.job_id == job_id,
                            lanes.c.status == "succeeded",
                            lanes.c.answer_key.is_not(None),
                            lanes.c.idx.not_in(list(gates)),
                        )
                        .group_by(lanes.c.answer_key)
                    )
                ).all()
            ]
        gate_blocked = None
        if gates:
            gate_rows = (
                await conn.execute(
                    select(lanes.c.idx, lanes.c.name, lanes.c.status, lanes.c.answer_key)
                    .where(lanes.c.job_id == job_id, lanes.c.idx.in_(list(gates)))
                    .order_by(lanes.c.idx)
                )
            ).all()
            for _idx, name, status, answer in gate_rows:
                if status not in OPEN and not (status == "succeeded" and answer == '"passed"'):
                    gate_blocked = name
                    break
        first_failure = None
        if any(by_status.get(s) for s in ("failed", "timed_out", "cancelled")):
            row = (
                await conn.execute(
                    select(lanes.c.name, lanes.c.error_type, lanes.c.error_message)
                    .where(
                        lanes.c.job_id == job_id,
                        lanes.c.status.in_(["failed", "timed_out", "cancelled"]),
                    )
                    .order_by(lanes.c.finished_at, lanes.c.idx)
                    .limit(1)
                )
            ).first()
            if row is not None:
                first_failure = (row[0], row[1] or "error", row[2] or "")
        return Tally(sum(by_status.values()), by_status, votes, gate_blocked, first_failure)

    async def _decide_and_apply(
        self,
        tx: Tx,
        job: Any,
        spec: VotingSpec | SectioningSpec,
        now: float,
        owner: str,
        *,
        items: Sequence[tuple[str, dict[str, Any]]] = (),
        deadline_passed: bool = False,
    ) -> bool:
        """Decide what the job does next and do it; ``job`` is its row, locked by this
        transaction (with its current token total). ``items`` are events this
        transaction already made for the job: they are appended first, with the
        decision's. True when a reducer call must run."""
        job_id = job["id"]
        budget = spec.policy.max_total_tokens
        tally = await self._tally(tx.conn, job_id, spec)
        decision = decide(
            spec,
            tally,
            deadline_passed=deadline_passed
            or (job["deadline_at"] is not None and job["deadline_at"] <= now),
            budget_spent=budget is not None and job["total_tokens"] >= budget,
        )
        items = list(items)
        for stop in decision.stops:
            items.extend(await self._stop_lanes(tx, job_id, stop, now))
        needs_reducer = False
        if decision.outcome is not None:
            items.append(("job.aggregating", {}))
            needs_reducer = await self._finish(tx, job, spec, decision, items, now, owner)
        await self._append(tx, job_id, items, now)
        return needs_reducer

    async def _stop_lanes(
        self, tx: Tx, job_id: str, stop: Stop, now: float
    ) -> list[tuple[str, dict[str, Any]]]:
        stopped = (
            await tx.conn.execute(
                update(lanes)
                .where(lanes.c.job_id == job_id, lanes.c.status.in_(stop.statuses))
                .values(
                    status=stop.status,
                    error_type=stop.error_type,
                    error_message=stop.message,
                    finished_at=now,
                    lease_owner=None,
                    lease_expires_at=None,
                )
                .returning(lanes.c.idx, lanes.c.name, lanes.c.attempts)
            )
        ).all()
        items: list[tuple[str, dict[str, Any]]] = []
        for idx, name, attempts in sorted(stopped):
            fields: dict[str, Any] = {"lane": idx, "name": name, "attempt": attempts}
            if stop.error_type is not None:
                fields["error"] = {"type": stop.error_type, "message": stop.message}
            items.append((f"lane.{stop.status}", fields))
        return items

    async def _finish(
        self,
        tx: Tx,
        job: Any,
        spec: VotingSpec | SectioningSpec,
        decision: Decision,
        items: list[tuple[str, dict[str, Any]]],
        now: float,
        owner: str,
    ) -> bool:
        """Write the job's result or error, exactly once (fenced on its open status)."""
        job_id = job["id"]
        if decision.outcome == "fail":
            await self._write_final(tx, job_id, "failed", None, decision.error, items, now)
            return False
        results = await self._lane_results(tx.conn, job_id, spec)
        gates = gate_patterns(spec)
        blocked_by = next((r.name for r in results if r.index in gates and _gate_blocks(r)), None)
        if blocked_by is not None:
            result = ResultView(output=None, blocked=True, blocked_by=blocked_by).model_dump()
            await self._write_final(tx, job_id, "succeeded", result, None, items, now)
            return False
        if isinstance(spec.aggregate, ReduceAggregate):
            await tx.conn.execute(
                update(jobs)
                .where(jobs.c.id == job_id, jobs.c.status.in_(("queued", "running")))
                .values(
                    status="aggregating",
                    lease_owner=owner,
                    lease_expires_at=now + self.lease_seconds,
                    result={"partial": decision.partial},
                )
            )
            return True
        # Gate verdicts are not votes or scores; collect shows every section.
        inputs = (
            results
            if isinstance(spec.aggregate, CollectAggregate)
            else [r for r in results if r.index not in gates]
        )
        output, details = agg.combine(spec.aggregate, inputs)
        if isinstance(spec.aggregate, MajorityAggregate | ScoreAggregate) and output is None:
            error = {
                "type": "no_answer",
                "message": "no lane gave an answer that could be extracted",
            }
            await self._write_final(tx, job_id, "failed", None, error, items, now)
            return False
        result = ResultView(output=output, details=details, partial=decision.partial).model_dump()
        await self._write_final(tx, job_id, "succeeded", result, None, items, now)
        return False

    async def _write_final(
        self,
        tx: Tx,
        job_id: str,
        status: str,
        result: dict[str, Any] | None,
        error: dict[str, Any] | None,
        items: list[tuple[str, dict[str, Any]]],
        now: float,
    ) -> None:
        updated = (
            await tx.conn.execute(
                update(jobs)
                .where(jobs.c.id == job_id, jobs.c.status.not_in(TERMINAL_JOB))
                .values(
                    status=status, result=result, error=error, finished_at=now, lease_owner=None
                )
                .returning(
                    jobs.c.prompt_tokens, jobs.c.completion_tokens, jobs.c.total_tokens, jobs.c.spec
                )
            )
        ).first()
        if updated is None:
            return
        await self._queue_webhook(tx, job_id, updated[3], now)
        usage = {
            "prompt_tokens": updated[0],
            "completion_tokens": updated[1],
            "total_tokens": updated[2],
        }
        if status == "succeeded":
            items.append(("job.succeeded", {"result": result, "usage": usage}))
        else:
            items.append(("job.failed", {"error": error, "usage": usage}))

    async def _lane_results(
        self, conn: AsyncConnection, job_id: str, spec: VotingSpec | SectioningSpec
    ) -> list[agg.LaneResult]:
        rows = (
            await conn.execute(
                select(
                    lanes.c.idx, lanes.c.name, lanes.c.status, lanes.c.output, lanes.c.answer_key
                )
                .where(lanes.c.job_id == job_id)
                .order_by(lanes.c.idx)
            )
        ).all()
        return [
            agg.LaneResult(idx, name, status, output, json.loads(key) if key is not None else None)
            for idx, name, status, output, key in rows
        ]

    async def lane_results(
        self, job_id: str
    ) -> tuple[VotingSpec | SectioningSpec, list[agg.LaneResult]]:
        async with self.db.read() as conn:
            job = await self._job_row(conn, job_id, None)
            spec = self.spec_of(job_id, job["spec"])
            return spec, await self._lane_results(conn, job_id, spec)

    async def finish_reduce(
        self,
        job_id: str,
        owner: str,
        *,
        output: str | None,
        error: dict[str, str] | None,
        usage: tuple[int, int, int],
    ) -> bool:
        """Store the reducer's answer, if this process still holds the job's lease."""
        now = time.time()
        async with self.db.transaction() as tx:
            job = (await self._lock_jobs(tx, [job_id])).get(job_id)
            if job is None or job["status"] != "aggregating" or job["lease_owner"] != owner:
                return False
            prompt, completion, total = usage
            await tx.conn.execute(
                update(jobs)
                .where(jobs.c.id == job_id)
                .values(
                    prompt_tokens=jobs.c.prompt_tokens + prompt,
                    completion_tokens=jobs.c.completion_tokens + completion,
                    total_tokens=jobs.c.total_tokens + total,
                )
            )
            items: list[tuple[str, dict[str, Any]]] = []
            if error is not None:
                await self._write_final(tx, job_id, "failed", None, error, items, now)
            else:
                partial = bool((job["result"] or {}).get("partial"))
                results = await self._lane_results(
                    tx.conn, job_id, self.spec_of(job_id, job["spec"])
                )
                details = {"inputs": sum(1 for r in results if r.succeeded)}
                result = ResultView(output=output, details=details, partial=partial).model_dump()
                await self._write_final(tx, job_id, "succeeded", result, None, items, now)
            await self._append(tx, job_id, items, now)
            return True

    async def reduce_budget_left(self, job_id: str) -> int | None:
        async with self.db.read() as conn:
            job = await self._job_row(conn, job_id, None)
        budget = self.spec_of(job_id, job["spec"]).policy.max_total_tokens
        return None if budget is None else budget - job["total_tokens"]

    async def take_orphaned_reductions(self, owner: str) -> list[str]:
        """Aggregating jobs whose reducer's process went away: this process takes them."""
        now = time.time()
        async with self.db.transaction() as tx:
            query = select(jobs.c.id).where(
                jobs.c.status == "aggregating", jobs.c.lease_expires_at < now
            )
            if not self.db.is_sqlite:
                query = query.with_for_update(skip_locked=True)
            ids = list((await tx.conn.execute(query)).scalars().all())
            if ids:
                await tx.conn.execute(
                    update(jobs)
                    .where(jobs.c.id.in_(ids))
                    .values(lease_owner=owner, lease_expires_at=now + self.lease_seconds)
                )
        return ids

    async def expire_deadlines(self, owner: str) -> list[str]:
        """Decide every job whose deadline passed; returns jobs that now need a reducer."""
        now = time.time()
        query = select(jobs.c.id).where(
            jobs.c.status.in_(("queued", "running")), jobs.c.deadline_at <= now
        )
        async with self.db.read() as conn:
            due = list((await conn.execute(query)).scalars().all())
        reduce_jobs = []
        for job_id in due:
            async with self.db.transaction() as tx:
                job = (await self._lock_jobs(tx, [job_id])).get(job_id)
                if job is None or job["status"] not in ("queued", "running"):
                    continue
                spec = self.spec_of(job_id, job["spec"])
                if await self._decide_and_apply(tx, job, spec, now, owner, deadline_passed=True):
                    reduce_jobs.append(job_id)
        return reduce_jobs

    # --- webhooks ------------------------------------------------------------------

    async def _queue_webhook(
        self, tx: Tx, job_id: str, raw_spec: dict[str, Any], now: float
    ) -> None:
        """In the transaction that ends the job: the delivery cannot be lost."""
        url = (raw_spec.get("webhook") or {}).get("url")
        if url:
            await tx.conn.execute(
                insert(webhooks).values(
                    job_id=job_id,
                    url=url,
                    status="pending",
                    attempts=0,
                    next_attempt_at=now,
                    history=[],
                )
            )

    async def claim_webhooks(self, owner: str, limit: int = 50) -> list[tuple[str, str, int]]:
        """Due deliveries, leased to this process: ``(job id, url, attempts so far)``."""
        now = time.time()
        async with self.db.transaction() as tx:
            query = (
                select(webhooks.c.job_id, webhooks.c.url, webhooks.c.attempts)
                .where(
                    webhooks.c.status == "pending",
                    webhooks.c.next_attempt_at <= now,
                    or_(webhooks.c.lease_expires_at.is_(None), webhooks.c.lease_expires_at < now),
                )
                .order_by(webhooks.c.next_attempt_at)
                .limit(limit)
            )
            if not self.db.is_sqlite:
                query = query.with_for_update(skip_locked=True)
            rows = [(str(j), str(u), int(a)) for j, u, a in (await tx.conn.execute(query)).all()]
            if rows:
                await tx.conn.execute(
                    update(webhooks)
                    .where(webhooks.c.job_id.in_([r[0] for r in rows]))
                    .values(lease_owner=owner, lease_expires_at=now + self.lease_seconds)
                )
        return rows

    async def record_webhook_attempt(
        self,
        job_id: str,
        owner: str,
        *,
        attempt: dict[str, Any],
        delivered: bool,
        retry_at: float | None,
    ) -> None:
        """One delivery attempt: delivered, retried at ``retry_at``, or given up (None)."""
        async with self.db.transaction() as tx:
            row = (
                (await tx.conn.execute(select(webhooks).where(webhooks.c.job_id == job_id)))
                .mappings()
                .first()
            )
            if row is None or row["lease_owner"] != owner or row["status"] != "pending":
                return
            status = "delivered" if delivered else ("pending" if retry_at is not None else "failed")
            await tx.conn.execute(
                update(webhooks)
                .where(webhooks.c.job_id == job_id)
                .values(
                    status=status,
                    attempts=row["attempts"] + 1,
                    history=[*row["history"], attempt],
                    next_attempt_at=retry_at if retry_at is not None else row["next_attempt_at"],
                    lease_owner=None,
                    lease_expires_at=None,
                )
            )

    async def next_wakeup(self) -> float | None:
        """When the earliest queued lane becomes claimable (retries wait for backoff)."""
        query = select(func.min(lanes.c.available_at)).where(lanes.c.status == "queued")
        async with self.db.read() as conn:
            due = (await conn.execute(query)).scalar_one_or_none()
        return None if due is None else float(due)


# Hot statements, built once: SQLAlchemy then reuses their cache keys and compiled SQL.
_BUMP_SEQ = (
    update(jobs)
    .where(jobs.c.id == bindparam("job_id"))
    .values(last_seq=jobs.c.last_seq + bindparam("count"))
    .returning(jobs.c.last_seq)
)
_INSERT_EVENTS = insert(events)
_INSERT_JOB = insert(jobs)
_INSERT_LANES = insert(lanes)
_IN_FLIGHT = select(func.count()).where(
    jobs.c.tenant == bindparam("tenant"), jobs.c.status.in_(OPEN_JOB)
)
# (Bound names must differ from the updated table's columns: "j", not "job_id".)
_CLAIM_LANES = (
    update(lanes)
    .where(
        lanes.c.job_id == bindparam("j"),
        lanes.c.idx.in_(bindparam("idxs", expanding=True)),
        lanes.c.status == "queued",
    )
    .values(
        status="running",
        attempts=lanes.c.attempts + 1,
        started_at=func.coalesce(lanes.c.started_at, bindparam("now")),
        lease_owner=bindparam("owner"),
        lease_expires_at=bindparam("expires"),
    )
    .returning(lanes.c.idx, lanes.c.name, lanes.c.attempts)
)
_START_JOB = (
    update(jobs)
    .where(jobs.c.id == bindparam("j"))
    .values(status="running", started_at=bindparam("now"))
)
_JOB_STATUS = select(jobs.c.status).where(jobs.c.id == bindparam("job_id"))
_TENANT_JOB_STATUS = _JOB_STATUS.where(jobs.c.tenant == bindparam("tenant"))
_EVENTS_AFTER = (
    select(events.c.seq, events.c.type, events.c.data)
    .where(events.c.job_id == bindparam("job_id"), events.c.seq > bindparam("after"))
    .order_by(events.c.seq)
    .limit(bindparam("limit"))
)

_OUTCOME_UPDATE = (
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


def provider_of(claim: Claim) -> str:
    """The provider a lane calls (``http`` for http tasks), for capacity accounting."""
    return _provider_of(lane_task(claim.spec, claim.idx)[1])


def _provider_of(task: Any) -> str:
    return str(task.provider) if getattr(task, "kind", "") == "llm" else "http"


def gate_patterns(spec: VotingSpec | SectioningSpec) -> dict[int, str]:
    if not isinstance(spec, SectioningSpec):
        return {}
    return {i: s.gate.block_if for i, s in enumerate(spec.sections) if s.gate is not None}


def answer_for(
    spec: VotingSpec | SectioningSpec, idx: int, gates: dict[int, str], output: Any
) -> Any:
    """A gate lane's verdict, or the vote/score the aggregate reads from the output."""
    if idx in gates:
        return "blocked" if re.search(gates[idx], agg.output_text(output)) else "passed"
    return agg.lane_answer(spec.aggregate, output)


def _gate_blocks(result: agg.LaneResult) -> bool:
    """Fail closed: a gate blocks unless it ran and passed."""
    return not (result.succeeded and result.answer == "passed")


def _usage(row: Any) -> Usage:
    return Usage(
        prompt_tokens=row["prompt_tokens"],
        completion_tokens=row["completion_tokens"],
        total_tokens=row["total_tokens"],
    )


def _known_form(job_id: str) -> None:
    """Job ids are UUIDs: anything else is no job (and never reaches the database)."""
    try:
        if str(uuid.UUID(job_id)) == job_id:
            return
    except ValueError:
        pass
    raise NotFound(f"no job {job_id[:64]!r}")


def _key_reused() -> InvalidSpec:
    return InvalidSpec(
        [
            {
                "loc": ["header", "Idempotency-Key"],
                "msg": "this key was already used with a different request body",
            }
        ]
    )


def encode_cursor(created_at: float, job_id: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([created_at, job_id]).encode()).decode()


def decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        created_at, job_id = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        return float(created_at), str(job_id)
    except (ValueError, TypeError) as exc:
        raise InvalidSpec(
            [{"loc": ["query", "cursor"], "msg": "not a cursor this server gave out"}]
        ) from exc


def job_view(job: Any, lane_rows: Sequence[Any]) -> JobView:
    progress: dict[str, int] = {}
    lane_views = []
    for row in lane_rows:
        progress[row["status"]] = progress.get(row["status"], 0) + 1
        error = None
        if row["error_type"] is not None and row["status"] != "succeeded":
            error = ErrorView(type=row["error_type"], message=row["error_message"] or "")
        duration = None
        if row["started_at"] is not None and row["finished_at"] is not None:
            duration = round(row["finished_at"] - row["started_at"], 4)
        lane_views.append(
            LaneView(
                index=row["idx"],
                name=row["name"],
                status=row["status"],
                attempts=row["attempts"],
                output=row["output"],
                answer=json.loads(row["answer_key"]) if row["answer_key"] is not None else None,
                error=error,
                usage=_usage(row),
                queued_at=iso(row["queued_at"]),
                started_at=iso(row["started_at"]),
                finished_at=iso(row["finished_at"]),
                duration_s=duration,
            )
        )
    status = JobStatus(job["status"])
    result = None
    if job["result"] is not None and status is JobStatus.SUCCEEDED:
        result = ResultView(**job["result"])
    error = ErrorView(**job["error"]) if job["error"] is not None else None
    return JobView(
        id=job["id"],
        status=status,
        mode=job["mode"],
        spec=job["spec"],
        created_at=iso(job["created_at"]) or "",
        started_at=iso(job["started_at"]),
        finished_at=iso(job["finished_at"]),
        progress=progress,
        lanes=lane_views,
        result=result,
        error=error,
        usage=_usage(job),
        metadata=job["spec"].get("metadata", {}),
    )
