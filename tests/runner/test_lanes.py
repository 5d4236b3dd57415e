"""The lane runner: claims, attempts at once, retries through the database, group
commit, and decisions that stop attempts in flight."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

from service.attempts import Attempt
from service.runner.lanes import START_CHUNK
from service.states import ErrorType
from service.store import Claimed, Store
from service.views import Usage
from tests.runner.conftest import Call, Harness, Script, echo, hang, since
from tests.store.conftest import parse
from tests.support import mapping, section, sectioning, voting

NUMBER = {"kind": "majority", "extract": "number"}
LIMITED = Attempt(error_type=ErrorType.RATE_LIMITED, error_message="HTTP 429", transient=True)
DOWN = Attempt(error_type=ErrorType.UPSTREAM_ERROR, error_message="HTTP 503", transient=True)
REFUSED = Attempt(error_type=ErrorType.UPSTREAM_ERROR, error_message="HTTP 400: no")


def seven(tokens: int = 2) -> Attempt:
    return Attempt(output="Answer: 7", usage=Usage(total_tokens=tokens, completion_tokens=tokens))


async def test_every_lane_runs_and_the_job_collects_them(harness: Harness) -> None:
    script = Script()
    harness.runner(script)
    job = await harness.run(
        sectioning(section("weather", text="rain?"), section("draft", text="a poem"))
    )
    assert job.status == "succeeded" and job.result is not None
    assert job.result.output == {"weather": "Echo: rain?", "draft": "Echo: a poem"}
    assert sorted(call.text for call in script.calls) == ["a poem", "rain?"]
    assert job.usage.total_tokens == 4


async def test_a_transient_failure_is_retried_no_sooner_than_retry_after(harness: Harness) -> None:
    def flaky(call: Call) -> Attempt:
        if len(script.calls) <= 2:
            return Attempt(
                error_type=ErrorType.RATE_LIMITED,
                error_message="HTTP 429",
                transient=True,
                retry_after=0.3,
            )
        return echo(call)

    script = Script(flaky)
    harness.runner(script)
    started = time.monotonic()
    job_id = await harness.create(sectioning(section("flaky")))
    events = await harness.events(job_id)
    assert since(started) >= 0.6
    retrying = [e["data"] for e in events if e["type"] == "lane.retrying"]
    assert [r["attempt"] for r in retrying] == [1, 2]
    assert all(r["retry_in_s"] >= 0.3 and r["error"].startswith("rate_limited") for r in retrying)
    lane = (await harness.store.jobs.get(job_id, None)).lanes[0]
    assert (lane.status, lane.attempts, len(script.calls)) == ("succeeded", 3, 3)


async def test_a_failure_that_is_not_transient_is_not_retried(harness: Harness) -> None:
    script = Script(lambda _call: REFUSED)
    harness.runner(script)
    job = await harness.run(sectioning(section("bad"), policy={"max_attempts": 3}))
    assert (job.lanes[0].status, job.lanes[0].attempts, len(script.calls)) == ("failed", 1, 1)
    assert job.lanes[0].error is not None and job.lanes[0].error.type == "upstream_error"


async def test_retries_stop_at_max_attempts(harness: Harness) -> None:
    script = Script(lambda _call: DOWN)
    harness.runner(script)
    job = await harness.run(sectioning(section("down"), policy={"max_attempts": 2}))
    assert (job.lanes[0].status, job.lanes[0].attempts, len(script.calls)) == ("failed", 2, 2)


async def test_an_attempt_never_outlives_the_lane_timeout_or_the_deadline(harness: Harness) -> None:
    script = Script()
    harness.runner(script, default_lane_timeout_s=7)
    await harness.run(sectioning(section("a")))
    await harness.run(sectioning(section("b"), policy={"lane_timeout_s": 3}))
    await harness.run(sectioning(section("c"), policy={"lane_timeout_s": 3, "deadline_s": 1}))
    assert [round(call.timeout) for call in script.calls] == [7, 3, 1]


async def test_a_passed_deadline_stops_running_attempts_and_keeps_what_finished(
    harness: Harness,
) -> None:
    script = Script(lambda call: hang(call) if call.text == "stuck" else echo(call))
    harness.runner(script)
    spec = sectioning(
        section("quick", text="quick"),
        section("stuck", text="stuck"),
        # Room for the quick lane to be recorded first on a loaded machine (a run of the
        # whole suite beside another once took longer than 0.5 s).
        policy={"on_failure": "best_effort", "deadline_s": 1.5},
    )
    job = await harness.run(spec)
    assert job.status == "succeeded" and job.result is not None and job.result.partial
    assert job.result.output == {"quick": "Echo: quick", "stuck": None}
    assert job.lanes[1].status == "timed_out"
    await script.until(lambda s: s.in_flight == 0)
    assert [call.text for call in script.cancelled] == ["stuck"]


async def test_cancel_stops_the_attempts_in_flight(harness: Harness) -> None:
    script = Script(hang)
    harness.runner(script)
    job_id = await harness.create(voting(4))
    await script.until(lambda s: s.in_flight == 4)
    await harness.store.jobs.cancel(job_id, None)
    await script.until(lambda s: s.in_flight == 0)
    assert len(script.cancelled) == 4
    assert (await harness.store.jobs.get(job_id, None)).status == "cancelled"


async def test_early_stop_cancels_the_attempts_that_can_no_longer_change_the_winner(
    harness: Harness,
) -> None:
    answered = 0

    async def three_answer(_call: Call) -> Attempt:
        nonlocal answered
        if answered < 3:
            answered += 1
            return seven()
        return await hang(_call)

    script = Script(three_answer)
    harness.runner(script)
    job = await harness.run(voting(5, aggregate=NUMBER))
    assert job.result is not None and job.result.output == 7
    assert sorted(lane.status for lane in job.lanes) == ["skipped"] * 2 + ["succeeded"] * 3
    await script.until(lambda s: s.in_flight == 0)
    assert len(script.cancelled) == 2


async def test_fail_fast_cancels_the_slow_lanes(harness: Harness) -> None:
    script = Script(lambda call: REFUSED if call.text == "broken" else hang(call))
    harness.runner(script)
    job = await harness.run(
        sectioning(section("broken", text="broken"), section("slow", text="slow"))
    )
    assert job.status == "failed" and job.error is not None and job.error.type == "lane_failed"
    assert [lane.status for lane in job.lanes] == ["failed", "cancelled"]
    await script.until(lambda s: s.in_flight == 0)
    assert [call.text for call in script.cancelled] == ["slow"]


async def test_a_spent_token_budget_starts_no_new_attempt(harness: Harness) -> None:
    script = Script(lambda _call: seven(tokens=100))
    harness.runner(script)
    spec = voting(
        10,
        aggregate={**NUMBER, "early_stop": False},
        policy={"max_concurrency": 2, "max_total_tokens": 250},
    )
    job = await harness.run(spec)
    statuses = [lane.status for lane in job.lanes]
    assert statuses.count("succeeded") == len(script.calls) <= 4  # one round past it at most
    assert statuses.count("cancelled") == 10 - len(script.calls)
    assert job.result is not None and job.result.partial is True


async def test_lanes_held_back_by_a_cap_start_as_others_end_without_a_poll(
    harness: Harness,
) -> None:
    """Waves of two lanes: each starts as the last ends, not at the next poll (30 s)."""

    async def quick(call: Call) -> Attempt:
        await asyncio.sleep(0.02)
        return echo(call)

    script = Script(quick)
    harness.runner(script, poll_interval_s=30, max_concurrency=2)
    started = time.monotonic()
    capped = voting(4, aggregate={**NUMBER, "early_stop": False}, policy={"max_concurrency": 2})
    uncapped = voting(4, aggregate={**NUMBER, "early_stop": False})
    for spec in (capped, uncapped):
        job = await harness.run(spec, within=10)
        assert job.progress == {"succeeded": 4}
    assert since(started) < 5


async def test_a_cap_bounds_the_calls_in_flight_while_answers_wait_to_be_recorded(
    harness: Harness,
) -> None:
    """An answered lane frees its slot before it is recorded: the cap is reached again
    and again, and never passed, by calls ending at scattered times."""
    peak = 0

    async def scattered(call: Call) -> Attempt:
        nonlocal peak
        peak = max(peak, script.in_flight)
        await asyncio.sleep(0.001 * (int(call.text.split()[-1]) % 7))
        return echo(call)

    script = Script(scattered)
    harness.runner(script, poll_interval_s=30)
    spec = mapping([f"item {i}" for i in range(60)], "{{item}}", policy={"max_concurrency": 3})
    job = await harness.run(spec, within=20)
    assert job.progress == {"succeeded": 60} and len(script.calls) == 60
    assert peak == 3


async def test_a_capped_jobs_freed_slots_are_claimed_by_the_recordings_alone(
    harness: Harness,
) -> None:
    """Each recording claims the slots its outcomes freed, up to the job's cap: the
    claim loop, which would find the cap full, is not woken to try after each."""
    claims = 0
    claim = harness.store.queue.claim

    async def counted(*args: Any, **kwargs: Any) -> Claimed:
        nonlocal claims
        claims += 1
        return await claim(*args, **kwargs)

    harness.store.queue.claim = counted  # type: ignore[method-assign]
    script = Script(lambda call: asyncio.sleep(0.002, echo(call)))
    harness.runner(script, poll_interval_s=30)
    spec = mapping([f"item {i}" for i in range(40)], "{{item}}", policy={"max_concurrency": 2})
    job = await harness.run(spec, within=20)
    assert job.progress == {"succeeded": 40}
    assert claims <= 3, claims  # at the start, and when the job was stored


async def test_a_big_claim_starts_its_lanes_a_few_a_turn_within_the_process_cap(
    harness: Harness,
) -> None:
    """A claim of many lanes starts ``START_CHUNK`` of them a turn of the event loop
    (each builds and sends its request: all at once held the answers and the recorder
    back for that long), and the lanes still to start hold their slots: the process's
    cap is never passed."""
    turn = 0

    async def ticker() -> None:
        nonlocal turn
        while True:
            await asyncio.sleep(0)
            turn += 1

    turns: list[int] = []
    peak = 0

    async def counted(call: Call) -> Attempt:
        nonlocal peak
        turns.append(turn)
        peak = max(peak, script.in_flight)
        await asyncio.sleep(0.05)
        return echo(call)

    ticking = asyncio.create_task(ticker())
    try:
        script = Script(counted)
        harness.runner(script, poll_interval_s=30, max_concurrency=70)
        spec = mapping([f"item {i}" for i in range(150)], "{{item}}")
        job = await harness.run(spec, within=20)
    finally:
        ticking.cancel()
    assert job.progress == {"succeeded": 150} and len(script.calls) == 150
    most = max(Counter(turns).values())  # lanes started in one turn
    assert most <= START_CHUNK and most < 70
    assert peak == 70


async def test_lanes_not_yet_started_when_the_runner_stops_never_start(
    harness: Harness,
) -> None:
    """A runner stopped while a claim's lanes are still starting starts no more of them
    (their leases are given back with the others')."""
    script = Script(hang)
    runner = harness.runner(script, poll_interval_s=30)
    job_id = await harness.create(voting(500, aggregate={**NUMBER, "early_stop": False}))
    await script.until(lambda s: s.in_flight > 0)
    await harness.stop(runner)
    started = len(script.calls)
    for _ in range(20):
        await asyncio.sleep(0)
    assert len(script.calls) == started == len(script.cancelled) < 500
    lanes = (await harness.store.jobs.get(job_id, None)).lanes
    assert {lane.status for lane in lanes} == {"queued"}


async def test_an_attempt_that_raises_fails_its_lane_and_the_job_still_ends(
    harness: Harness,
) -> None:
    def broken(_call: Call) -> Attempt:
        raise RuntimeError("injected defect")

    harness.runner(Script(broken))
    job = await harness.run(voting(2))
    assert job.status == "failed"
    assert [lane.error.type for lane in job.lanes if lane.error] == ["internal_error"] * 2
    assert job.lanes[0].error is not None
    assert job.lanes[0].error.message == "RuntimeError: injected defect"


async def test_streamed_text_reaches_subscribers_coalesced_and_is_never_stored(
    harness: Harness,
) -> None:
    async def streaming(call: Call) -> Attempt:
        assert call.on_delta is not None
        for i in range(60):
            call.on_delta(f"w{i} ")
            await asyncio.sleep(0.01)
        return Attempt(output="".join(f"w{i} " for i in range(60)))

    harness.runner(Script(streaming))
    spec = sectioning(section("story"))
    spec["sections"][0]["task"]["stream"] = True
    job_id = await harness.create(spec)
    events = await harness.events(job_id)
    deltas = harness.live("lane.delta")
    job = await harness.store.jobs.get(job_id, None)
    assert "".join(d["data"]["text"] for d in deltas) == job.lanes[0].output
    assert 2 <= len(deltas) <= 16  # 60 chunks over about 0.6 s, about ten a second
    assert all(d["seq"] == 0 for d in deltas)
    assert not any(e["type"] == "lane.delta" for e in await harness.store.log.after(job_id, 0))
    assert events[-1]["type"] == "job.succeeded"


async def test_a_stopped_runner_gives_its_lanes_back_for_another_to_run(
    harness: Harness,
) -> None:
    first = Script(hang)
    runner = harness.runner(first)
    job_id = await harness.create(voting(2))
    await first.until(lambda s: s.in_flight == 2)
    await harness.stop(runner)
    lanes = (await harness.store.jobs.get(job_id, None)).lanes
    assert {lane.status for lane in lanes} == {"queued"}
    harness.runner(Script())
    await harness.events(job_id)
    job = await harness.store.jobs.get(job_id, None)
    assert job.status == "succeeded" and [lane.attempts for lane in job.lanes] == [2, 2]


async def test_lanes_of_a_worker_that_died_run_again_elsewhere(harness: Harness) -> None:
    dead = Store(harness.db, lease_seconds=-1)  # leases that have already expired
    job_id = await harness.create(voting(2))
    assert len((await dead.queue.claim("dead-worker", 10)).claims) == 2
    script = Script()
    harness.runner(script)
    await harness.events(job_id)
    job = await harness.store.jobs.get(job_id, None)
    assert job.status == "succeeded" and [lane.attempts for lane in job.lanes] == [2, 2]
    assert len(script.calls) == 2


async def test_a_job_created_beside_the_runner_starts_as_it_is_stored(harness: Harness) -> None:
    """The creating transaction starts what the runner has room for (no claim of
    their own); not before the runner runs, which first takes every lease back."""
    script = Script()
    runner = harness.runner(script, poll_interval_s=30, max_concurrency=3)
    every = {**NUMBER, "early_stop": False}
    early, _ = await harness.store.jobs.create(
        parse(voting(2, aggregate=every)), "acme", starter=runner.lanes
    )
    assert early.status == "queued"  # the runner has not started yet
    runner.wake()  # as the route does when lanes are left queued
    await harness.events(early.id)
    async with asyncio.timeout(5):
        while runner.lanes.holds_leases():  # its lanes' slots are free once recorded
            await asyncio.sleep(0.01)
    late, _ = await harness.store.jobs.create(
        parse(voting(5, aggregate=every)), "acme", starter=runner.lanes
    )
    assert late.progress == {"running": 3, "queued": 2}  # its room: max_concurrency
    runner.wake()
    assert (await harness.events(late.id))[-1]["type"] == "job.succeeded"
    assert len(script.calls) == 7  # each lane ran once


async def test_jobs_stored_at_once_each_start_their_lanes(harness: Harness) -> None:
    """Each new job holds the slots its lanes use, not all the runner has: on
    PostgreSQL the creating transactions overlap, and a job holding every free slot
    left the others' lanes to wait for a claim."""
    script = Script()
    runner = harness.runner(script, poll_interval_s=30, max_concurrency=8)
    first, _ = await harness.store.jobs.create(parse(voting(1)), "acme", starter=runner.lanes)
    runner.wake()
    await harness.events(first.id)  # the runner runs (and takes new jobs' lanes)
    script.answer = hang
    spec = parse(voting(2, aggregate={**NUMBER, "early_stop": False}))
    created = await asyncio.gather(
        *(harness.store.jobs.create(spec, "acme", starter=runner.lanes) for _ in range(4))
    )
    assert [job.progress for job, _ in created] == [{"running": 2}] * 4


async def test_lanes_that_answer_together_are_recorded_in_one_transaction(
    harness: Harness,
) -> None:
    """Five lanes answering one after another, a turn of the event loop apart: the
    recorder waits for the rest of the job's lanes (each outcome within 1 ms of the
    last) and writes them, and the decision, at once; a lane still running after that
    does not hold the others back. (Turns of the loop, not timers: on a loaded machine
    a timer of 0.2 ms fires a few milliseconds late.)"""
    all_running = asyncio.Event()
    running = 0

    async def staggered(call: Call) -> Attempt:
        nonlocal running
        lane = int(call.text.rsplit(" ", 1)[-1])
        if lane == 5:
            await asyncio.sleep(1)  # far past the wait
            return seven()
        running += 1
        if running == 5:
            all_running.set()
        await all_running.wait()
        for _ in range(lane):  # lane i answers i turns after lane 0
            await asyncio.sleep(0)
        return seven()

    harness.runner(Script(staggered))
    spec = sectioning(*(section(f"s{i}", text=f"lane {i}") for i in range(6)))
    events = await harness.events(await harness.create(spec))
    ended = [event for event in events if event["type"] == "lane.succeeded"]
    assert [event["data"]["lane"] for event in ended][-1] == 5
    first_five = {event["data"]["at"] for event in ended[:5]}
    assert len(first_five) == 1, first_five  # one transaction
    assert ended[5]["data"]["at"] not in first_five
