"""Recording attempt outcomes in batches and deciding jobs in the same transaction:
stale writes rejected, retries queued for later, early stop, the budget, deadlines."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from service.events import Frame
from service.policy import Retrying
from service.states import ErrorType, LaneStatus
from service.store import Claim, Outcome, Store
from service.store.db import Database
from service.store.decisions import PROBE_ABOVE_LANES
from service.views import Usage
from tests.store.conftest import OWNER, parse
from tests.support import mapping, section, sectioning, voting

NUMBER = {"kind": "majority", "extract": "number"}


def answered(claim: Claim, output: Any = "Answer: 7", tokens: int = 10) -> Outcome:
    now = time.time()
    return Outcome(
        claim.job_id,
        claim.idx,
        claim.attempt_no,
        LaneStatus.SUCCEEDED,
        output=output,
        usage=Usage(prompt_tokens=tokens // 2, completion_tokens=tokens // 2, total_tokens=tokens),
        started_at=now,
        finished_at=now,
    )


def failed(claim: Claim, status: LaneStatus = LaneStatus.FAILED, retry_in: float = 0.0) -> Outcome:
    now = time.time()
    return Outcome(
        claim.job_id,
        claim.idx,
        claim.attempt_no,
        status,
        error_type=ErrorType.UPSTREAM_ERROR,
        error_message="HTTP 503: down",
        retry_in=retry_in,
        started_at=now,
        finished_at=now,
    )


async def test_a_batch_records_every_job_it_touches_in_one_go(store: Store) -> None:
    one, _ = await store.jobs.create(parse(voting(1, aggregate=NUMBER)), "acme")
    two, _ = await store.jobs.create(parse(voting(1, aggregate=NUMBER)), "acme")
    claims = (await store.queue.claim(OWNER, 10)).claims
    recorded = await store.outcomes.record(OWNER, [answered(c) for c in claims])
    assert recorded.rejected == 0 and recorded.reduce_jobs == []
    for job_id in (one.id, two.id):
        view = await store.jobs.get(job_id, None)
        assert view.status == "succeeded" and view.result is not None
        assert view.result.output == 7
        assert view.usage == Usage(prompt_tokens=5, completion_tokens=5, total_tokens=10)
        kinds = [e["type"] for e in await store.log.after(job_id, 0)]
        assert kinds[-3:] == ["lane.succeeded", "job.aggregating", "job.succeeded"]


async def test_jobs_ended_by_one_batch_each_keep_their_own_end(store: Store) -> None:
    """Ends written together (one statement on PostgreSQL) stay each job's own: its
    status, result or error, usage and final event."""
    jobs = [(await store.jobs.create(parse(voting(1, aggregate=NUMBER)), "acme"))[0] for _ in "abc"]
    claims = {c.job_id: c for c in (await store.queue.claim(OWNER, 10)).claims}
    first, second, third = (claims[job.id] for job in jobs)
    batch = [answered(first, "Answer: 3", 4), failed(second), answered(third, "Answer: 9", 20)]
    await store.outcomes.record(OWNER, batch)
    views = [await store.jobs.get(job.id, None) for job in jobs]
    assert [(v.status, v.result and v.result.output) for v in views] == [
        ("succeeded", 3),
        ("failed", None),
        ("succeeded", 9),
    ]
    assert views[1].error is not None and views[1].error.type == "no_results"
    assert [v.usage.total_tokens for v in views] == [4, 0, 20]
    for view in views:
        final = (await store.log.after(view.id, 0))[-1]
        assert final["type"] == f"job.{view.status}"
        assert final["data"]["usage"]["total_tokens"] == view.usage.total_tokens


async def test_a_stale_write_is_rejected_not_recorded(store: Store) -> None:
    job, _ = await store.jobs.create(parse(voting(2, aggregate=NUMBER)), "acme")
    first, second = (await store.queue.claim(OWNER, 10)).claims
    wrong_owner = await store.outcomes.record("someone-else", [answered(first)])
    old_attempt = Outcome(first.job_id, first.idx, 0, LaneStatus.SUCCEEDED, output="1")
    wrong_attempt = await store.outcomes.record(OWNER, [old_attempt])
    assert (wrong_owner.rejected, wrong_attempt.rejected) == (1, 1)
    lanes = (await store.jobs.get(job.id, None)).lanes
    assert [lane.status for lane in lanes] == ["running", "running"]
    assert (await store.outcomes.record(OWNER, [answered(first), answered(second)])).rejected == 0


async def test_a_retry_queues_the_lane_again_after_its_backoff(store: Store) -> None:
    job, _ = await store.jobs.create(parse(voting(1)), "acme")
    (claim,) = (await store.queue.claim(OWNER, 10)).claims
    before = time.time()
    await store.outcomes.record(OWNER, [failed(claim, LaneStatus.QUEUED, retry_in=60)])
    lane = (await store.jobs.get(job.id, None)).lanes[0]
    assert (lane.status, lane.attempts) == ("queued", 1)
    assert (await store.queue.claim(OWNER, 10)).claims == []  # not before its time
    due = await store.queue.next_wakeup()
    assert due is not None and due >= before + 60
    event = (await store.log.after(job.id, 0))[-1]
    assert event["type"] == "lane.retrying"
    assert event["data"]["retry_in_s"] == 60 and event["data"]["attempt"] == 1


async def test_early_stop_skips_the_lanes_that_can_no_longer_change_the_winner(
    store: Store,
) -> None:
    job, _ = await store.jobs.create(parse(voting(5, aggregate=NUMBER)), "acme")
    claims = (await store.queue.claim(OWNER, 10)).claims
    await store.outcomes.record(OWNER, [answered(c) for c in claims[:3]])
    view = await store.jobs.get(job.id, None)
    assert [lane.status for lane in view.lanes] == ["succeeded"] * 3 + ["skipped"] * 2
    assert view.status == "succeeded" and view.result is not None
    assert view.result.output == 7 and view.result.partial is False
    late = await store.outcomes.record(OWNER, [answered(c) for c in claims[3:]])
    assert late.rejected == 2


async def test_a_stopping_rule_holds_in_a_process_that_did_not_create_the_job(
    db: Database,
) -> None:
    """A worker reads the spec as stored: it parses back, rule and all."""
    creator, worker = Store(db, lease_seconds=30), Store(db, lease_seconds=30)
    rule = {**NUMBER, "stop": {"rule": "ahead_by", "k": 2}}
    job, _ = await creator.jobs.create(parse(voting(6, aggregate=rule)), "acme")
    claims = (await worker.queue.claim(OWNER, 2)).claims
    await worker.outcomes.record(OWNER, [answered(c) for c in claims])
    view = await worker.jobs.get(job.id, None)
    assert [lane.status for lane in view.lanes] == ["succeeded"] * 2 + ["skipped"] * 4
    assert view.result is not None and view.result.details["stop"]["rule"] == "ahead_by"


async def test_the_window_rule_reads_votes_in_the_order_they_were_recorded(
    store: Store,
) -> None:
    """Not by the workers' clocks: a vote recorded later with an earlier finished_at
    (another worker's clock is behind) still comes last."""
    window = {**NUMBER, "stop": {"rule": "window", "size": 3}}
    job, _ = await store.jobs.create(parse(voting(6, aggregate=window)), "acme")
    lane = (await store.queue.claim(OWNER, 4)).claims
    now = time.time()

    def at(claim: Claim, answer: int, finished_at: float) -> Outcome:
        return replace(answered(claim, f"Answer: {answer}"), finished_at=finished_at)

    await store.outcomes.record(OWNER, [at(lane[0], 7, now + 5), at(lane[1], 8, now + 6)])
    await store.outcomes.record(OWNER, [at(lane[2], 8, now + 1), at(lane[3], 8, now + 7)])

    view = await store.jobs.get(job.id, None)
    assert view.result is not None and view.result.output == 8
    assert view.result.details["stop"]["stopped"] is True
    assert [lane.status for lane in view.lanes] == ["succeeded"] * 4 + ["skipped"] * 2


async def test_fail_fast_fails_the_job_and_cancels_the_open_lanes(store: Store) -> None:
    job, _ = await store.jobs.create(parse(sectioning(section("a"), section("b"))), "acme")
    first, _second = (await store.queue.claim(OWNER, 10)).claims
    await store.outcomes.record(OWNER, [failed(first)])
    view = await store.jobs.get(job.id, None)
    assert view.status == "failed" and view.error is not None
    assert view.error.type == "lane_failed" and "'a'" in view.error.message
    assert [lane.status for lane in view.lanes] == ["failed", "cancelled"]


async def test_a_spent_budget_cancels_the_queued_lanes(store: Store) -> None:
    spec = voting(4, aggregate={**NUMBER, "early_stop": False}, policy={"max_total_tokens": 15})
    job, _ = await store.jobs.create(parse(spec), "acme")
    claims = (await store.queue.claim(OWNER, 2)).claims
    await store.outcomes.record(OWNER, [answered(c, tokens=10) for c in claims])
    view = await store.jobs.get(job.id, None)
    assert [lane.status for lane in view.lanes] == ["succeeded"] * 2 + ["cancelled"] * 2
    assert {lane.error.type for lane in view.lanes[2:] if lane.error} == {"budget"}
    assert view.result is not None and view.result.partial is True


async def test_a_passed_deadline_times_out_open_lanes_and_decides_on_the_rest(
    store: Store,
) -> None:
    spec = sectioning(
        section("a"), section("b"), policy={"on_failure": "best_effort", "deadline_s": 0.001}
    )
    job, _ = await store.jobs.create(parse(spec), "acme")
    (claim,) = (await store.queue.claim(OWNER, 1)).claims
    await store.outcomes.record(OWNER, [answered(claim, output="done")])
    assert await store.outcomes.expire_deadlines() == []
    view = await store.jobs.get(job.id, None)
    assert [lane.status for lane in view.lanes] == ["succeeded", "timed_out"]
    assert view.status == "succeeded" and view.result is not None
    assert view.result.partial is True and view.result.output == {"a": "done", "b": None}


async def test_a_gate_that_matches_withholds_the_output(store: Store) -> None:
    spec = sectioning(section("draft"), section("safety", gate={"block_if": "(?i)unsafe"}))
    job, _ = await store.jobs.create(parse(spec), "acme")
    draft, safety = (await store.queue.claim(OWNER, 10)).claims
    await store.outcomes.record(OWNER, [answered(draft, "story"), answered(safety, "UNSAFE")])
    view = await store.jobs.get(job.id, None)
    assert view.result is not None and view.result.blocked is True
    assert view.result.blocked_by == "safety" and view.result.output is None
    assert view.lanes[1].answer == "blocked"


async def test_a_lost_lease_is_a_failed_attempt_retried_after_a_backoff(db: Database) -> None:
    dead = Store(db, lease_seconds=-1)  # its leases have expired already
    job, _ = await dead.jobs.create(parse(voting(2)), "acme")
    assert len((await dead.queue.claim("dead-worker", 10)).claims) == 2
    before = time.time()
    recorded = await dead.outcomes.expire_leases(Retrying(base_s=10, max_s=10))
    assert recorded.requeued == 2
    lanes = (await dead.jobs.get(job.id, None)).lanes
    assert [(lane.status, lane.attempts) for lane in lanes] == [("queued", 1), ("queued", 1)]
    retrying = [e["data"] for e in await dead.log.after(job.id, 0) if e["type"] == "lane.retrying"]
    assert [r["error"].split(":")[0] for r in retrying] == ["lease_lost", "lease_lost"]
    assert all(5 <= r["retry_in_s"] <= 10 for r in retrying)
    assert (await dead.queue.claim(OWNER, 10)).claims == []  # not before the backoff
    due = await dead.queue.next_wakeup()
    assert due is not None and due >= before + 5


async def test_a_lane_that_loses_its_lease_on_every_attempt_fails_and_the_job_ends(
    db: Database,
) -> None:
    dead = Store(db, lease_seconds=-1)
    spec = sectioning(section("poison"), policy={"max_attempts": 2})
    job, _ = await dead.jobs.create(parse(spec), "acme")
    for attempt_no in (1, 2):
        (claim,) = (await dead.queue.claim(f"worker-{attempt_no}", 10)).claims
        assert claim.attempt_no == attempt_no
        await dead.outcomes.expire_leases(Retrying(base_s=0, max_s=0))
    view = await dead.jobs.get(job.id, None)
    assert view.status == "failed" and view.error is not None
    lane = view.lanes[0]
    assert (lane.status, lane.attempts) == ("failed", 2)
    assert lane.error is not None and lane.error.type == "lease_lost"
    kinds = [e["type"] for e in await dead.log.after(job.id, 0)]
    assert kinds.count("lane.retrying") == 1 and kinds[-3:] == [
        "lane.failed",
        "job.aggregating",
        "job.failed",
    ]


# --- usage that matches the bill ---------------------------------------------------------


def billed(claim: Claim, tokens: int, cost: float | None = None) -> Outcome:
    usage = Usage(prompt_tokens=tokens, completion_tokens=0, total_tokens=tokens, cost_usd=cost)
    return Outcome(
        claim.job_id,
        claim.idx,
        claim.attempt_no,
        LaneStatus.SUCCEEDED,
        output="Answer: 7",
        usage=usage,
    )


async def test_answers_that_come_after_their_lane_was_stopped_still_count(store: Store) -> None:
    """Early stop skips two lanes whose answers were on their way: the provider billed
    them, so the lanes (still skipped) and the job count their tokens."""
    job, _ = await store.jobs.create(parse(voting(5, aggregate=NUMBER)), "acme")
    claims = (await store.queue.claim(OWNER, 10)).claims
    await store.outcomes.record(OWNER, [billed(c, 10) for c in claims[:3]])
    late = await store.outcomes.record(OWNER, [billed(c, 10) for c in claims[3:]])
    assert late.rejected == 2
    view = await store.jobs.get(job.id, None)
    assert [lane.status for lane in view.lanes] == ["succeeded"] * 3 + ["skipped"] * 2
    assert [lane.usage.total_tokens for lane in view.lanes] == [10] * 5
    assert [lane.output for lane in view.lanes[3:]] == [None, None]
    assert view.usage.total_tokens == 50 == sum(lane.usage.total_tokens for lane in view.lanes)


async def test_an_answer_after_the_job_ended_counts_too(store: Store) -> None:
    job, _ = await store.jobs.create(parse(voting(2, aggregate=NUMBER)), "acme")
    claims = (await store.queue.claim(OWNER, 10)).claims
    await store.jobs.cancel(job.id, None)
    await store.outcomes.record(OWNER, [billed(c, 7) for c in claims])
    view = await store.jobs.get(job.id, None)
    assert view.status == "cancelled" and view.usage.total_tokens == 14


async def test_costs_add_up_and_stay_absent_without_prices(store: Store) -> None:
    priced, _ = await store.jobs.create(parse(voting(2, aggregate=NUMBER)), "acme")
    free, _ = await store.jobs.create(parse(voting(1, aggregate=NUMBER)), "acme")
    claims = (await store.queue.claim(OWNER, 10)).claims
    outcomes = [billed(c, 5, 0.25 if c.job_id == priced.id else None) for c in claims]
    await store.outcomes.record(OWNER, outcomes)
    priced_view, free_view = (
        await store.jobs.get(priced.id, None),
        await store.jobs.get(free.id, None),
    )
    assert priced_view.usage.cost_usd == 0.5
    assert [lane.usage.cost_usd for lane in priced_view.lanes] == [0.25, 0.25]
    assert free_view.usage.cost_usd is None
    assert "cost_usd" not in free_view.model_dump()["usage"]


async def test_a_spent_cost_budget_starts_no_new_attempt(store: Store) -> None:
    spec = voting(4, aggregate={**NUMBER, "early_stop": False}, policy={"max_cost_usd": 0.4})
    job, _ = await store.jobs.create(parse(spec), "acme")
    claims = (await store.queue.claim(OWNER, 2)).claims
    await store.outcomes.record(OWNER, [billed(c, 1, 0.25) for c in claims])
    view = await store.jobs.get(job.id, None)
    assert [lane.status for lane in view.lanes] == ["succeeded"] * 2 + ["cancelled"] * 2
    assert {lane.error.type for lane in view.lanes[2:] if lane.error} == {"budget"}


async def test_what_an_answer_says_beside_its_text_is_kept_and_streamed(store: Store) -> None:
    call = {
        "id": "c1",
        "type": "function",
        "function": {"name": "vote", "arguments": '{"answer": 7}'},
    }
    reply = {
        "finish_reason": "tool_calls",
        "tool_calls": [call],
        "logprobs": {"mean": -0.1, "tokens": 4},
    }
    spec = voting(1, aggregate={"kind": "majority", "extract": "json", "field": "answer"})
    job, _ = await store.jobs.create(parse(spec), "acme")
    assert len((await store.queue.claim(OWNER, 1)).claims) == 1
    now = time.time()
    outcome = Outcome(
        job.id,
        0,
        1,
        LaneStatus.SUCCEEDED,
        output=None,
        reply=reply,
        started_at=now,
        finished_at=now,
    )
    await store.outcomes.record(OWNER, [outcome])
    view = await store.jobs.get(job.id, None)
    lane = view.lanes[0]
    assert (lane.output, lane.answer, lane.finish_reason) == (None, 7, "tool_calls")
    assert lane.tool_calls == [call] and lane.logprobs is not None and lane.logprobs.tokens == 4
    assert view.result is not None and view.result.output == 7
    (succeeded,) = [
        e["data"] for e in await store.log.after(job.id, 0) if e["type"] == "lane.succeeded"
    ]
    assert succeeded["tool_calls"] == [call] and succeeded["finish_reason"] == "tool_calls"


async def test_a_replayed_event_is_the_frame_sent_live_byte_for_byte(store: Store) -> None:
    """An event is encoded once: what a live client got on commit is what the table
    holds and what a replay sends, upstream text of any kind included."""
    published: list[dict[str, Any]] = []
    store.db.on_commit = published.extend
    job, _ = await store.jobs.create(parse(voting(1)), "acme")
    (claim,) = (await store.queue.claim(OWNER, 10)).claims
    text = 'two\nlines\r\n é ☃ "quoted" \\ \t'
    await store.outcomes.record(OWNER, [answered(claim, output=text)])
    live = {e["seq"]: Frame.encode(e) for e in published}
    stored = await store.log.stored(job.id, 0)
    assert [e["seq"] for e in stored] == sorted(live) and len(stored) >= 3
    for event in stored:
        assert Frame.encode(event).body == live[event["seq"]].body
    succeeded = next(e for e in await store.log.after(job.id, 0) if e["type"] == "lane.succeeded")
    assert succeeded["data"]["output"] == text
    assert live[succeeded["seq"]].event(job.id)["data"] == succeeded["data"]


def big_map(items: int, on_failure: str) -> dict[str, Any]:
    items_ = [f"item {i}" for i in range(items)]
    return mapping(items_, "{{item}}", policy={"on_failure": on_failure})


async def test_a_big_map_is_decided_when_its_last_lane_ends(store: Store) -> None:
    """Past PROBE_ABOVE_LANES lanes, a batch that ends none of the job's open lanes
    badly finds them open without counting them; the last one ends the job."""
    items = PROBE_ABOVE_LANES + 20
    job, _ = await store.jobs.create(parse(big_map(items, "fail_fast")), "acme")
    claims = (await store.queue.claim(OWNER, items)).claims
    await store.outcomes.record(OWNER, [answered(c, output=f"{c.idx}") for c in claims[:-1]])
    assert (await store.jobs.get(job.id, None, with_lanes=False)).status == "running"
    await store.outcomes.record(OWNER, [answered(claims[-1], output=f"{items - 1}")])
    view = await store.jobs.get(job.id, None, with_lanes=False)
    assert view.status == "succeeded" and view.result is not None
    assert view.result.output == [f"{i}" for i in range(items)]


async def test_a_big_maps_first_failure_fails_it_at_once_under_fail_fast(store: Store) -> None:
    items = PROBE_ABOVE_LANES + 20
    job, _ = await store.jobs.create(parse(big_map(items, "fail_fast")), "acme")
    claims = (await store.queue.claim(OWNER, 10)).claims
    await store.outcomes.record(OWNER, [answered(c) for c in claims[:5]])
    assert (await store.jobs.get(job.id, None, with_lanes=False)).status == "running"
    await store.outcomes.record(OWNER, [failed(claims[5])])
    view = await store.jobs.get(job.id, None)
    assert view.status == "failed" and view.error is not None
    assert view.error.type == "lane_failed"
    assert view.progress == {"succeeded": 5, "failed": 1, "cancelled": items - 6}
