"""The part of the store every layer uses (see :mod:`service.store`)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

from pydantic import TypeAdapter
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from ..db import Database, Tx
from ..errors import NotFound
from ..models import jobs
from ..spec import JobSpec, SectioningSpec, VotingSpec
from .rows import iso, known_form
from .statements import BUMP_SEQ, INSERT_EVENTS

_spec_adapter: TypeAdapter[VotingSpec | SectioningSpec] = TypeAdapter(JobSpec)


class StoreBase:
    """What every part of the store shares: the database, the parsed-spec cache, the
    event log's append and the job lock."""

    def __init__(self, db: Database, *, lease_seconds: float) -> None:
        self.db = db
        self.lease_seconds = lease_seconds
        self._specs: OrderedDict[str, VotingSpec | SectioningSpec] = OrderedDict()

    def spec_of(self, job_id: str, raw: dict[str, Any]) -> VotingSpec | SectioningSpec:
        """Parsed specs are cached: the hot path reads them once per lane outcome."""
        spec = self._specs.get(job_id)
        if spec is None:
            spec = _spec_adapter.validate_python(raw)
            self._specs[job_id] = spec
            if len(self._specs) > 2048:
                self._specs.popitem(last=False)
        return spec

    async def _append(
        self, tx: Tx, job_id: str, items: Sequence[tuple[str, dict[str, Any]]], now: float
    ) -> None:
        """Append events to a job's log with consecutive sequence numbers."""
        if not items:
            return
        last = (
            await tx.conn.execute(BUMP_SEQ, {"job_id": job_id, "count": len(items)})
        ).scalar_one()
        at = iso(now)
        rows = []
        for offset, (kind, fields) in enumerate(items):
            seq = last - len(items) + 1 + offset
            data = {"job_id": job_id, "seq": seq, "at": at, **fields}
            rows.append({"job_id": job_id, "seq": seq, "type": kind, "data": data})
        await tx.conn.execute(INSERT_EVENTS, rows)
        tx.events.extend(rows)

    async def _lock_jobs(self, tx: Tx, job_ids: Iterable[str]) -> dict[str, Any]:
        ids = sorted(set(job_ids))
        query = select(jobs).where(jobs.c.id.in_(ids)).order_by(jobs.c.id)
        if not self.db.is_sqlite:
            query = query.with_for_update()
        rows = (await tx.conn.execute(query)).mappings().all()
        return {row["id"]: row for row in rows}

    async def _job_row(self, conn: AsyncConnection, job_id: str, tenant: str | None) -> Any:
        known_form(job_id)
        query = select(jobs).where(jobs.c.id == job_id)
        if tenant is not None:
            query = query.where(jobs.c.tenant == tenant)
        row = (await conn.execute(query)).mappings().first()
        if row is None:
            raise NotFound(f"no job {job_id!r}")
        return row
