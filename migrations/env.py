"""Alembic environment: async engines (aiosqlite, asyncpg); the URL comes from the caller."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import pool, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from service.store.tables import Base

config = context.config
url = config.attributes.get("url") or config.get_main_option("sqlalchemy.url")
# Any number for the advisory lock: processes that start together migrate one at a time.
MIGRATION_LOCK = 4_242_001


def run_with(connection: Connection) -> None:
    is_postgres = connection.dialect.name == "postgresql"
    if is_postgres:
        connection.execute(text(f"SELECT pg_advisory_lock({MIGRATION_LOCK})"))
    try:
        context.configure(
            connection=connection,
            target_metadata=Base.metadata,
            render_as_batch=connection.dialect.name == "sqlite",
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()
    finally:
        if is_postgres:
            connection.execute(text(f"SELECT pg_advisory_unlock({MIGRATION_LOCK})"))


async def run_online() -> None:
    engine = create_async_engine(url, poolclass=pool.NullPool)
    async with engine.connect() as connection:
        await connection.run_sync(run_with)
        await connection.commit()
    await engine.dispose()


if context.is_offline_mode():
    context.configure(url=url, target_metadata=Base.metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    asyncio.run(run_online())
