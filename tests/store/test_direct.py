"""Statements run on the driver's connection (:mod:`service.store.direct`) store and read
exactly what SQLAlchemy's ``execute`` of the same statement does."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from sqlalchemy import Executable, select
from sqlalchemy.ext.asyncio import AsyncEngine

from service.store import Store
from service.store.db import Conn, Database, PostgresRead, SqliteConnection
from service.store.direct import Fetched
from service.store.statements import (
    DEADLINES_PASSED,
    EVENTS_AFTER,
    INSERT_JOB,
    JOB,
    JOB_LANES,
    JOB_STATUS,
    LANE_RESULTS,
    LANES_RECORDED,
    LEASES_EXPIRED,
    LOCK_JOBS,
    NEXT_QUEUED_AT,
    NEXT_REDUCER_AT,
    TALLY,
    TALLY_VOTES,
    TENANTS_JOB,
)
from service.store.tables import jobs
from tests.store.conftest import OWNER, parse
from tests.store.test_outcomes import answered
from tests.support import voting


async def through_sqlalchemy(conn: Conn, statement: Executable, params: Any) -> Any:
    """The same statement run by SQLAlchemy on the same connection and transaction."""
    if isinstance(conn, SqliteConnection):
        return conn.sync.execute(statement, params)
    if isinstance(conn, PostgresRead):
        return await (await conn.sqlalchemy()).execute(statement, params)
    return await conn.conn.execute(statement, params)  # type: ignore[attr-defined]


def a_job(job_id: str) -> dict[str, Any]:
    """A job row as a caller writes it: the counters left to their column defaults."""
    return {
        "id": job_id,
        "tenant": "acme",
        "status": "queued",
        "mode": "voting",
        "spec": {"mode": "voting", "nested": {"list": [1, 2.5, None, "é"]}},
        "created_at": time.time(),
        "max_concurrency": 3,
        "lanes_total": 3,
    }


async def test_a_row_written_directly_is_the_row_sqlalchemy_writes(db: Database) -> None:
    async with db.transaction() as tx:
        written = await tx.conn.execute(INSERT_JOB, a_job("direct"))
        assert isinstance(written, Fetched)  # it did run on the driver
        await through_sqlalchemy(tx.conn, INSERT_JOB, a_job("sqlalchemy"))
    async with db.read() as conn:
        rows = (await conn.execute(select(jobs).order_by(jobs.c.id))).mappings().all()
    direct, sqlalchemy = ({**row, "id": None, "created_at": None} for row in rows)
    assert direct == sqlalchemy
    assert direct["spec"] == a_job("x")["spec"]  # JSON in and out
    assert direct["total_tokens"] == 0 and direct["last_seq"] == 0  # the column defaults


async def test_direct_reads_are_sqlalchemy_reads_with_lists_of_any_length(
    db: Database, store: Store
) -> None:
    job, _ = await store.jobs.create(parse(voting(5)), "acme")
    first, _second = (await store.queue.claim(OWNER, 2)).claims
    # A JSON output to read back: decoded alike on either path's connections.
    await store.outcomes.record(OWNER, [answered(first, output={"a": [1, 2.5, None, "é"]})])
    # Queued lanes, and a deadline: what the housekeeper's reads find.
    other, _ = await store.jobs.create(parse(voting(3, policy={"deadline_s": 60})), "acme")
    reads: list[tuple[Executable, dict[str, Any]]] = [
        (LANES_RECORDED, {"jobs": [job.id], "idxs": idxs})
        for idxs in ([], [2], [0, 3, 4], [4, 0], [4, 4, 1], [0, 1, 2, 3, 4])
    ]
    reads += [
        (TALLY, {"jobs": [job.id]}),
        (TALLY, {"jobs": [job.id, other.id, "no-such-job"]}),
        (TALLY_VOTES, {"j": job.id, "gates": []}),
        (TALLY_VOTES, {"j": job.id, "gates": [1, 2]}),
        (LOCK_JOBS, {"ids": [job.id, "no-such-job"]}),
        (JOB_STATUS, {"job_id": job.id}),
        (JOB, {"job_id": job.id}),
        (TENANTS_JOB, {"job_id": job.id, "tenant": "acme"}),
        (TENANTS_JOB, {"job_id": job.id, "tenant": "someone-else"}),
        (JOB_LANES, {"job_id": job.id}),
        (EVENTS_AFTER, {"job_id": job.id, "after": 1, "limit": 3}),
        (LANE_RESULTS, {"jobs": [job.id]}),
        (LEASES_EXPIRED, {"now": time.time() + 3600}),  # the claimed lanes' leases
        (DEADLINES_PASSED, {"now": time.time() + 3600}),
        (NEXT_QUEUED_AT, {}),
        (NEXT_REDUCER_AT, {}),
    ]
    async with db.read() as conn:
        for statement, params in reads:
            direct = await conn.execute(statement, params)
            assert isinstance(direct, Fetched)
            expected = (await through_sqlalchemy(conn, statement, params)).mappings().all()
            assert direct.mappings().all() == [dict(row) for row in expected], params
    async with db.read() as conn:
        lanes = (await conn.execute(LANES_RECORDED, {"jobs": [job.id], "idxs": [1, 0]})).all()
        status = (await conn.execute(JOB_STATUS, {"job_id": job.id})).scalar_one()
    # Rows answer to their columns' names, as SQLAlchemy's do.
    assert sorted((lane.idx, lane.status) for lane in lanes) == [(0, "succeeded"), (1, "running")]
    assert status == "running"


def test_lists_of_lengths_up_to_a_power_of_two_share_one_plan(db: Database) -> None:
    """A list is padded to the next power of two (its last value repeated), so a
    statement has one plan, and on PostgreSQL one prepared statement, per such length."""

    def plan_for(length: int) -> object:
        return db.plans.get(LANES_RECORDED, {"jobs": ["j"], "idxs": list(range(length))})

    assert plan_for(5) is plan_for(8)
    assert plan_for(3) is plan_for(4) is not plan_for(5)
    assert plan_for(9) is not plan_for(8)


async def test_a_direct_write_is_in_its_transaction_and_rolls_back_with_it(db: Database) -> None:
    """The first statement of a transaction may be a direct one: it still runs inside
    the transaction (on PostgreSQL the driver's BEGIN is sent for it)."""
    try:
        async with db.transaction() as tx:
            await tx.conn.execute(INSERT_JOB, a_job("rolled-back"))
            raise RuntimeError("the transaction fails after the write")
    except RuntimeError:
        pass
    async with db.read() as conn:
        assert (await conn.execute(JOB_STATUS, {"job_id": "rolled-back"})).all() == []


async def test_write_connections_opened_for_a_burst_stay_open_for_the_next(db: Database) -> None:
    """PostgreSQL: as many writes at once as twice the pool's size each get a
    connection, and every one is kept when given back (none opened again, its
    statements prepared and types read again, at the next burst)."""
    if db.is_sqlite:
        pytest.skip("SQLite writes take turns on one connection")
    engine = db.writer
    assert isinstance(engine, AsyncEngine)
    all_in = asyncio.Barrier(8)  # twice the fixture's pool_size of 4

    async def write(i: int) -> None:
        async with db.transaction() as tx:
            await tx.conn.execute(INSERT_JOB, a_job(f"burst-{i}"))
            await all_in.wait()

    await asyncio.wait_for(asyncio.gather(*(write(i) for i in range(8))), 10)
    assert engine.pool.checkedin() == 8  # type: ignore[attr-defined]
