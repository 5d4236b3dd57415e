"""The lanes table as the queue: claiming under caps and leases, heartbeats, and
lanes given back by a stopping process. (Leases that expired are outcomes: a lost
lease is a failed attempt, :meth:`service.store.outcomes.Outcomes.expire_leases`.)"""

from __future__ import annotations

import time
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from sqlalchemy import and_, select, tuple_, update
from sqlalchemy.engine import RowMapping

from ..policy import (
    COUNTING_RULES,
    Runnable,
    Tally,
    fair_share,
    item_vote_rule,
    running_may_stop,
    vote_rule,
)
from ..spec import HttpTask, JobSpec, LlmTask, StopRule, lane_task
from ..states import DECIDING_JOB, ErrorType, EventType, JobStatus, LaneStatus
from .db import Database, Tx
from .decisions import count_votes, item_tallies
from .eventlog import EventLog, Item
from .jobrows import SpecCache, lock_jobs
from .providers import Admission, ProviderGate
from .statements import (
    CLAIM_LANE,
    CLAIM_LANES_RETURNING,
    CLAIMABLE,
    NEXT_QUEUED_AT,
    READY_FIRST,
    READY_LANES,
    READY_LANES_OF_JOB,
    RESERVE_TOKENS,
    RUNNABLE,
    RUNNING_COUNTS,
    START_JOB,
)
from .tables import jobs, lanes
from .values import Claim, Claimed

# A claim reads at most this many ready lanes (and one more) to learn that they all
# fit: then no share is worked out. Beyond it, the share's reads find them: a big map's
# every claim read 1,001 of its thousands of ready lanes only to learn that they did not
# (5 % of the service's CPU on SQLite, 2026-12-05).
FEW_READY = 100

# No lane of any job has ended and waits to be recorded (see LaneQueue.claim).
NONE_UNRECORDED: Mapping[str, int] = MappingProxyType({})


def startable(
    job: Mapping[str, Any], lane_rows: list[dict[str, Any]], now: float
) -> list[dict[str, Any]]:
    """The lanes of a job about to be stored that could start with it: those ready now,
    as many as its cap allows."""
    ready = [row for row in lane_rows if row["available_at"] <= now]
    return ready[: job["max_concurrency"] or len(ready)]


class LaneQueue:
    def __init__(
        self,
        db: Database,
        log: EventLog,
        specs: SpecCache,
        gate: ProviderGate,
        *,
        lease_seconds: float,
        weights: Mapping[str, float] | None = None,
    ) -> None:
        self.db = db
        self.log = log
        self.specs = specs
        self.gate = gate
        self.lease_seconds = lease_seconds
        self.weights = weights or {}

    async def claim(
        self, owner: str, limit: int, unrecorded: Mapping[str, int] = NONE_UNRECORDED
    ) -> Claimed:
        """Take up to ``limit`` queued lanes whose time has come, shared fairly between
        tenants and jobs (:func:`service.policy.fair_share`) when there are more than
        that, within each job's cap and each provider's limits for the cluster
        (:mod:`service.store.providers`).

        A job's cap counts the calls in flight: ``unrecorded`` says, per job, how many
        of its lanes ``owner`` runs whose call has ended and whose outcome waits to be
        recorded (still ``running`` in the table, holding no slot). It is read after
        the job's running lanes are counted, so a lane recorded meanwhile is counted
        once at most (as running).

        On PostgreSQL the jobs it takes from are locked ``FOR UPDATE SKIP LOCKED``: two
        processes never claim from one job at once, and never wait on each other.
        """
        async with self.db.transaction() as tx:
            return await self.claim_in(tx, owner, limit, time.time(), unrecorded)

    async def claim_in(
        self,
        tx: Tx,
        owner: str,
        limit: int,
        now: float,
        unrecorded: Mapping[str, int] = NONE_UNRECORDED,
    ) -> Claimed:
        """:meth:`claim` in a transaction already open (one that recorded outcomes: the
        slots they freed are filled in it, :meth:`Outcomes.record`)."""
        few = min(limit, FEW_READY)
        first = (await tx.conn.execute(READY_FIRST, {"now": now, "limit": few + 1})).all()
        if not first:
            return Claimed([], held_back=False)
        if len(first) <= few:
            # Room for every lane ready to start: no share to work out, only caps.
            candidates: dict[str, list[tuple[int, str]]] = {}
            for job_id, idx, provider in first:
                candidates.setdefault(job_id, []).append((idx, provider))
            held_back, contended, job_rows = await self._lock(tx, candidates)
            held_back = await self._within_caps(tx, candidates, job_rows, unrecorded) or held_back
        else:
            held_back, contended, candidates, job_rows = await self._fair_share(
                tx, limit, now, unrecorded
            )
        specs = {job_id: await self.specs.load(tx.conn, job_id) for job_id in candidates}
        held_back = await _wait_for_running(tx, candidates, specs) or held_back
        called = {provider for lanes_ in candidates.values() for _idx, provider in lanes_}
        admission = await self.gate.open(tx, called, now)
        taking: dict[str, tuple[JobSpec, list[tuple[int, int, LlmTask | HttpTask]]]] = {}
        for job_id, ready_lanes in candidates.items():
            spec = specs[job_id]
            admitted = _admit(admission, spec, ready_lanes)
            held_back = held_back or len(admitted) < len(ready_lanes)
            if admitted:
                taking[job_id] = (spec, admitted)
        claims = await self._take(tx, job_rows, taking, owner, now)
        await self.gate.close(tx, admission)
        return Claimed(claims, held_back, admission.next_check, contended)

    async def start_new(
        self,
        tx: Tx,
        job: dict[str, Any],
        ready: list[dict[str, Any]],
        spec: JobSpec,
        owner: str,
        room: int,
        now: float,
    ) -> list[Claim]:
        """The lanes of a job about to be stored that ``owner`` starts with it: as many
        as ``room`` and its providers admit, of ``ready`` (its rows that could start:
        :func:`startable`), unless another job's lanes wait to start (then a claim
        shares them out, as ever). Their rows (and the job's) are made running here,
        before they are written; what stays queued, the claim loop takes. A big job
        too: its first thousand lanes cost its ``202`` 30 ms (SQLite) where a claim
        after it took 50 to 390 ms before they could start (a 10,000-item map,
        2026-12-04)."""
        if (await tx.conn.execute(READY_FIRST, {"now": now, "limit": 1})).first() is not None:
            return []
        rows = {row["idx"]: row for row in ready[:room]}
        admission = await self.gate.open(tx, {row["provider"] for row in rows.values()}, now)
        claims: list[Claim] = []
        expires = now + self.lease_seconds
        for idx, reserved, task in _admit(
            admission, spec, [(idx, row["provider"]) for idx, row in rows.items()]
        ):
            row = rows[idx]
            row.update(
                status=LaneStatus.RUNNING,
                attempts=1,
                started_at=now,
                lease_owner=owner,
                lease_expires_at=expires,
                reserved_tokens=reserved,
            )
            claims.append(Claim(job["id"], idx, row["name"], 1, spec, task, job["deadline_at"]))
        await self.gate.close(tx, admission)
        if claims:
            job.update(status=JobStatus.RUNNING, started_at=now)
        return claims

    async def _lock(
        self, tx: Tx, candidates: dict[str, list[tuple[int, str]]]
    ) -> tuple[bool, bool, dict[str, RowMapping]]:
        """Lock the jobs to claim from (skipping those another process holds) and drop
        those that run no lanes any more; whether some were left out, and whether some
        of those because another transaction held them."""
        rows = await lock_jobs(tx, candidates, skip_locked=True)
        job_rows = {job_id: row for job_id, row in rows.items() if row["status"] in DECIDING_JOB}
        left_out = [job_id for job_id in candidates if job_id not in job_rows]
        contended = any(job_id not in rows for job_id in left_out)
        for job_id in left_out:
            del candidates[job_id]
        return bool(left_out), contended, job_rows

    async def _within_caps(
        self,
        tx: Tx,
        candidates: dict[str, list[tuple[int, str]]],
        job_rows: Mapping[str, RowMapping],
        unrecorded: Mapping[str, int],
    ) -> bool:
        """Trim each capped job's lanes to its room (``max_concurrency`` less its calls
        in flight); True when that kept some back."""
        capped = [job_id for job_id in candidates if job_rows[job_id]["max_concurrency"]]
        if not capped:
            return False
        counts = await tx.conn.execute(RUNNING_COUNTS, {"ids": capped})
        running = {str(job_id): int(count) for job_id, count in counts.all()}
        trimmed = False
        for job_id in capped:
            in_flight = _in_flight(running.get(job_id, 0), unrecorded, job_id)
            room = max(0, job_rows[job_id]["max_concurrency"] - in_flight)
            if len(candidates[job_id]) > room:
                candidates[job_id] = candidates[job_id][:room]
                trimmed = True
        return trimmed

    async def _fair_share(
        self, tx: Tx, limit: int, now: float, unrecorded: Mapping[str, int]
    ) -> tuple[bool, bool, dict[str, list[tuple[int, str]]], dict[str, RowMapping]]:
        """More lanes are ready than the claim may take: which ones, by
        :func:`service.policy.fair_share` (the jobs' caps included)."""
        rows = (await tx.conn.execute(RUNNABLE, {"now": now, "limit": limit})).all()
        runnable = [
            Runnable(job_id, tenant, at, ready, _in_flight(running, unrecorded, job_id), cap)
            for job_id, tenant, at, cap, ready, running in rows
            if ready or running
        ]
        wanted = dict(fair_share(runnable, limit, self.weights))
        candidates: dict[str, list[tuple[int, str]]] = {job_id: [] for job_id in wanted}
        _left_out, contended, job_rows = await self._lock(tx, candidates)
        if candidates:
            k = max(wanted.values())
            if len(candidates) == 1:
                (job,) = candidates
                ready = await tx.conn.execute(READY_LANES_OF_JOB, {"job": job, "now": now, "k": k})
            else:
                params = {"jobs": list(candidates), "now": now, "k": k}
                ready = await tx.conn.execute(READY_LANES, params)
            for job_id, idx, provider in ready.all():
                if len(candidates[job_id]) < wanted[job_id]:
                    candidates[job_id].append((idx, provider))
        return True, contended, candidates, job_rows

    async def _take(
        self,
        tx: Tx,
        job_rows: Mapping[str, RowMapping],
        taking: Mapping[str, tuple[JobSpec, list[tuple[int, int, LlmTask | HttpTask]]]],
        owner: str,
        now: float,
    ) -> list[Claim]:
        """Lease the admitted lanes (index, tokens reserved, task) of the locked jobs
        that are still queued, every job at once; their jobs' ``job.running`` (the first
        time) and ``lane.started`` events."""
        if not taking:
            return []
        wanted = {
            (job_id, idx) for job_id, (_spec, admitted) in taking.items() for idx, *_ in admitted
        }
        claimed = await self._lease(tx, wanted, owner, now)
        if not claimed:
            return []
        reserved = [
            {"j": job_id, "i": idx, "r": tokens}
            for job_id in claimed
            for idx, tokens, _task in taking[job_id][1]
            if tokens
        ]
        if reserved:
            await tx.conn.execute(RESERVE_TOKENS, reserved)
        starting = [job_id for job_id in claimed if job_rows[job_id]["status"] == JobStatus.QUEUED]
        if starting:
            await tx.conn.execute(START_JOB, [{"j": job_id, "now": now} for job_id in starting])
        claims = []
        for job_id, lanes_ in claimed.items():
            job, (spec, admitted) = job_rows[job_id], taking[job_id]
            tasks = {idx: task for idx, _reserved, task in admitted}
            items: list[Item] = [(EventType.JOB_RUNNING, {})] if job_id in starting else []
            items.extend(
                (EventType.LANE_STARTED, {"lane": idx, "name": name, "attempt": attempt_no})
                for idx, name, attempt_no, _available_at in lanes_
            )
            await self.log.append(tx, job_id, items, now)
            claims += [
                Claim(
                    job_id,
                    idx,
                    name,
                    attempt_no,
                    spec,
                    tasks[idx],
                    job["deadline_at"],
                    now - available_at,
                )
                for idx, name, attempt_no, available_at in lanes_
            ]
        return claims

    async def _lease(
        self, tx: Tx, wanted: set[tuple[str, int]], owner: str, now: float
    ) -> dict[str, list[tuple[int, str, int, float]]]:
        """Lease the lanes ``wanted`` (job, index) that are still queued to ``owner``:
        by job, in lane order, each one's index, name, attempt and when it was ready.
        PostgreSQL does it in one statement; SQLite, in process, in two."""
        lease = {"now": now, "owner": owner, "expires": now + self.lease_seconds}
        claimed: dict[str, list[tuple[int, str, int, float]]] = {}
        if not tx.is_sqlite:
            pairs = sorted(wanted)
            params = {"job_ids": [j for j, _ in pairs], "idxs": [i for _, i in pairs], **lease}
            rows = await tx.conn.execute(CLAIM_LANES_RETURNING, params)
            for job_id, idx, name, attempt_no, available_at in sorted(rows):
                claimed.setdefault(job_id, []).append((idx, name, attempt_no, available_at))
            return claimed
        params = {"jobs": sorted({j for j, _ in wanted}), "idxs": sorted({i for _, i in wanted})}
        for job_id, idx, name, attempts, available_at in sorted(
            await tx.conn.execute(CLAIMABLE, params)
        ):
            if (job_id, idx) in wanted:
                claimed.setdefault(job_id, []).append((idx, name, attempts + 1, available_at))
        if claimed:
            await tx.conn.execute(
                CLAIM_LANE,
                [
                    {"j": job_id, "i": lane[0], **lease}
                    for job_id, lanes_ in claimed.items()
                    for lane in lanes_
                ],
            )
        return claimed

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
        async with self.db.read() as conn:
            due = (await conn.execute(NEXT_QUEUED_AT)).scalar_one_or_none()
        return None if due is None else float(due)


async def _wait_for_running(
    tx: Tx, candidates: dict[str, list[tuple[int, str]]], specs: Mapping[str, JobSpec]
) -> bool:
    """Hold back the lanes of votes that their running lanes could stop by themselves
    (:func:`service.policy.running_may_stop`): a vote's, or a per-item map's item's.
    They start when those have answered. An item's votes become ready one by one, for
    economy (``VOTE_STAGGER_S``): the lanes a claim takes of an item count as running
    for the next, so that it takes no more than could settle it (a vote of its own takes
    up to its cap while none runs: its latency first). True when some were held back."""
    kept: dict[str, list[tuple[int, str]]] = {}
    rules = {job_id: vote_rule(spec) for job_id, spec in specs.items()}
    stopping = {
        job_id: rule
        for job_id, rule in rules.items()
        if rule is not None and rule.rule in COUNTING_RULES
    }
    if stopping:
        tallies = await count_votes(tx.conn, list(stopping))
        for job_id, rule in stopping.items():
            if running_may_stop(rule, tallies[job_id]):
                kept[job_id] = []
    for job_id, spec in specs.items():
        per_item = item_vote_rule(spec)
        if per_item is None or per_item[0].rule not in COUNTING_RULES:
            continue
        (rule, n), ready = per_item, candidates[job_id]
        items = await item_tallies(tx.conn, job_id, spec, {idx for idx, _provider in ready})
        by_item: dict[int, list[tuple[int, str]]] = {}
        for lane in ready:
            by_item.setdefault(lane[0] // n, []).append(lane)
        needed = {
            lane for item, lanes_ in by_item.items() for lane in _needed(rule, items[item], lanes_)
        }
        kept[job_id] = [lane for lane in ready if lane in needed]
    held = False
    for job_id, lanes_ in kept.items():
        if len(lanes_) < len(candidates[job_id]):
            held = True
            if lanes_:
                candidates[job_id] = lanes_
            else:
                del candidates[job_id]
    return held


def _in_flight(running: int, unrecorded: Mapping[str, int], job_id: str) -> int:
    """A job's calls in flight: its lanes running, less those whose call has ended."""
    return max(0, running - unrecorded.get(job_id, 0))


def _needed(rule: StopRule, tally: Tally, ready: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """The first of an item's ``ready`` lanes (in the claim's order) that it may need:
    those before the one that its lanes running and those taken before it could make
    unneeded."""
    taken = 0
    while taken < len(ready) and not running_may_stop(rule, tally, taken):
        taken += 1
    return ready[:taken]


def _admit(
    admission: Admission, spec: JobSpec, ready: list[tuple[int, str]]
) -> list[tuple[int, int, LlmTask | HttpTask]]:
    """Of a job's lanes ready to start (index, provider), those their providers admit
    now: (index, tokens reserved, task). The others wait for their provider, queued."""
    admitted = []
    for idx, provider in ready:
        task = lane_task(spec, idx)[1]
        reserved = admission.admit(provider, task)
        if reserved is not None:
            admitted.append((idx, reserved, task))
    return admitted
