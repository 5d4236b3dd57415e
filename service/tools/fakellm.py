"""An OpenAI-compatible chat-completions simulator, served on loopback.

Tests, demos and benchmarks point a real OpenAI client at it. What a request gets back is
chosen by its ``model`` name: ``fake``, optionally followed by ``?`` and a URL query string
(parsed with :func:`urllib.parse.parse_qs`; the last value of a repeated key wins)::

    fake?latency_ms=200&jitter_ms=20&answers=391:3,392:1

=============  =======  ==============================================================
parameter      default  meaning
=============  =======  ==============================================================
latency_ms     0        delay before the response (streaming: before the first chunk);
                        applies to error responses too
jitter_ms      0        plus a uniform random delay in [0, jitter_ms]
chunk_ms       0        streaming: delay between content chunks
answers        -        ``VALUE:WEIGHT,...``; the reply is ``template`` with one VALUE
                        drawn by weight (a VALUE without ``:WEIGHT`` weighs 1)
template       see [1]  reply text; ``{answer}`` is replaced by the drawn VALUE
words          -        without answers: reply ``w1 w2 ... wN``
tokens         -        reported ``usage.completion_tokens`` (for budget tests)
error_rate     0        probability of an ``error_status`` (default 500) error
rate_limit     0        probability of a 429 with ``Retry-After: {retry_after}`` (default 1,
                        sent exactly as written, so ``0.2`` stays ``0.2``)
fail_first     0        the first K requests with the same (model, seed, messages) fail
                        with ``fail_status`` (default 500; a 429 carries Retry-After)
status         -        always fail with this status (400..599)
hang           0        ``1``: never answer; the request ends when the client leaves
malformed      0        probability of a 200 whose body is not valid JSON
empty          0        ``1``: a 200 with ``choices: []``
confidence     0.9      the answer's probability, as its tokens' logprobs report it (when
                        the request asks for ``logprobs``): one number, or
                        ``VALUE:P,...`` per answer
reasoning      -        reasoning tokens reported (counted in the completion tokens too)
cached         -        cached prompt tokens reported (at most the prompt's)
finish         stop     the finish reason: ``stop``, ``length`` or ``content_filter``
=============  =======  ==============================================================

Tools: a request with ``tools`` (and a ``tool_choice`` other than ``none``) is answered
with one call of the chosen (or first) function, with ``{"answer": VALUE}`` as its
arguments (the drawn answer, a number when it reads as one; else the reply's text),
no content, and ``finish_reason: "tool_calls"``.

[1] ``I worked it out. Answer: {answer}``. Without ``answers`` or ``words`` the reply is
``Echo: `` plus the last user message. Since ``+`` decodes to a space, percent-encode
a literal ``+``, ``&`` or ``#`` inside a value.

Failures are decided in this order: status, fail_first, rate_limit, error_rate, then
malformed and empty. Unknown parameters and unparseable values are a 400 naming the
parameter; a model other than ``fake`` is a 404 (``model_not_found``), as OpenAI does.

Randomness is reproducible: each request draws from ``random.Random(key)``, where key is
the model string, the messages and the request's ``seed``. Without a ``seed`` the key
also holds a per-(model, messages) call number, so identical requests vary but the same
sequence of calls reproduces after ``POST /_reset``. The key does not include ``stream``,
so a streamed reply has the same content as the non-streamed one.

``GET /_last`` returns the body of the last chat request received, as sent.
``GET /_stats`` counts chat requests (``requests``, ``completed``, ``cancelled`` when the
client left before the response was finished, ``in_flight``, ``max_in_flight``,
``by_status``); ``POST /_reset`` zeroes the counters and forgets ``fail_first`` and call
numbers. ``in_flight`` is a live gauge, so reset leaves it alone and restarts the peak
from it.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import random
import re
import time
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import Any
from urllib.parse import parse_qs

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

DEFAULT_TEMPLATE = "I worked it out. Answer: {answer}"

# One encoder built once: json.dumps() with options builds a new encoder on every call.
_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode

# Splits before each word that follows whitespace, so the pieces concatenate back exactly.
_WORD_BOUNDARY = re.compile(r"(?<=\s)(?=\S)")

# Enough to keep a long benchmark's per-key memory from growing without bound.
_MEMORY_LIMIT = 100_000

_JSON_HEADERS = [(b"content-type", b"application/json")]
_SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
_MALFORMED_BODY = b'{"choices": ['
_DONE = b"data: [DONE]\n\n"

_ERROR_KINDS = {
    400: ("invalid_request_error", "invalid_request"),
    401: ("authentication_error", "invalid_api_key"),
    403: ("permission_error", "permission_denied"),
    404: ("not_found_error", "model_not_found"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
}


class RequestError(Exception):
    """A request the simulator refuses; rendered as an OpenAI-style error body."""

    def __init__(
        self, message: str, *, param: str | None = None, status: int = 400, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.code = code


@dataclass(frozen=True, slots=True)
class Behaviour:
    """What a model name asks for; see the module docstring. Times are in seconds."""

    latency_s: float = 0.0
    jitter_s: float = 0.0
    chunk_s: float = 0.0
    answers: tuple[str, ...] = ()
    weights: tuple[float, ...] = ()
    template: str = DEFAULT_TEMPLATE
    words: int | None = None
    tokens: int | None = None
    error_rate: float = 0.0
    error_status: int = 500
    rate_limit: float = 0.0
    retry_after: str = "1"
    fail_first: int = 0
    fail_status: int = 500
    status: int | None = None
    hang: bool = False
    malformed: float = 0.0
    empty: bool = False
    confidence: tuple[tuple[str, float], ...] = ()  # (answer, p); ("", p) for any answer
    reasoning: int | None = None
    cached: int | None = None
    finish: str = "stop"

    def confidence_of(self, answer: str | None) -> float:
        for value, p in self.confidence:
            if value in ("", answer):
                return p
        return 0.9


class _Params:
    """Typed access to a model's query parameters, raising a 400 that names the culprit."""

    def __init__(self, raw: dict[str, str]) -> None:
        self.raw = raw

    def number(self, name: str, default: float, high: float = math.inf) -> float:
        text = self.raw.get(name)
        if text is None:
            return default
        try:
            value = float(text)
        except ValueError:
            raise _bad(name, text, "a number") from None
        if not (math.isfinite(value) and 0 <= value <= high):
            raise _bad(name, text, f"a number from 0 to {high:g}")
        return value

    def integer(
        self, name: str, default: int | None, low: int = 0, high: int = 2**31
    ) -> int | None:
        text = self.raw.get(name)
        if text is None:
            return default
        try:
            value = int(text)
        except ValueError:
            raise _bad(name, text, "an integer") from None
        if not low <= value <= high:
            raise _bad(name, text, f"an integer from {low} to {high}")
        return value

    def status(self, name: str, default: int) -> int:
        value = self.integer(name, default, low=400, high=599)
        assert value is not None
        return value

    def flag(self, name: str) -> bool:
        text = self.raw.get(name)
        if text is None:
            return False
        lowered = text.lower()
        if lowered in ("1", "true", "yes"):
            return True
        if lowered in ("0", "false", "no"):
            return False
        raise _bad(name, text, "1 or 0")

    def confidence(self) -> tuple[tuple[str, float], ...]:
        text = self.raw.get("confidence")
        if text is None:
            return ()
        pairs = []
        for item in text.split(","):
            value, colon, p_text = item.rpartition(":")
            try:
                p = float(p_text)
            except ValueError:
                raise _bad("confidence", text, "P or a list of VALUE:P") from None
            if not 0 < p <= 1 or (colon and not value):
                raise _bad("confidence", text, "probabilities above 0 and at most 1")
            pairs.append((value, p))
        return tuple(pairs)

    def answers(self) -> tuple[tuple[str, ...], tuple[float, ...]]:
        text = self.raw.get("answers")
        if text is None:
            return (), ()
        values: list[str] = []
        weights: list[float] = []
        for item in text.split(","):
            value, colon, weight_text = item.rpartition(":")
            if not colon:
                value, weight_text = item, "1"
            try:
                weight = float(weight_text)
            except ValueError:
                raise _bad("answers", text, "a list of VALUE:WEIGHT") from None
            if not value or not (math.isfinite(weight) and weight >= 0):
                raise _bad("answers", text, "a list of VALUE:WEIGHT")
            values.append(value)
            weights.append(weight)
        if sum(weights) <= 0:
            raise _bad("answers", text, "a list with a positive total weight")
        return tuple(values), tuple(weights)


def _bad(name: str, text: str, expected: str) -> RequestError:
    return RequestError(
        f"Invalid model parameter {name!r}: expected {expected}, got {text!r}",
        param=name,
        code="invalid_model_parameter",
    )


_KNOWN_PARAMS = frozenset(
    {
        "latency_ms",
        "jitter_ms",
        "chunk_ms",
        "answers",
        "template",
        "words",
        "tokens",
        "error_rate",
        "error_status",
        "rate_limit",
        "retry_after",
        "fail_first",
        "fail_status",
        "status",
        "hang",
        "malformed",
        "empty",
        "confidence",
        "reasoning",
        "cached",
        "finish",
    }
)


@lru_cache(maxsize=4096)
def parse_model(model: str) -> Behaviour:
    """Parse a model name into a :class:`Behaviour`, or raise :class:`RequestError`.

    Cached: a benchmark sends the same few model names thousands of times.
    """
    base, _, query = model.partition("?")
    if base != "fake":
        raise RequestError(
            f"The model {model!r} does not exist; use 'fake' or 'fake?name=value&...'",
            param="model",
            status=404,
        )
    raw = {key: values[-1] for key, values in parse_qs(query, keep_blank_values=True).items()}
    unknown = sorted(raw.keys() - _KNOWN_PARAMS)
    if unknown:
        raise RequestError(
            f"Unknown model parameter {unknown[0]!r}; known: {', '.join(sorted(_KNOWN_PARAMS))}",
            param=unknown[0],
            code="invalid_model_parameter",
        )
    params = _Params(raw)
    answers, weights = params.answers()
    retry_after = raw.get("retry_after", "1")
    params.number("retry_after", 1.0)  # validate; the header carries the text as written
    status = params.integer("status", None, low=400, high=599)
    return Behaviour(
        latency_s=params.number("latency_ms", 0.0) / 1000,
        jitter_s=params.number("jitter_ms", 0.0) / 1000,
        chunk_s=params.number("chunk_ms", 0.0) / 1000,
        answers=answers,
        weights=weights,
        template=raw.get("template", DEFAULT_TEMPLATE),
        words=params.integer("words", None, high=100_000),
        tokens=params.integer("tokens", None),
        error_rate=params.number("error_rate", 0.0, high=1.0),
        error_status=params.status("error_status", 500),
        rate_limit=params.number("rate_limit", 0.0, high=1.0),
        retry_after=retry_after,
        fail_first=params.integer("fail_first", 0) or 0,
        fail_status=params.status("fail_status", 500),
        status=status,
        hang=params.flag("hang"),
        malformed=params.number("malformed", 0.0, high=1.0),
        empty=params.flag("empty"),
        confidence=params.confidence(),
        reasoning=params.integer("reasoning", None),
        cached=params.integer("cached", None),
        finish=_finish(raw.get("finish", "stop")),
    )


def _finish(text: str) -> str:
    if text not in ("stop", "length", "content_filter"):
        raise _bad("finish", text, "stop, length or content_filter")
    return text


@dataclass(frozen=True, slots=True)
class _ChatRequest:
    model: str
    messages: list[dict[str, Any]]
    seed: int | None
    stream: bool
    include_usage: bool
    tool: str | None = None  # the function a tool call names (None: answer in text)
    logprobs: bool = False

    @classmethod
    def from_body(cls, body: bytes) -> _ChatRequest:
        try:
            data = json.loads(body)
        except ValueError:
            raise RequestError("The request body is not valid JSON") from None
        if not isinstance(data, dict):
            raise RequestError("The request body must be a JSON object")
        model = data.get("model")
        if not isinstance(model, str):
            raise RequestError("'model' is required and must be a string", param="model")
        messages = data.get("messages")
        if (
            not isinstance(messages, list)
            or not messages
            or not all(isinstance(message, dict) for message in messages)
        ):
            raise RequestError(
                "'messages' is required and must be a non-empty list of objects", param="messages"
            )
        seed = data.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise RequestError("'seed' must be an integer", param="seed")
        options = data.get("stream_options")
        return cls(
            model=model,
            messages=messages,
            seed=seed,
            stream=data.get("stream") is True,
            include_usage=isinstance(options, dict) and options.get("include_usage") is True,
            tool=_tool(data.get("tools"), data.get("tool_choice")),
            logprobs=data.get("logprobs") is True,
        )


def _tool(tools: object, choice: object) -> str | None:
    """The function a request's tools make the simulator call, if any."""
    if not isinstance(tools, list) or not tools or choice == "none":
        return None
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        if isinstance(name, str):
            return name
    first = tools[0] if isinstance(tools[0], dict) else {}
    name = (first.get("function") or {}).get("name")
    return name if isinstance(name, str) else "tool"


def _text(content: object) -> str:
    """The text of a message's content: a string, or a list of ``{"type": "text"}`` parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


@lru_cache(maxsize=64)
def _pseudo_words(count: int) -> str:
    return " ".join(f"w{i}" for i in range(1, count + 1))


def _reply(
    behaviour: Behaviour, request: _ChatRequest, rng: random.Random
) -> tuple[str, str | None]:
    """The reply's text, and the answer drawn for it (None without ``answers``)."""
    if behaviour.answers:
        answer = rng.choices(behaviour.answers, behaviour.weights)[0]
        return behaviour.template.replace("{answer}", answer), answer
    if behaviour.words is not None:
        return _pseudo_words(behaviour.words), None
    for message in reversed(request.messages):
        if message.get("role") == "user":
            return "Echo: " + _text(message.get("content")), None
    return "Echo: ", None


def _arguments(content: str, answer: str | None) -> str:
    """A tool call's arguments: the drawn answer (a number when it reads as one)."""
    value: Any = content if answer is None else answer
    if answer is not None:
        try:
            value = json.loads(answer)
        except ValueError:
            value = answer
    return _encode({"answer": value})


def _logprobs(pieces: list[str], p: float) -> dict[str, Any]:
    """Logprobs whose mean is log(p): each piece one token."""
    lp = math.log(p)
    return {
        "content": [
            {"token": piece, "logprob": lp, "bytes": list(piece.encode()), "top_logprobs": []}
            for piece in pieces
        ],
        "refusal": None,
    }


def _error_body(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> bytes:
    kind, default_code = _ERROR_KINDS.get(status, ("server_error", "server_error"))
    if status < 500 and status not in _ERROR_KINDS:
        kind, default_code = "invalid_request_error", "invalid_request"
    error = {"message": message, "type": kind, "param": param, "code": code or default_code}
    return _encode({"error": error}).encode()


@dataclass(frozen=True, slots=True)
class _Failure:
    status: int
    message: str
    retry_after: str | None = None


class _Connection:
    """One request's receive channel, so that waits end early when the client leaves.

    Uvicorn never cancels a request whose client went away; it only answers ``receive()``
    with ``http.disconnect`` once the body has been read. So a wait is a ``receive()``
    under a timeout: the timeout expiring is the normal case, a disconnect message ends
    it early. That costs one timer and no extra task, which matters at thousands of
    requests a second. Cancelling a pending ``receive()`` loses nothing: after the body
    the only message left to come is the disconnect, and the server remembers it.
    """

    def __init__(self, receive: Receive) -> None:
        self._receive = receive

    async def read_body(self) -> bytes | None:
        """The request body, or None if the client left before sending all of it."""
        chunks = []
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def until_disconnect(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass

    async def sleep(self, seconds: float) -> bool:
        """Sleep; return False as soon as the client disconnects."""
        if seconds <= 0:
            return True
        try:
            async with asyncio.timeout(seconds):
                await self.until_disconnect()
        except TimeoutError:
            return True
        return False


class _Stats:
    def __init__(self) -> None:
        self.in_flight = 0
        self.reset()

    def reset(self) -> None:
        self.requests = 0
        self.completed = 0
        self.cancelled = 0
        self.max_in_flight = self.in_flight
        self.by_status: Counter[int] = Counter()

    def as_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "completed": self.completed,
            "cancelled": self.cancelled,
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "by_status": {str(status): n for status, n in sorted(self.by_status.items())},
        }


class _ChatCompletions:
    """The ``POST /v1/chat/completions`` endpoint, as a raw ASGI app for low overhead."""

    def __init__(self, any_model: bool = False) -> None:
        # Any model name is ``fake`` (the built-in stand-in for a provider, when none
        # is configured): a job naming gpt-4o-mini gets an echo, not a 404.
        self.any_model = any_model
        self.stats = _Stats()
        self._calls: dict[tuple[str, str], int] = {}
        self._attempts: dict[tuple[str, int | None, str], int] = {}
        self._ids = itertools.count(1)
        self.last = b"null"  # the body of the last request, as it came

    def reset(self) -> None:
        self.stats.reset()
        self._calls.clear()
        self._attempts.clear()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        stats = self.stats
        stats.requests += 1
        stats.in_flight += 1
        stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        status: int | None = None
        try:
            status = await self._respond(_Connection(receive), send)
        finally:
            stats.in_flight -= 1
            if status is None:
                stats.cancelled += 1
            else:
                stats.completed += 1
                stats.by_status[status] += 1

    async def _respond(self, connection: _Connection, send: Send) -> int | None:
        """Answer one request; return the status sent, or None if the client left first."""
        body = await connection.read_body()
        if body is None:
            return None
        self.last = body
        try:
            request = _ChatRequest.from_body(body)
            model = request.model
            if self.any_model and not model.startswith("fake"):
                model = "fake"
            behaviour = parse_model(model)
        except RequestError as exc:
            error = _error_body(exc.status, exc.message, exc.param, exc.code)
            return await _send_json(send, exc.status, error)

        messages_key = _encode(request.messages)
        rng = random.Random(self._rng_key(request, messages_key))
        delay = behaviour.latency_s + rng.random() * behaviour.jitter_s
        rate_limit_roll, error_roll, malformed_roll = rng.random(), rng.random(), rng.random()
        content, answer = _reply(behaviour, request, rng)
        failure = self._failure(behaviour, request, messages_key, rate_limit_roll, error_roll)

        if behaviour.hang:
            await connection.until_disconnect()
            return None
        if request.stream and failure is None:
            malformed = malformed_roll < behaviour.malformed
            return await self._stream(
                connection, send, request, behaviour, content, answer, delay, malformed
            )
        if not await connection.sleep(delay):
            return None
        if failure is not None:
            headers = (
                []
                if failure.retry_after is None
                else [(b"retry-after", failure.retry_after.encode())]
            )
            return await _send_json(
                send, failure.status, _error_body(failure.status, failure.message), headers
            )
        if malformed_roll < behaviour.malformed:
            return await _send_json(send, 200, _MALFORMED_BODY)
        message: dict[str, Any] = {"role": "assistant", "content": content}
        finish = behaviour.finish
        pieces = _WORD_BOUNDARY.split(content)
        if request.tool is not None:
            arguments = _arguments(content, answer)
            call = {"name": request.tool, "arguments": arguments}
            message["content"] = None
            message["tool_calls"] = [
                {"id": f"call_{next(self._ids)}", "type": "function", "function": call}
            ]
            finish, pieces = "tool_calls", [arguments]
        completion = {
            "id": f"chatcmpl-fake-{next(self._ids)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request.model,
            "choices": []
            if behaviour.empty
            else [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": _logprobs(pieces, behaviour.confidence_of(answer))
                    if request.logprobs
                    else None,
                    "finish_reason": finish,
                }
            ],
            "usage": _usage(behaviour, request, content),
        }
        return await _send_json(send, 200, _encode(completion).encode())

    def _rng_key(self, request: _ChatRequest, messages_key: str) -> str:
        if request.seed is not None:
            return f"{request.model}\n{messages_key}\nseed={request.seed}"
        calls_key = (request.model, messages_key)
        call = self._calls.get(calls_key, 0)
        if len(self._calls) >= _MEMORY_LIMIT:
            self._calls.clear()
        self._calls[calls_key] = call + 1
        return f"{request.model}\n{messages_key}\ncall={call}"

    def _failure(
        self,
        behaviour: Behaviour,
        request: _ChatRequest,
        messages_key: str,
        rate_limit_roll: float,
        error_roll: float,
    ) -> _Failure | None:
        if behaviour.status is not None:
            return _Failure(behaviour.status, f"Simulated error: status={behaviour.status}")
        if behaviour.fail_first:
            key = (request.model, request.seed, messages_key)
            attempt = self._attempts.get(key, 0)
            if len(self._attempts) >= _MEMORY_LIMIT:
                self._attempts.clear()
            self._attempts[key] = attempt + 1
            if attempt < behaviour.fail_first:
                status = behaviour.fail_status
                return _Failure(
                    status,
                    f"Simulated failure {attempt + 1} of fail_first={behaviour.fail_first}",
                    behaviour.retry_after if status == 429 else None,
                )
        if rate_limit_roll < behaviour.rate_limit:
            return _Failure(429, "Simulated rate limit; try again later", behaviour.retry_after)
        if error_roll < behaviour.error_rate:
            return _Failure(behaviour.error_status, "Simulated upstream error (error_rate)")
        return None

    async def _stream(
        self,
        connection: _Connection,
        send: Send,
        request: _ChatRequest,
        behaviour: Behaviour,
        content: str,
        answer: str | None,
        delay: float,
        malformed: bool,
    ) -> int | None:
        """Send the reply as server-sent events, one chunk per word (a tool call: its
        name, then its arguments in pieces).

        Headers go out at once and ``latency_ms`` delays the first chunk, like a real
        provider's time to first token. A client that leaves mid-stream ends it.
        """
        await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
        if not await connection.sleep(delay):
            return None
        if malformed:
            await _send_body(send, b"data: " + _MALFORMED_BODY + b"\n\n" + _DONE, more=False)
            return 200
        if behaviour.empty:
            await _send_body(send, _DONE, more=False)
            return 200

        base: dict[str, Any] = {
            "id": f"chatcmpl-fake-{next(self._ids)}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": request.model,
        }
        if request.include_usage:
            base["usage"] = None  # as OpenAI does: every chunk but the last has usage: null

        p = behaviour.confidence_of(answer)

        def event(
            delta: dict[str, Any], finish_reason: str | None = None, token: str = ""
        ) -> bytes:
            logprobs = _logprobs([token], p) if request.logprobs and token else None
            choice = {
                "index": 0,
                "delta": delta,
                "logprobs": logprobs,
                "finish_reason": finish_reason,
            }
            return b"data: " + _encode({**base, "choices": [choice]}).encode() + b"\n\n"

        finish = behaviour.finish
        if request.tool is None:
            events = [
                event(
                    {"role": "assistant", "content": piece} if i == 0 else {"content": piece},
                    token=piece,
                )
                for i, piece in enumerate(_WORD_BOUNDARY.split(content))
            ]
        else:
            arguments = _arguments(content, answer)
            named = {"index": 0, "id": f"call_{next(self._ids)}", "type": "function"}
            named["function"] = {"name": request.tool, "arguments": ""}
            events = [event({"role": "assistant", "content": None, "tool_calls": [named]})]
            events += [
                event(
                    {"tool_calls": [{"index": 0, "function": {"arguments": arguments[i : i + 8]}}]},
                    token=arguments[i : i + 8],
                )
                for i in range(0, len(arguments), 8)
            ]
            finish = "tool_calls"
        if behaviour.chunk_s > 0:
            for i, chunk in enumerate(events):
                if i and not await connection.sleep(behaviour.chunk_s):
                    return None
                await _send_body(send, chunk, more=True)
            events = []

        tail = b"".join(events) + event({}, finish)  # without chunk_ms: one write in all
        if request.include_usage:
            usage_chunk = {**base, "choices": [], "usage": _usage(behaviour, request, content)}
            tail += b"data: " + _encode(usage_chunk).encode() + b"\n\n"
        await _send_body(send, tail + _DONE, more=False)
        return 200


def _usage(behaviour: Behaviour, request: _ChatRequest, content: str) -> dict[str, Any]:
    prompt = max(1, sum(len(_text(message.get("content")).split()) for message in request.messages))
    completion = behaviour.tokens if behaviour.tokens is not None else len(content.split())
    completion += behaviour.reasoning or 0
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    if behaviour.reasoning is not None:
        usage["completion_tokens_details"] = {"reasoning_tokens": behaviour.reasoning}
    if behaviour.cached is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": min(behaviour.cached, prompt)}
    return usage


async def _send_json(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None
) -> int:
    start_headers = [*_JSON_HEADERS, (b"content-length", str(len(body)).encode()), *(headers or ())]
    await send({"type": "http.response.start", "status": status, "headers": start_headers})
    await _send_body(send, body, more=False)
    return status


async def _send_body(send: Send, body: bytes, *, more: bool) -> None:
    await send({"type": "http.response.body", "body": body, "more_body": more})


class _Simulator(Starlette):
    """A Starlette app that sends chat completions straight to their endpoint.

    Starlette's middleware and router cost about a fifth of a simulated completion's CPU,
    and the simulator must outrun the service under test, so the one hot path skips
    them. Everything else, including a wrong method on the chat path, is routed normally.
    """

    def __init__(self, chat: _ChatCompletions, routes: list[Route]) -> None:
        super().__init__(routes=routes)
        self.chat = chat

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] == "POST"
            and scope["path"] == "/v1/chat/completions"
        ):
            await self.chat(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)


def create_app(*, any_model: bool = False) -> Starlette:
    """A fresh simulator with its own counters; see the module docstring. With
    ``any_model``, every model name that does not start with ``fake`` is ``fake``."""
    chat = _ChatCompletions(any_model)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"ok": True})

    async def models(request: Request) -> Response:
        fake = {"id": "fake", "object": "model", "created": 0, "owned_by": "fanout"}
        return JSONResponse({"object": "list", "data": [fake]})

    async def stats(request: Request) -> Response:
        return JSONResponse(chat.stats.as_json())

    async def reset(request: Request) -> Response:
        chat.reset()
        return JSONResponse({"ok": True})

    async def last(request: Request) -> Response:
        return Response(chat.last, media_type="application/json")

    routes = [
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/models", models),
        Route("/healthz", healthz),
        Route("/_stats", stats),
        Route("/_reset", reset, methods=["POST"]),
        Route("/_last", last),
    ]
    return _Simulator(chat, routes)


SIMULATOR_PREFIX = "/simulator"


def beside(app: ASGIApp) -> ASGIApp:
    """``app``, with a simulator (every model name answered) under ``/simulator``: the
    stand-in provider of ``make run`` when none is configured, on the same port."""
    simulator = create_app(any_model=True)

    async def both(scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and path.startswith(SIMULATOR_PREFIX + "/"):
            inner = path[len(SIMULATOR_PREFIX) :]
            await simulator({**scope, "path": inner, "raw_path": inner.encode()}, receive, send)
            return
        await app(scope, receive, send)

    return both


def serve(host: str = "127.0.0.1", port: int = 8001) -> None:
    """Run the simulator in the foreground until interrupted."""
    uvicorn.run(
        create_app(),
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        backlog=4096,
        limit_concurrency=None,
        proxy_headers=False,  # loopback only; saves a middleware on every request
        # Hung requests would otherwise hold shutdown until their clients give up.
        timeout_graceful_shutdown=1,
        # Like hosted providers, keep idle connections well past clients' own expiry.
        timeout_keep_alive=75,
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Run the OpenAI-compatible simulator.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    arguments = parser.parse_args()
    serve(arguments.host, arguments.port)
