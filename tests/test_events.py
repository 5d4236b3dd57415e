"""The stream's replay-then-live logic, driven with an in-memory event log."""

from __future__ import annotations

import asyncio
from typing import Any

from service.events import EventHub, stream


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
