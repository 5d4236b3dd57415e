"""Votes that stop when they can, weigh confidence, and a judge that picks the best."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from service.attempts import Attempt
from service.states import ErrorType
from service.views import Usage
from tests.runner.conftest import Call, Harness, Script
from tests.support import voting

NUMBER = {"kind": "majority", "extract": "number"}
ONE_AT_A_TIME = {"max_concurrency": 1}
JUDGE = {"kind": "judge", "task": {"model": "m", "messages": [{"role": "system", "content": "J"}]}}


def answers(*numbers: int) -> Script:
    """Lanes that answer ``numbers`` in the order they are called."""
    said: Iterator[int] = iter(numbers)
    return Script(
        lambda _call: Attempt(output=f"Answer: {next(said)}", usage=Usage(total_tokens=1))
    )


async def test_the_confidence_rule_stops_a_vote_once_the_leader_is_likely_enough(
    harness: Harness,
) -> None:
    script = answers(*[7] * 10)
    harness.runner(script)
    stop = {"rule": "confidence", "confidence": 0.95}
    spec = voting(10, aggregate={**NUMBER, "stop": stop}, policy=ONE_AT_A_TIME)

    job = await harness.run(spec)

    # 4 votes to none: P(Beta(5, 1) > 1/2) = 1 - 1/32 = 0.969 >= 0.95 (3 gave 0.9375).
    assert job.result is not None and job.result.output == 7
    assert len(script.calls) == 4
    assert [lane.status for lane in job.lanes] == ["succeeded"] * 4 + ["skipped"] * 6
    assert job.result.details["stop"] == {
        "rule": "confidence",
        "stopped": True,
        "votes": 4,
        "of": 10,
        "leader": 7,
        "confidence": 0.9688,
    }


async def test_the_window_rule_reads_votes_in_the_order_they_were_recorded(
    harness: Harness,
) -> None:
    script = answers(7, 8, 7, 8, 8, 8, 7, 7)
    harness.runner(script)
    spec = voting(
        8, aggregate={**NUMBER, "stop": {"rule": "window", "size": 3}}, policy=ONE_AT_A_TIME
    )

    job = await harness.run(spec)

    assert job.result is not None and job.result.output == 8
    assert len(script.calls) == 6
    assert job.result.details["votes"] == [
        {"answer": 8, "count": 4},
        {"answer": 7, "count": 2},
    ]


async def test_every_counted_vote_is_announced_with_where_the_vote_stands(
    harness: Harness,
) -> None:
    harness.runner(answers(7, 8, 7, 7))
    job_id = await harness.create(
        voting(4, aggregate={**NUMBER, "early_stop": False}, policy=ONE_AT_A_TIME)
    )

    events = await harness.events(job_id)

    votes = [event["data"]["vote"] for event in events if event["type"] == "lane.succeeded"]
    assert [(v["votes"], v["leader"], v["stopped"]) for v in votes] == [
        (1, 7, False),
        (2, 7, False),
        (3, 7, False),
        (4, 7, False),
    ]
    assert {v["rule"] for v in votes} == {"none"} and {v["of"] for v in votes} == {4}
    assert [v["confidence"] for v in votes] == [0.75, 0.5, 0.6875, 0.8125]


async def test_weighted_votes_let_a_confident_answer_outweigh_a_hesitant_crowd(
    harness: Harness,
) -> None:
    def answer(call: Call) -> Attempt:
        assert call.task.logprobs is True  # type: ignore[union-attr]
        lane = len(script.calls) - 1
        mean = -0.01 if lane == 0 else -2.0  # e^-0.01 = 0.99; e^-2 = 0.135 each
        return Attempt(
            output=f"Answer: {8 if lane == 0 else 7}",
            reply={"logprobs": {"mean": mean, "tokens": 5}},
        )

    script = Script(answer)
    harness.runner(script)
    spec = voting(
        4,
        aggregate={**NUMBER, "weight": "confidence", "early_stop": False},
        policy=ONE_AT_A_TIME,
    )

    job = await harness.run(spec)

    assert job.result is not None and job.result.output == 8
    assert job.result.details["winner_weight"] == 0.99005
    assert [lane.weight for lane in job.lanes] == pytest.approx(
        [0.99005, 0.135335, 0.135335, 0.135335], abs=1e-6
    )


async def test_a_judge_picks_a_candidate_and_the_job_returns_that_lanes_output(
    harness: Harness,
) -> None:
    def answer(call: Call) -> Attempt:
        if call.messages is not None:  # the judge
            return Attempt(output='{"best": 2}', usage=Usage(total_tokens=30))
        return Attempt(output=f"draft {len(script.calls)}", usage=Usage(total_tokens=1))

    script = Script(answer)
    harness.runner(script)

    job = await harness.run(voting(3, aggregate=JUDGE, policy=ONE_AT_A_TIME))

    assert job.status == "succeeded" and job.result is not None
    assert job.result.output == "draft 2"
    assert job.result.details == {
        "judge": '{"best": 2}',
        "best": 2,
        "lane": "lane-1",
        "candidates": 3,
    }
    judge = script.calls[-1]
    assert judge.messages is not None and judge.messages[0].content == "J"
    assert job.usage.total_tokens == 3 + 30


async def test_a_judge_that_names_no_candidate_fails_the_job_with_what_it_said(
    harness: Harness,
) -> None:
    def answer(call: Call) -> Attempt:
        return Attempt(output="they are all fine" if call.messages else "draft")

    harness.runner(Script(answer))

    job = await harness.run(voting(2, aggregate=JUDGE))

    assert job.status == "failed" and job.error is not None
    assert job.error.type == ErrorType.NO_ANSWER
    assert job.error.message == "the judge named no candidate of 2: 'they are all fine'"
    assert [lane.status for lane in job.lanes] == ["succeeded", "succeeded"]


# --- a vote per item of a map -------------------------------------------------------------


async def test_a_maps_item_votes_are_taken_vote_by_vote_so_each_item_stops_early(
    harness: Harness,
) -> None:
    """Claims take every item's first vote, then every item's second: an item's votes
    come back one after another, and two that agree settle it before its third runs."""
    script = Script(lambda call: Attempt(output="Answer: 7", usage=Usage(total_tokens=1)))
    harness.runner(script)
    task = {"model": "m", "seed": 0, "messages": [{"role": "user", "content": "{{item}}"}]}
    spec = {
        "mode": "map",
        "items": ["a", "b", "c"],
        "task": task,
        "per_item": {"n": 4, "aggregate": {**NUMBER, "stop": {"rule": "ahead_by", "k": 2}}},
        "policy": {"max_concurrency": 3},
    }
    job = await harness.run(spec)
    assert job.result is not None and job.result.output == [7, 7, 7]
    order = [(call.text, call.task.seed) for call in script.calls]  # type: ignore[union-attr]
    assert set(order[:3]) == {("a", 0), ("b", 0), ("c", 0)}  # first votes first
    # Two votes an item, of four. (In lane order, item a's first three would have been
    # in flight at once, and run whether the first two agreed or not.)
    assert len(script.calls) == 6
    assert sorted(lane.status for lane in job.lanes) == ["skipped"] * 6 + ["succeeded"] * 6
