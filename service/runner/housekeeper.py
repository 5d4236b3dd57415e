"""The housekeeper: this process's leases renewed (the heartbeat), and the sweep:
passed deadlines decided, and lanes whose worker went away (its lease expired)
failed or queued again after a backoff (a lost lease is a failed attempt)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from ..policy import Retrying
from ..store import Store
from .lifecycle import Writes, logged


class Housekeeper:
    def __init__(
        self,
        store: Store,
        writes: Writes,
        *,
        owner: str,
        heartbeat_s: float,
        sweep_s: float,
        retrying: Retrying,
        holds_leases: Callable[[], bool],
        on_requeued: Callable[[], None],
        on_reduce: Callable[[list[str]], None],
    ) -> None:
        self.store = store
        self.writes = writes
        self.owner = owner
        self.heartbeat_s = heartbeat_s
        self.sweep_s = sweep_s
        self.retrying = retrying
        self.holds_leases = holds_leases
        self.on_requeued = on_requeued
        self.on_reduce = on_reduce

    def stop_claiming(self) -> None:
        pass  # the heartbeat must go on while the others drain

    def in_flight(self) -> list[asyncio.Task[None]]:
        return []

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self._heartbeat_loop())
            group.create_task(self._sweep_loop())

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            if self.holds_leases():
                await logged(
                    self.writes(self.store.queue.renew_leases(self.owner)), "renewing leases"
                )

    async def _sweep_loop(self) -> None:
        while True:
            await logged(self.writes(self._sweep()), "sweeping")
            await asyncio.sleep(self.sweep_s)

    async def _sweep(self) -> None:
        reduce_jobs = await self.store.outcomes.expire_deadlines()
        lost = await self.store.outcomes.expire_leases(self.retrying)
        reduce_jobs += lost.reduce_jobs
        if reduce_jobs:
            self.on_reduce(reduce_jobs)
        if lost.requeued:
            self.on_requeued()
