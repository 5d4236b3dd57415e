"""The lane runner: claim lanes, run their attempts at once, record how they end.

::

    claim loop ──claims──► lane tasks (≤ max_concurrency) ──outcomes──► record loop
        ▲ wake: new job, freed capacity, retry due, poll                  │ one transaction
        └──────────────────────────────────────────────────────────────────┘ per batch

Outcomes are written in batches (group commit): whatever finished while the last
transaction was open goes into the next one, and the recorder waits a moment (at
most 5 ms) for lanes of the same jobs that are still answering. Decisions (early
stop, fail fast, deadline...) are made by the store inside those transactions; when
one ends lanes this process is running, the committed ``lane.*`` events reach
:meth:`_on_events`, which cancels those tasks, closing their upstream requests. When
the last claim left lanes waiting, a batch's transaction also claims for the slots it
freed (the claim loop takes what room is left): a capped job's next lanes start
without a transaction of their own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from ..attempts import Attempt, Executor
from ..events import Event, EventHub
from ..metrics import Metrics
from ..policy import Retrying, next_step, stops_lanes_alone
from ..spec import LlmTask, provider_name
from ..states import FINAL_EVENTS, LANE_STOPPED, EventType, LaneStatus
from ..store import Claim, Claimed, Outcome, Recorded, Store
from .deltas import DeltaCoalescer
from .lifecycle import Writes, guarded, sleep_until_woken

log = logging.getLogger("fanout.runner")

# How long the recorder waits for more outcomes of the jobs it is about to record, and
# for jobs with how many lanes still running here.
LINGER_GAP_S = 0.001
LINGER_MAX_S = 0.005
LINGER_LANES = 64
# Lanes a claim starts in one turn of the event loop, at most; the rest start in the
# turns after. A lane's first step builds and sends its request: a thousand at once
# held every other callback (the answers coming in, the recorder's statements) for a
# turn of up to ~100 ms. 1,000 lanes at 200 ms, all at once / 20 a turn: 457 / 392 ms
# (SQLite), 494 / 424 ms (PostgreSQL); a 10,000-item map capped at 1,000 on PostgreSQL,
# 1.58-1.70x / 1.37-1.46x the floor (2026-12-05; 10 to 50 a turn did about as well).
START_CHUNK = 20


class LaneRunner:
    def __init__(
        self,
        store: Store,
        hub: EventHub,
        execute: Executor,
        metrics: Metrics,
        writes: Writes,
        *,
        owner: str,
        max_concurrency: int,
        claim_batch: int,
        poll_interval_s: float,
        default_lane_timeout_s: float,
        retrying: Retrying,
        on_reduce: Callable[[list[str]], None],
        publish_deltas: Callable[[list[Event]], None],
        deltas_sent: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.store = store
        self.hub = hub
        self.execute = execute
        self.metrics = metrics
        self.writes = writes
        self.owner = owner
        self.max_concurrency = max_concurrency
        self.claim_batch = claim_batch
        self.poll_interval_s = poll_interval_s
        self.default_lane_timeout_s = default_lane_timeout_s
        self.retrying = retrying
        self.on_reduce = on_reduce
        self.publish_deltas = publish_deltas
        self.deltas_sent = deltas_sent
        self.running: dict[tuple[str, int], asyncio.Task[None]] = {}
        self.claiming = True
        self._looping = False  # the claim loop runs (after the runner reclaimed leases)
        self._outcomes = Unrecorded()
        self._outcome_ready = asyncio.Event()
        self._recording = 0  # outcomes in the transaction being written
        self._claiming = 0  # slots a claim being made may fill
        self._deferred = 0  # lanes claimed that start in a later turn (START_CHUNK)
        # Lanes running here that have not reported yet, and their number per job.
        self._unreported_lanes: set[tuple[str, int]] = set()
        self._unreported: dict[str, int] = {}
        self._wake = asyncio.Event()
        # Whether the last claim left claimable lanes behind (or the process was full):
        # only then can a lane that ends (and frees a cap or a slot) let another start.
        self._held_back = True
        metrics.inflight.set_function(lambda: len(self.running))
        hub.add_listener(self._on_events)

    # --- the lifecycle -------------------------------------------------------------

    def wake(self) -> None:
        """New work may be claimable (a job was created, a lane requeued)."""
        self._wake.set()

    def stop_claiming(self) -> None:
        self.claiming = False

    def in_flight(self) -> list[asyncio.Task[None]]:
        return list(self.running.values())

    def holds_leases(self) -> bool:
        return bool(self.running or self._deferred or self._outcomes or self._recording)

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self._claim_loop())
            group.create_task(self._record_loop())

    async def flush(self) -> None:
        """Record what has finished and not been recorded (when stopping)."""
        if self._outcomes:
            await self.store.outcomes.record(self.owner, self._outcomes.take())

    # --- claiming ------------------------------------------------------------------

    def _free(self) -> int:
        """Slots free for more lanes: a lane holds one while its call is in flight (its
        outcome, waiting to be recorded, holds none), from its claim on; a claim being
        made holds what it may take."""
        if not self.claiming:
            return 0
        return self.max_concurrency - len(self.running) - self._deferred - self._claiming

    def reserve(self, wanted: int) -> int:
        """Slots held for a new job's lanes, which start as it is stored (the runner is
        its :class:`~service.store.Starter`): at most ``wanted``, the lanes it can start,
        so that jobs stored at once each hold what they use (on PostgreSQL their
        transactions overlap); the claim loop takes what they leave. None until the
        claim loop runs: at its start the runner reclaims every lease."""
        reserved = max(0, min(self._free(), self.claim_batch, wanted)) if self._looping else 0
        self._claiming += reserved
        return reserved

    def release(self, reserved: int, claims: list[Claim]) -> None:
        self._claiming -= reserved
        self._start_all(claims)

    async def _claim_loop(self) -> None:
        self._looping = True
        try:
            await self._claiming_loop()
        finally:
            self._looping = False

    async def _claiming_loop(self) -> None:
        while True:
            free = self._free()
            claimed = 0
            next_check = None
            self._held_back = True
            if free > 0:
                wanted = min(free, self.claim_batch)
                self._claiming += wanted
                result = await self.writes(self._claim(wanted))
                claimed = len(result.claims)
                next_check = result.next_check
                if claimed == wanted:
                    continue
            # Sleep until woken (a job was created, a lane finished and freed a cap),
            # a retry's backoff ends, a provider's rate allows another call, or the
            # poll interval passes (work from other processes without NOTIFY).
            timeout = self.poll_interval_s
            now = time.time()
            due = await self.store.queue.next_wakeup() if claimed == 0 and free > 0 else None
            if due is not None and due > now:
                timeout = min(timeout, due - now + 0.001)
            if next_check is not None:
                # A provider deferred lanes (its rate, a 429's pause) until then.
                timeout = min(timeout, max(0.001, next_check - now))
            await sleep_until_woken(self._wake, timeout)

    async def _claim(self, wanted: int) -> Claimed:
        """Claim up to ``wanted`` lanes; they start as the claim commits."""
        try:
            claimed = await self.store.queue.claim(self.owner, wanted, self._outcomes.per_job)
        finally:
            self._claiming -= wanted
        self._started(claimed)
        return claimed

    def _started(self, claimed: Claimed) -> None:
        """Start the lanes a claim took (unless the runner is being torn down: its
        leases are then given back, :meth:`service.runner.Runner.run`)."""
        if self._looping:
            self._start_all(claimed.claims)
            self._held_back = claimed.held_back

    def _start_all(self, claims: list[Claim]) -> None:
        """Start lanes claimed, ``START_CHUNK`` in this turn of the event loop and as
        many in each turn after (while the runner runs: once it stops, the leases of
        those not started are given back with the others)."""
        for claim in claims[:START_CHUNK]:
            self.metrics.queue_wait.observe(claim.waited_s)
            self._start(claim)
        later = claims[START_CHUNK:]
        if later:
            self._deferred += len(later)
            asyncio.get_running_loop().call_soon(self._start_later, later)

    def _start_later(self, claims: list[Claim]) -> None:
        self._deferred -= len(claims)
        if self._looping:
            self._start_all(claims)

    def _start(self, claim: Claim) -> None:
        key = (claim.job_id, claim.idx)
        self._unreported[claim.job_id] = self._unreported.get(claim.job_id, 0) + 1
        self._unreported_lanes.add(key)
        task = asyncio.create_task(self._run_lane(claim), name=f"lane {claim.job_id}/{claim.idx}")
        self.running[key] = task
        task.add_done_callback(lambda _t: self._lane_done(key, task))

    def _lane_done(self, key: tuple[str, int], task: asyncio.Task[None]) -> None:
        # A lane that reported frees its slot for the claim that records it
        # (_record_loop); one stopped before it did (cancelled), for the claim loop.
        unreported = key in self._unreported_lanes
        self._reported(key)
        if self.running.get(key) is task:
            del self.running[key]
        if unreported and self._held_back:
            self._wake.set()

    # --- running -------------------------------------------------------------------

    def _reported(self, key: tuple[str, int]) -> None:
        """The lane's attempt is over, reported or not: the recorder waits for it no
        more (see :meth:`_linger`)."""
        if key in self._unreported_lanes:
            self._unreported_lanes.remove(key)
            left = self._unreported[key[0]] - 1
            if left:
                self._unreported[key[0]] = left
            else:
                del self._unreported[key[0]]

    async def _run_lane(self, claim: Claim) -> None:
        """Run one attempt and report it."""
        task = claim.task
        timeout = claim.spec.policy.lane_timeout_s or self.default_lane_timeout_s
        if claim.deadline_at is not None:
            timeout = max(0.001, min(timeout, claim.deadline_at - time.time()))
        started = time.time()
        deltas = None
        if isinstance(task, LlmTask) and task.stream:
            lane = {"lane": claim.idx, "name": claim.name, "attempt": claim.attempt_no}
            deltas = DeltaCoalescer(self.publish_deltas, claim.job_id, EventType.LANE_DELTA, lane)
        try:
            attempt = await guarded(
                self.execute(task, timeout=timeout, on_delta=deltas.add if deltas else None),
                f"lane {claim.job_id}/{claim.idx}",
            )
        finally:
            if deltas is not None:
                deltas.flush()
        if deltas is not None and self.deltas_sent is not None:
            await self.deltas_sent()  # the lane's last text before its end, everywhere
        model = task.model if isinstance(task, LlmTask) else "-"
        outcome = "ok" if attempt.ok else (attempt.error_type or "error")
        self.metrics.observe_attempt(
            provider_name(task), model, time.time() - started, outcome, attempt.usage
        )
        self._report(claim, attempt, started)

    def _report(self, claim: Claim, attempt: Attempt, started: float) -> None:
        step = next_step(attempt, claim.attempt_no, claim.spec.policy.max_attempts, self.retrying)
        if step.retry:
            self.metrics.retries.labels(attempt.error_type or "error").inc()
        self._outcomes.add(
            Outcome(
                job_id=claim.job_id,
                idx=claim.idx,
                attempt_no=claim.attempt_no,
                status=step.status,
                output=attempt.output,
                reply=attempt.reply,
                error_type=attempt.error_type,
                error_message=attempt.error_message,
                retry_in=step.retry_in,
                retry_after=attempt.retry_after,
                usage=attempt.usage,
                started_at=started,
                finished_at=time.time(),
            ),
            # Its call is over: it frees its slot of the job's cap before it is recorded,
            # unless a decision may stop the lane meanwhile with the job going on.
            frees_slot=not stops_lanes_alone(claim.spec),
        )
        self._reported((claim.job_id, claim.idx))
        self._outcome_ready.set()

    # --- recording -----------------------------------------------------------------

    async def _record_loop(self) -> None:
        while True:
            await self._outcome_ready.wait()
            self._outcome_ready.clear()
            await self._linger()
            batch = self._outcomes.take()
            if not batch:
                continue
            # An ended call frees a slot (under its job's cap, or the process's): if the
            # last claim left lanes behind, the transaction that records the batch
            # claims for the slots free then, its own included, and those of outcomes
            # that come meanwhile (their lanes are running in the table until recorded).
            claim = 0
            if self._held_back and self._looping:
                claim = max(0, min(self._free(), self.claim_batch))
            self._claiming += claim
            self._recording = len(batch)
            try:
                recorded = await self.writes(self._record(batch, claim))
            except BaseException:
                # Not written: keep the outcomes for the next try (or the shutdown).
                self._outcomes.put_back(batch)
                raise
            finally:
                self._recording = 0
            self.metrics.rejected_writes.inc(recorded.rejected)
            if recorded.rejected:
                log.warning("rejected %d stale lane writes", recorded.rejected)
            if recorded.reduce_jobs:
                self.on_reduce(recorded.reduce_jobs)
            # A retry requeued a lane whose backoff the claim loop times.
            if self._left_room(recorded.claimed, claim) or any(
                outcome.status is LaneStatus.QUEUED for outcome in batch
            ):
                self._wake.set()

    def _left_room(self, claimed: Claimed | None, asked: int) -> bool:
        """Whether the claim loop may find lanes to start that a recording's claim
        did not take: lanes were held back and that claim was none, or it took all it
        asked for, or a provider deferred some (the loop times it), or another
        transaction held some of their jobs. Otherwise the jobs' caps kept them: the
        next outcome frees a slot, and the recording of it claims it."""
        if not self._held_back:
            return False
        if claimed is None:
            return True
        return len(claimed.claims) >= asked or claimed.next_check is not None or claimed.contended

    async def _record(self, batch: list[Outcome], claim: int) -> Recorded:
        """Record ``batch``, claiming up to ``claim`` lanes in its transaction; they
        start as it commits, in the write itself (the first ``START_CHUNK`` with no
        turn of the loop in between)."""
        try:
            recorded = await self.store.outcomes.record(
                self.owner, batch, claim=claim, unrecorded=self._outcomes.per_job
            )
        finally:
            self._claiming -= claim
        if recorded.claimed is not None:
            self._started(recorded.claimed)
        return recorded

    async def _linger(self) -> None:
        """Wait a moment for the rest of a batch: while a few other lanes of its jobs
        (``LINGER_LANES`` at most) still run here and their outcomes keep coming (each
        within ``LINGER_GAP_S`` of the last, ``LINGER_MAX_S`` in all). A small job's
        lanes, which answer together, are then recorded and decided in one transaction
        rather than one each; a big job's stream of outcomes batches by itself."""
        loop = asyncio.get_running_loop()
        until = loop.time() + LINGER_MAX_S
        while any(
            0 < self._unreported.get(job_id, 0) <= LINGER_LANES for job_id in self._outcomes.jobs()
        ):
            wait = min(LINGER_GAP_S, until - loop.time())
            if wait <= 0:
                return
            self._outcome_ready.clear()
            try:
                async with asyncio.timeout(wait):
                    await self._outcome_ready.wait()
            except TimeoutError:
                return

    def _on_events(self, events: list[Event]) -> None:
        """Stop running attempts whose lane (or job) a decision just ended."""
        for event in events:
            kind = event["type"]
            if kind in LANE_STOPPED:
                task = self.running.get((event["job_id"], event["data"]["lane"]))
                if task is not None:
                    task.cancel()
            elif kind in FINAL_EVENTS:
                job_id = event["job_id"]
                for (task_job, _idx), task in list(self.running.items()):
                    if task_job == job_id:
                        task.cancel()


class Unrecorded:
    """Outcomes waiting for the recorder, in the order they came, and per job the number
    of those whose lanes hold no slot of its cap (``per_job``: a live view, read by the
    claims made while they wait, :meth:`service.store.LaneQueue.claim`)."""

    def __init__(self) -> None:
        self._outcomes: list[Outcome] = []
        self.per_job: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._outcomes)

    def add(self, outcome: Outcome, *, frees_slot: bool) -> None:
        self._outcomes.append(outcome)
        if frees_slot:
            self.per_job[outcome.job_id] = self.per_job.get(outcome.job_id, 0) + 1

    def jobs(self) -> set[str]:
        return {outcome.job_id for outcome in self._outcomes}

    def take(self) -> list[Outcome]:
        """Every outcome waiting (a batch to record)."""
        batch, self._outcomes = self._outcomes, []
        self.per_job.clear()
        return batch

    def put_back(self, batch: list[Outcome]) -> None:
        """A batch that was not recorded, ahead of those that came since. Its lanes hold
        their slots again until it is (a decision may have stopped them meanwhile)."""
        self._outcomes[:0] = batch
