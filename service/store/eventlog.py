"""The event log: every job's events, numbered 1, 2, 3, ... in the transaction that
made the change they report (so a stream replays exactly what happened)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..states import EventType
from .db import Database, Tx
from .rendering import iso
from .statements import BUMP_SEQ, EVENTS_AFTER, INSERT_EVENTS

# (type, fields) of an event to append; the log adds job_id, seq and at.
Item = tuple[EventType, dict[str, Any]]


class EventLog:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def append(self, tx: Tx, job_id: str, items: Sequence[Item], now: float) -> None:
        """Append events to a job's log with consecutive sequence numbers. They are
        published (to this process's streams, and by NOTIFY to others) on commit."""
        if not items:
            return
        last = (
            await tx.conn.execute(BUMP_SEQ, {"job_id": job_id, "count": len(items)})
        ).scalar_one()
        await self._insert(tx, job_id, items, last - len(items) + 1, now)

    async def append_new(self, tx: Tx, job_id: str, items: Sequence[Item], now: float) -> None:
        """The first events of a job being created, numbered from 1 (its row is written
        with ``last_seq`` = their number, in the same transaction)."""
        await self._insert(tx, job_id, items, 1, now)

    async def _insert(
        self, tx: Tx, job_id: str, items: Sequence[Item], first: int, now: float
    ) -> None:
        at = iso(now)
        rows = []
        for offset, (kind, fields) in enumerate(items):
            seq = first + offset
            data = {"job_id": job_id, "seq": seq, "at": at, **fields}
            rows.append({"job_id": job_id, "seq": seq, "type": kind, "data": data})
        await tx.conn.execute(INSERT_EVENTS, rows)
        tx.events.extend(rows)

    async def after(self, job_id: str, after: int, limit: int = 1000) -> list[dict[str, Any]]:
        """Up to ``limit`` stored events of the job after seq ``after``, in order."""
        async with self.db.read() as conn:
            rows = (
                await conn.execute(EVENTS_AFTER, {"job_id": job_id, "after": after, "limit": limit})
            ).all()
        return [
            {"job_id": job_id, "seq": seq, "type": kind, "data": data} for seq, kind, data in rows
        ]
