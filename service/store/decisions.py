"""Recording outcomes and deciding jobs."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from .. import aggregate as agg
from ..db import Tx
from ..jsonsafe import scrub
from ..models import jobs, lanes
from ..policy import OPEN, Decision, Stop, Tally, decide
from ..spec import (
    CollectAggregate,
    MajorityAggregate,
    ReduceAggregate,
    ResultView,
    ScoreAggregate,
    SectioningSpec,
    VotingSpec,
)
from .rows import TERMINAL_JOB, Outcome, Recorded, answer_for, gate_blocks, gate_patterns
from .statements import OUTCOME_UPDATE
from .webhooks import WebhookStore


class DecisionStore(WebhookStore):
    """Recording attempt outcomes and deciding each job: early stop, failure policies,
    budget, deadline, the aggregate and the reducer's result, written exactly once."""

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
            # What a provider or an http task sent, made storable (see jsonsafe).
            outcome = replace(
                outcome,
                output=scrub(outcome.output),
                error_message=outcome.error_message and scrub(outcome.error_message),
            )
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
        await tx.conn.execute(OUTCOME_UPDATE, rows)
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
        blocked_by = next((r.name for r in results if r.index in gates and gate_blocks(r)), None)
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
            output = scrub(output)
            if error is not None:
                error = scrub(error)
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
