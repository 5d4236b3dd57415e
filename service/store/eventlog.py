"""The event log: every job's events, numbered 1, 2, 3, ... in the transaction that
made the change they report (so a stream replays exactly what happened)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import partial
from typing import Any

from ..events import Event, encode
from ..states import EventType
from .db import Database, Tx
from .rendering import iso
from .statements import (
    BUMP_SEQ,
    CLOSE,
    CLOSE_MOVED,
    EVENTS_AFTER,
    INSERT_EVENTS,
    SET_LAST_SEQ,
    columns,
)

# (type, fields) of an event to append; the log adds job_id, seq and at.
Item = tuple[EventType, dict[str, Any]]


class EventLog:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def append(self, tx: Tx, job_id: str, items: Sequence[Item], now: float) -> None:
        """Append events to a job's log with consecutive sequence numbers. They are
        written at the end of the transaction, every job's in one insert, and published
        (to this process's streams, and by NOTIFY to others) on commit.

        A job the transaction locked (:func:`~service.store.jobrows.lock_jobs`) has its
        last number in ``tx.seqs``: the events are numbered from it, and its row updated
        once at the end. Any other job's row is updated now, which numbers them (and
        locks it)."""
        if not items:
            return
        last = tx.seqs.get(job_id)
        if last is None:
            bumped = {"job_id": job_id, "count": len(items)}
            last = (await tx.conn.execute(BUMP_SEQ, bumped)).scalar_one() - len(items)
        else:
            tx.seqs_moved.add(job_id)
        tx.seqs[job_id] = last + len(items)
        self._insert(tx, job_id, items, last + 1, now)

    async def append_new(self, tx: Tx, job_id: str, items: Sequence[Item], now: float) -> None:
        """The first events of a job being created, numbered from 1 (its row is written
        with ``last_seq`` = their number, in the same transaction)."""
        tx.seqs[job_id] = len(items)
        self._insert(tx, job_id, items, 1, now)

    def _insert(self, tx: Tx, job_id: str, items: Sequence[Item], first: int, now: float) -> None:
        at = iso(now)
        rows, published = [], []
        for offset, (kind, fields) in enumerate(items):
            seq = first + offset
            data = {"job_id": job_id, "seq": seq, "at": at, **fields}
            text = encode(data)  # once: stored, and sent as it is
            rows.append({"job_id": job_id, "seq": seq, "type": kind, "data": text})
            published.append(
                {"job_id": job_id, "seq": seq, "type": kind, "data": data, "text": text}
            )
        if not tx.unwritten:
            tx.before_commit.append(partial(self._write, tx))
        tx.unwritten.extend(rows)
        tx.events.extend(published)

    @staticmethod
    async def _write(tx: Tx) -> None:
        """The transaction's events, and its locked jobs' new last numbers (on PostgreSQL
        with the notifications, in one statement)."""
        moved = sorted(tx.seqs_moved)
        if tx.binds_arrays:
            notes, tx.notes = tx.notes, []
            params = {
                **columns(tx.unwritten),
                "channel": [channel for channel, _ in notes],
                "payload": [payload for _, payload in notes],
            }
            if moved:
                params |= {"moved_j": moved, "moved_seq": [tx.seqs[job_id] for job_id in moved]}
            await tx.conn.execute(CLOSE_MOVED if moved else CLOSE, params)
            return
        if moved:
            await tx.conn.execute(SET_LAST_SEQ, [{"j": j, "seq": tx.seqs[j]} for j in moved])
        await tx.conn.execute(INSERT_EVENTS, tx.unwritten)

    async def after(self, job_id: str, after: int, limit: int = 1000) -> list[Event]:
        """Up to ``limit`` stored events of the job after seq ``after``, in order."""
        return [
            {**event, "data": json.loads(event["text"])}
            for event in await self.stored(job_id, after, limit)
        ]

    async def stored(self, job_id: str, after: int, limit: int = 1000) -> list[Event]:
        """:meth:`after` as a stream sends them: their data as stored text, not decoded."""
        async with self.db.read() as conn:
            rows = (
                await conn.execute(EVENTS_AFTER, {"job_id": job_id, "after": after, "limit": limit})
            ).all()
        return [
            {"job_id": job_id, "seq": seq, "type": kind, "text": text} for seq, kind, text in rows
        ]
