"""Event streams under many clients: every disconnect is noticed and cleaned up."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable

import httpx
import pytest

from service.config import Settings
from tests.support import Served, serve, voting

CLIENTS = 200


@pytest.fixture
def stream_settings(sqlite_settings: Settings) -> Settings:
    return sqlite_settings.model_copy(update={"keepalive_s": 1})


def open_sockets() -> int:
    """Sockets this process holds (database files are not counted: pools grow)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # closed while listing
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
    return count


def open_streams(served: Served) -> int:
    return int(served.app.state.fanout.process.hub.subscriber_count)


async def wait_for(condition: Callable[[], bool], what: str, timeout: float = 20) -> None:
    try:
        async with asyncio.timeout(timeout):
            # Polled: these are server-side counters, with no event to wait on.
            while not condition():
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"not within {timeout} s: {what}") from None


async def raw_stream(
    served: Served, path: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A stream opened on a bare socket, read until its first event."""
    host, port = served.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n\r\n".encode()
    )
    await writer.drain()
    await reader.readuntil(b"event: job.queued")
    return reader, writer


async def test_dropped_clients_leave_no_subscription_task_or_connection_behind(
    stream_settings: Settings,
) -> None:
    async with serve(stream_settings) as served:
        state = served.app.state.fanout.process
        response = await served.http.post("/v1/jobs", json=voting(2, "fake?hang=1"))
        job_id = response.json()["id"]
        path = f"/v1/jobs/{job_id}/events"

        async def running() -> int:
            job = (await served.http.get(f"/v1/jobs/{job_id}")).json()
            return int(job["progress"].get("running", 0))

        async with asyncio.timeout(10):
            while await running() < 2:
                await asyncio.sleep(0.02)
        baseline_tasks = len(asyncio.all_tasks())
        baseline_sockets = open_sockets()

        limits = httpx.Limits(max_connections=CLIENTS)
        async with httpx.AsyncClient(base_url=served.url, limits=limits, timeout=30) as http:
            entered: list[tuple[object, httpx.Response]] = []

            async def follow(started: asyncio.Event) -> None:
                """A client that reads until cancelled (dropped by cancelling its task)."""
                async with http.stream("GET", path) as stream:
                    started.set()
                    async for _line in stream.aiter_lines():
                        pass

            # A third close their response, a third are cancelled mid-read, a third
            # abort the socket under the server.
            for _ in range(CLIENTS // 3):
                context = http.stream("GET", path)
                entered.append((context, await context.__aenter__()))
            readers = []
            for _ in range(CLIENTS // 3):
                started = asyncio.Event()
                readers.append(asyncio.create_task(follow(started)))
                await started.wait()
            raw = [await raw_stream(served, path) for _ in range(CLIENTS - 2 * (CLIENTS // 3))]
            await wait_for(lambda: open_streams(served) == CLIENTS, "every client subscribed")
            # No connection is held by 200 idle streams (the runner borrows one briefly).
            await wait_for(lambda: state.db.reader.pool.checkedout() == 0, "no connection held")

            for context, _response in entered:
                await context.__aexit__(None, None, None)  # type: ignore[attr-defined]
            for task in readers:
                task.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
            for _reader, writer in raw:
                writer.transport.abort()

            await wait_for(
                lambda: open_streams(served) == 0, "every stream noticed its client left"
            )
            # The runner's own timed waits come and go: a little slack, against 200 streams.
            await wait_for(
                lambda: len(asyncio.all_tasks()) <= baseline_tasks + 2, "stream tasks ended"
            )
        await wait_for(lambda: open_sockets() <= baseline_sockets + 5, "sockets closed")
        await wait_for(lambda: state.db.reader.pool.checkedout() == 0, "no connection held")
        metrics = (await served.http.get("/metrics")).text
        assert "fanout_stream_clients 0.0" in metrics
        assert (await served.http.post(f"/v1/jobs/{job_id}/cancel")).status_code == 202


async def test_idle_stream_gets_keepalive_comments(stream_settings: Settings) -> None:
    async with serve(stream_settings) as served:
        response = await served.http.post("/v1/jobs", json=voting(1, "fake?hang=1"))
        job_id = response.json()["id"]
        reader, writer = await raw_stream(served, f"/v1/jobs/{job_id}/events")
        try:
            async with asyncio.timeout(10):
                line = b""
                while not line.startswith(b":"):
                    line = await reader.readline()
            assert b"ping" in line or line.startswith(b": ")
        finally:
            writer.transport.abort()
            await served.http.post(f"/v1/jobs/{job_id}/cancel")
