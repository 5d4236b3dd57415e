"""One Fanout process: what it holds, built once by :func:`running` (for ``serve``,
``serve --no-runner`` and ``worker``) and torn down in a fixed order."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text

from .attempts import TaskExecutor
from .attempts.llm import Providers
from .config import Settings
from .egress import EgressGuard
from .events import EventHub
from .metrics import Metrics
from .notify import DeltaRelay, Listener
from .policy import Retrying
from .runner import Runner, RunnerConfig
from .store import Database, Store
from .store.db import head_revision, upgrade

log = logging.getLogger("fanout")


@dataclass
class Process:
    settings: Settings
    db: Database
    store: Store
    hub: EventHub
    providers: Providers
    runner: Runner | None
    metrics: Metrics

    async def readiness(self) -> str | None:
        """None when ready; otherwise why not (database unreachable, migrations missing)."""
        try:
            async with self.db.read() as conn:
                current = (
                    await conn.execute(text("SELECT version_num FROM alembic_version"))
                ).scalar()
        except Exception as exc:
            return f"database not reachable or not migrated: {type(exc).__name__}"
        head = head_revision()
        if current != head:
            return f"migrations not applied: database at {current}, code at {head}"
        return None


def runner_config(settings: Settings) -> RunnerConfig:
    return RunnerConfig(
        max_concurrency=settings.max_concurrency,
        claim_batch=settings.claim_batch,
        poll_interval_s=settings.poll_interval_s,
        heartbeat_s=settings.heartbeat_s,
        default_lane_timeout_s=settings.default_lane_timeout_s,
        retrying=Retrying(settings.retry_base_s, settings.retry_max_s),
        webhook_secret=settings.webhook_secret,
        webhook_timeout_s=settings.webhook_timeout_s,
        webhook_max_attempts=settings.webhook_max_attempts,
        reclaim_all_at_start=settings.is_sqlite,
    )


@asynccontextmanager
async def running(settings: Settings, *, with_runner: bool = True) -> AsyncIterator[Process]:
    """Migrate, connect, and (optionally) run the runner until the block exits."""
    if settings.run_migrations:
        await asyncio.to_thread(upgrade, settings.database_url)
    db = Database(settings.database_url, pool_size=settings.db_pool_size)
    hub = EventHub()
    metrics = Metrics()

    def on_commit(events: list[dict[str, Any]]) -> None:
        metrics.observe_commit(events)
        hub.publish(events)

    db.on_commit = on_commit
    store = Store(
        db,
        lease_seconds=settings.lease_seconds,
        providers=settings.providers,
        weights=settings.weights,
    )
    providers = Providers(
        settings.providers, max_connections=settings.max_concurrency, kind=settings.llm_client
    )
    guard = EgressGuard(settings.egress_allow, max_response_bytes=settings.max_response_bytes)
    http = guard.client(max_connections=settings.max_concurrency)
    # PostgreSQL: streamed text reaches the streams of every process, not only this one's.
    relay = None if db.is_sqlite else DeltaRelay(hub, db.notify, origin=db.origin)
    runner = None
    if with_runner:
        execute = TaskExecutor(providers, http, max_response_bytes=settings.max_response_bytes)
        runner = Runner(
            store,
            hub,
            execute,
            http=http,
            metrics=metrics,
            config=runner_config(settings),
            publish_deltas=relay.publish if relay is not None else None,
            deltas_sent=relay.sent if relay is not None else None,
        )
    process = Process(settings, db, store, hub, providers, runner, metrics)

    # PostgreSQL: other processes' events reach this hub, their new work wakes this runner.
    listener = None
    if not db.is_sqlite:
        wake = runner.wake if runner is not None else None
        listener = Listener(settings.database_url, hub, origin=db.origin, wake=wake)
        await listener.start()
    if relay is not None:
        relay.start()
    supervisor = asyncio.create_task(_supervise(runner)) if runner is not None else None
    try:
        yield process
    finally:
        if runner is not None:
            await runner.drain(settings.drain_seconds)
        if listener is not None:
            with suppress(TimeoutError):
                async with asyncio.timeout(10):
                    await listener.stop()
        if relay is not None:
            await relay.stop()
        if supervisor is not None:
            supervisor.cancel()
            with suppress(asyncio.CancelledError, TimeoutError):
                async with asyncio.timeout(45):
                    await supervisor
        await providers.close()
        await http.aclose()
        await db.dispose()


async def _supervise(runner: Runner) -> None:
    """Keep the runner going: a lost database connection must not stop it for good."""
    while True:
        try:
            await runner.run()
        except Exception:
            log.exception("runner stopped; restarting in 1 s")
            await asyncio.sleep(1.0)
