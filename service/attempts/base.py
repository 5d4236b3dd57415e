"""What every attempt shares: the :class:`Attempt` value, the one status -> error
rule, and the :class:`Executor` protocol the runner calls.

A failed attempt is data (an :class:`Attempt` with an ``error_type``), never an
exception left to fly: the runner decides from it whether to retry
(:func:`service.policy.next_step`).
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ..spec import HttpTask, LlmTask, Message
from ..states import ErrorType
from ..views import NO_USAGE, Usage

# Statuses worth another attempt: the request may well succeed if sent again.
TRANSIENT_STATUSES = frozenset({408, 409, 429})

OnDelta = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class Attempt:
    """How one attempt of one task ended: its output, or why it failed."""

    output: Any = None  # an llm answer's text (or None), an http task's response
    error_type: ErrorType | None = None
    error_message: str | None = None
    transient: bool = False  # worth another attempt
    retry_after: float | None = None  # no sooner than this (``Retry-After``), seconds
    usage: Usage = NO_USAGE
    # What an llm answer says beside its text: finish_reason, tool_calls, refusal and a
    # logprobs summary ({"mean", "tokens"}), each only when there is one.
    reply: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return self.error_type is None


class Executor(Protocol):
    """Runs one attempt of a task, bounded by ``timeout``; every failure is returned as
    an :class:`Attempt`. ``messages`` replaces an llm task's own (the reducer's
    prompt); ``on_delta`` receives a streamed llm answer's text as it comes."""

    async def __call__(
        self,
        task: LlmTask | HttpTask,
        *,
        timeout: float,
        messages: list[Message] | None = None,
        on_delta: OnDelta | None = None,
    ) -> Attempt: ...


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


def status_attempt(status: int, detail: str, retry_after: str | None) -> Attempt:
    """An answer with an error status: 408, 409, 429 and 5xx are worth retrying (after
    ``Retry-After`` when given), the rest fail the lane at once."""
    transient = status in TRANSIENT_STATUSES or status >= 500
    return Attempt(
        error_type=ErrorType.RATE_LIMITED if status == 429 else ErrorType.UPSTREAM_ERROR,
        error_message=f"HTTP {status}: {detail}" if detail else f"HTTP {status}",
        transient=transient,
        retry_after=retry_after_seconds(retry_after) if transient else None,
    )


def timed_out(timeout: float) -> Attempt:
    return Attempt(
        error_type=ErrorType.TIMEOUT,
        error_message=f"no answer within {timeout:g} s",
        transient=True,
    )


def connection_failed(exc: BaseException) -> Attempt:
    return Attempt(
        error_type=ErrorType.UPSTREAM_ERROR,
        error_message=f"connection failed: {exc}",
        transient=True,
    )


def invalid(message: str) -> Attempt:
    return Attempt(error_type=ErrorType.INVALID_RESPONSE, error_message=message)


def raised(exc: BaseException) -> Attempt:
    """An attempt that raised: a defect, not an answer, but it must still end."""
    return Attempt(
        error_type=ErrorType.INTERNAL_ERROR, error_message=f"{type(exc).__name__}: {exc}"
    )
