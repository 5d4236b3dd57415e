"""Provider capacity: concurrency, requests a minute, tokens a minute.

The lane runner asks :meth:`ProviderLimits.admit` while it claims, so a lane waiting
for its provider stays ``queued`` (visible as such) instead of failing or holding a
lease. Rates are token buckets (:class:`service.rates.TokenBucket`) that hold at most
one second's worth, so calls are paced rather than burst. Tokens a minute can only be
charged once a call has reported its usage: the bucket may be overdrawn.

Each process enforces the limits on its own: with several workers, give each a
share of the provider's limits.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..config import Provider
from ..rates import TokenBucket


@dataclass
class _Limiter:
    provider: Provider
    requests: TokenBucket | None
    tokens: TokenBucket | None
    in_flight: int = 0

    def wait_s(self, now: float) -> float | None:
        """0 when a call may start now; seconds until it may; None when only a call
        finishing can free capacity."""
        if self.provider.max_concurrency and self.in_flight >= self.provider.max_concurrency:
            return None
        wait = 0.0
        if self.requests is not None:
            wait = max(wait, self.requests.wait_s(now, 1.0))
        if self.tokens is not None:
            wait = max(wait, self.tokens.wait_s(now, 1e-9))
        return wait


class ProviderLimits:
    def __init__(self, providers: dict[str, Provider]) -> None:
        now = time.monotonic()
        self._limiters = {
            name: _Limiter(
                p,
                TokenBucket.paced(p.rpm, now) if p.rpm else None,
                TokenBucket.paced(p.tpm, now) if p.tpm else None,
            )
            for name, p in providers.items()
            if p.max_concurrency or p.rpm or p.tpm
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
            limiter.requests.take(1, now)
        return True

    def release(self, provider: str, tokens: int) -> None:
        """The call admitted for ``provider`` ended, having used ``tokens``."""
        limiter = self._limiters.get(provider)
        if limiter is None:
            return
        limiter.in_flight -= 1
        if limiter.tokens is not None:
            limiter.tokens.take(tokens, time.monotonic())
