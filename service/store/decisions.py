"""Deciding a job and carrying the decision out, inside the caller's transaction.

The rules are pure (:func:`service.policy.decide`, :func:`service.aggregate.conclude`);
this part reads what they need (a tally of the job's lanes, their results) and
writes what they say: lanes stopped, the job's result or error written exactly once
(fenced on the job being open), its final event, its webhook queued.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update

from ..aggregate import Conclusion, LaneResult, conclude, gate_blocks, gates
from ..policy import (
    Decision,
    Stop,
    Tally,
    budget_spent,
    decide,
    item_vote_rule,
    undecided_while_open,
    vote_rule,
)
from ..spec import JobSpec, MajorityAggregate
from ..states import (
    DECIDING_JOB,
    ENDED_WITHOUT_RESULT,
    FINAL_EVENT,
    LANE_ENDED,
    OPEN_LANE,
    EventType,
    JobStatus,
    LaneStatus,
)
from .db import Conn, Tx
from .eventlog import EventLog, Item
from .outbox import WebhookOutbox
from .rendering import usage_of
from .statements import (
    FINISH_JOB,
    FINISH_JOBS,
    FIRST_FAILURE,
    ITEM_SEQUENCE,
    ITEM_STATUSES,
    ITEM_VOTES,
    LANE_RESULTS,
    OPEN_AND_UNSUCCESSFUL,
    STATUS_COUNTS,
    STOP_LANES,
    TALLY,
    TALLY_VOTES,
    VOTE_SEQUENCE,
    columns,
)
from .tables import jobs, lanes

# Past any lane of a job: a stop of every lane.
MAX_LANE_INDEX = 2**31 - 1
# A job with more lanes than this, and nothing to decide while one is open
# (policy.undecided_while_open), is probed for an open lane before its lanes are
# counted; a smaller one is counted at once (as cheap as the probe, which its last
# batch would need besides).
PROBE_ABOVE_LANES = 100


@dataclass
class End:
    """A job's end to write (:meth:`Decisions.finish_all`); its final event joins
    ``items``."""

    job_id: str
    status: JobStatus
    items: list[Item]
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None


class Decisions:
    def __init__(self, log: EventLog, outbox: WebhookOutbox) -> None:
        self.log = log
        self.outbox = outbox

    async def decide(
        self,
        tx: Tx,
        job: Mapping[Any, Any],
        spec: JobSpec,
        now: float,
        *,
        items: list[Item],
        deadline_passed: bool = False,
    ) -> bool:
        """Decide what the job does next and do it; ``job`` is its row, locked by this
        transaction (with its current token total). ``items`` are events this
        transaction already made for the job: they are appended first, with the
        decision's. True when the job now waits for its reducer."""
        job_id = job["id"]
        wanted = {job_id: (job, spec, items)}
        return job_id in await self.decide_all(tx, wanted, now, deadline_passed=deadline_passed)

    async def decide_all(
        self,
        tx: Tx,
        wanted: Mapping[str, tuple[Mapping[Any, Any], JobSpec, list[Item]]],
        now: float,
        *,
        deadline_passed: bool = False,
    ) -> list[str]:
        """:meth:`decide` each job (its row, spec and events), reading what every one
        needs at once: their tallies, then the lanes of those that end without stopping
        lanes first. The jobs that now wait for their reducer."""
        undecided = await self._undecided(tx.conn, wanted, now, deadline_passed)
        counted = {
            job_id: (spec, items)
            for job_id, (_job, spec, items) in wanted.items()
            if job_id not in undecided
        }
        tallies = await self.tallies(tx.conn, counted)
        decisions = {
            job_id: (
                Decision()
                if job_id in undecided
                else _decision(job, spec, tallies[job_id], now, deadline_passed)
            )
            for job_id, (job, spec, _items) in wanted.items()
        }
        ending = [
            job_id
            for job_id, decision in decisions.items()
            if decision.outcome not in (None, "fail") and not decision.stops
        ]
        results = await self.lane_results(tx.conn, ending) if ending else {}
        reducing, ends = [], []
        for job_id, (_job, spec, items) in wanted.items():
            decision = decisions[job_id]
            done = await self._carry_out(
                tx, job_id, spec, decision, items, now, results.get(job_id)
            )
            if isinstance(done, End):
                ends.append(done)
            elif done:
                reducing.append(job_id)
        await self.finish_all(tx, ends, now)  # the jobs that end, at once
        for job_id, (_job, _spec, items) in wanted.items():
            await self.log.append(tx, job_id, items, now)
        return reducing

    async def _undecided(
        self,
        conn: Conn,
        wanted: Mapping[str, tuple[Mapping[Any, Any], JobSpec, list[Item]]],
        now: float,
        deadline_passed: bool,
    ) -> set[str]:
        """The big jobs of ``wanted`` with nothing to decide yet: one of their lanes is
        open, all that ended succeeded, and their policy waits for the rest
        (:func:`~service.policy.undecided_while_open`). Found without counting lanes."""
        probed = [
            job_id
            for job_id, (job, spec, _items) in wanted.items()
            if job["lanes_total"] > PROBE_ABOVE_LANES
            and not any(_pressures(job, spec, now, deadline_passed))
            and undecided_while_open(spec, job["lanes_total"])
        ]
        if not probed:
            return set()
        rows = await conn.execute(OPEN_AND_UNSUCCESSFUL, {"jobs": sorted(probed)})
        return {job_id for job_id, is_open, unsuccessful in rows if is_open and not unsuccessful}

    async def _carry_out(
        self,
        tx: Tx,
        job_id: str,
        spec: JobSpec,
        decision: Decision,
        items: list[Item],
        now: float,
        results: list[LaneResult] | None = None,
    ) -> bool | End:
        """Do what ``decision`` says (``results``: the job's lanes, if read already), but
        for its end, which it returns, to be written with the other jobs' (and for its
        events, in ``items``, appended then): True when it waits for its reducer."""
        if decision.vote is not None:
            # Where the vote stands after this batch: the page and the CLI show it live.
            vote = decision.vote.view(spec)
            for kind, fields in items:
                if kind is EventType.LANE_SUCCEEDED:
                    fields["vote"] = vote
        for stop in decision.stops:
            items.extend(await self.stop_lanes(tx, job_id, stop, now))
        if decision.outcome is None:
            return False
        items.append((EventType.JOB_AGGREGATING, {}))
        return await self._conclude(tx, job_id, spec, decision, items, now, results)

    async def stop_lanes(self, tx: Tx, job_id: str, stop: Stop, now: float) -> list[Item]:
        """End the job's lanes in ``stop.statuses``; their events (in lane order)."""
        first, end = stop.lanes or (0, MAX_LANE_INDEX)
        params = {
            "j": job_id,
            "from": first,
            "to": end,
            "statuses": list(stop.statuses),
            "status": stop.status,
            "error_type": stop.error_type,
            "message": stop.message,
            "now": now,
        }
        stopped = (await tx.conn.execute(STOP_LANES, params)).all()
        items: list[Item] = []
        for idx, name, attempts in sorted(stopped):
            fields: dict[str, Any] = {"lane": idx, "name": name, "attempt": attempts}
            if stop.error_type is not None:
                fields["error"] = {"type": stop.error_type, "message": stop.message}
            items.append((LANE_ENDED[stop.status], fields))
        return items

    async def finish(
        self,
        tx: Tx,
        job_id: str,
        status: JobStatus,
        items: list[Item],
        now: float,
        *,
        result: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
    ) -> bool:
        """Write the job's end, exactly once (fenced on its open status): its result or
        error, its webhook in the outbox, and its final event in ``items`` (appended by
        the caller). False when it had ended already."""
        end = End(job_id, status, items, result, error)
        return bool(await self.finish_all(tx, [end], now))

    async def finish_all(self, tx: Tx, ends: list[End], now: float) -> set[str]:
        """:meth:`finish` for several jobs: on PostgreSQL in one statement. The jobs
        that ended here."""
        if not ends:
            return set()
        params = [
            {"j": end.job_id, "status": end.status, "result": end.result, "error": end.error}
            for end in ends
        ]
        rows = {}
        if not tx.binds_arrays or len(ends) == 1:
            for end, one in zip(ends, params, strict=True):
                row = (await tx.conn.execute(FINISH_JOB, one | {"now": now})).mappings().first()
                if row is not None:
                    rows[end.job_id] = row
        else:
            finished = await tx.conn.execute(FINISH_JOBS, columns(params) | {"now": now})
            rows = {row["id"]: row for row in finished.mappings()}
        for end in ends:
            row = rows.get(end.job_id)
            if row is None:
                continue
            await self.outbox.queue(tx, end.job_id, row["spec"], now)
            fields: dict[str, Any] = {}
            if end.status is JobStatus.SUCCEEDED:
                fields["result"] = end.result
            elif end.status is JobStatus.FAILED:
                fields["error"] = end.error
            fields["usage"] = usage_of(row).model_dump()
            end.items.append((FINAL_EVENT[end.status], fields))
        return set(rows)

    async def lane_results(self, conn: Conn, job_ids: list[str]) -> dict[str, list[LaneResult]]:
        """Every lane of the jobs, in lane order, as aggregation reads them, by job."""
        results: dict[str, list[LaneResult]] = {job_id: [] for job_id in job_ids}
        rows = await conn.execute(LANE_RESULTS, {"jobs": sorted(job_ids)})
        for job_id, idx, name, status, output, key, weight, kind, message in rows:
            results[job_id].append(
                LaneResult(
                    idx,
                    name,
                    status,
                    output,
                    json.loads(key) if key is not None else None,
                    weight if weight is not None else 1.0,
                    {"type": kind, "message": message or ""} if kind is not None else None,
                    key,
                )
            )
        return results

    async def _conclude(
        self,
        tx: Tx,
        job_id: str,
        spec: JobSpec,
        decision: Decision,
        items: list[Item],
        now: float,
        results: list[LaneResult] | None = None,
    ) -> bool | End:
        if decision.outcome == "fail":
            return End(job_id, JobStatus.FAILED, items, error=decision.error)
        if results is None:
            results = (await self.lane_results(tx.conn, [job_id]))[job_id]
        stop = decision.vote.view(spec) if decision.vote is not None else None
        conclusion = conclude(spec, results, partial=decision.partial, stop=stop)
        if conclusion.status is JobStatus.AGGREGATING:
            await self._await_reducer(tx, job_id, conclusion, now)
            return True
        return End(job_id, conclusion.status, items, conclusion.result, conclusion.error)

    async def _await_reducer(self, tx: Tx, job_id: str, conclusion: Conclusion, now: float) -> None:
        """The job waits for its reducer, whose first attempt is due now; any runner
        may claim it (:class:`~service.store.reductions.Reductions`)."""
        await tx.conn.execute(
            update(jobs)
            .where(jobs.c.id == job_id, jobs.c.status.in_(DECIDING_JOB))
            .values(
                status=JobStatus.AGGREGATING,
                lease_owner=None,
                lease_expires_at=None,
                reduce_attempts=0,
                reduce_available_at=now,
                result=conclusion.result,
            )
        )

    async def tallies(
        self, conn: Conn, wanted: Mapping[str, tuple[JobSpec, list[Item]]]
    ) -> dict[str, Tally]:
        """What the decision of each job in ``wanted`` (its spec, and the events this
        transaction made for it) reads: its lanes by status, its votes, a blocking gate,
        its first failure; for a per-item map, the votes of the items whose lanes the
        events touched (the others' votes have not changed). One statement counts every
        job's lanes and votes; the rest is read only for the jobs that need it."""
        # Only a majority without gates counts its votes with its statuses; the others
        # count lanes by status alone, on the (status, job) index: a 10,000-item map's
        # lanes each hold an answer of their own, which TALLY would group.
        voting = [
            job_id for job_id, (spec, _items) in wanted.items() if vote_rule(spec) is not None
        ]
        counts = await count_votes(conn, voting) if voting else {}
        counting = sorted(set(wanted).difference(voting))
        if counting:
            statuses: dict[str, dict[str, int]] = {job_id: {} for job_id in counting}
            for job_id, status, count in (
                await conn.execute(STATUS_COUNTS, {"jobs": counting})
            ).all():
                statuses[job_id][status] = count
            for job_id, by_status in statuses.items():
                counts[job_id] = Tally(sum(by_status.values()), by_status)
        return {
            job_id: await self._tally(conn, job_id, spec, items, counts[job_id])
            for job_id, (spec, items) in wanted.items()
        }

    async def _tally(
        self,
        conn: Conn,
        job_id: str,
        spec: JobSpec,
        items: list[Item],
        counts: Tally,
    ) -> Tally:
        """The job's tally from its counts (its lanes by status; a majority without gates'
        votes too, :func:`count_votes`)."""
        gated = gates(spec)
        by_status, votes, counted = counts.by_status, counts.votes, counts.counted
        sequence: list[str] = []
        if isinstance(spec.aggregate, MajorityAggregate):
            if gated:  # a gate's verdict is no vote: counted again without the gates
                rows = await conn.execute(TALLY_VOTES, {"j": job_id, "gates": list(gated)})
                votes, counted = _votes_of(rows)
            if spec.aggregate.stop_rule.rule == "window":
                keys = await conn.execute(VOTE_SEQUENCE, {"j": job_id, "gates": list(gated)})
                sequence = list(keys.scalars().all())
        gate_blocked = None
        if gated:
            gate_rows = (
                await conn.execute(
                    select(lanes.c.name, lanes.c.status, lanes.c.answer_key)
                    .where(lanes.c.job_id == job_id, lanes.c.idx.in_(list(gated)))
                    .order_by(lanes.c.idx)
                )
            ).all()
            for name, status, answer in gate_rows:
                verdict = json.loads(answer) if answer is not None else None
                if status not in OPEN_LANE and gate_blocks(status, verdict):
                    gate_blocked = name
                    break
        first_failure = None
        if any(by_status.get(s) for s in ENDED_WITHOUT_RESULT):
            row = (await conn.execute(FIRST_FAILURE, {"j": job_id})).first()
            if row is not None:
                first_failure = (row[0], row[1] or "error", row[2] or "")
        return Tally(
            sum(by_status.values()),
            by_status,
            votes,
            gate_blocked,
            first_failure,
            sequence,
            counted,
            await self._item_tallies(conn, job_id, spec, items),
        )

    async def _item_tallies(
        self, conn: Conn, job_id: str, spec: JobSpec, items: list[Item]
    ) -> dict[int, Tally]:
        """A per-item map's votes: the tally of each item a lane of ``items`` is a vote
        of (what its stopping rule reads)."""
        touched = {fields["lane"] for _kind, fields in items if "lane" in fields}
        return await item_tallies(conn, job_id, spec, touched)


async def item_tallies(conn: Conn, job_id: str, spec: JobSpec, lanes: set[int]) -> dict[int, Tally]:
    """A per-item map's votes: the tally of each item one of ``lanes`` is a vote of
    (what its stopping rule reads); none for any other job."""
    item_rule = item_vote_rule(spec)
    if item_rule is None or not lanes:
        return {}
    rule, n = item_rule
    wanted = {lane // n for lane in lanes}
    span = {"from": min(wanted) * n, "to": (max(wanted) + 1) * n}
    params = {"j": job_id, "n": n, "gates": [], **span}
    statuses: dict[int, dict[str, int]] = {}
    for item, status, count in (await conn.execute(ITEM_STATUSES, params)).all():
        statuses.setdefault(item, {})[status] = count
    votes: dict[int, list[tuple[str, float, int]]] = {}
    counted: dict[int, int] = {}
    for item, key, weight, count, first in (await conn.execute(ITEM_VOTES, params)).all():
        votes.setdefault(item, []).append((key, float(weight), first))
        counted[item] = counted.get(item, 0) + count
    sequences: dict[int, list[str]] = {}
    if rule.rule == "window":
        for item, key in (await conn.execute(ITEM_SEQUENCE, params)).all():
            sequences.setdefault(item, []).append(key)
    return {
        item: Tally(
            sum(by_status.values()),
            by_status,
            votes.get(item, []),
            sequence=sequences.get(item, []),
            counted=counted.get(item, 0),
        )
        for item, by_status in statuses.items()
        if item in wanted
    }


async def count_votes(conn: Conn, job_ids: list[str]) -> dict[str, Tally]:
    """Each job's lanes by status and its votes (its succeeded lanes' answers), in one
    read (TALLY): a majority's tally before its gates, failures and order of votes."""
    by_status: dict[str, dict[str, int]] = {job_id: {} for job_id in job_ids}
    answers: dict[str, list[Any]] = {job_id: [] for job_id in job_ids}
    for job_id, status, key, weight, count, first in (
        await conn.execute(TALLY, {"jobs": sorted(job_ids)})
    ).all():
        statuses = by_status[job_id]
        statuses[status] = statuses.get(status, 0) + count
        if status == LaneStatus.SUCCEEDED and key is not None:
            answers[job_id].append((key, weight, count, first))
    tallies = {}
    for job_id, statuses in by_status.items():
        votes, counted = _votes_of(answers[job_id])
        tallies[job_id] = Tally(sum(statuses.values()), statuses, votes, counted=counted)
    return tallies


def _votes_of(answers: Iterable[Any]) -> tuple[list[tuple[str, float, int]], int]:
    """Votes (key, weight, first lane) and the lanes that cast them, from rows of
    (key, weight, lanes, first lane)."""
    votes, counted = [], 0
    for key, weight, count, first in answers:
        votes.append((key, float(weight), first))
        counted += count
    return votes, counted


def _decision(
    job: Mapping[Any, Any], spec: JobSpec, tally: Tally, now: float, deadline_passed: bool = False
) -> Decision:
    """The decision on the job (its locked row, with its current token total)."""
    deadline, budget = _pressures(job, spec, now, deadline_passed)
    return decide(spec, tally, deadline_passed=deadline, budget_spent=budget)


def _pressures(
    job: Mapping[Any, Any], spec: JobSpec, now: float, deadline_passed: bool
) -> tuple[bool, bool]:
    """Whether the job's deadline has passed, and whether its budget is spent (its
    locked row, with its current token total)."""
    deadline = deadline_passed or (job["deadline_at"] is not None and job["deadline_at"] <= now)
    return deadline, budget_spent(spec.policy, job["total_tokens"], job["cost_usd"])
