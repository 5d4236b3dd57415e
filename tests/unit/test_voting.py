"""Smarter voting: stopping rules, the leader's confidence, weighted votes, red flags,
mixed ensembles and the judge."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from service.aggregate import (
    LaneResult,
    candidates,
    judge_choice,
    judge_messages,
    judged,
    lane_answer,
    majority,
)
from service.policy import Tally, decide, leader_confidence, running_may_stop
from service.spec import (
    JudgeAggregate,
    LlmTask,
    SectioningSpec,
    VotingSpec,
    lane_providers,
    lane_task,
    stored,
)

TASK = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def voting(n: int, aggregate: dict[str, Any], **extra: Any) -> VotingSpec:
    return VotingSpec.model_validate(
        {"mode": "voting", "n": n, "task": TASK, "aggregate": aggregate, **extra}
    )


def rule(stop: dict[str, Any], n: int = 10, **policy: Any) -> VotingSpec:
    return voting(n, {"kind": "majority", "stop": stop}, policy=policy)


def tally(
    votes: dict[str, float], open_lanes: int, sequence: list[str] | None = None, **statuses: int
) -> Tally:
    """Votes by answer (first seen in the order given); every counted lane succeeded."""
    counted = int(sum(votes.values()))
    by_status = {"succeeded": counted, "running": open_lanes, **statuses}
    listed = [(key, weight, first) for first, (key, weight) in enumerate(votes.items())]
    return Tally(
        sum(by_status.values()), by_status, listed, sequence=sequence or [], counted=counted
    )


def stops(spec: VotingSpec, state: Tally) -> bool:
    decision = decide(spec, state)
    assert decision.vote is not None
    assert decision.vote.stopped == bool(decision.stops)
    return decision.vote.stopped


# --- the leader's confidence -----------------------------------------------------------


def binomial_tail(leader: int, runner_up: int) -> float:
    """P(Beta(leader + 1, runner_up + 1) > 1/2) for whole votes: the chance that fewer
    than leader + 1 of leader + runner_up + 1 fair coin flips come up heads."""
    n = leader + runner_up + 1
    return sum(math.comb(n, j) for j in range(leader + 1)) / 2**n


@pytest.mark.parametrize(
    ("leader", "runner_up"), [(0, 0), (1, 0), (3, 0), (3, 1), (7, 4), (30, 12)]
)
def test_the_leaders_confidence_is_the_beta_posterior_tail(leader: int, runner_up: int) -> None:
    assert leader_confidence(leader, runner_up) == pytest.approx(binomial_tail(leader, runner_up))


@given(
    st.floats(min_value=0, max_value=60, allow_nan=False),
    st.floats(min_value=0, max_value=60, allow_nan=False),
)
def test_the_leaders_confidence_is_a_probability_that_swaps_with_the_runner_up(
    leader: float, runner_up: float
) -> None:
    confidence = leader_confidence(leader, runner_up)
    assert 0.0 <= confidence <= 1.0
    assert confidence + leader_confidence(runner_up, leader) == pytest.approx(1.0, abs=1e-9)


def test_the_leaders_confidence_grows_with_each_vote_for_it() -> None:
    confidences = [leader_confidence(votes, 2) for votes in range(2, 12)]
    assert confidences == sorted(confidences)
    assert confidences[0] == pytest.approx(0.5)


# --- stopping rules ------------------------------------------------------------------


def test_ahead_by_stops_once_the_leader_leads_by_k() -> None:
    spec = rule({"rule": "ahead_by", "k": 2})

    assert stops(spec, tally({"a": 2}, open_lanes=8))
    assert not stops(spec, tally({"a": 2, "b": 1}, open_lanes=7))
    assert stops(spec, tally({"a": 3, "b": 1}, open_lanes=6))


def test_window_stops_when_the_last_votes_recorded_agree() -> None:
    spec = rule({"rule": "window", "size": 3})

    assert stops(spec, tally({"a": 3, "b": 1}, 6, sequence=["b", "a", "a", "a"]))
    assert not stops(spec, tally({"a": 3, "b": 1}, 6, sequence=["a", "a", "b", "a"]))
    assert not stops(spec, tally({"a": 2}, 8, sequence=["a", "a"]))


def test_confidence_stops_once_the_posterior_reaches_the_threshold() -> None:
    spec = rule({"rule": "confidence", "confidence": 0.9})

    # 3-0: 1 - 1/16 = 0.9375; 3-1: 0.8125; 5-1: 0.9375.
    assert stops(spec, tally({"a": 3}, 7))
    assert not stops(spec, tally({"a": 3, "b": 1}, 6))
    assert stops(spec, tally({"a": 5, "b": 1}, 4))


def test_no_rule_stops_before_min_votes() -> None:
    spec = rule({"rule": "window", "size": 2, "min_votes": 4})

    assert not stops(spec, tally({"a": 3}, 7, sequence=["a", "a", "a"]))
    assert stops(spec, tally({"a": 4}, 6, sequence=["a", "a", "a", "a"]))


def test_rule_none_runs_every_lane() -> None:
    spec = rule({"rule": "none"})

    assert not stops(spec, tally({"a": 9}, 1))


def test_early_stop_false_is_the_none_rule_and_true_is_decided() -> None:
    assert voting(3, {"kind": "majority", "early_stop": False}).aggregate.stop_rule.rule == "none"  # type: ignore[union-attr]
    assert voting(3, {"kind": "majority"}).aggregate.stop_rule.rule == "decided"  # type: ignore[union-attr]


def test_a_quorum_job_is_not_stopped_by_a_rule_below_its_quorum() -> None:
    spec = rule({"rule": "ahead_by", "k": 1}, on_failure="quorum", quorum=4)

    assert not stops(spec, tally({"a": 2}, 8))
    assert stops(spec, tally({"a": 4}, 6))


def test_weighted_votes_are_ranked_by_weight() -> None:
    spec = rule({"rule": "ahead_by", "k": 1})
    decision = decide(spec, tally({"a": 0.6, "b": 1.9}, 5))

    assert decision.vote is not None
    assert decision.vote.leader == "b"
    assert decision.vote.stopped


def test_the_vote_state_names_the_leader_and_its_confidence_without_stopping() -> None:
    decision = decide(rule({"rule": "confidence", "confidence": 0.99}), tally({"b": 1, "a": 3}, 6))

    assert decision.stops == ()
    assert decision.vote is not None
    assert decision.vote.leader == "a"
    assert decision.vote.counted == 4
    assert decision.vote.confidence == pytest.approx(binomial_tail(3, 1))


@pytest.mark.parametrize(
    ("stop", "message"),
    [
        ({"rule": "ahead_by"}, "the 'ahead_by' rule needs 'k'"),
        ({"rule": "window"}, "the 'window' rule needs 'size'"),
        ({"rule": "confidence"}, "the 'confidence' rule needs 'confidence'"),
        ({"rule": "decided", "k": 2}, "'k' is a parameter of the 'ahead_by' rule only"),
        ({"rule": "confidence", "confidence": 1.0}, "less than 1"),
        ({"rule": "confidence", "confidence": 0.5}, "greater than 0.5"),
        ({"rule": "window", "size": 1}, "greater than or equal to 2"),
        ({"rule": "ahead_by", "k": 0}, "greater than or equal to 1"),
        ({"rule": "ahead_by", "k": 1, "min_votes": 0}, "greater than or equal to 1"),
        ({"rule": "sometimes"}, "'decided', 'ahead_by', 'window', 'confidence' or 'none'"),
    ],
)
def test_a_rule_without_its_parameter_or_out_of_range_is_refused(
    stop: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        rule(stop)


def test_early_stop_and_stop_together_are_refused() -> None:
    with pytest.raises(ValidationError, match="give early_stop or stop, not both"):
        voting(3, {"kind": "majority", "early_stop": True, "stop": {"rule": "none"}})


# --- weights and red flags ---------------------------------------------------------------


def test_a_weighted_vote_weighs_the_lanes_confidence() -> None:
    spec = voting(3, {"kind": "majority", "weight": "confidence"})

    read = lane_answer(spec, 0, "A", {"logprobs": {"mean": -0.5, "tokens": 1}})

    assert read.answer == "a"  # text votes are normalised
    assert read.weight == pytest.approx(math.exp(-0.5))
    assert read.note is None


def test_a_weighted_vote_without_logprobs_weighs_one_and_says_why() -> None:
    spec = voting(3, {"kind": "majority", "weight": "confidence"})

    read = lane_answer(spec, 0, "A", {"finish_reason": "stop"})

    assert (read.answer, read.weight) == ("a", 1.0)
    assert read.note == "weight 1: the provider sent no logprobs"


@pytest.mark.parametrize("mean", [None, float("-inf"), float("nan"), "x", True])
def test_logprobs_that_are_not_a_finite_number_weigh_one(mean: Any) -> None:
    spec = voting(3, {"kind": "majority", "weight": "confidence"})

    read = lane_answer(spec, 0, "A", {"logprobs": {"mean": mean, "tokens": 1}})

    assert (read.weight, read.note) == (1.0, "weight 1: the provider sent no logprobs")


def test_an_unweighted_vote_has_no_weight() -> None:
    assert lane_answer(voting(3, {"kind": "majority"}), 0, "A").weight is None


def test_red_flagged_answers_abstain_with_a_note() -> None:
    spec = voting(3, {"kind": "majority", "reject_if": "(?i)as an ai", "max_answer_chars": 10})

    too_long = lane_answer(spec, 0, "A" * 11)
    flagged = lane_answer(spec, 1, "As an AI")
    fine = lane_answer(spec, 2, "B")

    assert (too_long.answer, too_long.note) == (
        None,
        "abstained: the answer is 11 characters, over 10",
    )
    assert (flagged.answer, flagged.note) == (None, "abstained: the answer matches reject_if")
    assert (fine.answer, fine.note) == ("b", None)


def test_red_flags_read_a_tool_calls_arguments() -> None:
    spec = voting(
        3,
        {"kind": "majority", "extract": "json", "field": "answer", "reject_if": "unsure"},
    )
    call = {"function": {"name": "answer", "arguments": '{"answer": 4, "note": "unsure"}'}}

    read = lane_answer(spec, 0, None, {"tool_calls": [call]})

    assert (read.answer, read.note) == (None, "abstained: the answer matches reject_if")


def test_reject_if_must_compile() -> None:
    with pytest.raises(ValidationError, match="reject_if"):
        voting(3, {"kind": "majority", "reject_if": "(unclosed"})


def test_a_weighted_majority_goes_to_the_heavier_answer_not_the_more_numerous() -> None:
    lanes = [
        LaneResult(0, "lane-0", "succeeded", "a", "a", 0.3),
        LaneResult(1, "lane-1", "succeeded", "a", "a", 0.3),
        LaneResult(2, "lane-2", "succeeded", "b", "b", 0.9),
    ]

    weighted, details = majority(lanes, weighted=True)
    counted, _ = majority(lanes)

    assert (weighted, counted) == ("b", "a")
    assert details["votes"] == [
        {"answer": "b", "count": 1, "weight": 0.9},
        {"answer": "a", "count": 2, "weight": 0.6},
    ]
    assert details["winner_weight"] == pytest.approx(0.9)
    assert details["weighted_agreement"] == pytest.approx(0.6)


# --- mixed ensembles -----------------------------------------------------------------------


def ensemble() -> VotingSpec:
    tasks = [
        {**TASK, "model": "small", "provider": "one"},
        {**TASK, "model": "large", "temperature": 0.2, "seed": 7},
        {"kind": "http", "url": "http://127.0.0.1:9/vote"},
    ]
    return VotingSpec.model_validate({"mode": "voting", "n": 5, "tasks": tasks})


def test_ensemble_lanes_take_turns_with_the_tasks() -> None:
    spec = ensemble()
    names = [lane_task(spec, i)[1] for i in range(5)]

    assert [getattr(task, "model", "http") for task in names] == [
        "small",
        "large",
        "http",
        "small",
        "large",
    ]
    assert [getattr(names[i], "seed", None) for i in (1, 4)] == [8, 11]
    assert lane_providers(spec) == ["one", "default", "http", "one", "default"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"task": TASK, "tasks": [TASK]}, "give task or tasks"),
        ({}, "give task or tasks"),
        ({"tasks": []}, "at least 1 item"),
    ],
)
def test_a_vote_takes_task_or_tasks_exactly_once(body: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        VotingSpec.model_validate({"mode": "voting", "n": 3, **body})


def test_weighted_lanes_ask_for_logprobs() -> None:
    spec = voting(2, {"kind": "majority", "weight": "confidence"})
    task = lane_task(spec, 1)[1]

    assert isinstance(task, LlmTask)
    assert task.logprobs is True
    assert voting(2, {"kind": "majority"}).task.logprobs is not True  # type: ignore[union-attr]


@pytest.mark.parametrize("field", ["stop", "weight", "reject_if", "max_answer_chars"])
def test_vote_options_belong_to_majority_only(field: str) -> None:
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        voting(3, {"kind": "score", field: "x"})


# --- the judge -------------------------------------------------------------------------------


def lanes_for_judge() -> list[LaneResult]:
    return [
        LaneResult(0, "lane-0", "succeeded", "first draft"),
        LaneResult(1, "lane-1", "failed", None),
        LaneResult(2, "lane-2", "succeeded", "second draft"),
    ]


JUDGED = voting(3, {"kind": "judge", "task": TASK})


def test_the_judge_sees_the_succeeded_candidates_numbered_in_lane_order() -> None:
    task = LlmTask.model_validate({**TASK, "messages": [{"role": "system", "content": "Judge."}]})

    messages = judge_messages(task, candidates(JUDGED, lanes_for_judge()))

    assert messages[0].content == "Judge."
    prompt = messages[-1].content
    assert isinstance(prompt, str)
    assert '<candidate number="1">\nfirst draft\n</candidate>' in prompt
    assert '<candidate number="2">\nsecond draft\n</candidate>' in prompt
    assert '{"best": N}' in prompt


@pytest.mark.parametrize(
    ("text", "choice"),
    [
        ('{"best": 2}', 2),
        ('{"best": "1"}', 1),
        ("Candidate 1 is vague; the best is 2", 2),
        ('{"best": 3}', None),  # only two candidates
        ("none of them", None),
        ("0", None),
        ("1" * 5000, None),  # no candidate, and no error either
        (None, None),
    ],
)
def test_the_judges_choice_is_read_from_json_or_its_last_number(
    text: Any, choice: int | None
) -> None:
    assert judge_choice(text, 2) == choice


def test_a_judged_result_is_the_chosen_lanes_output() -> None:
    result = judged(2, candidates(JUDGED, lanes_for_judge()), '{"best": 2}', partial=True)

    assert result["output"] == "second draft"
    assert result["partial"] is True
    assert result["details"] == {
        "judge": '{"best": 2}',
        "best": 2,
        "lane": "lane-2",
        "candidates": 2,
    }


def test_a_judge_over_sections_does_not_choose_a_gate() -> None:
    spec = SectioningSpec.model_validate(
        {
            "mode": "sectioning",
            "sections": [
                {"name": "draft", "task": TASK},
                {"name": "safety", "task": TASK, "gate": {"block_if": "unsafe"}},
                {"name": "other", "task": TASK},
            ],
            "aggregate": {"kind": "judge", "task": TASK},
        }
    )
    lanes = [
        LaneResult(i, name, "succeeded", name)
        for i, name in enumerate(["draft", "safety", "other"])
    ]

    assert [lane.name for lane in candidates(spec, lanes)] == ["draft", "other"]


def test_a_judge_needs_its_task() -> None:
    with pytest.raises(ValidationError, match="task"):
        JudgeAggregate.model_validate({"kind": "judge"})


# --- stored and read back -------------------------------------------------------------------


@pytest.mark.parametrize(
    "aggregate",
    [
        {"kind": "majority", "stop": {"rule": "window", "size": 3, "min_votes": 4}},
        {"kind": "majority", "early_stop": False, "weight": "confidence"},
        {"kind": "majority", "reject_if": "(?i)sorry", "max_answer_chars": 80},
        {"kind": "judge", "task": TASK},
    ],
)
def test_a_stored_vote_parses_back_into_the_same_spec(aggregate: dict[str, Any]) -> None:
    """Any other process (a worker, a replica, a restart) reads the spec as stored."""
    spec = voting(5, aggregate)

    assert VotingSpec.model_validate(stored(spec)) == spec
    ensemble = VotingSpec.model_validate({"mode": "voting", "n": 4, "tasks": [TASK, TASK]})
    assert VotingSpec.model_validate(stored(ensemble)) == ensemble


# --- lanes a vote does not start yet -----------------------------------------------------


def running(votes: dict[str, float], running_lanes: int, queued: int) -> Tally:
    return tally(votes, running_lanes, queued=queued)


@pytest.mark.parametrize(
    ("stop", "state", "waits"),
    [
        # decided: the leader with every running lane beats the rest and the queued ones
        ({"rule": "decided"}, running({"a": 5}, 3, 2), True),
        ({"rule": "decided"}, running({"a": 3, "b": 2}, 3, 2), True),
        ({"rule": "decided"}, running({"a": 2, "b": 2}, 2, 4), False),
        # confidence: 5 against 0 is 0.984 sure; 2 against 1, 0.69
        ({"rule": "confidence", "confidence": 0.95}, running({"a": 3}, 2, 5), True),
        ({"rule": "confidence", "confidence": 0.95}, running({"a": 1, "b": 1}, 1, 5), False),
        ({"rule": "ahead_by", "k": 3}, running({"a": 1}, 2, 4), True),
        ({"rule": "ahead_by", "k": 3}, running({"a": 1, "b": 1}, 2, 4), False),
        # nothing running, nothing queued, or a rule no count can meet: start as ever
        ({"rule": "decided"}, running({"a": 5}, 0, 2), False),
        ({"rule": "decided"}, running({"a": 5}, 3, 0), False),
        ({"rule": "window", "size": 2}, running({"a": 5}, 3, 2), False),
        ({"rule": "none"}, running({"a": 5}, 3, 2), False),
    ],
)
def test_a_vote_waits_for_running_lanes_that_could_stop_it_by_themselves(
    stop: dict[str, Any], state: Tally, waits: bool
) -> None:
    assert running_may_stop(rule(stop).aggregate.stop_rule, state) is waits  # type: ignore[union-attr]
    if waits:  # and they do, if they all vote for the leader
        leader = max(state.votes, key=lambda vote: vote[1])[0]
        votes = {key: weight for key, weight, _first in state.votes}
        votes[leader] += state.count("running")
        assert stops(rule(stop), tally(votes, state.count("queued")))
