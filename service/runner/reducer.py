"""The reducer: one more LLM call over every lane's output, for jobs aggregated by
``reduce`` or ``judge``. Its attempts are durable like a lane's
(:mod:`service.store.reductions`): claimed when due, leased, retried after a backoff
kept in the database, so a restart in the middle of a backoff resumes it wherever a
runner is. Its steps are on the job's stream (``aggregate.*``)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from functools import partial
from typing import Any

from ..aggregate import (
    Tree,
    candidates,
    conclude_map,
    fan_in,
    item_votes,
    judge_choice,
    judge_messages,
    judged,
    judges_items,
    reduced,
    tagged_messages,
)
from ..attempts import Attempt, Executor
from ..events import Event, EventHub
from ..metrics import Metrics
from ..policy import Retrying, next_step
from ..spec import JudgeAggregate, LlmTask, MapSpec, Message, ReduceAggregate, provider_name
from ..states import ErrorType, EventType, JobStatus, LaneStatus
from ..store import ReductionClaim, Store
from ..views import NO_USAGE
from .deltas import DeltaCoalescer
from .lifecycle import Writes, guarded, logged, sleep_until_woken

# A reducer's calls in flight at once (a hierarchical reduce's groups, a map's item
# judges), unless the job's max_concurrency says otherwise.
MAX_CALLS_AT_ONCE = 16


class Reducer:
    def __init__(
        self,
        store: Store,
        hub: EventHub,
        execute: Executor,
        metrics: Metrics,
        writes: Writes,
        *,
        owner: str,
        poll_interval_s: float,
        default_lane_timeout_s: float,
        retrying: Retrying,
        publish_deltas: Callable[[list[Event]], None],
        deltas_sent: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.store = store
        self.publish_deltas = publish_deltas
        self.deltas_sent = deltas_sent
        self.execute = execute
        self.metrics = metrics
        self.writes = writes
        self.owner = owner
        self.poll_interval_s = poll_interval_s
        self.default_lane_timeout_s = default_lane_timeout_s
        self.retrying = retrying
        self.running: dict[str, asyncio.Task[None]] = {}
        self.claiming = True
        self._wake = asyncio.Event()
        hub.add_listener(self._on_events)

    def wake(self) -> None:
        """A reducer attempt may be due (a job began aggregating, a backoff ended)."""
        self._wake.set()

    def stop_claiming(self) -> None:
        self.claiming = False

    def in_flight(self) -> list[asyncio.Task[None]]:
        return list(self.running.values())

    async def run(self) -> None:
        while True:
            timeout = self.poll_interval_s
            if self.claiming:
                await logged(self._claim(), "claiming reducer attempts")
                due = await self.store.reductions.next_due()
                if due is not None:
                    timeout = min(timeout, max(0.0, due - time.time()) + 0.001)
            await sleep_until_woken(self._wake, timeout)

    async def _claim(self) -> None:
        for claim in await self.writes(self.store.reductions.claim(self.owner)):
            if claim.job_id in self.running:
                continue
            task = asyncio.create_task(self._reduce(claim), name=f"reduce {claim.job_id}")
            self.running[claim.job_id] = task
            task.add_done_callback(partial(self._forget, claim.job_id))

    def _forget(self, job_id: str, _task: object) -> None:
        self.running.pop(job_id, None)

    async def _reduce(self, claim: ReductionClaim) -> None:
        spec = claim.spec
        max_attempts = spec.policy.max_attempts
        record = self.store.reductions.record
        what = "judge" if isinstance(spec.aggregate, JudgeAggregate) else "reducer"
        if judges_items(spec):
            what = "item judge"
        if claim.attempt_no > max_attempts:
            # Every attempt was started and none reported: their processes went away.
            error = _error(ErrorType.LEASE_LOST, f"{what}: every attempt's worker went away")
            await self.writes(record(claim, self.owner, usage=NO_USAGE, error=error))
            return
        if claim.budget_spent:
            error = _error(ErrorType.BUDGET, f"the budget was spent before the {what} ran")
            await self.writes(record(claim, self.owner, usage=NO_USAGE, error=error))
            return
        judged = None
        if judges_items(spec):
            assert isinstance(spec, MapSpec)
            judged = await self._judge_items(claim, spec, what)
            if judged is None:
                return  # a judge failed (recorded), or another process holds the job now
            conclusion = conclude_map(spec, claim.lanes, partial=claim.partial, judged=judged)
            if conclusion.status is not JobStatus.AGGREGATING:
                work = record(
                    claim,
                    self.owner,
                    usage=NO_USAGE,
                    result=conclusion.result,
                    error=conclusion.error,
                )
                await self.writes(work)
                return
            what = "reducer"
            claim = replace(claim, partial=bool((conclusion.result or {}).get("partial")))
        # What the fan-in reads: the lanes, or a per-item map's items.
        claim = replace(claim, lanes=fan_in(spec, claim.lanes, judged))
        aggregate = spec.aggregate
        assert isinstance(aggregate, ReduceAggregate | JudgeAggregate)
        task = aggregate.task
        levels = 1
        if isinstance(aggregate, JudgeAggregate):
            messages = judge_messages(task, candidates(spec, claim.lanes))
        else:
            tree = await self._levels(claim, aggregate, what)
            if tree is None:
                return  # a group failed (recorded), or another process holds the job now
            messages = tagged_messages(task, tree.level_inputs(claim.lanes))
            levels = tree.level + 1
        deltas = None
        if task.stream:
            fields: dict[str, object] = {"kind": aggregate.kind, "attempt": claim.attempt_no}
            deltas = DeltaCoalescer(
                self.publish_deltas, claim.job_id, EventType.AGGREGATE_DELTA, fields
            )
        try:
            attempt = await guarded(
                self.execute(
                    task,
                    timeout=spec.policy.lane_timeout_s or self.default_lane_timeout_s,
                    messages=messages,
                    on_delta=deltas.add if deltas else None,
                ),
                f"{what} of {claim.job_id}",
            )
        finally:
            if deltas is not None:
                deltas.flush()
        if deltas is not None and self.deltas_sent is not None:
            await self.deltas_sent()
        self.metrics.observe_usage(provider_name(task), task.model, attempt.usage)
        step = next_step(attempt, claim.attempt_no, max_attempts, self.retrying)
        if step.status is LaneStatus.SUCCEEDED:
            result, failed = self._result(aggregate, claim, attempt.output, levels)
            work = record(claim, self.owner, usage=attempt.usage, result=result, error=failed)
        elif step.retry:
            why = _error(
                attempt.error_type or ErrorType.INTERNAL_ERROR, attempt.error_message or ""
            )
            work = record(claim, self.owner, usage=attempt.usage, retry_in=step.retry_in, error=why)
            asyncio.get_running_loop().call_later(step.retry_in, self.wake)
        else:
            error = _error(
                attempt.error_type or ErrorType.INTERNAL_ERROR, f"{what}: {attempt.error_message}"
            )
            work = record(claim, self.owner, usage=attempt.usage, error=error)
        await self.writes(work)

    async def _levels(
        self, claim: ReductionClaim, aggregate: ReduceAggregate, what: str
    ) -> Tree | None:
        """A hierarchical reduce's levels below its last call: each level's groups (at
        most ``group_size`` inputs each) reduced at once, each answer kept with the job
        as it comes. The tree the last call reads, or None when this attempt has ended:
        a group's call failed (recorded: a retry, or the job's failure), or the lease
        was lost."""
        tree, size, task = claim.tree, aggregate.group_size, aggregate.task
        if size is None:
            return tree
        while len(tree.level_inputs(claim.lanes)) > size:
            groups = tree.groups(claim.lanes, size)
            level = _Level(tree)
            todo = [
                (i, tagged_messages(task, group))
                for i, group in enumerate(groups)
                if i not in tree.outputs
            ]
            if not await self._calls(claim, task, todo, level.answered, what):
                return None
            tree = level.tree.next_level(len(groups))
            kept = {"tree": tree.saved()}
            if not await self.writes(
                self.store.reductions.step(claim, self.owner, kept, usage=NO_USAGE)
            ):
                return None
        return tree

    async def _judge_items(
        self, claim: ReductionClaim, spec: MapSpec, what: str
    ) -> dict[int, int] | None:
        """A map's item judges, at once: each names the best of its item's succeeded
        lanes, kept with the job as it answers. Every item's choice (an item without a
        succeeded lane gets none, and no call), or None when this attempt has ended."""
        assert spec.per_item is not None and isinstance(spec.per_item.aggregate, JudgeAggregate)
        task = spec.per_item.aggregate.task
        judges = _Judges(claim.judged)
        todo = []
        for index in range(len(spec.items)):
            among = [vote for vote in item_votes(spec, claim.lanes, index) if vote.succeeded]
            judges.counts[index] = len(among)
            if index not in claim.judged and among:
                todo.append((index, judge_messages(task, among)))
        if not await self._calls(claim, task, todo, judges.answered, what):
            return None
        return {index: judges.judged.get(index, 0) for index in range(len(spec.items))}

    async def _calls(
        self,
        claim: ReductionClaim,
        task: LlmTask,
        todo: list[tuple[int, list[Message]]],
        answered: Callable[[int, str], tuple[dict[str, Any], dict[str, Any]]],
        what: str,
    ) -> bool:
        """The calls of one step of a reducer of many (a level's groups, a map's item
        judges), made at once: at most the job's max_concurrency, or MAX_CALLS_AT_ONCE.
        Each answer is kept with the job as it comes (``answered`` says what to keep and
        what its event says). False when this attempt has ended: a call failed (then
        recorded: a retry after a backoff, or the job's failure) or the lease was lost;
        after either, no further call starts."""
        policy = claim.spec.policy
        timeout = policy.lane_timeout_s or self.default_lane_timeout_s
        at_once = asyncio.Semaphore(policy.max_concurrency or MAX_CALLS_AT_ONCE)
        failed: list[Attempt] = []
        lost: list[bool] = []

        async def call(key: int, messages: list[Message]) -> None:
            async with at_once:
                if failed or lost:
                    return  # this attempt is over: the rest wait for the next
                attempt = await guarded(
                    self.execute(task, timeout=timeout, messages=messages),
                    f"{what} {key} of {claim.job_id}",
                )
            self.metrics.observe_usage(provider_name(task), task.model, attempt.usage)
            if not attempt.ok:
                failed.append(attempt)
                return
            kept, done = answered(key, attempt.output if isinstance(attempt.output, str) else "")
            step = self.store.reductions.step(
                claim, self.owner, kept, usage=attempt.usage, done=done
            )
            if not await self.writes(step):
                lost.append(True)

        await asyncio.gather(*(call(key, messages) for key, messages in todo))
        if failed and not lost:
            await self._group_failed(claim, failed, what)
        return not (failed or lost)

    async def _group_failed(self, claim: ReductionClaim, failed: list[Attempt], what: str) -> None:
        """A level's group calls failed: the attempt is retried after a backoff (the
        groups done are kept), or the job fails."""
        first = failed[0]
        usage = sum((attempt.usage for attempt in failed), NO_USAGE)
        step = next_step(first, claim.attempt_no, claim.spec.policy.max_attempts, self.retrying)
        kind = first.error_type or ErrorType.INTERNAL_ERROR
        record = self.store.reductions.record
        if step.retry:
            why = _error(kind, first.error_message or "")
            await self.writes(
                record(claim, self.owner, usage=usage, retry_in=step.retry_in, error=why)
            )
            asyncio.get_running_loop().call_later(step.retry_in, self.wake)
        else:
            error = _error(kind, f"{what}: {first.error_message}")
            await self.writes(record(claim, self.owner, usage=usage, error=error))

    @staticmethod
    def _result(
        aggregate: ReduceAggregate | JudgeAggregate,
        claim: ReductionClaim,
        output: Any,
        levels: int = 1,
    ) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """The job's result from the call's answer, or the error when a judge named no
        candidate."""
        text = output if isinstance(output, str) else ""
        if isinstance(aggregate, ReduceAggregate):
            return reduced(text, claim.lanes, partial=claim.partial, levels=levels), None
        among = candidates(claim.spec, claim.lanes)
        choice = judge_choice(text, len(among))
        if choice is None:
            message = f"the judge named no candidate of {len(among)}: {text[:200]!r}"
            return None, _error(ErrorType.NO_ANSWER, message)
        return judged(choice, among, text, partial=claim.partial), None

    def _on_events(self, events: list[Event]) -> None:
        """A cancelled job's reducer stops at once."""
        for event in events:
            if event["type"] == EventType.JOB_CANCELLED:
                task = self.running.get(event["job_id"])
                if task is not None:
                    task.cancel()


class _Level:
    """A level of a hierarchical reduce as its groups answer."""

    def __init__(self, tree: Tree) -> None:
        self.tree = tree

    def answered(self, index: int, text: str) -> tuple[dict[str, Any], dict[str, Any]]:
        self.tree = self.tree.done(index, text)
        return {"tree": self.tree.saved()}, {"level": self.tree.level, "group": index}


class _Judges:
    """A map's item judges as they answer: each item's choice (from 1; 0: none)."""

    def __init__(self, judged: dict[int, int]) -> None:
        self.judged = dict(judged)
        self.counts: dict[int, int] = {}  # each item's candidates

    def answered(self, index: int, text: str) -> tuple[dict[str, Any], dict[str, Any]]:
        self.judged[index] = judge_choice(text, self.counts[index]) or 0
        kept = {"judged": {str(i): choice for i, choice in self.judged.items()}}
        return kept, {"kind": "judge", "item": index}


def _error(error_type: str, message: str) -> dict[str, Any]:
    return {"type": error_type, "message": message}
