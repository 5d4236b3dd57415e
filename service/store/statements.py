"""Hot statements, built once: SQLAlchemy then reuses their cache keys and compiled SQL."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import (
    BigInteger,
    Executable,
    Float,
    Insert,
    Integer,
    String,
    Table,
    Text,
    bindparam,
    case,
    cast,
    column,
    exists,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.dialects import postgresql

from ..states import (
    DECIDING_JOB,
    ENDED_WITHOUT_RESULT,
    OPEN_JOB,
    OPEN_LANE,
    TERMINAL_JOB,
    JobStatus,
    LaneStatus,
)
from ..views import NO_USAGE
from .direct import direct
from .tables import events, jobs, lanes, providers

BUMP_SEQ = (
    update(jobs)
    .where(jobs.c.id == bindparam("job_id"))
    .values(last_seq=jobs.c.last_seq + bindparam("count"))
    .returning(jobs.c.last_seq)
)
SET_LAST_SEQ = update(jobs).where(jobs.c.id == bindparam("j")).values(last_seq=bindparam("seq"))
INSERT_EVENTS = insert(events)
INSERT_JOB = insert(jobs)
INSERT_LANES = insert(lanes)
IN_FLIGHT = select(func.count()).where(
    jobs.c.tenant == bindparam("tenant"), jobs.c.status.in_(OPEN_JOB)
)
# A new job (the columns it is created with), stored only while its tenant has fewer
# than ``cap`` jobs open: the tenant's count and the insert in one statement, one round
# trip less for every job. No row inserted: the tenant is at its cap.
NEW_JOB_COLUMNS = (
    "id",
    "tenant",
    "status",
    "mode",
    "spec",
    "lanes_total",
    "created_at",
    "deadline_at",
    "max_concurrency",
    *NO_USAGE.model_dump(),
    "started_at",
    "last_seq",
    "reduce_attempts",
)
INSERT_JOB_WITHIN_CAP = insert(jobs).from_select(
    NEW_JOB_COLUMNS,
    select(*(bindparam(name, type_=jobs.c[name].type) for name in NEW_JOB_COLUMNS)).where(
        IN_FLIGHT.scalar_subquery() < bindparam("cap")
    ),
)
# Open jobs: their tenant, cap and age, their lanes ready to start now (counted up to
# ``limit``, the most a claim gives: the rest changes no share) and running. What a
# claim shares out (lanes running in a job with nothing ready still count for its
# tenant). Each count reads the job's own lanes on the (status, job) index, not every
# lane of a 10,000-item map at each claim.
_ready_up_to_limit = (
    select(func.count())
    .select_from(
        select(lanes.c.idx)
        .where(
            lanes.c.job_id == jobs.c.id,
            lanes.c.status == LaneStatus.QUEUED,
            lanes.c.available_at <= bindparam("now"),
        )
        .limit(bindparam("limit"))
        .correlate(jobs)
        .subquery()
    )
    .scalar_subquery()
)
_running_now = (
    select(func.count())
    .where(lanes.c.job_id == jobs.c.id, lanes.c.status == LaneStatus.RUNNING)
    .scalar_subquery()
)
RUNNABLE = select(
    jobs.c.id,
    jobs.c.tenant,
    jobs.c.created_at,
    jobs.c.max_concurrency,
    _ready_up_to_limit,
    _running_now,
).where(jobs.c.status.in_((JobStatus.QUEUED, JobStatus.RUNNING)))
# The lanes ready to start of the jobs a claim takes from, each job's in the order they
# became ready, numbered (the claim takes each job's first k).
_ready_lanes = (
    select(
        lanes.c.job_id,
        lanes.c.idx,
        lanes.c.provider,
        func.row_number()
        .over(partition_by=lanes.c.job_id, order_by=(lanes.c.available_at, lanes.c.idx))
        .label("r"),
    )
    .where(
        lanes.c.job_id.in_(bindparam("jobs", expanding=True)),
        lanes.c.status == LaneStatus.QUEUED,
        lanes.c.available_at <= bindparam("now"),
    )
    .subquery()
)
READY_LANES = (
    select(_ready_lanes.c.job_id, _ready_lanes.c.idx, _ready_lanes.c.provider)
    .where(_ready_lanes.c.r <= bindparam("k"))
    .order_by(_ready_lanes.c.job_id, _ready_lanes.c.r)
)
# The same of one job, read in the index's order and no further than its first k (where
# READY_LANES numbers every ready lane of its jobs: all 9,000 of a big map's, each claim).
READY_LANES_OF_JOB = (
    select(lanes.c.job_id, lanes.c.idx, lanes.c.provider)
    .where(
        lanes.c.job_id == bindparam("job"),
        lanes.c.status == LaneStatus.QUEUED,
        lanes.c.available_at <= bindparam("now"),
    )
    .order_by(lanes.c.available_at, lanes.c.idx)
    .limit(bindparam("k"))
)
# The lanes a claim admitted that are still queued, of its locked jobs (more than those
# when the jobs' indexes differ: the claim picks its own); then each one's lease.
CLAIMABLE = select(
    lanes.c.job_id, lanes.c.idx, lanes.c.name, lanes.c.attempts, lanes.c.available_at
).where(
    lanes.c.job_id.in_(bindparam("jobs", expanding=True)),
    lanes.c.idx.in_(bindparam("idxs", expanding=True)),
    lanes.c.status == LaneStatus.QUEUED,
)


def _leased() -> dict[str, Any]:
    """A claimed lane's new values: running under ``owner``'s lease until ``expires``,
    one more attempt, started ``now`` unless it had started before."""
    return {
        "status": LaneStatus.RUNNING,
        "attempts": lanes.c.attempts + 1,
        "started_at": func.coalesce(lanes.c.started_at, bindparam("now")),
        "lease_owner": bindparam("owner"),
        "lease_expires_at": bindparam("expires"),
    }


# (Bound names must differ from the updated table's columns: "j", not "job_id".)
CLAIM_LANE = (
    update(lanes)
    .where(lanes.c.job_id == bindparam("j"), lanes.c.idx == bindparam("i"))
    .values(**_leased())
)
# PostgreSQL: the lanes named by two arrays (job ids, indexes) that are still queued,
# leased in one statement that returns them (CLAIMABLE and CLAIM_LANE make two, and
# run the update once a lane).
_claimed = (
    func.unnest(
        bindparam("job_ids", type_=postgresql.ARRAY(String)),
        bindparam("idxs", type_=postgresql.ARRAY(Integer)),
    )
    .table_valued("j", "i")
    .render_derived(name="wanted")
)
CLAIM_LANES_RETURNING = (
    update(lanes)
    .where(
        lanes.c.job_id == _claimed.c.j,
        lanes.c.idx == _claimed.c.i,
        lanes.c.status == LaneStatus.QUEUED,
    )
    .values(**_leased())
    .returning(lanes.c.job_id, lanes.c.idx, lanes.c.name, lanes.c.attempts, lanes.c.available_at)
)
RESERVE_TOKENS = (
    update(lanes)
    .where(lanes.c.job_id == bindparam("j"), lanes.c.idx == bindparam("i"))
    .values(reserved_tokens=bindparam("r"))
)
START_JOB = (
    update(jobs)
    .where(jobs.c.id == bindparam("j"))
    .values(status=JobStatus.RUNNING, started_at=bindparam("now"))
)
JOB_STATUS = select(jobs.c.status).where(jobs.c.id == bindparam("job_id"))
TENANT_JOB_STATUS = JOB_STATUS.where(jobs.c.tenant == bindparam("tenant"))
# What a page of a job's lanes needs of the job: its tenant, and a mixed ensemble's
# tasks (lane i ran task i % len), not the whole spec (a map job's holds every item).
JOB_TASKS = select(jobs.c.tenant, jobs.c.spec["tasks"].label("tasks")).where(
    jobs.c.id == bindparam("job_id")
)
# The data as stored text (a stream sends it as it is): json is kept as written.
EVENTS_AFTER = (
    select(events.c.seq, events.c.type, cast(events.c.data, Text).label("data"))
    .where(events.c.job_id == bindparam("job_id"), events.c.seq > bindparam("after"))
    .order_by(events.c.seq)
    .limit(bindparam("limit"))
)


def _bound(name: str) -> Any:
    return bindparam(name, type_=Float) if name == "cost" else bindparam(name)


def _plus_usage(table: Any, added: Callable[[str], Any] = _bound) -> dict[str, Any]:
    """Values adding a usage (p, c, t, r, k and cost: bound, or ``added``'s columns) to
    a row's counts. A null cost (no prices) leaves the row's as it is: null stays null,
    never 0."""
    cost = added("cost")
    return {
        "prompt_tokens": table.c.prompt_tokens + added("p"),
        "completion_tokens": table.c.completion_tokens + added("c"),
        "total_tokens": table.c.total_tokens + added("t"),
        "reasoning_tokens": table.c.reasoning_tokens + added("r"),
        "cached_tokens": table.c.cached_tokens + added("k"),
        "cost_usd": case(
            (cost.is_(None), table.c.cost_usd), else_=func.coalesce(table.c.cost_usd, 0.0) + cost
        ),
    }


# The usage _plus_usage adds, by bound name, as arrays bind it (see _unnest).
_ADDED = {**dict.fromkeys("pctrk", BigInteger()), "cost": Float()}


def _unnest(types: dict[str, Any], name: str) -> Any:
    """PostgreSQL: rows bound as one array a column (each bound by the column's name),
    read back as the table ``name`` by ``unnest``. The arrays' strings have no length
    (a cast to ``varchar(n)[]`` would cut a longer value where storing it fails)."""
    unbounded = {c: String() if isinstance(t, String) else t for c, t in types.items()}
    return (
        func.unnest(*(bindparam(c, type_=postgresql.ARRAY(t)) for c, t in unbounded.items()))
        .table_valued(*(column(c, t) for c, t in unbounded.items()))
        .render_derived(name=name, with_types=False)
    )


# What recording an outcome sets on its lane, bound by these names (beside the usage).
_OUTCOME = (
    "status",
    "output",
    "reply",
    "answer_key",
    "weight",
    "note",
    "error_type",
    "error_message",
    "finished_at",
    "recorded_at",
    "available_at",
    "lease_owner",
)
_RECORDED = {"lease_expires_at": None, "reserved_tokens": 0}
OUTCOME_UPDATE = (
    update(lanes)
    .where(lanes.c.job_id == bindparam("j"), lanes.c.idx == bindparam("i"))
    .values(**{name: bindparam(name) for name in _OUTCOME}, **_RECORDED, **_plus_usage(lanes))
)


def _unnest_prefixed(types: dict[str, Any], name: str, prefix: str) -> Callable[[str], Any]:
    """:func:`_unnest` with ``prefix`` in front of each parameter's name; the column
    of each (by its name without the prefix)."""
    rows = _unnest({prefix + column: t for column, t in types.items()}, name)
    return lambda column: rows.c[prefix + column]


def _outcomes_update(prefix: str = "") -> Any:
    """OUTCOMES_UPDATE, its parameters named with ``prefix`` in front."""
    types = {
        "j": lanes.c.job_id.type,
        "i": lanes.c.idx.type,
        **{name: lanes.c[name].type for name in _OUTCOME},
        **_ADDED,
    }
    bound = _unnest_prefixed(types, "o", prefix)
    return (
        update(lanes)
        .where(lanes.c.job_id == bound("j"), lanes.c.idx == bound("i"))
        .values(
            **{name: bound(name) for name in _OUTCOME},
            **_RECORDED,
            **_plus_usage(lanes, bound),
        )
    )


# PostgreSQL: the same for every outcome at once, each parameter bound to an array (one
# element a lane), read back as rows by ``unnest``: one statement, where OUTCOME_UPDATE
# runs once a lane (executemany).
OUTCOMES_UPDATE = _outcomes_update()
# An answer that came after its lane was stopped (or re-run): its tokens count, on the
# lane and its job; the lane keeps its status and output.
LATE_USAGE = (
    update(lanes)
    .where(lanes.c.job_id == bindparam("j"), lanes.c.idx == bindparam("i"))
    .values(**_plus_usage(lanes))
)

# --- deciding and recording (every recorded batch runs these) -------------------------

# A job's row as deciding reads it: everything but its spec (a big map's is megabytes;
# parsed specs are cached, SpecCache.load).
JOB_STATE = [column for column in jobs.c if column.name != "spec"]
LOCK_JOBS = (
    select(*JOB_STATE).where(jobs.c.id.in_(bindparam("ids", expanding=True))).order_by(jobs.c.id)
)
JOB_SPEC = select(jobs.c.spec).where(jobs.c.id == bindparam("job_id"))
# A job's row as the API shows it (any tenant's, or only the tenant's), and its lanes.
JOB = select(jobs).where(jobs.c.id == bindparam("job_id"))
TENANTS_JOB = JOB.where(jobs.c.tenant == bindparam("tenant"))
JOB_LANES = select(lanes).where(lanes.c.job_id == bindparam("job_id")).order_by(lanes.c.idx)
LOCK_JOBS_FOR_UPDATE = LOCK_JOBS.with_for_update()
LOCK_JOBS_SKIP_LOCKED = LOCK_JOBS.with_for_update(skip_locked=True)
# The lanes of a batch's outcomes, in one read: the jobs' lanes at any of the outcomes'
# indexes (more than the outcomes' own lanes when jobs' indexes differ: the caller
# picks its own).
LANES_RECORDED = select(
    lanes.c.job_id,
    lanes.c.idx,
    lanes.c.status,
    lanes.c.attempts,
    lanes.c.lease_owner,
    lanes.c.name,
    lanes.c.provider,
    lanes.c.reserved_tokens,
).where(
    lanes.c.job_id.in_(bindparam("jobs", expanding=True)),
    lanes.c.idx.in_(bindparam("idxs", expanding=True)),
)
ADD_JOB_USAGE = update(jobs).where(jobs.c.id == bindparam("j")).values(**_plus_usage(jobs))


def _jobs_usage_update(prefix: str = "") -> Any:
    """ADD_JOBS_USAGE, its parameters named with ``prefix`` in front."""
    bound = _unnest_prefixed({"j": jobs.c.id.type, **_ADDED}, "u", prefix)
    return update(jobs).where(jobs.c.id == bound("j")).values(**_plus_usage(jobs, bound))


# PostgreSQL: ADD_JOB_USAGE for several jobs at once, its parameters bound as arrays.
ADD_JOBS_USAGE = _jobs_usage_update()
# PostgreSQL: OUTCOMES_UPDATE and ADD_JOBS_USAGE in one statement (a data-modifying CTE):
# a recording's lanes and its jobs' usage in one round trip, where they took two. Their
# parameters have ``l`` and ``u`` in front (``lj``, ``lstatus``..., ``uj``, ``up``...):
# named like a column of either table, SQLAlchemy would set that column from them.
OUTCOMES_AND_USAGE_UPDATE = _outcomes_update("l").add_cte(_jobs_usage_update("u").cte("used"))
# What the decisions of a batch's majority jobs count, in one read: each job's lanes by status
# and answer (its lanes per status; a majority's votes are its succeeded lanes'
# answers). ``jobs``: a list.
TALLY = (
    select(
        lanes.c.job_id,
        lanes.c.status,
        lanes.c.answer_key,
        func.sum(func.coalesce(lanes.c.weight, 1.0)),
        func.count(),
        func.min(lanes.c.idx),
    )
    .where(lanes.c.job_id.in_(bindparam("jobs", expanding=True)))
    .group_by(lanes.c.job_id, lanes.c.status, lanes.c.answer_key)
)
# Whether each job has a lane open, and one that ended without succeeding: two probes
# of the (status, job) index a job, where STATUS_COUNTS counts every one of its lanes.
OPEN_AND_UNSUCCESSFUL = select(
    jobs.c.id,
    exists().where(lanes.c.job_id == jobs.c.id, lanes.c.status.in_(OPEN_LANE)).label("open"),
    exists()
    .where(
        lanes.c.job_id == jobs.c.id,
        lanes.c.status.in_((*ENDED_WITHOUT_RESULT, LaneStatus.SKIPPED)),
    )
    .label("unsuccessful"),
).where(jobs.c.id.in_(bindparam("jobs", expanding=True)))
# Lanes by status of jobs whose decision reads no votes, from the (status, job) index
# (every status named, so that the index serves it: one probe a status and job).
STATUS_COUNTS = (
    select(lanes.c.job_id, lanes.c.status, func.count())
    .where(
        lanes.c.status.in_(tuple(LaneStatus)),
        lanes.c.job_id.in_(bindparam("jobs", expanding=True)),
    )
    .group_by(lanes.c.job_id, lanes.c.status)
)
# A job's counted votes: its succeeded lanes with an answer, gates aside (TALLY reads
# them with the statuses when the job has no gate).
_COUNTED_VOTES = (
    lanes.c.job_id == bindparam("j"),
    lanes.c.status == LaneStatus.SUCCEEDED,
    lanes.c.answer_key.is_not(None),
    lanes.c.idx.not_in(bindparam("gates", expanding=True)),
)
TALLY_VOTES = (
    select(
        lanes.c.answer_key,
        func.sum(func.coalesce(lanes.c.weight, 1.0)),
        func.count(),
        func.min(lanes.c.idx),
    )
    .where(*_COUNTED_VOTES)
    .group_by(lanes.c.answer_key)
)
FIRST_FAILURE = (
    select(lanes.c.name, lanes.c.error_type, lanes.c.error_message)
    .where(lanes.c.job_id == bindparam("j"), lanes.c.status.in_(ENDED_WITHOUT_RESULT))
    .order_by(lanes.c.finished_at, lanes.c.idx)
    .limit(1)
)
# The counted votes in the order they were recorded (the window rule reads them).
VOTE_SEQUENCE = (
    select(lanes.c.answer_key)
    .where(*_COUNTED_VOTES)
    .order_by(lanes.c.recorded_at, lanes.c.finished_at, lanes.c.idx)
)
# A per-item map's votes, by item: item i's lanes are i*n .. i*n + n - 1.
_ITEM = (lanes.c.idx // bindparam("n", type_=Integer)).label("item")  # floor division
# The lanes of the items a batch touched: [from, to) on the (job, idx) key.
_ITEM_RANGE = (lanes.c.idx >= bindparam("from"), lanes.c.idx < bindparam("to"))
ITEM_STATUSES = (
    select(_ITEM, lanes.c.status, func.count())
    .where(lanes.c.job_id == bindparam("j"), *_ITEM_RANGE)
    .group_by(_ITEM, lanes.c.status)
)
ITEM_VOTES = (
    select(
        _ITEM,
        lanes.c.answer_key,
        func.sum(func.coalesce(lanes.c.weight, 1.0)),
        func.count(),
        func.min(lanes.c.idx),
    )
    .where(*_COUNTED_VOTES, *_ITEM_RANGE)
    .group_by(_ITEM, lanes.c.answer_key)
)
ITEM_SEQUENCE = (
    select(_ITEM, lanes.c.answer_key)
    .where(*_COUNTED_VOTES, *_ITEM_RANGE)
    .order_by(lanes.c.recorded_at, lanes.c.finished_at, lanes.c.idx)
)
# Every lane of the jobs, in lane order, as aggregation reads them. ``jobs``: a list.
LANE_RESULTS = (
    select(
        lanes.c.job_id,
        lanes.c.idx,
        lanes.c.name,
        lanes.c.status,
        lanes.c.output,
        lanes.c.answer_key,
        lanes.c.weight,
        lanes.c.error_type,
        lanes.c.error_message,
    )
    .where(lanes.c.job_id.in_(bindparam("jobs", expanding=True)))
    .order_by(lanes.c.job_id, lanes.c.idx)
)
STOP_LANES = (
    update(lanes)
    .where(
        lanes.c.job_id == bindparam("j"),
        lanes.c.status.in_(bindparam("statuses", expanding=True)),
        lanes.c.idx >= bindparam("from"),
        lanes.c.idx < bindparam("to"),
    )
    .values(
        status=bindparam("status"),
        error_type=bindparam("error_type"),
        error_message=bindparam("message"),
        finished_at=bindparam("now"),
        lease_owner=None,
        lease_expires_at=None,
    )
    .returning(lanes.c.idx, lanes.c.name, lanes.c.attempts)
)
# A job's end, written once (fenced on its open status), and what its final event and
# webhook need back: its usage and spec. FINISH_JOBS: PostgreSQL, several jobs at once
# (the ends a recorded batch decided), the parameters bound as arrays, each job's id
# returned with the rest.
_FINISHED = (
    jobs.c.prompt_tokens,
    jobs.c.completion_tokens,
    jobs.c.total_tokens,
    jobs.c.reasoning_tokens,
    jobs.c.cached_tokens,
    jobs.c.cost_usd,
    jobs.c.spec,
)


def _finishing(ended: Callable[[str], Any], job: Any) -> Any:
    return (
        update(jobs)
        .where(jobs.c.id == job, jobs.c.status.not_in(TERMINAL_JOB))
        .values(
            **{name: ended(name) for name in ("status", "result", "error")},
            finished_at=bindparam("now"),
            lease_owner=None,
        )
    )


FINISH_JOB = _finishing(bindparam, bindparam("j")).returning(*_FINISHED)
_end = _unnest(
    {
        "j": jobs.c.id.type,
        "status": jobs.c.status.type,
        "result": jobs.c.result.type,
        "error": jobs.c.error.type,
    },
    "e",
)
FINISH_JOBS = _finishing(_end.c.__getitem__, _end.c.j).returning(jobs.c.id, *_FINISHED)
# The jobs with a lane whose lease expired before ``now`` (the lease sweep's first read).
LEASES_EXPIRED = (
    select(lanes.c.job_id)
    .where(lanes.c.status == LaneStatus.RUNNING, lanes.c.lease_expires_at < bindparam("now"))
    .distinct()
)
# The housekeeper's other periodic reads: the open jobs whose deadline passed by
# ``now``; when the earliest queued lane becomes claimable (retries wait for their
# backoff); when the earliest reducer attempt not leased to anyone becomes due.
DEADLINES_PASSED = select(jobs.c.id).where(
    jobs.c.status.in_(DECIDING_JOB), jobs.c.deadline_at <= bindparam("now")
)
NEXT_QUEUED_AT = select(func.min(lanes.c.available_at)).where(lanes.c.status == LaneStatus.QUEUED)
NEXT_REDUCER_AT = select(func.min(jobs.c.reduce_available_at)).where(
    jobs.c.status == JobStatus.AGGREGATING, jobs.c.lease_owner.is_(None)
)
# A claim without contention: the first lanes ready to start, if they are all it needs.
READY_FIRST = (
    select(lanes.c.job_id, lanes.c.idx, lanes.c.provider)
    .where(lanes.c.status == LaneStatus.QUEUED, lanes.c.available_at <= bindparam("now"))
    .order_by(lanes.c.available_at, lanes.c.job_id, lanes.c.idx)
    .limit(bindparam("limit"))
)


def _running_by(column: Any, values: str) -> Any:
    """Lanes running, counted by ``column``, of the list bound as ``values``."""
    return (
        select(column, func.count())
        .where(column.in_(bindparam(values, expanding=True)), lanes.c.status == LaneStatus.RUNNING)
        .group_by(column)
    )


RUNNING_COUNTS = _running_by(lanes.c.job_id, "ids")
# Providers as a claim or a settlement reads them: those with limits locked (PostgreSQL),
# with their lanes running; and every pause still on.
PROVIDERS = (
    select(providers)
    .where(providers.c.name.in_(bindparam("names", expanding=True)))
    .order_by(providers.c.name)
)
PROVIDERS_FOR_UPDATE = PROVIDERS.with_for_update()
PROVIDERS_RUNNING = _running_by(lanes.c.provider, "names")
PROVIDERS_PAUSED = select(providers.c.name, providers.c.paused_until).where(
    providers.c.name.in_(bindparam("names", expanding=True)),
    providers.c.paused_until > bindparam("now"),
)


_ROW_INSERTS = {events.name: INSERT_EVENTS, lanes.name: INSERT_LANES}
_ARRAY_INSERTS: dict[tuple[str, tuple[str, ...]], Insert] = {}


def array_insert(table: Table, names: tuple[str, ...]) -> Insert:
    """PostgreSQL: rows of ``table`` inserted in one statement, each column ``names``
    bound to an array of its values (one element a row) read back by ``unnest``: a
    statement whose shape does not vary with the number of rows, where an executemany
    runs one execution a row. Made once per table and names, run direct."""
    key = (table.name, names)
    statement = _ARRAY_INSERTS.get(key)
    if statement is None:
        values = _unnest({name: table.c[name].type for name in names}, "v")
        statement = direct(insert(table).from_select(list(names), select(*values.c)))
        _ARRAY_INSERTS[key] = statement
    return statement


def columns(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Rows (each with the same keys) as one list of values a key: the parameters of a
    statement bound as arrays (OUTCOMES_UPDATE, FINISH_JOBS...)."""
    return {name: [row[name] for row in rows] for name in rows[0]}


def executing(
    one_a_row: Any, as_arrays: Any, rows: list[dict[str, Any]], *, arrays: bool
) -> tuple[Any, Any]:
    """The statement and parameters that run ``one_a_row`` for each of ``rows``: with
    ``arrays`` (PostgreSQL) and several rows, ``as_arrays`` once (the same statement,
    its parameters bound as arrays); else ``one_a_row`` for every row (executemany)."""
    if arrays and len(rows) > 1:
        return as_arrays, columns(rows)
    return one_a_row, rows


def inserting(table: Table, rows: list[dict[str, Any]], *, arrays: bool) -> tuple[Any, Any]:
    """:func:`executing` of the INSERT of ``rows`` into ``table`` (the array form:
    :func:`array_insert`, made for the rows' columns when first needed)."""
    if arrays and len(rows) > 1:
        return array_insert(table, tuple(rows[0])), columns(rows)
    return _ROW_INSERTS[table.name], rows


# PostgreSQL: the last write of a transaction that appended events, in one round trip
# (where it took two or three): the events, the new last numbers of the jobs it locked
# (CLOSE_MOVED only), and the notifications announcing them, which PostgreSQL sends
# on commit. Data-modifying CTEs all run, whatever the main query reads; the inserts'
# foreign keys are checked at the statement's end.
_EVENT_COLUMNS = ("job_id", "seq", "type", "data")  # the rows of EventLog._insert
_notes = _unnest({"channel": Text(), "payload": Text()}, "n")
_moved = _unnest({"moved_j": jobs.c.id.type, "moved_seq": jobs.c.last_seq.type}, "m")
CLOSE = select(func.pg_notify(_notes.c.channel, _notes.c.payload)).add_cte(
    array_insert(events, _EVENT_COLUMNS).cte("e")
)
CLOSE_MOVED = CLOSE.add_cte(
    update(jobs).where(jobs.c.id == _moved.c.moved_j).values(last_seq=_moved.c.moved_seq).cte("s")
)


# Every statement built here runs on the driver's connection (:mod:`.direct`).
for _name, _statement in list(globals().items()):
    if isinstance(_statement, Executable) and not _name.startswith("_"):
        direct(_statement)

del _name, _statement
