"""The limit: a bare ``asyncio.gather`` of N chat completions, nothing else.

Same ``openai`` client and transport as the service's providers
(:class:`service.attempts.llm.Providers`: ``max_retries=0``, the aiohttp transport, a pool
as large as the service's process cap), same fake LLM, same request; no database,
no HTTP API, no events. It runs in a process of its own, driven over stdin/stdout
with one JSON object per line, so its CPU and peak memory are read apart from the
benchmark's and the service's, and its client (and warm connections) lives across
repetitions as the service's does::

    {"cmd": "run", "n": 1000, "model": "fake?latency_ms=200&answers=391:1"}
        -> {"wall_s": 1.52, "ok": 1000, "errors": 0, "first_error": null}
    {"cmd": "run", "n": 10000, "model": "...", "concurrency": 1000, "prompt": "{index}: ..."}
    {"cmd": "quit"}

``concurrency`` caps the calls in flight (a semaphore; default: all N at once), as a
job's ``policy.max_concurrency`` does; ``prompt`` gives call i its own user message,
``{index}`` replaced by i (a map job's items), instead of the one question.

``--client raw`` makes the same calls on bare aiohttp without the SDK: not the
limit, a reference for what a lean call path could reach.

Run by hand: ``python -m bench.limit --base-url http://127.0.0.1:8001/v1 --once 1000``
(``--concurrency 100`` to cap the calls in flight).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

import aiohttp
import httpx2
import openai

QUESTION = "What is 17*23? End with 'Answer: N'."
MESSAGES = [{"role": "user", "content": QUESTION}]


def messages_for(prompt: str | None, index: int) -> list[dict[str, str]]:
    """The one question, or call ``index``'s own (``prompt`` with ``{index}`` filled)."""
    if prompt is None:
        return MESSAGES
    return [{"role": "user", "content": prompt.replace("{index}", str(index))}]


def make_client(base_url: str, max_connections: int) -> openai.AsyncOpenAI:
    http_client = openai.DefaultAioHttpClient(
        limits=httpx2.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections
        ),
        timeout=httpx2.Timeout(None),
    )
    return openai.AsyncOpenAI(
        base_url=base_url, api_key="bench", max_retries=0, http_client=http_client
    )


class SdkCaller:
    """The limit proper: the ``openai`` SDK, as the service's lanes call it."""

    def __init__(self, base_url: str, max_connections: int) -> None:
        self.client = make_client(base_url, max_connections)

    async def call(self, model: str, messages: list[dict[str, str]] = MESSAGES) -> str | None:
        completion = await self.client.chat.completions.create(model=model, messages=messages)  # type: ignore[arg-type]
        return completion.choices[0].message.content

    async def close(self) -> None:
        await self.client.close()


class RawCaller:
    """A reference below the limit: the same request on bare aiohttp, no SDK. What a
    lean call path (the issue's stretch) could reach."""

    def __init__(self, base_url: str, max_connections: int) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.headers = {"Authorization": "Bearer bench", "Content-Type": "application/json"}
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=max_connections, keepalive_timeout=5.0)
        )

    async def call(self, model: str, messages: list[dict[str, str]] = MESSAGES) -> str | None:
        body = json.dumps({"model": model, "messages": messages}).encode()
        async with self.session.post(self.url, data=body, headers=self.headers) as response:
            response.raise_for_status()
            completion = json.loads(await response.read())
        content: str | None = completion["choices"][0]["message"]["content"]
        return content

    async def close(self) -> None:
        await self.session.close()


Caller = SdkCaller | RawCaller
CALLERS: dict[str, type[SdkCaller] | type[RawCaller]] = {"sdk": SdkCaller, "raw": RawCaller}


async def gather(
    caller: Caller,
    n: int,
    model: str,
    concurrency: int | None = None,
    prompt: str | None = None,
) -> dict[str, Any]:
    """N calls at once, or at most ``concurrency`` of them in flight."""
    gate = asyncio.Semaphore(concurrency) if concurrency else None

    async def call(index: int) -> str | None:
        messages = messages_for(prompt, index)
        if gate is None:
            return await caller.call(model, messages)
        async with gate:
            return await caller.call(model, messages)

    started = time.perf_counter()
    results = await asyncio.gather(*(call(i) for i in range(n)), return_exceptions=True)
    wall = time.perf_counter() - started
    errors = [r for r in results if isinstance(r, BaseException)]
    return {
        "wall_s": wall,
        "ok": len(results) - len(errors),
        "errors": len(errors),
        "first_error": _describe(errors[0]) if errors else None,
    }


def _describe(exc: BaseException) -> str:
    """The exception and its causes: the SDK wraps the transport's error."""
    parts = []
    seen: BaseException | None = exc
    while seen is not None and len(parts) < 4:
        parts.append(repr(seen))
        seen = seen.__cause__ or seen.__context__
    return " <- ".join(parts)


async def serve(caller: Caller) -> None:
    loop = asyncio.get_running_loop()
    try:
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                return
            command = json.loads(line)
            if command["cmd"] == "quit":
                return
            if command["cmd"] == "ping":
                reply = {"ok": True}
            elif command["cmd"] == "run":
                reply = await gather(
                    caller,
                    int(command["n"]),
                    str(command["model"]),
                    command.get("concurrency"),
                    command.get("prompt"),
                )
            else:
                reply = {"error": f"unknown command {command['cmd']!r}"}
            sys.stdout.write(json.dumps(reply) + "\n")
            sys.stdout.flush()
    finally:
        await caller.close()


async def once(caller: Caller, n: int, model: str, concurrency: int | None) -> None:
    try:
        print(json.dumps(await gather(caller, n, model, concurrency)))
    finally:
        await caller.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--max-connections", type=int, default=2000)
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    parser.add_argument("--once", type=int, metavar="N", help="make N calls, print, exit")
    parser.add_argument("--model", default="fake?latency_ms=200&answers=391:1")
    parser.add_argument("--client", choices=sorted(CALLERS), default="sdk")
    parser.add_argument(
        "--concurrency", type=int, help="with --once: at most this many calls in flight"
    )
    args = parser.parse_args()

    async def run() -> None:
        caller = CALLERS[args.client](args.base_url, args.max_connections)
        if args.once:
            await once(caller, args.once, args.model, args.concurrency)
        else:
            await serve(caller)

    if args.loop == "uvloop":
        import uvloop

        uvloop.run(run())
    else:
        asyncio.run(run())


if __name__ == "__main__":
    main()
