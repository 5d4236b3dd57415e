"""Running one attempt of one task. No database, no FastAPI.

A failed attempt is data (:class:`Attempt` with an ``error_type``), never an
exception left to fly: the runner decides from it whether to retry.
"""

from __future__ import annotations

import asyncio
import email.utils
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx2
import openai

from .config import Provider
from .spec import LlmTask, Message

# Statuses worth another attempt: the request may well succeed if sent again.
TRANSIENT_STATUSES = frozenset({408, 409, 429})


@dataclass(frozen=True)
class Attempt:
    output: Any = None
    error_type: str | None = None
    error_message: str | None = None
    transient: bool = False
    retry_after: float | None = None
    usage: tuple[int, int, int] = (0, 0, 0)

    @property
    def ok(self) -> bool:
        return self.error_type is None


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Read a ``Retry-After`` header: seconds, or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (now if now is not None else time.time()))


class Providers:
    """One ``openai`` client per configured provider, built on first use.

    The SDK's own retries are off (the runner retries, so attempts are not
    multiplied), and it runs on the aiohttp transport: the default httpx2 pool
    scans every connection per request, which is slow with hundreds in flight.
    """

    def __init__(self, providers: dict[str, Provider], *, max_connections: int) -> None:
        self.providers = providers
        self.max_connections = max_connections
        self._clients: dict[str, openai.AsyncOpenAI] = {}

    def client(self, name: str) -> openai.AsyncOpenAI:
        client = self._clients.get(name)
        if client is None:
            provider = self.providers[name]
            limit = provider.max_concurrency or self.max_connections
            http_client = openai.DefaultAioHttpClient(
                # Idle connections are dropped before the usual server-side 5 s, so a
                # request never goes out on a connection the server is closing.
                limits=httpx2.Limits(
                    max_connections=limit, max_keepalive_connections=limit, keepalive_expiry=4.0
                ),
                timeout=httpx2.Timeout(None),
            )
            client = openai.AsyncOpenAI(
                base_url=provider.base_url,
                api_key=provider.api_key or "unused",
                max_retries=0,
                http_client=http_client,
            )
            self._clients[name] = client
        return client

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
        self._clients.clear()


def _request(task: LlmTask, messages: list[Message]) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": task.model,
        "messages": [m.model_dump(exclude_none=True) for m in messages],
    }
    for name in ("temperature", "top_p", "max_tokens", "seed", "stop", "response_format"):
        value = getattr(task, name)
        if value is not None:
            body[name] = value
    return body


async def run_llm(
    client: openai.AsyncOpenAI,
    task: LlmTask,
    *,
    timeout: float,
    messages: list[Message] | None = None,
    on_delta: Callable[[str], None] | None = None,
) -> Attempt:
    """One chat completion, bounded by ``timeout``; every failure becomes an Attempt."""
    body = _request(task, messages or task.messages)
    try:
        async with asyncio.timeout(timeout):
            if task.stream:
                return await _streamed(client, body, on_delta)
            completion = await client.chat.completions.create(**body)
    except TimeoutError:
        return Attempt(
            error_type="timeout", error_message=f"no answer within {timeout:g} s", transient=True
        )
    except openai.APITimeoutError:
        return Attempt(
            error_type="timeout", error_message=f"no answer within {timeout:g} s", transient=True
        )
    except openai.APIConnectionError as exc:
        return Attempt(
            error_type="upstream_error", error_message=f"connection failed: {exc}", transient=True
        )
    except openai.APIStatusError as exc:
        return _status_error(exc)
    except openai.APIResponseValidationError as exc:
        return Attempt(error_type="invalid_response", error_message=str(exc))
    except (ValueError, TypeError, KeyError) as exc:
        # A body the SDK could not parse (malformed JSON and the like).
        return Attempt(error_type="invalid_response", error_message=f"unreadable response: {exc}")
    if not completion.choices:
        return Attempt(error_type="invalid_response", error_message="the response has no choices")
    content = completion.choices[0].message.content
    if content is None:
        return Attempt(error_type="invalid_response", error_message="the response has no content")
    usage = completion.usage
    tokens = (
        (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) if usage else (0, 0, 0)
    )
    return Attempt(output=content, usage=tokens)


async def _streamed(
    client: openai.AsyncOpenAI, body: dict[str, Any], on_delta: Callable[[str], None] | None
) -> Attempt:
    stream = await client.chat.completions.create(
        **body, stream=True, stream_options={"include_usage": True}
    )
    parts: list[str] = []
    tokens = (0, 0, 0)
    async with stream:
        async for chunk in stream:
            if chunk.usage is not None:
                u = chunk.usage
                tokens = (u.prompt_tokens, u.completion_tokens, u.total_tokens)
            for choice in chunk.choices:
                text = choice.delta.content
                if text:
                    parts.append(text)
                    if on_delta is not None:
                        on_delta(text)
    return Attempt(output="".join(parts), usage=tokens)


def _status_error(exc: openai.APIStatusError) -> Attempt:
    status = exc.status_code
    message = f"HTTP {status}: {exc.message}"
    if status == 429:
        retry_after = retry_after_seconds(exc.response.headers.get("retry-after"))
        return Attempt(
            error_type="rate_limited",
            error_message=message,
            transient=True,
            retry_after=retry_after,
        )
    transient = status in TRANSIENT_STATUSES or status >= 500
    retry_after = (
        retry_after_seconds(exc.response.headers.get("retry-after")) if transient else None
    )
    return Attempt(
        error_type="upstream_error",
        error_message=message,
        transient=transient,
        retry_after=retry_after,
    )
