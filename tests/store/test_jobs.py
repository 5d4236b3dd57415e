"""Jobs as callers see them: created with their lanes and first event, idempotent,
capped per tenant, listed a page at a time, cancelled once."""

from __future__ import annotations

import asyncio
import base64
import json

import pytest

from service.errors import (
    BadCursor,
    IdempotencyConflict,
    JobFinished,
    JobNotFound,
    TenantAtCapacity,
)
from service.store import Store
from tests.store.conftest import OWNER, parse
from tests.support import section, sectioning, voting


async def test_a_job_is_stored_with_its_lanes_queued_and_its_first_event(store: Store) -> None:
    job, created = await store.jobs.create(parse(voting(3)), "acme")
    assert created and job.status == "queued"
    assert [(lane.name, lane.status, lane.attempts) for lane in job.lanes] == [
        ("lane-0", "queued", 0),
        ("lane-1", "queued", 0),
        ("lane-2", "queued", 0),
    ]
    assert await store.jobs.get(job.id, "acme") == job
    events = await store.log.after(job.id, 0)
    assert [(e["seq"], e["type"]) for e in events] == [(1, "job.queued")]
    assert events[0]["data"]["lanes"] == ["lane-0", "lane-1", "lane-2"]


async def test_another_tenants_job_is_not_found(store: Store) -> None:
    job, _ = await store.jobs.create(parse(voting(1)), "acme")
    with pytest.raises(JobNotFound):
        await store.jobs.get(job.id, "globex")
    with pytest.raises(JobNotFound):
        await store.jobs.status(job.id, "globex")
    with pytest.raises(JobNotFound):
        await store.jobs.get("not-a-uuid", "acme")


async def test_one_idempotency_key_and_body_give_one_job(store: Store) -> None:
    spec = parse(voting(2))
    first, created = await store.jobs.create(spec, "acme", idempotency=("k", "hash-1"))
    again, created_again = await store.jobs.create(spec, "acme", idempotency=("k", "hash-1"))
    assert created and not created_again and again.id == first.id
    other_tenant, created_other = await store.jobs.create(
        spec, "globex", idempotency=("k", "hash-1")
    )
    assert created_other and other_tenant.id != first.id  # keys are per tenant


async def test_one_idempotency_key_with_another_body_is_a_conflict(store: Store) -> None:
    await store.jobs.create(parse(voting(2)), "acme", idempotency=("k", "hash-1"))
    with pytest.raises(IdempotencyConflict):
        await store.jobs.create(parse(voting(3)), "acme", idempotency=("k", "hash-2"))
    assert len((await store.jobs.page("acme", status=None, cursor=None, limit=10))[0]) == 1


async def test_a_tenant_at_its_cap_of_jobs_in_flight_is_refused(store: Store) -> None:
    for _ in range(2):
        await store.jobs.create(parse(voting(1)), "acme", max_in_flight=2)
    with pytest.raises(TenantAtCapacity) as refused:
        await store.jobs.create(parse(voting(1)), "acme", max_in_flight=2)
    assert (refused.value.in_flight, refused.value.cap) == (2, 2)
    await store.jobs.create(parse(voting(1)), "globex", max_in_flight=2)


async def test_jobs_are_listed_newest_first_a_page_at_a_time(store: Store) -> None:
    ids = [(await store.jobs.create(parse(voting(1)), "acme"))[0].id for _ in range(5)]
    await store.jobs.create(parse(voting(1)), "globex")
    seen, cursor = [], None
    while True:
        page, cursor = await store.jobs.page("acme", status=None, cursor=cursor, limit=2)
        seen += [job.id for job in page]
        if cursor is None:
            break
    assert seen == ids[::-1]
    await store.jobs.cancel(ids[0], "acme")
    cancelled, _ = await store.jobs.page("acme", status="cancelled", cursor=None, limit=10)
    assert [job.id for job in cancelled] == [ids[0]]


@pytest.mark.parametrize("cursor", ["nope", base64.urlsafe_b64encode(b'[1, "x"]').decode()])
async def test_a_cursor_the_store_did_not_give_out_is_refused(store: Store, cursor: str) -> None:
    with pytest.raises(BadCursor):
        await store.jobs.page("acme", status=None, cursor=cursor, limit=2)


async def test_cancel_ends_every_open_lane_and_the_job_at_once(store: Store) -> None:
    job, _ = await store.jobs.create(parse(sectioning(section("a"), section("b"))), "acme")
    claimed = await store.queue.claim(OWNER, 1)
    assert len(claimed.claims) == 1
    await store.jobs.cancel(job.id, "acme")
    view = await store.jobs.get(job.id, "acme")
    assert view.status == "cancelled"
    assert [lane.status for lane in view.lanes] == ["cancelled", "cancelled"]
    assert view.error is not None and view.error.type == "cancelled"
    events = [e["type"] for e in await store.log.after(job.id, 0)]
    assert events[-3:] == ["lane.cancelled", "lane.cancelled", "job.cancelled"]
    with pytest.raises(JobFinished):
        await store.jobs.cancel(job.id, "acme")


async def test_events_are_read_after_a_sequence_number_in_order(store: Store) -> None:
    job, _ = await store.jobs.create(parse(voting(3)), "acme")
    await store.queue.claim(OWNER, 10)
    events = await store.log.after(job.id, 0)
    assert [e["seq"] for e in events] == [1, 2, 3, 4, 5]
    assert [e["type"] for e in events] == ["job.queued", "job.running", *["lane.started"] * 3]
    assert [e["seq"] for e in await store.log.after(job.id, 3)] == [4, 5]
    assert await store.log.after(job.id, 5) == []
    assert all(json.loads(json.dumps(e["data"]))["seq"] == e["seq"] for e in events)


async def test_concurrent_creates_with_one_key_make_one_job(store: Store) -> None:
    spec = parse(voting(2))
    results = await asyncio.gather(
        *(store.jobs.create(spec, "acme", idempotency=("race", "h")) for _ in range(20))
    )
    assert len({job.id for job, _created in results}) == 1
    assert sum(created for _job, created in results) == 1
    assert len((await store.jobs.page("acme", status=None, cursor=None, limit=50))[0]) == 1
