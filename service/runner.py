"""The fan-out: claim lanes from the database, run them at once, record how they end.

Four loops share one task group::

    claim loop ──claims──► lane tasks (≤ max_concurrency) ──outcomes──► record loop
        ▲ wake: new job, freed capacity, retry due, poll                  │ one transaction
        └──────────────────────────────────────────────────────────────────┘ per batch
    heartbeat loop: renews this process's leases
    sweep loop:     deadlines, expired leases of dead workers, orphaned reducers

Outcomes are written in batches (group commit): whatever finished while the last
transaction was open goes into the next one. Decisions (early stop, fail fast,
deadline...) are made by the store inside those transactions; when one ends lanes
this process is running, the committed ``lane.*`` events reach :meth:`_on_events`,
which cancels those tasks, closing their upstream requests.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Coroutine
from contextlib import suppress
from typing import Any, TypeVar

import httpx

from . import webhooks
from .aggregate import reduce_messages
from .config import Settings
from .egress import run_http
from .events import Event, EventHub
from .lanes import Attempt, Providers, run_llm
from .limits import ProviderLimits
from .metrics import Metrics
from .spec import HttpTask, LlmTask, ReduceAggregate, lane_task
from .store import Claim, Claimed, Outcome, Store, iso, provider_of

log = logging.getLogger("fanout.runner")
T = TypeVar("T")

_STOPPING_EVENTS = frozenset({"lane.skipped", "lane.cancelled", "lane.timed_out"})
_JOB_ENDED = frozenset({"job.succeeded", "job.failed", "job.cancelled"})


class Runner:
    def __init__(
        self,
        store: Store,
        hub: EventHub,
        providers: Providers,
        settings: Settings,
        http: httpx.AsyncClient,
        metrics: Metrics,
    ) -> None:
        self.store = store
        self.hub = hub
        self.providers = providers
        self.settings = settings
        self.http = http  # through the egress guard: http tasks and webhooks
        self.metrics = metrics
        self.limits = ProviderLimits(settings.providers)
        metrics.inflight.set_function(lambda: len(self.inflight))
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.inflight: dict[tuple[str, int], asyncio.Task[None]] = {}
        self.reducing: dict[str, asyncio.Task[None]] = {}
        self._outcomes: list[Outcome] = []
        self._outcome_ready = asyncio.Event()
        self._wake = asyncio.Event()
        # Whether the last claim left claimable lanes behind (or the process was full):
        # only then can a lane that ends (and frees a cap or a slot) let another start.
        self._held_back = True
        self._webhooks_due = asyncio.Event()
        self._stopping = False
        self._recording = 0
        self._writes: set[asyncio.Future[Any]] = set()
        self.draining = False
        hub.add_listener(self._on_events)

    def stop_claiming(self) -> None:
        """Take no new lanes (the first step of a graceful stop)."""
        self.draining = True

    async def drain(self, timeout: float) -> None:
        """Stop claiming and wait up to ``timeout`` for in-flight lanes and reducers to
        finish; their outcomes are recorded, and whatever is still running is released,
        when the runner stops."""
        self.draining = True
        tasks = [*self.inflight.values(), *self.reducing.values()]
        if tasks and timeout > 0:
            await asyncio.wait(tasks, timeout=timeout)

    def wake(self) -> None:
        """New work may be claimable (a job was created, a lane requeued)."""
        self._wake.set()

    async def run(self) -> None:
        if self.store.db.is_sqlite:
            await self.store.expire_all_leases()
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._claim_loop())
                group.create_task(self._record_loop())
                group.create_task(self._heartbeat_loop())
                group.create_task(self._sweep_loop())
                group.create_task(self._webhook_loop())
        except asyncio.CancelledError:
            await self._shutdown()
            raise

    def _write(self, work: Coroutine[Any, Any, T]) -> Awaitable[T]:
        """Run a database write to its end even if the caller is cancelled.

        Cancelling a coroutine in the middle of a transaction can abandon the
        connection with the transaction still open (on SQLite, holding the write lock
        that the next connection then waits on). Shielded, the write finishes or fails
        on its own, and :meth:`_shutdown` waits for it before releasing leases.
        """
        task = asyncio.ensure_future(work)
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)
        return asyncio.shield(task)

    async def _shutdown(self) -> None:
        self._stopping = True
        tasks = [*self.inflight.values(), *self.reducing.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._writes:
            await asyncio.wait(set(self._writes), timeout=30)
        try:
            async with asyncio.timeout(10):
                if self._outcomes:
                    await self.store.record(self.owner, self._outcomes)
                await self.store.release(self.owner)
        except Exception:  # the database may be gone or stuck; leases expire anyway
            log.exception("could not release leases on shutdown")

    # --- claiming ------------------------------------------------------------------

    async def _claim_loop(self) -> None:
        while True:
            self._wake.clear()
            # Lanes whose call returned still hold their slot until they are recorded.
            busy = len(self.inflight) + len(self._outcomes) + self._recording
            free = 0 if self.draining else self.settings.max_concurrency - busy
            claimed = 0
            self._held_back = True
            if free > 0:
                wanted = min(free, self.settings.claim_batch)
                result = await self._claim(wanted)
                for claim in result.claims:
                    self.metrics.queue_wait.observe(claim.waited_s)
                    self._start(claim)
                claimed = len(result.claims)
                self._held_back = result.held_back
                if claimed == wanted:
                    continue
            # Sleep until woken (a job was created, a lane finished and freed a cap),
            # a retry's backoff ends, a provider's rate allows another call, or the
            # poll interval passes (work from other processes without NOTIFY).
            timeout = self.settings.poll_interval_s
            now = time.time()
            due = await self.store.next_wakeup() if claimed == 0 and free > 0 else None
            if due is not None and due > now:
                timeout = min(timeout, due - now + 0.001)
            if self.limits.next_check is not None:
                timeout = min(timeout, max(0.001, self.limits.next_check - time.monotonic()))
                self.limits.next_check = None
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel
            # that lands as the wait ends, and the runner would never stop.
            with suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()

    async def _claim(self, wanted: int) -> Claimed:
        """Claim lanes whose provider has capacity; give back slots admitted for lanes
        that another process claimed first."""
        admitted: list[str] = []

        def admit(provider: str) -> bool:
            if self.limits.admit(provider):
                admitted.append(provider)
                return True
            return False

        result = Claimed([], held_back=True)
        try:
            result = await self._write(self.store.claim(self.owner, wanted, admit))
        finally:
            unused = Counter(admitted) - Counter(provider_of(claim) for claim in result.claims)
            for provider in unused.elements():
                self.limits.release(provider, 0)
        return result

    def _start(self, claim: Claim) -> None:
        key = (claim.job_id, claim.idx)
        task = asyncio.create_task(self._run_lane(claim), name=f"lane {claim.job_id}/{claim.idx}")
        self.inflight[key] = task
        task.add_done_callback(lambda _t: self._lane_done(key, task))

    def _lane_done(self, key: tuple[str, int], task: asyncio.Task[None]) -> None:
        if self.inflight.get(key) is task:
            del self.inflight[key]
        if self._held_back:
            self._wake.set()

    async def _run_lane(self, claim: Claim) -> None:
        tokens = 0
        try:
            tokens = await self._attempt(claim)
        finally:
            self.limits.release(provider_of(claim), tokens)

    async def _attempt(self, claim: Claim) -> int:
        """Run one attempt and report it; returns the tokens it used."""
        _name, task = lane_task(claim.spec, claim.idx)
        policy = claim.spec.policy
        timeout = policy.lane_timeout_s or self.settings.default_lane_timeout_s
        if claim.deadline_at is not None:
            timeout = max(0.001, min(timeout, claim.deadline_at - time.time()))
        started = time.time()
        attempt = await _guarded(
            self._call(claim, task, timeout), f"lane {claim.job_id}/{claim.idx}"
        )
        provider, model = (
            (task.provider, task.model) if isinstance(task, LlmTask) else ("http", "-")
        )
        outcome = "ok" if attempt.ok else (attempt.error_type or "error")
        self.metrics.observe_attempt(provider, model, time.time() - started, outcome, attempt.usage)
        self._report(claim, attempt, started)
        return attempt.usage[2]

    async def _call(self, claim: Claim, task: LlmTask | HttpTask, timeout: float) -> Attempt:
        if isinstance(task, HttpTask):
            return await run_http(
                self.http, task, timeout=timeout, max_bytes=self.settings.max_response_bytes
            )
        client = self.providers.client(task.provider)
        if not task.stream:
            return await run_llm(client, task, timeout=timeout)
        deltas = DeltaCoalescer(self.hub, claim)
        try:
            return await run_llm(client, task, timeout=timeout, on_delta=deltas.add)
        finally:
            deltas.flush()

    def _report(self, claim: Claim, attempt: Attempt, started: float) -> None:
        finished = time.time()
        common: dict[str, Any] = {
            "job_id": claim.job_id,
            "idx": claim.idx,
            "attempt": claim.attempt,
            "usage": attempt.usage,
            "started_at": started,
            "finished_at": finished,
        }
        if attempt.ok:
            outcome = Outcome(kind="succeeded", output=attempt.output, **common)
        elif attempt.transient and claim.attempt < claim.spec.policy.max_attempts:
            self.metrics.retries.labels(attempt.error_type or "error").inc()
            outcome = Outcome(
                kind="retry",
                error_type=attempt.error_type,
                error_message=attempt.error_message,
                retry_in=self._backoff(claim.attempt, attempt.retry_after),
                **common,
            )
        else:
            kind = "timed_out" if attempt.error_type == "timeout" else "failed"
            outcome = Outcome(
                kind=kind,
                error_type=attempt.error_type,
                error_message=attempt.error_message,
                **common,
            )
        self._outcomes.append(outcome)
        self._outcome_ready.set()

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        """Exponential backoff with jitter (half to all of the step), never sooner than
        ``Retry-After``."""
        ceiling = min(self.settings.retry_max_s, self.settings.retry_base_s * 2 ** (attempt - 1))
        delay = random.uniform(ceiling / 2, ceiling)
        return max(delay, retry_after or 0.0)

    # --- recording -----------------------------------------------------------------

    async def _record_loop(self) -> None:
        while True:
            await self._outcome_ready.wait()
            self._outcome_ready.clear()
            batch, self._outcomes = self._outcomes, []
            if not batch:
                continue
            self._recording = len(batch)
            try:
                recorded = await self._write(self.store.record(self.owner, batch))
            except BaseException:
                # Not written: keep the outcomes for the next try (or the shutdown).
                self._outcomes[:0] = batch
                raise
            finally:
                self._recording = 0
            self.metrics.rejected_writes.inc(recorded.rejected)
            if recorded.rejected:
                log.warning("rejected %d stale lane writes", recorded.rejected)
            for job_id in recorded.reduce_jobs:
                self._start_reduce(job_id)
            # A recorded outcome frees a slot (under its job's cap, or the process's):
            # worth a claim if the last one left lanes behind. A retry requeued a lane
            # whose backoff the claim loop must time.
            if self._held_back or any(outcome.kind == "retry" for outcome in batch):
                self._wake.set()

    def _on_events(self, events: list[Event]) -> None:
        """Stop in-flight attempts whose lane (or job) another decision just ended."""
        for event in events:
            kind = event["type"]
            if kind in _STOPPING_EVENTS:
                task = self.inflight.get((event["job_id"], event["data"]["lane"]))
                if task is not None:
                    task.cancel()
            elif kind in _JOB_ENDED:
                job_id = event["job_id"]
                self._webhooks_due.set()
                for (task_job, _idx), task in list(self.inflight.items()):
                    if task_job == job_id:
                        task.cancel()
                reducer = self.reducing.get(job_id)
                if reducer is not None and kind == "job.cancelled":
                    reducer.cancel()

    # --- the reducer ---------------------------------------------------------------

    def _start_reduce(self, job_id: str) -> None:
        if job_id in self.reducing:
            return
        task = asyncio.create_task(self._reduce(job_id), name=f"reduce {job_id}")
        self.reducing[job_id] = task
        task.add_done_callback(lambda _t: self.reducing.pop(job_id, None))

    async def _reduce(self, job_id: str) -> None:
        """One more LLM call over every lane's output, retried like a lane."""
        spec, results = await self.store.lane_results(job_id)
        assert isinstance(spec.aggregate, ReduceAggregate)
        task = spec.aggregate.task
        messages = reduce_messages(task, results)
        timeout = spec.policy.lane_timeout_s or self.settings.default_lane_timeout_s
        usage = (0, 0, 0)
        output: str | None = None
        error = {"type": "budget", "message": "the token budget was spent before the reducer ran"}
        for attempt_no in range(1, spec.policy.max_attempts + 1):
            left = await self.store.reduce_budget_left(job_id)
            if left is not None and left - usage[2] <= 0:
                error = {
                    "type": "budget",
                    "message": "the token budget was spent before the reducer ran",
                }
                break
            client = self.providers.client(task.provider)
            attempt = await _guarded(
                run_llm(client, task, timeout=timeout, messages=messages), f"reducer of {job_id}"
            )
            usage = (
                usage[0] + attempt.usage[0],
                usage[1] + attempt.usage[1],
                usage[2] + attempt.usage[2],
            )
            if attempt.ok:
                output = attempt.output
                break
            error = {
                "type": attempt.error_type or "error",
                "message": f"reducer: {attempt.error_message}",
            }
            if not attempt.transient:
                break
            if attempt_no < spec.policy.max_attempts:
                await asyncio.sleep(self._backoff(attempt_no, attempt.retry_after))
        await self._write(
            self.store.finish_reduce(
                job_id,
                self.owner,
                output=output,
                error=None if output is not None else error,
                usage=usage,
            )
        )

    # --- webhooks ------------------------------------------------------------------

    async def _webhook_loop(self) -> None:
        """Deliver due webhooks (queued by the transaction that ended their job)."""
        secret = self.settings.webhook_secret
        while True:
            with suppress(TimeoutError):
                async with asyncio.timeout(self.settings.poll_interval_s):
                    await self._webhooks_due.wait()
            self._webhooks_due.clear()
            if secret is None:
                continue
            due = await self._write(self.store.claim_webhooks(self.owner))
            await asyncio.gather(
                *(self._deliver(job_id, url, attempts, secret) for job_id, url, attempts in due)
            )

    async def _deliver(self, job_id: str, url: str, attempts: int, secret: str) -> None:
        view = await self.store.get_job(job_id, None)
        view.webhook = None  # the delivery history is not part of what is delivered
        body = view.model_dump_json().encode()
        record = await webhooks.deliver(
            self.http,
            url,
            body,
            job_id=job_id,
            secret=secret,
            timeout=self.settings.webhook_timeout_s,
        )
        retry_at = None
        if record.pop("retry") and attempts + 1 < self.settings.webhook_max_attempts:
            retry_at = time.time() + webhooks.retry_delay(attempts + 1, self.settings.retry_base_s)
        delivered = record.pop("delivered")
        if not delivered:
            log.warning("webhook for job %s failed: %s", job_id, record["error"])
        await self._write(
            self.store.record_webhook_attempt(
                job_id, self.owner, attempt=record, delivered=delivered, retry_at=retry_at
            )
        )
        if retry_at is not None:
            asyncio.get_running_loop().call_at(
                asyncio.get_running_loop().time() + (retry_at - time.time()), self._webhooks_due.set
            )

    # --- housekeeping --------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_s)
            if self.inflight or self.reducing or self._outcomes or self._recording:
                await _logged(self._write(self.store.renew_leases(self.owner)), "renewing leases")

    async def _sweep_loop(self) -> None:
        while True:
            await _logged(self._write(self._sweep()), "sweeping")
            await asyncio.sleep(min(0.25, self.settings.poll_interval_s))

    async def _sweep(self) -> None:
        for job_id in await self.store.expire_deadlines(self.owner):
            self._start_reduce(job_id)
        if await self.store.reclaim_expired():
            self._wake.set()
        for job_id in await self.store.take_orphaned_reductions(self.owner):
            self._start_reduce(job_id)


async def _guarded(call: Awaitable[Attempt], what: str) -> Attempt:
    """An attempt that raises is a defect, not an answer, but it must still end: a lane
    (or reducer) that never reports stays running under this process's lease, which its
    heartbeat renews for as long as the process lives."""
    try:
        return await call
    except Exception as exc:
        log.exception("%s: the attempt raised", what)
        return Attempt(error_type="internal_error", error_message=f"{type(exc).__name__}: {exc}")


async def _logged(work: Awaitable[object], doing: str) -> None:
    """Housekeeping that fails (a lost connection, a deadlock victim) is logged and
    tried again next round, rather than stopping the runner's other loops."""
    try:
        await work
    except Exception:
        log.exception("failed %s; trying again next round", doing)


class DeltaCoalescer:
    """Text chunks of a streaming lane, sent to live subscribers at most ~10 times a
    second (``lane.delta``, sequence 0: never stored, never replayed)."""

    INTERVAL_S = 0.1

    def __init__(self, hub: EventHub, claim: Claim) -> None:
        self.hub = hub
        self.claim = claim
        self._parts: list[str] = []
        self._last_sent = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def add(self, text: str) -> None:
        self._parts.append(text)
        wait = self._last_sent + self.INTERVAL_S - time.monotonic()
        if wait <= 0:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(wait, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._parts:
            return
        text, self._parts = "".join(self._parts), []
        self._last_sent = time.monotonic()
        data = {
            "job_id": self.claim.job_id,
            "seq": 0,
            "at": iso(time.time()),
            "lane": self.claim.idx,
            "name": self.claim.name,
            "attempt": self.claim.attempt,
            "text": text,
        }
        self.hub.publish(
            [{"job_id": self.claim.job_id, "seq": 0, "type": "lane.delta", "data": data}]
        )
