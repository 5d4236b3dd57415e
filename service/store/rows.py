"""Values the store hands out and takes, and pure helpers over rows."""

from __future__ import annotations

import base64
import json
import math
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from .. import aggregate as agg
from ..errors import InvalidSpec, NotFound
from ..spec import (
    ErrorView,
    JobStatus,
    JobView,
    LaneView,
    ResultView,
    SectioningSpec,
    Usage,
    VotingSpec,
    lane_task,
)

TERMINAL_JOB = ("succeeded", "failed", "cancelled")
OPEN_JOB = ("queued", "running", "aggregating")
FINAL_EVENTS = frozenset({"job.succeeded", "job.failed", "job.cancelled"})


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def new_job_id(now: float) -> str:
    """A UUID whose leading bits are the creation time, so ids sort by age."""
    bits = (int(now * 1000) << 80) | uuid.uuid4().int & ((1 << 80) - 1)
    return str(uuid.UUID(int=bits))


@dataclass(frozen=True)
class Claim:
    """A lane attempt this process now holds the lease on."""

    job_id: str
    idx: int
    name: str
    attempt: int
    spec: VotingSpec | SectioningSpec
    deadline_at: float | None
    waited_s: float = 0.0  # from claimable to claimed


@dataclass(frozen=True)
class Claimed:
    """What a claim took, and whether it left claimable lanes behind: lanes that a
    job's cap, a provider's limit, the batch size or another process kept from it."""

    claims: list[Claim]
    held_back: bool


@dataclass(frozen=True)
class Outcome:
    """How one attempt ended, as the runner reports it."""

    job_id: str
    idx: int
    attempt: int
    kind: str  # succeeded | failed | timed_out | retry
    output: Any = None
    error_type: str | None = None
    error_message: str | None = None
    retry_in: float = 0.0
    usage: tuple[int, int, int] = (0, 0, 0)
    started_at: float = 0.0
    finished_at: float = 0.0


@dataclass
class Recorded:
    """What a recording transaction leaves for the runner to do."""

    rejected: int = 0
    reduce_jobs: list[str] = field(default_factory=list)


def provider_of(claim: Claim) -> str:
    """The provider a lane calls (``http`` for http tasks), for capacity accounting."""
    return task_provider(lane_task(claim.spec, claim.idx)[1])


def task_provider(task: Any) -> str:
    return str(task.provider) if getattr(task, "kind", "") == "llm" else "http"


def gate_patterns(spec: VotingSpec | SectioningSpec) -> dict[int, str]:
    if not isinstance(spec, SectioningSpec):
        return {}
    return {i: s.gate.block_if for i, s in enumerate(spec.sections) if s.gate is not None}


def answer_for(
    spec: VotingSpec | SectioningSpec, idx: int, gates: dict[int, str], output: Any
) -> Any:
    """A gate lane's verdict, or the vote/score the aggregate reads from the output."""
    if idx in gates:
        return "blocked" if re.search(gates[idx], agg.output_text(output)) else "passed"
    return agg.lane_answer(spec.aggregate, output)


def gate_blocks(result: agg.LaneResult) -> bool:
    """Fail closed: a gate blocks unless it ran and passed."""
    return not (result.succeeded and result.answer == "passed")


def usage_of(row: Any) -> Usage:
    return Usage(
        prompt_tokens=row["prompt_tokens"],
        completion_tokens=row["completion_tokens"],
        total_tokens=row["total_tokens"],
    )


def known_form(job_id: str) -> None:
    """Job ids are UUIDs: anything else is no job (and never reaches the database)."""
    try:
        if str(uuid.UUID(job_id)) == job_id:
            return
    except ValueError:
        pass
    raise NotFound(f"no job {job_id[:64]!r}")


def key_reused() -> InvalidSpec:
    return InvalidSpec(
        [
            {
                "loc": ["header", "Idempotency-Key"],
                "msg": "this key was already used with a different request body",
            }
        ]
    )


def encode_cursor(created_at: float, job_id: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([created_at, job_id]).encode()).decode()


def decode_cursor(cursor: str) -> tuple[float, str]:
    """The (created_at, id) a cursor names; anything else, whatever it decodes to (text
    that is not Unicode, an infinite time, deep nesting), is no cursor of ours."""
    try:
        created_at, job_id = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        created = float(created_at)
        if math.isfinite(created) and str(uuid.UUID(job_id)) == job_id:
            return created, job_id
    except (ValueError, TypeError, AttributeError, RecursionError):
        pass
    raise InvalidSpec([{"loc": ["query", "cursor"], "msg": "not a cursor this server gave out"}])


def job_view(job: Any, lane_rows: Sequence[Any]) -> JobView:
    progress: dict[str, int] = {}
    lane_views = []
    for row in lane_rows:
        progress[row["status"]] = progress.get(row["status"], 0) + 1
        error = None
        if row["error_type"] is not None and row["status"] != "succeeded":
            error = ErrorView(type=row["error_type"], message=row["error_message"] or "")
        duration = None
        if row["started_at"] is not None and row["finished_at"] is not None:
            duration = round(row["finished_at"] - row["started_at"], 4)
        lane_views.append(
            LaneView(
                index=row["idx"],
                name=row["name"],
                status=row["status"],
                attempts=row["attempts"],
                output=row["output"],
                answer=json.loads(row["answer_key"]) if row["answer_key"] is not None else None,
                error=error,
                usage=usage_of(row),
                queued_at=iso(row["queued_at"]),
                started_at=iso(row["started_at"]),
                finished_at=iso(row["finished_at"]),
                duration_s=duration,
            )
        )
    status = JobStatus(job["status"])
    result = None
    if job["result"] is not None and status is JobStatus.SUCCEEDED:
        result = ResultView(**job["result"])
    error = ErrorView(**job["error"]) if job["error"] is not None else None
    return JobView(
        id=job["id"],
        status=status,
        mode=job["mode"],
        spec=job["spec"],
        created_at=iso(job["created_at"]) or "",
        started_at=iso(job["started_at"]),
        finished_at=iso(job["finished_at"]),
        progress=progress,
        lanes=lane_views,
        result=result,
        error=error,
        usage=usage_of(job),
        metadata=job["spec"].get("metadata", {}),
    )
