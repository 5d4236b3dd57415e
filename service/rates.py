"""The one token bucket: tenants' request rates, providers' requests and tokens a
minute. Pure arithmetic over a clock the caller passes in."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class TokenBucket:
    """Refills continuously at ``per_minute / 60`` a second up to ``capacity``; takes
    may overdraw it (tokens a call used are known only after the call), and then it
    admits nothing until it has refilled."""

    per_minute: float
    capacity: float
    updated: float
    level: float = field(init=False)

    def __post_init__(self) -> None:
        self.level = self.capacity

    @classmethod
    def paced(cls, per_minute: float, now: float) -> TokenBucket:
        """At most a second's worth at once: calls are paced, not sent in bursts."""
        return cls(per_minute, max(1.0, math.ceil(per_minute / 60)), now)

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.updated) * self.per_minute / 60)
        self.updated = now

    def wait_s(self, now: float, need: float = 1.0) -> float:
        """Seconds until the bucket holds ``need`` (0: it does now)."""
        self.refill(now)
        return max(0.0, (need - self.level) * 60 / self.per_minute)

    def take(self, amount: float, now: float) -> None:
        self.refill(now)
        self.level -= amount
