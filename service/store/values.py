"""The values the store takes from the runner and hands back to it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from ..aggregate import LaneResult, Tree
from ..spec import HttpTask, JobSpec, LlmTask
from ..states import ErrorType, LaneStatus
from ..views import NO_USAGE, Usage


@dataclass(frozen=True, slots=True)
class Claim:
    """A lane attempt this process now holds the lease on."""

    job_id: str
    idx: int
    name: str
    attempt_no: int
    spec: JobSpec
    task: LlmTask | HttpTask  # what the lane runs (lane_task of the spec, made once)
    deadline_at: float | None
    waited_s: float = 0.0  # from claimable to claimed


class Starter(Protocol):
    """A runner that starts a new job's lanes as the job is stored, in the transaction
    that stores it (no claim of their own), as ``owner`` on their leases."""

    owner: str

    def reserve(self, wanted: int) -> int:
        """Hold up to ``wanted`` slots for the new job's lanes (how many; 0: none
        free)."""
        ...

    def release(self, reserved: int, claims: list[Claim]) -> None:
        """The transaction is over: the slots go back and ``claims`` start (none when
        it rolled back)."""
        ...


@dataclass(frozen=True, slots=True)
class Claimed:
    """What a claim took, and whether it left claimable lanes behind: lanes that a
    job's cap, a provider's limit, the batch size or another process kept from it.
    ``next_check``: when a provider that deferred lanes (its rate, a 429's pause) may
    take them (epoch seconds; None: when a lane ends). ``contended``: some of those
    were of jobs another transaction held (PostgreSQL), which may let go at any time."""

    claims: list[Claim]
    held_back: bool
    next_check: float | None = None
    contended: bool = False


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one attempt ended, as the runner reports it: the lane's new ``status``
    (``queued`` again: a retry after ``retry_in`` seconds)."""

    job_id: str
    idx: int
    attempt_no: int
    status: LaneStatus
    output: Any = None
    reply: dict[str, Any] | None = None  # an llm answer's finish reason, tool calls...
    error_type: ErrorType | None = None
    error_message: str | None = None
    retry_in: float = 0.0
    retry_after: float | None = None  # the provider's Retry-After: pauses it for all
    usage: Usage = NO_USAGE
    started_at: float = 0.0
    finished_at: float = 0.0


@dataclass
class Recorded:
    """What a recording transaction leaves for the runner to do."""

    rejected: int = 0
    requeued: int = 0  # lanes queued again (a lost lease with attempts left)
    # Jobs that now wait for their reducer.
    reduce_jobs: list[str] = field(default_factory=list)
    # What the transaction claimed for the slots its outcomes freed (``record``'s
    # ``claim``): lanes to start now that it committed.
    claimed: Claimed | None = None


@dataclass(frozen=True, slots=True)
class ReductionClaim:
    """A reducer attempt this process now holds the job's lease for: attempt
    ``attempt_no`` over ``lanes`` (every lane, in order; what the fan-in reads is
    :func:`~service.aggregate.fan_in` of them); ``budget_spent``: the job's tokens or
    cost leave it nothing to run on."""

    job_id: str
    attempt_no: int
    spec: JobSpec
    lanes: list[LaneResult]
    budget_spent: bool
    partial: bool = False  # lanes ended without a result: so will the result say
    tree: Tree = field(default_factory=Tree)  # a hierarchical reduce's progress
    # A map's item judges so far: item index -> the candidate named (from 1; 0: none).
    judged: dict[int, int] = field(default_factory=dict)
