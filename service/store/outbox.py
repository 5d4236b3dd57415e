"""The webhook outbox: a job's delivery is queued in the transaction that ends the job
(so a crash between the two cannot lose it), then leased to and recorded by whichever
runner delivers it, at least once."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from sqlalchemy import insert, or_, select, update

from ..states import WebhookStatus
from ..views import WebhookView
from .db import Conn, Database, Tx
from .rendering import iso
from .tables import webhooks


class WebhookOutbox:
    def __init__(self, db: Database, *, lease_seconds: float) -> None:
        self.db = db
        self.lease_seconds = lease_seconds

    async def queue(self, tx: Tx, job_id: str, raw_spec: Mapping[Any, Any], now: float) -> None:
        """In the transaction that ends the job: the delivery cannot be lost."""
        url = (raw_spec.get("webhook") or {}).get("url")
        if url:
            await tx.conn.execute(
                insert(webhooks).values(
                    job_id=job_id,
                    url=url,
                    status=WebhookStatus.PENDING,
                    attempts=0,
                    next_attempt_at=now,
                    history=[],
                )
            )

    async def view(
        self, conn: Conn, job_id: str, raw_spec: Mapping[Any, Any]
    ) -> WebhookView | None:
        """The job's webhook as callers see it (None: the job has none)."""
        url = (raw_spec.get("webhook") or {}).get("url")
        if not url:
            return None
        row = (
            (await conn.execute(select(webhooks).where(webhooks.c.job_id == job_id)))
            .mappings()
            .first()
        )
        if row is None:
            return WebhookView(url=url, status=WebhookStatus.WAITING, attempts=[])
        # Attempts are stored with their epoch time; callers read ISO times everywhere.
        attempts = [{**attempt, "at": iso(attempt["at"])} for attempt in row["history"]]
        return WebhookView(url=url, status=row["status"], attempts=attempts)

    async def claim(self, owner: str, limit: int = 50) -> list[tuple[str, str, int]]:
        """Due deliveries, leased to ``owner``: ``(job id, url, deliveries so far)``."""
        now = time.time()
        async with self.db.transaction() as tx:
            query = (
                select(webhooks.c.job_id, webhooks.c.url, webhooks.c.attempts)
                .where(
                    webhooks.c.status == WebhookStatus.PENDING,
                    webhooks.c.next_attempt_at <= now,
                    or_(webhooks.c.lease_expires_at.is_(None), webhooks.c.lease_expires_at < now),
                )
                .order_by(webhooks.c.next_attempt_at)
                .limit(limit)
            )
            query = tx.locking(query, skip_locked=True)
            rows = [
                (str(row[0]), str(row[1]), int(row[2]))
                for row in (await tx.conn.execute(query)).all()
            ]
            if rows:
                await tx.conn.execute(
                    update(webhooks)
                    .where(webhooks.c.job_id.in_([r[0] for r in rows]))
                    .values(lease_owner=owner, lease_expires_at=now + self.lease_seconds)
                )
        return rows

    async def record(
        self,
        job_id: str,
        owner: str,
        *,
        delivery: dict[str, Any],
        delivered: bool,
        retry_at: float | None,
    ) -> None:
        """One delivery: delivered, tried again at ``retry_at``, or given up (None)."""
        async with self.db.transaction() as tx:
            row = (
                (await tx.conn.execute(select(webhooks).where(webhooks.c.job_id == job_id)))
                .mappings()
                .first()
            )
            if row is None or row["lease_owner"] != owner or row["status"] != WebhookStatus.PENDING:
                return
            if delivered:
                status = WebhookStatus.DELIVERED
            else:
                status = WebhookStatus.PENDING if retry_at is not None else WebhookStatus.FAILED
            await tx.conn.execute(
                update(webhooks)
                .where(webhooks.c.job_id == job_id)
                .values(
                    status=status,
                    attempts=row["attempts"] + 1,
                    history=[*row["history"], delivery],
                    next_attempt_at=retry_at if retry_at is not None else row["next_attempt_at"],
                    lease_owner=None,
                    lease_expires_at=None,
                )
            )
