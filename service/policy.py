"""What a job does next, decided from a tally of its lanes. Pure: no I/O.

The store calls :func:`decide` in the same transaction that records lane outcomes
(and when a deadline passes), and applies the decision there, so a decision and the
state it was made on are always consistent, whichever process made it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .spec import MajorityAggregate, OnFailure, SectioningSpec, VotingSpec, on_failure, quorum_size

OPEN = ("queued", "running")
ENDED_WITHOUT_RESULT = ("failed", "timed_out", "cancelled")


@dataclass(frozen=True)
class Tally:
    """Counts of a job's lanes, as the store read them in the deciding transaction."""

    total: int
    by_status: dict[str, int]
    # (answer key, votes, first lane index) of succeeded lanes that voted.
    votes: list[tuple[str, int, int]] = field(default_factory=list)
    # The first gate section (in lane order) that blocks: matched, or ended without result.
    gate_blocked: str | None = None
    # (lane name, error type, message) of the first lane that ended without a result.
    first_failure: tuple[str, str, str] | None = None

    def count(self, *statuses: str) -> int:
        return sum(self.by_status.get(s, 0) for s in statuses)


@dataclass(frozen=True)
class Stop:
    """End lanes that are still open: ``statuses`` of them get ``status``."""

    statuses: tuple[str, ...]
    status: str
    error_type: str | None
    message: str | None


@dataclass(frozen=True)
class Decision:
    stops: tuple[Stop, ...] = ()
    # None: keep going. "aggregate": every lane is (or is now made) terminal.
    # "fail": the job fails with ``error``.
    outcome: str | None = None
    error: dict[str, str] | None = None
    partial: bool = False


def decide(
    spec: VotingSpec | SectioningSpec,
    tally: Tally,
    *,
    deadline_passed: bool = False,
    budget_spent: bool = False,
) -> Decision:
    policy = on_failure(spec)
    queued, running = tally.count("queued"), tally.count("running")
    succeeded = tally.count("succeeded")
    ended_badly = tally.count(*ENDED_WITHOUT_RESULT)
    stops: list[Stop] = []

    def stop_open(status: str, error_type: str | None, message: str | None) -> None:
        nonlocal queued, running, ended_badly
        if queued or running:
            stops.append(Stop(OPEN, status, error_type, message))
            if status != "skipped":
                ended_badly += queued + running
            queued = running = 0

    def fail(error_type: str, message: str) -> Decision:
        stop_open("cancelled", "cancelled", f"job failed: {message}")
        return Decision(tuple(stops), "fail", {"type": error_type, "message": message})

    budget_stopped = budget_spent and queued > 0
    if budget_stopped:
        stops.append(Stop(("queued",), "cancelled", "budget", "the job's token budget is spent"))
        ended_badly += queued
        queued = 0

    if tally.gate_blocked is not None:
        stop_open("cancelled", "cancelled", f"gate {tally.gate_blocked!r} blocked the job")
        return Decision(tuple(stops), "aggregate")

    if policy is OnFailure.FAIL_FAST and ended_badly:
        if tally.first_failure is not None:
            name, error_type, message = tally.first_failure
            return fail(
                "lane_failed", f"lane {name!r} ended without a result: {error_type}: {message}"
            )
        if budget_stopped:
            return fail("budget", "the token budget was spent before every lane ran")
        return fail("lane_failed", "a lane ended without a result")

    need = quorum_size(spec)
    if policy is OnFailure.QUORUM and succeeded + queued + running < need:
        return fail("quorum", f"{succeeded} lanes succeeded, fewer than the quorum of {need}")

    if deadline_passed and (queued or running):
        stop_open("timed_out", "timeout", "the job's deadline passed")
        if policy is OnFailure.FAIL_FAST:
            return fail("deadline", "the job's deadline passed before every lane finished")

    if (
        isinstance(spec.aggregate, MajorityAggregate)
        and spec.aggregate.early_stop
        and (queued or running)
        and tally.votes
        and (policy is not OnFailure.QUORUM or succeeded >= need)
    ):
        ranked = sorted(tally.votes, key=lambda v: (-v[1], v[2]))
        leader = ranked[0][1]
        runner_up = ranked[1][1] if len(ranked) > 1 else 0
        # Strictly ahead even if every open lane votes for the runner-up.
        if leader > runner_up + queued + running:
            stop_open("skipped", None, None)

    if queued or running:
        return Decision(tuple(stops))

    if succeeded == 0:
        return Decision(
            tuple(stops), "fail", {"type": "no_results", "message": "no lane succeeded"}
        )
    if policy is OnFailure.QUORUM and succeeded < need:
        return Decision(
            tuple(stops),
            "fail",
            {"type": "quorum", "message": f"{succeeded} lanes succeeded, fewer than {need}"},
        )
    return Decision(tuple(stops), "aggregate", partial=ended_badly > 0)
