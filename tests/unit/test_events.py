"""The stream's replay-then-live logic, driven with an in-memory event log."""

from __future__ import annotations

import asyncio
import gc
import json
from collections.abc import AsyncGenerator
from typing import Any

import pytest
from sse_starlette import ServerSentEvent

from service.events import EventHub, Frame, Hangup, batches, encode, stream
from service.http.stream import EventStream


def event(seq: int, kind: str = "lane.started") -> dict[str, Any]:
    return {"job_id": "j", "seq": seq, "type": kind, "data": {"seq": seq}}


async def collect(
    hub: EventHub, log: list[dict[str, Any]], after: int, finished_after_reads: int
) -> list[int]:
    """Stream from a log that grows: the job finishes once ``finished_after_reads``
    reads were made, and the log then holds every event up to the final one."""
    reads = 0
    visible = [e for e in log if e["type"] != "job.succeeded"][:3]

    async def read_after(_job: str, last: int) -> list[dict[str, Any]]:
        nonlocal reads
        reads += 1
        source = log if reads > finished_after_reads else visible
        return [e for e in source if e["seq"] > last]

    async def is_finished(_job: str) -> bool:
        return reads >= finished_after_reads

    async with asyncio.timeout(5):
        return [e["seq"] async for e in stream(hub, "j", after, read_after, is_finished)]


async def test_job_that_ends_between_replay_and_status_check_is_streamed_to_its_end() -> None:
    log = [event(1, "job.queued"), event(2), event(3), event(4), event(5, "job.succeeded")]
    # The first read sees events 1-3; by the status check the job has finished.
    assert await collect(EventHub(), log, 0, finished_after_reads=1) == [1, 2, 3, 4, 5]


async def test_client_past_the_final_event_gets_nothing_and_the_stream_closes() -> None:
    log = [event(1, "job.queued"), event(2, "job.succeeded")]
    assert await collect(EventHub(), log, 2, finished_after_reads=0) == []


async def test_live_events_follow_the_replay_without_gaps_or_duplicates() -> None:
    hub = EventHub()
    stored = [event(1, "job.queued"), event(2)]

    async def read_after(_job: str, last: int) -> list[dict[str, Any]]:
        return [e for e in stored if e["seq"] > last]

    async def is_finished(_job: str) -> bool:
        return False

    async def publish() -> None:
        await asyncio.sleep(0)
        stored.extend([event(3), event(4), event(5, "job.succeeded")])
        # 2 is a duplicate, 4 arrives before 3: the stream reads the gap from the table.
        hub.publish([event(2), event(4), event(3), event(5, "job.succeeded")])

    async with asyncio.timeout(5):
        task = asyncio.create_task(publish())
        seqs = [e["seq"] async for e in stream(hub, "j", 0, read_after, is_finished)]
        await task
    assert seqs == [1, 2, 3, 4, 5]
    assert hub.subscriber_count == 0


def test_a_frame_is_what_sse_starlette_writes_for_the_event() -> None:
    data = {"job_id": "j", "seq": 7, "at": "t", "output": "two\nlines\r\né ☃", "n": 1.5}
    stored = {"job_id": "j", "seq": 7, "type": "lane.succeeded", "data": data}
    delta = {"job_id": "j", "seq": 0, "type": "lane.delta", "data": {"text": "hi"}}
    for item in (stored, delta):
        expected = ServerSentEvent(
            # Compact, on one line, UTF-8 as it is (line breaks escaped).
            data=json.dumps(item["data"], separators=(",", ":"), ensure_ascii=False),
            event=item["type"],
            id=str(item["seq"]) if item["seq"] else None,
        ).encode()
        frame = Frame.encode(item)
        assert frame.body == expected
        assert frame.event("j") == item


@pytest.mark.parametrize(
    "data",
    [
        {"n": 2**70},  # past 64 bits
        {"1": "x", "nested": {2: "two"}},  # a key that is not a string
        {"text": "half a pair \ud800"},  # a lone surrogate
    ],
)
def test_data_that_orjson_refuses_is_encoded_all_the_same(data: dict[str, Any]) -> None:
    text = encode(data)
    assert json.loads(text) == json.loads(json.dumps(data))
    assert "\n" not in text


def test_frame_cache_stays_within_its_bound_and_forgets_a_job_nobody_follows() -> None:
    hub = EventHub(frame_cache_bytes=2000)
    subs = [hub.subscribe("a"), hub.subscribe("b")]
    for seq in range(1, 101):
        hub.publish([event(seq) | {"job_id": "a"}, event(seq) | {"job_id": "b"}])
        assert hub.frames.size <= 2000
    assert 0 < len(hub.frames) < 200
    assert hub.frames.get("a", 100) is not None  # the most recent are kept
    assert hub.frames.get("a", 1) is None
    hub.unsubscribe(subs[0])
    assert hub.frames.get("a", 100) is None
    assert hub.frames.get("b", 100) is not None
    hub.unsubscribe(subs[1])
    assert len(hub.frames) == 0
    assert hub.frames.size == 0


async def test_every_client_sends_the_same_frame_and_replays_from_the_cache() -> None:
    hub = EventHub()
    stored: list[dict[str, Any]] = []
    reads: list[int] = []

    async def read_after(_job: str, last: int) -> list[dict[str, Any]]:
        reads.append(last)
        return [e for e in stored if e["seq"] > last]

    async def is_finished(_job: str) -> bool:
        return False

    first = batches(hub, "j", 0, read_after, is_finished)
    stored.append(event(1, "job.queued"))
    assert [f.seq for f in await anext(first)] == [1]
    stored.extend([event(2), event(3)])
    hub.publish(stored[1:])
    live = await anext(first)
    assert [f.seq for f in live] == [2, 3]  # both were queued: one batch, one write

    reads.clear()
    second = batches(hub, "j", 1, read_after, is_finished)  # Last-Event-ID: 1
    replay = await anext(second)
    assert [f.seq for f in replay] == [2, 3]
    assert all(a is b for a, b in zip(replay, live, strict=True))  # encoded once
    assert reads == []  # from the cache

    delta = {"job_id": "j", "seq": 0, "type": "lane.delta", "data": {"text": "x"}}
    stored.append(event(4, "job.succeeded"))
    hub.publish([delta, stored[-1]])
    live_end, replay_end = await anext(first), await anext(second)
    assert [f.seq for f in live_end] == [0, 4]
    # The second client, still replaying, reads the table once (after what the cache
    # held), finds the final event there, and sends the frame the hub encoded for it.
    assert reads == [3]
    assert [f.seq for f in replay_end] == [4]
    assert replay_end[0] is live_end[1]
    for source in (first, second):
        with pytest.raises(StopAsyncIteration):
            await anext(source)
    assert hub.subscriber_count == 0
    assert len(hub.frames) == 0


async def test_a_replay_reads_the_table_where_the_cached_run_breaks() -> None:
    size = len(Frame.encode(event(1)).body)
    hub = EventHub(frame_cache_bytes=6 * size)
    follower = hub.subscribe("j")  # keeps the job's frames cached
    log = [event(1, "job.queued"), *(event(seq) for seq in range(2, 9)), event(9, "job.succeeded")]
    hub.publish(log[:6])
    for seq in (1, 2, 3):
        hub.frames.get("j", seq)  # recently used: 4, 5 and 6 go first
    hub.publish(log[6:])
    assert [seq for seq in range(1, 10) if hub.frames.get("j", seq)] == [1, 2, 3, 7, 8, 9]
    reads: list[int] = []

    async def read_after(_job: str, last: int) -> list[dict[str, Any]]:
        reads.append(last)
        return [e for e in log if e["seq"] > last]

    async def is_finished(_job: str) -> bool:
        return True

    async with asyncio.timeout(5):
        seqs = [e["seq"] async for e in stream(hub, "j", 0, read_after, is_finished)]
    assert seqs == list(range(1, 10))
    assert reads == [3]
    hub.unsubscribe(follower)


async def _nothing_stored(_job: str, _last: int) -> list[dict[str, Any]]:
    return []


async def _running(_job: str) -> bool:
    return False


async def test_a_quiet_stream_yields_an_empty_batch_for_a_keepalive_then_goes_on() -> None:
    hub = EventHub()
    frames = batches(hub, "j", 0, _nothing_stored, _running, keepalive_s=0.05)
    async with asyncio.timeout(5):
        assert await anext(frames) == []  # nothing for 50 ms
        assert await anext(frames) == []
        hub.publish([event(1, "job.queued"), event(2, "job.succeeded")])
        assert [frame.seq for frame in await anext(frames)] == [1, 2]
        with pytest.raises(StopAsyncIteration):
            await anext(frames)
    assert hub.subscriber_count == 0


async def test_a_hangup_ends_a_waiting_stream_and_one_not_started_yet() -> None:
    hub = EventHub()
    hangup = Hangup()
    frames = batches(hub, "j", 0, _nothing_stored, _running, hangup=hangup)
    waiting = asyncio.create_task(anext(frames))
    async with asyncio.timeout(5):
        while not hub.subscriber_count:
            await asyncio.sleep(0)
        hangup()
        with pytest.raises(StopAsyncIteration):
            await waiting
    assert hub.subscriber_count == 0
    # The client left before its stream began: it ends at once, subscribed to nothing.
    early = Hangup()
    early()
    assert [b async for b in batches(hub, "j", 0, _nothing_stored, _running, hangup=early)] == []
    assert hub.subscriber_count == 0


async def test_a_closed_hub_ends_every_stream_and_each_one_opened_after() -> None:
    hub = EventHub()
    streams = [batches(hub, job, 0, _nothing_stored, _running) for job in ("a", "b", "b")]
    waiting = [asyncio.create_task(anext(s)) for s in streams]
    async with asyncio.timeout(5):
        while hub.subscriber_count < 3:
            await asyncio.sleep(0)
        hub.close()
        for task in waiting:
            with pytest.raises(StopAsyncIteration):
                await task
        assert [b async for b in batches(hub, "c", 0, _nothing_stored, _running)] == []
    assert hub.subscriber_count == 0


async def test_a_stream_that_ends_leaves_no_reference_cycle_for_the_collector() -> None:
    """The response, its frames and the task waiting for the client all end without a
    cancellation: nothing of a finished stream waits for the garbage collector (under a
    burst of short streams its walks cost a tenth of the service's CPU)."""
    hub = EventHub()
    complete = asyncio.Event()
    sent: list[bytes] = []

    async def receive() -> dict[str, Any]:  # as uvicorn does: disconnect once complete
        await complete.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message.get("body", b""))
        if message["type"] == "http.response.body" and not message["more_body"]:
            complete.set()

    async def one_stream() -> None:
        hangup = Hangup()
        frames = batches(hub, "j", 0, _nothing_stored, _running, keepalive_s=60, hangup=hangup)
        response = EventStream(frames, hangup=hangup)
        scope = {"type": "http", "method": "GET"}
        serving = asyncio.create_task(response(scope, receive, send))  # type: ignore[arg-type]
        while not hub.subscriber_count:
            await asyncio.sleep(0)
        hub.publish([event(1, "job.queued"), event(2, "job.succeeded")])
        await serving
        for _ in range(3):  # the waiting task's last step
            await asyncio.sleep(0)

    gc.collect()
    gc.disable()
    try:
        async with asyncio.timeout(5):
            await one_stream()
        assert b"event: job.succeeded" in b"".join(sent) and sent[-1] == b""
        assert hub.subscriber_count == 0
        assert gc.collect() == 0
    finally:
        gc.enable()


async def _stays_connected() -> dict[str, Any]:
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


def _followed(hub: EventHub, hangup: Hangup) -> AsyncGenerator[list[Frame], None]:
    return batches(hub, "j", 0, _nothing_stored, _running, hangup=hangup)


async def test_head_answers_the_headers_of_the_stream_and_opens_none() -> None:
    hub = EventHub()
    hangup = Hangup()
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    response = EventStream(_followed(hub, hangup), hangup=hangup, headers={"X-A": "1"})
    async with asyncio.timeout(5):
        await response({"type": "http", "method": "HEAD"}, _stays_connected, send)  # type: ignore[arg-type]
    start, end = sent
    headers = dict(start["headers"])
    assert start["status"] == 200 and headers[b"content-type"].startswith(b"text/event-stream")
    assert headers[b"x-a"] == b"1" and end == {
        "type": "http.response.body",
        "body": b"",
        "more_body": False,
    }
    assert hub.subscriber_count == 0


async def test_a_client_that_reads_nothing_is_dropped_after_the_send_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    hub = EventHub()
    hangup = Hangup()

    async def send(message: dict[str, Any]) -> None:
        if b"event:" in message.get("body", b""):  # the client's buffers are full by now
            await asyncio.Event().wait()

    response = EventStream(_followed(hub, hangup), hangup=hangup, send_timeout=0.05)
    serving = asyncio.create_task(
        response({"type": "http", "method": "GET"}, _stays_connected, send)  # type: ignore[arg-type]
    )
    async with asyncio.timeout(5):
        while not hub.subscriber_count:
            await asyncio.sleep(0)
        hub.publish([event(1, "job.queued")])
        await serving  # returns: the response ends unfinished, the server closes it
    assert hub.subscriber_count == 0  # its subscription is gone with it
    assert "nothing read for 0.05s" in caplog.text
