"""Reading and locking job rows, and the parsed specs of jobs: what every part of the
store that touches a job uses.

Locking order, so two processes on PostgreSQL never deadlock: a write transaction
locks the job rows it touches first (sorted by id, :func:`lock_jobs`), then their
lanes.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from collections.abc import Iterable

from pydantic import TypeAdapter
from sqlalchemy.engine import RowMapping

from ..errors import JobNotFound
from ..spec import JobSpec
from .db import Conn, Tx
from .direct import Rows
from .statements import (
    JOB,
    JOB_SPEC,
    LOCK_JOBS,
    LOCK_JOBS_FOR_UPDATE,
    LOCK_JOBS_SKIP_LOCKED,
    TENANTS_JOB,
)

_spec_adapter: TypeAdapter[JobSpec] = TypeAdapter(JobSpec)


class SpecCache:
    """Parsed specs by job id: the hot path reads a job's spec once per lane outcome,
    and parsing it again each time would cost more than the outcome's SQL."""

    def __init__(self, size: int = 2048) -> None:
        self.size = size
        self._specs: OrderedDict[str, JobSpec] = OrderedDict()

    async def load(self, conn: Conn, job_id: str) -> JobSpec:
        """The job's spec: from the cache, or read and parsed (and then cached)."""
        spec = self._specs.get(job_id)
        if spec is None:
            raw = (await conn.execute(JOB_SPEC, {"job_id": job_id})).scalar_one()
            spec = _spec_adapter.validate_python(raw)
            self.put(job_id, spec)
        return spec

    def put(self, job_id: str, spec: JobSpec) -> None:
        self._specs[job_id] = spec
        if len(self._specs) > self.size:
            self._specs.popitem(last=False)


async def lock_jobs(
    tx: Tx, job_ids: Iterable[str], *, skip_locked: bool = False
) -> dict[str, RowMapping]:
    """The job rows, locked for this transaction, in id order (the lock order); the
    event log numbers their events from here on (``tx.seqs``). ``skip_locked``: rows
    another transaction holds are left out rather than waited for (PostgreSQL)."""
    if tx.is_sqlite:
        query = LOCK_JOBS
    else:
        query = LOCK_JOBS_SKIP_LOCKED if skip_locked else LOCK_JOBS_FOR_UPDATE
    ids = sorted(set(job_ids))
    if not ids:
        return {}
    return locked(tx, await tx.conn.execute(query, {"ids": ids}))


def locked(tx: Tx, rows: Rows) -> dict[str, RowMapping]:
    """Rows of jobs a lock read (``JOB_STATE``), by id; their last event numbers noted
    for the event log (unless the transaction moved them already)."""
    found = {}
    for row in rows.mappings().all():
        found[row["id"]] = row
        tx.seqs.setdefault(row["id"], row["last_seq"])
    return found


def known_form(job_id: str) -> None:
    """Job ids are UUIDs: anything else is no job (and never reaches the database)."""
    try:
        if str(uuid.UUID(job_id)) == job_id:
            return
    except ValueError:
        pass
    raise JobNotFound(job_id)


async def job_row(conn: Conn, job_id: str, tenant: str | None) -> RowMapping:
    """The job's row; :class:`JobNotFound` when there is none for ``tenant`` (None:
    any tenant's)."""
    known_form(job_id)
    if tenant is None:
        found = await conn.execute(JOB, {"job_id": job_id})
    else:
        found = await conn.execute(TENANTS_JOB, {"job_id": job_id, "tenant": tenant})
    row: RowMapping | None = found.mappings().first()
    if row is None:
        raise JobNotFound(job_id)
    return row
