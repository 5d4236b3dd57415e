"""Engines, connections and the transaction boundary.

Every write goes through :meth:`Database.transaction`. Events appended inside a
transaction are handed to ``on_commit`` only after the commit succeeded, so a
subscriber never sees an event that the database does not have.

SQLite allows one writer at a time. Rather than let connections race for the
file lock (and fail with "database is locked" under load), all writes share one
connection (a pool of size one queues them in order) and open with
``BEGIN IMMEDIATE``; reads use their own pool and never block on writes in WAL
mode. PostgreSQL uses one pool for both.

SQLite statements run on the event loop's own thread (:class:`InlineSqlite`), not on
aiosqlite's worker thread: a statement on a local file takes tens of microseconds,
and handing each one to a thread and back cost about seven times that (measured:
210 µs against 28 µs per indexed select). Nothing here waits on a lock either: the
process is SQLite's only writer and WAL readers never block. What can still stall
the loop is a WAL checkpoint's sync, a few milliseconds every thousand pages.

On PostgreSQL a transaction that appended events also notifies other processes
(:mod:`service.notify`): the ``pg_notify`` calls run just before the commit, so
PostgreSQL delivers them exactly when, and only if, the transaction commits.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any
from uuid import uuid4

import aiosqlite
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import Select, event, make_url, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from .. import notify


@dataclass
class Tx:
    """An open write transaction and the events it appended (published on commit)."""

    conn: AsyncConnection
    is_sqlite: bool
    events: list[dict[str, Any]] = field(default_factory=list)

    def locking(self, query: Select[Any], *, skip_locked: bool = False) -> Select[Any]:
        """``query`` with ``FOR UPDATE`` (``SKIP LOCKED``) on PostgreSQL. SQLite has one
        writer: a write transaction (``BEGIN IMMEDIATE``) holds every row already."""
        if self.is_sqlite:
            return query
        return query.with_for_update(skip_locked=skip_locked)


# How long a statement waits for another process's lock (on the worker thread).
BUSY_TIMEOUT_MS = 30_000


class InlineSqlite(aiosqlite.Connection):
    """aiosqlite's connection without the thread hop: each ``sqlite3`` call runs at once
    on the calling (event loop) thread. The worker thread still opens the connection,
    and waits on locks (below); ``check_same_thread`` is off, as SQLAlchemy sets it
    for aiosqlite.

    The connection's own busy timeout is 0, so a call never waits for a lock on the
    loop's thread. The lock only another process can hold (``fanout migrate``, a
    ``sqlite3`` shell; this process has one writer) makes the call fail at once with
    "database is locked": it is then made again on the worker thread, which waits up
    to ``BUSY_TIMEOUT_MS`` while the loop serves everything else. Until the worker is
    done with it (even if its caller was cancelled meanwhile), every later call on
    the connection queues behind it on the worker too: ``sqlite3`` must never be in
    two threads at once on one connection.
    """

    _on_worker = 0  # calls handed to the worker thread and not finished yet

    async def _execute(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if not self._running or not self._connection:
            raise ValueError("Connection closed")
        if self._on_worker:
            call = partial(fn, *args, **kwargs)
        else:
            try:
                return fn(*args, **kwargs)
            except sqlite3.OperationalError as exc:
                if getattr(exc, "sqlite_errorcode", 0) & 0xFF != sqlite3.SQLITE_BUSY:
                    raise
            call = partial(self._waiting, partial(fn, *args, **kwargs))
        self._on_worker += 1
        loop = asyncio.get_running_loop()
        return await super()._execute(self._on_the_worker, loop, call)  # type: ignore[no-untyped-call]

    def _on_the_worker(self, loop: asyncio.AbstractEventLoop, call: Callable[[], Any]) -> Any:
        try:
            return call()
        finally:
            loop.call_soon_threadsafe(self._worker_done)  # counted on the loop's thread

    def _worker_done(self) -> None:
        self._on_worker -= 1

    def _waiting(self, call: Callable[[], Any]) -> Any:
        connection = self._conn
        connection.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        try:
            return call()
        finally:
            connection.execute("PRAGMA busy_timeout=0")


def _inline_sqlite(url: str) -> Callable[[], InlineSqlite]:
    """An ``async_creator`` that opens the database ``url`` names as SQLAlchemy would."""
    parsed = make_url(url)
    args, kwargs = parsed.get_dialect()().create_connect_args(parsed)
    kwargs["check_same_thread"] = False
    kwargs["timeout"] = 0  # the busy timeout: never wait on the loop (see InlineSqlite)

    def creator() -> InlineSqlite:
        connection = InlineSqlite(partial(sqlite3.connect, *args, **kwargs), iter_chunk_size=64)
        connection._thread.daemon = True  # as SQLAlchemy does for aiosqlite's own
        return connection

    return creator


def _sqlite_engine(url: str, *, pool_size: int, begin: str) -> AsyncEngine:
    engine = create_async_engine(
        url,
        pool_size=pool_size,
        max_overflow=0,
        pool_timeout=120,
        pool_pre_ping=False,
        async_creator=_inline_sqlite(url),
    )

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take BEGIN away from the driver so we can choose IMMEDIATE for writers.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql(begin)

    return engine


POSTGRES_SESSION = {"lock_timeout": "15s", "idle_in_transaction_session_timeout": "60s"}
# A pooled PostgreSQL connection idle longer than this is pinged before use.
PING_AFTER_IDLE_S = 10.0


def _postgres_engine(url: str, *, pool_size: int) -> AsyncEngine:
    """A pool that hands out only live connections, without a round trip per checkout.

    SQLAlchemy's ``pool_pre_ping`` pings on every checkout: three round trips (BEGIN,
    a no-op, ROLLBACK) before each transaction, a tenth of the service's CPU under
    load. Instead a connection whose socket asyncpg saw close (a restarted server, a
    terminated backend) is replaced at once, and one that sat idle long enough for a
    silent network failure is pinged first. Raising ``DisconnectionError`` at checkout
    makes the pool drop that connection and hand out another.
    """
    engine = create_async_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        # A transaction left open (a stuck or vanished client) never blocks the
        # others for long: lock waits and idle transactions are bounded.
        connect_args={"server_settings": POSTGRES_SESSION},
    )
    dialect = engine.dialect

    @event.listens_for(engine.sync_engine, "checkin")
    def _on_checkin(_dbapi_connection: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine.sync_engine, "checkout")
    def _on_checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        if dbapi_connection.driver_connection.is_closed():
            raise DisconnectionError("the server closed this connection")
        idle_since = record.info.get("idle_since")
        if idle_since is not None and time.monotonic() - idle_since > PING_AFTER_IDLE_S:
            try:
                dialect.do_ping(dbapi_connection)
            except Exception as exc:
                raise DisconnectionError(f"an idle connection failed its ping: {exc}") from exc

    return engine


class Database:
    def __init__(self, url: str, *, pool_size: int = 10) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        if self.is_sqlite:
            self.writer = _sqlite_engine(url, pool_size=1, begin="BEGIN IMMEDIATE")
            self.reader = _sqlite_engine(url, pool_size=pool_size, begin="BEGIN")
        else:
            self.writer = _postgres_engine(url, pool_size=pool_size)
            self.reader = self.writer
        # Names this process in its notifications, so that it can skip its own.
        self.origin = uuid4().hex[:12]
        self.on_commit: Callable[[list[dict[str, Any]]], None] = lambda _events: None

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Tx]:
        async with self.writer.begin() as conn:
            tx = Tx(conn, self.is_sqlite)
            yield tx
            if tx.events and not self.is_sqlite:
                await _notify(conn, notify.notifications(self.origin, tx.events))
        if tx.events:
            self.on_commit(tx.events)

    async def notify(self, notes: list[tuple[str, str]]) -> None:
        """Send notifications now, outside any write (PostgreSQL only)."""
        if notes:
            async with self.writer.begin() as conn:
                await _notify(conn, notes)

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        async with self.reader.connect() as conn:
            yield conn

    async def dispose(self) -> None:
        await self.writer.dispose()
        if self.reader is not self.writer:
            await self.reader.dispose()


async def _notify(conn: AsyncConnection, notes: list[tuple[str, str]]) -> None:
    """Queue the notifications in one round trip; PostgreSQL sends them on commit."""
    calls = ", ".join(f"pg_notify(:c{i}, :p{i})" for i in range(len(notes)))
    params: dict[str, str] = {}
    for i, (channel, payload) in enumerate(notes):
        params[f"c{i}"] = channel
        params[f"p{i}"] = payload
    await conn.execute(text(f"SELECT {calls}"), params)


# --- migrations ----------------------------------------------------------------------


def migrations_dir() -> Path:
    """Shipped inside the package when installed from a wheel; the repo's folder otherwise."""
    package = Path(__file__).parent.parent
    packaged = package / "migrations"
    return packaged if packaged.is_dir() else package.parent / "migrations"


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    config.attributes["url"] = url
    return config


def upgrade(url: str) -> None:
    """Apply every migration (blocking: Alembic runs its own event loop in this thread)."""
    command.upgrade(alembic_config(url), "head")


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config("")).get_current_head()
