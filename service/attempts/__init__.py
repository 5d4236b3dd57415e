"""One attempt of one task: no database, no FastAPI.

::

    base.py      Attempt (the outcome as a value), the status -> error rule, Executor
    llm.py       chat completions: the lean client (aiohttp) and the openai SDK's
    http.py      http tasks, through the egress guard
    default.py   TaskExecutor: the Executor the runner uses, by task kind
"""

from .base import (
    TRANSIENT_STATUSES,
    Attempt,
    Executor,
    OnDelta,
    raised,
    retry_after_seconds,
    status_attempt,
)
from .default import TaskExecutor

__all__ = [
    "TRANSIENT_STATUSES",
    "Attempt",
    "Executor",
    "OnDelta",
    "TaskExecutor",
    "raised",
    "retry_after_seconds",
    "status_attempt",
]
