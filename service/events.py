"""Per-job event broadcast, and the stream a client reads: stored events, then live ones.

The database is the source of truth; the hub is only a doorbell that also carries
the event (as its frame), so a subscriber that keeps up never reads the table. A subscriber that
sees a gap (it fell behind, or events of one job were committed by two
transactions whose notifications crossed) reads the missing ones from the table::

    client ──GET /events (Last-Event-ID: k)──► batches()
                                                 │ subscribe first (nothing is missed)
                                                 │ replay seq > k: cached frames, then the table
                                                 │ then live: seq == last+1 → send
                                                 │            seq >  last+1 → read gap (as above)
                                                 │            seq <= last   → drop (duplicate)
                                                 └ final event → close

Each event's data is encoded once, as it is appended (:class:`Encoded`): stored as
that text, framed from it (a :class:`Frame`, its SSE bytes) however many clients send
it, and replayed from the table as it is, never decoded. The hub frames what it
publishes to a followed job and keeps the frames of followed jobs in a
:class:`FrameCache`, which replays read before the table. A job's sequence numbers
are consecutive from 1 and every cached frame was committed, so a run of cached
frames after ``k`` is exactly what the table holds there; the table is read from
where the run ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from .states import FINAL_EVENTS

QUEUE_LIMIT = 2048
FRAME_CACHE_BYTES = 8 * 2**20

# {"job_id", "seq", "type", "data"}; seq 0 for live-only events. An event from the log
# also has its data as stored, "text" (see Encoded); one read for a stream has only that.
Event = dict[str, Any]


class Encoded(str):
    """An event's data as JSON text, compact and on one line: encoded once as it is
    appended, then stored as it is (the engines' JSON serializer passes it through,
    :func:`store_json`) and sent as it is in the event's frame; a replay reads it back
    as text and sends it without decoding it."""


_compact = json.JSONEncoder(separators=(",", ":")).encode


def encode(data: Any) -> Encoded:
    """Compact JSON on one line. orjson writes it ten times faster than ``json`` (an
    event of every lane of every job is encoded on the loop); what orjson refuses and
    ``json`` writes (integers past 64 bits, keys that are not strings, lone surrogates)
    is written by ``json``, escaped to ASCII."""
    try:
        return Encoded(orjson.dumps(data).decode())
    except TypeError:
        return Encoded(_compact(data))


def store_json(value: Any) -> str:
    """What a JSON column stores: ``value`` encoded, or as it is if it already is."""
    return value if type(value) is Encoded else json.dumps(value)


@dataclass(frozen=True, slots=True)
class Frame:
    """One event as the stream sends it: ``id:`` (none for seq 0, live-only events),
    ``event:`` and ``data:`` lines, ``\\r\\n``-separated as sse-starlette writes them.
    Compact JSON escapes every line break, so the data is always a single line."""

    seq: int
    type: str
    body: bytes

    @classmethod
    def encode(cls, event: Event) -> Frame:
        seq, kind = event["seq"], event["type"]
        data = event.get("text") or encode(event["data"])
        head = f"id: {seq}\r\nevent: {kind}\r\n" if seq else f"event: {kind}\r\n"
        return cls(seq, kind, f"{head}data: {data}\r\n\r\n".encode())

    def event(self, job_id: str) -> Event:
        """The event again, decoded from the frame."""
        data = json.loads(self.body[self.body.index(b"data: ") + 6 :])
        return {"job_id": job_id, "seq": self.seq, "type": self.type, "data": data}


class FrameCache:
    """Frames of stored events by (job, seq), least recently used evicted first once
    their bodies pass ``max_bytes``. A frame larger than that is not kept."""

    def __init__(self, max_bytes: int = FRAME_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self.size = 0  # bytes of the bodies held
        self._frames: OrderedDict[tuple[str, int], Frame] = OrderedDict()
        self._seqs: dict[str, set[int]] = {}

    def __len__(self) -> int:
        return len(self._frames)

    def get(self, job_id: str, seq: int) -> Frame | None:
        frame = self._frames.get((job_id, seq))
        if frame is not None:
            self._frames.move_to_end((job_id, seq))
        return frame

    def add(self, job_id: str, frame: Frame) -> None:
        key = (job_id, frame.seq)
        if key in self._frames or len(frame.body) > self.max_bytes:
            return
        self._frames[key] = frame
        self._seqs.setdefault(job_id, set()).add(frame.seq)
        self.size += len(frame.body)
        while self.size > self.max_bytes:
            (old_job, old_seq), old = self._frames.popitem(last=False)
            self.size -= len(old.body)
            seqs = self._seqs[old_job]
            seqs.discard(old_seq)
            if not seqs:
                del self._seqs[old_job]

    def drop(self, job_id: str) -> None:
        for seq in self._seqs.pop(job_id, ()):
            self.size -= len(self._frames.pop((job_id, seq)).body)


# Markers that wake a waiting stream, never sent (their seq is never ``last + 1``): to
# re-read its job's log (see EventHub.resync), or to see that it ended or is idle.
_RESYNC = Frame(-1, "hub.resync", b"")
_WAKE = Frame(-1, "stream.wake", b"")


@dataclass(eq=False)
class Subscription:
    job_id: str
    queue: asyncio.Queue[Frame] = field(default_factory=lambda: asyncio.Queue(QUEUE_LIMIT))
    lagged: bool = False
    # No more frames: the client left, or the server is stopping.
    ended: bool = False

    def offer(self, frame: Frame) -> None:
        try:
            self.queue.put_nowait(frame)
        except asyncio.QueueFull:
            # The client is slow: drop, and let it read the gap from the table.
            self.lagged = True

    def wake(self) -> None:
        """Wake the stream if it waits on an empty queue (a full one is not waited on)."""
        with contextlib.suppress(asyncio.QueueFull):
            self.queue.put_nowait(_WAKE)

    def end(self) -> None:
        self.ended = True
        self.wake()


@dataclass(eq=False)
class Hangup:
    """Ends a stream from outside, waiting or not: called when its client leaves."""

    called: bool = False
    sub: Subscription | None = None

    def __call__(self) -> None:
        self.called = True
        if self.sub is not None:
            self.sub.end()


class EventHub:
    def __init__(self, frame_cache_bytes: int = FRAME_CACHE_BYTES) -> None:
        self._subscribers: dict[str, set[Subscription]] = {}
        self._listeners: list[Callable[[list[Event]], None]] = []
        self.frames = FrameCache(frame_cache_bytes)
        # Set when the server stops: every stream ends, and new ones end at once.
        self.closed = False

    @property
    def subscriber_count(self) -> int:
        return sum(len(subs) for subs in self._subscribers.values())

    def add_listener(self, listener: Callable[[list[Event]], None]) -> None:
        """Called with every batch of committed events (the runner stops lanes with it)."""
        self._listeners.append(listener)

    def frame(self, event: Event) -> Frame:
        """The event's frame: the cached one, or encoded now (and cached if stored)."""
        seq = event["seq"]
        if seq <= 0:
            return Frame.encode(event)
        frame = self.frames.get(event["job_id"], seq)
        if frame is None:
            frame = Frame.encode(event)
            self.frames.add(event["job_id"], frame)
        return frame

    def publish(self, events: list[Event]) -> None:
        for listener in self._listeners:
            listener(events)
        for event in events:
            subs = self._subscribers.get(event["job_id"])
            if subs:  # a job nobody follows is not encoded
                frame = self.frame(event)
                for sub in subs:
                    sub.offer(frame)

    def resync(self) -> None:
        """Make every subscriber re-read its job's log from the table: events may have
        been committed that never reached this hub (the PostgreSQL listener was down).

        A subscriber waiting on an empty queue is woken by a marker with seq -1, which
        :func:`batches` never yields: it either finds ``lagged`` set, or, when an earlier
        item already triggered the re-read, drops it (its seq is never ``last + 1``:
        ``last`` is at least 1 by then, every job's log starting with ``job.queued``).
        """
        for subs in self._subscribers.values():
            for sub in subs:
                sub.lagged = True
                sub.offer(_RESYNC)

    def close(self) -> None:
        """End every stream, now and from now on: the server is stopping, and its
        connections close once their responses end (clients reconnect elsewhere)."""
        self.closed = True
        for subs in self._subscribers.values():
            for sub in subs:
                sub.end()

    def subscribe(self, job_id: str) -> Subscription:
        sub = Subscription(job_id, ended=self.closed)
        self._subscribers.setdefault(job_id, set()).add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        subs = self._subscribers.get(sub.job_id)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subscribers[sub.job_id]
                # Frames are kept while someone follows the job: a client that comes
                # back later reads the table once, and the cache holds no dead jobs.
                self.frames.drop(sub.job_id)


PAGE = 1000


def _upto_final(batch: list[Frame]) -> tuple[list[Frame], bool]:
    """The batch up to and including the job's final event, and whether it had one."""
    for i, frame in enumerate(batch):
        if frame.type in FINAL_EVENTS:
            return batch[: i + 1], True
    return batch, False


async def _stored(
    hub: EventHub,
    read_after: Callable[[str, int], Awaitable[list[Event]]],
    job_id: str,
    after: int,
) -> AsyncIterator[list[Frame]]:
    """The stored frames after ``after``, up to ``PAGE`` at a time: cached ones while
    the seqs run on (consecutive, all committed: no read needed), then the table's."""
    while True:
        run: list[Frame] = []
        while len(run) < PAGE and (frame := hub.frames.get(job_id, after + 1)) is not None:
            run.append(frame)
            after = frame.seq
        if run:
            yield run
            if len(run) == PAGE:
                continue
        page = await read_after(job_id, after)
        if page:
            batch = [hub.frame(event) for event in page]
            yield batch
            after = batch[-1].seq
        if len(page) < PAGE:
            return


async def batches(
    hub: EventHub,
    job_id: str,
    after: int,
    read_after: Callable[[str, int], Awaitable[list[Event]]],
    is_finished: Callable[[str], Awaitable[bool]],
    *,
    keepalive_s: float | None = None,
    hangup: Hangup | None = None,
) -> AsyncGenerator[list[Frame], None]:
    """Every event of the job after ``after``, exactly once and in order, then live
    ones until the final event, as frames shared with every other client. ``read_after``
    reads up to ``PAGE`` stored events and opens and closes its own connection, so none
    is held while the stream idles.

    Frames come in batches (at most ``PAGE``): a replayed page, or every live frame
    already queued when the client is ready for more, so a client that fell behind
    catches up in a few large writes instead of one per event. An empty batch says
    nothing came for ``keepalive_s`` (time for a keep-alive). The batches end early,
    while waiting or not, when ``hangup`` is called or the hub closes.
    """
    sub = hub.subscribe(job_id)
    if hangup is not None:
        hangup.sub = sub
        if hangup.called:
            sub.ended = True
    last = after
    loop = asyncio.get_running_loop()
    try:
        catch_up = True
        first = True
        while not sub.ended:
            if catch_up:
                catch_up = sub.lagged = False
                async for page in _stored(hub, read_after, job_id, last):
                    batch, final = _upto_final(page)
                    yield batch
                    last = batch[-1].seq
                    if final:
                        return
                # A finished job's events are all stored: read what was committed since
                # the replay above (it ends with the final event); a client already past
                # the final event (Last-Event-ID) gets nothing more. Either way, close.
                if first and await is_finished(job_id):
                    async for page in _stored(hub, read_after, job_id, last):
                        yield page
                    return
                first = False
            batch = []
            final = False
            if keepalive_s is None or not sub.queue.empty():
                frame = await sub.queue.get()
            else:
                # A timer, not a timeout: nothing is cancelled if a frame comes first.
                timer = loop.call_later(keepalive_s, sub.wake)
                frame = await sub.queue.get()
                timer.cancel()
                if frame is _WAKE and sub.queue.empty() and not sub.lagged:
                    if not sub.ended:
                        yield []
                    continue
            while True:
                seq = frame.seq
                if sub.lagged or seq > last + 1:
                    catch_up = True  # after sending what came before the gap
                    break
                if seq == 0:  # live only (lane.delta): never stored, never replayed
                    batch.append(frame)
                elif seq == last + 1:
                    batch.append(frame)
                    last = seq
                    if frame.type in FINAL_EVENTS:
                        final = True
                        break
                # else a duplicate: drop it
                if sub.queue.empty() or len(batch) >= PAGE:
                    break
                frame = sub.queue.get_nowait()
            if batch:
                yield batch
            if final:
                return
    finally:
        if hangup is not None:
            hangup.sub = None
        hub.unsubscribe(sub)


async def stream(
    hub: EventHub,
    job_id: str,
    after: int,
    read_after: Callable[[str, int], Awaitable[list[Event]]],
    is_finished: Callable[[str], Awaitable[bool]],
) -> AsyncIterator[Event]:
    """:func:`batches` as single events, for readers other than the HTTP stream."""
    source = batches(hub, job_id, after, read_after, is_finished)
    async with contextlib.aclosing(source):
        async for batch in source:
            for frame in batch:
                yield frame.event(job_id)
