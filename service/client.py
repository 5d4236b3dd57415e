"""The official Python client: :class:`Fanout` (blocking) and :class:`AsyncFanout`
(asyncio), the same methods over one core::

    from service.client import Fanout

    with Fanout("http://127.0.0.1:8000", api_key="...") as fanout:
        job = fanout.create({"mode": "voting", "n": 5, "task": {...}})
        for event in fanout.stream(job["id"]):  # typed events, resumed after drops
            print(event.id, event.type, event.data)
        done = fanout.wait(job["id"])  # the finished job
        print(done["status"], done["result"])

What it does for the caller:

- ``create`` sends an ``Idempotency-Key`` (a new UUID unless one is given), so a
  request cut off on its way back can be sent again without making a second job; a
  temporary refusal (429, 503) is sent again after its ``Retry-After``. Reads retry
  the same way; ``cancel`` only when the server cannot have acted on it.
- ``stream`` reopens a dropped stream where it broke, and ends after the final event::

      GET …/events                  ─► 1 2 3 ✂ (a drop, or a close before the end)
      GET …/events  Last-Event-ID: 3 ─► 4 5 … job.succeeded ─► the iterator ends
      a stream that brought news is reopened at once; reopenings in a row that bring
      nothing pause by ``Retries.reconnect_s``, and after the last: StreamLost

- a refusal raises an exception of its kind (:class:`InvalidRequest`,
  :class:`NotFound`, …) that carries the problem details the server sent.

Requests, errors, the SSE parser and the retry and reconnect rules are the sans-I/O
core below; the two classes only send, read and sleep.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TypedDict, cast
from urllib.parse import quote

import httpx

from .states import FINAL_EVENTS, TERMINAL_JOB

__all__ = [
    "AsyncFanout",
    "Conflict",
    "Event",
    "Fanout",
    "FanoutError",
    "InvalidRequest",
    "Job",
    "JobSummary",
    "NotFound",
    "RateLimited",
    "Result",
    "Retries",
    "StreamLost",
    "Unauthorized",
    "Unavailable",
]

DEFAULT_URL = "http://127.0.0.1:8000"
# The server sends a keep-alive comment every 15 s: a longer silence is a dead connection.
STREAM_READ_TIMEOUT_S = 60.0


# --- what the server sends -------------------------------------------------------------


class Result(TypedDict):
    """A finished job's result (DESIGN.md section 3)."""

    output: Any
    details: dict[str, Any]
    partial: bool
    blocked: bool
    blocked_by: str | None


class Job(TypedDict):
    """A job as ``GET /v1/jobs/{id}`` returns it; ``status`` is a
    :class:`service.states.JobStatus` value. ``stream_token`` lets a browser read the
    job's page and stream without the API key (None on an open server)."""

    id: str
    status: str
    mode: str
    spec: dict[str, Any]
    created_at: str
    started_at: str | None
    finished_at: str | None
    progress: dict[str, int]
    lanes: list[dict[str, Any]]
    result: Result | None
    error: dict[str, Any] | None
    usage: dict[str, Any]
    metadata: dict[str, Any]
    webhook: dict[str, Any] | None
    stream_token: str | None


class JobSummary(TypedDict):
    """A job as ``GET /v1/jobs`` lists it: no spec, lanes or result."""

    id: str
    status: str
    mode: str
    created_at: str
    finished_at: str | None
    progress: dict[str, int]
    usage: dict[str, Any]
    metadata: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Event:
    """One event of a job's stream. ``id`` is its sequence number in the job (1, 2,
    …), or 0 for a live-only event (``lane.delta``, ``aggregate.delta``: never stored,
    never replayed); ``type`` is a :class:`service.states.EventType` value; ``data`` its
    JSON (``job_id``, ``seq``, ``at`` and the fields of its type)."""

    id: int
    type: str
    data: dict[str, Any]

    @property
    def final(self) -> bool:
        """The job's last event: ``job.succeeded``, ``job.failed`` or ``job.cancelled``."""
        return self.type in FINAL_EVENTS


# --- errors ----------------------------------------------------------------------------


class FanoutError(Exception):
    """The server refused a request. ``status`` is the HTTP status, ``problem`` the
    problem details it sent (RFC 9457), ``code`` their stable code (``invalid_request``,
    ``not_found``, …), ``errors`` every failing field (``loc``, ``msg``) of an invalid
    request, and ``retry_after`` the seconds a temporary refusal asks to wait."""

    def __init__(
        self, status: int, problem: Mapping[str, Any], *, retry_after: float | None = None
    ) -> None:
        self.status = status
        self.problem = dict(problem)
        self.code = str(problem.get("code") or f"http_{status}")
        self.title = str(problem.get("title") or "")
        self.detail = str(problem.get("detail") or "")
        errors = problem.get("errors")
        self.errors: list[dict[str, Any]] = (
            [error for error in errors if isinstance(error, dict)]
            if isinstance(errors, list)
            else []
        )
        self.retry_after = retry_after
        super().__init__(self._text())

    def _text(self) -> str:
        """``HTTP 422 Invalid request: n: …`` and, when more fields failed, one line each."""
        lines = [f"HTTP {self.status} {self.title}: {self.detail}".rstrip(": ")]
        for error in self.errors if len(self.errors) > 1 else []:  # the detail tells of one
            where = ".".join(str(part) for part in error.get("loc", []) if part != "body")
            lines.append(f"  {where or '(body)'}: {error.get('msg')}")
        return "\n".join(lines)


class InvalidRequest(FanoutError):
    """400, 413, 415, 422: fix the request (``errors`` names every failing field)."""


class Unauthorized(FanoutError):
    """401, 403: no API key, or one the server does not know."""


class NotFound(FanoutError):
    """404: no such job for this tenant."""


class Conflict(FanoutError):
    """409: the job's state does not allow it (cancelling a finished job)."""


class RateLimited(FanoutError):
    """429: over the rate limit or the tenant's jobs in flight; try after ``retry_after``."""


class Unavailable(FanoutError):
    """502, 503, 504: draining, not ready, or a proxy without a server behind it."""


class StreamLost(Exception):
    """A job's event stream could not be reopened (the job may still be running).
    ``last_event_id`` is the last event received: ``stream(job_id, after=…)`` goes on
    from there."""

    def __init__(self, message: str, job_id: str, last_event_id: int) -> None:
        super().__init__(message)
        self.job_id = job_id
        self.last_event_id = last_event_id


_ERRORS: dict[int, type[FanoutError]] = {
    **dict.fromkeys((400, 413, 415, 422), InvalidRequest),
    **dict.fromkeys((401, 403), Unauthorized),
    404: NotFound,
    409: Conflict,
    429: RateLimited,
    **dict.fromkeys((502, 503, 504), Unavailable),
}
# Refused before anything was done: asking again is safe for any request.
_REFUSED = (429, 503)
# Lost on the way: the server may or may not have acted (safe for repeatable requests).
_MAYBE_DONE = (502, 504)
# The request never left: safe for any request.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


def _error_of(response: httpx.Response) -> FanoutError:
    """The exception for a refusal (its body read), from its status and problem details."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):  # not ours: a proxy's page, say
        body = {"title": response.reason_phrase, "detail": response.text.strip()[:500]}
    kind = _ERRORS.get(response.status_code, FanoutError)
    return kind(response.status_code, body, retry_after=_retry_after(response))


def _retry_after(response: httpx.Response) -> float | None:
    """``Retry-After`` in seconds: a number of seconds or an HTTP date."""
    value = response.headers.get("retry-after", "").strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when.timestamp() - time.time())


# --- retrying --------------------------------------------------------------------------


@dataclass(frozen=True)
class Retries:
    """How patient a client is.

    ``attempts``: how many times one request is sent again (after a temporary refusal,
    or a connection error where sending again is safe); ``max_wait_s``: the most it
    waits in all for one request (a ``Retry-After`` beyond that is not waited for);
    ``backoff_s``: the pauses before retries that come with no ``Retry-After``;
    ``reconnect_s``: the pauses before each reopening of a stream in a row that brought
    no new event; after the last, :class:`StreamLost`.
    """

    attempts: int = 4
    max_wait_s: float = 30.0
    backoff_s: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0)
    reconnect_s: tuple[float, ...] = (0.2, 0.5, 1.0, 2.0, 4.0, 8.0)


class _Tries:
    """One request's tries: whether a failure is worth another, and the pause first."""

    def __init__(self, retries: Retries, repeatable: bool) -> None:
        self.retries = retries
        self.repeatable = repeatable
        self.tries = 0
        self.waited = 0.0

    def pause(self, error: Exception) -> float:
        """Seconds to wait before sending again; raises ``error`` when not to."""
        refused = isinstance(error, FanoutError) and error.status in _REFUSED
        lost = isinstance(error, httpx.TransportError) or (
            isinstance(error, FanoutError) and error.status in _MAYBE_DONE
        )
        safe = refused or isinstance(error, _NOT_SENT) or (lost and self.repeatable)
        if not safe or self.tries >= self.retries.attempts:
            raise error
        backoff = self.retries.backoff_s
        pause = backoff[min(self.tries, len(backoff) - 1)] if backoff else 0.0
        if isinstance(error, FanoutError) and error.retry_after is not None:
            pause = error.retry_after
        if self.waited + pause > self.retries.max_wait_s:
            raise error
        self.tries += 1
        self.waited += pause
        return pause


# --- requests --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Call:
    """One API request, as both clients send it. ``repeatable``: sending it twice does
    what sending it once does (so a connection lost mid-way can be retried)."""

    method: str
    path: str
    params: dict[str, str | int] = field(default_factory=dict)
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    repeatable: bool = True


def _job_path(job_id: str) -> str:
    return f"/v1/jobs/{quote(job_id, safe='')}"


def _lanes_param(lanes: bool) -> dict[str, str | int]:
    """``?lanes=false``: the job without its lanes (a 10,000-item map's are megabytes)."""
    return {} if lanes else {"lanes": "false"}


def _create(spec: Mapping[str, Any] | str | bytes, key: str | None, lanes: bool) -> _Call:
    if isinstance(spec, bytes):
        content = spec
    elif isinstance(spec, str):
        content = spec.encode()
    else:
        content = json.dumps(spec, ensure_ascii=False).encode()
    # The key makes a second send of the same job the same job: retrying is safe.
    headers = {"Content-Type": "application/json", "Idempotency-Key": key or str(uuid.uuid4())}
    return _Call("POST", "/v1/jobs", params=_lanes_param(lanes), content=content, headers=headers)


def _get(job_id: str, lanes: bool) -> _Call:
    return _Call("GET", _job_path(job_id), params=_lanes_param(lanes))


def _cancel(job_id: str, lanes: bool) -> _Call:
    # Not repeatable: a second cancel of a job the first one ended is a 409.
    return _Call(
        "POST", f"{_job_path(job_id)}/cancel", params=_lanes_param(lanes), repeatable=False
    )


def _lane_page(
    job_id: str, status: str | None, name: str | None, page_size: int, cursor: str | None
) -> _Call:
    params: dict[str, str | int] = {"limit": page_size}
    if status is not None:
        params["status"] = status
    if name is not None:
        params["name"] = name
    if cursor is not None:
        params["cursor"] = cursor
    return _Call("GET", f"{_job_path(job_id)}/lanes", params=params)


def _page(status: str | None, page_size: int, cursor: str | None) -> _Call:
    params: dict[str, str | int] = {"limit": page_size}
    if status is not None:
        params["status"] = status
    if cursor is not None:
        params["cursor"] = cursor
    return _Call("GET", "/v1/jobs", params=params)


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


# --- the event stream ------------------------------------------------------------------


class _SSE:
    """A ``text/event-stream`` parser, fed one line at a time: an event comes out at
    the blank line that ends it. Comments (keep-alives) and ``retry:`` are read past,
    and data that is not a JSON object is dropped."""

    def __init__(self) -> None:
        self.id = 0
        self.type = "message"
        self.data: list[str] = []

    def feed(self, line: str) -> Event | None:
        if not line:
            event_id, kind, data = self.id, self.type, self.data
            self.id, self.type, self.data = 0, "message", []
            try:
                payload = json.loads("\n".join(data)) if data else None
            except ValueError:
                payload = None
            return Event(event_id, kind, payload) if isinstance(payload, dict) else None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self.type = value
        elif name == "data":
            self.data.append(value)
        elif name == "id":
            self.id = int(value) if value.isascii() and value.isdigit() else 0
        return None


class _Resume:
    """Where one job's stream stands across its connections: the last event received
    (sent back as ``Last-Event-ID``), whether the final one came, and how many
    reopenings in a row brought nothing new."""

    def __init__(
        self, job_id: str, after: int | None, delays: Sequence[float], deadline: float | None
    ) -> None:
        self.job_id = job_id
        self.last = after or 0
        self.done = False
        self.delays = tuple(delays)
        self.deadline = deadline
        self.fruitless = 0
        self.news = False
        self.reason = ""
        self.wait_at_least = 0.0
        self.sse = _SSE()

    def connect(self, timeout: httpx.Timeout) -> tuple[_Call, httpx.Timeout]:
        """The request that (re)opens the stream, and its timeouts (a read never
        outlasts the deadline)."""
        self.sse, self.news, self.wait_at_least = _SSE(), False, 0.0
        self.reason = "the stream closed before the job finished"
        headers = {"Accept": "text/event-stream"}
        if self.last:
            headers["Last-Event-ID"] = str(self.last)
        read = STREAM_READ_TIMEOUT_S
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"job {self.job_id} did not finish in time")
            read = min(read, left)
        call = _Call("GET", f"{_job_path(self.job_id)}/events", headers=headers)
        return call, httpx.Timeout(
            connect=timeout.connect, read=read, write=timeout.write, pool=timeout.pool
        )

    def feed(self, line: str) -> Event | None:
        """The event this line completes, if it is one not received yet."""
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise TimeoutError(f"job {self.job_id} did not finish in time")
        event = self.sse.feed(line)
        if event is None or (event.id and event.id <= self.last):
            return None  # had already (sent again by a server or proxy that replays more)
        if event.id:
            self.last, self.news = event.id, True
        self.done = event.final
        return event

    def refused(self, response: httpx.Response) -> None:
        """A stream that did not open (its body read): done on 204 (nothing comes after
        the final event); a temporary refusal is retried; any other raises."""
        if response.status_code == 204:
            self.done = True
            return
        error = _error_of(response)
        if error.status < 500 and error.status not in _REFUSED:
            raise error  # not found, unauthorized: asking again will not help
        self.reason, self.wait_at_least = str(error), error.retry_after or 0.0

    def dropped(self, error: httpx.TransportError) -> None:
        self.reason = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__

    def pause(self) -> float:
        """Seconds to wait before reopening; raises :class:`StreamLost` after too many
        fruitless reopenings in a row."""
        if self.news:  # the stream brought something: reopen at once
            self.fruitless = 0
            return self.wait_at_least
        self.fruitless += 1
        if self.fruitless > len(self.delays):
            raise StreamLost(
                f"{self.reason} (gave up after {len(self.delays)} reconnects)",
                self.job_id,
                self.last,
            )
        pause = max(self.delays[self.fruitless - 1], self.wait_at_least)
        if self.deadline is not None and time.monotonic() + pause > self.deadline:
            raise TimeoutError(f"job {self.job_id} did not finish in time")
        return pause


# --- the clients -----------------------------------------------------------------------


class _Base:
    """What both clients hold: the server's URL, the key's header, timeouts, retries."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        timeout: float | httpx.Timeout,
        retries: Retries | None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.retries = retries or Retries()
        self.timeout = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def _resume(self, job_id: str, after: int | None, deadline: float | None = None) -> _Resume:
        return _Resume(job_id, after, self.retries.reconnect_s, deadline)


class Fanout(_Base):
    """A blocking client of one Fanout server; ``api_key`` is sent as
    ``Authorization: Bearer``. ``transport`` replaces httpx's network (tests). Use it as
    a context manager, or call :meth:`close`."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        api_key: str | None = None,
        *,
        timeout: float | httpx.Timeout = 30.0,
        transport: httpx.BaseTransport | None = None,
        retries: Retries | None = None,
    ) -> None:
        super().__init__(base_url, api_key, timeout, retries)
        self._http = httpx.Client(
            base_url=self.base_url, headers=self.headers, timeout=self.timeout, transport=transport
        )

    def __enter__(self) -> Fanout:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def create(
        self,
        spec: Mapping[str, Any] | str | bytes,
        *,
        idempotency_key: str | None = None,
        lanes: bool = True,
    ) -> Job:
        """Create a job from its spec (a mapping, or JSON text sent as it is); the job
        as created (``202``). The same ``idempotency_key`` and spec give the same job;
        without a key, a new one is made for this call, so its retries are safe. With
        ``lanes=False`` the job comes without its lanes (``progress`` counts them)."""
        return cast(Job, self._send(_create(spec, idempotency_key, lanes)))

    def get(self, job_id: str, *, lanes: bool = True) -> Job:
        """The job, its lanes and, once it has ended, its result or error. With
        ``lanes=False``, ``lanes`` is empty and ``progress`` counts them per state: a big
        job stays cheap to poll, and :meth:`lanes` reads them a page at a time."""
        return cast(Job, self._send(_get(job_id, lanes)))

    def cancel(self, job_id: str, *, lanes: bool = True) -> Job:
        """Cancel the job (running lanes are stopped); the job after (without its lanes
        with ``lanes=False``). A finished job raises :class:`Conflict`."""
        return cast(Job, self._send(_cancel(job_id, lanes)))

    def lanes(
        self,
        job_id: str,
        *,
        status: str | None = None,
        name: str | None = None,
        page_size: int = 100,
    ) -> Iterator[dict[str, Any]]:
        """The job's lanes in lane order (with ``status``, only those in that
        :class:`service.states.LaneStatus`; with ``name``, the one of that name), fetched
        ``page_size`` (1 to 1000) at a time as the iteration goes."""
        cursor = None
        while True:
            page = self._send(_lane_page(job_id, status, name, page_size, cursor))
            yield from page["lanes"]
            if not (cursor := page.get("next_cursor")):
                return

    def list(self, *, status: str | None = None, page_size: int = 50) -> Iterator[JobSummary]:
        """The caller's jobs, newest first (with ``status``, only those), fetched
        ``page_size`` at a time as the iteration goes."""
        cursor = None
        while True:
            page = self._send(_page(status, page_size, cursor))
            yield from page["jobs"]
            if not (cursor := page.get("next_cursor")):
                return

    def stream(self, job_id: str, *, after: int | None = None) -> Iterator[Event]:
        """The job's events after event ``after`` (from the first without), each once
        and in order, live as they happen (live-only deltas too, with id 0); it ends
        after the final event. A dropped stream is reopened where it broke;
        :class:`StreamLost` when that fails."""
        return self._follow(self._resume(job_id, after))

    def wait(self, job_id: str, *, timeout: float | None = None) -> Job:
        """The job once it has ended, followed on its stream; :class:`TimeoutError`
        after ``timeout`` seconds."""
        resume = self._resume(job_id, None, _deadline(timeout))
        job = self.get(job_id)
        if job["status"] in TERMINAL_JOB:
            return job
        for _ in self._follow(resume):
            pass
        return self.get(job_id)

    def _send(self, call: _Call) -> Any:
        tries = _Tries(self.retries, call.repeatable)
        while True:
            try:
                response = self._http.request(
                    call.method,
                    call.path,
                    params=call.params,
                    content=call.content,
                    headers=call.headers,
                )
            except httpx.TransportError as exc:
                time.sleep(tries.pause(exc))
                continue
            if response.is_success:
                return response.json()
            time.sleep(tries.pause(_error_of(response)))

    def _follow(self, resume: _Resume) -> Iterator[Event]:
        while True:
            call, timeout = resume.connect(self.timeout)
            try:
                with self._http.stream(
                    call.method, call.path, headers=call.headers, timeout=timeout
                ) as response:
                    if response.status_code == 200:
                        for line in response.iter_lines():
                            if (event := resume.feed(line)) is not None:
                                yield event
                                if resume.done:
                                    return
                    else:
                        response.read()
                        resume.refused(response)
                        if resume.done:
                            return
            except httpx.TransportError as exc:
                resume.dropped(exc)
            time.sleep(resume.pause())


class AsyncFanout(_Base):
    """:class:`Fanout` for asyncio: the same methods, awaited (``list`` and ``stream``
    are async iterators). Use it as an async context manager, or await :meth:`close`."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        api_key: str | None = None,
        *,
        timeout: float | httpx.Timeout = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
        retries: Retries | None = None,
    ) -> None:
        super().__init__(base_url, api_key, timeout, retries)
        self._http = httpx.AsyncClient(
            base_url=self.base_url, headers=self.headers, timeout=self.timeout, transport=transport
        )

    async def __aenter__(self) -> AsyncFanout:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def create(
        self,
        spec: Mapping[str, Any] | str | bytes,
        *,
        idempotency_key: str | None = None,
        lanes: bool = True,
    ) -> Job:
        """See :meth:`Fanout.create`."""
        return cast(Job, await self._send(_create(spec, idempotency_key, lanes)))

    async def get(self, job_id: str, *, lanes: bool = True) -> Job:
        """See :meth:`Fanout.get`."""
        return cast(Job, await self._send(_get(job_id, lanes)))

    async def cancel(self, job_id: str, *, lanes: bool = True) -> Job:
        """See :meth:`Fanout.cancel`."""
        return cast(Job, await self._send(_cancel(job_id, lanes)))

    async def lanes(
        self,
        job_id: str,
        *,
        status: str | None = None,
        name: str | None = None,
        page_size: int = 100,
    ) -> AsyncIterator[dict[str, Any]]:
        """See :meth:`Fanout.lanes`."""
        cursor = None
        while True:
            page = await self._send(_lane_page(job_id, status, name, page_size, cursor))
            for lane in page["lanes"]:
                yield lane
            if not (cursor := page.get("next_cursor")):
                return

    async def list(
        self, *, status: str | None = None, page_size: int = 50
    ) -> AsyncIterator[JobSummary]:
        """See :meth:`Fanout.list`."""
        cursor = None
        while True:
            page = await self._send(_page(status, page_size, cursor))
            for job in page["jobs"]:
                yield job
            if not (cursor := page.get("next_cursor")):
                return

    def stream(self, job_id: str, *, after: int | None = None) -> AsyncIterator[Event]:
        """See :meth:`Fanout.stream`."""
        return self._follow(self._resume(job_id, after))

    async def wait(self, job_id: str, *, timeout: float | None = None) -> Job:
        """See :meth:`Fanout.wait`."""
        resume = self._resume(job_id, None, _deadline(timeout))
        job = await self.get(job_id)
        if job["status"] in TERMINAL_JOB:
            return job
        async for _ in self._follow(resume):
            pass
        return await self.get(job_id)

    async def _send(self, call: _Call) -> Any:
        tries = _Tries(self.retries, call.repeatable)
        while True:
            try:
                response = await self._http.request(
                    call.method,
                    call.path,
                    params=call.params,
                    content=call.content,
                    headers=call.headers,
                )
            except httpx.TransportError as exc:
                await asyncio.sleep(tries.pause(exc))
                continue
            if response.is_success:
                return response.json()
            await asyncio.sleep(tries.pause(_error_of(response)))

    async def _follow(self, resume: _Resume) -> AsyncIterator[Event]:
        while True:
            call, timeout = resume.connect(self.timeout)
            try:
                async with self._http.stream(
                    call.method, call.path, headers=call.headers, timeout=timeout
                ) as response:
                    if response.status_code == 200:
                        async for line in response.aiter_lines():
                            if (event := resume.feed(line)) is not None:
                                yield event
                                if resume.done:
                                    return
                    else:
                        await response.aread()
                        resume.refused(response)
                        if resume.done:
                            return
            except httpx.TransportError as exc:
                resume.dropped(exc)
            await asyncio.sleep(resume.pause())
