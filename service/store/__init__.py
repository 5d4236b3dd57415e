"""SQL and transactions only: every query Fanout makes, behind one :class:`Store` of
parts, each given what it uses.

::

    Store ─┬─ jobs        create, read, list, cancel                  (the routes)
           ├─ log         a job's events: append in a transaction, read after k
           ├─ queue       the lanes table as the queue: claim, leases, requeue
           ├─ outcomes    record a batch of attempt outcomes, decide (and claim for
           │              the slots it freed: queue.claim_in); deadlines
           ├─ reductions  the reducer's durable attempts
           └─ outbox      the webhook outbox                           (the runner)
    decisions   decide a job and carry it out (used by outcomes, reductions, jobs)
    providers   providers' limits for the cluster (used by queue and outcomes)

One transaction per method, opened only here. Locking order, so two processes on
PostgreSQL never deadlock: a write transaction locks the job rows it touches first
(sorted by id), then their lanes. Every lane write made on behalf of a running
attempt is fenced by (status, attempt, lease owner): a worker that lost its lease
cannot overwrite what another one recorded. A job's end is written exactly once.

``tables`` are the tables, ``statements`` the hot statements (built once), ``db`` the
engines and the transaction boundary, ``values`` what the runner hands in and gets
back, ``rendering`` rows as views.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..config import Provider
from .db import Database, Tx
from .decisions import Decisions
from .eventlog import EventLog
from .jobrows import SpecCache
from .jobs import Jobs
from .outbox import WebhookOutbox
from .outcomes import Outcomes
from .providers import ProviderGate
from .queue import LaneQueue
from .reductions import Reductions
from .values import Claim, Claimed, Outcome, Recorded, ReductionClaim, Starter


class Store:
    """The facade the routes (``jobs``, ``log``) and the runner (the rest) use."""

    def __init__(
        self,
        db: Database,
        *,
        lease_seconds: float,
        providers: Mapping[str, Provider] | None = None,
        weights: Mapping[str, float] | None = None,
    ) -> None:
        """``providers``: their limits (for the cluster); ``weights``: tenants' shares."""
        self.db = db
        specs = SpecCache()
        gate = ProviderGate(providers or {})
        self.log = EventLog(db)
        self.outbox = WebhookOutbox(db, lease_seconds=lease_seconds)
        decisions = Decisions(self.log, self.outbox)
        self.queue = LaneQueue(
            db, self.log, specs, gate, lease_seconds=lease_seconds, weights=weights
        )
        self.jobs = Jobs(db, self.log, specs, decisions, self.outbox, self.queue)
        self.outcomes = Outcomes(db, specs, decisions, gate, self.queue)
        self.reductions = Reductions(db, self.log, specs, decisions, lease_seconds=lease_seconds)


__all__ = [
    "Claim",
    "Claimed",
    "Database",
    "Outcome",
    "Recorded",
    "ReductionClaim",
    "Starter",
    "Store",
    "Tx",
]
