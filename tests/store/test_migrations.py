"""The migrations build exactly the tables the code declares."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection, text

from service.store.db import Database, head_revision
from service.store.tables import Base


async def test_the_migrated_database_matches_the_tables(db: Database) -> None:
    def diff(connection: Connection) -> list[object]:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return list(compare_metadata(context, Base.metadata))

    async with db.read() as conn:
        assert await conn.run_sync(diff) == []
        version = await conn.execute(text("SELECT version_num FROM alembic_version"))
        assert version.scalar() == head_revision()


@pytest.mark.postgres
async def test_a_lane_is_updated_by_its_key_on_a_database_never_analyzed(
    unanalyzed_postgres_database: str,
) -> None:
    """A new PostgreSQL database has no statistics until autovacuum's first ANALYZE.
    Recording a lane's outcome, by (job, index), must still read the primary key: an
    index that begins with the job ties with it in cost then, and would scan every lane
    of the job for each lane recorded."""
    db = Database(unanalyzed_postgres_database)
    try:
        async with db.transaction() as tx:
            await tx.conn.execute(
                text(
                    "INSERT INTO jobs (id, tenant, status, mode, spec, lanes_total, created_at,"
                    " prompt_tokens, completion_tokens, total_tokens, last_seq)"
                    " VALUES ('j', 't', 'running', 'voting', '{}', 1000, 0, 0, 0, 0, 0)"
                )
            )
            await tx.conn.execute(
                text(
                    "INSERT INTO lanes (job_id, idx, name, status, attempts, queued_at,"
                    " available_at, prompt_tokens, completion_tokens, total_tokens)"
                    " SELECT 'j', g, 'lane-' || g, 'running', 1, 0, 0, 0, 0, 0"
                    " FROM generate_series(0, 999) AS g"
                )
            )
        async with db.read() as conn:
            plan = await conn.execute(
                text(
                    "EXPLAIN (FORMAT JSON) UPDATE lanes SET status = 'succeeded'"
                    " WHERE job_id = :j AND idx = :i"
                ),
                {"j": "j", "i": 500},
            )
            scan = plan.scalar_one()[0]["Plan"]["Plans"][0]
    finally:
        await db.dispose()
    assert (scan["Node Type"], scan["Index Name"]) == ("Index Scan", "lanes_pkey")
