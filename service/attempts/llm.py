"""One attempt of an llm task: a chat completion from an OpenAI-compatible provider.

Two clients make the chat-completion call, chosen by ``FANOUT_LLM_CLIENT``:

- :class:`LeanClient` (the default): one aiohttp session per provider that posts the
  request body as JSON and reads the response as plain dicts. Most of a call's CPU in
  the ``openai`` SDK goes to building its request and response objects; this path
  keeps the same wire format (any OpenAI-compatible provider), the same errors and
  the same :class:`Attempt`, without that cost.
- :class:`SdkClient`: the official ``openai`` client, kept as the reference. The test
  suite runs the same lane tests on both (``tests/test_lanes.py``).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import math
import os
import urllib.request
from collections.abc import Mapping
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit

import aiohttp

from ..config import Provider
from ..spec import LlmTask, Message
from ..states import ErrorType
from ..views import NO_USAGE, Usage
from .base import (
    Attempt,
    OnDelta,
    connection_failed,
    invalid,
    status_attempt,
    timed_out,
)

DEFAULT_BASE_URL = "https://api.openai.com/v1"
# Idle upstream connections are dropped before the usual server-side 5 s, so a request
# never goes out on a connection the server is closing.
KEEPALIVE_S = 4.0
# Headers the openai SDK sends when these variables are set.
SDK_HEADERS = {"OpenAI-Organization": "OPENAI_ORG_ID", "OpenAI-Project": "OPENAI_PROJECT_ID"}


class LlmClient(Protocol):
    """One provider's chat-completion endpoint. ``complete`` turns every failure but a
    timeout (which :func:`run_llm` bounds) into an :class:`Attempt`."""

    async def complete(self, body: dict[str, Any], on_delta: OnDelta | None) -> Attempt: ...

    async def close(self) -> None: ...


ClientKind = Literal["lean", "sdk"]


class Providers:
    """One client per configured provider, built on first use (inside the running loop)."""

    def __init__(
        self, providers: dict[str, Provider], *, max_connections: int, kind: ClientKind = "lean"
    ) -> None:
        self.providers = providers
        self.max_connections = max_connections
        self.kind = kind
        self._clients: dict[str, LlmClient] = {}

    def client(self, name: str) -> LlmClient:
        client = self._clients.get(name)
        if client is None:
            provider = self.providers[name]
            limit = provider.max_concurrency or self.max_connections
            client = (SdkClient if self.kind == "sdk" else LeanClient)(provider, limit)
            self._clients[name] = client
        return client

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
        self._clients.clear()


async def run_llm(
    client: LlmClient,
    task: LlmTask,
    *,
    timeout: float,
    messages: list[Message] | None = None,
    on_delta: OnDelta | None = None,
) -> Attempt:
    """One chat completion, bounded by ``timeout``; every failure becomes an Attempt."""
    body = task.request(messages)
    if task.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    try:
        async with asyncio.timeout(timeout):
            return await client.complete(body, on_delta)
    except TimeoutError:
        return timed_out(timeout)


# --- what both clients share: reading a completion, mapping an error status -----------


def _field(value: Any, name: str) -> Any:
    """A field of a JSON object: a dict (the lean path) or the SDK's model of one,
    which keeps whatever the provider sent, unchecked. None when there is none."""
    if type(value) is dict:  # the lean path's, checked first: this runs ~17 times a call
        return value.get(name)
    if isinstance(value, Mapping):
        return value.get(name)
    return None if isinstance(value, str | list) else getattr(value, name, None)


def _usage(usage: Any) -> Usage:
    """Prompt, completion and total tokens (none counted unless all three are given),
    and within them the reasoning and cached tokens, when the provider says."""
    prompt, completion, total = (
        _field(usage, k) for k in ("prompt_tokens", "completion_tokens", "total_tokens")
    )
    if not (isinstance(prompt, int) and isinstance(completion, int) and isinstance(total, int)):
        return NO_USAGE
    reasoning = _field(_field(usage, "completion_tokens_details"), "reasoning_tokens")
    cached = _field(_field(usage, "prompt_tokens_details"), "cached_tokens")
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=total,
        reasoning_tokens=reasoning if isinstance(reasoning, int) else 0,
        cached_tokens=cached if isinstance(cached, int) else 0,
    )


def _tool_calls(value: Any) -> list[dict[str, Any]]:
    """A message's tool calls as sent: ``[{"id", "type", "function": {"name",
    "arguments"}}]`` (arguments are the JSON text the model wrote)."""
    calls = []
    for call in value if isinstance(value, list) else ():
        function = _field(call, "function")
        name = _field(function, "name")
        if not isinstance(name, str):
            continue
        arguments = _field(function, "arguments")
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments) if arguments is not None else ""
        calls.append(
            {
                "id": str(_field(call, "id") or ""),
                "type": str(_field(call, "type") or "function"),
                "function": {"name": name, "arguments": arguments},
            }
        )
    return calls


def _token_logprobs(logprobs: Any) -> list[float]:
    """The log probabilities of the answer's tokens (``choice.logprobs.content``)."""
    return [
        float(lp)
        for token in _field(logprobs, "content") or ()
        if isinstance(lp := _field(token, "logprob"), int | float)
        and not isinstance(lp, bool)
        and math.isfinite(lp)
    ]


def _reply(
    finish_reason: Any, tool_calls: list[dict[str, Any]], refusal: Any, logprobs: list[float]
) -> dict[str, Any]:
    """What an llm answer says beside its text, as a lane keeps it: ``finish_reason``,
    ``tool_calls``, ``refusal``, and ``logprobs`` as a summary (the mean token logprob
    and the number of tokens), not the whole array."""
    reply: dict[str, Any] = {}
    if isinstance(finish_reason, str):
        reply["finish_reason"] = finish_reason
    if tool_calls:
        reply["tool_calls"] = tool_calls
    if isinstance(refusal, str):
        reply["refusal"] = refusal
    if logprobs:
        reply["logprobs"] = {"mean": sum(logprobs) / len(logprobs), "tokens": len(logprobs)}
    return reply


# An answer without text is still an answer when it says why it has none.
_TEXTLESS_ENDS = frozenset({"length", "content_filter", "tool_calls"})


def completion_attempt(completion: Any) -> Attempt:
    """A chat completion read into an Attempt: the first choice's text (or None), its
    tool calls, refusal, finish reason and logprobs, and the usage; an error object, or
    anything else in its place, fails the lane."""
    error = _field(completion, "error")
    if error:
        return error_event({"error": error})
    choices = _field(completion, "choices")
    if not isinstance(choices, list):
        return invalid("unreadable response: no choices list")
    if not choices:
        return invalid("the response has no choices")
    choice = choices[0]
    message = _field(choice, "message")
    content = _field(message, "content")
    if content is not None and not isinstance(content, str):
        return invalid("unreadable response: the content is not text")
    reply = _reply(
        _field(choice, "finish_reason"),
        _tool_calls(_field(message, "tool_calls")),
        _field(message, "refusal"),
        _token_logprobs(_field(choice, "logprobs")),
    )
    if content is None and not _says_why(reply):
        return invalid("the response has no content")
    return Attempt(output=content, usage=_usage(_field(completion, "usage")), reply=reply)


def _says_why(reply: dict[str, Any]) -> bool:
    return bool(
        reply.get("tool_calls")
        or "refusal" in reply
        or reply.get("finish_reason") in _TEXTLESS_ENDS
    )


def error_event(body: Mapping[str, Any]) -> Attempt:
    """An ``{"error": ...}`` sent with a success status (mid-stream, say)."""
    return Attempt(
        error_type=ErrorType.UPSTREAM_ERROR,
        error_message=f"the provider sent an error: {_detail(body)}",
    )


def _detail(body: Any) -> str:
    """What an error body says: its ``error.message``, or its ``error`` when that is
    text, else the body's text."""
    error = body.get("error", body) if isinstance(body, Mapping) else body
    message = error.get("message") if isinstance(error, Mapping) else error
    if isinstance(message, str) and message.strip():
        return message.strip()[:500]
    return json.dumps(body, default=str)[:500] if body else "(no body)"


def _parse(raw: bytes | str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:  # UnicodeDecodeError included
        return raw.decode(errors="replace") if isinstance(raw, bytes) else raw


# --- the lean client --------------------------------------------------------------------


class LeanClient:
    """``POST {base_url}/chat/completions`` on one aiohttp session: the request body as
    JSON, the response read as dicts. Redirects are followed and the proxy variables
    (``HTTPS_PROXY``, ``NO_PROXY``...) obeyed, as the SDK does; the proxy is looked up
    once, not per call."""

    def __init__(self, provider: Provider, limit: int) -> None:
        # What the SDK falls back on when a provider names no base URL; likewise it
        # sends the organization and project of OPENAI_ORG_ID / OPENAI_PROJECT_ID.
        base_url = provider.base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.headers = {
            "Authorization": f"Bearer {provider.api_key or 'unused'}",
            "Content-Type": "application/json",
            "Accept": "application/json",
            "User-Agent": "fanout",
        }
        for header, variable in SDK_HEADERS.items():
            if os.environ.get(variable):
                self.headers[header] = os.environ[variable]
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=limit, keepalive_timeout=KEEPALIVE_S),
            timeout=aiohttp.ClientTimeout(total=None),
            raise_for_status=False,
            proxy=env_proxy(self.url),
        )
        self._encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode

    async def complete(self, body: dict[str, Any], on_delta: OnDelta | None) -> Attempt:
        data = self._encode(body).encode()
        try:
            async with self.session.post(self.url, data=data, headers=self.headers) as response:
                if not 200 <= response.status < 300:
                    return status_attempt(
                        response.status,
                        _detail(_parse(await response.read())),
                        response.headers.get("retry-after"),
                    )
                if body.get("stream"):
                    return await _read_stream(response.content, on_delta)
                raw = await response.read()
        except aiohttp.ClientError as exc:
            return connection_failed(exc)
        try:
            completion = json.loads(raw)
        except ValueError as exc:
            return invalid(f"unreadable response: {exc}")
        return completion_attempt(completion)

    async def close(self) -> None:
        await self.session.close()


def env_proxy(url: str) -> str | None:
    """The proxy the environment names for ``url``, as urllib (and httpx) read it."""
    parts = urlsplit(url)
    if urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    proxies = urllib.request.getproxies()
    return proxies.get(parts.scheme) or proxies.get("all")


async def _read_stream(content: aiohttp.StreamReader, on_delta: OnDelta | None) -> Attempt:
    """Server-sent chunks until ``data: [DONE]``, read by :class:`Streamed`."""
    streamed = Streamed(on_delta)
    data: list[str] = []
    async for raw in content:
        line = raw.decode(errors="replace").rstrip("\r\n")  # bad bytes fail the JSON below
        if line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
            continue
        if line or not data:
            continue  # another field (event:, id:, a comment), or a stray blank line
        payload, data = "\n".join(data), []
        if payload == "[DONE]":
            streamed.whole = True
            break
        try:
            chunk = json.loads(payload)
        except ValueError as exc:
            return invalid(f"unreadable stream chunk: {exc}")
        failed = streamed.add(chunk)  # a chunk that is no object has nothing to add
        if failed is not None:
            return failed
    return streamed.attempt()


class Streamed:
    """The chunks of a streamed completion, read as they come (dicts or the SDK's
    models): the text of its choices, each piece passed on to ``on_delta``, and the
    usage (``stream_options.include_usage`` puts it in the last chunk).

    A stream is whole once a choice gave its ``finish_reason`` (or, where the reader
    sees it, ``data: [DONE]`` came); one cut off before that, by a connection closed
    mid-answer, is a transient failure, not a shorter answer."""

    def __init__(self, on_delta: OnDelta | None) -> None:
        self.on_delta = on_delta
        self.parts: list[str] = []
        self.refusal: list[str] = []
        self.calls: dict[int, dict[str, Any]] = {}  # tool calls by index, as they build up
        self.logprobs: list[float] = []
        self.finish_reason: str | None = None
        self.usage = NO_USAGE
        self.whole = False

    def add(self, chunk: Any) -> Attempt | None:
        """Take one chunk; an Attempt when it ends the lane (an error object)."""
        error = _field(chunk, "error")
        if error:
            return error_event({"error": error})
        usage = _field(chunk, "usage")
        if usage is not None:
            self.usage = _usage(usage)
        for choice in _field(chunk, "choices") or ():
            if _field(choice, "index") not in (0, None):
                continue  # Fanout asks for one choice
            delta = _field(choice, "delta")
            text = _field(delta, "content")
            if isinstance(text, str) and text:
                self.parts.append(text)
                if self.on_delta is not None:
                    self.on_delta(text)
            refusal = _field(delta, "refusal")
            if isinstance(refusal, str):
                self.refusal.append(refusal)
            for call in _field(delta, "tool_calls") or ():
                self._add_call(call)
            self.logprobs += _token_logprobs(_field(choice, "logprobs"))
            finish_reason = _field(choice, "finish_reason")
            if finish_reason:
                self.finish_reason = str(finish_reason)
                self.whole = True
        return None

    def _add_call(self, delta: Any) -> None:
        """A piece of a tool call: its first piece names it, later ones add arguments."""
        index = _field(delta, "index")
        call = self.calls.setdefault(
            index if isinstance(index, int) else len(self.calls),
            {"id": "", "type": "function", "function": {"name": "", "arguments": ""}},
        )
        if isinstance(call_id := _field(delta, "id"), str):
            call["id"] = call_id
        if isinstance(kind := _field(delta, "type"), str):
            call["type"] = kind
        function = _field(delta, "function")
        if isinstance(name := _field(function, "name"), str):
            call["function"]["name"] += name
        if isinstance(arguments := _field(function, "arguments"), str):
            call["function"]["arguments"] += arguments

    def attempt(self) -> Attempt:
        if not self.whole:
            return Attempt(
                error_type=ErrorType.UPSTREAM_ERROR,
                error_message="the stream ended before the answer was complete",
                transient=True,
            )
        calls = [self.calls[i] for i in sorted(self.calls) if self.calls[i]["function"]["name"]]
        refusal = "".join(self.refusal) if self.refusal else None
        reply = _reply(self.finish_reason, calls, refusal, self.logprobs)
        text = "".join(self.parts)
        output = text if text or not _says_why(reply) else None
        return Attempt(output=output, usage=self.usage, reply=reply)


# --- the reference client: the openai SDK ----------------------------------------------


class SdkClient:
    """The official ``openai`` client, on its aiohttp transport (the default httpx2
    pool scans every connection per request, which is slow with hundreds in flight).
    Its own retries are off: the runner retries, so attempts are not multiplied.
    Imported on first use: the SDK costs about 40 MB of memory that the lean path
    does without."""

    def __init__(self, provider: Provider, limit: int) -> None:
        import httpx2
        import openai

        self.openai = openai
        http_client = openai.DefaultAioHttpClient(
            limits=httpx2.Limits(
                max_connections=limit, max_keepalive_connections=limit, keepalive_expiry=KEEPALIVE_S
            ),
            timeout=httpx2.Timeout(None),
        )
        self.client = openai.AsyncOpenAI(
            base_url=provider.base_url,
            api_key=provider.api_key or "unused",
            max_retries=0,
            http_client=http_client,
        )
        self._params = frozenset(
            inspect.signature(self.client.chat.completions.create).parameters
        ) - {"extra_body", "extra_headers", "extra_query", "timeout"}

    def _arguments(self, body: dict[str, Any]) -> dict[str, Any]:
        """``create()``'s keyword arguments for ``body``: the fields the SDK names, and
        the rest (a provider's own) in ``extra_body``, which it merges back: the same
        request as the lean path sends."""
        known = {k: v for k, v in body.items() if k in self._params}
        extra = {k: v for k, v in body.items() if k not in self._params}
        return {**known, "extra_body": extra} if extra else known

    async def complete(self, body: dict[str, Any], on_delta: OnDelta | None) -> Attempt:
        openai = self.openai
        try:
            if body.get("stream"):
                return await self._streamed(body, on_delta)
            completion = await self.client.chat.completions.create(**self._arguments(body))
        except openai.APIConnectionError as exc:
            # Its own timeouts are off (run_llm bounds the attempt): a "timeout" here is
            # the transport's name for a refused or failed connection.
            return connection_failed(exc.__cause__ or exc)
        except openai.APIStatusError as exc:
            return status_attempt(
                exc.status_code, _detail(exc.body), exc.response.headers.get("retry-after")
            )
        except openai.APIResponseValidationError as exc:
            return invalid(str(exc))
        except openai.APIError as exc:  # an error in a stream
            return error_event({"error": exc.body or exc.message})
        except (ValueError, TypeError, KeyError) as exc:
            # A body the SDK could not parse (malformed JSON and the like).
            return invalid(f"unreadable response: {exc}")
        return completion_attempt(completion)

    async def _streamed(self, body: dict[str, Any], on_delta: OnDelta | None) -> Attempt:
        stream = await self.client.chat.completions.create(**self._arguments(body))
        streamed = Streamed(on_delta)
        async with stream:
            async for chunk in stream:
                failed = streamed.add(chunk)
                if failed is not None:
                    return failed
        return streamed.attempt()

    async def close(self) -> None:
        await self.client.close()
