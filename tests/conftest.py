"""Fixtures with real parts: the fake LLM as a process on loopback, real SQLite files,
a real PostgreSQL, the real app.

The layers (each test at the lowest one that can show its rule)::

    unit/      pure rules: milliseconds, no I/O
    attempts/  one attempt against real servers on loopback (lean and SDK clients)
    store/     the Store on SQLite and PostgreSQL: no app, no runner, no LLM
    runner/    the Runner with a scripted executor on both databases: no LLM, no HTTP
    tools/     the LLM simulator
    e2e/       the app, real processes, a real browser, the README's commands

Migrations run once per session: into a SQLite file that each test gets a copy of,
and into one PostgreSQL database that each test gets emptied.

PostgreSQL: ``FANOUT_TEST_POSTGRES_URL`` (default: the local server, database
``test``). Tests on it are skipped, saying so, when it cannot be reached, unless
``FANOUT_REQUIRE_POSTGRES=1`` (set by ``.ci/run``), which makes that a failure.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from service.config import Settings
from service.http import create_app
from service.store.db import upgrade
from tests.support import free_port, make_settings, truncate, wait_http

POSTGRES_URL = os.environ.get(
    "FANOUT_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)
REQUIRE_POSTGRES = os.environ.get("FANOUT_REQUIRE_POSTGRES") == "1"
T = TypeVar("T")


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to the end on its own thread and loop (fixtures may be called
    from inside a running loop, where ``asyncio.run`` is refused)."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


@pytest.fixture(scope="session")
def fake_llm() -> Iterator[str]:
    """``fanout fake-llm`` on a free loopback port; yields its OpenAI base URL."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "fake-llm", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", proc)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        proc.wait(10)


@contextmanager
def new_postgres_database() -> Iterator[str]:
    """A new PostgreSQL database, migrated (never analyzed), dropped at the end."""
    name = f"fanout_test_{uuid.uuid4().hex[:8]}"
    admin_url = POSTGRES_URL

    async def admin(sql: str) -> None:
        engine = create_async_engine(admin_url, isolation_level="AUTOCOMMIT")
        try:
            async with engine.connect() as conn:
                await conn.execute(text(sql))
        finally:
            await engine.dispose()

    try:
        run_sync(asyncio.wait_for(admin(f'CREATE DATABASE "{name}"'), 10))
    except Exception as exc:
        message = f"PostgreSQL not reachable at {POSTGRES_URL}: {type(exc).__name__}: {exc}"
        if REQUIRE_POSTGRES:
            pytest.fail(message)
        pytest.skip(message)
    url = POSTGRES_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        upgrade(url)
        yield url
    finally:
        run_sync(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str]:
    """A fresh, migrated PostgreSQL database for this test session."""
    with new_postgres_database() as url:
        yield url


@pytest.fixture
def unanalyzed_postgres_database() -> Iterator[str]:
    """A PostgreSQL database of this test's own, migrated and never analyzed (as a
    new deployment's is until autovacuum's first ANALYZE)."""
    with new_postgres_database() as url:
        yield url


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite database migrated once for the session."""
    path = tmp_path_factory.mktemp("template") / "fanout.db"
    upgrade(f"sqlite+aiosqlite:///{path}")
    return path


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, sqlite_template: Path, tmp_path: Path) -> str:
    """Each test runs on SQLite (a copy of the migrated file) and on PostgreSQL (emptied
    first)."""
    if request.param == "sqlite":
        return _copy(sqlite_template, tmp_path)
    url: str = request.getfixturevalue("postgres_database")
    run_sync(truncate(url))
    return url


@pytest.fixture
def sqlite_url(sqlite_template: Path, tmp_path: Path) -> str:
    """A migrated SQLite database of this test's own."""
    return _copy(sqlite_template, tmp_path)


def _copy(template: Path, directory: Path) -> str:
    target = directory / "fanout.db"
    shutil.copyfile(template, target)
    return f"sqlite+aiosqlite:///{target}"


@pytest.fixture
def llm_client() -> str:
    """How lanes call the LLM; ``tests/test_jobs.py`` runs on both paths."""
    return "lean"


@pytest.fixture
def settings(
    database_url: str, fake_llm: str, llm_client: str, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    return make_settings(database_url, fake_llm, monkeypatch, llm_client=llm_client)


@pytest.fixture
def sqlite_settings(sqlite_url: str, fake_llm: str, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """As ``settings``, on SQLite only (tests that serve on a real port)."""
    return make_settings(sqlite_url, fake_llm, monkeypatch)


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The real app (runner included) behind httpx's ASGI transport."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://fanout") as http:
            yield http
