"""The migrations build exactly the tables the code declares."""

from __future__ import annotations

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
