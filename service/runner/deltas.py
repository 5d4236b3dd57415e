"""Live text of streaming calls: ``lane.delta`` and ``aggregate.delta`` events,
coalesced."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from ..events import Event
from ..states import EventType
from ..store.rendering import iso


class DeltaCoalescer:
    """Text chunks of a streaming call, sent to live subscribers at most ~10 times a
    second as events of type ``kind`` (sequence 0: never stored, never replayed), each
    with ``fields`` (which lane or aggregate, which attempt) and the new ``text``."""

    INTERVAL_S = 0.1

    def __init__(
        self,
        publish: Callable[[list[Event]], None],
        job_id: str,
        kind: EventType,
        fields: dict[str, object],
    ) -> None:
        self.publish = publish  # to this process's hub, and on PostgreSQL to the others'
        self.job_id = job_id
        self.kind = kind
        self.fields = fields
        self._parts: list[str] = []
        self._last_sent = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def add(self, text: str) -> None:
        self._parts.append(text)
        wait = self._last_sent + self.INTERVAL_S - time.monotonic()
        if wait <= 0:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(wait, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._parts:
            return
        text, self._parts = "".join(self._parts), []
        self._last_sent = time.monotonic()
        data = {"job_id": self.job_id, "seq": 0, "at": iso(time.time()), **self.fields}
        data["text"] = text
        self.publish([{"job_id": self.job_id, "seq": 0, "type": self.kind, "data": data}])
