"""``create_app(settings)``: the lifespan builds the engine, clients and runner; one
handler renders every error as problem+json."""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .api import router, unstorable
from .config import Settings
from .db import Database, upgrade
from .egress import EgressGuard
from .errors import FanoutError
from .events import EventHub
from .lanes import Providers
from .metrics import Metrics
from .notify import Listener
from .page import router as page_router
from .runner import Runner
from .state import AppState
from .store import Store
from .tenants import RateLimiter, Tenants

log = logging.getLogger("fanout")
PROBLEM_JSON = "application/problem+json"


@asynccontextmanager
async def running(settings: Settings, *, with_runner: bool = True) -> AsyncIterator[AppState]:
    """Migrate, connect, and (optionally) run the runner until the block exits."""
    if settings.run_migrations:
        await asyncio.to_thread(upgrade, settings.database_url)
    db = Database(settings.database_url, pool_size=settings.db_pool_size)
    hub = EventHub()
    metrics = Metrics()

    def on_commit(events: list[dict[str, Any]]) -> None:
        metrics.observe_commit(events)
        hub.publish(events)

    db.on_commit = on_commit
    store = Store(db, lease_seconds=settings.lease_seconds)
    providers = Providers(
        settings.providers, max_connections=settings.max_concurrency, kind=settings.llm_client
    )
    guard = EgressGuard(settings.egress_allow, max_response_bytes=settings.max_response_bytes)
    http = guard.client(max_connections=settings.max_concurrency)
    runner = Runner(store, hub, providers, settings, http, metrics) if with_runner else None
    tenants = Tenants(settings.api_keys)
    limiter = RateLimiter(settings.rate_limit_per_minute)
    state = AppState(settings, db, store, hub, providers, runner, tenants, limiter, metrics)

    # PostgreSQL: other processes' events reach this hub, their new work wakes this runner.
    listener = None
    if not db.is_sqlite:
        wake = runner.wake if runner is not None else None
        listener = Listener(settings.database_url, hub, origin=db.origin, wake=wake)
        await listener.start()
    supervisor = asyncio.create_task(_supervise(runner)) if runner is not None else None
    try:
        yield state
    finally:
        if runner is not None:
            await runner.drain(settings.drain_seconds)
        if listener is not None:
            with suppress(TimeoutError):
                async with asyncio.timeout(10):
                    await listener.stop()
        if supervisor is not None:
            supervisor.cancel()
            with suppress(asyncio.CancelledError, TimeoutError):
                async with asyncio.timeout(45):
                    await supervisor
        await providers.close()
        await http.aclose()
        await db.dispose()


async def _supervise(runner: Runner) -> None:
    """Keep the runner going: a lost database connection must not stop it for good."""
    while True:
        try:
            await runner.run()
        except Exception:
            log.exception("runner stopped; restarting in 1 s")
            await asyncio.sleep(1.0)


def create_app(settings: Settings | None = None, *, with_runner: bool = True) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with running(settings, with_runner=with_runner) as state:
            app.state.fanout = state
            yield

    app = FastAPIOffline(
        title="Fanout",
        version="0.1.0",
        summary="Parallel LLM work as jobs: fan out into lanes, fan in one result.",
        lifespan=lifespan,
        redoc_url=None,
    )
    app.include_router(router)
    app.include_router(page_router)
    app.add_exception_handler(FanoutError, _fanout_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.openapi = _document(app)  # type: ignore[method-assign]
    return app


# --- the OpenAPI document ---------------------------------------------------------------

PROBLEM_SCHEMA: dict[str, Any] = {
    "title": "Problem",
    "description": "RFC 9457 problem details. A 422 names each failing field in `errors`.",
    "type": "object",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer", "minimum": 400, "maximum": 599},
        "detail": {"type": "string"},
        "errors": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["loc", "msg"],
                "properties": {
                    "loc": {"type": "array", "items": {"type": ["string", "integer"]}},
                    "msg": {"type": "string"},
                    "type": {"type": "string"},
                },
            },
        },
    },
}
# Headers that come with an error, whichever route refuses.
ERROR_HEADERS: dict[str, dict[str, Any]] = {
    "401": {
        "WWW-Authenticate": {
            "required": True,
            "schema": {"type": "string"},
            "description": "the Bearer challenge",
        }
    },
    "429": {
        "Retry-After": {
            "required": True,
            "schema": {"type": "integer", "minimum": 1},
            "description": "seconds until the rate limit lets a request through",
        }
    },
}
SECURITY_SCHEMES: dict[str, Any] = {
    "bearer": {
        "type": "http",
        "scheme": "bearer",
        "description": "An API key from `FANOUT_API_KEYS`; with none configured the service runs"
        " open (local use only) and ignores it.",
    },
    "query-key": {
        "type": "apiKey",
        "in": "query",
        "name": "key",
        "description": "The same key as `?key=`, for EventSource (it cannot send headers).",
    },
}


def _document(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """``app.openapi`` with what FastAPI cannot infer: every error is problem+json with the
    ``Problem`` schema (and its headers), and ``/v1`` routes need an API key."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = generate()
            components = document.setdefault("components", {})
            schemas = components.setdefault("schemas", {})
            for unused in ("HTTPValidationError", "ValidationError"):
                schemas.pop(unused, None)
            for path, operations in document["paths"].items():
                for operation in operations.values():
                    if path.startswith("/v1/"):
                        operation["security"] = [{"bearer": []}, {"query-key": []}]
                    for status, response in operation["responses"].items():
                        if status[0] in "45":
                            ref = {"$ref": "#/components/schemas/Problem"}
                            response["content"] = {PROBLEM_JSON: {"schema": ref}}
                            if status in ERROR_HEADERS:
                                response["headers"] = copy.deepcopy(ERROR_HEADERS[status])
            schemas["Problem"] = copy.deepcopy(PROBLEM_SCHEMA)
            components["securitySchemes"] = copy.deepcopy(SECURITY_SCHEMES)
            app.openapi_schema = document
        return app.openapi_schema

    return openapi


def problem(status: int, title: str, detail: str, **extra: Any) -> JSONResponse:
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail, **extra}
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON)


async def _fanout_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, FanoutError)
    return JSONResponse(
        exc.problem(), status_code=exc.status, media_type=PROBLEM_JSON, headers=exc.headers
    )


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {"loc": _field_path(error), "msg": error["msg"], "type": error["type"]}
        for error in exc.errors()
    ]
    # Every failing field at once: text and numbers JSON cannot carry too.
    if isinstance(exc.body, dict | list):
        errors.extend(unstorable(exc.body))
    first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
    where = ".".join(str(p) for p in first["loc"] if p != "body")
    return problem(
        422,
        "Unprocessable Content",
        f"{where}: {first['msg']}" if where else str(first["msg"]),
        errors=errors,
    )


# Tags of the spec's unions: pydantic puts them in error paths, callers never wrote them.
_UNION_TAGS = {
    "body": {"voting", "sectioning"},
    "task": {"llm", "http"},
    "aggregate": {"collect", "majority", "score", "reduce"},
}


def _field_path(error: Any) -> list[int | str]:
    path: list[int | str] = []
    for part in error["loc"]:
        if path and isinstance(part, str) and part in _UNION_TAGS.get(str(path[-1]), ()):
            continue
        path.append(part)
    if error["type"] in ("union_tag_not_found", "union_tag_invalid"):
        # A missing or unknown `mode` / `kind`: name that field, not its parent.
        path.append(str(error.get("ctx", {}).get("discriminator", "")).strip("'"))
    return path


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    response = problem(exc.status_code, _title(exc.status_code), str(exc.detail))
    response.headers.update(exc.headers or {})
    if exc.status_code == 405 and (methods := _allowed_methods(request.scope)):
        response.headers["Allow"] = ", ".join(sorted(methods))
    return response


def _allowed_methods(scope: Scope) -> set[str]:
    """Every method some route serves at this path (Starlette names only the first
    matching route's, and GET and POST /v1/jobs are two routes)."""
    methods: set[str] = set()
    for route in (*router.routes, *page_router.routes):
        match, _ = route.matches(scope)
        if match is not Match.NONE and isinstance(route, APIRoute):
            methods |= route.methods or set()
    return methods


async def _unexpected_error(_request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error", exc_info=exc)
    return problem(500, "Internal Server Error", "the server failed; the error is logged")


def _title(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


class BodyLimit:
    """Refuse request bodies over the cap: by ``Content-Length``, or, for chunked bodies
    (which have none), by reading them in first, up to the cap."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        detail = f"the request body is over the cap of {self.max_bytes} bytes"
        await problem(413, "Payload Too Large", detail)(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if not length.isdigit() or int(length) > self.max_bytes:
                await self._too_large(scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._too_large(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)
