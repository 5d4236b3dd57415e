"""Providers' limits for the whole cluster: ``max_concurrency``, ``rpm`` and ``tpm`` of
the providers file hold across every process, and a 429's ``Retry-After`` pauses its
provider for all of them.

The shared state is rows: ``lanes.provider`` (a limited provider's lanes in flight are
counted, never kept as a counter that could drift) and one ``providers`` row per
provider with its request and token buckets and the end of its pause. A claim that
admits lanes to a limited provider locks that provider's row (``FOR UPDATE``, in name
order, after the jobs it claims from), so two processes never both take its last
slot; everything else reads the rows unlocked. Tokens a minute are reserved at claim
(:func:`service.policy.tokens_to_reserve`) and settled when the attempt's outcome is
recorded, with what the provider reported.

Lock order: jobs (sorted), then providers (sorted), then lanes of the locked jobs;
recording locks providers last.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from ..config import Provider
from ..policy import tokens_to_reserve
from ..rates import TokenBucket
from ..spec import HttpTask, LlmTask
from .db import Tx
from .statements import PROVIDERS, PROVIDERS_FOR_UPDATE, PROVIDERS_PAUSED, PROVIDERS_RUNNING
from .tables import providers

# Reserved for a call that sets no max_tokens, when its provider sets no reserve_tokens.
DEFAULT_RESERVE_TOKENS = 1000


@dataclass
class _State:
    """One provider's row, as this transaction holds it."""

    limits: Provider
    in_flight: int = 0
    paused_until: float | None = None
    requests: TokenBucket | None = None
    tokens: TokenBucket | None = None
    changed: bool = False


@dataclass
class Admission:
    """The providers of one claim: which lanes may start now, and when to look again
    for those that may not. Bucket levels are written back by :meth:`ProviderGate.close`."""

    now: float
    states: dict[str, _State] = field(default_factory=dict)
    paused: dict[str, float] = field(default_factory=dict)
    next_check: float | None = None

    def admit(self, provider: str, task: LlmTask | HttpTask) -> int | None:
        """The tokens reserved for a call to ``provider`` admitted now (0 when it
        reserves none), or None: it must wait."""
        until = self.paused.get(provider)
        if until is not None and until > self.now:
            self._later(until)
            return None
        state = self.states.get(provider)
        if state is None:
            return 0
        limits = state.limits
        if limits.max_concurrency and state.in_flight >= limits.max_concurrency:
            return None  # a lane that ends frees it (the claimer is woken or polls)
        reserve = 0
        if state.tokens is not None and isinstance(task, LlmTask):
            reserve = tokens_to_reserve(task, limits.reserve_tokens or DEFAULT_RESERVE_TOKENS)
        waits = [0.0]
        if state.requests is not None:
            waits.append(state.requests.wait_s(self.now, 1))
        if state.tokens is not None:
            # A reservation larger than a minute's tokens waits for a full bucket only.
            waits.append(state.tokens.wait_s(self.now, min(reserve, state.tokens.capacity)))
        wait = max(waits)
        if wait > 0:
            self._later(self.now + wait)
            return None
        state.in_flight += 1
        if state.requests is not None:
            state.requests.take(1, self.now)
        if state.tokens is not None:
            state.tokens.take(reserve, self.now)
        state.changed = True
        return reserve

    def _later(self, at: float) -> None:
        self.next_check = at if self.next_check is None else min(self.next_check, at)


class ProviderGate:
    def __init__(self, configured: Mapping[str, Provider]) -> None:
        self.limited = {
            name: p for name, p in configured.items() if p.max_concurrency or p.rpm or p.tpm
        }
        self._rows_made = False

    async def open(self, tx: Tx, names: Iterable[str], now: float) -> Admission:
        """Read the providers ``names`` call: the limited ones locked (with their lanes
        in flight counted), and every pause."""
        admission = Admission(now)
        wanted = sorted(set(names))
        limited = [name for name in wanted if name in self.limited]
        if limited:
            await self._make_rows(tx)
            locked = _locked(tx)
            rows = (await tx.conn.execute(locked, {"names": limited})).mappings().all()
            if len(rows) < len(limited):
                # Made by a transaction that rolled back: a missing row is no limit.
                await self._insert(tx, limited)
                rows = (await tx.conn.execute(locked, {"names": limited})).mappings().all()
            counted = await tx.conn.execute(PROVIDERS_RUNNING, {"names": limited})
            in_flight = {str(name): int(count) for name, count in counted.all()}
            for row in rows:
                limits = self.limited[row["name"]]
                at = row["levels_at"] if row["levels_at"] is not None else now
                state = _State(limits, in_flight.get(row["name"], 0), row["paused_until"])
                state.requests = _bucket(limits.rpm, row["requests_level"], at)
                state.tokens = _bucket(limits.tpm, row["tokens_level"], at)
                admission.states[row["name"]] = state
        pauses = await tx.conn.execute(PROVIDERS_PAUSED, {"names": wanted, "now": now})
        admission.paused = {str(name): float(until) for name, until in pauses.all()}
        return admission

    async def close(self, tx: Tx, admission: Admission) -> None:
        """Write back the buckets this claim drew from."""
        for name, state in admission.states.items():
            if state.changed:
                await tx.conn.execute(
                    update(providers)
                    .where(providers.c.name == name)
                    .values(
                        requests_level=state.requests.level if state.requests else None,
                        tokens_level=state.tokens.level if state.tokens else None,
                        levels_at=admission.now,
                    )
                )

    async def settle(
        self, tx: Tx, tokens: Mapping[str, int], pauses: Mapping[str, float], now: float
    ) -> None:
        """After outcomes: give back what reservations did not use (``tokens``: reserved
        less used, by provider; negative when a call used more), and pause providers
        that answered 429 with a ``Retry-After`` until then, for every process."""
        settled = {name: n for name, n in tokens.items() if n and name in self.limited}
        if not settled and not pauses:
            return
        await self._make_rows(tx, pauses)
        names = sorted({*settled, *pauses})
        rows = await tx.conn.execute(_locked(tx), {"names": names})
        for row in rows.mappings().all():
            name = row["name"]
            values: dict[str, float | None] = {}
            if name in pauses:
                values["paused_until"] = max(row["paused_until"] or 0.0, pauses[name])
            limits = self.limited.get(name)
            if name in settled and limits is not None and limits.tpm:
                at = row["levels_at"] if row["levels_at"] is not None else now
                bucket = _bucket(limits.tpm, row["tokens_level"], at)
                assert bucket is not None
                bucket.refill(now)
                bucket.level = min(bucket.capacity, bucket.level + settled[name])
                rpm = _bucket(limits.rpm, row["requests_level"], at)
                if rpm is not None:
                    rpm.refill(now)
                values.update(
                    tokens_level=bucket.level,
                    requests_level=rpm.level if rpm is not None else None,
                    levels_at=now,
                )
            if values:
                await tx.conn.execute(
                    update(providers).where(providers.c.name == name).values(**values)
                )

    async def _make_rows(self, tx: Tx, extra: Iterable[str] = ()) -> None:
        """A row for every limited provider (once per process) and for ``extra``."""
        names = set(extra) | (set() if self._rows_made else set(self.limited))
        if names:
            await self._insert(tx, names)
            self._rows_made = True

    @staticmethod
    async def _insert(tx: Tx, names: Iterable[str]) -> None:
        dialect_insert = sqlite_insert if tx.is_sqlite else pg_insert
        await tx.conn.execute(
            dialect_insert(providers)
            .values([{"name": name} for name in sorted(names)])
            .on_conflict_do_nothing(index_elements=["name"])
        )


def _locked(tx: Tx) -> Any:
    """The providers' rows, locked for the transaction (SQLite's writer holds them all)."""
    return PROVIDERS if tx.is_sqlite else PROVIDERS_FOR_UPDATE


def _bucket(per_minute: int | None, level: float | None, at: float) -> TokenBucket | None:
    """A provider's bucket as stored (full when it has never been drawn from)."""
    if not per_minute:
        return None
    bucket = TokenBucket.paced(per_minute, at)
    if level is not None:
        bucket.level = level
    return bucket
