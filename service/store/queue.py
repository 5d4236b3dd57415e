"""The lanes table as the queue: claiming under caps and leases, heartbeats, and
lanes given back by a stopping process. (Leases that expired are outcomes: a lost
lease is a failed attempt, :meth:`service.store.outcomes.Outcomes.expire_leases`.)"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import and_, exists, func, select, tuple_, update
from sqlalchemy.ext.asyncio import AsyncConnection

from ..spec import lane_task, provider_name
from ..states import DECIDING_JOB, ErrorType, EventType, JobStatus, LaneStatus
from .db import Database, Tx
from .eventlog import EventLog, Item
from .jobrows import SpecCache, lock_jobs
from .statements import CLAIM_LANES, START_JOB
from .tables import jobs, lanes
from .values import Claim, Claimed


class LaneQueue:
    def __init__(
        self, db: Database, log: EventLog, specs: SpecCache, *, lease_seconds: float
    ) -> None:
        self.db = db
        self.log = log
        self.specs = specs
        self.lease_seconds = lease_seconds

    async def claim(
        self, owner: str, limit: int, admit: Callable[[str], bool] | None = None
    ) -> Claimed:
        """Take up to ``limit`` queued lanes whose time has come, respecting per-job caps
        and, through ``admit(provider)``, providers' capacity.

        On PostgreSQL the candidate jobs are locked ``FOR UPDATE SKIP LOCKED``: two
        processes never claim from one job at once, and never wait on each other.
        """
        now = time.time()
        async with self.db.transaction() as tx:
            candidates = select(lanes.c.job_id, lanes.c.idx, lanes.c.available_at).where(
                lanes.c.status == LaneStatus.QUEUED, lanes.c.available_at <= now
            )
            saturated = await self._saturated_jobs(tx.conn)
            # Lanes that a job's cap keeps queued become claimable as its lanes end.
            held_back = bool(saturated)
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
            job_rows = (
                (await tx.conn.execute(tx.locking(job_query, skip_locked=True))).mappings().all()
            )
            held_back = held_back or len(job_rows) < len(wanted)
            running = await self._running_counts(
                tx.conn, [j["id"] for j in job_rows if j["max_concurrency"]]
            )
            claims: list[Claim] = []
            expires = now + self.lease_seconds
            for job in job_rows:
                job_id = job["id"]
                if job["status"] not in DECIDING_JOB:
                    continue
                idxs = wanted[job_id]
                if job["max_concurrency"]:
                    idxs = idxs[: max(0, job["max_concurrency"] - running.get(job_id, 0))]
                spec = self.specs.of(job_id, job["spec"])
                if admit is not None:
                    # Lanes whose provider has no capacity now stay queued.
                    idxs = [i for i in idxs if admit(provider_name(lane_task(spec, i)[1]))]
                held_back = held_back or len(idxs) < len(wanted[job_id])
                if not idxs:
                    continue
                claimed = (
                    await tx.conn.execute(
                        CLAIM_LANES,
                        {"j": job_id, "idxs": idxs, "now": now, "owner": owner, "expires": expires},
                    )
                ).all()
                if not claimed:
                    continue
                claimed = sorted(claimed)
                items: list[Item] = []
                if job["status"] == JobStatus.QUEUED:
                    await tx.conn.execute(START_JOB, {"j": job_id, "now": now})
                    items.append((EventType.JOB_RUNNING, {}))
                items.extend(
                    (EventType.LANE_STARTED, {"lane": idx, "name": name, "attempt": attempt_no})
                    for idx, name, attempt_no in claimed
                )
                await self.log.append(tx, job_id, items, now)
                claims.extend(
                    Claim(
                        job_id,
                        idx,
                        name,
                        attempt_no,
                        spec,
                        job["deadline_at"],
                        now - available[(job_id, idx)],
                    )
                    for idx, name, attempt_no in claimed
                )
        return Claimed(claims, held_back)

    async def _saturated_jobs(self, conn: AsyncConnection) -> list[str]:
        """Jobs with queued lanes and a concurrency cap that already have that many
        lanes running: their queued lanes wait for running ones to end."""
        waiting = lanes.alias("waiting")
        query = (
            select(lanes.c.job_id)
            .join(jobs, jobs.c.id == lanes.c.job_id)
            .where(
                lanes.c.status == LaneStatus.RUNNING,
                jobs.c.max_concurrency.is_not(None),
                exists().where(
                    waiting.c.job_id == lanes.c.job_id, waiting.c.status == LaneStatus.QUEUED
                ),
            )
            .group_by(lanes.c.job_id, jobs.c.max_concurrency)
            .having(func.count() >= jobs.c.max_concurrency)
        )
        return list((await conn.execute(query)).scalars().all())

    async def _running_counts(self, conn: AsyncConnection, job_ids: list[str]) -> dict[str, int]:
        if not job_ids:
            return {}
        query = (
            select(lanes.c.job_id, func.count())
            .where(lanes.c.job_id.in_(job_ids), lanes.c.status == LaneStatus.RUNNING)
            .group_by(lanes.c.job_id)
        )
        return {job_id: count for job_id, count in (await conn.execute(query)).all()}

    async def renew_leases(self, owner: str) -> None:
        """Extend ``owner``'s leases, on lanes and on reducing jobs (the heartbeat).

        Rows another transaction holds are skipped, not waited for: every other writer
        locks a job before its lanes, and this one locks no job, so waiting could close
        a lock cycle. A skipped lane is being recorded or taken away; if not, the next
        beat renews it.
        """
        expires = time.time() + self.lease_seconds
        held = select(lanes.c.job_id, lanes.c.idx).where(
            lanes.c.lease_owner == owner, lanes.c.status == LaneStatus.RUNNING
        )
        reducing = select(jobs.c.id).where(
            jobs.c.lease_owner == owner, jobs.c.status == JobStatus.AGGREGATING
        )
        async with self.db.transaction() as tx:
            held = tx.locking(held, skip_locked=True)
            reducing = tx.locking(reducing, skip_locked=True)
            await tx.conn.execute(
                update(lanes)
                .where(tuple_(lanes.c.job_id, lanes.c.idx).in_(held))
                .values(lease_expires_at=expires)
            )
            await tx.conn.execute(
                update(jobs).where(jobs.c.id.in_(reducing)).values(lease_expires_at=expires)
            )

    async def release(self, owner: str) -> None:
        """Give back every lane and reducer ``owner`` holds (a graceful stop): any
        process takes them at once."""
        now = time.time()
        async with self.db.transaction() as tx:
            await self._requeue(
                tx, and_(lanes.c.lease_owner == owner, lanes.c.status == LaneStatus.RUNNING), now
            )
            await tx.conn.execute(
                update(jobs)
                .where(jobs.c.lease_owner == owner, jobs.c.status == JobStatus.AGGREGATING)
                .values(lease_expires_at=now)
            )

    async def expire_all_leases(self) -> None:
        """SQLite runs one process: at its start, nobody else can hold a lease."""
        async with self.db.transaction() as tx:
            await tx.conn.execute(
                update(lanes)
                .where(lanes.c.status == LaneStatus.RUNNING)
                .values(lease_expires_at=0.0)
            )
            await tx.conn.execute(
                update(jobs)
                .where(jobs.c.status == JobStatus.AGGREGATING)
                .values(lease_expires_at=0.0)
            )

    async def _requeue(self, tx: Tx, where: Any, now: float) -> int:
        """Lanes given back by a stopping worker: queued at once, their attempt counted
        (a lost lease is :meth:`~service.store.outcomes.Outcomes.expire_leases`')."""
        rows = (
            await tx.conn.execute(
                select(lanes.c.job_id, lanes.c.idx, lanes.c.name, lanes.c.attempts).where(where)
            )
        ).all()
        if not rows:
            return 0
        await lock_jobs(tx, {row[0] for row in rows})
        by_job: dict[str, list[Item]] = {}
        for job_id, idx, name, attempts in rows:
            result = await tx.conn.execute(
                update(lanes)
                .where(
                    lanes.c.job_id == job_id,
                    lanes.c.idx == idx,
                    lanes.c.status == LaneStatus.RUNNING,
                    lanes.c.attempts == attempts,
                )
                .values(
                    status=LaneStatus.QUEUED,
                    available_at=now,
                    lease_owner=None,
                    lease_expires_at=None,
                )
            )
            if result.rowcount:
                by_job.setdefault(job_id, []).append(
                    (
                        EventType.LANE_RETRYING,
                        {
                            "lane": idx,
                            "name": name,
                            "attempt": attempts,
                            "error": f"{ErrorType.LEASE_LOST}: the worker running this attempt"
                            " went away",
                            "retry_in_s": 0.0,
                        },
                    )
                )
        for job_id in sorted(by_job):
            await self.log.append(tx, job_id, by_job[job_id], now)
        return sum(len(v) for v in by_job.values())

    async def next_wakeup(self) -> float | None:
        """When the earliest queued lane becomes claimable (retries wait for backoff)."""
        query = select(func.min(lanes.c.available_at)).where(lanes.c.status == LaneStatus.QUEUED)
        async with self.db.read() as conn:
            due = (await conn.execute(query)).scalar_one_or_none()
        return None if due is None else float(due)
