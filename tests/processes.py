"""Real Fanout processes on loopback: start them, signal them, read their logs and tables.

Every wait here is a poll of a condition under a deadline: a test never sleeps on the
hope that something has happened by then.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import httpx
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from service.store.tables import events, lanes
from tests.support import free_port

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


async def poll(
    probe: Callable[[], Awaitable[T | None]], *, within: float, what: str, every: float = 0.05
) -> T:
    """Call ``probe`` until it returns something truthy and return that; after
    ``within`` seconds fail, naming ``what`` and the last value seen."""
    deadline = time.monotonic() + within
    while True:
        value = await probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {within} s; last seen: {value!r}")
        await asyncio.sleep(every)


class Process:
    """``python -m service.cli ARGS`` with its output (stdout and stderr) in a log file."""

    def __init__(
        self, name: str, args: list[str], env: dict[str, str], log: Path, port: int | None
    ) -> None:
        self.name = name
        self.port = port
        self.log_path = log
        self._log = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", *args],
            env=env,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def url(self) -> str:
        assert self.port is not None, f"{self.name} serves no HTTP"
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def send(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def stopped(self) -> bool:
        """Stopped by a signal (SIGSTOP), as ``/proc`` tells."""
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] == "T"

    def kill9(self) -> None:
        """``kill -9``: no handler runs, no lease is released, nothing is flushed."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    async def ready(self, within: float = 60) -> None:
        """An API process answers ``/readyz``; a worker has logged that it runs."""

        async def probe() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"{self.name} exited with {self.proc.returncode}:\n{self.log()}"
                )
            if self.port is None:
                return re.search(r"worker \S+ running", self.log()) is not None
            try:
                async with httpx.AsyncClient(timeout=1) as http:
                    return (await http.get(f"{self.url}/readyz")).status_code == 200
            except httpx.TransportError:
                return False

        await poll(probe, within=within, what=f"{self.name} ready", every=0.1)

    async def logged(self, pattern: str, within: float) -> str:
        """Wait until the log holds a line matching ``pattern``; return that line."""

        async def probe() -> str | None:
            found = re.search(f".*{pattern}.*", self.log())
            return found.group(0) if found else None

        return await poll(probe, within=within, what=f"{self.name} logging {pattern!r}")

    def terminate(self) -> None:
        """Ask it to stop (SIGTERM): it drains, then exits."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a stopped process cannot handle SIGTERM
            self.proc.terminate()

    def close(self) -> None:
        """Stop gracefully (SIGTERM), by force when that takes too long."""
        self.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


class Fleet:
    """The processes a test starts, all with ``env`` (database, fake LLM, lease...).

    ``shared`` are processes started for several tests (the PostgreSQL replicas): the
    report shows what they logged since this fleet was made.
    """

    def __init__(self, logs: Path, env: dict[str, str], shared: Iterable[Process] = ()) -> None:
        self.logs = logs
        self.env = env
        self.processes: list[Process] = []
        self.shared = {p: len(p.log()) for p in shared}

    def _start(
        self, name: str, args: list[str], port: int | None, settings: dict[str, str]
    ) -> Process:
        env = {**self.env, **_settings_env(settings)}
        process = Process(name, args, env, self.logs / f"{name}.log", port)
        self.processes.append(process)
        return process

    def serve(self, name: str, *, runner: bool = True, **settings: str) -> Process:
        """``fanout serve`` on a free port; ``settings`` as for :func:`process_env`."""
        port = free_port()
        args = ["serve", "--port", str(port)] + ([] if runner else ["--no-runner"])
        return self._start(name, args, port, settings)

    def worker(self, name: str, **settings: str) -> Process:
        return self._start(name, ["worker"], None, settings)

    def close(self) -> None:
        """Stop every process: all asked at once, so their drains overlap."""
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            process.close()

    def logged_here(self, process: Process) -> str:
        """What a process logged while this fleet ran (all of it, if the fleet made it)."""
        return process.log()[self.shared.get(process, 0) :]

    def report(self) -> str:
        logs = [(p, self.logged_here(p)) for p in [*self.processes, *self.shared]]
        return "\n".join(
            f"----- {p.name} (pid {p.pid}, exit {p.proc.returncode}) -----\n{_tail(log)}"
            for p, log in logs
        )


def first_traceback(log: str) -> str | None:
    """The first traceback in a log, cut to the part that names the error (logs are
    plain text, or JSON lines with the traceback in one field)."""
    at = log.find("Traceback")
    if at < 0:
        return None
    line = log[log.rfind("\n", 0, at) + 1 :].split("\n", 1)[0]
    if line.startswith("{"):
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            return f"{record.get('message')}\n{str(record.get('error', ''))[-2500:]}"
    return log[at : at + 4000]


def _tail(log: str, lines: int = 150) -> str:
    return "\n".join(log.splitlines()[-lines:])


def process_env(database_url: str, fake_llm: str, **settings: str) -> dict[str, str]:
    """This environment without any ``FANOUT_*`` of its own, plus the given settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FANOUT_")}
    env.update(
        PYTHONUNBUFFERED="1",
        OPENAI_BASE_URL=fake_llm,
        OPENAI_API_KEY="x",
        FANOUT_DATABASE_URL=database_url,
        FANOUT_LOG_LEVEL="INFO",
        # Lanes still running when a test ends need not hold its teardown for long.
        FANOUT_DRAIN_SECONDS="1",
    )
    env.update(_settings_env(settings))
    return env


def _settings_env(settings: dict[str, str]) -> dict[str, str]:
    """``lease_seconds="2"`` -> ``FANOUT_LEASE_SECONDS=2``."""
    return {f"FANOUT_{name.upper()}": value for name, value in settings.items()}


async def started(*processes: Process, within: float = 60) -> None:
    await asyncio.gather(*(p.ready(within) for p in processes))


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine from a synchronous fixture (pytest-asyncio may have a loop running)."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


class Tables:
    """Direct reads of the service's tables: lease owners are not in the API."""

    def __init__(self, url: str) -> None:
        self.engine = create_async_engine(url, poolclass=NullPool)

    async def rows(self, sql: str, **params: Any) -> list[dict[str, Any]]:
        async with self.engine.connect() as conn:
            return [dict(row) for row in (await conn.execute(text(sql), params)).mappings()]

    async def lanes(self, job_ids: Iterable[str] | None = None) -> list[dict[str, Any]]:
        query = select(lanes).order_by(lanes.c.job_id, lanes.c.idx)
        if job_ids is not None:
            query = query.where(lanes.c.job_id.in_(list(job_ids)))
        async with self.engine.connect() as conn:
            return [dict(row) for row in (await conn.execute(query)).mappings()]

    async def events(self, job_id: str) -> list[dict[str, Any]]:
        """The job's stored events, in sequence order: [{"seq", "type", "data"}]."""
        query = (
            select(events.c.seq, events.c.type, events.c.data)
            .where(events.c.job_id == job_id)
            .order_by(events.c.seq)
        )
        async with self.engine.connect() as conn:
            return [dict(row) for row in (await conn.execute(query)).mappings()]

    async def truncate(self) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(text("TRUNCATE events, lanes, jobs, providers CASCADE"))

    async def in_transaction(self, ports: set[int]) -> list[dict[str, Any]]:
        """PostgreSQL sessions from these client ports that are inside a transaction."""
        if not ports:
            return []
        sessions = await self.rows(
            "SELECT client_port, state, query FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        return [
            s for s in sessions if s["client_port"] in ports and s["state"] not in ("idle", None)
        ]

    async def dispose(self) -> None:
        await self.engine.dispose()


def tcp_ports(pid: int) -> set[int]:
    """Local TCP ports of a process's sockets (Linux ``/proc``): its database sessions
    show them as ``client_port`` in ``pg_stat_activity``."""
    inodes = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        path = Path(f"/proc/{pid}/net/{table}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            if fields[9] in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports
