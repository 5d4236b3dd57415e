"""The webhook outbox: queued in the transaction that ends the job, leased to one
deliverer at a time, each delivery recorded."""

from __future__ import annotations

import time

from service.store import Store
from tests.store.conftest import OWNER, parse
from tests.support import voting

HOOK = {"webhook": {"url": "https://hooks.example/fanout"}}


async def test_a_job_with_a_webhook_queues_its_delivery_when_it_ends(store: Store) -> None:
    job, _ = await store.jobs.create(parse(voting(1, **HOOK)), "acme")
    assert job.webhook is not None and job.webhook.status == "waiting"
    assert await store.outbox.claim(OWNER) == []
    await store.jobs.cancel(job.id, None)
    assert (await store.jobs.get(job.id, None)).webhook.status == "pending"  # type: ignore[union-attr]
    assert await store.outbox.claim(OWNER) == [(job.id, HOOK["webhook"]["url"], 0)]
    assert await store.outbox.claim("worker-b") == []  # leased


async def test_a_failed_delivery_is_tried_again_at_its_time_then_delivered(store: Store) -> None:
    job, _ = await store.jobs.create(parse(voting(1, **HOOK)), "acme")
    await store.jobs.cancel(job.id, None)
    (due,) = await store.outbox.claim(OWNER)
    failure = {"at": time.time(), "status_code": 503, "error": "HTTP 503", "duration_s": 0.1}
    await store.outbox.record(job.id, OWNER, delivery=failure, delivered=False, retry_at=0.0)
    (again,) = await store.outbox.claim(OWNER)
    assert again == (job.id, due[1], 1)
    success = {**failure, "status_code": 200, "error": None}
    await store.outbox.record(job.id, OWNER, delivery=success, delivered=True, retry_at=None)
    webhook = (await store.jobs.get(job.id, None)).webhook
    assert webhook is not None and webhook.status == "delivered"
    assert [d.status_code for d in webhook.attempts] == [503, 200]
    assert await store.outbox.claim(OWNER) == []


async def test_a_delivery_given_up_is_failed(store: Store) -> None:
    job, _ = await store.jobs.create(parse(voting(1, **HOOK)), "acme")
    await store.jobs.cancel(job.id, None)
    await store.outbox.claim(OWNER)
    refused = {"at": time.time(), "status_code": None, "error": "refused", "duration_s": 0.0}
    await store.outbox.record(job.id, OWNER, delivery=refused, delivered=False, retry_at=None)
    assert (await store.jobs.get(job.id, None)).webhook.status == "failed"  # type: ignore[union-attr]
