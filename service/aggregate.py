"""Fan-in: reading answers out of lane outputs and combining lanes into one result.

Pure functions over values; no database, no network. The reducer's LLM call is made
by the runner with the messages :func:`reduce_messages` builds.
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
)

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
    answer: Any = None  # extracted vote or score; None is an abstention

    @property
    def succeeded(self) -> bool:
        return self.status == "succeeded"


def output_text(output: Any) -> str:
    """The text an answer is read from: an llm lane's text, an http lane's body."""
    if isinstance(output, str):
        return output
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


def extract(how: Extracting, output: Any) -> Any:
    """Read the answer from a lane's output; ``None`` means the lane abstains."""
    text = output_text(output)
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


def lane_answer(aggregate: Any, output: Any) -> Any:
    """The vote or score stored with a succeeded lane, or None when the aggregate has none."""
    if isinstance(aggregate, ScoreAggregate):
        return as_score(extract(aggregate, output))
    if isinstance(aggregate, MajorityAggregate):
        return extract(aggregate, output)
    return None


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
