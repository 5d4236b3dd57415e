"""Provider capacity: concurrency, requests a minute, tokens a minute.

The runner asks :meth:`ProviderLimits.admit` before it claims a lane, so a lane
waiting for its provider stays ``queued`` (visible as such) instead of failing
or holding a lease. Rates are token buckets that refill continuously and hold at
most one second's worth, so calls are paced rather than burst. Tokens a minute
can only be charged once a call has reported its usage: a bucket may go below
zero, and then admits nothing until it has refilled.

Each process enforces the limits on its own: with several workers, give each a
share of the provider's limits.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from .config import Provider


@dataclass
class Bucket:
    per_minute: float
    level: float = field(init=False)
    updated: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.level = self.capacity

    @property
    def capacity(self) -> float:
        return max(1.0, math.ceil(self.per_minute / 60))

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.updated) * self.per_minute / 60)
        self.updated = now

    def ready_in(self, now: float, need: float) -> float:
        """Seconds until the bucket holds ``need`` (it may be below zero now)."""
        self.refill(now)
        return max(0.0, (need - self.level) * 60 / self.per_minute)


@dataclass
class Limiter:
    provider: Provider
    in_flight: int = 0
    requests: Bucket | None = None
    tokens: Bucket | None = None

    def __post_init__(self) -> None:
        if self.provider.rpm:
            self.requests = Bucket(self.provider.rpm)
        if self.provider.tpm:
            self.tokens = Bucket(self.provider.tpm)

    def wait_s(self, now: float) -> float | None:
        """0 when a call may start now; seconds until it may; None when only a call
        finishing can free capacity."""
        if self.provider.max_concurrency and self.in_flight >= self.provider.max_concurrency:
            return None
        wait = 0.0
        if self.requests is not None:
            wait = max(wait, self.requests.ready_in(now, 1.0))
        if self.tokens is not None:
            wait = max(wait, self.tokens.ready_in(now, 1e-9))
        return wait


class ProviderLimits:
    def __init__(self, providers: dict[str, Provider]) -> None:
        self._limiters = {
            name: Limiter(p) for name, p in providers.items() if p.max_concurrency or p.rpm or p.tpm
        }
        self.next_check: float | None = None  # monotonic time a refused lane may go

    def admit(self, provider: str) -> bool:
        """Take a slot for one call to ``provider``, if it has capacity now."""
        limiter = self._limiters.get(provider)
        if limiter is None:
            return True
        now = time.monotonic()
        wait = limiter.wait_s(now)
        if wait is None:
            return False
        if wait > 0:
            at = now + wait
            self.next_check = at if self.next_check is None else min(self.next_check, at)
            return False
        limiter.in_flight += 1
        if limiter.requests is not None:
            limiter.requests.level -= 1
        return True

    def release(self, provider: str, tokens: int) -> None:
        limiter = self._limiters.get(provider)
        if limiter is None:
            return
        limiter.in_flight -= 1
        if limiter.tokens is not None:
            limiter.tokens.refill(time.monotonic())
            limiter.tokens.level -= tokens
