"""Who is calling: API keys mapped to tenants, and each tenant's request rate.

Keys are kept only as SHA-256 digests and compared in constant time, every
configured key each time, so neither the comparison nor the loop length tells an
attacker how close a guess came.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import time
from dataclasses import dataclass, field

from .errors import FanoutError, Unauthorized

OPEN_TENANT = "public"


class RateLimited(FanoutError):
    status = 429
    title = "Too Many Requests"


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class Tenants:
    def __init__(self, api_keys: str) -> None:
        """``api_keys``: ``tenant:key`` pairs, comma-separated. Empty: open, one tenant."""
        self._keys: list[tuple[bytes, str]] = []
        for pair in filter(None, (p.strip() for p in api_keys.split(","))):
            tenant, sep, key = pair.partition(":")
            if not sep or not tenant.strip() or not key.strip():
                raise ValueError(f"FANOUT_API_KEYS entry {pair[:20]!r}... is not tenant:key")
            self._keys.append((_digest(key.strip()), tenant.strip()))

    @property
    def open(self) -> bool:
        return not self._keys

    def tenant_for(self, key: str | None) -> str:
        """The tenant a key belongs to; :class:`Unauthorized` for a missing or unknown key."""
        if self.open:
            return OPEN_TENANT
        if not key:
            raise Unauthorized(
                "an API key is required (Authorization: Bearer <key>)", headers=_challenge()
            )
        offered = _digest(key)
        found: str | None = None
        for digest, tenant in self._keys:
            if hmac.compare_digest(digest, offered) and found is None:
                found = tenant
        if found is None:
            raise Unauthorized(
                "the API key is not valid", headers=_challenge('error="invalid_token"')
            )
        return found


def _challenge(extra: str = "") -> dict[str, str]:
    value = 'Bearer realm="fanout"' + (f", {extra}" if extra else "")
    return {"WWW-Authenticate": value}


@dataclass
class _Bucket:
    tokens: float
    updated: float


@dataclass
class RateLimiter:
    """A token bucket per tenant: ``per_minute`` requests a minute, bursts up to that."""

    per_minute: int
    _buckets: dict[str, _Bucket] = field(default_factory=dict)

    def check(self, tenant: str) -> None:
        if self.per_minute <= 0:
            return
        now = time.monotonic()
        rate = self.per_minute / 60.0
        bucket = self._buckets.setdefault(tenant, _Bucket(float(self.per_minute), now))
        bucket.tokens = min(float(self.per_minute), bucket.tokens + (now - bucket.updated) * rate)
        bucket.updated = now
        if bucket.tokens < 1.0:
            wait = math.ceil((1.0 - bucket.tokens) / rate)
            raise RateLimited(
                f"over the rate limit of {self.per_minute} requests a minute; retry in {wait} s",
                headers={"Retry-After": str(wait)},
            )
        bucket.tokens -= 1.0
