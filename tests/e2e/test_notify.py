"""LISTEN/NOTIFY: two app instances in this one test process share one PostgreSQL.

``api`` runs no runner (an API replica); ``worker`` runs the runner. The poll interval
is 30 s, so only a notification explains anything happening sooner.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import pytest
from sqlalchemy import text

from service import events as ev
from service.config import Settings
from service.http import create_app
from service.notify import (
    EVENTS_CHANNEL,
    Listener,
    asyncpg_dsn,
)
from service.process import Process
from service.states import EventType
from service.store import Store
from service.store.db import Database
from service.store.eventlog import Item
from service.store.jobrows import lock_jobs
from tests.store.conftest import parse
from tests.support import events_of, fake_stats, make_settings, truncate, voting

FINAL = {"job.succeeded", "job.failed", "job.cancelled"}
SLOW = "fake?latency_ms=100&jitter_ms=1000"  # lanes end spread over a second


# --- two instances on one PostgreSQL -------------------------------------------------

postgres = pytest.mark.postgres


def event(job_id: str, seq: int, kind: str = "lane.started") -> dict[str, Any]:
    return {"job_id": job_id, "seq": seq, "type": kind, "data": {}}


@pytest.fixture
async def pg_settings(
    postgres_database: str, fake_llm: str, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    await truncate(postgres_database)
    # poll_interval_s: nothing below may wait for a poll.
    return make_settings(
        postgres_database, fake_llm, monkeypatch, poll_interval_s=30, run_migrations=False
    )


class Seen:
    """Every event batch a hub publishes: its own commits, and what its listener read."""

    def __init__(self, hub: ev.EventHub) -> None:
        self.events: list[tuple[float, dict[str, Any]]] = []
        self._changed = asyncio.Event()
        hub.add_listener(self._on_events)

    def _on_events(self, events: list[dict[str, Any]]) -> None:
        now = time.monotonic()
        self.events.extend((now, e) for e in events)
        self._changed.set()

    def of(self, job_id: str) -> list[dict[str, Any]]:
        return [e for _t, e in self.events if e["job_id"] == job_id]

    def when(self, job_id: str, kinds: set[str]) -> float:
        return next(t for t, e in self.events if e["job_id"] == job_id and e["type"] in kinds)

    async def until(self, job_id: str, kinds: set[str], count: int = 1, within: float = 10) -> None:
        async with asyncio.timeout(within):
            while sum(e["type"] in kinds for e in self.of(job_id)) < count:
                self._changed.clear()
                await self._changed.wait()


@dataclass
class Instance:
    http: httpx.AsyncClient
    state: Process
    seen: Seen


@asynccontextmanager
async def instance(settings: Settings, *, with_runner: bool) -> AsyncIterator[Instance]:
    app = create_app(settings, with_runner=with_runner)
    async with app.router.lifespan_context(app):
        state: Process = app.state.fanout.process
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://fanout") as http:
            yield Instance(http, state, Seen(state.hub))


@pytest.fixture
async def worker(pg_settings: Settings) -> AsyncIterator[Instance]:
    async with instance(pg_settings, with_runner=True) as worker:
        yield worker


@pytest.fixture
async def api(pg_settings: Settings, worker: Instance) -> AsyncIterator[Instance]:
    async with instance(pg_settings, with_runner=False) as api:
        yield api


async def post(where: Instance, spec: dict[str, Any]) -> str:
    response = await where.http.post("/v1/jobs", json=spec)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def as_log(streamed: list[dict[str, Any]]) -> list[tuple[int, str, dict[str, Any]]]:
    return [(int(e["id"]), e["event"], e["data"]) for e in streamed]


async def stored_log(where: Instance, job_id: str) -> list[tuple[int, str, dict[str, Any]]]:
    stored = await where.state.store.log.after(job_id, 0)
    log = [(e["seq"], e["type"], e["data"]) for e in stored]
    assert [seq for seq, _t, _d in log] == list(range(1, len(log) + 1))
    assert log[-1][1] in FINAL
    return log


async def until(check: Callable[[], Awaitable[bool]], within: float = 10) -> None:
    """For state that no event announces (the fake LLM's in-flight gauge)."""
    async with asyncio.timeout(within):
        while not await check():
            await asyncio.sleep(0.02)


@asynccontextmanager
async def admin(url: str) -> AsyncIterator[Any]:
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        yield conn
    finally:
        await conn.close()


async def listener_pids(url: str, origin: str) -> list[int]:
    async with admin(url) as conn:
        rows = await conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1",
            f"fanout listener {origin}",
        )
    return [row["pid"] for row in rows]


async def kill_listener(url: str, origin: str) -> int:
    """``pg_terminate_backend`` on the listener's connection; its pid."""
    (pid,) = await listener_pids(url, origin)
    async with admin(url) as conn:
        assert await conn.fetchval("SELECT pg_terminate_backend($1)", pid)
    return pid


@postgres
async def test_a_stream_on_one_replica_gets_every_event_of_a_job_another_instance_runs(
    api: Instance, worker: Instance
) -> None:
    job_id = await post(worker, voting(6, SLOW))
    streamed = await events_of(api.http, job_id, timeout=10)
    assert as_log(streamed) == await stored_log(worker, job_id)
    # Every event reached the replica's hub through a notification, in order...
    assert [e["seq"] for e in api.seen.of(job_id)] == [int(e["id"]) for e in streamed]
    # ...and at once: the poll interval is 30 s.
    assert api.seen.when(job_id, FINAL) - worker.seen.when(job_id, FINAL) < 1.0


@postgres
async def test_a_job_created_on_an_api_replica_wakes_an_idle_worker(
    api: Instance, worker: Instance
) -> None:
    # Three in a row: between jobs the worker waits on its 30 s poll; only a wake-up can
    # explain a prompt claim.
    for _ in range(3):
        created = time.monotonic()
        job_id = await post(api, voting(2))
        await worker.seen.until(job_id, {"job.running"}, within=10)
        assert worker.seen.when(job_id, {"job.running"}) - created < 2.0
        await worker.seen.until(job_id, FINAL)


@postgres
async def test_cancel_on_an_api_replica_stops_the_lanes_in_flight_on_a_worker(
    api: Instance, worker: Instance, fake_llm: str
) -> None:
    job_id = await post(api, voting(4, "fake?hang=1"))
    await until(lambda: in_flight(fake_llm, 4))
    assert len(worker.state.runner.lanes.running if worker.state.runner else ()) == 4

    cancel = await api.http.post(f"/v1/jobs/{job_id}/cancel")
    assert cancel.status_code == 202, cancel.text

    await worker.seen.until(job_id, {"job.cancelled"}, within=5)
    await until(lambda: in_flight(fake_llm, 0), within=5)
    assert worker.state.runner is not None and not worker.state.runner.lanes.running


async def in_flight(fake_llm: str, count: int) -> bool:
    return int((await fake_stats(fake_llm))["in_flight"]) == count


@postgres
async def test_a_stream_misses_nothing_when_the_listener_connection_is_killed_mid_job(
    api: Instance, worker: Instance, pg_settings: Settings
) -> None:
    url = pg_settings.database_url
    job_id = await post(worker, voting(8, SLOW))
    stream = asyncio.create_task(events_of(api.http, job_id, timeout=20))
    await api.seen.until(job_id, {"lane.succeeded"})
    assert api.state.hub.subscriber_count == 1  # the stream is live, not replaying
    killed = await kill_listener(url, api.state.db.origin)

    streamed = await stream
    assert as_log(streamed) == await stored_log(worker, job_id)
    assert streamed[-1]["event"] == "job.succeeded"
    (reconnected,) = await listener_pids(url, api.state.db.origin)
    assert reconnected != killed


@postgres
async def test_after_a_reconnect_streams_catch_up_on_what_was_committed_meanwhile(
    worker: Instance, pg_settings: Settings
) -> None:
    """Deterministic: the reconnect is held while the job's last events are committed,
    so no notification will ever announce them."""
    url = pg_settings.database_url
    gate = asyncio.Event()
    gate.set()
    attempts = asyncio.Event()
    wakes: list[float] = []

    async def connect(dsn: str, **options: Any) -> Any:
        attempts.set()
        await gate.wait()
        return await asyncpg.connect(dsn, **options)

    hub = ev.EventHub()
    listener = Listener(url, hub, origin="test", wake=lambda: wakes.append(0), connect=connect)
    await listener.start()
    try:
        assert listener.connected.is_set()
        job_id = await post(worker, voting(3, "fake?hang=1"))
        store = worker.state.store
        streamed: list[dict[str, Any]] = []
        lanes_started = asyncio.Event()

        async def follow() -> None:
            async for event in ev.stream(hub, job_id, 0, store.log.after, store.jobs.is_finished):
                streamed.append(event)
                if sum(e["type"] == "lane.started" for e in streamed) == 3:
                    lanes_started.set()

        stream = asyncio.create_task(follow())
        async with asyncio.timeout(10):
            await lanes_started.wait()

        gate.clear()
        attempts.clear()
        await kill_listener(url, "test")
        async with asyncio.timeout(10):
            await attempts.wait()  # the loss is noticed; reconnecting is held
        assert not listener.connected.is_set()
        wakes.clear()
        cancel = await worker.http.post(f"/v1/jobs/{job_id}/cancel")
        assert cancel.status_code == 202
        assert [e["type"] for e in streamed][-1] == "lane.started"  # nothing came through

        gate.set()
        async with asyncio.timeout(10):
            await stream
        assert [(e["seq"], e["type"], e["data"]) for e in streamed] == await stored_log(
            worker, job_id
        )
        assert streamed[-1]["type"] == "job.cancelled"
        assert listener.connections == 2
        assert wakes == [0]  # once, on reconnecting
    finally:
        await listener.stop()


@postgres
async def test_notifications_are_sent_on_commit_and_never_for_a_rollback(
    pg_settings: Settings,
) -> None:
    url = pg_settings.database_url
    received: asyncio.Queue[str] = asyncio.Queue()
    db = Database(url)
    async with admin(url) as conn:
        await conn.add_listener(EVENTS_CHANNEL, lambda *args: received.put_nowait(args[3]))
        try:
            with pytest.raises(RuntimeError):
                async with db.transaction() as tx:
                    tx.events.append(event("rolled-back", 1))
                    raise RuntimeError("roll back")
            async with db.transaction() as tx:
                tx.events.append(event("committed", 1))
            async with asyncio.timeout(5):
                payload = await received.get()
            assert json.loads(payload) == {"o": db.origin, "j": [["committed", 1, 1]]}
            assert received.empty()
        finally:
            await db.dispose()


@postgres
async def test_events_the_log_appends_are_stored_numbered_and_announced_only_on_commit(
    pg_settings: Settings,
) -> None:
    """The event log's last write (the events, the locked job's new last number and the
    notification, one statement on PostgreSQL) lands whole on commit, and not at all
    when the transaction rolls back."""
    url = pg_settings.database_url
    received: asyncio.Queue[str] = asyncio.Queue()
    db = Database(url)
    store = Store(db, lease_seconds=30)
    async with admin(url) as conn:
        await conn.add_listener(EVENTS_CHANNEL, lambda *args: received.put_nowait(args[3]))
        try:
            job, _ = await store.jobs.create(parse(voting(2)), "acme")
            async with asyncio.timeout(5):
                created = json.loads(await received.get())
            assert created == {"o": db.origin, "j": [[job.id, 1, 1]]}

            async def append(kinds: list[EventType], *, commit: bool) -> None:
                async with db.transaction() as tx:
                    await lock_jobs(tx, [job.id])
                    items: list[Item] = [(kind, {"lane": 0}) for kind in kinds]
                    await store.log.append(tx, job.id, items, time.time())
                    if not commit:
                        raise RuntimeError("roll back")

            with pytest.raises(RuntimeError):
                await append([EventType.LANE_RETRYING], commit=False)
            await append([EventType.LANE_STARTED, EventType.LANE_SUCCEEDED], commit=True)
            async with asyncio.timeout(5):
                appended = json.loads(await received.get())
            assert appended == {"o": db.origin, "j": [[job.id, 2, 3]]}
            assert received.empty()
            stored = await store.log.after(job.id, 0)
            assert [(e["seq"], e["type"]) for e in stored] == [
                (1, "job.queued"),
                (2, "lane.started"),
                (3, "lane.succeeded"),
            ]
            async with db.read() as read:
                last = await read.execute(
                    text("SELECT last_seq FROM jobs WHERE id = :j"), {"j": job.id}
                )
                assert last.scalar_one() == 3
        finally:
            await db.dispose()


@postgres
async def test_requests_go_on_after_postgres_drops_every_pooled_connection(
    worker: Instance, pg_settings: Settings
) -> None:
    """No ping per checkout: a connection whose server side went away is replaced
    when it is next taken from the pool, so no request or lane sees it."""
    url = pg_settings.database_url
    await worker.http.get("/v1/jobs")  # the pool holds connections now
    async with admin(url) as conn:
        killed = await conn.fetch(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            " AND application_name NOT LIKE 'fanout listener%'"
        )
    assert killed and all(row[0] for row in killed)
    await asyncio.sleep(0.1)  # let asyncpg read the closed sockets
    listing = await worker.http.get("/v1/jobs")
    assert listing.status_code == 200
    job_id = await post(worker, voting(3, "fake"))
    assert (await events_of(worker.http, job_id, timeout=10))[-1]["event"] == "job.succeeded"


@postgres
async def test_an_idle_connection_is_pinged_and_replaced_if_it_is_gone(
    pg_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past ``PING_AFTER_IDLE_S`` (here at once) a pooled connection is pinged before
    use: one whose backend was terminated a moment ago, before its client could
    notice, fails the ping and gives way to a new connection."""
    import service.store.db as db_module

    monkeypatch.setattr(db_module, "PING_AFTER_IDLE_S", 0.0)
    db = Database(pg_settings.database_url, pool_size=1)
    try:
        async with db.read() as conn:
            first = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar()
        async with admin(pg_settings.database_url) as other:
            assert await other.fetchval("SELECT pg_terminate_backend($1)", first)
        async with db.read() as conn:
            second = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar()
        assert second != first
    finally:
        await db.dispose()
