"""Recording how attempts ended, in batches, and deciding each job they touch; passed
deadlines are decided here too."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import select

from ..aggregate import answer_key, lane_answer
from ..attempts import Attempt
from ..jsonsafe import scrub
from ..policy import Retrying, next_step
from ..spec import JobSpec
from ..states import DECIDING_JOB, LANE_ENDED, ErrorType, EventType, LaneStatus
from ..views import NO_USAGE, Usage
from .db import Database, Tx
from .decisions import Decisions
from .eventlog import Item
from .jobrows import SpecCache, lock_jobs
from .providers import ProviderGate
from .queue import NONE_UNRECORDED, LaneQueue
from .statements import (
    ADD_JOB_USAGE,
    ADD_JOBS_USAGE,
    DEADLINES_PASSED,
    LANES_RECORDED,
    LATE_USAGE,
    LEASES_EXPIRED,
    OUTCOME_UPDATE,
    OUTCOMES_AND_USAGE_UPDATE,
    OUTCOMES_UPDATE,
    columns,
    executing,
)
from .tables import lanes
from .values import Outcome, Recorded


class Outcomes:
    def __init__(
        self,
        db: Database,
        specs: SpecCache,
        decisions: Decisions,
        gate: ProviderGate,
        queue: LaneQueue,
    ) -> None:
        self.db = db
        self.specs = specs
        self.decisions = decisions
        self.gate = gate
        self.queue = queue

    async def record(
        self,
        owner: str,
        outcomes: Sequence[Outcome],
        *,
        claim: int = 0,
        unrecorded: Mapping[str, int] = NONE_UNRECORDED,
    ) -> Recorded:
        """Store a batch of attempt outcomes in one transaction (group commit), then
        decide each job; with ``claim``, then claim up to that many lanes for ``owner``
        in the same transaction (:meth:`LaneQueue.claim_in`; ``Recorded.claimed``): the
        slots the outcomes freed are filled without a transaction of their own, nor a
        claim that finds their jobs locked by this one; ``unrecorded`` as
        :meth:`LaneQueue.claim`'s (the outcomes that came while this batch was written).

        An outcome whose lane is no longer running under this owner and attempt (a
        decision stopped it: early stop, a gate, fail fast, a cancel, the deadline; or
        the lease expired and another process took it) is rejected: the lane keeps its
        status. But the provider answered and billed it: its tokens count, on the lane
        and the job, in the budget and in the metrics (``Recorded.rejected`` counts it).
        """
        now = time.time()
        recorded = Recorded()
        by_job: dict[str, list[Outcome]] = {}
        for outcome in outcomes:
            by_job.setdefault(outcome.job_id, []).append(outcome)
        # Per provider: tokens reserved and not used (settled), and 429s' pauses.
        unused: dict[str, int] = {}
        pauses: dict[str, float] = {}
        # Written for every job at once: the lanes' rows, the usage added to each job.
        lane_rows: list[dict[str, Any]] = []
        usage_rows: list[dict[str, Any]] = []
        # The jobs to decide: their rows (with what this batch added), specs and events.
        deciding: dict[str, tuple[dict[str, Any], JobSpec, list[Item]]] = {}
        async with self.db.transaction() as tx:
            job_rows = await lock_jobs(tx, by_job)
            current = await self._lanes(tx, job_rows, outcomes)
            for job_id in sorted(by_job):
                job = job_rows.get(job_id)
                if job is None:
                    recorded.rejected += len(by_job[job_id])
                    continue
                open_job = job["status"] in DECIDING_JOB
                valid, late = [], []
                for outcome in by_job[job_id]:
                    state = current.get((job_id, outcome.idx))
                    if state is None:
                        recorded.rejected += 1
                        continue
                    running = (LaneStatus.RUNNING, outcome.attempt_no, owner)
                    if open_job and tuple(state[:3]) == running:
                        valid.append((outcome, str(state[3])))
                    else:
                        recorded.rejected += 1
                        late.append(outcome)
                    provider, reserved = str(state[4]), int(state[5])
                    if reserved and state[1] == outcome.attempt_no:  # its own reservation
                        left = reserved - outcome.usage.total_tokens
                        unused[provider] = unused.get(provider, 0) + left
                    if outcome.retry_after and outcome.error_type is ErrorType.RATE_LIMITED:
                        until = now + outcome.retry_after
                        pauses[provider] = max(pauses.get(provider, 0.0), until)
                added = await self._count_late(tx, job_id, late)
                if valid or (open_job and added):
                    spec = await self.specs.load(tx.conn, job_id)
                    items: list[Item] = []
                    if valid:
                        rows, items, usage = self._rows(job_id, spec, valid, now)
                        lane_rows += rows
                        added = added + usage
                    # Tokens of late answers may have spent the budget: a decision too.
                    deciding[job_id] = (_with(job, added), spec, items)
                if added:
                    usage_rows.append({"j": job_id, **usage_params(added)})
            await update_lanes(tx, lane_rows, usage_rows)
            if deciding:
                recorded.reduce_jobs += await self.decisions.decide_all(tx, deciding, now)
            await self.gate.settle(tx, unused, pauses, now)
            if claim > 0:
                recorded.claimed = await self.queue.claim_in(tx, owner, claim, now, unrecorded)
        return recorded

    async def _lanes(
        self, tx: Tx, job_rows: Mapping[str, Any], outcomes: Sequence[Outcome]
    ) -> dict[tuple[str, int], tuple[Any, ...]]:
        """The outcomes' lanes (of the jobs found) as they are now, by (job, index):
        status, attempts, lease owner, name, provider, reserved tokens."""
        if not job_rows:
            return {}
        params = {
            "jobs": sorted(job_rows),
            "idxs": sorted({outcome.idx for outcome in outcomes}),
        }
        return {(row[0], row[1]): row[2:] for row in await tx.conn.execute(LANES_RECORDED, params)}

    async def _count_late(self, tx: Tx, job_id: str, late: list[Outcome]) -> Usage:
        """The tokens of answers that came after their lane was stopped, on the lanes;
        what they add to the job (written by the caller)."""
        used = [outcome for outcome in late if outcome.usage]
        if not used:
            return NO_USAGE
        await tx.conn.execute(
            LATE_USAGE, [{"j": job_id, "i": o.idx, **usage_params(o.usage)} for o in used]
        )
        return Usage.sum(outcome.usage for outcome in used)

    async def _write(
        self,
        tx: Tx,
        job_id: str,
        spec: JobSpec,
        valid: list[tuple[Outcome, str]],
        now: float,
    ) -> list[Item]:
        """Write one job's outcomes and the usage they add; their events."""
        rows, items, usage = self._rows(job_id, spec, valid, now)
        await update_lanes(tx, rows)
        if usage:
            await add_usage(tx, job_id, usage)
        return items

    def _rows(
        self,
        job_id: str,
        spec: JobSpec,
        valid: list[tuple[Outcome, str]],
        now: float,
    ) -> tuple[list[dict[str, Any]], list[Item], Usage]:
        """The lanes' rows for the outcomes, their events (appended with the decision's,
        in one go) and the usage they add to the job's."""
        rows = []
        items: list[Item] = []
        for outcome, name in valid:
            usage = outcome.usage
            retry = outcome.status is LaneStatus.QUEUED
            # What a provider or an http task sent, made storable (see jsonsafe).
            output = scrub(outcome.output)
            reply = scrub(outcome.reply) or None
            message = outcome.error_message and scrub(outcome.error_message)
            row: dict[str, Any] = {
                "j": job_id,
                "i": outcome.idx,
                "status": outcome.status,
                "output": output,
                "reply": reply,
                "answer_key": None,
                "error_type": outcome.error_type,
                # Upstream text may hold NUL, which PostgreSQL text refuses.
                "error_message": message and message.replace("\x00", ""),
                **usage_params(usage),
                "finished_at": None if retry else outcome.finished_at,
                "recorded_at": now,
                "available_at": now + outcome.retry_in if retry else now,
                "lease_owner": None,
            }
            lane = {"lane": outcome.idx, "name": name, "attempt": outcome.attempt_no}
            duration = round(outcome.finished_at - outcome.started_at, 4)
            row["weight"] = row["note"] = None
            if outcome.status is LaneStatus.SUCCEEDED:
                read = lane_answer(spec, outcome.idx, output, reply)
                row.update(answer_key=answer_key(read.answer), weight=read.weight, note=read.note)
                fields = {
                    **lane,
                    "output": output,
                    **(reply or {}),
                    "usage": usage.model_dump(),
                    "duration_s": duration,
                }
                if read.answer is not None:
                    fields["answer"] = read.answer
                if read.weight is not None:
                    fields["weight"] = read.weight
                if read.note is not None:
                    fields["note"] = read.note
                items.append((EventType.LANE_SUCCEEDED, fields))
            elif retry:
                error = f"{outcome.error_type}: {message}"
                retry_in = round(outcome.retry_in, 3)
                items.append(
                    (EventType.LANE_RETRYING, {**lane, "error": error, "retry_in_s": retry_in})
                )
            else:
                error_view = {"type": outcome.error_type, "message": message}
                items.append(
                    (
                        LANE_ENDED[outcome.status],
                        {
                            **lane,
                            "error": error_view,
                            "usage": usage.model_dump(),
                            "duration_s": duration,
                        },
                    )
                )
            rows.append(row)
        return rows, items, Usage.sum(outcome.usage for outcome, _ in valid)

    async def expire_leases(self, retrying: Retrying) -> Recorded:
        """Lanes whose worker stopped renewing its lease (it crashed, hung or was killed).

        A lost lease is a failed attempt (``lease_lost``), decided like any other
        (:func:`service.policy.next_step`): the lane is queued again after a backoff
        while attempts are left, and fails once they are spent, so a lane that kills
        every worker that runs it ends after ``max_attempts``; the job is decided on it.
        ``Recorded.requeued`` counts the lanes queued again.
        """
        now = time.time()
        expired = (lanes.c.status == LaneStatus.RUNNING) & (lanes.c.lease_expires_at < now)
        recorded = Recorded()
        # Their jobs found by a read: the sweep runs four times a second and almost
        # always finds none (a write transaction each time took SQLite's write lock,
        # three round trips on PostgreSQL, from the recordings' turns). Each job's lanes
        # are read again, locked, below; a lease that expires meanwhile, next time.
        async with self.db.read() as conn:
            job_ids = (await conn.execute(LEASES_EXPIRED, {"now": now})).scalars().all()
        if not job_ids:
            return recorded
        async with self.db.transaction() as tx:
            job_rows = await lock_jobs(tx, job_ids)
            for job_id in sorted(job_rows):
                job = job_rows[job_id]
                if job["status"] not in DECIDING_JOB:
                    continue
                spec = await self.specs.load(tx.conn, job_id)
                lost = []
                for idx, name, attempt_no in (
                    await tx.conn.execute(
                        select(lanes.c.idx, lanes.c.name, lanes.c.attempts)
                        .where(expired, lanes.c.job_id == job_id)
                        .order_by(lanes.c.idx)
                    )
                ).all():
                    message = f"the worker running attempt {attempt_no} went away"
                    attempt = Attempt(
                        error_type=ErrorType.LEASE_LOST, error_message=message, transient=True
                    )
                    step = next_step(attempt, attempt_no, spec.policy.max_attempts, retrying)
                    recorded.requeued += step.retry
                    outcome = Outcome(
                        job_id,
                        idx,
                        attempt_no,
                        step.status,
                        error_type=ErrorType.LEASE_LOST,
                        error_message=message,
                        retry_in=step.retry_in,
                        started_at=now,
                        finished_at=now,
                    )
                    lost.append((outcome, name))
                if not lost:
                    continue
                items = await self._write(tx, job_id, spec, lost, now)
                if await self.decisions.decide(tx, job, spec, now, items=items):
                    recorded.reduce_jobs.append(job_id)
        return recorded

    async def expire_deadlines(self) -> list[str]:
        """Decide every job whose deadline passed; returns jobs that now wait for their
        reducer."""
        now = time.time()
        async with self.db.read() as conn:
            due = list((await conn.execute(DEADLINES_PASSED, {"now": now})).scalars().all())
        reduce_jobs = []
        for job_id in due:
            async with self.db.transaction() as tx:
                job = (await lock_jobs(tx, [job_id])).get(job_id)
                if job is None or job["status"] not in DECIDING_JOB:
                    continue
                spec = await self.specs.load(tx.conn, job_id)
                if await self.decisions.decide(tx, job, spec, now, items=[], deadline_passed=True):
                    reduce_jobs.append(job_id)
        return reduce_jobs


def usage_params(usage: Usage) -> dict[str, Any]:
    """A usage as the bound values the usage statements add (p, c, t, r, k, cost)."""
    return {
        "p": usage.prompt_tokens,
        "c": usage.completion_tokens,
        "t": usage.total_tokens,
        "r": usage.reasoning_tokens,
        "k": usage.cached_tokens,
        "cost": usage.cost_usd,
    }


async def update_lanes(
    tx: Tx, rows: list[dict[str, Any]], usage: list[dict[str, Any]] | None = None
) -> None:
    """Write the lanes' outcomes (rows of OUTCOME_UPDATE's parameters) and what they add
    to their jobs' usage (rows of ADD_JOB_USAGE's): on PostgreSQL in one statement, the
    rows' values as arrays (OUTCOMES_AND_USAGE_UPDATE, or one of its halves); on SQLite,
    a row at a time. (An update from a join writes a lane once: were one lane in two
    rows, each row is run in turn, as on SQLite.)"""
    arrays = tx.binds_arrays and len({(row["j"], row["i"]) for row in rows}) == len(rows)
    if rows and usage and arrays:
        params = {f"l{name}": v for name, v in columns(rows).items()}
        params |= {f"u{name}": v for name, v in columns(usage).items()}
        await tx.conn.execute(OUTCOMES_AND_USAGE_UPDATE, params)
        return
    if rows:
        await tx.conn.execute(*executing(OUTCOME_UPDATE, OUTCOMES_UPDATE, rows, arrays=arrays))
    if usage:
        await tx.conn.execute(
            *executing(ADD_JOB_USAGE, ADD_JOBS_USAGE, usage, arrays=tx.binds_arrays)
        )


async def add_usage(tx: Tx, job_id: str, usage: Usage) -> None:
    """Add to the job's usage (its lanes', retries', late answers' and reducer's)."""
    await tx.conn.execute(ADD_JOB_USAGE, {"j": job_id, **usage_params(usage)})


def _with(job: Mapping[Any, Any], added: Usage) -> dict[str, Any]:
    """The job's row as the deciding transaction sees it: with what it just added."""
    cost = job["cost_usd"]
    if added.cost_usd is not None:
        cost = (cost or 0.0) + added.cost_usd
    return {**job, "total_tokens": job["total_tokens"] + added.total_tokens, "cost_usd": cost}
