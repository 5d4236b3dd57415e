"""The store alone, on SQLite and PostgreSQL: no app, no runner, no LLM."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from pydantic import TypeAdapter

from service.spec import JobSpec, SectioningSpec, VotingSpec
from service.store import Store
from service.store.db import Database

OWNER = "worker-a"
_specs: TypeAdapter[VotingSpec | SectioningSpec] = TypeAdapter(JobSpec)


def parse(spec: dict[str, Any]) -> VotingSpec | SectioningSpec:
    return _specs.validate_python(spec)


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    database = Database(database_url, pool_size=4)
    try:
        yield database
    finally:
        await database.dispose()


@pytest.fixture
def store(db: Database) -> Store:
    return Store(db, lease_seconds=30)
