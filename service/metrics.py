"""Prometheus metrics and one structured log line per job state change.

Counted where the work happens: :func:`observe_commit` sees only this process's
own commits (not events relayed from other replicas), so summing the series of
every process counts each job and lane once.
"""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from .states import FINAL_EVENTS, LANE_ENDED
from .views import Usage

log = logging.getLogger("fanout.jobs")

_LANE_ENDED = frozenset(LANE_ENDED.values())
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)


class Metrics:
    """One registry per app, so tests (and several apps in one process) stay apart."""

    def __init__(self) -> None:
        self._children: dict[tuple[Any, ...], Any] = {}
        self.registry = CollectorRegistry()
        r = self.registry
        self.jobs = Counter(
            "fanout_jobs", "Jobs that ended, by final state", ["status"], registry=r
        )
        self.lanes = Counter(
            "fanout_lanes", "Lanes that ended, by final state", ["status"], registry=r
        )
        self.attempt_seconds = Histogram(
            "fanout_attempt_seconds",
            "Duration of one lane attempt",
            ["provider", "model", "outcome"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.retries = Counter(
            "fanout_retries", "Attempts that will be retried, by reason", ["reason"], registry=r
        )
        self.tokens = Counter(
            "fanout_tokens",
            "Tokens the providers reported, by kind: prompt and completion; reasoning (part"
            " of completion) and cached (part of prompt)",
            ["provider", "model", "kind"],
            registry=r,
        )
        self.cost = Counter(
            "fanout_cost_usd",
            "Cost of the answers, where prices are configured",
            ["provider", "model"],
            registry=r,
        )
        self.queue_wait = Histogram(
            "fanout_queue_wait_seconds",
            "Time a lane waited between becoming claimable and being claimed",
            buckets=(0.001, 0.01, 0.05, 0.1, 0.5, 1, 5, 30, 120),
            registry=r,
        )
        self.rejected_writes = Counter(
            "fanout_rejected_writes", "Late lane writes of a worker that lost its lease", registry=r
        )
        self.inflight = Gauge(
            "fanout_lanes_in_flight", "Lane attempts running in this process", registry=r
        )
        self.stream_clients = Gauge(
            "fanout_stream_clients", "Open event streams in this process", registry=r
        )

    def observe_commit(self, events: list[dict[str, Any]]) -> None:
        """Count final states and log job state changes (lane ones at DEBUG)."""
        for event in events:
            kind: str = event["type"]
            group, _, state = kind.partition(".")
            if group == "job":
                if kind in FINAL_EVENTS:
                    self._child(self.jobs, state).inc()
                log.info(
                    kind, extra={"job_id": event["job_id"], "seq": event["seq"], "event": kind}
                )
            elif group == "lane":
                if kind in _LANE_ENDED:
                    self._child(self.lanes, state).inc()
                if log.isEnabledFor(logging.DEBUG):
                    log.debug(
                        kind,
                        extra={
                            "job_id": event["job_id"],
                            "lane": event["data"].get("lane"),
                            "event": kind,
                        },
                    )

    def observe_attempt(
        self, provider: str, model: str, seconds: float, outcome: str, usage: Usage
    ) -> None:
        self._child(self.attempt_seconds, provider, model, outcome).observe(seconds)
        self.observe_usage(provider, model, usage)

    def observe_usage(self, provider: str, model: str, usage: Usage) -> None:
        """An answer's tokens (and cost): every answer a provider sent is counted once,
        whatever became of its lane, as the job's usage counts it."""
        for kind in ("prompt", "completion", "reasoning", "cached"):
            count = getattr(usage, f"{kind}_tokens")
            if count:
                self._child(self.tokens, provider, model, kind).inc(count)
        if usage.cost_usd:
            self._child(self.cost, provider, model).inc(usage.cost_usd)

    def _child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, looked up once (every lane's attempt counts in a
        few: prometheus_client checks and locks on each lookup)."""
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def render(self) -> bytes:
        return generate_latest(self.registry)
