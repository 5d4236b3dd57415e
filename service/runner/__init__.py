"""The fan-out, as parts with one lifecycle, composed by a small :class:`Runner`::

    Runner ─┬─ LaneRunner     claim lanes, run attempts at once, group-commit outcomes,
            │                 cancel attempts whose lane a decision ended
            ├─ Reducer        the reducer's durable attempts
            ├─ WebhookSender  finished jobs' webhooks, from the outbox
            └─ Housekeeper    heartbeats, deadlines, expired leases

They share the store, the event hub, this process's lease owner name, and the
shielded writes. A graceful stop: every part stops claiming at once; attempts in
flight get the drain time to finish and be recorded; then the rest are cancelled,
what finished is recorded and every lease given back, so other processes take it
at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httpx

from ..attempts import Executor
from ..events import Event, EventHub
from ..metrics import Metrics
from ..policy import Retrying
from ..store import Store
from .housekeeper import Housekeeper
from .lanes import LaneRunner
from .lifecycle import Part, Writes
from .reducer import Reducer
from .webhooks import WebhookSender

log = logging.getLogger("fanout.runner")


@dataclass(frozen=True)
class RunnerConfig:
    """What the runner's parts are tuned by (``FANOUT_*`` settings of the same names)."""

    max_concurrency: int = 512
    claim_batch: int = 1000
    poll_interval_s: float = 1.0
    heartbeat_s: float = 10.0
    default_lane_timeout_s: float = 120.0
    retrying: Retrying = field(default_factory=Retrying)
    webhook_secret: str | None = None
    webhook_timeout_s: float = 10.0
    webhook_max_attempts: int = 8
    reclaim_all_at_start: bool = False  # SQLite: nobody else can hold a lease


def new_owner() -> str:
    """This process's name on its leases: host, pid and a random part."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Runner:
    def __init__(
        self,
        store: Store,
        hub: EventHub,
        execute: Executor,
        *,
        http: httpx.AsyncClient,
        metrics: Metrics,
        config: RunnerConfig,
        owner: str | None = None,
        publish_deltas: Callable[[list[Event]], None] | None = None,
        deltas_sent: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """``publish_deltas``: where streamed text goes (this process's hub by default;
        on PostgreSQL, every process's, :class:`service.notify.DeltaRelay`), and
        ``deltas_sent`` waits until what was published has gone out."""
        self.store = store
        self.config = config
        self.owner = owner or new_owner()
        self.writes = Writes()
        self.reducer = Reducer(
            store,
            hub,
            execute,
            metrics,
            self.writes,
            owner=self.owner,
            poll_interval_s=config.poll_interval_s,
            default_lane_timeout_s=config.default_lane_timeout_s,
            retrying=config.retrying,
            publish_deltas=publish_deltas or hub.publish,
            deltas_sent=deltas_sent,
        )
        self.lanes = LaneRunner(
            store,
            hub,
            execute,
            metrics,
            self.writes,
            owner=self.owner,
            max_concurrency=config.max_concurrency,
            claim_batch=config.claim_batch,
            poll_interval_s=config.poll_interval_s,
            default_lane_timeout_s=config.default_lane_timeout_s,
            retrying=config.retrying,
            on_reduce=self._reduce,
            publish_deltas=publish_deltas or hub.publish,
            deltas_sent=deltas_sent,
        )
        self.webhooks = WebhookSender(
            store,
            hub,
            http,
            self.writes,
            owner=self.owner,
            secret=config.webhook_secret,
            timeout_s=config.webhook_timeout_s,
            max_attempts=config.webhook_max_attempts,
            retry_base_s=config.retrying.base_s,
            poll_interval_s=config.poll_interval_s,
        )
        self.housekeeper = Housekeeper(
            store,
            self.writes,
            owner=self.owner,
            heartbeat_s=config.heartbeat_s,
            sweep_s=min(0.25, config.poll_interval_s),
            retrying=config.retrying,
            holds_leases=lambda: self.lanes.holds_leases() or bool(self.reducer.running),
            on_requeued=self.lanes.wake,
            on_reduce=self._reduce,
        )
        self.parts: tuple[Part, ...] = (self.lanes, self.reducer, self.webhooks, self.housekeeper)
        self.draining = False

    def _reduce(self, _job_ids: list[str]) -> None:
        self.reducer.wake()

    def wake(self) -> None:
        """New work may be claimable (a job was created, a lane requeued)."""
        self.lanes.wake()

    def stop_claiming(self) -> None:
        """Take no new work (the first step of a graceful stop)."""
        self.draining = True
        for part in self.parts:
            part.stop_claiming()

    def in_flight(self) -> list[asyncio.Task[None]]:
        return [task for part in self.parts for task in part.in_flight()]

    async def drain(self, timeout: float) -> None:
        """Stop claiming and wait up to ``timeout`` for attempts in flight to finish;
        they are recorded, and whatever still runs is released, when the runner stops."""
        self.stop_claiming()
        tasks = self.in_flight()
        if tasks and timeout > 0:
            await asyncio.wait(tasks, timeout=timeout)

    async def run(self) -> None:
        if self.config.reclaim_all_at_start:
            await self.store.queue.expire_all_leases()
        try:
            async with asyncio.TaskGroup() as group:
                for part in self.parts:
                    group.create_task(part.run())
        except asyncio.CancelledError:
            await self._shutdown()
            raise

    async def _shutdown(self) -> None:
        tasks = self.in_flight()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.writes.wait(30)
        try:
            async with asyncio.timeout(10):
                await self.lanes.flush()
                await self.store.queue.release(self.owner)
        except Exception:  # the database may be gone or stuck; leases expire anyway
            log.exception("could not release leases on shutdown")
