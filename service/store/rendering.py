"""Rows as the views callers read (:mod:`service.views`)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from ..states import JobStatus, LaneStatus
from ..views import ErrorView, JobSummary, JobView, LaneView, ResultView, Usage


def iso(ts: float | None) -> str | None:
    return None if ts is None else _iso(ts)


# A job's lanes share their times and usages (queued together, started by one claim,
# ended by one batch, the same tokens an answer): each is made once for a 10,000-lane
# view, not once a lane. (Usage is frozen: one model may serve many views.)
@lru_cache(maxsize=4096)
def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


_usage = lru_cache(maxsize=4096)(Usage.of)


def usage_of(row: Mapping[Any, Any]) -> Usage:
    return _usage(
        row["prompt_tokens"],
        row["completion_tokens"],
        row["total_tokens"],
        row["reasoning_tokens"],
        row["cached_tokens"],
        row["cost_usd"],
    )


def lane_view(row: Mapping[Any, Any], tasks: int = 0) -> LaneView:
    """A lane as callers see it; ``tasks``: how many tasks a mixed ensemble has."""
    error = None
    if row["error_type"] is not None and row["status"] != LaneStatus.SUCCEEDED:
        error = ErrorView(type=row["error_type"], message=row["error_message"] or "")
    duration = None
    if row["started_at"] is not None and row["finished_at"] is not None:
        duration = round(row["finished_at"] - row["started_at"], 4)
    reply = row["reply"] or {}
    return LaneView(
        index=row["idx"],
        name=row["name"],
        status=row["status"],
        attempts=row["attempts"],
        output=row["output"],
        answer=json.loads(row["answer_key"]) if row["answer_key"] is not None else None,
        weight=row["weight"],
        note=row["note"],
        task=row["idx"] % tasks if tasks else None,
        finish_reason=reply.get("finish_reason"),
        tool_calls=reply.get("tool_calls"),
        refusal=reply.get("refusal"),
        logprobs=reply.get("logprobs"),
        error=error,
        usage=usage_of(row),
        queued_at=iso(row["queued_at"]),
        started_at=iso(row["started_at"]),
        finished_at=iso(row["finished_at"]),
        duration_s=duration,
    )


def progress_of(lane_rows: Sequence[Mapping[Any, Any]]) -> dict[str, int]:
    """Lanes per status, counted from every lane row of a job."""
    return dict(Counter(row["status"] for row in lane_rows))


def result_of(job: Mapping[Any, Any]) -> ResultView | None:
    if job["result"] is None or job["status"] != JobStatus.SUCCEEDED:
        return None
    return ResultView(**job["result"])


def error_of(job: Mapping[Any, Any]) -> ErrorView | None:
    return ErrorView(**job["error"]) if job["error"] is not None else None


def job_view(
    job: Mapping[Any, Any], lane_rows: Sequence[Mapping[Any, Any]], progress: dict[str, int]
) -> JobView:
    """The job with ``lane_rows`` as its lanes (all of them, or none) and ``progress``,
    its lanes per status (all of them, always)."""
    return JobView(
        id=job["id"],
        status=JobStatus(job["status"]),
        mode=job["mode"],
        spec=job["spec"],
        created_at=iso(job["created_at"]) or "",
        started_at=iso(job["started_at"]),
        finished_at=iso(job["finished_at"]),
        progress=progress,
        lanes=[lane_view(row, len(job["spec"].get("tasks") or ())) for row in lane_rows],
        result=result_of(job),
        error=error_of(job),
        usage=usage_of(job),
        metadata=job["spec"].get("metadata", {}),
    )


def job_summary(
    job: Mapping[Any, Any], progress: dict[str, int], *, with_result: bool = False
) -> JobSummary:
    """The job in a list; ``with_result``: with its result or error, if it has one."""
    return JobSummary(
        id=job["id"],
        status=job["status"],
        mode=job["mode"],
        created_at=iso(job["created_at"]) or "",
        finished_at=iso(job["finished_at"]),
        progress=progress,
        usage=usage_of(job),
        metadata=job["spec"].get("metadata", {}),
        result=result_of(job) if with_result else None,
        error=error_of(job) if with_result else None,
    )
