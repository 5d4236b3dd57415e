"""The reducer's steps, durable like lanes: an aggregating job's row says how many
attempts its reducer made and when the next may start, and is leased to the process
running the attempt. A process that dies mid-attempt, or stops during a backoff, leaves
the row to whichever runner claims it next; nothing waits in memory."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import or_, select, update

from ..aggregate import Tree
from ..jsonsafe import scrub
from ..policy import budget_spent
from ..states import EventType, JobStatus
from ..views import Usage
from .db import Database, Tx
from .decisions import Decisions
from .eventlog import EventLog, Item
from .jobrows import SpecCache, lock_jobs, locked
from .outcomes import add_usage
from .statements import JOB_STATE, NEXT_REDUCER_AT
from .tables import jobs
from .values import ReductionClaim


def _due(now: float) -> Any:
    return (
        (jobs.c.status == JobStatus.AGGREGATING)
        & (jobs.c.reduce_available_at <= now)
        & or_(jobs.c.lease_owner.is_(None), jobs.c.lease_expires_at < now)
    )


class Reductions:
    def __init__(
        self,
        db: Database,
        log: EventLog,
        specs: SpecCache,
        decisions: Decisions,
        *,
        lease_seconds: float,
    ) -> None:
        self.db = db
        self.log = log
        self.specs = specs
        self.decisions = decisions
        self.lease_seconds = lease_seconds

    async def claim(self, owner: str, limit: int = 50) -> list[ReductionClaim]:
        """Reducer attempts that are due (first ones, retries after their backoff, and
        those whose process went away), leased to ``owner``."""
        now = time.time()
        claims = []
        async with self.db.transaction() as tx:
            query = (
                select(*JOB_STATE)
                .where(_due(now))
                .order_by(jobs.c.reduce_available_at)
                .limit(limit)
            )
            rows = locked(tx, await tx.conn.execute(tx.locking(query, skip_locked=True)))
            for job_id, job in rows.items():
                attempt_no = job["reduce_attempts"] + 1
                await tx.conn.execute(
                    update(jobs)
                    .where(jobs.c.id == job_id)
                    .values(
                        lease_owner=owner,
                        lease_expires_at=now + self.lease_seconds,
                        reduce_attempts=attempt_no,
                    )
                )
                spec = await self.specs.load(tx.conn, job_id)
                kept = job["result"] or {}  # what the reducer keeps while it aggregates
                started = {"kind": spec.aggregate.kind, "attempt": attempt_no}
                await self.log.append(tx, job_id, [(EventType.AGGREGATE_STARTED, started)], now)
                claims.append(
                    ReductionClaim(
                        job_id,
                        attempt_no,
                        spec,
                        (await self.decisions.lane_results(tx.conn, [job_id]))[job_id],
                        budget_spent(spec.policy, job["total_tokens"], job["cost_usd"]),
                        bool(kept.get("partial")),
                        Tree.of(kept.get("tree")),
                        {int(i): choice for i, choice in kept.get("judged", {}).items()},
                    )
                )
        return claims

    async def next_due(self) -> float | None:
        """When the earliest reducer attempt not leased to anyone becomes due."""
        async with self.db.read() as conn:
            due = (await conn.execute(NEXT_REDUCER_AT)).scalar_one_or_none()
        return None if due is None else float(due)

    async def step(
        self,
        claim: ReductionClaim,
        owner: str,
        kept: dict[str, Any],
        *,
        usage: Usage,
        done: dict[str, Any] | None = None,
    ) -> bool:
        """A step of a reducer of many calls, ``kept`` with the job (a later attempt
        makes only the calls still to do): a hierarchical reduce's ``tree``, a map's
        item ``judged``. ``done`` names the call that answered, with its ``usage``, for
        its ``aggregate.succeeded`` event (a group's ``level`` and ``group``, an item's
        ``item``). Renews the lease. False when ``owner`` no longer holds the attempt."""
        now = time.time()
        job_id = claim.job_id
        async with self.db.transaction() as tx:
            job = await self._held(tx, claim, owner, usage)
            if job is None:
                return False
            await tx.conn.execute(
                update(jobs)
                .where(jobs.c.id == job_id)
                .values(
                    result={**(job["result"] or {}), **kept},
                    lease_expires_at=now + self.lease_seconds,
                )
            )
            if done is not None:
                answered = {
                    "kind": done.pop("kind", claim.spec.aggregate.kind),
                    "attempt": claim.attempt_no,
                    "usage": usage.model_dump(),
                    **done,
                }
                event = [(EventType.AGGREGATE_SUCCEEDED, answered)]
                await self.log.append(tx, job_id, event, now)
            return True

    @staticmethod
    async def _held(tx: Tx, claim: ReductionClaim, owner: str, usage: Usage) -> Any:
        """The job's row, locked, while ``owner`` still holds the claim's attempt (else
        None). The call's ``usage`` counts on the job either way: the provider sent that
        answer."""
        job = (await lock_jobs(tx, [claim.job_id])).get(claim.job_id)
        if job is not None and usage:
            await add_usage(tx, claim.job_id, usage)
        held = (
            job is not None
            and job["status"] == JobStatus.AGGREGATING
            and job["lease_owner"] == owner
            and job["reduce_attempts"] == claim.attempt_no
        )
        return job if held else None

    async def record(
        self,
        claim: ReductionClaim,
        owner: str,
        *,
        usage: Usage,
        result: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
        retry_in: float | None = None,
    ) -> bool:
        """One reducer (or judge) attempt: the job's ``result`` (it succeeds), a retry
        in ``retry_in`` seconds (``error`` then says why), or ``error`` (the job fails).
        False when ``owner`` no longer holds that attempt (its lease expired and another
        process took it, or the job was cancelled); its ``usage`` counts on the job
        either way."""
        now = time.time()
        job_id = claim.job_id
        async with self.db.transaction() as tx:
            if await self._held(tx, claim, owner, usage) is None:
                return False
            attempt = {
                "kind": claim.spec.aggregate.kind,
                "attempt": claim.attempt_no,
                "usage": usage.model_dump(),
            }
            items: list[Item] = []
            if retry_in is not None:
                why = f"{error['type']}: {error['message']}" if error else ""
                retrying = {**attempt, "error": scrub(why), "retry_in_s": round(retry_in, 3)}
                items.append((EventType.AGGREGATE_RETRYING, retrying))
                await tx.conn.execute(
                    update(jobs)
                    .where(jobs.c.id == job_id)
                    .values(
                        lease_owner=None,
                        lease_expires_at=None,
                        reduce_available_at=now + retry_in,
                    )
                )
            elif error is not None:
                items.append((EventType.AGGREGATE_FAILED, {**attempt, "error": scrub(error)}))
                await self.decisions.finish(
                    tx, job_id, JobStatus.FAILED, items, now, error=scrub(error)
                )
            else:
                items.append((EventType.AGGREGATE_SUCCEEDED, attempt))
                await self.decisions.finish(
                    tx, job_id, JobStatus.SUCCEEDED, items, now, result=scrub(result)
                )
            await self.log.append(tx, job_id, items, now)
            return True
