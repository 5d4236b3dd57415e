"""The lanes table as the queue: claims under the job's cap, the batch and providers'
capacity; leases renewed, lost and given back."""

from __future__ import annotations

import time

from service.policy import Retrying
from service.store import Store
from service.store.db import Database
from tests.store.conftest import OWNER, parse
from tests.support import voting


async def test_a_claim_takes_queued_lanes_under_a_lease_and_starts_the_job(store: Store) -> None:
    job, _ = await store.jobs.create(parse(voting(3)), "acme")
    before = time.time()
    claimed = await store.queue.claim(OWNER, 10)
    assert [(c.job_id, c.idx, c.attempt_no) for c in claimed.claims] == [
        (job.id, 0, 1),
        (job.id, 1, 1),
        (job.id, 2, 1),
    ]
    assert not claimed.held_back
    view = await store.jobs.get(job.id, None)
    assert view.status == "running" and view.started_at is not None
    assert {lane.status for lane in view.lanes} == {"running"}
    assert (await store.queue.claim(OWNER, 10)).claims == []
    assert all(c.waited_s < time.time() - before + 1 for c in claimed.claims)


async def test_a_claim_never_takes_more_than_asked_and_says_it_left_some(store: Store) -> None:
    await store.jobs.create(parse(voting(5)), "acme")
    claimed = await store.queue.claim(OWNER, 2)
    assert len(claimed.claims) == 2 and claimed.held_back


async def test_a_jobs_cap_holds_its_lanes_queued_until_running_ones_end(store: Store) -> None:
    spec = voting(5, policy={"max_concurrency": 2})
    job, _ = await store.jobs.create(parse(spec), "acme")
    first = await store.queue.claim(OWNER, 10)
    assert len(first.claims) == 2 and first.held_back
    again = await store.queue.claim(OWNER, 10)
    assert again.claims == [] and again.held_back
    await store.jobs.cancel(job.id, None)
    assert (await store.queue.claim(OWNER, 10)).claims == []


async def test_a_renewed_lease_is_not_lost(db: Database) -> None:
    short = Store(db, lease_seconds=-1)
    job, _ = await short.jobs.create(parse(voting(1)), "acme")
    await short.queue.claim(OWNER, 10)
    await Store(db, lease_seconds=30).queue.renew_leases(OWNER)
    recorded = await short.outcomes.expire_leases(Retrying())
    assert recorded.requeued == 0
    assert (await short.jobs.get(job.id, None)).lanes[0].status == "running"


async def test_release_gives_back_every_lane_a_stopping_worker_holds(store: Store) -> None:
    job, _ = await store.jobs.create(parse(voting(2)), "acme")
    await store.queue.claim(OWNER, 10)
    await store.queue.release(OWNER)
    lanes = (await store.jobs.get(job.id, None)).lanes
    assert {lane.status for lane in lanes} == {"queued"}
    assert len((await store.queue.claim("worker-b", 10)).claims) == 2


async def test_next_wakeup_is_when_the_earliest_queued_lane_is_due(store: Store) -> None:
    assert await store.queue.next_wakeup() is None
    before = time.time()
    await store.jobs.create(parse(voting(1)), "acme")
    due = await store.queue.next_wakeup()
    assert due is not None and before <= due <= time.time()
