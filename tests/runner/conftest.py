"""The runner with a scripted executor: real databases, no LLM, no HTTP, no subprocess.

A :class:`Script` is the executor (``service.attempts.Executor``) whose attempts a
test writes: a function of the call that returns (or awaits) an Attempt. It counts
the calls, and those that a decision cancelled while they ran.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from service import events as ev
from service.attempts import Attempt, OnDelta
from service.events import Event, EventHub
from service.metrics import Metrics
from service.policy import Retrying
from service.runner import Runner, RunnerConfig
from service.spec import HttpTask, LlmTask, Message
from service.states import FINAL_EVENTS
from service.store import Store
from service.store.db import Database
from service.views import JobView, Usage
from tests.store.conftest import parse


@dataclass
class Call:
    task: LlmTask | HttpTask
    timeout: float
    messages: list[Message] | None
    on_delta: OnDelta | None

    @property
    def text(self) -> str:
        """The last message's text: what tells the lanes of a test apart."""
        assert isinstance(self.task, LlmTask)
        content = (self.messages or self.task.messages)[-1].content
        return content if isinstance(content, str) else str(content)


Answer = Callable[[Call], Attempt | Awaitable[Attempt]]


def echo(call: Call) -> Attempt:
    return Attempt(
        output=f"Echo: {call.text}",
        usage=Usage(prompt_tokens=1, completion_tokens=1, total_tokens=2),
    )


async def hang(_call: Call) -> Attempt:
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


class Script:
    def __init__(self, answer: Answer = echo) -> None:
        self.answer = answer
        self.calls: list[Call] = []
        self.cancelled: list[Call] = []
        self.in_flight = 0
        self.changed = asyncio.Event()

    async def __call__(
        self,
        task: LlmTask | HttpTask,
        *,
        timeout: float,
        messages: list[Message] | None = None,
        on_delta: OnDelta | None = None,
    ) -> Attempt:
        call = Call(task, timeout, messages, on_delta)
        self.calls.append(call)
        self.in_flight += 1
        self.changed.set()
        try:
            result = self.answer(call)
            return await result if inspect.isawaitable(result) else result
        except asyncio.CancelledError:
            self.cancelled.append(call)
            raise
        finally:
            self.in_flight -= 1
            self.changed.set()

    async def until(self, check: Callable[[Script], bool], within: float = 10) -> None:
        """Wait until ``check(self)`` holds, woken by each call's start and end."""
        async with asyncio.timeout(within):
            while not check(self):
                self.changed.clear()
                await self.changed.wait()


@dataclass
class Harness:
    store: Store
    hub: EventHub
    db: Database
    http: httpx.AsyncClient
    published: list[Event] = field(default_factory=list)
    runners: list[tuple[Runner, asyncio.Task[None]]] = field(default_factory=list)

    def runner(self, script: Script, **config: Any) -> Runner:
        """Start a runner (a process, as far as leases go) that runs ``script``."""
        settings = {"poll_interval_s": 0.2, "retrying": Retrying(0.01, 0.05), **config}
        runner = Runner(
            self.store,
            self.hub,
            script,
            http=self.http,
            metrics=Metrics(),
            config=RunnerConfig(**settings),
        )
        self.runners.append((runner, asyncio.create_task(runner.run())))
        return runner

    async def stop(self, runner: Runner) -> None:
        for entry in list(self.runners):
            if entry[0] is runner:
                entry[1].cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await entry[1]
                self.runners.remove(entry)

    async def create(self, spec: dict[str, Any]) -> str:
        job, _ = await self.store.jobs.create(parse(spec), "acme")
        for runner, _task in self.runners:
            runner.wake()
        return job.id

    async def events(self, job_id: str, within: float = 10) -> list[Event]:
        """The job's events up to its final one (waiting for it, at most ``within`` s)."""
        seen: list[Event] = []
        async with asyncio.timeout(within):
            stream = ev.stream(
                self.hub, job_id, 0, self.store.log.after, self.store.jobs.is_finished
            )
            async with contextlib.aclosing(stream):
                async for event in stream:
                    seen.append(event)
                    if event["type"] in FINAL_EVENTS:
                        break
        return seen

    async def run(self, spec: dict[str, Any], within: float = 10) -> JobView:
        """Create the job, wait for its final event, return it as stored."""
        job_id = await self.create(spec)
        await self.events(job_id, within)
        return await self.store.jobs.get(job_id, None)

    def live(self, kind: str) -> list[Event]:
        return [event for event in self.published if event["type"] == kind]


@pytest.fixture
async def harness(database_url: str) -> AsyncIterator[Harness]:
    db = Database(database_url, pool_size=4)
    hub = EventHub()
    db.on_commit = hub.publish
    async with httpx.AsyncClient() as http:
        harness = Harness(Store(db, lease_seconds=5), hub, db, http)
        hub.add_listener(harness.published.extend)
        try:
            yield harness
        finally:
            for runner, _task in list(harness.runners):
                await harness.stop(runner)
            await db.dispose()


def since(started: float) -> float:
    return time.monotonic() - started
