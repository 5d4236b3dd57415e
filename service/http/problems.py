"""Errors as RFC 9457 problem details (``application/problem+json``): the one place
where a domain error (:mod:`service.errors`) becomes an HTTP status, a body, headers
and, for field errors, where in the request the field is."""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.routing import BaseRoute, Match
from starlette.types import Scope

from .. import jsonsafe
from ..errors import (
    BadCursor,
    FanoutError,
    IdempotencyConflict,
    InvalidSpec,
    JobFinished,
    JobNotFound,
    RateLimited,
    TenantAtCapacity,
    Unauthorized,
)
from ..spec import AGGREGATE_KINDS, OWNED_FIELDS, TASK_KINDS

log = logging.getLogger("fanout")
PROBLEM_JSON = "application/problem+json"

# The HTTP status of each domain error.
STATUS: dict[type[FanoutError], int] = {
    InvalidSpec: 422,
    IdempotencyConflict: 422,
    BadCursor: 422,
    TenantAtCapacity: 422,
    JobNotFound: 404,
    JobFinished: 409,
    Unauthorized: 401,
    RateLimited: 429,
}


# RFC 9110's names where Python's http module has older ones.
_TITLES = {413: "Payload Too Large", 422: "Unprocessable Content"}


class BadField(Exception):
    """A request field the HTTP layer itself refuses (a header, a query parameter)."""

    def __init__(self, loc: list[str | int], msg: str) -> None:
        super().__init__(msg)
        self.loc = loc
        self.msg = msg


def title(status: int) -> str:
    if status in _TITLES:
        return _TITLES[status]
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def problem(
    status: int, detail: str, *, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    """The one problem+json response."""
    body = {"type": "about:blank", "title": title(status), "status": status, "detail": detail}
    return JSONResponse(
        {**body, **extra}, status_code=status, media_type=PROBLEM_JSON, headers=headers
    )


def field_errors(error: FanoutError) -> list[dict[str, Any]] | None:
    """Where in the request each failing field is, for errors about fields."""
    if isinstance(error, InvalidSpec):
        return [{**e, "loc": ["body", *e["loc"]]} for e in error.errors]
    if isinstance(error, IdempotencyConflict):
        return [{"loc": ["header", "Idempotency-Key"], "msg": error.detail}]
    if isinstance(error, BadCursor):
        return [{"loc": ["query", "cursor"], "msg": error.detail}]
    if isinstance(error, TenantAtCapacity):
        return [{"loc": ["body"], "msg": error.detail}]
    return None


def render(error: FanoutError) -> JSONResponse:
    status = STATUS.get(type(error), 500)
    headers = {}
    if isinstance(error, Unauthorized):
        challenge = 'Bearer realm="fanout"'
        headers["WWW-Authenticate"] = (
            f"{challenge}, {error.challenge}" if error.challenge else challenge
        )
    if isinstance(error, RateLimited):
        headers["Retry-After"] = str(error.retry_after_s)
    errors = field_errors(error)
    if errors is None:
        return problem(status, error.detail, headers=headers)
    detail = error.detail
    if not isinstance(error, InvalidSpec):
        detail = _detail(errors)
    return problem(status, detail, headers=headers, errors=errors)


def _detail(errors: list[dict[str, Any]]) -> str:
    """The first error, as ``field.path: message``."""
    first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
    where = ".".join(str(p) for p in first["loc"] if p != "body")
    return f"{where}: {first['msg']}" if where else str(first["msg"])


def unstorable(body: Any) -> list[dict[str, Any]]:
    """Field errors for the strings and numbers of a JSON body that JSON cannot carry
    back out (see :mod:`service.jsonsafe`), with locations in the body."""
    return [
        {"loc": ["body", *loc], "msg": msg, "type": "unstorable"}
        for loc, msg in jsonsafe.problems(body)
    ]


def refuse_unstorable(body: Any) -> None:
    if errors := [{**e, "loc": e["loc"][1:]} for e in unstorable(body)]:
        raise InvalidSpec(errors)


# Tags of the spec's unions: pydantic puts them in error paths, callers never wrote them.
_UNION_TAGS = {
    "body": {"voting", "sectioning"},
    "task": TASK_KINDS,
    "tasks": TASK_KINDS,  # tasks.<i>.<kind>
    "aggregate": AGGREGATE_KINDS,
}


def _message(error: Any) -> str:
    """Pydantic's message, or why a field is not the caller's to set (``n``,
    ``stream_options``: Fanout owns them)."""
    loc = error["loc"]
    owned = error["type"] == "extra_forbidden" and loc and loc[-1] in OWNED_FIELDS
    if owned and ("task" in loc or "tasks" in loc):
        return f"not allowed: {OWNED_FIELDS[loc[-1]]}"
    return str(error["msg"])


def _field_path(error: Any) -> list[int | str]:
    """The error's location without the union tags pydantic puts in it (``task.llm``:
    ``task``)."""
    path: list[int | str] = []
    for part in error["loc"]:
        holder = [p for p in path if isinstance(p, str)][-1:]  # list items: their list's
        if holder and isinstance(part, str) and part in _UNION_TAGS.get(holder[0], ()):
            continue
        path.append(part)
    if error["type"] in ("union_tag_not_found", "union_tag_invalid"):
        # A missing or unknown `mode` / `kind`: name that field, not its parent.
        path.append(str(error.get("ctx", {}).get("discriminator", "")).strip("'"))
    return path


# --- the handlers -------------------------------------------------------------------------


async def _fanout_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, FanoutError)
    return render(exc)


async def _bad_field(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, BadField)
    errors = [{"loc": exc.loc, "msg": exc.msg}]
    return problem(422, _detail(errors), errors=errors)


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {"loc": _field_path(error), "msg": _message(error), "type": error["type"]}
        for error in exc.errors()
    ]
    # Every failing field at once: text and numbers JSON cannot carry too.
    if isinstance(exc.body, dict | list):
        errors.extend(unstorable(exc.body))
    return problem(422, _detail(errors), errors=errors)


def _http_error(routes: list[BaseRoute]) -> Any:
    async def handler(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        headers = dict(exc.headers or {})
        if exc.status_code == 405 and (methods := _allowed_methods(routes, request.scope)):
            headers["Allow"] = ", ".join(sorted(methods))
        return problem(exc.status_code, str(exc.detail), headers=headers)

    return handler


def _allowed_methods(routes: list[BaseRoute], scope: Scope) -> set[str]:
    """Every method some route serves at this path (Starlette names only the first
    matching route's, and GET and POST /v1/jobs are two routes)."""
    methods: set[str] = set()
    for route in routes:
        match, _ = route.matches(scope)
        if match is not Match.NONE and isinstance(route, APIRoute):
            methods |= route.methods or set()
    return methods


async def _unexpected_error(_request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error", exc_info=exc)
    return problem(500, "the server failed; the error is logged")


def install(app: FastAPI, routes: list[BaseRoute]) -> None:
    """Every error a route can raise, rendered as problem+json; ``routes`` are the
    app's own (a 405 names every method they serve at its path)."""
    app.add_exception_handler(FanoutError, _fanout_error)
    app.add_exception_handler(BadField, _bad_field)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error(routes))
    app.add_exception_handler(Exception, _unexpected_error)
