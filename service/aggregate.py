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
from dataclasses import dataclass, field, replace
from decimal import Decimal, InvalidOperation
from typing import Any

from .spec import (
    CollectAggregate,
    Extracting,
    JobSpec,
    JudgeAggregate,
    LlmTask,
    MajorityAggregate,
    MapSpec,
    MergeAggregate,
    Message,
    OnFailure,
    ReduceAggregate,
    ScoreAggregate,
    SectioningSpec,
    item_name,
    on_failure,
    quorum_size,
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
    weight: float = 1.0  # a vote's weight (its confidence when votes are weighted)
    error: dict[str, Any] | None = None  # why it ended without a result
    key: str | None = None  # answer_key(answer), when the store read it so

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


def answer_text(output: Any, reply: dict[str, Any] | None) -> str:
    """The text a lane answered: its output's or, when it has none and the model called
    tools, the first call's arguments."""
    if output is None and reply and reply.get("tool_calls"):
        return str(reply["tool_calls"][0]["function"]["arguments"])
    return output_text(output)


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
    text = answer_text(output, reply) if how.extract == "json" else output_text(output)
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
    return json_at(text, how.field)


def json_at(text: str, field: str | None) -> Any:
    """The value at a dotted path (``None``: the whole) in a JSON text, code fences
    aside; ``None`` when the text is not JSON or has nothing there."""
    try:
        document = json.loads(
            _FENCE.sub("", text.strip()), parse_float=_finite, parse_constant=_finite
        )
    except ValueError:
        return None
    for part in field.split(".") if field else ():
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


# Canonical JSON: keys sorted, no spaces (one encoder, not one made at each call).
_canonical = json.JSONEncoder(sort_keys=True, separators=(",", ":")).encode


def answer_key(answer: Any) -> str | None:
    """A canonical text for grouping equal answers (``391`` and ``391.0`` agree)."""
    if answer is None:
        return None
    if isinstance(answer, float) and answer.is_integer():
        answer = int(answer)
    return _canonical(answer)


@dataclass(frozen=True)
class LaneAnswer:
    """What a succeeded lane's output says: its answer (None: it abstains, or the
    aggregate reads none), the weight of its vote, and a note when the lane abstained
    for a red flag or voted with weight 1 for want of logprobs."""

    answer: Any = None
    weight: float | None = None
    note: str | None = None


def lane_answer(
    spec: JobSpec,
    idx: int,
    output: Any,
    reply: dict[str, Any] | None = None,
) -> LaneAnswer:
    """A gate's verdict, or the vote or score the aggregate reads from the output:
    red-flagged answers abstain, and weighted votes weigh the lane's confidence."""
    pattern = gates(spec).get(idx)
    if pattern is not None:
        return LaneAnswer(gate_verdict(pattern, output))
    # A per-item map's lanes are votes: its items' aggregate reads them.
    per_item = spec.per_item if isinstance(spec, MapSpec) else None
    aggregate = per_item.aggregate if per_item is not None else spec.aggregate
    if isinstance(aggregate, ScoreAggregate):
        return LaneAnswer(as_score(extract(aggregate, output, reply)))
    if isinstance(aggregate, MergeAggregate):
        return LaneAnswer(list_answer(aggregate, output, reply))
    if not isinstance(aggregate, MajorityAggregate):
        return LaneAnswer()
    text = answer_text(output, reply)
    if aggregate.max_answer_chars is not None and len(text) > aggregate.max_answer_chars:
        note = f"abstained: the answer is {len(text)} characters, over {aggregate.max_answer_chars}"
        return LaneAnswer(note=note)
    if aggregate.reject_if is not None and re.search(aggregate.reject_if, text):
        return LaneAnswer(note="abstained: the answer matches reject_if")
    answer = extract(aggregate, output, reply)
    if aggregate.weight is None:
        return LaneAnswer(answer)
    mean = ((reply or {}).get("logprobs") or {}).get("mean")
    if not isinstance(mean, int | float) or isinstance(mean, bool) or not math.isfinite(mean):
        return LaneAnswer(answer, 1.0, "weight 1: the provider sent no logprobs")
    return LaneAnswer(answer, math.exp(min(0.0, mean)))


# --- gates ---------------------------------------------------------------------------

BLOCKED, PASSED = "blocked", "passed"


def gates(spec: JobSpec) -> dict[int, str]:
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


def majority(lanes: list[LaneResult], weighted: bool = False) -> tuple[Any, dict[str, Any]]:
    """The most voted answer (by weight when ``weighted``); ties go to the answer first
    seen in lane order."""
    counts: dict[str, int] = {}
    weights: dict[str, float] = {}
    answers: dict[str, Any] = {}
    abstained = 0
    for lane in lanes:
        if not lane.succeeded:
            continue
        key = lane.key if lane.key is not None else answer_key(lane.answer)
        if key is None:
            abstained += 1
            continue
        counts[key] = counts.get(key, 0) + 1
        weights[key] = weights.get(key, 0.0) + lane.weight
        answers.setdefault(key, lane.answer)
    counted = sum(counts.values())
    ranking = weights if weighted else counts
    # dicts keep insertion order, so max() keeps the first seen on a tie.
    winner = max(ranking, key=lambda k: ranking[k]) if ranking else None
    votes: list[dict[str, Any]] = [
        {"answer": answers[k], "count": c, **({"weight": round(weights[k], 6)} if weighted else {})}
        for k, c in counts.items()
    ]
    votes.sort(key=lambda v: -(v["weight"] if weighted else v["count"]))
    details = {
        "votes": votes,
        "winner_votes": counts[winner] if winner else 0,
        "counted": counted,
        "abstained": abstained,
        "agreement": round(counts[winner] / counted, 4) if winner else 0.0,
    }
    if weighted:
        total = sum(weights.values())
        details["winner_weight"] = round(weights[winner], 6) if winner else 0.0
        details["weighted_agreement"] = (
            round(weights[winner] / total, 4) if winner and total else 0.0
        )
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
    return tagged_messages(task, reduce_inputs(lanes))


def reduce_inputs(lanes: list[LaneResult]) -> list[tuple[str, str]]:
    """What a reducer reads: each succeeded lane's name and text, in lane order."""
    return [(lane.name, output_text(lane.output)) for lane in lanes if lane.succeeded]


def tagged_messages(task: LlmTask, inputs: list[tuple[str, str]]) -> list[Message]:
    """The task's messages, then one message with each input tagged by its name."""
    parts = [f'<lane name="{html.escape(name)}">\n{text}\n</lane>' for name, text in inputs]
    return [*task.messages, Message(role="user", content="\n\n".join(parts))]


# --- a hierarchical reduce (group_size) ---------------------------------------------


@dataclass(frozen=True)
class Tree:
    """Where a hierarchical reduce stands: ``level`` (0: the lanes' outputs), its
    ``inputs`` (None at level 0: read from the lanes), and the ``outputs`` of the groups
    of that level done so far (by group index). Kept with the job while it aggregates,
    so a later attempt runs only the groups still to do."""

    level: int = 0
    inputs: list[tuple[str, str]] | None = None
    outputs: dict[int, str] = field(default_factory=dict)

    @classmethod
    def of(cls, saved: dict[str, Any] | None) -> Tree:
        if not saved:
            return cls()
        inputs = saved.get("inputs")
        return cls(
            saved["level"],
            [(name, text) for name, text in inputs] if inputs is not None else None,
            {int(i): text for i, text in saved["outputs"].items()},
        )

    def saved(self) -> dict[str, Any]:
        inputs = [list(pair) for pair in self.inputs] if self.inputs is not None else None
        outputs = {str(i): text for i, text in self.outputs.items()}
        return {"level": self.level, "inputs": inputs, "outputs": outputs}

    def level_inputs(self, lanes: list[LaneResult]) -> list[tuple[str, str]]:
        return self.inputs if self.inputs is not None else reduce_inputs(lanes)

    def groups(self, lanes: list[LaneResult], size: int) -> list[list[tuple[str, str]]]:
        """This level's groups of at most ``size`` inputs; one group: the last call."""
        inputs = self.level_inputs(lanes)
        return [inputs[i : i + size] for i in range(0, len(inputs), size)] or [[]]

    def done(self, group: int, text: str) -> Tree:
        return replace(self, outputs={**self.outputs, group: text})

    def next_level(self, groups: int) -> Tree:
        """Every group of this level answered: their outputs are the next level's
        inputs, in group order."""
        level = self.level + 1
        inputs = [(f"level-{level}.{i}", self.outputs[i]) for i in range(groups)]
        return Tree(level, inputs)


# --- map: the items' answers as a list, or merged -------------------------------------

_MARKER = re.compile(r"^\s*(?:[-*•]|\d{1,4}[.)])\s+")


def list_answer(how: MergeAggregate, output: Any, reply: dict[str, Any] | None) -> Any:
    """An item's answer read as a list (``None``: it did not answer one)."""
    if how.extract == "lines":
        lines = (_MARKER.sub("", line).strip() for line in output_text(output).splitlines())
        return [line for line in lines if line] or None
    found = json_at(answer_text(output, reply), how.field)
    return found if isinstance(found, list) else None


def without_result(lanes: list[LaneResult]) -> list[dict[str, Any]]:
    """The items that ended without a result: which, how, and why."""
    return [
        {"index": lane.index, "name": lane.name, "status": lane.status, "error": lane.error}
        for lane in lanes
        if not lane.succeeded
    ]


def collect_items(lanes: list[LaneResult]) -> tuple[Any, dict[str, Any]]:
    """Each item's output in item order; ``None`` for an item without one."""
    output = [lane.output if lane.succeeded else None for lane in lanes]
    return output, {"items": without_result(lanes)}


def merge_key(element: Any, dedupe: str) -> str:
    if dedupe == "normalized" and isinstance(element, str):
        return json.dumps(" ".join(element.split()).casefold())
    return _canonical(element)


def merge(lanes: list[LaneResult], dedupe: str) -> tuple[Any, dict[str, Any]]:
    """The elements of every item's list, in item order, equal ones once: each with its
    count and the items it came from (the first form seen is the one shown)."""
    merged: dict[str, dict[str, Any]] = {}
    unreadable, read = [], 0
    for lane in lanes:
        if not lane.succeeded:
            continue
        if not isinstance(lane.answer, list):
            unreadable.append(lane.name)
            continue
        for element in lane.answer:
            read += 1
            entry = merged.setdefault(
                merge_key(element, dedupe), {"value": element, "count": 0, "items": []}
            )
            entry["count"] += 1
            if not entry["items"] or entry["items"][-1] != lane.name:
                entry["items"].append(lane.name)
    details = {"items": without_result(lanes), "unreadable": unreadable, "elements": read}
    return list(merged.values()), details


def combine(aggregate: Any, lanes: list[LaneResult]) -> tuple[Any, dict[str, Any]]:
    """Every aggregate but ``reduce`` (whose output is the reducer call's text)."""
    if isinstance(aggregate, CollectAggregate):
        return collect(lanes)
    if isinstance(aggregate, MergeAggregate):
        return merge(lanes, aggregate.dedupe)
    if isinstance(aggregate, MajorityAggregate):
        return majority(lanes, weighted=aggregate.weight is not None)
    if isinstance(aggregate, ScoreAggregate):
        return score(lanes, aggregate.pick)
    if isinstance(aggregate, ReduceAggregate | JudgeAggregate):
        raise TypeError(f"{aggregate.kind} is combined by the runner's reducer call")
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
    spec: JobSpec,
    lanes: list[LaneResult],
    *,
    partial: bool,
    stop: dict[str, Any] | None = None,
) -> Conclusion:
    """The job's result from its lanes (all of them, in lane order): withheld when a gate
    blocks, left to a reducer or a judge, or combined; a vote or score with no answer
    fails. ``stop``: how a vote's stopping rule went, for its details."""
    gated = gates(spec)
    for lane in lanes:
        if lane.index in gated and gate_blocks(lane.status, lane.answer):
            blocked = ResultView(output=None, blocked=True, blocked_by=lane.name, partial=partial)
            return Conclusion(JobStatus.SUCCEEDED, result=blocked.model_dump())
    if isinstance(spec, MapSpec):
        return conclude_map(spec, lanes, partial=partial)
    if isinstance(spec.aggregate, ReduceAggregate | JudgeAggregate):
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
    if stop is not None:
        details["stop"] = stop
    result = ResultView(output=output, details=details, partial=partial)
    return Conclusion(JobStatus.SUCCEEDED, result=result.model_dump())


# --- how a map concludes ---------------------------------------------------------------


def item_votes(spec: MapSpec, lanes: list[LaneResult], index: int) -> list[LaneResult]:
    """Item ``index``'s lanes (a per-item map's: its votes)."""
    n = spec.votes
    return lanes[index * n : index * n + n]


def decided_items(
    spec: MapSpec, lanes: list[LaneResult], judged: dict[int, int] | None = None
) -> tuple[list[LaneResult], list[dict[str, Any]] | None]:
    """Each item's answer, as a result in item order: its lane's, or with ``per_item``
    its vote's (the winner, the score, or the output its judge named: ``judged`` says
    which candidate, from 1, or 0 for none), with each vote's details."""
    if spec.per_item is None:
        return lanes, None
    how = spec.per_item.aggregate
    items: list[LaneResult] = []
    details: list[dict[str, Any]] = []
    for index, item in enumerate(spec.items):
        votes = item_votes(spec, lanes, index)
        name = item_name(item, index)
        if isinstance(how, MajorityAggregate):
            answer, found = majority(votes, weighted=how.weight is not None)
        elif isinstance(how, ScoreAggregate):
            answer, found = score(votes, how.pick)
        else:
            answer, found = judged_item(votes, (judged or {}).get(index, 0))
        details.append({"name": name, **found})
        if answer is not None:
            items.append(LaneResult(index, name, LaneStatus.SUCCEEDED, answer, answer))
            continue
        # Why: the first vote's error, when none succeeded; else no vote had an answer.
        error = next((vote.error for vote in votes if vote.error is not None), None)
        if any(vote.succeeded for vote in votes) or error is None:
            why = "its judge named no candidate" if spec.per_item.judged else "no vote answered"
            error = {"type": ErrorType.NO_ANSWER, "message": why}
        items.append(LaneResult(index, name, LaneStatus.FAILED, None, error=error))
    return items, details


def judged_item(votes: list[LaneResult], choice: int) -> tuple[Any, dict[str, Any]]:
    """An item's answer by its judge's ``choice`` of its succeeded lanes (from 1; 0:
    it named none)."""
    among = [vote for vote in votes if vote.succeeded]
    details: dict[str, Any] = {"best": choice or None, "candidates": len(among)}
    if not 1 <= choice <= len(among):
        return None, details
    return among[choice - 1].output, {**details, "lane": among[choice - 1].name}


def fan_in(
    spec: JobSpec, lanes: list[LaneResult], judged: dict[int, int] | None = None
) -> list[LaneResult]:
    """What the fan-in (a reducer too) reads: the lanes, or a per-item map's items."""
    return decided_items(spec, lanes, judged)[0] if isinstance(spec, MapSpec) else lanes


def judges_items(spec: JobSpec) -> bool:
    """Whether a judge call decides each item of the map (the reducer makes them)."""
    return isinstance(spec, MapSpec) and spec.per_item is not None and spec.per_item.judged


def conclude_map(
    spec: MapSpec,
    lanes: list[LaneResult],
    *,
    partial: bool,
    judged: dict[int, int] | None = None,
) -> Conclusion:
    """A map's result: its items' answers as a list, merged, or left to a reducer. With
    ``per_item``, the failure policy is about items (a vote without an answer is an item
    without one); items decided by a judge wait for their judges' ``judged`` choices."""
    if judges_items(spec) and judged is None:
        return Conclusion(JobStatus.AGGREGATING, result={"partial": partial})
    items, votes = decided_items(spec, lanes, judged)
    if votes is not None:
        answered = sum(item.succeeded for item in items)
        policy, need = on_failure(spec), quorum_size(spec)
        failed = next((item for item in items if not item.succeeded), None)
        error = None
        if not answered:
            error = {"type": ErrorType.NO_ANSWER, "message": "no item's vote gave an answer"}
        elif policy is OnFailure.FAIL_FAST and failed is not None:
            message = f"item {failed.name!r} has no answer: {(failed.error or {}).get('message')}"
            error = {"type": ErrorType.NO_ANSWER, "message": message}
        elif policy is OnFailure.QUORUM and answered < need:
            message = f"{answered} items have an answer, fewer than the quorum of {need}"
            error = {"type": ErrorType.QUORUM, "message": message}
        if error is not None:
            return Conclusion(JobStatus.FAILED, error=error)
        partial = partial or failed is not None
    if isinstance(spec.aggregate, ReduceAggregate):
        return Conclusion(JobStatus.AGGREGATING, result={"partial": partial})
    if isinstance(spec.aggregate, MergeAggregate):
        output, details = merge(items, spec.aggregate.dedupe)
    else:
        output, details = collect_items(items)
    if votes is not None:
        details["votes"] = votes
    result = ResultView(output=output, details=details, partial=partial)
    return Conclusion(JobStatus.SUCCEEDED, result=result.model_dump())


def reduced(
    output: str, lanes: list[LaneResult], *, partial: bool, levels: int = 1
) -> dict[str, Any]:
    """The result of a job whose reducer answered ``output`` (after ``levels`` levels
    of a hierarchical reduce)."""
    details: dict[str, Any] = {"inputs": sum(1 for lane in lanes if lane.succeeded)}
    if levels > 1:
        details["levels"] = levels
    return ResultView(output=output, details=details, partial=partial).model_dump()


# --- the judge -----------------------------------------------------------------------------


def candidates(spec: JobSpec, lanes: list[LaneResult]) -> list[LaneResult]:
    """What a judge chooses from: the succeeded lanes that are not gates, in lane order
    (numbered from 1)."""
    gated = gates(spec)
    return [lane for lane in lanes if lane.succeeded and lane.index not in gated]


def judge_messages(task: LlmTask, candidates: list[LaneResult]) -> list[Message]:
    """The judge's prompt: its own messages, then the candidates numbered from 1 and how
    to name the best."""
    parts = [
        f'<candidate number="{n}">\n{output_text(lane.output)}\n</candidate>'
        for n, lane in enumerate(candidates, 1)
    ]
    ask = 'Answer with the number of the best candidate, as {"best": N}.'
    tagged = Message(role="user", content="\n\n".join([*parts, ask]))
    return [*task.messages, tagged]


# Whole numbers of at most 6 digits: no candidate list is longer, and int() of a digit
# run of thousands of characters raises.
_BEST = re.compile(r'"best"\s*:\s*"?(\d{1,6})\b')
_INTEGER = re.compile(r"\b\d{1,6}\b")


def judge_choice(text: Any, count: int) -> int | None:
    """The candidate a judge named (1..count): ``{"best": k}``, or the last integer of
    its text; None when it named none of them."""
    if not isinstance(text, str):
        return None
    found = _BEST.findall(text) or _INTEGER.findall(text)
    if not found:
        return None
    choice = int(found[-1])
    return choice if 1 <= choice <= count else None


def judged(
    choice: int, candidates: list[LaneResult], judge: str, *, partial: bool
) -> dict[str, Any]:
    """The result of a job whose judge chose candidate ``choice``: that lane's output."""
    best = candidates[choice - 1]
    details = {"judge": judge, "best": choice, "lane": best.name, "candidates": len(candidates)}
    return ResultView(output=best.output, details=details, partial=partial).model_dump()
