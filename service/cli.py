"""``fanout serve | worker | migrate | openapi | submit | fake-llm``."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import signal
import sys
from pathlib import Path
from types import FrameType

from pydantic import ValidationError
from starlette.types import ASGIApp

from .config import ProvidersFileError, Settings
from .logs import configure as configure_logging

log = logging.getLogger("fanout")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fanout", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve the API and run lanes in one process")
    serve.add_argument("--host", help="default: FANOUT_HOST (127.0.0.1)")
    serve.add_argument("--port", type=int, help="default: FANOUT_PORT (8000)")
    serve.add_argument("--no-runner", action="store_true", help="serve the API only")
    serve.add_argument(
        "--simulator-fallback",
        action="store_true",
        help="with no provider configured (OPENAI_API_KEY, OPENAI_BASE_URL, "
        "FANOUT_PROVIDERS_FILE), answer every lane with the built-in simulator (make run)",
    )

    commands.add_parser("worker", help="run lanes only (no HTTP)")
    commands.add_parser("migrate", help="apply database migrations")

    openapi = commands.add_parser("openapi", help="write the OpenAPI document")
    openapi.add_argument("--out", type=Path, default=Path("openapi/openapi.json"))

    submit = commands.add_parser("submit", help="post a job spec")
    submit.add_argument("spec", type=Path, help="a JSON job spec ('-' for standard input)")
    submit.add_argument("--watch", action="store_true", help="follow the job's lanes live")
    submit.add_argument("--cancel-on-exit", action="store_true", help="cancel the job on Ctrl-C")
    submit.add_argument("--url", default=os.environ.get("FANOUT_URL", "http://127.0.0.1:8000"))
    submit.add_argument("--api-key", default=os.environ.get("FANOUT_API_KEY"))

    fake = commands.add_parser("fake-llm", help="an OpenAI-compatible simulator")
    fake.add_argument("--host", default="127.0.0.1")
    fake.add_argument("--port", type=int, default=8001)

    args = parser.parse_args(argv)
    if args.command == "fake-llm":
        from .tools.fakellm import serve as serve_fake

        serve_fake(host=args.host, port=args.port)
        return 0
    if args.command == "submit":
        from .tools.submit import submit as run_submit

        return run_submit(
            args.spec,
            url=args.url,
            api_key=args.api_key,
            watch=args.watch,
            cancel_on_exit=args.cancel_on_exit,
        )

    settings = _settings()
    if settings is None:
        return 2
    configure_logging(settings.log_level, settings.log_format)
    if args.command == "serve" and args.simulator_fallback and _no_provider():
        # The simulator under /simulator on this server's own port, as the default
        # provider (read from the environment, like a real one).
        host = args.host or settings.host
        loopback = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        os.environ["OPENAI_BASE_URL"] = (
            f"http://{loopback}:{args.port or settings.port}/simulator/v1"
        )
        os.environ["OPENAI_API_KEY"] = "simulator"
        os.environ["FANOUT_SIMULATOR"] = "true"
        settings = _settings()
        if settings is None:
            return 2
        log.warning(
            "no provider configured (OPENAI_API_KEY, OPENAI_BASE_URL, FANOUT_PROVIDERS_FILE): "
            "every lane is answered by the built-in SIMULATOR (fanout fake-llm) at "
            "%s. Set OPENAI_API_KEY (and OPENAI_BASE_URL for another provider) and restart "
            "to call a real model.",
            os.environ["OPENAI_BASE_URL"],
        )
    if args.command == "migrate":
        from .store.db import upgrade

        upgrade(settings.database_url)
        print("migrations applied")
        return 0
    if args.command == "openapi":
        from .http import create_app

        document = create_app(settings).openapi()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(document, indent=2) + "\n")
        print(f"wrote {args.out}")
        return 0
    if args.command == "worker":
        return asyncio.run(_worker(settings))
    return _serve(settings, host=args.host, port=args.port, with_runner=not args.no_runner)


def _no_provider() -> bool:
    """Nothing says which provider to call: no OpenAI key or URL, no providers file."""
    return not any(
        os.environ.get(name)
        for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "FANOUT_PROVIDERS_FILE")
    )


def _settings() -> Settings | None:
    """The settings, the providers file read: or, when either is wrong, what is wrong
    on standard error, one line each, and None (the command exits 2, no traceback)."""
    try:
        settings = Settings()
        settings.providers  # noqa: B018 (read now: a wrong file is found at start)
    except ValidationError as exc:
        for error in exc.errors():
            name = "FANOUT_" + ".".join(str(part) for part in error["loc"]).upper()
            print(f"fanout: {name}: {error['msg']}", file=sys.stderr)
        return None
    except ProvidersFileError as exc:
        print(f"fanout: FANOUT_PROVIDERS_FILE {exc}", file=sys.stderr)
        return None
    return settings


def _serve(settings: Settings, *, host: str | None, port: int | None, with_runner: bool) -> int:
    import uvicorn

    from .http import create_app

    if not settings.api_keys:
        log.warning("no API keys configured (FANOUT_API_KEYS): the API is open, for local use only")
    app = create_app(settings, with_runner=with_runner)

    class DrainingServer(uvicorn.Server):
        """On SIGTERM/SIGINT the runner stops claiming and the open event streams end at
        once, not after uvicorn has waited for open connections (it waits for open
        responses, a stream's too); the lifespan then drains in-flight lanes."""

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            context = getattr(app.state, "fanout", None)
            if context is not None:
                # A signal handler runs between any two bytecodes: the loop does it next.
                asyncio.get_running_loop().call_soon_threadsafe(context.stop)
            super().handle_exit(sig, frame)

    served: ASGIApp = app
    if settings.simulator:
        from .tools.fakellm import beside

        served = beside(app)
    config = uvicorn.Config(
        served,
        host=host or settings.host,
        port=port or settings.port,
        log_level=settings.log_level.lower(),
        access_log=False,
        timeout_keep_alive=IDLE_CONNECTION_S,
        timeout_graceful_shutdown=5,
    )
    config.load()  # imports what the server needs, before the heap is frozen
    freeze_the_heap()
    DrainingServer(config).run()
    return 0


# Seconds an idle connection is kept open: longer than clients' pools keep theirs
# (aiohttp 15 s, httpx 5 s), so that none sends a request on a connection the server is
# closing. At uvicorn's default of 5 s, an aiohttp client's POST was reset that way.
IDLE_CONNECTION_S = 75

# Collections of the youngest generation: one per this many new container objects.
GC_YOUNG_THRESHOLD = 10_000


def freeze_the_heap() -> None:
    """Leave what start-up built (modules, the app, its routes and models) out of
    garbage collection from now on, and collect young objects less often.

    A full collection walks every tracked object: with FastAPI, pydantic and
    SQLAlchemy loaded, that is hundreds of thousands, and under load the collector
    took a fifth of the service's CPU (measured: 1.6 s of GC for 200 small jobs three
    times; frozen and at this threshold, 0.7 s). Nothing frozen is ever freed, so the
    garbage is collected first.
    """
    gc.collect()
    gc.freeze()
    _young, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


async def _worker(settings: Settings) -> int:
    from .process import running

    if settings.is_sqlite:
        log.error("fanout worker needs PostgreSQL: SQLite runs one process (use fanout serve)")
        return 2

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    freeze_the_heap()
    async with running(settings) as state:
        log.info("worker %s running", state.runner.owner if state.runner else "?")
        await stop.wait()
        log.info("stopping: no new claims, draining in-flight lanes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
