"""One attempt of an http task: one outbound call through the egress guard.

Output: ``{"status", "headers" (a few, lower-case), "body" (JSON if the response says
JSON, else text)}``; an answer with status 400 or more fails the lane (408, 409, 429
and 5xx transiently).
"""

from __future__ import annotations

import json
from typing import Any

import httpx

from ..egress import (
    DEFAULT_MAX_RESPONSE_BYTES,
    EgressDenied,
    ResponseTooLarge,
    TooManyRedirects,
    fetch,
)
from ..spec import HttpTask
from ..states import ErrorType
from .base import Attempt, connection_failed, invalid, status_attempt, timed_out

# Response headers an http task's output keeps: the ones a caller can act on.
SELECTED_HEADERS = (
    "content-type",
    "content-length",
    "content-language",
    "etag",
    "last-modified",
    "cache-control",
    "expires",
    "date",
    "retry-after",
)
# Framing headers httpx computes itself; a caller's value could only confuse it
# (or, for Host, name a different virtual host than the one that was checked).
_CALLER_HEADERS_DROPPED = frozenset({"host", "content-length", "transfer-encoding", "connection"})


async def run_http(
    client: httpx.AsyncClient,
    task: HttpTask,
    *,
    timeout: float,
    max_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
) -> Attempt:
    """One attempt of an http task, whole within ``timeout``; every failure is an Attempt."""
    headers = {k: v for k, v in task.headers.items() if k.lower() not in _CALLER_HEADERS_DROPPED}
    try:
        fetched = await fetch(
            client,
            task.method,
            task.url,
            headers=headers,
            json=task.json_body,
            timeout=timeout,
            max_bytes=max_bytes,
        )
    except EgressDenied as exc:
        return Attempt(error_type=ErrorType.EGRESS_DENIED, error_message=exc.reason)
    except ResponseTooLarge as exc:
        return invalid(str(exc))
    except TooManyRedirects as exc:
        return Attempt(error_type=ErrorType.UPSTREAM_ERROR, error_message=str(exc))
    except (TimeoutError, httpx.TimeoutException):
        return timed_out(timeout)
    except httpx.LocalProtocolError as exc:
        return _not_sent(exc)
    except httpx.TransportError as exc:
        return connection_failed(exc)
    except httpx.DecodingError as exc:
        return invalid(f"undecodable body: {exc}")
    except (ValueError, UnicodeError) as exc:  # a header value httpx refuses to send
        return _not_sent(exc)
    if fetched.status >= 400:
        snippet = fetched.text[:200].strip()
        return status_attempt(fetched.status, snippet, fetched.headers.get("retry-after"))
    body: Any
    if fetched.is_json and fetched.content:
        try:
            body = json.loads(fetched.content)
        except ValueError as exc:
            return invalid(f"the JSON body does not parse: {exc}")
    else:
        body = fetched.text
    selected = {name: fetched.headers[name] for name in SELECTED_HEADERS if name in fetched.headers}
    return Attempt(output={"status": fetched.status, "headers": selected, "body": body})


def _not_sent(exc: Exception) -> Attempt:
    return Attempt(
        error_type=ErrorType.UPSTREAM_ERROR, error_message=f"the request could not be sent: {exc}"
    )
