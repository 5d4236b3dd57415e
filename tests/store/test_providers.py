"""Providers' limits for the cluster, and the fair share of claims: every Store here is
a process of its own as far as the database goes (two Stores on one database are two
processes), so what holds between them holds between processes."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import select

from service.config import Provider
from service.states import ErrorType, LaneStatus
from service.store import Outcome, Store
from service.store.db import Database
from service.store.tables import providers
from tests.store.conftest import OWNER, parse
from tests.store.test_outcomes import answered
from tests.store.test_queue import Starter
from tests.support import voting

NUMBER_ALL = {"kind": "majority", "extract": "number", "early_stop": False}


def process(db: Database, **limits: int) -> Store:
    default = Provider("default", None, None, **limits)  # type: ignore[arg-type]
    return Store(db, lease_seconds=30, providers={"default": default})


async def test_a_providers_concurrency_holds_across_processes(db: Database) -> None:
    one, two = process(db, max_concurrency=3), process(db, max_concurrency=3)
    await one.jobs.create(parse(voting(10, aggregate=NUMBER_ALL)), "acme")
    first = await one.queue.claim("worker-1", 10)
    assert len(first.claims) == 3 and first.held_back
    second = await two.queue.claim("worker-2", 10)
    assert second.claims == [] and second.held_back
    await one.outcomes.record("worker-1", [answered(first.claims[0])])
    assert len((await two.queue.claim("worker-2", 10)).claims) == 1


async def test_a_limit_holds_when_its_row_was_lost(db: Database) -> None:
    """A process that made the provider's row in a transaction that then rolled back
    (or a table emptied under it) makes the row again: a missing row is no limit."""
    one = process(db, max_concurrency=2)
    await one.jobs.create(parse(voting(5, aggregate=NUMBER_ALL)), "acme")
    assert len((await one.queue.claim("worker-1", 1)).claims) == 1  # the row is made
    async with db.transaction() as tx:
        await tx.conn.execute(providers.delete())
    assert len((await one.queue.claim("worker-1", 10)).claims) == 1  # 2 in flight at most


async def test_a_providers_requests_a_minute_are_paced_for_the_cluster(db: Database) -> None:
    one, two = process(db, rpm=60), process(db, rpm=60)  # one a second
    await one.jobs.create(parse(voting(3, aggregate=NUMBER_ALL)), "acme")
    assert len((await one.queue.claim("worker-1", 10)).claims) == 1
    later = await two.queue.claim("worker-2", 10)
    assert later.claims == [] and later.held_back
    assert later.next_check is not None and 0 < later.next_check - time.time() <= 1.01


async def test_tokens_a_minute_are_reserved_at_claim_and_settled_with_the_usage(
    db: Database,
) -> None:
    store = process(db, tpm=60_000, reserve_tokens=400)  # 1,000 tokens a second
    job, _ = await store.jobs.create(parse(voting(5, aggregate=NUMBER_ALL)), "acme")
    claims = (await store.queue.claim(OWNER, 10)).claims
    assert len(claims) == 2  # about 410 tokens each: two fit in a second's 1,000

    async def level() -> float:
        async with db.read() as conn:
            value = (await conn.execute(select(providers.c.tokens_level))).scalar_one()
        return float(value)

    before = await level()
    await store.outcomes.record(OWNER, [answered(c, tokens=10) for c in claims])
    # Each reserved about 410 and used 10: the 800 or so unused went back.
    assert await level() - before == pytest.approx(2 * (410 - 10), abs=30)
    lanes = (await store.jobs.get(job.id, None)).lanes
    assert [lane.status for lane in lanes[:2]] == ["succeeded", "succeeded"]


async def test_a_429_with_retry_after_pauses_its_provider_for_every_process(
    db: Database,
) -> None:
    one, two = process(db), process(db)  # no limits configured: the pause holds anyway
    job, _ = await one.jobs.create(parse(voting(3, aggregate=NUMBER_ALL)), "acme")
    (claim,) = (await one.queue.claim("worker-1", 1)).claims
    now = time.time()
    limited = Outcome(
        job.id,
        claim.idx,
        claim.attempt_no,
        LaneStatus.QUEUED,
        error_type=ErrorType.RATE_LIMITED,
        error_message="HTTP 429",
        retry_in=30,
        retry_after=30,
        started_at=now,
        finished_at=now,
    )
    await one.outcomes.record("worker-1", [limited])
    paused = await two.queue.claim("worker-2", 10)
    assert paused.claims == [] and paused.held_back
    assert paused.next_check is not None and paused.next_check >= now + 29
    # Nor does a job created meanwhile start its lanes with it.
    await one.jobs.cancel(job.id, None)
    starter = Starter(room=10)
    created, _ = await two.jobs.create(parse(voting(2)), "acme", starter=starter)
    assert starter.released == [(2, [])] and created.status == "queued"


async def test_a_small_job_of_another_tenant_gets_the_next_free_slots(store: Store) -> None:
    await store.jobs.create(parse(voting(50, aggregate=NUMBER_ALL)), "acme")
    busy = await store.queue.claim(OWNER, 20)
    assert len(busy.claims) == 20
    small, _ = await store.jobs.create(parse(voting(5, aggregate=NUMBER_ALL)), "globex")
    next_free = await store.queue.claim(OWNER, 5)
    assert {c.job_id for c in next_free.claims} == {small.id}


async def test_a_claim_shares_slots_between_tenants_each_jobs_lanes_in_order(
    store: Store,
) -> None:
    one, _ = await store.jobs.create(parse(voting(10, aggregate=NUMBER_ALL)), "acme")
    two, _ = await store.jobs.create(parse(voting(10, aggregate=NUMBER_ALL)), "globex")
    first = await store.queue.claim(OWNER, 4)
    assert sorted((c.job_id == two.id, c.idx) for c in first.claims) == [
        (False, 0),
        (False, 1),
        (True, 0),
        (True, 1),
    ]
    assert first.held_back
    then = await store.queue.claim(OWNER, 2)
    assert sorted((c.job_id == one.id, c.idx) for c in then.claims) == [(False, 2), (True, 2)]


async def test_a_lane_queued_again_waits_behind_those_ready_before_it(store: Store) -> None:
    job, _ = await store.jobs.create(parse(voting(3, aggregate=NUMBER_ALL)), "acme")
    claims = (await store.queue.claim(OWNER, 1)).claims
    assert [c.idx for c in claims] == [0]
    now = time.time()
    retry = Outcome(
        job.id,
        0,
        1,
        LaneStatus.QUEUED,
        error_type=ErrorType.UPSTREAM_ERROR,
        error_message="HTTP 503",
        retry_in=0,
        started_at=now,
        finished_at=now,
    )
    await store.outcomes.record(OWNER, [retry])
    assert [c.idx for c in (await store.queue.claim(OWNER, 1)).claims] == [1]
