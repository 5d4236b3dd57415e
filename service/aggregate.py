"""Fan-in: reading answers out of lane outputs, gates, and how a job concludes.

Pure functions over values; no database, no network. The store calls :func:`conclude`
in the transaction that decided a job has every lane it will get; the reducer's LLM
call is made by the runner with the messages :func:`reduce_messages` builds.
"""

from __future__ import annotations

import html
import json
import math
import re
import statistics
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from .spec import (
    CollectAggregate,
    Extracting,
    LlmTask,
    MajorityAggregate,
    Message,
    ReduceAggregate,
    ScoreAggregate,
    SectioningSpec,
    VotingSpec,
)
from .states import ErrorType, JobStatus, LaneStatus
from .views import ResultView

_NUMBER = re.compile(
    r"(?:(?<![\w.])[-+])?"  # a sign, but not a dash between words or numbers ("5-10", "gpt-4")
    r"(?:\d{1,3}(?:,\d{3})+(?!\d)(?:\.\d*)?|\d+\.?\d*|\.\d+)"  # "1,234.5", "391.", ".5"
    r"(?:[eE][-+]?\d+)?"
)
_FENCE = re.compile(r"^```[a-zA-Z]*\s*|\s*```$")


@dataclass(frozen=True)
class LaneResult:
    """What aggregation needs of one lane, in lane order."""

    index: int
    name: str
    status: str
    output: Any
    answer: Any = None  # extracted vote or score (a gate's verdict); None is an abstention

    @property
    def succeeded(self) -> bool:
        return self.status == LaneStatus.SUCCEEDED


def output_text(output: Any) -> str:
    """The text an answer is read from: an llm lane's text, an http lane's body."""
    if isinstance(output, str):
        return output
    if output is None:
        return ""
    if isinstance(output, dict) and "body" in output:
        body = output["body"]
        return body if isinstance(body, str) else json.dumps(body)
    return json.dumps(output)


def shortest_number(text: str) -> int | float | None:
    """``"391."`` -> 391, ``"-2.50"`` -> -2.5, ``"1,234"`` -> 1234."""
    try:
        value = Decimal(text.replace(",", "").rstrip("."))
    except InvalidOperation:
        return None
    # Beyond a float's range is no answer anyone votes on, and int("1e99999999") would
    # take minutes (and json.dumps refuses ints over 4300 digits).
    if not value.is_finite() or not math.isfinite(float(value)):
        return None
    if value == value.to_integral_value():
        return int(value)
    return float(value)


def extract(how: Extracting, output: Any, reply: dict[str, Any] | None = None) -> Any:
    """Read the answer from a lane's output; ``None`` means the lane abstains.

    ``json`` reads the message text or, when there is none and the model called tools,
    the first tool call's arguments: so a vote over a function's arguments is a vote."""
    text = output_text(output)
    if how.extract == "json" and output is None and reply and reply.get("tool_calls"):
        text = str(reply["tool_calls"][0]["function"]["arguments"])
    if how.extract == "text":
        normalised = " ".join(text.split()).casefold()
        return normalised or None
    if how.extract == "number":
        # The last number, or none: an out-of-range last number must not fall back to an
        # earlier one (a step of the working) and vote for it.
        found = _NUMBER.findall(text)
        return shortest_number(found[-1]) if found else None
    if how.extract == "regex":
        assert how.pattern is not None
        match = re.search(how.pattern, text)
        if match is None:
            return None
        value = match.group(1) if match.re.groups else match.group(0)
        return (value or "").strip() or None  # an empty capture is no answer
    assert how.field is not None
    try:
        document = json.loads(
            _FENCE.sub("", text.strip()), parse_float=_finite, parse_constant=_finite
        )
    except ValueError:
        return None
    for part in how.field.split("."):
        if isinstance(document, dict) and part in document:
            document = document[part]
        elif isinstance(document, list) and part.lstrip("-").isdigit():
            try:
                document = document[int(part)]
            except IndexError:
                return None
        else:
            return None
    return document


def _finite(text: str) -> float:
    """JSON numbers only: NaN, Infinity and overflowing floats cannot be reported as JSON."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is not a finite number")
    return value


def as_score(answer: Any) -> float | int | None:
    if isinstance(answer, bool) or answer is None:
        return None
    if isinstance(answer, int | float):
        return answer
    return shortest_number(str(answer).strip())


def answer_key(answer: Any) -> str | None:
    """A canonical text for grouping equal answers (``391`` and ``391.0`` agree)."""
    if answer is None:
        return None
    if isinstance(answer, float) and answer.is_integer():
        answer = int(answer)
    return json.dumps(answer, sort_keys=True, separators=(",", ":"))


def lane_answer(
    spec: VotingSpec | SectioningSpec,
    idx: int,
    output: Any,
    reply: dict[str, Any] | None = None,
) -> Any:
    """What a succeeded lane's output says: a gate's verdict, or the vote or score the
    aggregate reads from it (None: the aggregate reads none, or the lane abstains)."""
    pattern = gates(spec).get(idx)
    if pattern is not None:
        return gate_verdict(pattern, output)
    if isinstance(spec.aggregate, ScoreAggregate):
        return as_score(extract(spec.aggregate, output, reply))
    if isinstance(spec.aggregate, MajorityAggregate):
        return extract(spec.aggregate, output, reply)
    return None


# --- gates ---------------------------------------------------------------------------

BLOCKED, PASSED = "blocked", "passed"


def gates(spec: VotingSpec | SectioningSpec) -> dict[int, str]:
    """``{lane index: block_if}`` of the sections that gate the job."""
    if not isinstance(spec, SectioningSpec):
        return {}
    return {i: s.gate.block_if for i, s in enumerate(spec.sections) if s.gate is not None}


def gate_verdict(pattern: str, output: Any) -> str:
    return BLOCKED if re.search(pattern, output_text(output)) else PASSED


def gate_blocks(status: str, verdict: Any) -> bool:
    """Fail closed: a gate that ended blocks unless it ran and passed."""
    return not (status == LaneStatus.SUCCEEDED and verdict == PASSED)


# --- aggregates --------------------------------------------------------------------


def collect(lanes: list[LaneResult]) -> tuple[Any, dict[str, Any]]:
    output = {lane.name: (lane.output if lane.succeeded else None) for lane in lanes}
    missing = [lane.name for lane in lanes if not lane.succeeded]
    return output, {"missing": missing}


def majority(lanes: list[LaneResult]) -> tuple[Any, dict[str, Any]]:
    """The most voted answer; ties go to the answer first seen in lane order."""
    counts: dict[str, int] = {}
    answers: dict[str, Any] = {}
    abstained = 0
    for lane in lanes:
        if not lane.succeeded:
            continue
        key = answer_key(lane.answer)
        if key is None:
            abstained += 1
            continue
        counts[key] = counts.get(key, 0) + 1
        answers.setdefault(key, lane.answer)
    counted = sum(counts.values())
    # dicts keep insertion order, so max() keeps the first seen on a tie.
    winner = max(counts, key=lambda k: counts[k]) if counts else None
    votes = [{"answer": answers[k], "count": c} for k, c in counts.items()]
    votes.sort(key=lambda v: -int(v["count"]))
    details = {
        "votes": votes,
        "winner_votes": counts[winner] if winner else 0,
        "counted": counted,
        "abstained": abstained,
        "agreement": round(counts[winner] / counted, 4) if winner else 0.0,
    }
    return (answers[winner] if winner else None), details


def score(lanes: list[LaneResult], pick: str) -> tuple[Any, dict[str, Any]]:
    """``max``/``min``: the picked lane's output; ``mean``: the mean score."""
    scored = [(lane, lane.answer) for lane in lanes if lane.succeeded and lane.answer is not None]
    scores = {lane.name: value for lane, value in scored}
    details: dict[str, Any] = {"scores": scores, "pick": pick, "counted": len(scored)}
    if not scored:
        return None, details
    if pick == "mean":
        # In decimal, so the mean of 0.1 and 0.2 is 0.15, not 0.15000000000000002.
        mean = statistics.mean(Decimal(repr(value)) for _, value in scored)
        details["score"] = shortest_number(str(mean))
        return details["score"], details
    chooser = max if pick == "max" else min
    # max()/min() return the first of equal items: ties go to the earliest lane.
    lane, value = chooser(scored, key=lambda pair: pair[1])
    details.update(score=value, lane=lane.name)
    return lane.output, details


def reduce_messages(task: LlmTask, lanes: list[LaneResult]) -> list[Message]:
    """The reducer's prompt: its own messages, then every lane's output tagged by name."""
    parts = [
        f'<lane name="{html.escape(lane.name)}">\n{output_text(lane.output)}\n</lane>'
        for lane in lanes
        if lane.succeeded
    ]
    tagged = Message(role="user", content="\n\n".join(parts))
    return [*task.messages, tagged]


def combine(aggregate: Any, lanes: list[LaneResult]) -> tuple[Any, dict[str, Any]]:
    """Every aggregate but ``reduce`` (whose output is the reducer call's text)."""
    if isinstance(aggregate, CollectAggregate):
        return collect(lanes)
    if isinstance(aggregate, MajorityAggregate):
        return majority(lanes)
    if isinstance(aggregate, ScoreAggregate):
        return score(lanes, aggregate.pick)
    if isinstance(aggregate, ReduceAggregate):
        raise TypeError("reduce is combined by the runner's reducer call")
    raise TypeError(f"unknown aggregate {aggregate!r}")


# --- how a job concludes ---------------------------------------------------------------


@dataclass(frozen=True)
class Conclusion:
    """How a job ends once its lanes are done: ``succeeded`` with ``result``, ``failed``
    with ``error``, or ``aggregating``: a reducer call must run first (``result`` then
    holds what the reducer's result keeps: ``partial``)."""

    status: JobStatus
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None


def conclude(
    spec: VotingSpec | SectioningSpec, lanes: list[LaneResult], *, partial: bool
) -> Conclusion:
    """The job's result from its lanes (all of them, in lane order): withheld when a gate
    blocks, left to a reducer, or combined; a vote or score with no answer fails."""
    gated = gates(spec)
    for lane in lanes:
        if lane.index in gated and gate_blocks(lane.status, lane.answer):
            blocked = ResultView(output=None, blocked=True, blocked_by=lane.name)
            return Conclusion(JobStatus.SUCCEEDED, result=blocked.model_dump())
    if isinstance(spec.aggregate, ReduceAggregate):
        return Conclusion(JobStatus.AGGREGATING, result={"partial": partial})
    # Gate verdicts are not votes or scores; collect shows every section.
    inputs = (
        lanes
        if isinstance(spec.aggregate, CollectAggregate)
        else [lane for lane in lanes if lane.index not in gated]
    )
    output, details = combine(spec.aggregate, inputs)
    if isinstance(spec.aggregate, MajorityAggregate | ScoreAggregate) and output is None:
        error = {
            "type": ErrorType.NO_ANSWER,
            "message": "no lane gave an answer that could be extracted",
        }
        return Conclusion(JobStatus.FAILED, error=error)
    result = ResultView(output=output, details=details, partial=partial)
    return Conclusion(JobStatus.SUCCEEDED, result=result.model_dump())


def reduced(output: str, lanes: list[LaneResult], *, partial: bool) -> dict[str, Any]:
    """The result of a job whose reducer answered ``output``."""
    details = {"inputs": sum(1 for lane in lanes if lane.succeeded)}
    return ResultView(output=output, details=details, partial=partial).model_dump()
