"""What a job does next: failure policies, gates, deadline, budget and early stop."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.aggregate import LaneResult, answer_key, majority
from service.policy import Decision, Tally, decide, undecided_while_open
from service.spec import MapSpec, SectioningSpec, VotingSpec, lane_count
from service.states import OPEN_LANE as OPEN
from tests.support import mapping

TASK = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def voting(
    n: int,
    *,
    on_failure: str | None = None,
    quorum: int | None = None,
    aggregate: dict[str, Any] | None = None,
) -> VotingSpec:
    policy: dict[str, Any] = {}
    if on_failure is not None:
        policy["on_failure"] = on_failure
    if quorum is not None:
        policy["quorum"] = quorum
    return VotingSpec.model_validate(
        {
            "mode": "voting",
            "n": n,
            "task": TASK,
            "aggregate": aggregate or {"kind": "majority", "extract": "text"},
            "policy": policy,
        }
    )


def sectioning(
    *names: str, on_failure: str | None = None, gate: str | None = None
) -> SectioningSpec:
    sections: list[dict[str, Any]] = [{"name": name, "task": TASK} for name in names]
    for section in sections:
        if section["name"] == gate:
            section["gate"] = {"block_if": "(?i)unsafe"}
    policy = {"on_failure": on_failure} if on_failure is not None else {}
    return SectioningSpec.model_validate(
        {"mode": "sectioning", "sections": sections, "policy": policy}
    )


def tally(
    *,
    votes: list[tuple[str, float, int]] | None = None,
    gate_blocked: str | None = None,
    first_failure: tuple[str, str, str] | None = None,
    **by_status: int,
) -> Tally:
    return Tally(
        total=sum(by_status.values()),
        by_status=by_status,
        votes=votes or [],
        gate_blocked=gate_blocked,
        first_failure=first_failure,
        counted=int(sum(weight for _, weight, _ in votes or [])),
    )


def stopped(decision: Decision) -> list[tuple[tuple[str, ...], str, str | None]]:
    """The stops without their messages: which lanes, to what status, with what error type."""
    return [(stop.statuses, stop.status, stop.error_type) for stop in decision.stops]


CANCEL_OPEN = (OPEN, "cancelled", "cancelled")
TIME_OUT_OPEN = (OPEN, "timed_out", "timeout")
SKIP_OPEN = (OPEN, "skipped", None)
CANCEL_QUEUED_FOR_BUDGET = (("queued",), "cancelled", "budget")
WITHOUT_RESULT = ["failed", "timed_out", "cancelled"]


# --- while lanes run -----------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        sectioning("a", "b", "c"),
        voting(3),
        voting(3, on_failure="quorum"),
    ],
)
def test_job_keeps_going_while_lanes_are_open_and_nothing_went_wrong(spec: Any) -> None:
    assert decide(spec, tally(succeeded=1, running=1, queued=1)) == Decision()


@pytest.mark.parametrize("spec", [sectioning("a", "b"), voting(2), voting(2, on_failure="quorum")])
def test_job_aggregates_a_whole_result_when_every_lane_succeeded(spec: Any) -> None:
    assert decide(spec, tally(succeeded=2)) == Decision((), "aggregate", partial=False)


# --- fail fast -----------------------------------------------------------------------


@pytest.mark.parametrize("status", WITHOUT_RESULT)
def test_fail_fast_fails_the_job_on_the_first_lane_without_result(status: str) -> None:
    spec = sectioning("draft", "safety", "stock")
    failure = ("stock", "upstream_error", "502 Bad Gateway")

    decision = decide(spec, tally(succeeded=1, running=1, first_failure=failure, **{status: 1}))

    assert decision.outcome == "fail"
    assert decision.error is not None
    assert decision.error["type"] == "lane_failed"
    assert "'stock'" in decision.error["message"]
    assert "upstream_error" in decision.error["message"]


def test_fail_fast_cancels_the_open_lanes() -> None:
    spec = sectioning("a", "b", "c")

    decision = decide(spec, tally(failed=1, running=1, queued=1))

    assert stopped(decision) == [CANCEL_OPEN]


def test_fail_fast_fails_even_when_the_failing_lane_was_the_last() -> None:
    decision = decide(sectioning("a", "b"), tally(succeeded=1, failed=1))

    assert decision.outcome == "fail"
    assert decision.stops == ()


def test_sectioning_defaults_to_fail_fast() -> None:
    assert decide(sectioning("a", "b"), tally(succeeded=1, failed=1)).outcome == "fail"


def test_skipped_lanes_are_not_failures_under_fail_fast() -> None:
    spec = voting(3, on_failure="fail_fast")

    assert decide(spec, tally(succeeded=2, skipped=1)).outcome == "aggregate"


# --- best effort ---------------------------------------------------------------------


@pytest.mark.parametrize("status", WITHOUT_RESULT)
def test_best_effort_aggregates_what_succeeded_as_a_partial_result(status: str) -> None:
    decision = decide(voting(3), tally(succeeded=2, **{status: 1}))

    assert decision == Decision((), "aggregate", partial=True)


def test_best_effort_keeps_going_after_a_failure() -> None:
    assert decide(voting(3), tally(failed=1, running=2)) == Decision()


def test_best_effort_fails_only_when_nothing_succeeded() -> None:
    decision = decide(voting(3), tally(failed=2, timed_out=1))

    assert decision.outcome == "fail"
    assert decision.error is not None
    assert decision.error["type"] == "no_results"


def test_best_effort_sectioning_gives_a_partial_result() -> None:
    spec = sectioning("a", "b", on_failure="best_effort")

    assert decide(spec, tally(succeeded=1, failed=1)) == Decision((), "aggregate", partial=True)


# --- quorum --------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "need"), [(1, 1), (2, 2), (3, 2), (4, 3), (5, 3), (6, 4), (7, 4)])
def test_quorum_defaults_to_a_strict_majority_of_the_lanes(n: int, need: int) -> None:
    spec = voting(n, on_failure="quorum")

    at_quorum = decide(spec, tally(succeeded=need, failed=n - need))
    below = decide(spec, tally(succeeded=need - 1, failed=n - need + 1))

    assert at_quorum.outcome == "aggregate"
    assert below.outcome == "fail"


def test_quorum_can_be_given() -> None:
    spec = voting(5, on_failure="quorum", quorum=2)

    assert decide(spec, tally(succeeded=2, failed=3)) == Decision((), "aggregate", partial=True)


def test_quorum_fails_as_soon_as_it_is_out_of_reach() -> None:
    spec = voting(5, on_failure="quorum")

    decision = decide(spec, tally(succeeded=1, failed=3, running=1))

    assert decision.outcome == "fail"
    assert decision.error is not None
    assert decision.error["type"] == "quorum"
    assert stopped(decision) == [CANCEL_OPEN]


def test_quorum_keeps_going_while_it_is_within_reach() -> None:
    spec = voting(5, on_failure="quorum")

    assert decide(spec, tally(succeeded=1, failed=2, running=1, queued=1)) == Decision()


# --- gates ---------------------------------------------------------------------------


@pytest.mark.parametrize("on_failure", ["fail_fast", "best_effort", "quorum"])
def test_gate_that_blocks_cancels_the_open_lanes_and_ends_the_job(on_failure: str) -> None:
    spec = sectioning("draft", "safety", "stock", on_failure=on_failure, gate="safety")

    decision = decide(spec, tally(succeeded=1, running=2, gate_blocked="safety"))

    assert decision.outcome == "aggregate"
    assert stopped(decision) == [CANCEL_OPEN]


@pytest.mark.parametrize("status", ["failed", "timed_out"])
@pytest.mark.parametrize("on_failure", ["fail_fast", "best_effort", "quorum"])
def test_gate_lane_that_failed_blocks_rather_than_fails_the_job(
    status: str, on_failure: str
) -> None:
    spec = sectioning("draft", "safety", on_failure=on_failure, gate="safety")
    failure = ("safety", "timeout", "no answer in 30 s")

    decision = decide(
        spec, tally(succeeded=1, gate_blocked="safety", first_failure=failure, **{status: 1})
    )

    assert decision == Decision((), "aggregate", partial=True)


def test_gate_blocks_at_the_deadline_too() -> None:
    spec = sectioning("draft", "safety", gate="safety")

    decision = decide(
        spec, tally(succeeded=1, running=1, gate_blocked="safety"), deadline_passed=True
    )

    assert decision.outcome == "aggregate"
    assert stopped(decision) == [CANCEL_OPEN]


# --- deadline ------------------------------------------------------------------------


def test_deadline_times_out_the_open_lanes() -> None:
    decision = decide(voting(4), tally(succeeded=2, running=1, queued=1), deadline_passed=True)

    assert stopped(decision) == [TIME_OUT_OPEN]


def test_deadline_under_best_effort_gives_a_partial_result() -> None:
    decision = decide(voting(4), tally(succeeded=2, running=2), deadline_passed=True)

    assert decision.outcome == "aggregate"
    assert decision.partial is True


def test_deadline_under_best_effort_with_nothing_succeeded_fails() -> None:
    decision = decide(voting(2), tally(running=2), deadline_passed=True)

    assert decision.outcome == "fail"
    assert decision.error is not None
    assert decision.error["type"] == "no_results"


def test_deadline_under_fail_fast_fails_the_job_and_times_out_the_open_lanes() -> None:
    decision = decide(sectioning("a", "b"), tally(succeeded=1, running=1), deadline_passed=True)

    assert decision.outcome == "fail"
    assert decision.error is not None
    assert decision.error["type"] == "deadline"
    assert stopped(decision) == [TIME_OUT_OPEN]


@pytest.mark.parametrize(("succeeded", "outcome"), [(3, "aggregate"), (2, "fail")])
def test_deadline_under_quorum_decides_on_what_finished(succeeded: int, outcome: str) -> None:
    spec = voting(5, on_failure="quorum")

    decision = decide(spec, tally(succeeded=succeeded, running=5 - succeeded), deadline_passed=True)

    assert decision.outcome == outcome


def test_deadline_with_every_lane_finished_changes_nothing() -> None:
    decision = decide(voting(2), tally(succeeded=2), deadline_passed=True)

    assert decision == Decision((), "aggregate", partial=False)


# --- budget --------------------------------------------------------------------------


def test_spent_budget_cancels_queued_lanes_and_lets_running_ones_finish() -> None:
    decision = decide(voting(4), tally(succeeded=1, running=1, queued=2), budget_spent=True)

    assert stopped(decision) == [CANCEL_QUEUED_FOR_BUDGET]
    assert decision.outcome is None


def test_spent_budget_with_nothing_queued_stops_nothing() -> None:
    assert decide(voting(2), tally(succeeded=1, running=1), budget_spent=True) == Decision()


def test_spent_budget_under_best_effort_gives_a_partial_result() -> None:
    decision = decide(voting(3), tally(succeeded=1, queued=2), budget_spent=True)

    assert stopped(decision) == [CANCEL_QUEUED_FOR_BUDGET]
    assert decision.outcome == "aggregate"
    assert decision.partial is True


def test_spent_budget_under_fail_fast_fails_the_job() -> None:
    decision = decide(
        sectioning("a", "b", "c"), tally(succeeded=1, running=1, queued=1), budget_spent=True
    )

    assert decision.outcome == "fail"
    assert stopped(decision) == [CANCEL_QUEUED_FOR_BUDGET, CANCEL_OPEN]


def test_spent_budget_under_quorum_fails_when_the_quorum_is_out_of_reach() -> None:
    spec = voting(5, on_failure="quorum")

    decision = decide(spec, tally(succeeded=1, running=1, queued=3), budget_spent=True)

    assert decision.outcome == "fail"
    assert decision.error is not None
    assert decision.error["type"] == "quorum"


# --- majority early stop -------------------------------------------------------------


def test_early_stop_skips_open_lanes_once_the_leader_cannot_be_caught() -> None:
    # 4 votes against 1, with 2 open lanes: even both for "b" leaves "a" ahead.
    spec = voting(7)
    votes = [("a", 4, 0), ("b", 1, 2)]

    decision = decide(spec, tally(succeeded=5, running=1, queued=1, votes=votes))

    assert stopped(decision) == [SKIP_OPEN]
    assert decision == Decision(decision.stops, "aggregate", partial=False)


@pytest.mark.parametrize(
    ("votes", "open_lanes"),
    [
        ([("a", 3, 0), ("b", 1, 1)], 2),  # a tie is still possible
        ([("a", 3, 0), ("b", 2, 1)], 2),  # b could overtake
        ([("a", 2, 0)], 2),  # a new answer could tie
        ([("a", 2, 0), ("b", 2, 1)], 1),  # already tied
    ],
)
def test_early_stop_waits_while_an_open_lane_could_change_or_tie_the_winner(
    votes: list[tuple[str, int, int]], open_lanes: int
) -> None:
    succeeded = sum(count for _, count, _ in votes)
    spec = voting(succeeded + open_lanes)

    assert decide(spec, tally(succeeded=succeeded, running=open_lanes, votes=votes)) == Decision()


def test_early_stop_counts_queued_and_running_lanes_as_open() -> None:
    spec = voting(8)

    decision = decide(spec, tally(succeeded=4, running=2, queued=2, votes=[("a", 4, 0)]))

    assert decision == Decision()


def test_early_stop_ranks_by_votes_whatever_order_the_tally_lists_them() -> None:
    spec = voting(7)
    votes = [("b", 1, 0), ("c", 1, 1), ("a", 4, 2)]

    decision = decide(spec, tally(succeeded=6, running=1, votes=votes))

    assert stopped(decision) == [SKIP_OPEN]


def test_early_stop_ignores_abstentions_and_failures() -> None:
    # 3 votes for "a", 2 abstained, 2 failed, 2 open: "a" is safe.
    spec = voting(9)

    decision = decide(spec, tally(succeeded=5, failed=2, running=2, votes=[("a", 3, 1)]))

    assert stopped(decision) == [SKIP_OPEN]
    assert decision.partial is True


def test_early_stop_is_off_when_the_spec_says_so() -> None:
    spec = voting(7, aggregate={"kind": "majority", "early_stop": False})

    assert decide(spec, tally(succeeded=5, running=2, votes=[("a", 5, 0)])) == Decision()


def test_early_stop_is_only_for_majority() -> None:
    spec = voting(7, aggregate={"kind": "score"})

    assert decide(spec, tally(succeeded=5, running=2, votes=[("9", 5, 0)])) == Decision()


def test_early_stop_waits_when_no_lane_voted_yet() -> None:
    assert decide(voting(3), tally(succeeded=1, running=2)) == Decision()


def test_early_stop_never_stops_a_quorum_job_below_its_quorum() -> None:
    spec = voting(7, on_failure="quorum", quorum=5)

    decision = decide(spec, tally(succeeded=4, running=3, votes=[("a", 4, 0)]))

    assert decision == Decision()


def test_early_stop_stops_a_quorum_job_that_reached_its_quorum() -> None:
    spec = voting(7, on_failure="quorum", quorum=5)

    decision = decide(spec, tally(succeeded=5, running=2, votes=[("a", 5, 0)]))

    assert stopped(decision) == [SKIP_OPEN]
    assert decision.outcome == "aggregate"


def test_early_stop_after_the_budget_cancelled_the_queue_weighs_only_running_lanes() -> None:
    spec = voting(8)

    decision = decide(
        spec, tally(succeeded=3, running=2, queued=3, votes=[("a", 3, 0)]), budget_spent=True
    )

    assert stopped(decision) == [CANCEL_QUEUED_FOR_BUDGET, SKIP_OPEN]
    assert decision.partial is True


# --- property: early stop never changes the winner ----------------------------------

FAILS = object()  # a lane that ends without a result


def simulated_tally(answers: list[Any], finished: list[int], rng: random.Random) -> Tally:
    """The tally the store would read once the ``finished`` lanes ended."""
    by_status = {"succeeded": 0, "failed": 0}
    grouped: dict[str, tuple[int, int]] = {}
    for idx in finished:
        answer = answers[idx]
        if answer is FAILS:
            by_status["failed"] += 1
            continue
        by_status["succeeded"] += 1
        key = answer_key(answer)
        if key is not None:
            count, first = grouped.get(key, (0, idx))
            grouped[key] = (count + 1, min(first, idx))
    open_lanes = len(answers) - len(finished)
    by_status["running"] = rng.randint(0, open_lanes)
    by_status["queued"] = open_lanes - by_status["running"]
    votes = [(key, count, first) for key, (count, first) in grouped.items()]
    rng.shuffle(votes)  # the store's GROUP BY promises no order
    counted = sum(count for _, count, _ in votes)
    return Tally(len(answers), by_status, votes, counted=counted)


def winner(answers: list[Any], finished: set[int]) -> Any:
    lanes = [
        LaneResult(idx, f"lane-{idx}", "succeeded", answer, answer)
        if idx in finished and answer is not FAILS
        else LaneResult(idx, f"lane-{idx}", "failed" if idx in finished else "skipped", None)
        for idx, answer in enumerate(answers)
    ]
    return majority(lanes)[0]


def random_job(rng: random.Random) -> tuple[VotingSpec, list[Any], list[int]]:
    """A voting job: its spec, each lane's answer, and the order the lanes finish in."""
    n = rng.randint(1, 9)
    choices = ["a", "b", "c"][: rng.randint(1, 3)]
    answers = [rng.choice([*choices, *choices, None, FAILS]) for _ in range(n)]
    on_failure = rng.choice(["best_effort", "quorum"])
    quorum = rng.randint(1, n) if on_failure == "quorum" and rng.random() < 0.5 else None
    spec = voting(n, on_failure=on_failure, quorum=quorum)
    return spec, answers, rng.sample(range(n), n)


def test_early_stop_never_changes_the_winner() -> None:
    rng = random.Random(20240917)
    early_stops = 0
    for _ in range(3000):
        spec, answers, order = random_job(rng)
        for step in range(1, len(order) + 1):
            finished = order[:step]
            decision = decide(spec, simulated_tally(answers, finished, rng))
            if decision.outcome == "fail":
                break
            if SKIP_OPEN in stopped(decision):
                if step < len(order):
                    early_stops += 1
                assert decision.outcome == "aggregate"
                assert winner(answers, set(finished)) == winner(answers, set(order)), (
                    answers,
                    finished,
                )
                break
    # The property must not hold only because early stop never happened.
    assert early_stops > 500


def test_quorum_failure_decided_early_is_never_wrong() -> None:
    rng = random.Random(7)
    early_failures = 0
    for _ in range(3000):
        spec, answers, order = random_job(rng)
        if spec.policy.on_failure != "quorum":
            continue
        need = spec.policy.quorum or len(answers) // 2 + 1
        for step in range(1, len(order)):
            decision = decide(spec, simulated_tally(answers, order[:step], rng))
            if decision.outcome is not None or decision.stops:
                if decision.outcome == "fail":
                    early_failures += 1
                    assert sum(answer is not FAILS for answer in answers) < need
                break
    assert early_failures > 50


# --- what partial means, however the job ends ------------------------------------------------

PARTIAL_WAYS = [
    # (how the job ends, spec, tally, deadline passed, budget spent, partial)
    ("every lane succeeded", voting(3), tally(succeeded=3), False, False, False),
    (
        "early stop skipped the rest",
        voting(5),
        tally(succeeded=3, queued=2, votes=[("a", 3, 0)]),
        False,
        False,
        False,
    ),
    ("best effort over a failure", voting(3), tally(succeeded=2, failed=1), False, False, True),
    (
        "quorum reached despite a failure",
        voting(3, on_failure="quorum", quorum=2),
        tally(succeeded=2, failed=1),
        False,
        False,
        True,
    ),
    ("the deadline passed", voting(3), tally(succeeded=2, running=1), True, False, True),
    (
        "the budget cancelled the queue",
        voting(3, aggregate={"kind": "majority", "early_stop": False}),
        tally(succeeded=1, queued=2),
        False,
        True,
        True,
    ),
    (
        "a gate blocked and open lanes were cancelled",
        sectioning("draft", "safety", gate="safety"),
        tally(succeeded=1, running=1, gate_blocked="safety"),
        False,
        False,
        True,
    ),
    (
        "a gate blocked after every lane finished",
        sectioning("draft", "safety", gate="safety"),
        tally(succeeded=2, gate_blocked="safety"),
        False,
        False,
        False,
    ),
]


@pytest.mark.parametrize(
    ("spec", "state", "deadline", "budget", "partial"),
    [way[1:] for way in PARTIAL_WAYS],
    ids=[way[0] for way in PARTIAL_WAYS],
)
def test_partial_means_some_lane_ended_without_a_result(
    spec: Any, state: Tally, deadline: bool, budget: bool, partial: bool
) -> None:
    """As the README says, for every way a job ends with a result: skipped lanes (an
    early stop) do not count, failed, timed-out and cancelled ones do."""
    decision = decide(spec, state, deadline_passed=deadline, budget_spent=budget)

    assert decision.outcome == "aggregate"
    assert decision.partial is partial


# --- what a big job's decision may skip counting ----------------------------------------


def map_of(items: int, **fields: Any) -> MapSpec:
    items_ = [f"item {i}" for i in range(items)]
    return MapSpec.model_validate(mapping(items_, "{{item}}", model="m", **fields))


SCORE = {"kind": "score", "extract": "number", "pick": "mean"}
WAITING = [
    sectioning("a", "b", "c"),
    sectioning("a", "b", "c", on_failure="best_effort"),
    voting(5, aggregate=SCORE),
    voting(5, aggregate=SCORE, on_failure="quorum", quorum=4),
    map_of(6),
    map_of(6, policy={"on_failure": "quorum", "quorum": 5}),
    map_of(3, per_item={"n": 2, "aggregate": SCORE}),
]
DECIDING_EARLY = [
    sectioning("a", "b", gate="b"),  # a gate that passed may still block the job
    voting(5),  # a majority may stop early
    map_of(3, per_item={"n": 3, "aggregate": {"kind": "majority", "extract": "number"}}),
]


@pytest.mark.parametrize("spec", DECIDING_EARLY)
def test_a_job_whose_decision_may_come_early_is_always_counted(spec: Any) -> None:
    assert not undecided_while_open(spec, lane_count(spec))


@given(spec=st.sampled_from(WAITING), data=st.data())
def test_a_job_undecided_while_open_is_left_alone_until_its_lanes_end(
    spec: Any, data: st.DataObject
) -> None:
    """While one of its lanes is open and every one that ended succeeded, a job the
    store does not count (undecided_while_open) is one decide() would leave alone."""
    lanes = lane_count(spec)
    assert undecided_while_open(spec, lanes)
    queued = data.draw(st.integers(0, lanes))
    running = data.draw(st.integers(1 if queued == 0 else 0, lanes - queued))
    decision = decide(
        spec, tally(queued=queued, running=running, succeeded=lanes - queued - running)
    )
    assert decision == Decision() and decision.vote is None
