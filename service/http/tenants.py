"""Who is calling: API keys mapped to tenants, stream tokens, and each tenant's
request rate.

Keys are kept only as SHA-256 digests and compared in constant time, every
configured key each time, so neither the comparison nor the loop length tells an
attacker how close a guess came.

A stream token lets a browser read one job (its page, the job, its event stream)
without the API key in a URL, where logs and histories would keep it: an
EventSource cannot send headers. It names the tenant and the job, expires, and is
signed with a secret derived from the configured keys, so every replica with the
same ``FANOUT_API_KEYS`` accepts the tokens of the others (and changing the keys
revokes them all).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import time

from itsdangerous import BadData, URLSafeTimedSerializer

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
        secret = hashlib.sha256(b"fanout stream tokens\n" + api_keys.encode()).digest()
        self._tokens = URLSafeTimedSerializer(secret, salt="stream")

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

    def stream_token(self, tenant: str, job_id: str) -> str | None:
        """A token to read the job ``job_id`` of ``tenant`` (None on an open server)."""
        if self.open:
            return None
        return str(self._tokens.dumps([tenant, job_id]))

    def tenant_of_token(self, token: str, job_id: str, max_age_s: float) -> str:
        """The tenant a stream token lets read ``job_id``; :class:`Unauthorized` for a
        token that is forged, expired, or for another job."""
        if self.open:
            return OPEN_TENANT
        try:
            tenant, job = self._tokens.loads(token, max_age=math.ceil(max_age_s))
        except (BadData, ValueError, TypeError):
            raise Unauthorized(
                "the stream token is not valid or has expired", challenge='error="invalid_token"'
            ) from None
        if job != job_id or not isinstance(tenant, str):
            raise Unauthorized(
                "the stream token is for another job", challenge='error="invalid_token"'
            )
        return tenant


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
