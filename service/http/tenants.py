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

from ..errors import RateLimited, Unauthorized
from ..rates import TokenBucket

OPEN_TENANT = "public"


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
            raise Unauthorized("an API key is required (Authorization: Bearer <key>)")
        offered = _digest(key)
        found: str | None = None
        for digest, tenant in self._keys:
            if hmac.compare_digest(digest, offered) and found is None:
                found = tenant
        if found is None:
            raise Unauthorized("the API key is not valid", challenge='error="invalid_token"')
        return found


class RateLimiter:
    """A token bucket per tenant: ``per_minute`` requests a minute, bursts up to that."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._buckets: dict[str, TokenBucket] = {}

    def check(self, tenant: str) -> None:
        if self.per_minute <= 0:
            return
        now = time.monotonic()
        bucket = self._buckets.get(tenant)
        if bucket is None:
            bucket = self._buckets[tenant] = TokenBucket(self.per_minute, self.per_minute, now)
        wait = bucket.wait_s(now)
        if wait > 0:
            seconds = math.ceil(wait)
            raise RateLimited(
                f"over the rate limit of {self.per_minute} requests a minute; retry in {seconds} s",
                retry_after_s=seconds,
            )
        bucket.take(1, now)
