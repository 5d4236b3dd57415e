"""Every query Fanout makes, behind one object: :class:`Store`.

Locking order, so two processes on PostgreSQL never deadlock: a write transaction
locks the job rows it touches first (sorted by id), then their lanes. Every lane
write made on behalf of a running attempt is fenced by (status, attempt, lease
owner): a worker that lost its lease cannot overwrite what another one recorded.

The one object is built in layers, one module each, every layer using only those
below it::

    jobs.Store           the API side: create, read, list, cancel; the event log
    queue.LaneQueue      the lanes table as the queue: claim, leases, requeue
    decisions.DecisionStore  record outcomes, decide jobs, the reducer, deadlines
    webhooks.WebhookStore    the webhook outbox
    base.StoreBase       the database, the spec cache, appending events, job locks

``rows`` holds the values the store hands out and pure helpers over rows;
``statements`` the hot statements, built once.
"""

from .jobs import Store
from .rows import (
    FINAL_EVENTS,
    OPEN_JOB,
    TERMINAL_JOB,
    Claim,
    Claimed,
    Outcome,
    Recorded,
    iso,
    job_view,
    new_job_id,
    provider_of,
)

__all__ = [
    "FINAL_EVENTS",
    "OPEN_JOB",
    "TERMINAL_JOB",
    "Claim",
    "Claimed",
    "Outcome",
    "Recorded",
    "Store",
    "iso",
    "job_view",
    "new_job_id",
    "provider_of",
]
