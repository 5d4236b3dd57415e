"""What the runner's parts share: one lifecycle, shielded writes, and how a part keeps
going when a round of its work fails.

Every part (:class:`Part`) runs until cancelled, can stop taking new work at once
(``stop_claiming``), and reports the tasks it has in flight so that a graceful stop
can wait for them (drain) before they are cancelled and their leases given back.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Coroutine
from typing import Any, Protocol, TypeVar

from ..attempts import Attempt, raised

log = logging.getLogger("fanout.runner")
T = TypeVar("T")


class Part(Protocol):
    async def run(self) -> None:
        """Work until cancelled."""

    def stop_claiming(self) -> None:
        """Take no new work from now on."""

    def in_flight(self) -> list[asyncio.Task[None]]:
        """The work this part has started and not finished."""


class Writes:
    """Database writes that run to their end even if their caller is cancelled.

    Cancelling a coroutine in the middle of a transaction can abandon the connection
    with the transaction still open (on SQLite, holding the write lock that the next
    connection then waits on). Shielded, a write finishes or fails on its own, and a
    stopping runner waits for the writes still going (:meth:`wait`) before it gives
    its leases back.
    """

    def __init__(self) -> None:
        self._pending: set[asyncio.Future[Any]] = set()

    def __call__(self, work: Coroutine[Any, Any, T]) -> Awaitable[T]:
        task = asyncio.ensure_future(work)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        return asyncio.shield(task)

    async def wait(self, timeout: float) -> None:
        if self._pending:
            await asyncio.wait(set(self._pending), timeout=timeout)


async def guarded(call: Awaitable[Attempt], what: str) -> Attempt:
    """An attempt that raises is a defect, not an answer, but it must still end: a lane
    (or reducer) that never reports stays running under this process's lease, which its
    heartbeat renews for as long as the process lives."""
    try:
        return await call
    except Exception as exc:
        log.exception("%s: the attempt raised", what)
        return raised(exc)


async def logged(work: Awaitable[object], doing: str) -> None:
    """A round of housekeeping that fails (a lost connection, a deadlock victim) is
    logged and tried again next round, rather than stopping the runner's other parts."""
    try:
        await work
    except Exception:
        log.exception("failed %s; trying again next round", doing)


async def sleep_until_woken(event: asyncio.Event, timeout: float) -> None:
    """Wait for ``event`` at most ``timeout`` seconds, then clear it.

    ``asyncio.timeout``, not ``wait_for``: on 3.11 ``wait_for`` can swallow a cancel
    that lands as the wait ends, and the runner would never stop.
    """
    try:
        async with asyncio.timeout(max(0.0, timeout)):
            await event.wait()
    except TimeoutError:
        pass
    event.clear()
