"""The one domain error tree: what a caller can be told went wrong.

These say what happened in the domain's words, never how HTTP shows it: the HTTP
layer (:mod:`service.http.problems`) alone maps each to a status, a problem+json
body and, for field errors, where in the request the field is. Anything else that
escapes a route is a bug: logged, and a bare 500 with no detail.

::

    FanoutError
      ├─ InvalidSpec           a spec that parses but cannot run here: each failing field
      ├─ IdempotencyConflict   an Idempotency-Key already used with another body
      ├─ BadCursor             a cursor this server did not give out
      ├─ TenantAtCapacity      the tenant has its cap of jobs in flight
      ├─ JobNotFound           no such job (or another tenant's)
      ├─ JobFinished           the job has already finished (cancel)
      ├─ Unauthorized          no API key, or an unknown one (or stream token)
      ├─ KeyInUrl              an API key in the URL, where it would be logged
      ├─ RateLimited           over the tenant's request rate
      └─ Unavailable           not ready, or shutting down: try again soon
"""

from __future__ import annotations

from typing import Any

Loc = tuple[str | int, ...]


class FanoutError(Exception):
    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class InvalidSpec(FanoutError):
    """``errors``: ``{"loc": [path in the spec], "msg": ...}`` for every failing field."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        first = errors[0] if errors else {"loc": [], "msg": "invalid"}
        where = ".".join(str(part) for part in first["loc"])
        super().__init__(f"{where}: {first['msg']}" if where else str(first["msg"]))
        self.errors = errors


class IdempotencyConflict(FanoutError):
    def __init__(self) -> None:
        super().__init__("this key was already used with a different request body")


class BadCursor(FanoutError):
    def __init__(self) -> None:
        super().__init__("not a cursor this server gave out")


class TenantAtCapacity(FanoutError):
    def __init__(self, in_flight: int, cap: int) -> None:
        super().__init__(f"{in_flight} jobs in flight: at the cap of {cap} per tenant")
        self.in_flight = in_flight
        self.cap = cap


class JobNotFound(FanoutError):
    def __init__(self, job_id: str) -> None:
        super().__init__(f"no job {job_id[:64]!r}")


class JobFinished(FanoutError):
    def __init__(self, job_id: str, status: str) -> None:
        super().__init__(f"job {job_id!r} is already {status}")


class Unauthorized(FanoutError):
    """``challenge``: what the ``WWW-Authenticate`` answer adds (an OAuth error code)."""

    def __init__(self, detail: str, challenge: str = "") -> None:
        super().__init__(detail)
        self.challenge = challenge


class RateLimited(FanoutError):
    def __init__(self, detail: str, retry_after_s: int) -> None:
        super().__init__(detail)
        self.retry_after_s = retry_after_s


class KeyInUrl(FanoutError):
    def __init__(self) -> None:
        super().__init__(
            "an API key in the URL (?key=) is refused: send Authorization: Bearer <key>, "
            "or, for an event stream, the job's stream_token as ?token="
        )


class Unavailable(FanoutError):
    def __init__(self, detail: str, retry_after_s: int) -> None:
        super().__init__(detail)
        self.retry_after_s = retry_after_s
