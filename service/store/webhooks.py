"""The webhook outbox."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import insert, or_, select, update

from ..db import Tx
from ..models import webhooks
from .base import StoreBase


class WebhookStore(StoreBase):
    """The webhook outbox: queued in the transaction that ends a job, then leased to
    and recorded by whichever runner delivers it."""

    async def _queue_webhook(
        self, tx: Tx, job_id: str, raw_spec: dict[str, Any], now: float
    ) -> None:
        """In the transaction that ends the job: the delivery cannot be lost."""
        url = (raw_spec.get("webhook") or {}).get("url")
        if url:
            await tx.conn.execute(
                insert(webhooks).values(
                    job_id=job_id,
                    url=url,
                    status="pending",
                    attempts=0,
                    next_attempt_at=now,
                    history=[],
                )
            )

    async def claim_webhooks(self, owner: str, limit: int = 50) -> list[tuple[str, str, int]]:
        """Due deliveries, leased to this process: ``(job id, url, attempts so far)``."""
        now = time.time()
        async with self.db.transaction() as tx:
            query = (
                select(webhooks.c.job_id, webhooks.c.url, webhooks.c.attempts)
                .where(
                    webhooks.c.status == "pending",
                    webhooks.c.next_attempt_at <= now,
                    or_(webhooks.c.lease_expires_at.is_(None), webhooks.c.lease_expires_at < now),
                )
                .order_by(webhooks.c.next_attempt_at)
                .limit(limit)
            )
            if not self.db.is_sqlite:
                query = query.with_for_update(skip_locked=True)
            rows = [(str(j), str(u), int(a)) for j, u, a in (await tx.conn.execute(query)).all()]
            if rows:
                await tx.conn.execute(
                    update(webhooks)
                    .where(webhooks.c.job_id.in_([r[0] for r in rows]))
                    .values(lease_owner=owner, lease_expires_at=now + self.lease_seconds)
                )
        return rows

    async def record_webhook_attempt(
        self,
        job_id: str,
        owner: str,
        *,
        attempt: dict[str, Any],
        delivered: bool,
        retry_at: float | None,
    ) -> None:
        """One delivery attempt: delivered, retried at ``retry_at``, or given up (None)."""
        async with self.db.transaction() as tx:
            row = (
                (await tx.conn.execute(select(webhooks).where(webhooks.c.job_id == job_id)))
                .mappings()
                .first()
            )
            if row is None or row["lease_owner"] != owner or row["status"] != "pending":
                return
            status = "delivered" if delivered else ("pending" if retry_at is not None else "failed")
            await tx.conn.execute(
                update(webhooks)
                .where(webhooks.c.job_id == job_id)
                .values(
                    status=status,
                    attempts=row["attempts"] + 1,
                    history=[*row["history"], attempt],
                    next_attempt_at=retry_at if retry_at is not None else row["next_attempt_at"],
                    lease_owner=None,
                    lease_expires_at=None,
                )
            )
