"""The database layer on its own: SQLite run on the event loop's thread."""

from __future__ import annotations

import asyncio
import sqlite3
import threading

import pytest
from sqlalchemy import text

from service.db import Database


async def test_a_write_waiting_for_another_process_lock_leaves_the_loop_free(
    sqlite_url: str,
) -> None:
    """Statements run on the loop's thread, but one that must wait for a lock that
    another process holds waits on the worker thread: the loop serves on meanwhile,
    and the write goes through once the lock is free."""
    db = Database(sqlite_url)
    locked, release = threading.Event(), threading.Event()

    def hold_the_write_lock() -> None:  # as `fanout migrate` or a sqlite3 shell would
        other = sqlite3.connect(sqlite_url.split(":///", 1)[1], isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        locked.set()
        release.wait(5)
        other.execute("COMMIT")
        other.close()

    async def write() -> None:
        async with db.transaction() as tx:
            await tx.conn.execute(text("INSERT INTO t VALUES (1)"))

    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    holder = threading.Thread(target=hold_the_write_lock)
    try:
        async with db.transaction() as tx:
            await tx.conn.execute(text("CREATE TABLE t (v INTEGER)"))
        holder.start()
        assert locked.wait(5)
        ticker = asyncio.create_task(tick())
        waiting = asyncio.create_task(write())
        await asyncio.sleep(0.3)
        assert not waiting.done()
        assert ticks >= 10  # the loop was not held while the write waited
        release.set()
        await asyncio.wait_for(waiting, 10)
        ticker.cancel()
        async with db.read() as conn:
            assert (await conn.execute(text("SELECT v FROM t"))).scalars().all() == [1]
    finally:
        release.set()
        if holder.is_alive():
            holder.join(10)
        await db.dispose()


async def test_statements_run_on_the_loops_thread(sqlite_url: str) -> None:
    """No hop to a worker thread per statement: a function the database calls back
    runs on the thread that awaits the statement."""
    db = Database(sqlite_url)
    threads: list[int] = []
    try:
        async with db.read() as conn:
            raw = await conn.get_raw_connection()
            raw.driver_connection._conn.create_function(
                "where_am_i", 0, lambda: threads.append(threading.get_ident()) or 1
            )
            await conn.execute(text("SELECT where_am_i()"))
    finally:
        await db.dispose()
    assert threads == [threading.get_ident()]


async def test_a_write_cancelled_while_it_waits_for_the_lock_leaves_the_connection_sound(
    sqlite_url: str,
) -> None:
    """Cancelling a write that waits on the worker thread must not let the connection's
    cleanup run on the loop's thread while the worker still uses it (that crashes
    sqlite3): the cleanup queues behind, and the next write works."""
    db = Database(sqlite_url)
    locked, release = threading.Event(), threading.Event()

    def hold_the_write_lock() -> None:
        other = sqlite3.connect(sqlite_url.split(":///", 1)[1], isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        locked.set()
        release.wait(5)
        other.execute("COMMIT")
        other.close()

    async def write(value: int) -> None:
        async with db.transaction() as tx:
            await tx.conn.execute(text("INSERT INTO t VALUES (:v)"), {"v": value})

    holder = threading.Thread(target=hold_the_write_lock)
    try:
        async with db.transaction() as tx:
            await tx.conn.execute(text("CREATE TABLE t (v INTEGER)"))
        holder.start()
        assert locked.wait(5)
        waiting = asyncio.create_task(write(1))
        await asyncio.sleep(0.2)
        assert not waiting.done()
        waiting.cancel()
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(waiting, 10)
        await write(2)
        async with db.read() as conn:
            assert (await conn.execute(text("SELECT v FROM t"))).scalars().all() == [2]
    finally:
        release.set()
        if holder.is_alive():
            holder.join(10)
        await db.dispose()
