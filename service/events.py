"""Per-job event broadcast, and the stream a client reads: stored events, then live ones.

The database is the source of truth; the hub is only a doorbell that also carries
the event, so a subscriber that keeps up never reads the table. A subscriber that
sees a gap (it fell behind, or events of one job were committed by two
transactions whose notifications crossed) reads the missing ones from the table::

    client ──GET /events (Last-Event-ID: k)──► stream()
                                                 │ subscribe first (nothing is missed)
                                                 │ replay seq > k from the table
                                                 │ then live: seq == last+1 → send
                                                 │            seq >  last+1 → read gap from table
                                                 │            seq <= last   → drop (duplicate)
                                                 └ final event → close
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

FINAL = frozenset({"job.succeeded", "job.failed", "job.cancelled"})
QUEUE_LIMIT = 2048

Event = dict[str, Any]  # {"job_id", "seq", "type", "data"}; seq 0 for live-only events


@dataclass(eq=False)
class Subscription:
    job_id: str
    queue: asyncio.Queue[Event] = field(default_factory=lambda: asyncio.Queue(QUEUE_LIMIT))
    lagged: bool = False

    def offer(self, event: Event) -> None:
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            # The client is slow: drop, and let it read the gap from the table.
            self.lagged = True


class EventHub:
    def __init__(self) -> None:
        self._subscribers: dict[str, set[Subscription]] = {}
        self._listeners: list[Callable[[list[Event]], None]] = []

    @property
    def subscriber_count(self) -> int:
        return sum(len(subs) for subs in self._subscribers.values())

    def add_listener(self, listener: Callable[[list[Event]], None]) -> None:
        """Called with every batch of committed events (the runner stops lanes with it)."""
        self._listeners.append(listener)

    def publish(self, events: list[Event]) -> None:
        for listener in self._listeners:
            listener(events)
        for event in events:
            for sub in self._subscribers.get(event["job_id"], ()):
                sub.offer(event)

    def resync(self) -> None:
        """Make every subscriber re-read its job's log from the table: events may have
        been committed that never reached this hub (the PostgreSQL listener was down).

        A subscriber waiting on an empty queue is woken by a marker with seq -1, which
        :func:`stream` never yields: it either finds ``lagged`` set, or, when an earlier
        item already triggered the re-read, drops it (its seq is never ``last + 1``:
        ``last`` is at least 1 by then, every job's log starting with ``job.queued``).
        """
        for subs in self._subscribers.values():
            for sub in subs:
                sub.lagged = True
                sub.offer({"job_id": sub.job_id, "seq": -1, "type": "hub.resync", "data": {}})

    def subscribe(self, job_id: str) -> Subscription:
        sub = Subscription(job_id)
        self._subscribers.setdefault(job_id, set()).add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        subs = self._subscribers.get(sub.job_id)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subscribers[sub.job_id]


PAGE = 1000


async def _stored(
    read_after: Callable[[str, int], Awaitable[list[Event]]], job_id: str, after: int
) -> AsyncIterator[Event]:
    while True:
        page = await read_after(job_id, after)
        for event in page:
            yield event
            after = event["seq"]
        if len(page) < PAGE:
            return


async def stream(
    hub: EventHub,
    job_id: str,
    after: int,
    read_after: Callable[[str, int], Awaitable[list[Event]]],
    is_finished: Callable[[str], Awaitable[bool]],
) -> AsyncIterator[Event]:
    """Every event of the job after ``after``, exactly once and in order, then live
    ones until the final event. ``read_after`` reads up to ``PAGE`` stored events and
    opens and closes its own connection, so none is held while the stream idles."""
    sub = hub.subscribe(job_id)
    last = after
    try:
        catch_up = True
        first = True
        while True:
            if catch_up:
                catch_up = sub.lagged = False
                async for event in _stored(read_after, job_id, last):
                    yield event
                    last = event["seq"]
                    if event["type"] in FINAL:
                        return
                # A finished job's events are all stored: read what was committed since
                # the replay above (it ends with the final event); a client already past
                # the final event (Last-Event-ID) gets nothing more. Either way, close.
                if first and await is_finished(job_id):
                    async for event in _stored(read_after, job_id, last):
                        yield event
                    return
                first = False
            event = await sub.queue.get()
            seq = event["seq"]
            if sub.lagged or seq > last + 1:
                catch_up = True
            elif seq == 0:  # live only (lane.delta): never stored, never replayed
                yield event
            elif seq == last + 1:
                yield event
                last = seq
                if event["type"] in FINAL:
                    return
    finally:
        hub.unsubscribe(sub)
