"""Engines, connections and the transaction boundary.

Every write goes through :meth:`Database.transaction`. Events appended inside a
transaction are handed to ``on_commit`` only after the commit succeeded, so a
subscriber never sees an event that the database does not have.

SQLite allows one writer at a time. Rather than let connections race for the
file lock (and fail with "database is locked" under load), writes take turns on one
connection and open with ``BEGIN IMMEDIATE``; reads use their own pool and never
block on writes in WAL mode. PostgreSQL's writes use SQLAlchemy's pool; its reads, a pool
of the driver's own connections (:class:`ReadPool`).

SQLite statements run on the event loop's own thread, through SQLAlchemy's
synchronous engine (:class:`SqliteConnection`): a statement on a local file takes
tens of microseconds, less than handing it to a thread and back, or than SQLAlchemy's
asyncio layer around it. Nothing here waits on a lock either: the process is
SQLite's only writer and WAL readers never block. Nor does a WAL checkpoint (copying
the log back into the database, and its syncs: about 12 ms every thousand pages on the
benchmark's machine), which SQLite would make in the commit that fills the log: a
thread of its own makes them (:class:`Checkpointer`).

On PostgreSQL a transaction that appended events also notifies other processes
(:mod:`service.notify`): the ``pg_notify`` calls run in its last statement before the
commit (with its events: :data:`~service.store.statements.CLOSE`), so PostgreSQL
delivers them exactly when, and only if, the transaction commits.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Protocol, TypeVar
from uuid import uuid4

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import (
    Engine,
    Executable,
    Select,
    create_engine,
    event,
    make_url,
)
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.exc import DisconnectionError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from .. import notify
from ..events import store_json
from .direct import Fetched, Plan, Plans, Rows, result_processors


@dataclass
class Tx:
    """An open write transaction and the events it appended (published on commit);
    ``before_commit``: writes to make last (in order); ``ended``: what to call, with
    whether it committed, when it is over.

    ``seqs`` and ``unwritten`` are the event log's: the last event number of each job
    this transaction locked or appended to, as the transaction has it (so numbering
    events takes no statement), and the events not written yet (one insert for all).
    ``notes``: on PostgreSQL, the notifications announcing the events, once they are
    all appended (before the ``before_commit`` writes); a write that sends them takes
    them, and the transaction sends what is left just before its commit."""

    conn: Conn
    is_sqlite: bool
    events: list[dict[str, Any]] = field(default_factory=list)
    before_commit: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    ended: list[Callable[[bool], None]] = field(default_factory=list)
    seqs: dict[str, int] = field(default_factory=dict)
    seqs_moved: set[str] = field(default_factory=set)  # (their rows still to update)
    unwritten: list[dict[str, Any]] = field(default_factory=list)
    notes: list[tuple[str, str]] = field(default_factory=list)

    @property
    def binds_arrays(self) -> bool:
        """Whether many rows go in one statement, a column's values bound as one array
        (PostgreSQL: :func:`~service.store.statements.executing`); SQLite runs the
        statement a row at a time (executemany), in process, where that is cheap."""
        return not self.is_sqlite

    def locking(self, query: Select[Any], *, skip_locked: bool = False) -> Select[Any]:
        """``query`` with ``FOR UPDATE`` (``SKIP LOCKED``) on PostgreSQL. SQLite has one
        writer: a write transaction (``BEGIN IMMEDIATE``) holds every row already."""
        if self.is_sqlite:
            return query
        return query.with_for_update(skip_locked=skip_locked)


log = logging.getLogger("fanout.store")

# How long a statement waits for another process's lock (on the worker thread).
BUSY_TIMEOUT_MS = 30_000


T = TypeVar("T")


class Conn(Protocol):
    """What the store asks of a connection: :class:`SqliteConnection` or
    :class:`PostgresConnection` (statements marked direct run on the driver,
    :mod:`service.store.direct`; the others through SQLAlchemy)."""

    async def execute(self, statement: Executable, parameters: Any = None) -> Rows: ...

    async def run_sync(self, fn: Callable[[Connection], T]) -> T: ...


def _busy(exc: OperationalError | sqlite3.OperationalError) -> bool:
    error = exc.orig if isinstance(exc, OperationalError) else exc
    return getattr(error, "sqlite_errorcode", 0) & 0xFF == sqlite3.SQLITE_BUSY


# How SQLite transactions begin: a writer takes the write lock at once (so two never
# deadlock upgrading read locks); a reader's snapshot starts at its first read.
WRITE, READ = "BEGIN IMMEDIATE", "BEGIN"


class SqliteConnection:
    """A SQLAlchemy connection (the synchronous ``pysqlite`` dialect) driven from the
    event loop: each call runs at once on the loop's thread.

    A statement on a local file takes tens of microseconds; SQLAlchemy's asyncio
    layer (a greenlet per statement, aiosqlite's cursor proxies) cost several times
    that, and a transaction with one update took 730 µs against 128 µs this way.
    Nothing here waits on a lock: the process is SQLite's only writer (its writes take
    turns, :meth:`Database.transaction`) and WAL readers never block.

    The connection's busy timeout is 0, so a call never waits for a lock on the loop's
    thread. The lock only another process can hold (``fanout migrate``, a ``sqlite3``
    shell) makes the call fail at once with "database is locked": it is then made again
    on a worker thread, which waits up to ``BUSY_TIMEOUT_MS`` while the loop serves
    everything else. Until the worker is done with it (even if its caller was cancelled
    meanwhile), every later call on the connection queues behind it on the worker too:
    ``sqlite3`` must never be in two threads at once on one connection.
    """

    def __init__(self, conn: Connection, plans: Plans) -> None:
        self.sync = conn
        self.plans = plans
        self.driver: sqlite3.Connection = conn.connection.dbapi_connection  # type: ignore[assignment]
        self._worker: ThreadPoolExecutor | None = None
        self._on_worker = 0  # calls handed to the worker and not finished yet

    async def execute(self, statement: Executable, parameters: Any = None) -> Rows:
        plan = self.plans.get(statement, parameters)
        if plan is not None:
            fetched: Fetched = await self._call(self._direct, plan, parameters)
            return fetched
        result: Rows = await self._call(self.sync.execute, statement, parameters)
        return result

    def _direct(self, plan: Plan, parameters: Any) -> Fetched:
        if isinstance(parameters, list):
            cursor = self.driver.executemany(plan.sql, [plan.bind(p) for p in parameters])
        else:
            cursor = self.driver.execute(plan.sql, plan.bind(parameters or {}))
        rows = plan.rows(cursor.fetchall()) if plan.columns else []
        return Fetched(plan.columns, rows, cursor.rowcount)

    async def run_sync(self, fn: Callable[[Connection], T]) -> T:
        """``fn(connection)`` on the synchronous connection (as AsyncConnection's)."""
        result: T = await self._call(fn, self.sync)
        return result

    async def commit(self) -> None:
        await self._call(self.driver.commit)

    async def close(self) -> None:
        """Roll back what is open and give the connection back to its pool, after the
        worker's calls (:meth:`close_now` when there are none)."""
        try:
            await self._call(self.sync.close)
        finally:
            if self._worker is not None:
                self._worker.shutdown(wait=False)

    def close_now(self) -> None:
        """:meth:`close` at once: only when no call is on the worker."""
        try:
            self.sync.close()
        finally:
            if self._worker is not None:
                self._worker.shutdown(wait=False)

    async def begin(self, sql: str) -> None:
        """Open the transaction (``BEGIN ...``; SQLAlchemy's own begin is a no-op on
        this driver, so every statement after this one is inside it)."""
        await self._call(self.driver.execute, sql)

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._on_worker:
            call = partial(fn, *args)
        else:
            try:
                return fn(*args)
            except (OperationalError, sqlite3.OperationalError) as exc:
                if not _busy(exc):
                    raise
            call = partial(self._waiting, partial(fn, *args))
        if self._worker is None:
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="sqlite-wait")
        loop = asyncio.get_running_loop()
        self._on_worker += 1
        done = self._worker.submit(call)
        done.add_done_callback(lambda _f: _on_loop(loop, self._worker_done))
        return await asyncio.wrap_future(done)

    def _worker_done(self) -> None:
        self._on_worker -= 1

    @property
    def on_worker(self) -> bool:
        """Whether a call is on the lock-waiting worker (until it is, calls queue there)."""
        return self._on_worker > 0

    def _waiting(self, call: Callable[[], Any]) -> Any:
        self.driver.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        try:
            return call()
        finally:
            self.driver.execute("PRAGMA busy_timeout=0")


class PostgresConnection:
    """A write transaction on PostgreSQL: SQLAlchemy's ``AsyncConnection``, with
    statements marked direct run on its ``asyncpg`` connection, in the same
    transaction. (A read is a :class:`PostgresRead`.)"""

    def __init__(self, conn: AsyncConnection, plans: Plans) -> None:
        self.conn = conn
        self.plans = plans
        self._adapted: Any = None  # SQLAlchemy's adapter of the asyncpg connection

    async def execute(self, statement: Executable, parameters: Any = None) -> Rows:
        plan = self.plans.get(statement, parameters)
        if plan is None:
            return await self.conn.execute(statement, parameters)
        return await _run_plan(await self.driver(), plan, parameters, self.conn.dialect)

    async def run_sync(self, fn: Callable[[Connection], T]) -> T:
        return await self.conn.run_sync(fn)

    async def driver(self) -> Any:
        """The asyncpg connection, in the transaction SQLAlchemy opened: its adapter
        sends ``BEGIN`` only before its first statement, so it is sent here if none ran.
        (``_transaction``, ``_execute_mutex`` and ``_start_transaction`` are the
        adapter's own, in the SQLAlchemy versions pyproject allows; a test that rolls
        back a direct write shows they still do this.)"""
        adapted = self._adapted
        if adapted is None:
            adapted = self._adapted = (await self.conn.get_raw_connection()).dbapi_connection
        if adapted._transaction is None:
            async with adapted._execute_mutex:
                if adapted._transaction is None:
                    await adapted._start_transaction()
        return adapted.driver_connection


async def _run_plan(driver: Any, plan: Plan, parameters: Any, dialect: Dialect) -> Fetched:
    """A direct statement on an ``asyncpg`` connection."""
    if isinstance(parameters, list):
        await driver.executemany(plan.sql, [plan.bind(p) for p in parameters])
        return Fetched(plan.columns, [], -1)
    args = plan.bind(parameters or {})
    if not plan.columns:
        status = await driver.execute(plan.sql, *args)
        count = status.rsplit(" ", 1)[-1]
        return Fetched(plan.columns, [], int(count) if count.isdigit() else -1)
    if plan.results is None:
        prepared = await driver.prepare(plan.sql)
        oids = [attribute.type.oid for attribute in prepared.get_attributes()]
        plan.results = result_processors(plan, dialect, oids)
    rows = await driver.fetch(plan.sql, *args)
    return Fetched(plan.columns, plan.rows(rows), len(rows))


class PostgresRead:
    """A read on PostgreSQL: statements marked direct run, each on its own (under READ
    COMMITTED each sees its own snapshot either way: no ``BEGIN``, no ``ROLLBACK``), on
    a connection of the driver's own pool (:class:`ReadPool`), without SQLAlchemy's
    checkout and its greenlet; any other statement on a SQLAlchemy connection taken
    when the first one comes."""

    def __init__(self, driver: Any, plans: Plans, engine: AsyncEngine) -> None:
        self.driver = driver
        self.plans = plans
        self.engine = engine
        self._conn: AsyncConnection | None = None

    async def execute(self, statement: Executable, parameters: Any = None) -> Rows:
        plan = self.plans.get(statement, parameters)
        if plan is None:
            return await (await self.sqlalchemy()).execute(statement, parameters)
        return await _run_plan(self.driver, plan, parameters, self.engine.dialect)

    async def run_sync(self, fn: Callable[[Connection], T]) -> T:
        return await (await self.sqlalchemy()).run_sync(fn)

    async def sqlalchemy(self) -> AsyncConnection:
        """The SQLAlchemy connection of this read (taken now if it was not)."""
        if self._conn is None:
            self._conn = await self.engine.connect()
        return self._conn

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()


class ReadPool:
    """The driver's own connections for reads (:class:`PostgresRead`), opened as they
    are needed, up to ``size``: a read through SQLAlchemy's pool cost about 240 µs of
    CPU more than asyncpg's own (its checkout and checkin, through a greenlet). They
    decode JSON with SQLAlchemy's own codecs (the direct statements' result processors
    expect them), one idle for ``PING_AFTER_IDLE_S`` is closed rather than trusted, and
    one given back is not reset (a read changes nothing a reset would undo)."""

    def __init__(self, engine: AsyncEngine, size: int) -> None:
        self.engine = engine
        self.size = size
        self._pool: Any = None
        self._opening = asyncio.Lock()

    async def acquire(self) -> Any:
        if self._pool is None:
            async with self._opening:
                if self._pool is None:
                    self._pool = await self._open()
        return self._pool.acquire()

    async def _open(self) -> Any:
        import asyncpg  # type: ignore[import-untyped]

        _args, kwargs = self.engine.dialect.create_connect_args(self.engine.url)
        kwargs.pop("prepared_statement_cache_size", None)
        kwargs.pop("prepared_statement_name_func", None)
        kwargs["server_settings"] = POSTGRES_SESSION
        return await asyncpg.create_pool(
            **kwargs,
            min_size=0,
            max_size=self.size,
            max_inactive_connection_lifetime=PING_AFTER_IDLE_S,
            init=partial(_json_codecs, self.engine.dialect),
            reset=_nothing_to_reset,
        )

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()


async def _nothing_to_reset(_conn: Any) -> None:
    """A read leaves no session state behind (no ``SET``, ``LISTEN``, advisory lock or
    cursor), so a connection goes back to the pool without asyncpg's reset query (a
    round trip: ``RESET ALL`` and the rest); a transaction left open is still rolled
    back (asyncpg does that first)."""


async def _json_codecs(dialect: Any, conn: Any) -> None:
    """JSON and JSONB decoded as on SQLAlchemy's connections: its asyncpg dialect's own
    set-up (documented hooks, run for each of its new connections), handed the
    driver's connection as its adapter holds it (``_connection``)."""
    adapted = SimpleNamespace(_connection=conn)
    await dialect.setup_asyncpg_json_codec(adapted)
    await dialect.setup_asyncpg_jsonb_codec(adapted)


def _on_loop(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
    """Run ``callback`` on ``loop``'s thread (from a worker), unless the loop has closed."""
    with suppress(RuntimeError):
        loop.call_soon_threadsafe(callback)


async def _finally(release: Callable[[], Awaitable[None]], then: Callable[[], None]) -> None:
    """``release()``, then ``then()``, even when the caller is cancelled meanwhile:
    ``then`` waits for ``release`` to be done (a connection is free only then)."""
    task = asyncio.ensure_future(release())
    task.add_done_callback(lambda _t: then())
    await asyncio.shield(task)


def _sqlite_engine(url: str, *, pool_size: int) -> Engine:
    """A synchronous engine on the file ``url`` names (``sqlite+aiosqlite://`` or
    ``sqlite://``), driven by :class:`SqliteConnection`."""
    engine = create_engine(
        make_url(url).set(drivername="sqlite"),
        pool_size=pool_size,
        max_overflow=0,
        pool_pre_ping=False,
        # The busy timeout: never wait on the loop (see SqliteConnection).
        connect_args={"check_same_thread": False, "timeout": 0},
        json_serializer=store_json,
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take BEGIN away from the driver: SqliteConnection.begin says which.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA wal_autocheckpoint=0")  # a thread makes them: Checkpointer
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

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
        # Twice the pool's size, and no overflow: a connection opened for a burst stays
        # for the next one (an overflow connection is closed when given back, and the
        # next burst opened it again, prepared its statements and read its types).
        pool_size=2 * pool_size,
        max_overflow=0,
        # A transaction left open (a stuck or vanished client) never blocks the
        # others for long: lock waits and idle transactions are bounded.
        connect_args={"server_settings": POSTGRES_SESSION},
        json_serializer=store_json,
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


# How often the WAL is checkpointed while writes go on (SQLite's own default is at
# every thousand pages, about 4 MB, which a big job's writes fill again and again).
CHECKPOINT_EVERY_S = 0.5


class Checkpointer:
    """Checkpoints a SQLite database's WAL on a thread of its own, never in a commit.

    The service's connections turn SQLite's automatic checkpoint off: it would run in
    the commit that fills the log, on the event loop's thread, and stall every lane
    for its copy and syncs. Instead, a commit at least ``CHECKPOINT_EVERY_S`` after the
    last checkpoint starts a passive one here, on a connection of its own: it copies
    what no reader still needs, waits for no lock, and the writer goes on meanwhile
    (the ``sqlite3`` module lets go of the GIL while SQLite works)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.done = 0  # checkpoints made
        self._conn: sqlite3.Connection | None = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="sqlite-checkpoint")
        self._running: asyncio.Future[None] | None = None
        self._last = time.monotonic()

    def after_commit(self) -> None:
        if self._running is not None or time.monotonic() - self._last < CHECKPOINT_EVERY_S:
            return
        self._running = asyncio.get_running_loop().run_in_executor(self._thread, self._checkpoint)
        self._running.add_done_callback(self._finished)

    def _checkpoint(self) -> None:
        if self._conn is None:
            self._conn = sqlite3.connect(self.path, timeout=0, check_same_thread=False)
        self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    def _finished(self, done: asyncio.Future[None]) -> None:
        self._running = None
        self._last = time.monotonic()
        if done.cancelled():
            return
        if done.exception() is not None:
            # The next one tries again; SQLite checkpoints the rest as it closes.
            log.warning("WAL checkpoint failed: %s", done.exception())
        else:
            self.done += 1

    async def close(self) -> None:
        if self._running is not None:
            with suppress(Exception):
                await self._running
        if self._conn is not None:
            await asyncio.get_running_loop().run_in_executor(self._thread, self._conn.close)
        self._thread.shutdown(wait=False)


class Database:
    def __init__(self, url: str, *, pool_size: int = 10) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        self.writer: Engine | AsyncEngine
        self.reader: Engine | AsyncEngine
        if self.is_sqlite:
            # One writer at a time, in turn; readers up to the pool's size.
            self.writer = _sqlite_engine(url, pool_size=1)
            self.reader = _sqlite_engine(url, pool_size=pool_size)
            self._writing = asyncio.Lock()
            self._reading = asyncio.Semaphore(pool_size)
            self.checkpointer = Checkpointer(str(make_url(url).database))
        else:
            self.writer = self.reader = _postgres_engine(url, pool_size=pool_size)
            self.reads = ReadPool(self.reader, pool_size)
        self.plans = Plans(self.writer.dialect)
        # Names this process in its notifications, so that it can skip its own.
        self.origin = uuid4().hex[:12]
        self.on_commit: Callable[[list[dict[str, Any]]], None] = lambda _events: None

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Tx]:
        tx: Tx | None = None
        committed = False
        try:
            if isinstance(self.writer, Engine):
                async with _sqlite_connection(
                    self.writer, self.plans, self._writing, WRITE
                ) as sqlite:
                    tx = Tx(sqlite, True)
                    yield tx
                    for write in tx.before_commit:
                        await write()
                    await sqlite.commit()
                    committed = True
                    self._committed(tx)
                self.checkpointer.after_commit()
            else:
                async with self.writer.begin() as conn:
                    postgres = PostgresConnection(conn, self.plans)
                    tx = Tx(postgres, False)
                    yield tx
                    if tx.events:
                        tx.notes = notify.notifications(self.origin, tx.events)
                    for write in tx.before_commit:
                        await write()
                    if tx.notes:
                        await _notify(postgres, tx.notes)
                committed = True
                self._committed(tx)
        finally:
            for hook in tx.ended if tx is not None else ():
                hook(committed)

    def _committed(self, tx: Tx) -> None:
        if tx.events:
            self.on_commit(tx.events)

    async def notify(self, notes: list[tuple[str, str]]) -> None:
        """Send notifications now, outside any write (PostgreSQL only)."""
        if notes and isinstance(self.writer, AsyncEngine):
            async with self.writer.begin() as conn:
                await _notify(PostgresConnection(conn, self.plans), notes)

    @asynccontextmanager
    async def read(self) -> AsyncIterator[Conn]:
        if isinstance(self.reader, Engine):
            async with _sqlite_connection(self.reader, self.plans, self._reading, READ) as sqlite:
                yield sqlite
        else:
            async with await self.reads.acquire() as driver:
                read = PostgresRead(driver, self.plans, self.reader)
                try:
                    yield read
                finally:
                    await read.close()

    def sync_engine(self, engine: Engine | AsyncEngine) -> Engine:
        """The synchronous engine behind ``writer`` or ``reader`` (for event listeners)."""
        return engine if isinstance(engine, Engine) else engine.sync_engine

    async def dispose(self) -> None:
        if self.is_sqlite:
            await self.checkpointer.close()
        else:
            await self.reads.close()
        for engine in {self.writer, self.reader}:
            if isinstance(engine, Engine):
                engine.dispose()
            else:
                await engine.dispose()


@asynccontextmanager
async def _sqlite_connection(
    engine: Engine, plans: Plans, slots: asyncio.Lock | asyncio.Semaphore, begin: str
) -> AsyncIterator[SqliteConnection]:
    """A connection of ``engine``'s pool in a transaction opened with ``begin``, while
    holding one of ``slots`` (so that taking it never blocks); given back, rolled back
    if left open, before the slot is."""
    await slots.acquire()
    try:
        sqlite = SqliteConnection(engine.connect(), plans)
    except BaseException:
        slots.release()
        raise
    try:
        await sqlite.begin(begin)
        yield sqlite
    finally:
        if sqlite.on_worker:
            await _finally(sqlite.close, slots.release)
        else:  # at once: no task to wait for
            try:
                sqlite.close_now()
            finally:
                slots.release()


async def _notify(conn: PostgresConnection, notes: list[tuple[str, str]]) -> None:
    """Queue the notifications in one round trip; PostgreSQL sends them on commit."""
    calls = ", ".join(f"pg_notify(${2 * i + 1}, ${2 * i + 2})" for i in range(len(notes)))
    driver = await conn.driver()
    await driver.execute(f"SELECT {calls}", *(part for note in notes for part in note))


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
