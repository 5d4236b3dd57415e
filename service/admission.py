"""Admission: a spec checked against this server before anything is stored: its caps,
its providers, destinations the egress guard can never allow."""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter, ValidationError

from .config import Settings
from .egress import EgressDenied, check_url
from .errors import InvalidSpec
from .spec import (
    PLACEHOLDER,
    HttpTask,
    JobSpec,
    JudgeAggregate,
    LlmTask,
    MajorityAggregate,
    MapSpec,
    MissingField,
    OnFailure,
    ReduceAggregate,
    Task,
    VotingSpec,
    fill,
    lane_count,
    on_failure,
    task_texts,
    voters,
)

_task_adapter: TypeAdapter[LlmTask | HttpTask] = TypeAdapter(Task)


def check_against(spec: JobSpec, settings: Settings) -> None:
    """Reject what this server cannot run: caps, unknown providers, impossible policies.

    Raises :class:`InvalidSpec` naming every failing field, before anything is stored.
    """
    problems: list[dict[str, Any]] = []

    def problem(loc: tuple[str | int, ...], msg: str) -> None:
        problems.append({"loc": list(loc), "msg": msg})

    lanes = lane_count(spec)
    if lanes > settings.max_lanes_per_job:
        where: tuple[str, ...] = (
            ("n",)
            if isinstance(spec, VotingSpec)
            else ("items",)
            if isinstance(spec, MapSpec)
            else ("sections",)
        )
        votes = ""
        if isinstance(spec, MapSpec) and spec.per_item is not None:
            votes = f" ({len(spec.items)} items of {spec.votes} votes)"
        problem(
            where,
            f"{lanes} lanes{votes} is over the cap of {settings.max_lanes_per_job} lanes per job",
        )

    # A stopping rule that needs more votes than the vote has lanes could never fire.
    vote: tuple[tuple[str, ...], Any, int] | None = None
    if isinstance(spec, MapSpec) and spec.per_item is not None:
        vote = (("per_item", "aggregate"), spec.per_item.aggregate, spec.per_item.n)
    elif isinstance(spec, VotingSpec):
        vote = (("aggregate",), spec.aggregate, lanes)
    if vote is not None and isinstance(vote[1], MajorityAggregate) and vote[1].stop is not None:
        where, aggregate, of = vote
        for name in ("k", "size", "min_votes"):
            value = getattr(aggregate.stop, name)
            if value is not None and value > of:
                problem(
                    (*where, "stop", name),
                    f"{name} {value} is more than the {of} lanes: the rule could never stop",
                )

    tasks: list[tuple[tuple[str | int, ...], LlmTask | HttpTask]] = []
    if isinstance(spec, VotingSpec) and spec.tasks is not None:
        if len(spec.tasks) > spec.n:
            problem(("tasks",), f"{len(spec.tasks)} tasks for {spec.n} lanes: some would never run")
        tasks.extend((("tasks", i), task) for i, task in enumerate(spec.tasks))
    elif isinstance(spec, VotingSpec):
        tasks.append((("task",), spec.ensemble[0]))
    elif isinstance(spec, MapSpec):
        tasks.append((("task",), spec.task))
        if spec.per_item is not None and isinstance(spec.per_item.aggregate, JudgeAggregate):
            tasks.append((("per_item", "aggregate", "task"), spec.per_item.aggregate.task))
        problems.extend(_item_problems(spec))
    else:
        tasks.extend((("sections", i, "task"), s.task) for i, s in enumerate(spec.sections))
    if isinstance(spec.aggregate, ReduceAggregate | JudgeAggregate):
        tasks.append((("aggregate", "task"), spec.aggregate.task))
    for loc, task in tasks:
        problems.extend(_task_problems(loc, task, settings))

    policy = spec.policy
    if policy.quorum is not None:
        if on_failure(spec) is not OnFailure.QUORUM:
            problem(
                ("policy", "quorum"),
                f"a quorum needs on_failure 'quorum' (or none), not '{on_failure(spec)}'",
            )
        elif policy.quorum > voters(spec):
            counted = "items" if voters(spec) != lanes else "lanes"
            problem(
                ("policy", "quorum"),
                f"quorum {policy.quorum} is larger than the {voters(spec)} {counted}",
            )
    if policy.max_attempts > settings.max_attempts:
        problem(("policy", "max_attempts"), f"over the server maximum of {settings.max_attempts}")
    if policy.lane_timeout_s is not None and policy.lane_timeout_s > settings.max_lane_timeout_s:
        problem(
            ("policy", "lane_timeout_s"),
            f"over the server maximum of {settings.max_lane_timeout_s} s",
        )
    if policy.deadline_s is not None and policy.deadline_s > settings.max_deadline_s:
        problem(("policy", "deadline_s"), f"over the server maximum of {settings.max_deadline_s} s")
    if policy.max_concurrency is not None and policy.max_concurrency > settings.max_concurrency:
        problem(
            ("policy", "max_concurrency"),
            f"over the server maximum of {settings.max_concurrency} lanes in flight",
        )
    if spec.webhook is not None:
        if not settings.webhook_secret:
            problem(
                ("webhook",), "this server has no webhook signing secret (FANOUT_WEBHOOK_SECRET)"
            )
        reason = _destination_problem(spec.webhook.url)
        if reason:
            problem(("webhook", "url"), reason)
    if problems:
        raise InvalidSpec(problems)


# Items named in one refusal at most: a batch of 10,000 that lacks a field everywhere
# gets the first few and a count, not 10,000 lines.
MAX_ITEM_PROBLEMS = 10


def _item_problems(spec: MapSpec) -> list[dict[str, Any]]:
    """Each item that cannot fill a placeholder of the task, naming the item and the
    placeholder."""
    found: list[dict[str, Any]] = []
    missing = 0
    texts = [text for text in task_texts(spec.task) if PLACEHOLDER.search(text)]
    for index, item in enumerate(spec.items):
        try:
            for text in texts:
                fill(text, item, index)
        except MissingField as exc:
            missing += 1
            if len(found) < MAX_ITEM_PROBLEMS:
                what = "an object" if isinstance(item, dict) else "a string"
                message = f"item {index} ({what}) has no value for {exc.placeholder} in the task"
                found.append({"loc": ["items", index], "msg": message})
    if missing > len(found):
        found.append({"loc": ["items"], "msg": f"and {missing - len(found)} more items like these"})
    return found


def check_parts(raw: dict[str, Any], settings: Settings) -> list[dict[str, Any]]:
    """What :func:`check_against` would refuse in the parts of a spec that parse, for a
    spec that does not: so that one answer names every failing field (the lanes cap, and
    each task's provider, size and destination)."""
    found: list[dict[str, Any]] = []
    lanes, where = 0, "n"
    for name in ("n", "sections", "items"):  # whichever the spec has: its lanes
        value = raw.get(name)
        if isinstance(value, list):
            lanes, where = len(value), name
        elif isinstance(value, int) and not isinstance(value, bool):
            lanes, where = value, name
    sections = raw.get("sections")
    if lanes > settings.max_lanes_per_job:
        message = f"{lanes} lanes is over the cap of {settings.max_lanes_per_job} lanes per job"
        found.append({"loc": [where], "msg": message})
    candidates: list[tuple[tuple[str | int, ...], Any]] = [(("task",), raw.get("task"))]
    if isinstance(raw.get("tasks"), list):
        candidates += [(("tasks", i), task) for i, task in enumerate(raw["tasks"])]
    if isinstance(sections, list):
        candidates += [
            (("sections", i, "task"), s.get("task"))
            for i, s in enumerate(sections)
            if isinstance(s, dict)
        ]
    if isinstance(raw.get("aggregate"), dict):
        candidates.append((("aggregate", "task"), raw["aggregate"].get("task")))
    for loc, value in candidates:
        if not isinstance(value, dict):
            continue
        try:
            task = _task_adapter.validate_python(value)
        except ValidationError:
            continue  # pydantic has said what is wrong with it
        found.extend(_task_problems(loc, task, settings))
    return found


def _task_problems(
    loc: tuple[str | int, ...], task: LlmTask | HttpTask, settings: Settings
) -> list[dict[str, Any]]:
    """A task's provider, the size of its messages, and its destination."""
    found = []
    if isinstance(task, LlmTask):
        if task.provider not in settings.providers:
            known = ", ".join(sorted(settings.providers))
            message = f"unknown provider {task.provider!r} (known: {known})"
            found.append({"loc": [*loc, "provider"], "msg": message})
        size = sum(len(str(m.content).encode()) for m in task.messages)
        if size > settings.max_message_bytes:
            message = f"messages are {size} bytes, over the cap of {settings.max_message_bytes}"
            found.append({"loc": [*loc, "messages"], "msg": message})
    else:
        reason = _destination_problem(task.url)
        if reason:
            found.append({"loc": [*loc, "url"], "msg": reason})
    return found


def _destination_problem(url: str) -> str | None:
    """Early 422 for a URL that can never pass the egress guard (its scheme or form).
    Addresses are checked at every call, on the IP actually connected to."""
    try:
        check_url(url)
    except EgressDenied as exc:
        return f"not an allowed destination: {exc.reason}"
    except ValueError as exc:
        return f"not a valid URL: {exc}"
    return None
