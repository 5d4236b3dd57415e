"""One error hierarchy; :mod:`service.app` renders every one as RFC 9457 problem+json.

``FanoutError`` and its subclasses are what callers can see. Anything else that
escapes a route is a bug: it is logged and rendered as a bare 500 with no detail.
"""

from __future__ import annotations

from typing import Any


class FanoutError(Exception):
    status = 500
    title = "Internal Server Error"
    type = "about:blank"

    def __init__(self, detail: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers or {}

    def problem(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }


class NotFound(FanoutError):
    status = 404
    title = "Not Found"


class Conflict(FanoutError):
    status = 409
    title = "Conflict"


class PayloadTooLarge(FanoutError):
    status = 413
    title = "Payload Too Large"


class Unauthorized(FanoutError):
    status = 401
    title = "Unauthorized"


class InvalidSpec(FanoutError):
    """A request that parses but cannot be run; ``errors`` names each failing field."""

    status = 422
    title = "Unprocessable Content"

    def __init__(self, errors: list[dict[str, Any]], detail: str | None = None) -> None:
        first = errors[0] if errors else {"loc": [], "msg": "invalid"}
        where = ".".join(str(part) for part in first["loc"] if part != "body")
        super().__init__(detail or (f"{where}: {first['msg']}" if where else str(first["msg"])))
        self.errors = errors

    def problem(self) -> dict[str, Any]:
        return {**super().problem(), "errors": self.errors}
