"""The reducer: one more call over every lane's output, durable and retried like a lane."""

from __future__ import annotations

import re
from typing import Any

from service.attempts import Attempt
from service.states import ErrorType
from service.views import Usage
from tests.runner.conftest import Call, Harness, Script, echo
from tests.support import section, sectioning

SYNTHESISE = {"model": "m", "messages": [{"role": "system", "content": "Synthesise."}]}
REDUCE = {"kind": "reduce", "task": SYNTHESISE}


def is_reducer(call: Call) -> bool:
    return call.messages is not None


async def test_the_reducer_reads_every_output_tagged_in_lane_order(harness: Harness) -> None:
    def answer(call: Call) -> Attempt:
        if is_reducer(call):
            return Attempt(output="merged", usage=Usage(total_tokens=50, completion_tokens=50))
        return echo(call)

    script = Script(answer)
    harness.runner(script)
    spec = sectioning(
        section("skeptic", text="risky"), section("optimist", text="great"), aggregate=REDUCE
    )
    job = await harness.run(spec)
    assert job.status == "succeeded" and job.result is not None
    assert job.result.output == "merged" and job.result.details == {"inputs": 2}
    (reducer,) = [call for call in script.calls if is_reducer(call)]
    assert reducer.messages is not None and reducer.messages[0].content == "Synthesise."
    tagged = reducer.text
    assert tagged.index('<lane name="skeptic">') < tagged.index('<lane name="optimist">')
    assert "Echo: risky" in tagged and "Echo: great" in tagged
    assert job.usage.total_tokens == 2 + 2 + 50  # the reducer's tokens count too


async def test_a_reducer_that_raises_fails_the_job_instead_of_holding_it(harness: Harness) -> None:
    def answer(call: Call) -> Attempt:
        if is_reducer(call):
            raise RuntimeError("injected defect")
        return echo(call)

    harness.runner(Script(answer))
    job = await harness.run(sectioning(section("a"), section("b"), aggregate=REDUCE))
    assert job.status == "failed" and job.error is not None
    assert job.error.type == "internal_error"
    assert [lane.status for lane in job.lanes] == ["succeeded", "succeeded"]


async def test_a_reducer_out_of_budget_fails_the_job_without_a_call(harness: Harness) -> None:
    script = Script(lambda call: Attempt(output="x", usage=Usage(total_tokens=100)))
    harness.runner(script)
    spec = sectioning(section("a"), aggregate=REDUCE, policy={"max_total_tokens": 50})
    job = await harness.run(spec)
    assert job.status == "failed" and job.error is not None and job.error.type == "budget"
    assert not any(is_reducer(call) for call in script.calls)


async def test_a_reducer_in_its_backoff_resumes_after_a_restart(harness: Harness) -> None:
    """The retry waits in the database, not in the stopped process's memory."""

    def down(call: Call) -> Attempt:
        if is_reducer(call):
            return Attempt(
                error_type=ErrorType.UPSTREAM_ERROR,
                error_message="HTTP 503",
                transient=True,
                retry_after=0.5,
            )
        return echo(call)

    first = Script(down)
    runner = harness.runner(first)
    job_id = await harness.create(sectioning(section("a"), aggregate=REDUCE))
    await first.until(lambda s: any(is_reducer(c) for c in s.calls) and s.in_flight == 0)

    async def waiting() -> bool:
        return await harness.store.reductions.next_due() is not None

    from tests.processes import poll

    await poll(waiting, within=10, what="the reducer's retry recorded")
    await harness.stop(runner)
    assert (await harness.store.jobs.get(job_id, None)).status == "aggregating"
    second = Script(lambda call: Attempt(output="merged") if is_reducer(call) else echo(call))
    harness.runner(second)
    await harness.events(job_id)
    job = await harness.store.jobs.get(job_id, None)
    assert job.status == "succeeded" and job.result is not None and job.result.output == "merged"
    assert [is_reducer(c) for c in second.calls] == [True]


async def test_the_reducers_steps_are_on_the_stream(harness: Harness) -> None:
    """Started, retrying, its streamed text (live), and how it ended, before the job's end."""
    tries = 0

    def flaky(call: Call) -> Attempt:
        nonlocal tries
        if not is_reducer(call):
            return echo(call)
        tries += 1
        if tries == 1:
            return Attempt(
                error_type=ErrorType.UPSTREAM_ERROR, error_message="HTTP 503", transient=True
            )
        assert call.on_delta is not None  # the reduce task streams
        call.on_delta("mer")
        call.on_delta("ged")
        return Attempt(output="merged", usage=Usage(total_tokens=5, completion_tokens=5))

    harness.runner(Script(flaky))
    streamed = {**REDUCE, "task": {**SYNTHESISE, "stream": True}}
    job_id = await harness.create(sectioning(section("a"), aggregate=streamed))
    events = await harness.events(job_id)

    stored = [e for e in events if e["seq"]]  # deltas are live only (seq 0)
    steps = [(e["type"], e["data"].get("attempt")) for e in stored if e["type"].startswith("agg")]
    assert steps == [
        ("aggregate.started", 1),
        ("aggregate.retrying", 1),
        ("aggregate.started", 2),
        ("aggregate.succeeded", 2),
    ]
    retrying = next(e["data"] for e in events if e["type"] == "aggregate.retrying")
    assert retrying["kind"] == "reduce" and retrying["error"] == "upstream_error: HTTP 503"
    assert [e["type"] for e in stored[-2:]] == ["aggregate.succeeded", "job.succeeded"]
    deltas = harness.live("aggregate.delta")
    assert "".join(d["data"]["text"] for d in deltas) == "merged"
    assert {d["data"]["attempt"] for d in deltas} == {2}


# --- a hierarchical reduce (group_size) -------------------------------------------------


def reduced_names(call: Call) -> list[str]:
    return re.findall(r'<lane name="([^"]+)">', call.text)


async def test_a_hierarchical_reduce_reduces_groups_then_their_results(harness: Harness) -> None:
    script = Script(
        lambda call: (
            Attempt(output=f"sum of {len(reduced_names(call))}") if is_reducer(call) else echo(call)
        )
    )
    harness.runner(script)
    names = [f"s{i}" for i in range(7)]
    spec = sectioning(*(section(name) for name in names), aggregate={**REDUCE, "group_size": 3})
    job_id = await harness.create(spec)
    events = await harness.events(job_id)
    job = await harness.store.jobs.get(job_id, None)
    assert job.status == "succeeded" and job.result is not None
    assert job.result.details == {"inputs": 7, "levels": 2}
    reducers = [reduced_names(call) for call in script.calls if is_reducer(call)]
    # Level 0: groups of three lanes' outputs, in lane order; then one call over theirs.
    assert sorted(reducers[:3]) == [["s0", "s1", "s2"], ["s3", "s4", "s5"], ["s6"]]
    assert reducers[3] == ["level-1.0", "level-1.1", "level-1.2"]
    assert job.result.output == "sum of 3"
    groups = [
        (e["data"]["level"], e["data"]["group"])
        for e in events
        if e["type"] == "aggregate.succeeded" and "group" in e["data"]
    ]
    assert sorted(groups) == [(0, 0), (0, 1), (0, 2)]
    assert job.usage.total_tokens == 7 * 2  # echo lanes; the reducer here reports none


async def test_a_failed_group_is_retried_and_the_groups_done_are_kept(harness: Harness) -> None:
    failures = {"s3": 1}  # the group that starts with s3 fails once

    def answer(call: Call) -> Attempt:
        if not is_reducer(call):
            return echo(call)
        first = reduced_names(call)[0]
        if failures.get(first):
            failures[first] -= 1
            return Attempt(
                error_type=ErrorType.UPSTREAM_ERROR, error_message="HTTP 503", transient=True
            )
        return Attempt(output=f"from {first}")

    script = Script(answer)
    harness.runner(script)
    names = [f"s{i}" for i in range(6)]
    spec = sectioning(*(section(name) for name in names), aggregate={**REDUCE, "group_size": 3})
    job_id = await harness.create(spec)
    events = await harness.events(job_id)
    job = await harness.store.jobs.get(job_id, None)
    assert job.status == "succeeded" and job.result is not None
    firsts = [reduced_names(call)[0] for call in script.calls if is_reducer(call)]
    # s0's group answered on the first attempt and is not asked again.
    assert sorted(firsts[:2]) == ["s0", "s3"] and firsts[2:] == ["s3", "level-1.0"]
    assert [e["type"] for e in events if e["type"].startswith("aggregate.retrying")] == [
        "aggregate.retrying"
    ]
    assert job.result.output == "from level-1.0"


# --- a judge per item -------------------------------------------------------------------


def item_map(items: list[str], n: int, **fields: Any) -> dict[str, Any]:
    task = {"model": "m", "messages": [{"role": "user", "content": "{{item}}"}]}
    judge = {
        "kind": "judge",
        "task": {"model": "j", "messages": [{"role": "system", "content": "Judge."}]},
    }
    return {
        "mode": "map",
        "items": items,
        "task": task,
        "per_item": {"n": n, "aggregate": judge},
        **fields,
    }


def is_judge(call: Call) -> bool:
    return is_reducer(call) and "<candidate" in call.text


async def test_each_item_is_decided_by_its_own_judge_then_fanned_in(harness: Harness) -> None:
    def answer(call: Call) -> Attempt:
        if is_judge(call):
            return Attempt(output='{"best": 2}', usage=Usage(total_tokens=3, completion_tokens=3))
        return Attempt(output=f"{call.text} #{call.task.seed}", usage=Usage(total_tokens=2))

    script = Script(answer)
    harness.runner(script)
    spec = item_map(["a", "b"], 3)
    spec["task"]["seed"] = 0
    job_id = await harness.create(spec)
    events = await harness.events(job_id)
    job = await harness.store.jobs.get(job_id, None)
    assert job.status == "succeeded" and job.result is not None
    assert job.result.output == ["a #1", "b #1"]  # each item's second lane
    assert [(v["name"], v["best"], v["lane"]) for v in job.result.details["votes"]] == [
        ("item-0", 2, "item-0/1"),
        ("item-1", 2, "item-1/1"),
    ]
    judges = [call for call in script.calls if is_judge(call)]
    assert len(judges) == 2 and all(call.text.count("<candidate") == 3 for call in judges)
    items = sorted(e["data"]["item"] for e in events if "item" in e["data"])
    assert items == [0, 1]
    assert job.usage.total_tokens == 6 * 2 + 2 * 3


async def test_a_failed_item_judge_is_retried_and_the_judged_items_are_kept(
    harness: Harness,
) -> None:
    fails = {"b": 1}

    def answer(call: Call) -> Attempt:
        if not is_judge(call):
            return echo(call)
        item = "b" if "Echo: b" in call.text else "a"
        if fails.get(item):
            fails[item] -= 1
            return Attempt(
                error_type=ErrorType.UPSTREAM_ERROR, error_message="HTTP 503", transient=True
            )
        return Attempt(output="1")

    script = Script(answer)
    harness.runner(script)
    job_id = await harness.create(item_map(["a", "b"], 2, policy={"max_concurrency": 1}))
    await harness.events(job_id)
    job = await harness.store.jobs.get(job_id, None)
    assert job.status == "succeeded" and job.result is not None
    assert job.result.output == ["Echo: a", "Echo: b"]
    judged = ["b" if "Echo: b" in call.text else "a" for call in script.calls if is_judge(call)]
    assert judged == ["a", "b", "b"]  # a's verdict was kept across the retry
