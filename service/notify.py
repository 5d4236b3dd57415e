"""PostgreSQL LISTEN/NOTIFY: committed events and new work reach every process.

Writers notify inside the transaction (:meth:`service.db.Database.transaction`), so
PostgreSQL delivers on commit, never for a rollback, and in commit order. A payload
carries ids, never an event body (PostgreSQL caps it at 8000 bytes)::

    fanout_events  {"o": ORIGIN, "j": [[JOB_ID, FIRST_SEQ, LAST_SEQ], ...]}
    fanout_work    {"o": ORIGIN}     a job was queued or a lane requeued: claim
    fanout_deltas  {"o": ORIGIN, "d": [DATA, ...]}   live lane.delta events (never
                   stored), sent by :class:`DeltaRelay` outside any transaction

``ORIGIN`` names the writing process (its :class:`~service.db.Database`). A process
skips its own notifications: its hub published those events on commit already.

One :class:`Listener` per process holds one dedicated connection::

    NOTIFY ─► _on_notification (a sync asyncpg callback: no I/O here)
                │ fanout_events: queue (job, first, last), ring the doorbell
                │ fanout_work:   wake()
                │ fanout_deltas: hub.publish at once (live only, carried whole)
                ▼
              _serve: read the queued ranges from the events table on the same
                      connection ─► hub.publish (streams, and the runner, which stops
                      lanes that another process cancelled or skipped)

    connection lost ─► reconnect with backoff ─► LISTEN ─► hub.resync() + wake()

Notifications sent while the connection was down are lost for good. After LISTEN is
back, :meth:`EventHub.resync` makes every live stream re-read its job's log from the
table after the last seq it delivered: whatever was committed before LISTEN is in
the table, whatever after arrives as a notification, so nothing falls in between.
One ``wake()`` makes the runner look for work queued meanwhile. Ranges queued but
not yet read when the connection dropped are read on the next one.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import asyncpg  # type: ignore[import-untyped]
from sqlalchemy.engine import make_url

from .events import Event, EventHub
from .policy import backoff
from .states import EventType

log = logging.getLogger("fanout.notify")

EVENTS_CHANNEL = "fanout_events"
WORK_CHANNEL = "fanout_work"
DELTAS_CHANNEL = "fanout_deltas"
# PostgreSQL refuses payloads of 8000 bytes or more; stay clear of the limit.
MAX_PAYLOAD = 7800
# Events after which a lane may be claimable by any process.
WAKING_EVENTS = frozenset({EventType.JOB_QUEUED, EventType.LANE_RETRYING})

Range = tuple[str, int, int]  # job id, first seq, last seq
Connect = Callable[..., Awaitable[Any]]
Notify = Callable[[list[tuple[str, str]]], Awaitable[None]]


# --- the wire format -----------------------------------------------------------------


def notifications(origin: str, events: Sequence[Event]) -> list[tuple[str, str]]:
    """(channel, payload) pairs announcing a transaction's events, each payload under
    :data:`MAX_PAYLOAD` bytes: the seq range of every job touched, and a wake-up for
    workers when the events made lanes claimable."""
    ranges: dict[str, list[int]] = {}
    for event in events:
        seqs = ranges.setdefault(event["job_id"], [event["seq"], event["seq"]])
        seqs[0] = min(seqs[0], event["seq"])
        seqs[1] = max(seqs[1], event["seq"])
    head = json.dumps({"o": origin, "j": []}, separators=(",", ":"))
    notes: list[tuple[str, str]] = []
    chunk: list[str] = []
    size = len(head)
    for job_id, (first, last) in ranges.items():
        item = json.dumps([job_id, first, last], separators=(",", ":"))
        if chunk and size + len(item) + 1 > MAX_PAYLOAD:
            notes.append((EVENTS_CHANNEL, _events_payload(origin, chunk)))
            chunk, size = [], len(head)
        chunk.append(item)
        size += len(item) + 1
    if chunk:
        notes.append((EVENTS_CHANNEL, _events_payload(origin, chunk)))
    if any(event["type"] in WAKING_EVENTS for event in events):
        notes.append((WORK_CHANNEL, json.dumps({"o": origin}, separators=(",", ":"))))
    return notes


def _events_payload(origin: str, items: list[str]) -> str:
    return f'{{"o":{json.dumps(origin)},"j":[{",".join(items)}]}}'


def delta_notifications(origin: str, events: Sequence[Event]) -> list[tuple[str, str]]:
    """``lane.delta`` events as payloads under :data:`MAX_PAYLOAD` bytes: as many events
    as fit in each, and an event whose text alone is too long split into several (a
    client joining the texts gets the same text)."""
    head = len(_deltas_payload(origin, []))
    notes: list[tuple[str, str]] = []
    chunk: list[str] = []
    size = head
    for event in events:
        for item in _delta_items(event["data"], MAX_PAYLOAD - head):
            length = len(item.encode())  # PostgreSQL's limit is in bytes
            if chunk and size + length + 1 > MAX_PAYLOAD:
                notes.append((DELTAS_CHANNEL, _deltas_payload(origin, chunk)))
                chunk, size = [], head
            chunk.append(item)
            size += length + 1
    if chunk:
        notes.append((DELTAS_CHANNEL, _deltas_payload(origin, chunk)))
    return notes


def _delta_items(data: dict[str, Any], room: int) -> list[str]:
    """The event's data as JSON, in pieces of at most ``room`` bytes (cut in its text)."""
    item = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    text = data.get("text", "")
    if len(item.encode()) <= room or len(text) < 2:
        return [item]
    half = len(text) // 2
    return [
        *_delta_items({**data, "text": text[:half]}, room),
        *_delta_items({**data, "text": text[half:]}, room),
    ]


def _deltas_payload(origin: str, items: list[str]) -> str:
    return f'{{"o":{json.dumps(origin)},"d":[{",".join(items)}]}}'


class DeltaRelay:
    """``lane.delta`` events to this process's hub at once, and to every other process
    through ``fanout_deltas``: batched, one ``NOTIFY`` statement every ``interval_s``
    at most (a lane's deltas come about ten times a second; a thousand streaming lanes
    must not make ten thousand round trips)."""

    def __init__(
        self, hub: EventHub, send: Notify, *, origin: str, interval_s: float = 0.05
    ) -> None:
        self.hub = hub
        self.send = send
        self.origin = origin
        self.interval_s = interval_s
        self._pending: list[Event] = []
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._published = 0  # events published so far
        self._relayed = 0  # of those, sent (or given up on)
        self._progress = asyncio.Condition()

    def publish(self, events: list[Event]) -> None:
        self.hub.publish(events)
        self._pending.extend(events)
        self._published += len(events)
        self._ready.set()

    async def sent(self) -> None:
        """Wait until what was published so far has been sent: a lane's last deltas go
        out before its outcome is recorded, so no replica sees the lane end first."""
        target = self._published
        async with self._progress:
            await self._progress.wait_for(
                lambda: self._relayed >= target or self._task is None or self._task.done()
            )

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="delta relay")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        async with self._progress:
            self._progress.notify_all()  # nobody waits for a relay that stopped

    async def _run(self) -> None:
        while True:
            await self._ready.wait()
            self._ready.clear()
            batch, self._pending = self._pending, []
            try:
                await self.send(delta_notifications(self.origin, batch))
            except Exception as exc:  # live only: a lost delta is not worth a retry
                log.warning("could not relay %d deltas: %s", len(batch), exc)
            async with self._progress:
                self._relayed += len(batch)
                self._progress.notify_all()
            await asyncio.sleep(self.interval_s)


def asyncpg_dsn(url: str) -> str:
    """``postgresql+asyncpg://...`` (SQLAlchemy's form) as asyncpg's ``postgresql://...``."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


# --- the listener --------------------------------------------------------------------

_READ_RANGES = """
SELECT e.job_id, e.seq, e.type, e.data::text
FROM unnest($1::text[], $2::int[], $3::int[]) AS r(job_id, first_seq, last_seq)
JOIN events e ON e.job_id = r.job_id AND e.seq BETWEEN r.first_seq AND r.last_seq
ORDER BY e.job_id, e.seq
"""
_READ_BATCH = 500  # ranges per query


class Listener:
    """Delivers other processes' committed events into ``hub`` and calls ``wake`` when
    they queued work (``wake=None``: an API-only process does not listen for work).

    ``connect`` is asyncpg's by default; tests pass one that can hold a reconnect.
    """

    def __init__(
        self,
        url: str,
        hub: EventHub,
        *,
        origin: str,
        wake: Callable[[], None] | None = None,
        connect: Connect = asyncpg.connect,
        check_interval_s: float = 10.0,
        timeout_s: float = 10.0,
        backoff_s: tuple[float, float] = (0.1, 5.0),
    ) -> None:
        self.dsn = asyncpg_dsn(url)
        self.hub = hub
        self.origin = origin
        self.wake = wake
        self.connect = connect
        self.check_interval_s = check_interval_s
        self.timeout_s = timeout_s
        self.backoff_s = backoff_s
        self.application_name = f"fanout listener {origin}"
        #: Set while LISTENing; cleared as soon as the connection is known to be lost.
        self.connected = asyncio.Event()
        #: Connections made so far (the first one included).
        self.connections = 0
        self._pending: list[Range] = []
        self._ring = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start listening; return once LISTEN is in place, or after ``timeout_s`` (then
        it keeps trying in the background, and catches up when it gets through)."""
        self._task = asyncio.create_task(self._run(), name="notify listener")
        try:
            async with asyncio.timeout(self.timeout_s):
                await self.connected.wait()
        except TimeoutError:
            log.warning("not listening for notifications yet; retrying in the background")

    async def stop(self) -> None:
        """Stop listening and close the connection."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    # --- connection lifecycle ------------------------------------------------------

    async def _run(self) -> None:
        failures = 0  # in a row: the backoff grows with them
        while True:
            conn: Any = None
            try:
                async with asyncio.timeout(self.timeout_s):
                    conn = await self.connect(
                        self.dsn, server_settings={"application_name": self.application_name}
                    )
                    conn.add_termination_listener(self._on_lost)
                    await conn.add_listener(EVENTS_CHANNEL, self._on_notification)
                    await conn.add_listener(DELTAS_CHANNEL, self._on_notification)
                    if self.wake is not None:
                        await conn.add_listener(WORK_CHANNEL, self._on_notification)
                self.connections += 1
                self.connected.set()
                failures = 0
                self._catch_up()
                await self._serve(conn)
            except Exception as exc:
                log.warning("notification listener: %s: %s; reconnecting", type(exc).__name__, exc)
            finally:
                self.connected.clear()
                if conn is not None:
                    await _close(conn)
            failures += 1
            await asyncio.sleep(backoff(failures, *self.backoff_s))

    def _catch_up(self) -> None:
        """After (re)connecting: whatever was committed while nobody listened is in the
        table; make streams re-read it and the runner look for work."""
        self.hub.resync()
        if self.wake is not None:
            self.wake()
        if self._pending:
            self._ring.set()

    async def _serve(self, conn: Any) -> None:
        while not conn.is_closed():
            if not self._pending:
                try:
                    async with asyncio.timeout(self.check_interval_s):
                        await self._ring.wait()
                except TimeoutError:
                    # A peer that vanished without closing (network partition) sends
                    # nothing: only a query notices.
                    await conn.fetchval("SELECT 1", timeout=self.timeout_s)
                self._ring.clear()
                continue
            batch, self._pending = self._pending[:_READ_BATCH], self._pending[_READ_BATCH:]
            try:
                events = await self._read(conn, batch)
            except BaseException:
                self._pending[:0] = batch  # read them on the next connection
                raise
            if events:
                self.hub.publish(events)
        raise ConnectionError("the connection was closed")

    async def _read(self, conn: Any, ranges: list[Range]) -> list[Event]:
        ranges = list(dict.fromkeys(ranges))
        rows = await conn.fetch(
            _READ_RANGES,
            [r[0] for r in ranges],
            [r[1] for r in ranges],
            [r[2] for r in ranges],
            timeout=self.timeout_s,
        )
        return [
            {"job_id": job_id, "seq": seq, "type": kind, "data": json.loads(text), "text": text}
            for job_id, seq, kind, text in rows
        ]

    # --- asyncpg callbacks (sync, on the loop: queue work, never await) --------------

    def _on_notification(self, _conn: Any, _pid: int, channel: str, payload: str) -> None:
        try:
            message = json.loads(payload)
            if message["o"] == self.origin:
                return
            if channel == WORK_CHANNEL:
                if self.wake is not None:
                    self.wake()
                return
            if channel == DELTAS_CHANNEL:
                self.hub.publish([_delta_event(data) for data in message["d"]])
                return
            ranges = [(str(job), int(first), int(last)) for job, first, last in message["j"]]
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring a malformed notification on %s: %.200s", channel, payload)
            return
        self._pending.extend(ranges)
        self._ring.set()

    def _on_lost(self, _conn: Any) -> None:
        self.connected.clear()
        self._ring.set()  # _serve sees the closed connection and returns


def _delta_event(data: dict[str, Any]) -> Event:
    return {"job_id": str(data["job_id"]), "seq": 0, "type": EventType.LANE_DELTA, "data": data}


async def _close(conn: Any) -> None:
    try:
        await conn.close(timeout=2)
    except Exception:
        conn.terminate()
