"""Errors as RFC 9457 problem details (``application/problem+json``): the one place
where a domain error (:mod:`service.errors`) becomes an HTTP status, a body, headers
and, for field errors, where in the request the field is."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from html import escape
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.routing import BaseRoute, Match
from starlette.types import Scope

from .. import jsonsafe
from ..admission import check_parts
from ..errors import (
    BadCursor,
    FanoutError,
    IdempotencyConflict,
    InvalidSpec,
    JobFinished,
    JobNotFound,
    KeyInUrl,
    RateLimited,
    TenantAtCapacity,
    Unauthorized,
    Unavailable,
)
from ..spec import AGGREGATE_KINDS, MODES, OWNED_FIELDS, TASK_KINDS

log = logging.getLogger("fanout")
PROBLEM_JSON = "application/problem+json"


@dataclass(frozen=True)
class Kind:
    """A kind of error a caller can act on: its ``code`` (also the last segment of its
    ``type`` URI), HTTP status, title, and what it means and what to do."""

    code: str
    status: int
    title: str
    about: str

    @property
    def type(self) -> str:
        return f"{PROBLEM_TYPES}{self.code}"


# Problem types are paths on the service itself, each a page that says what it means.
PROBLEM_TYPES = "/problems/"
# A tenant at its cap of jobs in flight may try again when some end: in about this long.
CAPACITY_RETRY_S = 2

KINDS = {
    kind.code: kind
    for kind in (
        Kind(
            "invalid_request",
            422,
            "Invalid request",
            "A field of the request is invalid or over a server cap. `errors` names every "
            "failing field at once (`loc`, `msg`); fix them and send it again.",
        ),
        Kind(
            "malformed_json",
            400,
            "Malformed JSON",
            "The body is not valid JSON (or not UTF-8): `detail` says where it broke.",
        ),
        Kind(
            "unsupported_media_type",
            415,
            "Unsupported Media Type",
            "The body must be JSON, sent with `Content-Type: application/json`.",
        ),
        Kind(
            "body_too_large",
            413,
            "Content Too Large",
            "The body is over `FANOUT_MAX_BODY_BYTES`; `detail` names the cap.",
        ),
        Kind(
            "unauthorized",
            401,
            "Unauthorized",
            "No API key, or one this server does not know: send `Authorization: Bearer "
            "<key>` (a stream token, for an event stream).",
        ),
        Kind(
            "key_in_url",
            400,
            "API key in the URL",
            "`?key=` is refused: keys in URLs end up in logs and browser history. Send "
            "`Authorization: Bearer <key>`; an EventSource, which cannot send headers, "
            "uses the job's `stream_token` (`?token=`).",
        ),
        Kind("not_found", 404, "Not Found", "No such job for this tenant, or no such path."),
        Kind(
            "method_not_allowed",
            405,
            "Method Not Allowed",
            "The path does not take this method; `Allow` lists those it takes.",
        ),
        Kind(
            "job_finished",
            409,
            "Job finished",
            "The job has already finished: there is nothing left to cancel.",
        ),
        Kind(
            "idempotency_conflict",
            422,
            "Idempotency-Key reused",
            "This `Idempotency-Key` was used with another body. Use a new key for a new job.",
        ),
        Kind(
            "rate_limited",
            429,
            "Too Many Requests",
            "Over the tenant's request rate: retry after `Retry-After` seconds.",
        ),
        Kind(
            "tenant_at_capacity",
            429,
            "Tenant at capacity",
            "The tenant has its cap of jobs in flight (`FANOUT_MAX_JOBS_IN_FLIGHT`): retry "
            "after `Retry-After` seconds, or once one of its jobs has ended.",
        ),
        Kind(
            "unavailable",
            503,
            "Service Unavailable",
            "The service is not ready (its database is unreachable or not migrated) or is "
            "shutting down: retry after `Retry-After` seconds, on this or another replica.",
        ),
        Kind(
            "bad_request",
            400,
            "Bad Request",
            "The request cannot be read as HTTP this service understands.",
        ),
        Kind(
            "internal_error",
            500,
            "Internal Server Error",
            "A defect in Fanout: the error is logged with its traceback. Nothing a caller "
            "sends should cause it; please report it.",
        ),
    )
}

# The kind of each domain error.
KIND_OF: dict[type[FanoutError], str] = {
    InvalidSpec: "invalid_request",
    IdempotencyConflict: "idempotency_conflict",
    BadCursor: "invalid_request",
    TenantAtCapacity: "tenant_at_capacity",
    JobNotFound: "not_found",
    JobFinished: "job_finished",
    Unauthorized: "unauthorized",
    RateLimited: "rate_limited",
    Unavailable: "unavailable",
    KeyInUrl: "key_in_url",
}
# The kind of an HTTP error Starlette raised itself, by status.
_KIND_OF_STATUS = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}


router = APIRouter()


@router.get("/problems/{code}", include_in_schema=False)
async def about(code: str) -> HTMLResponse:
    """What a problem ``type`` means: each type URI is this page, for its code."""
    kind = KINDS.get(code)
    if kind is None:
        raise HTTPException(404, f"no problem type {code[:64]!r}")
    body = (
        f"<!doctype html><meta charset=utf-8><title>{escape(kind.title)}</title>"
        f"<h1>{escape(kind.title)}</h1><p><code>{kind.code}</code> · HTTP {kind.status}</p>"
        f"<p>{escape(kind.about)}</p>"
    )
    return HTMLResponse(body, headers={"Content-Security-Policy": "default-src 'none'"})


def problem(
    code: str, detail: str, *, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    """The one problem+json response, of the kind ``code``."""
    kind = KINDS[code]
    body = {
        "type": kind.type,
        "title": kind.title,
        "status": kind.status,
        "detail": detail,
        "code": kind.code,
    }
    return JSONResponse(
        {**body, **extra}, status_code=kind.status, media_type=PROBLEM_JSON, headers=headers
    )


def field_errors(error: FanoutError) -> list[dict[str, Any]] | None:
    """Where in the request each failing field is, for errors about fields."""
    if isinstance(error, InvalidSpec):
        return [{**e, "loc": ["body", *e["loc"]]} for e in error.errors]
    if isinstance(error, IdempotencyConflict):
        return [{"loc": ["header", "Idempotency-Key"], "msg": error.detail}]
    if isinstance(error, BadCursor):
        return [{"loc": ["query", "cursor"], "msg": error.detail}]
    return None


def render(error: FanoutError) -> JSONResponse:
    code = KIND_OF.get(type(error), "internal_error")
    headers = {}
    if isinstance(error, Unauthorized):
        challenge = 'Bearer realm="fanout"'
        headers["WWW-Authenticate"] = (
            f"{challenge}, {error.challenge}" if error.challenge else challenge
        )
    if isinstance(error, RateLimited | Unavailable):
        headers["Retry-After"] = str(error.retry_after_s)
    if isinstance(error, TenantAtCapacity):
        headers["Retry-After"] = str(CAPACITY_RETRY_S)
    errors = field_errors(error)
    if errors is None:
        return problem(code, error.detail, headers=headers)
    detail = error.detail
    if not isinstance(error, InvalidSpec):
        detail = _detail(errors)
    return problem(code, detail, headers=headers, errors=errors)


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
    "body": MODES,
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


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    raw = exc.errors()
    about_body = any(error["loc"][:1] == ("body",) for error in raw)
    if about_body and not _is_json(request.headers.get("content-type", "")):
        return problem(
            "unsupported_media_type", "send the body as JSON, with Content-Type: application/json"
        )
    for error in raw:
        if error["type"] == "json_invalid":
            where = error["loc"][1] if len(error["loc"]) > 1 else 0
            why = (error.get("ctx") or {}).get("error", "JSON decode error")
            return problem("malformed_json", f"the body is not valid JSON: {why} (at byte {where})")
    errors = [
        {"loc": _field_path(error), "msg": _message(error), "type": error["type"]} for error in raw
    ]
    # Every failing field at once: text and numbers JSON cannot carry, and what this
    # server refuses in the parts that did parse (providers, caps, destinations).
    if isinstance(exc.body, dict | list):
        errors.extend(unstorable(exc.body))
    if isinstance(exc.body, dict) and about_body and request.method == "POST":
        seen = {tuple(error["loc"]) for error in errors}
        settings = request.app.state.fanout.process.settings
        for found in check_parts(exc.body, settings):
            loc = ["body", *found["loc"]]
            if tuple(loc) not in seen:
                errors.append({"loc": loc, "msg": found["msg"]})
    return problem("invalid_request", _detail(errors), errors=errors)


def _is_json(content_type: str) -> bool:
    """``application/json`` or ``application/<anything>+json``, any parameters."""
    media = content_type.partition(";")[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


def _http_error(routes: list[BaseRoute]) -> Any:
    async def handler(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        headers = dict(exc.headers or {})
        if exc.status_code == 405 and (methods := _allowed_methods(routes, request.scope)):
            headers["Allow"] = ", ".join(sorted(methods))
        code = _KIND_OF_STATUS.get(exc.status_code, "bad_request")
        return problem(code, str(exc.detail), headers=headers)

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
    return problem("internal_error", "the server failed; the error is logged")


def install(app: FastAPI, routes: list[BaseRoute]) -> None:
    """Every error a route can raise, rendered as problem+json; ``routes`` are the
    app's own (a 405 names every method they serve at its path)."""
    app.add_exception_handler(FanoutError, _fanout_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error(routes))
    app.add_exception_handler(Exception, _unexpected_error)
