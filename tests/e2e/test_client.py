"""The Python client (:mod:`service.client`) against the real app on a loopback port,
with API keys, running its lanes on the fake LLM. The network is real; where a test
needs to see what was sent, or to lose a response on its way back, it wraps httpx's own
transport (:class:`Recording`). The blocking client runs on a worker thread: the
server runs in the test's event loop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from service.client import (
    AsyncFanout,
    Conflict,
    Event,
    Fanout,
    InvalidRequest,
    NotFound,
    RateLimited,
    Retries,
    StreamLost,
    Unauthorized,
)
from service.config import Settings
from tests.e2e.test_readme import blocks
from tests.support import Served, free_port, serve, voting

KEY = "key-acme"
# Every lane votes (a decided vote would stop the last one, or not, by timing).
EVERY_VOTE = {"kind": "majority", "extract": "number", "early_stop": False}
# A job whose events come over about half a second: lanes start, then answer.
SLOW_VOTE = voting(3, "fake?latency_ms=500&answers=391", aggregate=EVERY_VOTE)


class Recording(httpx.AsyncBaseTransport, httpx.BaseTransport):
    """httpx's own network, noting each request and the status it got. With
    ``lose_responses``, that many responses are read and then lost, as a connection
    that breaks after the server acted but before its answer arrived."""

    def __init__(self, lose_responses: int = 0) -> None:
        self.sync = httpx.HTTPTransport()
        self.async_ = httpx.AsyncHTTPTransport()
        self.sent: list[tuple[httpx.Request, int]] = []
        self.lose_responses = lose_responses
        self.refused = asyncio.Event()

    def _lose(self, request: httpx.Request, response: httpx.Response) -> bool:
        """Note the exchange; True when its response is to be lost."""
        self.sent.append((request, response.status_code))
        if response.status_code >= 400:
            self.refused.set()
        if not self.lose_responses:
            return False
        self.lose_responses -= 1
        return True

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.sync.handle_request(request)
        if self._lose(request, response):
            response.close()
            raise httpx.ReadError("connection reset by peer", request=request)
        return response

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.async_.handle_async_request(request)
        if self._lose(request, response):
            await response.aclose()
            raise httpx.ReadError("connection reset by peer", request=request)
        return response

    def close(self) -> None:
        self.sync.close()

    async def aclose(self) -> None:
        await self.async_.aclose()

    def to(self, method: str, path_end: str) -> list[tuple[httpx.Request, int]]:
        return [
            (request, status)
            for request, status in self.sent
            if request.method == method and request.url.path.endswith(path_end)
        ]


@pytest.fixture
def keyed(sqlite_settings: Settings) -> Settings:
    return sqlite_settings.model_copy(update={"api_keys": f"acme:{KEY}"})


@pytest.fixture
async def served(keyed: Settings) -> AsyncIterator[Served]:
    async with serve(keyed) as served:
        yield served


def in_thread(function: Callable[[], Any]) -> Any:
    """Run the blocking client off the event loop that serves it."""
    return asyncio.wait_for(asyncio.to_thread(function), 30)


def assert_whole(events: list[Event]) -> None:
    """Every stored event once, in order, ending with the final one."""
    stored = [event.id for event in events if event.id]
    assert stored == list(range(1, len(stored) + 1)), stored
    assert events[-1].final and sum(event.final for event in events) == 1


# --- create, wait, stream ------------------------------------------------------------------


async def test_create_then_wait_returns_the_finished_job(served: Served) -> None:
    def run() -> tuple[dict[str, Any], dict[str, Any]]:
        with Fanout(served.url, KEY) as fanout:
            job = fanout.create(voting(3, "fake?answers=391", aggregate=EVERY_VOTE))
            return dict(job), dict(fanout.wait(job["id"], timeout=20))

    job, done = await in_thread(run)

    assert job["status"] in ("queued", "running") and len(job["lanes"]) == 3
    assert job["stream_token"]  # a server with keys gives one
    assert done["id"] == job["id"]
    assert done["status"] == "succeeded"
    assert done["result"]["output"] == 391
    assert [lane["status"] for lane in done["lanes"]] == ["succeeded"] * 3


async def test_async_create_stream_and_wait(served: Served) -> None:
    async with AsyncFanout(served.url, KEY) as fanout:
        job = await fanout.create(SLOW_VOTE)
        events = [event async for event in fanout.stream(job["id"])]
        done = await fanout.wait(job["id"], timeout=20)

    assert_whole(events)
    assert events[0].type == "job.queued" and events[-1].type == "job.succeeded"
    assert events[-1].data["result"]["output"] == 391
    assert sorted(e.data["lane"] for e in events if e.type == "lane.succeeded") == [0, 1, 2]
    assert done["status"] == "succeeded" and done["result"] == events[-1].data["result"]


# --- idempotency ---------------------------------------------------------------------------


async def test_the_same_idempotency_key_gives_the_same_job(served: Served) -> None:
    async with AsyncFanout(served.url, KEY) as fanout:
        first = await fanout.create(voting(1, "fake"), idempotency_key="order-17")
        again = await fanout.create(voting(1, "fake"), idempotency_key="order-17")
        other = await fanout.create(voting(1, "fake"))  # a key of its own
        listed = [job["id"] async for job in fanout.list()]

    assert again["id"] == first["id"]
    assert other["id"] != first["id"]
    assert sorted(listed) == sorted([first["id"], other["id"]])


async def test_a_response_lost_on_the_way_back_is_retried_without_a_second_job(
    served: Served,
) -> None:
    network = Recording(lose_responses=1)
    async with AsyncFanout(served.url, KEY, transport=network) as fanout:
        job = await fanout.create(voting(1, "fake"))
        listed = [summary["id"] async for summary in fanout.list()]

    posts = network.to("POST", "/v1/jobs")
    assert [status for _, status in posts] == [202, 202]  # the first answer was lost
    keys = {request.headers["Idempotency-Key"] for request, _ in posts}
    assert len(keys) == 1
    assert listed == [job["id"]]


# --- refusals ------------------------------------------------------------------------------


async def test_an_invalid_spec_raises_invalid_request_naming_every_field(served: Served) -> None:
    async with AsyncFanout(served.url, KEY) as fanout:
        with pytest.raises(InvalidRequest) as refused:
            await fanout.create(voting(0, task={"temperature": 9}))

    error = refused.value
    assert (error.status, error.code) == (422, "invalid_request")
    assert {tuple(e["loc"]) for e in error.errors} == {
        ("body", "n"),
        ("body", "task", "temperature"),
    }
    assert "HTTP 422" in str(error) and "task.temperature" in str(error)


async def test_an_unknown_job_raises_not_found(served: Served) -> None:
    async with AsyncFanout(served.url, KEY) as fanout:
        with pytest.raises(NotFound) as on_get:
            await fanout.get("no-such-job")
        with pytest.raises(NotFound):
            [event async for event in fanout.stream("no-such-job")]  # not StreamLost

    assert (on_get.value.status, on_get.value.code) == (404, "not_found")


async def test_an_unknown_key_raises_unauthorized(served: Served) -> None:
    async with AsyncFanout(served.url, "key-nobody") as fanout:
        with pytest.raises(Unauthorized) as refused:
            await fanout.create(voting(1, "fake"))

    assert (refused.value.status, refused.value.code) == (401, "unauthorized")


async def test_a_draining_server_is_asked_again_after_retry_after(served: Served) -> None:
    network = Recording()
    served.app.state.fanout.draining = True  # what SIGTERM sets: 503, Retry-After: 1
    async with AsyncFanout(served.url, KEY, transport=network) as fanout:
        started = time.monotonic()
        creating = asyncio.create_task(fanout.create(voting(1, "fake")))
        await asyncio.wait_for(network.refused.wait(), 10)
        served.app.state.fanout.draining = False
        job = await asyncio.wait_for(creating, 10)
        elapsed = time.monotonic() - started

    posts = network.to("POST", "/v1/jobs")
    assert [status for _, status in posts] == [503, 202]
    assert len({request.headers["Idempotency-Key"] for request, _ in posts}) == 1
    assert elapsed >= 1.0  # the Retry-After
    assert job["status"] in ("queued", "running")


async def test_a_tenant_at_capacity_is_retried_after_retry_after(keyed: Settings) -> None:
    async with (
        serve(keyed.model_copy(update={"max_jobs_in_flight": 1})) as served,
        AsyncFanout(served.url, KEY) as fanout,
        AsyncFanout(served.url, KEY, retries=Retries(attempts=0)) as impatient,
    ):
        running = await fanout.create(voting(1, "fake?latency_ms=1000"))
        with pytest.raises(RateLimited) as refused:
            await impatient.create(voting(1, "fake"))
        started = time.monotonic()
        job = await fanout.create(voting(1, "fake"))  # once the first job has ended
        elapsed = time.monotonic() - started
        first = await fanout.get(running["id"])

    assert (refused.value.code, refused.value.retry_after) == ("tenant_at_capacity", 2.0)
    assert elapsed >= 2.0
    assert first["status"] == "succeeded" and job["id"] != first["id"]


# --- list and cancel -----------------------------------------------------------------------


async def test_list_walks_every_page_newest_first(served: Served) -> None:
    network = Recording()
    async with AsyncFanout(served.url, KEY, transport=network) as fanout:
        created = [(await fanout.create(voting(1, "fake")))["id"] for _ in range(5)]
        listed = [job["id"] async for job in fanout.list(page_size=2)]

    assert listed == created[::-1]
    assert len(network.to("GET", "/v1/jobs")) == 3  # pages of 2, 2 and 1


async def test_cancel_ends_the_job_and_a_second_cancel_is_a_conflict(served: Served) -> None:
    def run() -> tuple[dict[str, Any], dict[str, Any], Conflict]:
        with Fanout(served.url, KEY) as fanout:
            job = fanout.create(voting(2, "fake?hang=1"))
            cancelled = fanout.cancel(job["id"])
            done = fanout.wait(job["id"], timeout=10)
            with pytest.raises(Conflict) as again:
                fanout.cancel(job["id"])
            return dict(cancelled), dict(done), again.value

    cancelled, done, conflict = await in_thread(run)

    assert cancelled["status"] == "cancelled"
    assert done["status"] == "cancelled" and done["progress"] == {"cancelled": 2}
    assert (conflict.status, conflict.code) == (409, "job_finished")


# --- big jobs: without their lanes, and their lanes a page at a time ----------------------


async def test_lanes_are_read_a_page_at_a_time_and_the_job_without_them(served: Served) -> None:
    network = Recording()
    async with AsyncFanout(served.url, KEY, transport=network) as fanout:
        job = await fanout.create(voting(5, "fake?answers=391", aggregate=EVERY_VOTE), lanes=False)
        done = await fanout.wait(job["id"], timeout=20)
        slim = await fanout.get(job["id"], lanes=False)
        paged = [lane async for lane in fanout.lanes(job["id"], page_size=2)]
        named = [lane async for lane in fanout.lanes(job["id"], name="lane-3")]
        failed = [lane async for lane in fanout.lanes(job["id"], status="failed")]

    assert job["lanes"] == [] and sum(job["progress"].values()) == 5
    assert slim["lanes"] == [] and slim["progress"] == {"succeeded": 5}
    assert slim["result"] == done["result"]
    assert paged == done["lanes"]
    assert [lane["index"] for lane in named] == [3]
    assert failed == []
    pages = [request.url.params for request, _ in network.to("GET", "/lanes")]
    assert [page.get("cursor") for page in pages[:3]] == [None, "1", "3"]  # 2, 2, then 1


async def test_the_blocking_client_cancels_without_lanes_and_reads_them_by_state(
    served: Served,
) -> None:
    def run() -> tuple[dict[str, Any], list[dict[str, Any]]]:
        with Fanout(served.url, KEY) as fanout:
            job = fanout.create(voting(3, "fake?hang=1"), lanes=False)
            cancelled = fanout.cancel(job["id"], lanes=False)
            fanout.wait(job["id"], timeout=10)
            return dict(cancelled), list(fanout.lanes(job["id"], status="cancelled", page_size=1))

    cancelled, lanes = await in_thread(run)

    assert cancelled["status"] == "cancelled" and cancelled["lanes"] == []
    assert cancelled["progress"] == {"cancelled": 3}
    assert [(lane["index"], lane["status"]) for lane in lanes] == [
        (0, "cancelled"),
        (1, "cancelled"),
        (2, "cancelled"),
    ]


# --- streams that drop ---------------------------------------------------------------------


def reopened(network: Recording) -> list[str | None]:
    return [request.headers.get("Last-Event-ID") for request, _ in network.to("GET", "/events")]


async def test_a_dropped_stream_resumes_without_losing_or_repeating_events(
    served: Served,
) -> None:
    network = Recording()
    async with AsyncFanout(served.url, KEY, transport=network) as fanout:
        job = await fanout.create(SLOW_VOTE)
        events: list[Event] = []
        async for event in fanout.stream(job["id"]):
            events.append(event)
            if event.type == "lane.started" and event.data["lane"] == 0:
                served.drop_connections()  # lanes are still running
        replay = [event async for event in fanout.stream(job["id"])]
        after_final = [event async for event in fanout.stream(job["id"], after=events[-1].id)]

    assert_whole(events)
    assert events == replay  # what was stored, exactly
    first, *rest = reopened(network)[:2]
    assert first is None
    assert rest and rest[0] is not None and 0 < int(rest[0]) < events[-1].id
    assert after_final == []  # 204: nothing comes after the final event


async def test_a_dropped_stream_resumes_with_the_blocking_client(served: Served) -> None:
    loop = asyncio.get_running_loop()
    network = Recording()

    def run() -> tuple[list[Event], dict[str, Any]]:
        with Fanout(served.url, KEY, transport=network) as fanout:
            job = fanout.create(SLOW_VOTE)
            events = []
            for event in fanout.stream(job["id"]):
                events.append(event)
                if event.type == "lane.started" and event.data["lane"] == 0:
                    loop.call_soon_threadsafe(served.drop_connections)
            return events, dict(fanout.get(job["id"]))

    events, job = await in_thread(run)

    assert_whole(events)
    assert len(reopened(network)) >= 2 and reopened(network)[1] is not None
    assert events[-1].data["result"] == job["result"]


async def test_a_stream_that_cannot_be_reopened_raises_stream_lost() -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    retries = Retries(reconnect_s=(0.0, 0.0))
    async with AsyncFanout(nowhere, retries=retries) as fanout:
        with pytest.raises(StreamLost) as lost:
            [event async for event in fanout.stream("j1", after=7)]

    assert "gave up after 2 reconnects" in str(lost.value)
    assert (lost.value.job_id, lost.value.last_event_id) == ("j1", 7)


async def test_wait_gives_up_at_its_timeout(served: Served) -> None:
    async with AsyncFanout(served.url, KEY) as fanout:
        job = await fanout.create(voting(1, "fake?hang=1"))
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await fanout.wait(job["id"], timeout=0.5)
        elapsed = time.monotonic() - started
        await fanout.cancel(job["id"])

    assert 0.5 <= elapsed < 5


async def test_the_readme_example_runs(served: Served, capsys: pytest.CaptureFixture[str]) -> None:
    (example,) = blocks("python-client")
    source = example.replace(
        'Fanout("http://127.0.0.1:8000")', f'Fanout("{served.url}", api_key="{KEY}")'
    )
    assert source != example

    await in_thread(lambda: exec(source, {}))

    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "1 job.queued"
    assert lines[-2].endswith(" job.succeeded")
    assert lines[-1] == "succeeded 391"
