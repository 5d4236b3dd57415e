"""Helpers the tests share: spec builders, waiting on a job's stream, reading SSE."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from aiohttp import web
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from service.config import Settings
from service.http import create_app


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(
    url: str,
    proc: subprocess.Popen[bytes] | None = None,
    *,
    log: Path | None = None,
    timeout: float = 20,
) -> None:
    """Poll ``url`` until it answers 200; fail at once if ``proc`` exits, and after
    ``timeout`` seconds otherwise, showing ``log`` (the process's output) if given."""
    output = (lambda: "\n" + log.read_text(errors="replace")) if log else (lambda: "")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{proc.args} exited with {proc.returncode}{output()}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"{url} did not answer within {timeout} s{output()}")


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def voting(n: int, model: str = "fake", **fields: Any) -> dict[str, Any]:
    task = {
        "model": model,
        "messages": user("What is 17*23? End with 'Answer: N'."),
        **fields.pop("task", {}),
    }
    return {"mode": "voting", "n": n, "task": task, **fields}


def sectioning(*sections: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"mode": "sectioning", "sections": list(sections), **fields}


def section(name: str, model: str = "fake", text: str = "hello", **fields: Any) -> dict[str, Any]:
    return {"name": name, "task": {"model": model, "messages": user(text)}, **fields}


def mapping(items: list[Any], content: str, model: str = "fake", **fields: Any) -> dict[str, Any]:
    """A map job of ``items``, its task's one message ``content`` (with placeholders)."""
    return {
        "mode": "map",
        "items": items,
        "task": {"model": model, "messages": user(content)},
        **fields,
    }


def parse_sse(body: str) -> list[dict[str, Any]]:
    """Events of a text/event-stream body: [{"id", "event", "data"}], comments dropped."""
    events = []
    for block in body.replace("\r\n", "\n").split("\n\n"):
        event: dict[str, Any] = {}
        for line in block.split("\n"):
            if not line or line.startswith(":"):
                continue
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            event[field] = json.loads(value) if field == "data" else value
        if "data" in event:
            events.append(event)
    return events


async def events_of(
    client: httpx.AsyncClient, job_id: str, *, last_event_id: int | None = None, timeout: float = 30
) -> list[dict[str, Any]]:
    """The job's whole event stream (it closes after the final event), within ``timeout``;
    none after the final event (``204``)."""
    headers = {"Last-Event-ID": str(last_event_id)} if last_event_id is not None else {}
    async with asyncio.timeout(timeout):
        response = await client.get(f"/v1/jobs/{job_id}/events", headers=headers)
    if response.status_code == 204 and last_event_id:
        return []
    assert response.status_code == 200, response.text
    return parse_sse(response.text)


async def run_job(
    client: httpx.AsyncClient, spec: dict[str, Any], timeout: float = 30
) -> dict[str, Any]:
    """Post a job, wait for its final event, return the stored job."""
    response = await client.post("/v1/jobs", json=spec)
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    await events_of(client, job_id, timeout=timeout)
    job = (await client.get(f"/v1/jobs/{job_id}")).json()
    assert job["status"] in ("succeeded", "failed", "cancelled"), job
    return dict(job)


async def fake_stats(fake_url: str) -> dict[str, Any]:
    async with httpx.AsyncClient() as client:
        return dict((await client.get(fake_url.removesuffix("/v1") + "/_stats")).json())


async def fake_last(fake_url: str) -> dict[str, Any]:
    """The body of the last chat request the simulator received, as sent."""
    async with httpx.AsyncClient() as client:
        return dict((await client.get(fake_url.removesuffix("/v1") + "/_last")).json())


async def fake_reset(fake_url: str) -> None:
    async with httpx.AsyncClient() as client:
        (await client.post(fake_url.removesuffix("/v1") + "/_reset")).raise_for_status()


# --- the app, and servers on loopback ------------------------------------------------


@asynccontextmanager
async def app_client(settings: Settings, **overrides: Any) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings.model_copy(update=overrides))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://fanout") as http:
            yield http


@asynccontextmanager
async def receiver(handler: Any) -> AsyncIterator[str]:
    """A real HTTP server on loopback; yields its base URL."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@dataclass
class Served:
    """The app on a real loopback port."""

    url: str
    app: FastAPI
    server: uvicorn.Server
    http: httpx.AsyncClient

    def drop_connections(self) -> None:
        """Cut every open connection, as a proxy or a flaky network would."""
        for connection in list(self.server.server_state.connections):
            connection.transport.close()


@asynccontextmanager
async def serve(settings: Settings) -> AsyncIterator[Served]:
    """The real app under uvicorn, in this test's event loop: EventSource needs real HTTP."""
    app = create_app(settings)
    port = free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(20):
            while not server.started:
                if task.done():
                    task.result()  # raises what stopped it
                    raise RuntimeError("uvicorn exited before it started")
                await asyncio.sleep(0.02)
        url = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            yield Served(url, app, server, http)
    finally:
        context = getattr(app.state, "fanout", None)
        if context is not None:
            context.stop()  # as `fanout serve` does on SIGTERM: open streams end
        server.should_exit = True
        await asyncio.wait_for(task, 15)


# --- settings and databases ---------------------------------------------------------


def make_settings(
    database_url: str, fake_llm: str, monkeypatch: pytest.MonkeyPatch, **overrides: Any
) -> Settings:
    """Settings for a test app: the fake LLM as default provider, quick polls and retries,
    on a database the fixtures migrated already."""
    monkeypatch.setenv("OPENAI_BASE_URL", fake_llm)
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    fields: dict[str, Any] = {
        "poll_interval_s": 0.2,
        "lease_seconds": 5,
        "retry_base_s": 0.05,
        "retry_max_s": 0.5,
        "drain_seconds": 0.5,  # hung lanes in a test need not hold its teardown
        "run_migrations": False,
        **overrides,
    }
    return Settings(database_url=database_url, _env_file=None, **fields)  # type: ignore[call-arg]


async def truncate(url: str) -> None:
    """Empty the tables of a PostgreSQL test database (dependent tables cascade)."""
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.execute(text("TRUNCATE events, lanes, jobs, providers CASCADE"))
    finally:
        await engine.dispose()
