"""The reducer's attempts, durable: claimed when due, retried after a backoff kept in
the database (so any runner resumes it), fenced on the lease, the result written once."""

from __future__ import annotations

import time

import pytest

from service.aggregate import reduced
from service.store import ReductionClaim, Store
from service.store.db import Database
from service.views import NO_USAGE, Usage
from tests.store.conftest import OWNER, parse
from tests.store.test_outcomes import answered, failed
from tests.support import section, sectioning

REDUCER = {
    "kind": "reduce",
    "task": {"model": "m", "messages": [{"role": "system", "content": "Merge."}]},
}


LATE = {"output": "late", "details": {}, "partial": False}


async def aggregating(store: Store, **fields: object) -> str:
    spec = sectioning(section("a"), section("b"), aggregate=REDUCER, **fields)
    job, _ = await store.jobs.create(parse(spec), "acme")
    claims = (await store.queue.claim(OWNER, 10)).claims
    recorded = await store.outcomes.record(OWNER, [answered(c, f"out {c.name}") for c in claims])
    assert recorded.reduce_jobs == [job.id]
    return job.id


async def test_a_reduce_job_waits_aggregating_for_its_reducer(store: Store) -> None:
    job_id = await aggregating(store)
    view = await store.jobs.get(job_id, None)
    assert view.status == "aggregating" and view.result is None
    (claim,) = await store.reductions.claim(OWNER)
    assert isinstance(claim, ReductionClaim)
    assert (claim.job_id, claim.attempt_no, claim.budget_spent) == (job_id, 1, False)
    assert [(lane.name, lane.output) for lane in claim.lanes] == [("a", "out a"), ("b", "out b")]
    assert await store.reductions.claim("worker-b") == []  # leased


async def test_the_reducers_answer_ends_the_job_with_its_usage(store: Store) -> None:
    job_id = await aggregating(store)
    (claim,) = await store.reductions.claim(OWNER)
    usage = Usage(prompt_tokens=3, completion_tokens=4, total_tokens=7)
    result = reduced("merged", claim.lanes, partial=claim.partial)
    assert await store.reductions.record(claim, OWNER, usage=usage, result=result)
    view = await store.jobs.get(job_id, None)
    assert view.status == "succeeded" and view.result is not None
    assert view.result.output == "merged" and view.result.details == {"inputs": 2}
    assert view.result.partial is False
    assert view.usage.total_tokens == 20 + 7
    assert (await store.log.after(job_id, 0))[-1]["type"] == "job.succeeded"


async def test_a_reducer_over_lanes_that_ended_without_a_result_says_partial(
    store: Store,
) -> None:
    spec = sectioning(
        section("a"), section("b"), aggregate=REDUCER, policy={"on_failure": "best_effort"}
    )
    await store.jobs.create(parse(spec), "acme")
    first, second = (await store.queue.claim(OWNER, 10)).claims
    await store.outcomes.record(OWNER, [answered(first, "out a"), failed(second)])
    (claim,) = await store.reductions.claim(OWNER)
    assert claim.partial is True
    assert [lane.status for lane in claim.lanes] == ["succeeded", "failed"]


async def test_a_retry_waits_in_the_database_for_its_backoff(store: Store) -> None:
    await aggregating(store)
    (claim,) = await store.reductions.claim(OWNER)
    before = time.time()
    assert await store.reductions.record(claim, OWNER, usage=NO_USAGE, retry_in=60)
    assert await store.reductions.claim("worker-b") == []  # not before its time
    due = await store.reductions.next_due()
    assert due is not None and due >= before + 60
    # The attempt is over: writing it again is stale.
    assert not await store.reductions.record(claim, OWNER, usage=NO_USAGE, retry_in=0)


async def test_any_process_resumes_a_retry_once_it_is_due(db: Database) -> None:
    job_id = await aggregating(Store(db, lease_seconds=30))
    (claim,) = await Store(db, lease_seconds=30).reductions.claim(OWNER)
    await Store(db, lease_seconds=30).reductions.record(claim, OWNER, usage=NO_USAGE, retry_in=0)
    (resumed,) = await Store(db, lease_seconds=30).reductions.claim("worker-b")
    assert (resumed.job_id, resumed.attempt_no) == (job_id, 2)


async def test_a_reducer_whose_worker_died_is_claimed_again(db: Database) -> None:
    dying = Store(db, lease_seconds=-1)
    job_id = await aggregating(dying)
    (claim,) = await dying.reductions.claim("dead-worker")
    (again,) = await Store(db, lease_seconds=30).reductions.claim(OWNER)
    assert (again.job_id, again.attempt_no) == (job_id, 2)
    assert not await dying.reductions.record(claim, "dead-worker", usage=NO_USAGE, result=LATE)


async def test_a_reducer_error_fails_the_job(store: Store) -> None:
    job_id = await aggregating(store)
    (claim,) = await store.reductions.claim(OWNER)
    error = {"type": "upstream_error", "message": "reducer: HTTP 400: no"}
    await store.reductions.record(claim, OWNER, usage=NO_USAGE, error=error)
    view = await store.jobs.get(job_id, None)
    assert view.status == "failed" and view.error is not None
    assert view.error.type == "upstream_error"


@pytest.mark.parametrize(("budget", "spent"), [(25, False), (20, True)])
async def test_the_budget_counts_the_lanes_tokens(store: Store, budget: int, spent: bool) -> None:
    await aggregating(store, policy={"max_total_tokens": budget})  # the lanes used 20
    (claim,) = await store.reductions.claim(OWNER)
    assert claim.budget_spent is spent


async def test_cancel_ends_an_aggregating_job(store: Store) -> None:
    job_id = await aggregating(store)
    (claim,) = await store.reductions.claim(OWNER)
    await store.jobs.cancel(job_id, None)
    usage = Usage(prompt_tokens=4, completion_tokens=1, total_tokens=5)
    assert not await store.reductions.record(claim, OWNER, usage=usage, result=LATE)
    view = await store.jobs.get(job_id, None)
    assert view.status == "cancelled" and view.result is None
    assert view.usage.total_tokens == 20 + 5  # the answer came, so it counts
