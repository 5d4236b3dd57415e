"""The one vocabulary: statuses of jobs, lanes and webhooks, event types, error types.

Everything that reads or writes a status, an event or an error type spells it from
here (the values are the strings stored and sent: these are ``StrEnum`` members,
equal to those strings). Job and lane lifecycles::

    job:   queued → running → aggregating → succeeded | failed | cancelled
    lane:  queued → running → succeeded | failed | timed_out | cancelled | skipped
                  ↖ retry ↙  (waiting to retry: queued, with attempts > 0)
"""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    AGGREGATING = "aggregating"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_JOB


# Lanes still to run or running: outcomes are recorded, decisions made.
DECIDING_JOB = (JobStatus.QUEUED, JobStatus.RUNNING)
OPEN_JOB = (JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.AGGREGATING)
TERMINAL_JOB = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


class LaneStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"
    SKIPPED = "skipped"

    @property
    def terminal(self) -> bool:
        return self not in OPEN_LANE


OPEN_LANE = (LaneStatus.QUEUED, LaneStatus.RUNNING)
# Ended with no output: these make a result partial (skipped lanes do not).
ENDED_WITHOUT_RESULT = (LaneStatus.FAILED, LaneStatus.TIMED_OUT, LaneStatus.CANCELLED)


class WebhookStatus(StrEnum):
    WAITING = "waiting"  # the job has not finished (shown on the job, never stored)
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


class EventType(StrEnum):
    JOB_QUEUED = "job.queued"
    JOB_RUNNING = "job.running"
    JOB_AGGREGATING = "job.aggregating"
    JOB_SUCCEEDED = "job.succeeded"
    JOB_FAILED = "job.failed"
    JOB_CANCELLED = "job.cancelled"
    LANE_STARTED = "lane.started"
    LANE_RETRYING = "lane.retrying"
    LANE_SUCCEEDED = "lane.succeeded"
    LANE_FAILED = "lane.failed"
    LANE_TIMED_OUT = "lane.timed_out"
    LANE_CANCELLED = "lane.cancelled"
    LANE_SKIPPED = "lane.skipped"
    LANE_DELTA = "lane.delta"  # live only: never stored, never replayed
    # The reducer's or judge's call, once the lanes are done (``kind``: reduce, judge).
    AGGREGATE_STARTED = "aggregate.started"
    AGGREGATE_RETRYING = "aggregate.retrying"
    AGGREGATE_SUCCEEDED = "aggregate.succeeded"
    AGGREGATE_FAILED = "aggregate.failed"
    AGGREGATE_DELTA = "aggregate.delta"  # live only, like lane.delta


# The event of a job entering each status.
JOB_EVENT = {
    JobStatus.QUEUED: EventType.JOB_QUEUED,
    JobStatus.RUNNING: EventType.JOB_RUNNING,
    JobStatus.AGGREGATING: EventType.JOB_AGGREGATING,
    JobStatus.SUCCEEDED: EventType.JOB_SUCCEEDED,
    JobStatus.FAILED: EventType.JOB_FAILED,
    JobStatus.CANCELLED: EventType.JOB_CANCELLED,
}
# The job's last event: the stream closes after it.
FINAL_EVENT = {status: JOB_EVENT[status] for status in TERMINAL_JOB}
FINAL_EVENTS = frozenset(FINAL_EVENT.values())
# The event of a lane that ended with this status.
LANE_ENDED = {
    LaneStatus.SUCCEEDED: EventType.LANE_SUCCEEDED,
    LaneStatus.FAILED: EventType.LANE_FAILED,
    LaneStatus.TIMED_OUT: EventType.LANE_TIMED_OUT,
    LaneStatus.CANCELLED: EventType.LANE_CANCELLED,
    LaneStatus.SKIPPED: EventType.LANE_SKIPPED,
}
# Events that end a lane another way than its own answer: a running attempt is stopped.
LANE_STOPPED = frozenset(
    {EventType.LANE_SKIPPED, EventType.LANE_CANCELLED, EventType.LANE_TIMED_OUT}
)


class ErrorType(StrEnum):
    """Why a lane, the reducer or a job ended without a result."""

    # An attempt's own failure.
    TIMEOUT = "timeout"
    UPSTREAM_ERROR = "upstream_error"
    RATE_LIMITED = "rate_limited"
    INVALID_RESPONSE = "invalid_response"
    EGRESS_DENIED = "egress_denied"
    INTERNAL_ERROR = "internal_error"
    # A lane's attempt whose worker went away.
    LEASE_LOST = "lease_lost"
    # A decision about the job.
    CANCELLED = "cancelled"
    BUDGET = "budget"
    DEADLINE = "deadline"
    LANE_FAILED = "lane_failed"
    QUORUM = "quorum"
    NO_RESULTS = "no_results"
    NO_ANSWER = "no_answer"
