"""The lanes table as the queue: claims under the job's cap, the batch and providers'
capacity; lanes started with their job; leases renewed, lost and given back."""

from __future__ import annotations

import time

import pytest

from service.errors import TenantAtCapacity
from service.policy import Retrying
from service.store import Claim, Store
from service.store.db import Database
from service.views import JobView
from tests.store.conftest import OWNER, parse
from tests.store.test_outcomes import answered, failed
from tests.support import mapping, voting


async def capped_vote(store: Store, n: int) -> tuple[JobView, list[Claim]]:
    """A vote of ``n`` lanes that all run (no early stop) under a cap of 2, and the
    claim of its first two."""
    every_vote = {"kind": "majority", "extract": "number", "early_stop": False}
    spec = voting(n, aggregate=every_vote, policy={"max_concurrency": 2})
    job, _ = await store.jobs.create(parse(spec), "acme")
    return job, (await store.queue.claim(OWNER, 10)).claims


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


async def test_a_jobs_cap_counts_calls_in_flight_not_lanes_waiting_to_be_recorded(
    store: Store,
) -> None:
    """A lane whose call has ended is ``running`` until its outcome is recorded; the
    claimer says how many of a job's are so (``unrecorded``) and they free their slots,
    whether every ready lane fits the claim or a fair share is worked out."""
    job, first = await capped_vote(store, 6)
    assert [c.idx for c in first] == [0, 1]
    assert (await store.queue.claim(OWNER, 10, {"another-job": 2})).claims == []
    second = await store.queue.claim(OWNER, 10, {job.id: 1})  # lane 0 or 1 answered
    assert [c.idx for c in second.claims] == [2] and second.held_back
    # Four ready, a claim of two: the fair share's path. Three lanes run, two answered.
    third = await store.queue.claim(OWNER, 2, {job.id: 2})
    assert [c.idx for c in third.claims] == [3]
    assert (await store.queue.claim(OWNER, 2, {job.id: 2})).claims == []
    statuses = [lane.status for lane in (await store.jobs.get(job.id, None)).lanes]
    assert statuses == ["running"] * 4 + ["queued"] * 2


async def test_one_claim_takes_from_each_job_the_lanes_it_may_run_and_no_other(
    store: Store,
) -> None:
    """Lanes of several jobs are leased in one go: a capped job's other lanes, at the
    same indexes as lanes another job starts, stay queued."""
    capped, _ = await store.jobs.create(parse(voting(5, policy={"max_concurrency": 2})), "acme")
    free, _ = await store.jobs.create(parse(voting(4)), "acme")
    claimed = await store.queue.claim(OWNER, 10)
    assert sorted((c.job_id == free.id, c.idx) for c in claimed.claims) == [
        (False, 0),
        (False, 1),
        (True, 0),
        (True, 1),
        (True, 2),
        (True, 3),
    ]
    statuses = {
        job.id: [lane.status for lane in (await store.jobs.get(job.id, None)).lanes]
        for job in (capped, free)
    }
    assert statuses[capped.id] == ["running", "running", "queued", "queued", "queued"]
    assert statuses[free.id] == ["running"] * 4
    for job, running in ((capped, 2), (free, 4)):
        kinds = [event["type"] for event in await store.log.after(job.id, 0)]
        assert kinds == ["job.queued", "job.running"] + ["lane.started"] * running


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


# --- lanes started with their job (a runner in the creating process) ----------------


class Starter:
    """A runner's side of a job's creation: ``room`` slots, and the claims it was handed."""

    owner = OWNER

    def __init__(self, room: int) -> None:
        self.room = room
        self.wanted: list[int] = []
        self.released: list[tuple[int, list[Claim]]] = []

    def reserve(self, wanted: int) -> int:
        self.wanted.append(wanted)
        return min(self.room, wanted)

    def release(self, reserved: int, claims: list[Claim]) -> None:
        self.released.append((reserved, claims))


async def test_a_job_starts_its_lanes_in_the_transaction_that_stores_it(store: Store) -> None:
    starter = Starter(room=10)
    job, _ = await store.jobs.create(parse(voting(3)), "acme", starter=starter)
    ((reserved, claims),) = starter.released
    assert starter.wanted == [3] and reserved == 3  # it holds the slots it uses, no more
    assert [(c.job_id, c.idx, c.attempt_no) for c in claims] == [(job.id, i, 1) for i in range(3)]
    assert job.status == "running" and job.progress == {"running": 3}
    assert job == await store.jobs.get(job.id, None)  # the view is what was stored
    events = await store.log.after(job.id, 0)
    assert [(e["seq"], e["type"]) for e in events] == [
        (1, "job.queued"),
        (2, "job.running"),
        (3, "lane.started"),
        (4, "lane.started"),
        (5, "lane.started"),
    ]
    assert (await store.queue.claim(OWNER, 10)).claims == []  # nothing left to claim
    # Its lanes are leased like claimed ones: recorded, they end the job.
    await store.outcomes.record(OWNER, [answered(claim) for claim in claims])
    assert (await store.jobs.get(job.id, None)).status == "succeeded"


async def test_a_job_starts_no_more_lanes_than_the_room(store: Store) -> None:
    starter = Starter(room=3)
    job, _ = await store.jobs.create(parse(voting(5)), "acme", starter=starter)
    assert len(starter.released[0][1]) == 3 and job.progress == {"running": 3, "queued": 2}


async def test_a_job_starts_no_more_lanes_than_its_cap(store: Store) -> None:
    starter = Starter(room=10)
    spec = voting(5, policy={"max_concurrency": 2})
    job, _ = await store.jobs.create(parse(spec), "acme", starter=starter)
    assert starter.wanted == [2]  # what its cap lets start: other jobs may take the rest
    assert len(starter.released[0][1]) == 2 and job.progress == {"running": 2, "queued": 3}


async def test_a_per_item_map_holds_slots_for_its_first_votes_only(store: Store) -> None:
    """Each item's votes become ready one after another: the job asks for a slot per
    item, not per lane (jobs stored at once each hold what they start)."""
    starter = Starter(room=100)
    per_item = {"n": 4, "aggregate": {"kind": "majority"}}
    spec = mapping(["1", "2", "3"], "{{item}}", per_item=per_item)
    job, _ = await store.jobs.create(parse(spec), "acme", starter=starter)
    assert starter.wanted == [3]
    assert [c.idx for c in starter.released[0][1]] == [0, 4, 8]
    assert job.progress == {"running": 3, "queued": 9}


async def test_a_big_job_starts_what_the_room_holds_the_claim_loop_takes_the_rest(
    store: Store,
) -> None:
    starter = Starter(room=1000)
    every_vote = {"kind": "majority", "early_stop": False}
    job, _ = await store.jobs.create(
        parse(voting(1200, aggregate=every_vote)), "acme", starter=starter
    )
    ((reserved, claims),) = starter.released
    assert reserved == 1000 and [c.idx for c in claims] == list(range(1000))
    assert job.progress == {"running": 1000, "queued": 200}
    assert [c.idx for c in (await store.queue.claim(OWNER, 1000)).claims] == list(range(1000, 1200))


async def test_a_runner_without_room_starts_none(store: Store) -> None:
    starter = Starter(room=0)
    job, _ = await store.jobs.create(parse(voting(2)), "acme", starter=starter)
    assert starter.released == [(0, [])] and job.status == "queued"


async def test_lanes_waiting_elsewhere_go_first_a_new_job_starts_none(store: Store) -> None:
    """Another job's lanes ready to start (held back by the process's room): the new
    job's wait their turn in a claim, which shares the slots out."""
    waiting, _ = await store.jobs.create(parse(voting(2)), "acme")
    starter = Starter(room=10)
    job, _ = await store.jobs.create(parse(voting(2)), "globex", starter=starter)
    assert starter.released == [(2, [])] and job.status == "queued"
    claimed = await store.queue.claim(OWNER, 10)
    assert {c.job_id for c in claimed.claims} == {waiting.id, job.id}


async def test_a_job_refused_holds_no_room(store: Store) -> None:
    await store.jobs.create(parse(voting(1)), "acme")
    starter = Starter(room=10)
    with pytest.raises(TenantAtCapacity):
        await store.jobs.create(parse(voting(2)), "acme", max_in_flight=1, starter=starter)
    assert starter.released == [(2, [])]  # its slots given back, no lane started
    assert len((await store.jobs.page("acme", status=None, cursor=None, limit=10))[0]) == 1


async def test_the_transaction_recording_outcomes_claims_for_the_slots_they_freed(
    store: Store,
) -> None:
    job, first = await capped_vote(store, 5)
    assert [c.idx for c in first] == [0, 1]
    recorded = await store.outcomes.record(OWNER, [answered(c) for c in first], claim=10)
    assert recorded.claimed is not None
    assert [(c.job_id, c.idx, c.attempt_no) for c in recorded.claimed.claims] == [
        (job.id, 2, 1),
        (job.id, 3, 1),
    ]
    assert recorded.claimed.held_back  # lane 4 waits for the cap
    view = await store.jobs.get(job.id, None)
    assert [lane.status for lane in view.lanes] == [
        "succeeded",
        "succeeded",
        "running",
        "running",
        "queued",
    ]
    started = [
        e["data"]["lane"] for e in await store.log.after(job.id, 0) if e["type"] == "lane.started"
    ]
    assert started == [0, 1, 2, 3]
    # Without ``claim`` a recording claims nothing.
    again = await store.outcomes.record(OWNER, [answered(c) for c in recorded.claimed.claims])
    assert again.claimed is None
    assert [lane.status for lane in (await store.jobs.get(job.id, None)).lanes][4] == "queued"


async def test_a_recording_claims_for_the_outcomes_that_came_while_it_was_written(
    store: Store,
) -> None:
    job, first = await capped_vote(store, 5)
    recorded = await store.outcomes.record(
        OWNER, [answered(first[0])], claim=10, unrecorded={job.id: 1}
    )
    assert recorded.claimed is not None
    assert [c.idx for c in recorded.claimed.claims] == [2, 3]  # lane 1's call is over too


async def test_a_vote_starts_no_lane_its_running_lanes_could_make_unneeded(store: Store) -> None:
    """Four of five lanes run (``decided``, cap 4): once two agree, the two running ones
    could decide the vote by themselves, so the fifth waits for them."""
    spec = voting(5, aggregate={"kind": "majority", "extract": "number"})
    spec["policy"] = {"max_concurrency": 4}
    job, _ = await store.jobs.create(parse(spec), "acme")
    claims = (await store.queue.claim(OWNER, 10)).claims
    assert [c.idx for c in claims] == [0, 1, 2, 3]
    await store.outcomes.record(OWNER, [answered(c) for c in claims[:2]])  # 7, 7
    held = await store.queue.claim(OWNER, 10)
    assert held.claims == [] and held.held_back
    await store.outcomes.record(OWNER, [answered(claims[2], "Answer: 8")])
    assert (await store.queue.claim(OWNER, 10)).claims == []  # 7, 7, 8: lane 3 may decide
    await store.outcomes.record(OWNER, [answered(claims[3], "Answer: 8")])
    (fifth,) = (await store.queue.claim(OWNER, 10)).claims  # 7, 7, 8, 8: it is needed
    assert (fifth.job_id, fifth.idx) == (job.id, 4)


# One item, a vote of 4 that two agreeing votes settle, at most 2 lanes in flight.
ONE_ITEM_AHEAD_BY_2 = mapping(
    ["7?"],
    "{{item}}",
    per_item={
        "n": 4,
        "aggregate": {
            "kind": "majority",
            "extract": "number",
            "stop": {"rule": "ahead_by", "k": 2},
        },
    },
    policy={"max_concurrency": 2},
)


async def test_an_items_vote_starts_no_lane_its_running_lanes_could_make_unneeded(
    store: Store,
) -> None:
    """A per-item map's item is a vote too: at ``ahead_by`` 2, one vote in and one running,
    the running one could settle it, so its next lane waits for it."""
    job, _ = await store.jobs.create(parse(ONE_ITEM_AHEAD_BY_2), "acme")
    claims = (await store.queue.claim(OWNER, 10)).claims
    assert [c.idx for c in claims] == [0, 1]
    await store.outcomes.record(OWNER, [answered(claims[0])])  # 7, and lane 1 running
    held = await store.queue.claim(OWNER, 10)
    assert held.claims == [] and held.held_back
    await store.outcomes.record(OWNER, [answered(claims[1], "Answer: 8")])  # 7, 8
    needed = (await store.queue.claim(OWNER, 10)).claims  # undecided, nothing running
    assert [(c.job_id, c.idx) for c in needed] == [(job.id, 2), (job.id, 3)]


async def test_an_item_takes_no_more_lanes_at_once_than_could_settle_it(store: Store) -> None:
    """At ``ahead_by`` 2 with one vote in and nothing running, one more agreeing vote
    could settle the item: with two slots free a claim takes one of its lanes, and the
    next waits for it."""
    job, _ = await store.jobs.create(parse(ONE_ITEM_AHEAD_BY_2), "acme")
    first, second = (await store.queue.claim(OWNER, 10)).claims
    await store.outcomes.record(OWNER, [answered(first), failed(second)])  # one vote: 7
    claimed = await store.queue.claim(OWNER, 10)
    assert [(c.job_id, c.idx) for c in claimed.claims] == [(job.id, 2)]
    assert claimed.held_back
    await store.outcomes.record(OWNER, [answered(claimed.claims[0])])  # 7, 7: settled
    view = await store.jobs.get(job.id, None)
    assert [lane.status for lane in view.lanes] == ["succeeded", "failed", "succeeded", "skipped"]
