"""What happens next, decided from values. Pure: no I/O.

- :func:`next_step`: after one attempt, the lane ends (succeeded, failed, timed out) or
  is queued again after a backoff. The reducer's attempts and lost leases go through it.
- :func:`backoff`: the one jittered exponential backoff (lanes, the reducer, webhook
  deliveries, the notification listener's reconnects).
- :func:`fair_share`: which jobs a claim takes lanes from, so that a small job is not
  queued behind a large one, nor one tenant behind another.
- :func:`tokens_to_reserve`: what a call may cost of its provider's tokens a minute.
- :func:`decide`: what a job does next, from a tally of its lanes. The store calls it
  in the same transaction that records lane outcomes (and when a deadline passes) and
  applies the decision there, so a decision and the state it was made on are always
  consistent, whichever process made it.
"""

from __future__ import annotations

import heapq
import json
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .aggregate import gates
from .attempts import Attempt
from .spec import (
    JobSpec,
    LlmTask,
    MajorityAggregate,
    MapSpec,
    OnFailure,
    Policy,
    StopRule,
    lane_count,
    on_failure,
    quorum_size,
)
from .states import ENDED_WITHOUT_RESULT, OPEN_LANE, ErrorType, LaneStatus

# --- retrying ------------------------------------------------------------------------


def backoff(
    attempt_no: int,
    base_s: float,
    max_s: float,
    retry_after: float | None = None,
    *,
    uniform: Callable[[float, float], float] = random.uniform,
) -> float:
    """Seconds to wait after failed attempt ``attempt_no`` (1, 2, ...): half to all of
    ``base_s * 2**(attempt_no - 1)``, at most ``max_s``, never sooner than
    ``retry_after`` (a ``Retry-After`` the other side sent).

    The jitter spreads the retries of lanes that failed together (a 429 storm) so they
    do not come back together.
    """
    ceiling = min(max_s, base_s * 2 ** (attempt_no - 1))
    return max(uniform(ceiling / 2, ceiling), retry_after or 0.0)


@dataclass(frozen=True, slots=True)
class Retrying:
    """The backoff's parameters (``FANOUT_RETRY_BASE_S``, ``FANOUT_RETRY_MAX_S``)."""

    base_s: float = 0.5
    max_s: float = 30.0

    def delay(self, attempt_no: int, retry_after: float | None = None) -> float:
        return backoff(attempt_no, self.base_s, self.max_s, retry_after)


@dataclass(frozen=True, slots=True)
class Step:
    """What follows an attempt: the lane ends with ``status``, or, when ``status`` is
    ``queued``, it waits ``retry_in`` seconds for its next attempt."""

    status: LaneStatus
    retry_in: float = 0.0

    @property
    def retry(self) -> bool:
        return self.status is LaneStatus.QUEUED


def next_step(attempt: Attempt, attempt_no: int, max_attempts: int, retrying: Retrying) -> Step:
    """Only transient failures are retried, and only while attempts are left."""
    if attempt.ok:
        return Step(LaneStatus.SUCCEEDED)
    if attempt.transient and attempt_no < max_attempts:
        return Step(LaneStatus.QUEUED, retrying.delay(attempt_no, attempt.retry_after))
    if attempt.error_type is ErrorType.TIMEOUT:
        return Step(LaneStatus.TIMED_OUT)
    return Step(LaneStatus.FAILED)


# --- sharing the capacity -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Runnable:
    """An open job as a claim sees it: lanes ready to start now (queued, their time
    come), lanes running, and its own cap (``max_concurrency``)."""

    job_id: str
    tenant: str
    created_at: float
    ready: int
    running: int
    cap: int | None = None

    def room(self, given: int) -> bool:
        """Whether one more lane may start, ``given`` having been given already."""
        if given >= self.ready:
            return False
        return self.cap is None or self.running + given < self.cap


def fair_share(
    jobs: Sequence[Runnable], slots: int, weights: Mapping[str, float] | None = None
) -> list[tuple[str, int]]:
    """How many of the next ``slots`` lanes each job gets, in the order it got its first.

    Slots go one at a time to the tenant with the fewest lanes in flight for its weight
    (lanes running plus those given in this claim, divided by the tenant's weight, 1 by
    default), and within the tenant to its job with the fewest; ties go to the older
    tenant (by its oldest open job) and the older job. So a tenant's five-lane job
    posted behind another tenant's thousand lanes gets the next free slots, and a
    tenant's small job gets slots beside its own large one. ``jobs`` holds every open
    job (those with nothing ready count for their tenant's lanes in flight).
    """
    weights = weights or {}
    load: dict[str, float] = {}
    oldest: dict[str, float] = {}
    queues: dict[str, list[tuple[int, float, str]]] = {}
    by_id = {job.job_id: job for job in jobs}
    for job in jobs:
        load[job.tenant] = load.get(job.tenant, 0) + job.running
        oldest[job.tenant] = min(oldest.get(job.tenant, job.created_at), job.created_at)
        if job.room(0):
            queues.setdefault(job.tenant, []).append((job.running, job.created_at, job.job_id))
    tenants: list[tuple[float, float, str]] = []
    for tenant, queue in queues.items():
        heapq.heapify(queue)
        tenants.append((load[tenant] / weights.get(tenant, 1.0), oldest[tenant], tenant))
    heapq.heapify(tenants)
    given: dict[str, int] = {}
    for _ in range(slots):
        if not tenants:
            break
        _load, _oldest, tenant = heapq.heappop(tenants)
        queue = queues[tenant]
        in_flight, created_at, job_id = heapq.heappop(queue)
        given[job_id] = given.get(job_id, 0) + 1
        if by_id[job_id].room(given[job_id]):
            heapq.heappush(queue, (in_flight + 1, created_at, job_id))
        load[tenant] += 1
        if queue:
            heapq.heappush(
                tenants, (load[tenant] / weights.get(tenant, 1.0), oldest[tenant], tenant)
            )
    return list(given.items())


def budget_spent(policy: Policy, total_tokens: int, cost_usd: float | None) -> bool:
    """Whether a job has spent its budget (``max_total_tokens``, ``max_cost_usd``): then
    no new attempt starts."""
    if policy.max_total_tokens is not None and total_tokens >= policy.max_total_tokens:
        return True
    return policy.max_cost_usd is not None and (cost_usd or 0.0) >= policy.max_cost_usd


def tokens_to_reserve(task: LlmTask, default_completion: int) -> int:
    """The tokens a call may use, reserved of its provider's tokens a minute before it
    starts (and settled with what it used when it ends): its prompt, estimated at four
    characters a token, plus the completion it allows (``max_completion_tokens`` or
    ``max_tokens``, or the provider's default)."""
    chars = sum(len(str(message.content)) for message in task.messages)
    completion = task.max_completion_tokens or task.max_tokens or default_completion
    return chars // 4 + 4 * len(task.messages) + completion


# --- deciding a job ------------------------------------------------------------------


@dataclass(frozen=True)
class Tally:
    """Counts of a job's lanes, as the store read them in the deciding transaction."""

    total: int
    by_status: dict[str, int]
    # (answer key, votes, first lane index) of succeeded lanes that voted; votes are
    # weights summed (1 a lane unless the vote is weighted).
    votes: list[tuple[str, float, int]] = field(default_factory=list)
    # The first gate section (in lane order) that blocks: matched, or ended without result.
    gate_blocked: str | None = None
    # (lane name, error type, message) of the first lane that ended without a result.
    first_failure: tuple[str, str, str] | None = None
    # The answer keys of the counted votes, in the order they were recorded (read for
    # the window rule only).
    sequence: list[str] = field(default_factory=list)
    counted: int = 0  # lanes that voted (not weighted)
    # A per-item map's votes: each item's own tally (its lanes' statuses and votes).
    items: dict[int, Tally] = field(default_factory=dict)

    def count(self, *statuses: str) -> int:
        return sum(self.by_status.get(s, 0) for s in statuses)


@dataclass(frozen=True)
class VoteState:
    """A vote after a decision: its stopping rule, the votes counted so far, the leading
    answer (its key), the posterior confidence that it is the majority answer, and
    whether the rule stopped the vote."""

    rule: str
    counted: int
    leader: str | None
    confidence: float
    stopped: bool = False

    def view(self, spec: JobSpec) -> dict[str, Any]:
        """As details and events show it: its rule, whether the rule stopped the vote,
        after how many counted votes of how many lanes, and the leader's confidence."""
        return {
            "rule": self.rule,
            "stopped": self.stopped,
            "votes": self.counted,
            "of": lane_count(spec),
            "leader": json.loads(self.leader) if self.leader is not None else None,
            "confidence": round(self.confidence, 4),
        }


def leader_confidence(leader: float, runner_up: float) -> float:
    """The probability that the leader's answer is the more likely of the top two, under
    a uniform prior: with ``x``, the leader's share of the two, ~ Beta(leader + 1,
    runner_up + 1), P(x > 1/2). The stopping criterion of Adaptive-Consistency (Aggarwal
    et al., "Let's Sample Step by Step", EMNLP 2023), in its Beta form."""
    return 1.0 - regularized_beta(0.5, leader + 1.0, runner_up + 1.0)


def regularized_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b), the regularized incomplete beta function (by its continued fraction,
    as in Numerical Recipes); real ``a`` and ``b``, so weighted votes count too."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_fraction(x, a, b) / a
    return 1.0 - front * _beta_fraction(1.0 - x, b, a) / b


def _beta_fraction(x: float, a: float, b: float) -> float:
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-12:
            break
    return h


def vote_state(rule: StopRule, tally: Tally, open_lanes: int) -> VoteState:
    """Where a vote stands, and whether its stopping rule ends it now (open lanes left).
    A lane's weight is at most 1, so ``decided`` holds whatever the open lanes answer."""
    ranked = sorted(tally.votes, key=lambda vote: (-vote[1], vote[2]))
    leader = ranked[0][1] if ranked else 0.0
    runner_up = ranked[1][1] if len(ranked) > 1 else 0.0
    confidence = leader_confidence(leader, runner_up)
    state = VoteState(rule.rule, tally.counted, ranked[0][0] if ranked else None, confidence)
    if not ranked or not open_lanes or tally.counted < (rule.min_votes or 1):
        return state
    if rule.rule == "decided":
        stopped = leader > runner_up + open_lanes
    elif rule.rule == "ahead_by":
        stopped = leader - runner_up >= (rule.k or 1)
    elif rule.rule == "window":
        size = rule.size or 2
        window = tally.sequence[-size:]
        stopped = len(window) == size and len(set(window)) == 1
    elif rule.rule == "confidence":
        stopped = confidence >= (rule.confidence or 1.0)
    else:
        stopped = False
    return replace(state, stopped=stopped)


# The rules a vote's running lanes may meet by themselves (the window rule reads the
# order of the votes, which no best case orders).
COUNTING_RULES = ("decided", "ahead_by", "confidence")


def running_may_stop(rule: StopRule, tally: Tally, starting: int = 0) -> bool:
    """Whether the vote's lanes running now, and ``starting`` queued ones a claim takes
    with them, could stop it by themselves: the best case, each of them a vote (of
    weight 1) for the leader, with its other queued lanes still open. Then the claim
    takes none of those until they answer: each would be a call that the stop may leave
    unneeded, paid for and cut short."""
    running = tally.count(LaneStatus.RUNNING) + starting
    queued = tally.count(LaneStatus.QUEUED) - starting
    if not running or not queued or rule.rule not in COUNTING_RULES:
        return False
    ranked = sorted(tally.votes, key=lambda vote: (-vote[1], vote[2]))
    key, weight, first = ranked[0] if ranked else ("", 0.0, 0)
    best = replace(
        tally,
        votes=[(key, weight + running, first), *ranked[1:]],
        counted=tally.counted + running,
    )
    return vote_state(rule, best, queued).stopped


@dataclass(frozen=True)
class Stop:
    """End lanes that are still open: those in ``statuses`` get ``status``."""

    statuses: tuple[LaneStatus, ...]
    status: LaneStatus
    error_type: ErrorType | None
    message: str | None
    # Lane indexes [from, to): a per-item map's item; None: every lane.
    lanes: tuple[int, int] | None = None


@dataclass(frozen=True)
class Decision:
    stops: tuple[Stop, ...] = ()
    # None: keep going. "aggregate": every lane is (or is now made) terminal.
    # "fail": the job fails with ``error``.
    outcome: str | None = None
    error: dict[str, str] | None = None
    partial: bool = False
    # A majority's vote after this decision: what it reports, not what it decides, so
    # two decisions that act alike are equal whatever their vote state.
    vote: VoteState | None = field(default=None, compare=False)


def vote_rule(spec: JobSpec) -> StopRule | None:
    """The stopping rule of a job whose decision reads its votes with its lanes'
    statuses: a majority without gates. None for any other job."""
    aggregate = getattr(spec, "aggregate", None)
    if isinstance(aggregate, MajorityAggregate) and not gates(spec):
        return aggregate.stop_rule
    return None


def item_vote_rule(spec: JobSpec) -> tuple[StopRule, int] | None:
    """The stopping rule of each item's vote in a per-item map of majorities, and its
    ``n``. None for any other job."""
    per_item = spec.per_item if isinstance(spec, MapSpec) else None
    if per_item is not None and isinstance(per_item.aggregate, MajorityAggregate):
        return per_item.aggregate.stop_rule, per_item.n
    return None


def stops_lanes_alone(spec: JobSpec) -> bool:
    """Whether a decision may stop some of a job's running lanes while the job goes on
    starting others: an item of a per-item majority that is settled (:func:`decide`).
    Every other stop ends the job, or only its queued lanes."""
    return item_vote_rule(spec) is not None


def undecided_while_open(spec: JobSpec, lanes_total: int) -> bool:
    """Whether :func:`decide` does nothing for the job (no stop, no end, no vote to
    report) for as long as one of its lanes is open, every lane that ended succeeded,
    its budget is not spent and its deadline has not passed. So it is without a gate
    (a section that passed may block the job), a majority (its votes may stop it) or
    a per-item majority, and with a quorum its lanes can reach. Such a job's decision
    needs no count of its lanes until then: only whether one is open and none ended
    otherwise, which the store reads where it would count a 10,000-item map's lanes."""
    if gates(spec) or vote_rule(spec) is not None or item_vote_rule(spec) is not None:
        return False
    if isinstance(spec, MapSpec) and spec.per_item is not None:
        return True  # its lanes are votes, best effort (its items' quorum is concluded)
    return on_failure(spec) is not OnFailure.QUORUM or quorum_size(spec) <= lanes_total


def decide(
    spec: JobSpec,
    tally: Tally,
    *,
    deadline_passed: bool = False,
    budget_spent: bool = False,
) -> Decision:
    # A per-item map's failure policy is about its items: the job concludes on them
    # (:func:`service.aggregate.conclude`); its lanes are votes, best effort.
    per_item = spec.per_item if isinstance(spec, MapSpec) else None
    policy = on_failure(spec) if per_item is None else OnFailure.BEST_EFFORT
    queued, running = tally.count(LaneStatus.QUEUED), tally.count(LaneStatus.RUNNING)
    succeeded = tally.count(LaneStatus.SUCCEEDED)
    ended_badly = tally.count(*ENDED_WITHOUT_RESULT)
    stops: list[Stop] = []

    def stop_open(status: LaneStatus, error_type: ErrorType | None, message: str | None) -> None:
        nonlocal queued, running, ended_badly
        if queued or running:
            stops.append(Stop(OPEN_LANE, status, error_type, message))
            if status is not LaneStatus.SKIPPED:
                ended_badly += queued + running
            queued = running = 0

    def fail(error_type: ErrorType, message: str) -> Decision:
        stop_open(LaneStatus.CANCELLED, ErrorType.CANCELLED, f"job failed: {message}")
        return Decision(tuple(stops), "fail", {"type": error_type, "message": message})

    budget_stopped = budget_spent and queued > 0
    if budget_stopped:
        stops.append(
            Stop(
                (LaneStatus.QUEUED,),
                LaneStatus.CANCELLED,
                ErrorType.BUDGET,
                "the job's budget is spent",
            )
        )
        ended_badly += queued
        queued = 0

    if tally.gate_blocked is not None:
        stop_open(
            LaneStatus.CANCELLED,
            ErrorType.CANCELLED,
            f"gate {tally.gate_blocked!r} blocked the job",
        )
        return Decision(tuple(stops), "aggregate", partial=ended_badly > 0)

    if policy is OnFailure.FAIL_FAST and ended_badly:
        if tally.first_failure is not None:
            name, error_type, message = tally.first_failure
            return fail(
                ErrorType.LANE_FAILED,
                f"lane {name!r} ended without a result: {error_type}: {message}",
            )
        if budget_stopped:
            return fail(ErrorType.BUDGET, "the budget was spent before every lane ran")
        return fail(ErrorType.LANE_FAILED, "a lane ended without a result")

    need = quorum_size(spec)
    if policy is OnFailure.QUORUM and succeeded + queued + running < need:
        return fail(
            ErrorType.QUORUM, f"{succeeded} lanes succeeded, fewer than the quorum of {need}"
        )

    if deadline_passed and (queued or running):
        stop_open(LaneStatus.TIMED_OUT, ErrorType.TIMEOUT, "the job's deadline passed")
        if policy is OnFailure.FAIL_FAST:
            return fail(ErrorType.DEADLINE, "the job's deadline passed before every lane finished")

    vote = None
    if isinstance(spec.aggregate, MajorityAggregate):
        vote = vote_state(spec.aggregate.stop_rule, tally, queued + running)
        # A quorum job is never stopped below its quorum.
        if vote.stopped and (policy is not OnFailure.QUORUM or succeeded >= need):
            stop_open(LaneStatus.SKIPPED, None, None)
        else:
            vote = replace(vote, stopped=False)

    item_rule = item_vote_rule(spec)
    if item_rule is not None:
        rule, n = item_rule
        for item, votes in sorted(tally.items.items()):
            open_lanes = votes.count(LaneStatus.QUEUED, LaneStatus.RUNNING)
            may_stop = open_lanes and (queued or running)
            if may_stop and vote_state(rule, votes, open_lanes).stopped:
                first = item * n
                stops.append(Stop(OPEN_LANE, LaneStatus.SKIPPED, None, None, (first, first + n)))
                queued = max(0, queued - votes.count(LaneStatus.QUEUED))
                running = max(0, running - votes.count(LaneStatus.RUNNING))

    if queued or running:
        return Decision(tuple(stops), vote=vote)

    if succeeded == 0:
        error = {"type": ErrorType.NO_RESULTS, "message": "no lane succeeded"}
        return Decision(tuple(stops), "fail", error, vote=vote)
    if policy is OnFailure.QUORUM and succeeded < need:
        message = f"{succeeded} lanes succeeded, fewer than {need}"
        return Decision(
            tuple(stops), "fail", {"type": ErrorType.QUORUM, "message": message}, vote=vote
        )
    return Decision(tuple(stops), "aggregate", partial=ended_badly > 0, vote=vote)
