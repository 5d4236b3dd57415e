"""The API side: creating, reading, listing and cancelling jobs; the event log."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import and_, delete, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from ..errors import Conflict, InvalidSpec, NotFound
from ..models import idempotency_keys, jobs, lanes, webhooks
from ..policy import OPEN, Stop
from ..spec import JobSummary, JobView, SectioningSpec, VotingSpec, WebhookView, lane_names
from .queue import LaneQueue
from .rows import (
    TERMINAL_JOB,
    decode_cursor,
    encode_cursor,
    iso,
    job_view,
    key_reused,
    known_form,
    new_job_id,
    usage_of,
)
from .statements import (
    EVENTS_AFTER,
    IN_FLIGHT,
    INSERT_JOB,
    INSERT_LANES,
    JOB_STATUS,
    TENANT_JOB_STATUS,
)


class Store(LaneQueue):
    """Every query Fanout makes, behind one object (see :mod:`service.store`)."""

    async def create_job(
        self,
        spec: VotingSpec | SectioningSpec,
        tenant: str,
        *,
        idempotency: tuple[str, str] | None = None,
        max_in_flight: int | None = None,
        idempotency_ttl_s: float = 86_400.0,
    ) -> tuple[JobView, bool]:
        """Store a job and its lanes; returns ``(the job as created, True)``.

        ``idempotency`` is ``(key, request hash)``: a key seen before with the same
        hash returns that job as it is now (and False); with another hash it is a 422.
        Concurrent requests with one key race on the key's primary key: the losers'
        transactions roll back, job included, and they return the winner's job.
        """
        try:
            created = await self._create_job(
                spec, tenant, idempotency, max_in_flight, idempotency_ttl_s
            )
        except IntegrityError:
            if idempotency is None:
                raise
            existing = await self._idempotent_job(tenant, idempotency)
            if existing is None:
                raise
            created = existing
        if isinstance(created, str):
            return await self.get_job(created, tenant), False
        return created, True

    async def _idempotent_job(self, tenant: str, idempotency: tuple[str, str]) -> str | None:
        key, request_hash = idempotency
        async with self.db.read() as conn:
            row = (
                await conn.execute(
                    select(idempotency_keys.c.request_hash, idempotency_keys.c.job_id).where(
                        idempotency_keys.c.tenant == tenant, idempotency_keys.c.key == key
                    )
                )
            ).first()
        if row is None:
            return None
        if row[0] != request_hash:
            raise key_reused()
        return str(row[1])

    async def _create_job(
        self,
        spec: VotingSpec | SectioningSpec,
        tenant: str,
        idempotency: tuple[str, str] | None,
        max_in_flight: int | None,
        idempotency_ttl_s: float,
    ) -> JobView | str:
        """The new job's view (built from what was written, not read back), or the id
        of the job an Idempotency-Key already names."""
        now = time.time()
        job_id = new_job_id(now)
        raw = spec.model_dump(mode="json", by_alias=True, exclude_none=True)
        deadline = now + spec.policy.deadline_s if spec.policy.deadline_s else None
        names = lane_names(spec)
        job = {
            "id": job_id,
            "tenant": tenant,
            "status": "queued",
            "mode": spec.mode,
            "spec": raw,
            "lanes_total": len(names),
            "created_at": now,
            "deadline_at": deadline,
            "max_concurrency": spec.policy.max_concurrency,
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "total_tokens": 0,
            "last_seq": 0,
        }
        lane_rows = [
            {
                "job_id": job_id,
                "idx": i,
                "name": name,
                "status": "queued",
                "attempts": 0,
                "prompt_tokens": 0,
                "completion_tokens": 0,
                "total_tokens": 0,
                "queued_at": now,
                "available_at": now,
            }
            for i, name in enumerate(names)
        ]
        async with self.db.transaction() as tx:
            if idempotency is not None:
                key, request_hash = idempotency
                row = (
                    (
                        await tx.conn.execute(
                            select(idempotency_keys).where(
                                idempotency_keys.c.tenant == tenant, idempotency_keys.c.key == key
                            )
                        )
                    )
                    .mappings()
                    .first()
                )
                if row is not None and row["expires_at"] > now:
                    if row["request_hash"] != request_hash:
                        raise key_reused()
                    return str(row["job_id"])
                if row is not None:
                    await tx.conn.execute(
                        delete(idempotency_keys).where(
                            idempotency_keys.c.tenant == tenant, idempotency_keys.c.key == key
                        )
                    )
            if max_in_flight is not None:
                in_flight = (await tx.conn.execute(IN_FLIGHT, {"tenant": tenant})).scalar_one()
                if in_flight >= max_in_flight:
                    cap = f"{in_flight} jobs in flight: at the cap of {max_in_flight} per tenant"
                    raise InvalidSpec([{"loc": ["body"], "msg": cap}])
            await tx.conn.execute(INSERT_JOB, job)
            await tx.conn.execute(INSERT_LANES, lane_rows)
            if idempotency is not None:
                await tx.conn.execute(
                    insert(idempotency_keys).values(
                        tenant=tenant,
                        key=idempotency[0],
                        request_hash=idempotency[1],
                        job_id=job_id,
                        expires_at=now + idempotency_ttl_s,
                    )
                )
            await self._append(tx, job_id, [("job.queued", {"lanes": names})], now)
        self._specs[job_id] = spec
        # The columns written as NULL (not started, no result...) read back as None.
        view = job_view(
            dict.fromkeys(jobs.c.keys()) | job,
            [dict.fromkeys(lanes.c.keys()) | row for row in lane_rows],
        )
        if spec.webhook is not None:
            view.webhook = WebhookView(url=raw["webhook"]["url"], status="waiting", attempts=[])
        return view

    async def get_job(self, job_id: str, tenant: str | None) -> JobView:
        async with self.db.read() as conn:
            job = await self._job_row(conn, job_id, tenant)
            lane_rows = (
                (
                    await conn.execute(
                        select(lanes).where(lanes.c.job_id == job_id).order_by(lanes.c.idx)
                    )
                )
                .mappings()
                .all()
            )
            webhook = None
            if job["spec"].get("webhook"):
                webhook = (
                    (await conn.execute(select(webhooks).where(webhooks.c.job_id == job_id)))
                    .mappings()
                    .first()
                )
        view = job_view(job, lane_rows)
        if job["spec"].get("webhook"):
            view.webhook = WebhookView(
                url=job["spec"]["webhook"]["url"],
                status=webhook["status"] if webhook else "waiting",
                attempts=webhook["history"] if webhook else [],
            )
        return view

    async def job_status(self, job_id: str, tenant: str | None) -> str:
        known_form(job_id)
        async with self.db.read() as conn:
            if tenant is None:
                found = await conn.execute(JOB_STATUS, {"job_id": job_id})
            else:
                found = await conn.execute(TENANT_JOB_STATUS, {"job_id": job_id, "tenant": tenant})
            status = found.scalar_one_or_none()
        if status is None:
            raise NotFound(f"no job {job_id!r}")
        return str(status)

    async def is_finished(self, job_id: str) -> bool:
        return await self.job_status(job_id, None) in TERMINAL_JOB

    async def list_jobs(
        self, tenant: str | None, *, status: str | None, cursor: str | None, limit: int
    ) -> tuple[list[JobSummary], str | None]:
        query = select(jobs).order_by(jobs.c.created_at.desc(), jobs.c.id.desc()).limit(limit + 1)
        if tenant is not None:
            query = query.where(jobs.c.tenant == tenant)
        if status is not None:
            query = query.where(jobs.c.status == status)
        if cursor is not None:
            created_at, job_id = decode_cursor(cursor)
            query = query.where(
                or_(
                    jobs.c.created_at < created_at,
                    and_(jobs.c.created_at == created_at, jobs.c.id < job_id),
                )
            )
        async with self.db.read() as conn:
            rows = (await conn.execute(query)).mappings().all()
            page = rows[:limit]
            progress = await self._progress(conn, [row["id"] for row in page])
        summaries = [
            JobSummary(
                id=row["id"],
                status=row["status"],
                mode=row["mode"],
                created_at=iso(row["created_at"]) or "",
                finished_at=iso(row["finished_at"]),
                progress=progress.get(row["id"], {}),
                usage=usage_of(row),
                metadata=row["spec"].get("metadata", {}),
            )
            for row in page
        ]
        next_cursor = (
            encode_cursor(page[-1]["created_at"], page[-1]["id"]) if len(rows) > limit else None
        )
        return summaries, next_cursor

    async def _progress(
        self, conn: AsyncConnection, job_ids: list[str]
    ) -> dict[str, dict[str, int]]:
        if not job_ids:
            return {}
        query = (
            select(lanes.c.job_id, lanes.c.status, func.count())
            .where(lanes.c.job_id.in_(job_ids))
            .group_by(lanes.c.job_id, lanes.c.status)
        )
        progress: dict[str, dict[str, int]] = {}
        for job_id, status, count in (await conn.execute(query)).all():
            progress.setdefault(job_id, {})[status] = count
        return progress

    async def cancel_job(self, job_id: str, tenant: str | None) -> None:
        """Cancel a job: every open lane ends ``cancelled`` and so does the job, at once."""
        now = time.time()
        async with self.db.transaction() as tx:
            job = await self._job_row(tx.conn, job_id, tenant)
            if not self.db.is_sqlite:
                await self._lock_jobs(tx, [job_id])
                job = await self._job_row(tx.conn, job_id, tenant)
            if job["status"] in TERMINAL_JOB:
                raise Conflict(f"job {job_id!r} is already {job['status']}")
            items = await self._stop_lanes(
                tx, job_id, Stop(OPEN, "cancelled", "cancelled", "the job was cancelled"), now
            )
            items.append(("job.cancelled", {"usage": usage_of(job).model_dump()}))
            await self._queue_webhook(tx, job_id, job["spec"], now)
            await tx.conn.execute(
                update(jobs)
                .where(jobs.c.id == job_id)
                .values(
                    status="cancelled",
                    finished_at=now,
                    error={"type": "cancelled", "message": "the job was cancelled"},
                    lease_owner=None,
                )
            )
            await self._append(tx, job_id, items, now)

    async def events_after(
        self, job_id: str, after: int, limit: int = 1000
    ) -> list[dict[str, Any]]:
        async with self.db.read() as conn:
            rows = (
                await conn.execute(EVENTS_AFTER, {"job_id": job_id, "after": after, "limit": limit})
            ).all()
        return [
            {"job_id": job_id, "seq": seq, "type": kind, "data": data} for seq, kind, data in rows
        ]
