"""How a job concludes once its lanes are done: a gate withholds it, a reducer is
still to run, or the aggregate combines the lanes (a vote with no answer fails)."""

from __future__ import annotations

from typing import Any

from service.aggregate import (
    LaneResult,
    conclude,
    gate_blocks,
    gate_verdict,
    gates,
    judged,
    reduced,
)
from service.policy import Tally, decide
from service.spec import SectioningSpec, VotingSpec
from service.states import JobStatus
from service.views import (
    CollectDetails,
    JudgeDetails,
    MajorityDetails,
    ReduceDetails,
    ScoreDetails,
)

TASK = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def sections(*names: str, gate: str | None = None, **fields: Any) -> SectioningSpec:
    listed: list[dict[str, Any]] = [{"name": name, "task": TASK} for name in names]
    for section in listed:
        if section["name"] == gate:
            section["gate"] = {"block_if": "(?i)unsafe"}
    return SectioningSpec.model_validate({"mode": "sectioning", "sections": listed, **fields})


def votes(n: int, **aggregate: Any) -> VotingSpec:
    return VotingSpec.model_validate(
        {"mode": "voting", "n": n, "task": TASK, "aggregate": {"kind": "majority", **aggregate}}
    )


def lane(index: int, name: str, status: str = "succeeded", output: Any = "x", answer: Any = None):
    return LaneResult(index, name, status, output, answer)


def test_gates_are_the_sections_that_have_one() -> None:
    assert gates(sections("draft", "safety", gate="safety")) == {1: "(?i)unsafe"}
    assert gates(votes(3)) == {}


def test_a_gate_passes_only_when_it_ran_and_did_not_match() -> None:
    assert gate_verdict("(?i)unsafe", "All SAFE here") == "passed"
    assert gate_verdict("(?i)unsafe", "UNSAFE") == "blocked"
    assert not gate_blocks("succeeded", "passed")
    assert gate_blocks("succeeded", "blocked")
    for status in ("failed", "timed_out", "cancelled", "skipped"):
        assert gate_blocks(status, None)


def test_a_blocking_gate_withholds_the_output_and_names_itself() -> None:
    spec = sections("draft", "safety", gate="safety")
    lanes = [lane(0, "draft", output="story"), lane(1, "safety", answer="blocked")]
    conclusion = conclude(spec, lanes, partial=False)
    assert conclusion.status is JobStatus.SUCCEEDED
    assert conclusion.result is not None
    assert conclusion.result["blocked"] is True and conclusion.result["blocked_by"] == "safety"
    assert conclusion.result["output"] is None


def test_a_gate_that_failed_blocks_too() -> None:
    spec = sections("draft", "safety", gate="safety")
    lanes = [lane(0, "draft"), lane(1, "safety", status="failed", output=None)]
    result = conclude(spec, lanes, partial=True).result
    assert result is not None
    assert result["blocked_by"] == "safety"
    assert result["partial"] is True  # a lane ended without a result: the README's partial


def test_collect_shows_every_section_gates_included() -> None:
    spec = sections("draft", "safety", gate="safety")
    lanes = [lane(0, "draft", output="story"), lane(1, "safety", output="ok", answer="passed")]
    result = conclude(spec, lanes, partial=False).result
    assert result is not None and result["output"] == {"draft": "story", "safety": "ok"}


def test_a_reduce_job_waits_for_its_reducer_and_keeps_partial() -> None:
    reducer = {"kind": "reduce", "task": TASK}
    spec = sections("a", "b", aggregate=reducer)
    conclusion = conclude(spec, [lane(0, "a"), lane(1, "b", "failed")], partial=True)
    assert conclusion.status is JobStatus.AGGREGATING
    assert conclusion.result == {"partial": True}


def test_the_reducers_answer_is_the_result_with_the_inputs_it_read() -> None:
    result = reduced("merged", [lane(0, "a"), lane(1, "b", "failed")], partial=True)
    assert result["output"] == "merged"
    assert result["details"] == {"inputs": 1}
    assert result["partial"] is True


def test_a_vote_with_no_extractable_answer_fails_with_no_answer() -> None:
    conclusion = conclude(votes(2), [lane(0, "lane-0"), lane(1, "lane-1")], partial=False)
    assert conclusion.status is JobStatus.FAILED
    assert conclusion.error is not None and conclusion.error["type"] == "no_answer"


def test_a_vote_concludes_with_its_winner() -> None:
    lanes = [
        lane(0, "lane-0", answer=391),
        lane(1, "lane-1", answer=391),
        lane(2, "lane-2", answer=7),
    ]
    conclusion = conclude(votes(3), lanes, partial=False)
    assert conclusion.status is JobStatus.SUCCEEDED
    assert conclusion.result is not None and conclusion.result["output"] == 391
    assert conclusion.result["partial"] is False


# --- the details each aggregate writes are what the document says ---------------------


def test_each_aggregates_details_are_what_the_document_says() -> None:
    three = [lane(0, "lane-0", answer=391), lane(1, "lane-1", answer=391), lane(2, "lane-2")]
    collected = conclude(sections("a", "b"), [lane(0, "a"), lane(1, "b", "failed")], partial=True)
    assert collected.result is not None
    CollectDetails.model_validate(collected.result["details"])

    stopping = votes(5, stop={"rule": "ahead_by", "k": 2})
    state = Tally(5, {"succeeded": 3, "running": 2}, [("391", 2.0, 0)], counted=2)
    vote = decide(stopping, state).vote
    assert vote is not None
    stop = vote.view(stopping)
    for weight in (None, "confidence"):
        spec = votes(3, **({"weight": weight} if weight else {}))
        result = conclude(spec, three, partial=False, stop=stop).result
        assert result is not None
        details = MajorityDetails.model_validate(result["details"])
        assert (details.weighted_agreement is None) == (weight is None)

    for pick in ("max", "mean"):
        scored = [lane(0, "a", answer=7), lane(1, "b", answer=9)]
        result = conclude(votes(2, kind="score", pick=pick), scored, partial=False).result
        assert result is not None
        ScoreDetails.model_validate(result["details"])

    ReduceDetails.model_validate(reduced("merged", three, partial=False)["details"])
    JudgeDetails.model_validate(judged(1, three, "Best: 1", partial=False)["details"])
