"""The database layer on its own: SQLite run on the event loop's thread."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import pytest
from sqlalchemy import text

from service.store import db as db_module
from service.store.db import Database, SqliteConnection


@pytest.fixture
async def db(sqlite_url: str) -> AsyncIterator[Database]:
    """A database with one table, ``t (v INTEGER)``."""
    db = Database(sqlite_url)
    try:
        async with db.transaction() as tx:
            await tx.conn.execute(text("CREATE TABLE t (v INTEGER)"))
        yield db
    finally:
        await db.dispose()


@contextmanager
def write_lock_held_elsewhere(sqlite_url: str) -> Iterator[threading.Event]:
    """Another connection holds the write lock, as `fanout migrate` or a sqlite3 shell
    would, until the event it yields is set (or the block ends)."""
    locked, release = threading.Event(), threading.Event()

    def hold() -> None:
        other = sqlite3.connect(sqlite_url.split(":///", 1)[1], isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        locked.set()
        release.wait(5)
        other.execute("COMMIT")
        other.close()

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert locked.wait(5)
        yield release
    finally:
        release.set()
        holder.join(10)


async def insert(db: Database, value: int) -> None:
    async with db.transaction() as tx:
        await tx.conn.execute(text("INSERT INTO t VALUES (:v)"), {"v": value})


async def stored(db: Database) -> list[int]:
    async with db.read() as conn:
        return list((await conn.execute(text("SELECT v FROM t"))).scalars().all())


async def test_a_write_waiting_for_another_process_lock_leaves_the_loop_free(
    db: Database, sqlite_url: str
) -> None:
    """Statements run on the loop's thread, but one that must wait for a lock that
    another process holds waits on the worker thread: the loop serves on meanwhile,
    and the write goes through once the lock is free."""
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    with write_lock_held_elsewhere(sqlite_url) as release:
        ticker = asyncio.create_task(tick())
        waiting = asyncio.create_task(insert(db, 1))
        await asyncio.sleep(0.3)
        assert not waiting.done()
        assert ticks >= 10  # the loop was not held while the write waited
        release.set()
        await asyncio.wait_for(waiting, 10)
        ticker.cancel()
    assert await stored(db) == [1]


async def test_a_write_cancelled_while_it_waits_for_the_lock_leaves_the_connection_sound(
    db: Database, sqlite_url: str
) -> None:
    """Cancelling a write that waits on the worker thread must not let the connection's
    cleanup run on the loop's thread while the worker still uses it (that crashes
    sqlite3): the cleanup queues behind, and the next write works."""
    with write_lock_held_elsewhere(sqlite_url) as release:
        waiting = asyncio.create_task(insert(db, 1))
        await asyncio.sleep(0.2)
        assert not waiting.done()
        waiting.cancel()
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(waiting, 10)
    await insert(db, 2)
    assert await stored(db) == [2]


async def test_statements_run_on_the_loops_thread(db: Database) -> None:
    """No hop to a worker thread per statement: a function the database calls back
    runs on the thread that awaits the statement."""
    threads: list[int] = []
    async with db.read() as conn:
        assert isinstance(conn, SqliteConnection)
        dbapi = conn.sync.connection.dbapi_connection
        assert dbapi is not None
        dbapi.create_function("where_am_i", 0, lambda: threads.append(threading.get_ident()) or 1)
        await conn.execute(text("SELECT where_am_i()"))
    assert threads == [threading.get_ident()]


async def test_a_transaction_tells_its_hooks_whether_it_committed(db: Database) -> None:
    seen: list[bool] = []
    async with db.transaction() as tx:
        tx.ended.append(seen.append)
        await tx.conn.execute(text("INSERT INTO t VALUES (1)"))
    with pytest.raises(RuntimeError):
        async with db.transaction() as tx:
            tx.ended.append(seen.append)
            await tx.conn.execute(text("INSERT INTO t VALUES (2)"))
            raise RuntimeError("rolled back")
    assert seen == [True, False]
    assert await stored(db) == [1]


async def test_the_wal_is_checkpointed_on_a_thread_not_in_a_commit(
    db: Database, sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commit never copies the log into the database on the loop's thread (SQLite's
    automatic checkpoint is off); the checkpointer's thread does, soon after."""
    monkeypatch.setattr(db_module, "CHECKPOINT_EVERY_S", 0.0)
    async with db.transaction() as tx:
        assert (await tx.conn.execute(text("PRAGMA wal_autocheckpoint"))).scalar() == 0
        await tx.conn.execute(text("INSERT INTO t VALUES (:v)"), [{"v": v} for v in range(3000)])
    async with asyncio.timeout(10):
        while not db.checkpointer.done:
            await asyncio.sleep(0.01)
    # The database file on its own, without its log, now holds every row.
    alone = tmp_path / "alone.db"
    shutil.copyfile(sqlite_url.split(":///", 1)[1], alone)
    with closing(sqlite3.connect(alone)) as copy:
        assert copy.execute("SELECT count(*) FROM t").fetchone() == (3000,)
