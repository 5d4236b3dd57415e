"""``create_app(settings)``: the HTTP face of one Fanout process. The lifespan builds
the process (:func:`service.process.running`); routes, error handlers, middleware and
the OpenAPI document each come from their own module."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi_offline import FastAPIOffline

from ..config import Settings
from ..process import running
from . import ops, page, problems, routes
from .deps import Context
from .middleware import BodyLimit, TrailingSlash
from .openapi import document
from .tenants import RateLimiter, Tenants


def create_app(settings: Settings | None = None, *, with_runner: bool = True) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with running(settings, with_runner=with_runner) as process:
            tenants = Tenants(settings.api_keys)
            app.state.fanout = Context(
                process,
                tenants,
                RateLimiter(settings.rate_limit_per_minute),
                metrics_key=settings.metrics_key.encode() or None,
            )
            yield

    # FastAPIOffline serves /docs from the package's own files (no CDN); without docs,
    # neither they nor /openapi.json are served.
    make = FastAPIOffline if settings.docs else partial(FastAPI, docs_url=None, openapi_url=None)
    app = make(
        title="Fanout",
        version="0.1.0",
        summary="Parallel LLM work as jobs: fan out into lanes, fan in one result.",
        lifespan=lifespan,
        redoc_url=None,
        redirect_slashes=False,  # a trailing slash is dropped instead (TrailingSlash)
    )
    routers = (routes.router, ops.router, page.router, problems.router)
    for router in routers:
        app.include_router(router)
    problems.install(app, [route for router in routers for route in router.routes])
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    origins = [origin.strip() for origin in settings.cors_origins.split(",") if origin.strip()]
    if origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "Last-Event-ID"],
            expose_headers=["Location", "Retry-After", "Idempotent-Replayed", "WWW-Authenticate"],
            max_age=600,
        )
    app.add_middleware(TrailingSlash)
    app.openapi = document(app)  # type: ignore[method-assign]
    return app
