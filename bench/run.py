"""``make bench``: Fanout side by side with the limit, in one run, on the same work.

Starts the fake LLM (``fanout fake-llm``), the limit (:mod:`bench.limit`, plus its
no-SDK reference) and one ``fanout serve`` per database and lane call path
(``FANOUT_LLM_CLIENT``: ``lean``, the default, and ``sdk``, the openai client kept as
the reference) as real processes on loopback, then measures:

- **voting**: jobs of N = 10, 100, 1,000 lanes at 200 ms and 0 ms upstream latency,
  all lanes running (no early stop), against a bare ``asyncio.gather`` of the same N
  calls, on both call paths. Fanout's time is a caller's: from ``POST /v1/jobs`` to
  the final event on the job's stream. In a scenario each contender (the limit, each
  service) runs its warm-up and repetitions back to back, so its upstream connections
  stay warm (the client's pool drops them after 5 idle seconds); who goes first
  rotates.
- **overhead** (:mod:`bench.overhead`): a 10-lane vote at 0 ms upstream latency,
  30 runs after 5 warm-ups, against the floor (the same 10 calls on bare aiohttp);
  POST to the final event, and where that time goes, phase by phase, from the
  events' ``at``. Lean services only.
- **small jobs**: 200 jobs of 5 lanes posted at once; the time until every job's
  final event against the time of one such job alone. Lean services only.
- **stream delay**: one 1,000-lane job followed by 100 stream clients; the delay
  from each state change (the event's ``at``) to its receipt by each client. Lean
  services only.
- **economy**: each stopping rule beside ``none`` on the same 300 simulated questions
  of 40 lanes (:mod:`bench.economy`): calls per question, agreement, wall time. The
  first lean service only.
- **map** (:mod:`bench.mapjob`): one map job of 10,000 items at 200 ms with
  ``max_concurrency`` 1,000 against the floor, the same calls on bare aiohttp with at
  most 1,000 in flight; POST to 202, POST to the final event, peak memory. Then the
  economy of a vote per item: 200 items of n = 10 under ``confidence`` 0.95 and
  ``none`` (lanes that ran, agreement per item, wall time), on the first lean service.
  Lean services only.

Medians over repetitions; CPU seconds per process from ``/proc/<pid>/stat``; peak
memory from ``VmHWM``, reset before each scenario. Writes ``bench/results.md``
(and the raw numbers to ``bench/results.json``) and prints the table; with
``--merge``, the sections not run this time are kept from the last ``results.json``.
The services of the other call paths (``sdk``, ``limited``) start only for the voting
section.

    python -m bench.run [--quick] [--reps 3] [--only voting,overhead,small,stream,economy,map]
                        [--db sqlite] [--clients lean] [--merge] [--tree ../other-checkout]
                        [--keep-logs] (--help for all)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from . import client as fc
from . import economy, mapjob, overhead
from .procs import REPO, Proc, free_port, python_argv, raise_fd_limit
from .report import write_report

HERE = Path(__file__).resolve().parent
DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"
SECTIONS = ("voting", "overhead", "small", "stream", "economy", "map")
# FANOUT_LLM_CLIENT (lean is the service's default), and "limited": the lean path with
# the default provider's limits configured, so high that they never bind: what the
# cluster-wide provider limits cost a claim.
CLIENTS = ("lean", "sdk", "limited")
UNBOUND_LIMITS = "max_concurrency = 1000000\nrpm = 1000000000\ntpm = 1000000000000\n"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# --- the processes ---------------------------------------------------------------


class Limit:
    """The limit process, driven one JSON line at a time."""

    def __init__(self, fake_url: str, logs: Path, client: str = "sdk") -> None:
        argv = ["--base-url", fake_url, "--max-connections", "2000", "--client", client]
        self.proc = Proc(
            f"limit ({client})",
            python_argv("-m", "bench.limit", *argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            log=logs / f"limit-{client}.log",
        )

    def _call(self, command: dict[str, Any]) -> dict[str, Any]:
        popen = self.proc.popen
        assert popen.stdin is not None and popen.stdout is not None
        popen.stdin.write((json.dumps(command) + "\n").encode())
        popen.stdin.flush()
        line = popen.stdout.readline()
        if not line:
            self.proc.check_alive()
            raise RuntimeError("the limit process closed its output")
        reply: dict[str, Any] = json.loads(line)
        return reply

    async def run(
        self, n: int, model: str, concurrency: int | None = None, prompt: str | None = None
    ) -> dict[str, Any]:
        """N calls; at most ``concurrency`` in flight, call i asking ``prompt`` for i."""
        cpu = self.proc.cpu_s()
        command: dict[str, Any] = {"cmd": "run", "n": n, "model": model}
        if concurrency is not None:
            command["concurrency"] = concurrency
        if prompt is not None:
            command["prompt"] = prompt
        reply = await asyncio.to_thread(self._call, command)
        reply["cpu_s"] = self.proc.cpu_s() - cpu
        if reply.get("errors"):
            raise RuntimeError(
                f"the limit had {reply['errors']} failed calls: {reply['first_error']}"
            )
        return reply

    def stop(self) -> None:
        with contextlib.suppress(OSError, RuntimeError, ValueError):
            self._call({"cmd": "quit"})
        self.proc.stop()


@dataclass
class Service:
    db: str  # sqlite | postgres
    client: str  # the lane call path: lean | sdk
    url: str  # the service's base URL
    proc: Proc
    cleanup: Any = None

    @property
    def key(self) -> str:
        """Its name in the results: ``sqlite``, ``postgres-sdk``..."""
        return service_key(self.db, self.client)


def service_key(db: str, client: str) -> str:
    return db if client == "lean" else f"{db}-{client}"


# The caps a 10,000-item map job needs (lanes per job, its body); they only admit more.
MAX_LANES_PER_JOB = 10_000
MAX_BODY_BYTES = 16_000_000


def service_env(
    database_url: str,
    fake_url: str,
    port: int,
    client: str,
    logs: Path,
    max_lanes: int = MAX_LANES_PER_JOB,
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FANOUT_", "OPENAI_"))}
    if client == "limited":
        providers = logs / "providers-limited.toml"
        providers.write_text(
            f'[providers.default]\nbase_url = "{fake_url}"\napi_key = "bench"\n{UNBOUND_LIMITS}'
        )
        env["FANOUT_PROVIDERS_FILE"] = str(providers)
    env.update(
        FANOUT_DATABASE_URL=database_url,
        FANOUT_PORT=str(port),
        FANOUT_MAX_CONCURRENCY="2000",
        FANOUT_MAX_LANES_PER_JOB=str(max_lanes),
        FANOUT_MAX_BODY_BYTES=str(MAX_BODY_BYTES),
        FANOUT_LOG_LEVEL="WARNING",
        FANOUT_LLM_CLIENT="lean" if client == "limited" else client,
        # One tenant does the work of many here: its per-tenant caps must not bind.
        FANOUT_RATE_LIMIT_PER_MINUTE="0",
        FANOUT_MAX_JOBS_IN_FLIGHT="100000",
        OPENAI_BASE_URL=fake_url,
        OPENAI_API_KEY="bench",
    )
    return env


def start_service(
    db: str,
    client: str,
    database_url: str,
    fake_url: str,
    logs: Path,
    tree: Path = REPO,
    max_lanes: int = MAX_LANES_PER_JOB,
) -> Service:
    port = free_port()
    key = service_key(db, client)
    proc = Proc(
        f"fanout serve ({db}, {client})",
        python_argv("-m", "service.cli", "serve", "--port", str(port)),
        env=service_env(database_url, fake_url, port, client, logs, max_lanes),
        log=logs / f"serve-{key}.log",
        tree=tree,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        proc.wait_http(f"{url}/readyz", timeout=60)
    except BaseException:
        proc.stop()
        raise
    return Service(db, client, url, proc)


async def postgres_admin(admin_url: str, sql: str) -> None:
    import asyncpg

    conn = await asyncio.wait_for(asyncpg.connect(admin_url), 10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@dataclass
class Fake:
    proc: Proc
    url: str  # the OpenAI base URL (…/v1)

    @property
    def root(self) -> str:
        return self.url.removesuffix("/v1")

    async def reset(self, http: aiohttp.ClientSession) -> None:
        async with http.post(f"{self.root}/_reset") as response:
            response.raise_for_status()

    async def stats(self, http: aiohttp.ClientSession) -> dict[str, Any]:
        async with http.get(f"{self.root}/_stats") as response:
            stats: dict[str, Any] = await response.json()
            return stats


# --- measuring ------------------------------------------------------------------


@dataclass
class Sample:
    """One measured run of one contender."""

    wall_s: float
    cpu_s: float
    fake_cpu_s: float
    in_flight: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Scenario:
    name: str
    n: int
    latency_ms: int
    samples: dict[str, list[Sample]] = field(default_factory=dict)
    peak_mb: dict[str, float] = field(default_factory=dict)
    base_mb: dict[str, float] = field(default_factory=dict)

    def add(self, who: str, sample: Sample) -> None:
        self.samples.setdefault(who, []).append(sample)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "n": self.n,
            "latency_ms": self.latency_ms,
            "peak_mb": self.peak_mb,
            "base_mb": self.base_mb,
            "samples": {
                who: [s.__dict__ for s in samples] for who, samples in self.samples.items()
            },
        }


def model_for(latency_ms: int) -> str:
    return f"fake?latency_ms={latency_ms}&answers=391:1"


class Bench:
    def __init__(
        self,
        args: argparse.Namespace,
        fake: Fake,
        limits: dict[str, Limit],
        services: dict[str, Service],
        http: aiohttp.ClientSession,
    ) -> None:
        self.args = args
        self.fake = fake
        self.limits = limits  # "limit" (the SDK) and, with --raw, "raw"
        self.services = services  # every service: the voting section's contenders
        # The small-jobs and stream sections run on the default (lean) path only, to keep
        # the bench's time bounded; on the SDK services when those are all there is.
        lean = {key: s for key, s in services.items() if s.client == "lean"}
        self.main_services = lean or services
        self.http = http
        self.rotation = -1
        self.notes: list[str] = []  # findings worth a line in the report
        # Quick runs skip the small jobs' warm-up: each burst takes seconds.
        self.small_warmup = 0 if args.quick else args.warmup

    async def measure_limit(
        self,
        limit: Limit,
        n: int,
        latency_ms: int,
        concurrency: int | None = None,
        prompt: str | None = None,
    ) -> Sample:
        await self.fake.reset(self.http)
        fake_cpu = self.fake.proc.cpu_s()
        reply = await limit.run(n, model_for(latency_ms), concurrency, prompt)
        fake_cpu = self.fake.proc.cpu_s() - fake_cpu
        stats = await self.fake.stats(self.http)
        return Sample(reply["wall_s"], reply["cpu_s"], fake_cpu, stats["max_in_flight"])

    async def measure_job(self, service: Service, n: int, latency_ms: int) -> Sample:
        await self.fake.reset(self.http)
        cpu, fake_cpu = service.proc.cpu_s(), self.fake.proc.cpu_s()
        run = await fc.run_job(self.http, service.url, fc.voting_spec(n, latency_ms))
        cpu, fake_cpu = service.proc.cpu_s() - cpu, self.fake.proc.cpu_s() - fake_cpu
        fc.check_voting(run, n)
        stats = await self.fake.stats(self.http)
        if stats["requests"] != n:  # retries or re-runs: a finding, not a harness error
            self.notes.append(
                f"{service.key}, N={n} @ {latency_ms} ms: {stats['requests']} upstream calls for "
                f"{n} lanes (retried or re-run lanes; see the service log)"
            )
            log(self.notes[-1])
        extra = {
            "upstream_calls": stats["requests"],
            "post_s": run.posted_s,
            "reconnects": run.reconnects,
            **await fc.phases(self.http, service.url, run),
        }
        return Sample(run.wall_s, cpu, fake_cpu, stats["max_in_flight"], extra)

    async def settle(self) -> None:
        """Let the last run's stragglers (closing streams, idle sweeps) pass."""
        await asyncio.sleep(self.args.pause)

    # --- voting: N lanes against the limit --------------------------------------

    async def voting(self) -> list[Scenario]:
        scenarios = []
        for latency_ms in self.args.latencies:
            for n in self.args.ns:
                scenarios.append(await self.voting_scenario(n, latency_ms))
        return scenarios

    def in_turn(self, contenders: list[str]) -> list[str]:
        """The order the contenders run in this scenario: who goes first rotates by
        scenario."""
        self.rotation += 1
        shift = self.rotation % len(contenders)
        return contenders[shift:] + contenders[:shift]

    async def voting_scenario(self, n: int, latency_ms: int) -> Scenario:
        scenario = Scenario(f"voting N={n} @ {latency_ms} ms", n, latency_ms)
        # The bare-aiohttp reference joins unless --no-raw (it may run for the map alone).
        limits = {who: limit for who, limit in self.limits.items() if who != "raw" or self.args.raw}
        contenders: list[str] = [*limits, *self.services]
        procs = {
            **{who: limit.proc for who, limit in limits.items()},
            **{key: service.proc for key, service in self.services.items()},
        }
        for who, proc in procs.items():
            proc.reset_peak()
            scenario.base_mb[who] = proc.rss_mb()
        # Each contender's runs go back to back, warm-up first: both ends of the upstream
        # connections drop them after 5 idle seconds, and reconnecting 1,000 of them costs
        # more than the difference being measured. Who goes first rotates by scenario.
        for who in self.in_turn(contenders):
            for rep in range(-self.args.warmup, self.args.reps):
                if who in limits:
                    sample = await self.measure_limit(limits[who], n, latency_ms)
                else:
                    sample = await self.measure_job(self.services[who], n, latency_ms)
                if rep >= 0:
                    scenario.add(who, sample)
                await self.settle()
        for who, proc in procs.items():
            scenario.peak_mb[who] = proc.peak_mb()
        line = "  ".join(
            f"{who} {median([s.wall_s for s in scenario.samples[who]]):.3f}s" for who in contenders
        )
        log(f"{scenario.name:<24} {line}")
        return scenario

    # --- overhead: a 10-lane vote at 0 ms against the floor ---------------------------

    async def overhead_section(self) -> dict[str, Any]:
        """The floor and each main service, runs back to back (warm-ups first); who goes
        first rotates."""
        floor = self.limits["raw"]
        samples: dict[str, list[dict[str, Any]]] = {}
        contenders: list[str] = ["raw", *self.main_services]
        started = time.perf_counter()
        for who in self.in_turn(contenders):
            for rep in range(-self.args.overhead_warmup, self.args.overhead_reps):
                await self.fake.reset(self.http)
                if who == "raw":
                    reply = await floor.run(overhead.N, overhead.MODEL)
                    sample: dict[str, Any] = {"wall_s": reply["wall_s"]}
                else:
                    sample = await overhead.measure(self.http, self.main_services[who].url)
                    stats = await self.fake.stats(self.http)
                    if stats["requests"] != overhead.N:
                        self.notes.append(
                            f"{who}, overhead: {stats['requests']} upstream calls for "
                            f"{overhead.N} lanes"
                        )
                        log(self.notes[-1])
                if rep >= 0:
                    samples.setdefault(who, []).append(sample)
                await self.settle()
        line = "  ".join(
            f"{who} {1000 * median([s.get('total_s', s.get('wall_s', 0)) for s in runs]):.1f}ms"
            for who, runs in samples.items()
        )
        log(f"{'overhead N=10 @ 0 ms':<24} {line}")
        return {
            "n": overhead.N,
            "model": overhead.MODEL,
            "reps": self.args.overhead_reps,
            "warmup": self.args.overhead_warmup,
            "duration_s": time.perf_counter() - started,
            "samples": samples,
        }

    # --- many small jobs at once ------------------------------------------------

    async def small_jobs(self) -> list[Scenario]:
        scenarios = []
        jobs, lanes, latency_ms = self.args.small_jobs, 5, 200
        for key, service in self.main_services.items():
            scenario = Scenario(f"{jobs} jobs x {lanes} lanes ({key})", lanes, latency_ms)
            scenario.base_mb[key] = service.proc.rss_mb()
            service.proc.reset_peak()
            spec = fc.voting_spec(lanes, latency_ms)
            for rep in range(-self.small_warmup, self.args.reps):
                single = await self.measure_job(service, lanes, latency_ms)
                await self.settle()
                # The floor: the same calls at once on bare aiohttp, side by side.
                floor = await self.measure_limit(self.limits["raw"], jobs * lanes, latency_ms)
                await self.settle()
                await self.fake.reset(self.http)
                cpu, fake_cpu = service.proc.cpu_s(), self.fake.proc.cpu_s()
                started = time.perf_counter()
                runs = await asyncio.gather(
                    *(fc.run_job(self.http, service.url, spec) for _ in range(jobs))
                )
                wall = time.perf_counter() - started
                cpu, fake_cpu = service.proc.cpu_s() - cpu, self.fake.proc.cpu_s() - fake_cpu
                for run in runs:
                    fc.check_voting(run, lanes)
                stats = await self.fake.stats(self.http)
                job_walls = sorted(run.wall_s for run in runs)
                # Each phase's median over the jobs (read after the clock stopped).
                phases = [await fc.phases(self.http, service.url, run) for run in runs]
                phase_medians = {key: median([p[key] for p in phases]) for key in phases[0]}
                if rep >= 0:
                    scenario.add("single", single)
                    scenario.add("floor", floor)
                    scenario.add(
                        "many",
                        Sample(
                            wall,
                            cpu,
                            fake_cpu,
                            stats["max_in_flight"],
                            {
                                "job_p50_s": job_walls[len(job_walls) // 2],
                                "job_max_s": job_walls[-1],
                                "post_max_s": max(run.posted_s for run in runs),
                                "reconnects": sum(run.reconnects for run in runs),
                                **phase_medians,
                            },
                        ),
                    )
                await self.settle()
            scenario.peak_mb[key] = service.proc.peak_mb()
            one = median([s.wall_s for s in scenario.samples["single"]])
            every = median([s.wall_s for s in scenario.samples["many"]])
            log(f"{scenario.name:<24} one {one:.3f}s  all {every:.3f}s")
            scenarios.append(scenario)
        return scenarios

    # --- the economy of a vote --------------------------------------------------------

    async def economy(self) -> list[dict[str, Any]]:
        """Each stopping rule on the same 300 questions (:mod:`bench.economy`), on the
        first main service."""
        key, service = next(iter(self.main_services.items()))

        async def requests() -> int:
            return int((await self.fake.stats(self.http))["requests"])

        rows = await economy.measure(
            self.http, service.url, lambda: self.fake.reset(self.http), requests, log
        )
        return [{"service": key, **row} for row in rows]

    # --- map: one big job against the floor; a vote per item -------------------------

    async def map_section(self) -> dict[str, Any]:
        """The scale scenario on every main service, then the per-item economy on the
        first; one failing does not lose the other."""
        found: dict[str, Any] = {
            "items": self.args.map_items,
            "max_concurrency": self.args.map_concurrency,
        }
        failures = []
        try:
            found["scale"] = await self.map_scale()
        except Exception as exc:
            failures.append(f"map scale: {type(exc).__name__}: {exc}")
            self.notes.append(f"section 'map' (scale) failed: {failures[-1]}")
            log(self.notes[-1])
        key, service = next(iter(self.main_services.items()))

        async def requests() -> int:
            return int((await self.fake.stats(self.http))["requests"])

        if self.args.map_economy_items:  # 0: the 10,000 items alone
            try:
                rows = await mapjob.economy(
                    self.http,
                    service.url,
                    self.args.map_economy_items,
                    lambda: self.fake.reset(self.http),
                    requests,
                    log,
                )
                found["economy"] = [{"service": key, **row} for row in rows]
            except Exception as exc:
                failures.append(f"map economy: {type(exc).__name__}: {exc}")
                self.notes.append(f"section 'map' (economy) failed: {failures[-1]}")
                log(self.notes[-1])
        if failures and not found:
            raise RuntimeError("; ".join(failures))
        return found

    async def measure_map_job(self, service: Service, items: int, concurrency: int) -> Sample:
        await self.fake.reset(self.http)
        spec = mapjob.scale_spec(items, concurrency)
        cpu, fake_cpu = service.proc.cpu_s(), self.fake.proc.cpu_s()
        run = await fc.run_job(self.http, service.url, spec, params={"lanes": "false"})
        cpu, fake_cpu = service.proc.cpu_s() - cpu, self.fake.proc.cpu_s() - fake_cpu
        mapjob.check_scale(run, items)
        stats = await self.fake.stats(self.http)
        if stats["requests"] != items:
            self.notes.append(
                f"{service.key}, map of {items:,} items: {stats['requests']} upstream calls "
                "(retried or re-run lanes; see the service log)"
            )
            log(self.notes[-1])
        extra = {
            "job_id": run.job_id,
            "upstream_calls": stats["requests"],
            "post_s": run.posted_s,
            "reconnects": run.reconnects,
            "sent_at": run.sent_at,
            "final_at": run.final_at,
        }
        return Sample(run.wall_s, cpu, fake_cpu, stats["max_in_flight"], extra)

    async def map_scale(self) -> dict[str, Any]:
        items, concurrency = self.args.map_items, self.args.map_concurrency
        latency_ms = mapjob.LATENCY_MS
        scenario = Scenario(f"map {items:,} items @ {latency_ms} ms", items, latency_ms)
        floor = self.limits["raw"]
        contenders: list[str] = ["raw", *self.main_services]
        procs = {
            "raw": floor.proc,
            **{key: service.proc for key, service in self.main_services.items()},
        }
        for who, proc in procs.items():
            proc.reset_peak()
            scenario.base_mb[who] = proc.rss_mb()
        for who in self.in_turn(contenders):
            for rep in range(-self.args.warmup, self.args.reps):
                if who == "raw":
                    sample = await self.measure_limit(
                        floor, items, latency_ms, concurrency, mapjob.PROMPT
                    )
                else:
                    sample = await self.measure_map_job(self.main_services[who], items, concurrency)
                if rep >= 0:
                    scenario.add(who, sample)
                log(
                    f"{scenario.name}: {who} {'warm-up' if rep < 0 else f'rep {rep + 1}'} "
                    f"{sample.wall_s:.2f}s"
                    + (f" (POST {sample.extra['post_s']:.2f}s)" if "post_s" in sample.extra else "")
                )
                await self.settle()
        for who, proc in procs.items():
            scenario.peak_mb[who] = proc.peak_mb()
        # Where the time went, in each service's last run: read after the peaks (a job's
        # 10,000 lanes are a big read).
        phases = {}
        for who, samples in scenario.samples.items():
            if who in self.main_services and samples:
                x = samples[-1].extra
                run = fc.JobRun(
                    x["job_id"],
                    samples[-1].wall_s,
                    x["post_s"],
                    "",
                    {},
                    x["sent_at"],
                    x["final_at"],
                )
                phases[who] = await fc.phases(self.http, self.main_services[who].url, run)
        line = "  ".join(
            f"{who} {median([s.wall_s for s in scenario.samples[who]]):.3f}s" for who in contenders
        )
        log(f"{scenario.name:<24} {line}")
        return {**scenario.to_json(), "max_concurrency": concurrency, "phases": phases}

    # --- stream delay -------------------------------------------------------------

    async def stream_delay(self) -> list[dict[str, Any]]:
        results = []
        services = list(self.main_services.items())
        for db, service in services[:1] if self.args.quick else services:
            runs = [await self.stream_run(service) for _ in range(self.args.stream_reps)]
            result: dict[str, Any] = {
                "db": db,  # the service's key: sqlite, postgres (or sqlite-sdk...)
                "n": 1000,
                "clients": self.args.stream_clients,
                "latency_ms": self.args.stream_latency_ms,
                "runs": runs,
            }
            for key in ("wall_s", "cpu_s", "p50_ms", "p99_ms", "max_ms", "connect_s"):
                result[key] = median([r[key] for r in runs])
            result["unfinished"] = sum(r["unfinished"] for r in runs)
            result["errors"] = sum(r["errors"] for r in runs)
            log(
                f"stream delay ({db}): p50 {result['p50_ms']:.1f} ms  p99 {result['p99_ms']:.1f} ms"
                f"  cpu {result['cpu_s']:.2f}s  closed early {result['unfinished']}"
                f"  failed {result['errors']}"
            )
            results.append(result)
        return results

    async def stream_run(self, service: Service) -> dict[str, Any]:
        """One 1,000-lane job and its followers. A client's delays count the events
        stamped after its stream opened: earlier ones are history it replays."""
        clients, latency_ms = self.args.stream_clients, self.args.stream_latency_ms
        await self.fake.reset(self.http)
        cpu = service.proc.cpu_s()
        started = time.perf_counter()
        job_id = await fc.post_job(self.http, service.url, fc.voting_spec(1000, latency_ms))
        posted = time.time()
        watches = [fc.StreamWatch() for _ in range(clients)]
        outcomes = await asyncio.wait_for(
            asyncio.gather(
                *(fc.watch(self.http, service.url, job_id, w) for w in watches),
                return_exceptions=True,
            ),
            self.args.stream_timeout,
        )
        wall = time.perf_counter() - started
        cpu = service.proc.cpu_s() - cpu
        # A client the service failed (a 500, a reset) is a finding, not a harness error.
        errors = [repr(o) for o in outcomes if isinstance(o, BaseException)]
        delays = sorted(
            received - at
            for w in watches
            for _kind, _seq, at, received in w.receipts
            if at >= w.connected_at
        )
        # A stream that closes before the job's final event is a service bug: say so.
        unfinished = [
            w
            for w, outcome in zip(watches, outcomes, strict=True)
            if not isinstance(outcome, BaseException)
            and (not w.receipts or w.receipts[-1][0] not in fc.FINAL_TYPES)
        ]
        await self.settle()
        return {
            "job_id": job_id,
            "wall_s": wall,
            "cpu_s": cpu,
            # From the POST's answer until the last client had its stream open.
            "connect_s": max((w.connected_at for w in watches if w.connected_at), default=posted)
            - posted,
            "events_per_client": median([len(w.receipts) for w in watches]),
            "deliveries_measured": len(delays),
            "p50_ms": 1000 * delays[len(delays) // 2] if delays else float("nan"),
            "p99_ms": 1000 * delays[int(len(delays) * 0.99)] if delays else float("nan"),
            "max_ms": 1000 * delays[-1] if delays else float("nan"),
            "errors": len(errors),
            "first_error": errors[0] if errors else None,
            "unfinished": len(unfinished),
            "unfinished_examples": [
                {"events": len(w.receipts), "last": repr(w.receipts[-1]) if w.receipts else None}
                for w in unfinished[:3]
            ],
        }


# --- the run ---------------------------------------------------------------------


def dead(services: dict[str, Service], notes: list[str]) -> bool:
    """Note any service process that is gone (crashed, or killed from outside)."""
    gone = False
    for service in services.values():
        try:
            service.proc.check_alive()
        except RuntimeError as exc:
            notes.append(f"stopped early: {exc}")
            log(notes[-1])
            gone = True
    return gone


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="one repetition; the stream section on SQLite only; a smaller map section",
    )
    parser.add_argument(
        "--reps", type=int, help="measured repetitions per scenario (default 3, quick 1)"
    )
    parser.add_argument(
        "--warmup", type=int, default=1, help="unmeasured repetitions first (default 1)"
    )
    parser.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help="sections: voting,overhead,small,stream,economy,map",
    )
    parser.add_argument(
        "--overhead-reps",
        type=int,
        help=f"measured runs per contender in the overhead section (default {overhead.REPS}, "
        f"quick {overhead.QUICK_REPS}; after {overhead.WARMUP} warm-ups, quick "
        f"{overhead.QUICK_WARMUP})",
    )
    parser.add_argument("--db", default="sqlite,postgres", help="databases: sqlite,postgres")
    parser.add_argument(
        "--clients",
        default=",".join(CLIENTS),
        help="lane call paths (FANOUT_LLM_CLIENT): lean,sdk; the sdk services join the "
        "voting section only",
    )
    parser.add_argument("--ns", default="10,100,1000", help="lanes per voting job")
    parser.add_argument("--latencies", default="200,0", help="upstream latencies in ms")
    parser.add_argument(
        "--small-jobs", type=int, default=200, help="jobs in the small-jobs section"
    )
    parser.add_argument("--stream-clients", type=int, default=100)
    parser.add_argument(
        "--stream-latency-ms",
        type=int,
        default=2000,
        help="upstream latency in the stream section (clients connect meanwhile)",
    )
    parser.add_argument("--stream-reps", type=int, help="default 2, quick 1")
    parser.add_argument(
        "--stream-timeout", type=float, default=300, help="seconds for one stream run"
    )
    parser.add_argument(
        "--map-items",
        type=int,
        help=f"items of the map section's big job (default {mapjob.ITEMS:,}, "
        f"quick {mapjob.QUICK_ITEMS:,})",
    )
    parser.add_argument(
        "--map-concurrency",
        type=int,
        help="its policy.max_concurrency, and the floor's calls in flight (default "
        f"{mapjob.MAX_CONCURRENCY:,}, quick {mapjob.QUICK_MAX_CONCURRENCY})",
    )
    parser.add_argument(
        "--map-economy-items",
        type=int,
        help=f"items of the per-item votes (default {mapjob.ECONOMY_ITEMS}, "
        f"quick {mapjob.QUICK_ECONOMY_ITEMS}; 0 skips them)",
    )
    parser.add_argument("--pause", type=float, default=0.3, help="seconds between runs")
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get("FANOUT_BENCH_POSTGRES_URL", DEFAULT_POSTGRES),
        help="an admin connection; the bench creates and drops its own database",
    )
    parser.add_argument(
        "--tree",
        type=Path,
        default=REPO,
        help="the checkout whose service runs (default: this one), e.g. a `git worktree`",
    )
    parser.add_argument(
        "--no-raw",
        dest="raw",
        action="store_false",
        help="skip the reference row: the same calls on bare aiohttp, without the SDK",
    )
    parser.add_argument("--out", type=Path, default=HERE / "results.md")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the sections not run this time from the last results (--out's .json), "
        "marked with that run's date and commit",
    )
    parser.add_argument("--keep-logs", action="store_true", help="keep the processes' logs")
    args = parser.parse_args(argv)
    args.reps = args.reps if args.reps is not None else (1 if args.quick else 3)
    args.stream_reps = (
        args.stream_reps if args.stream_reps is not None else (1 if args.quick else 2)
    )
    quick = args.quick
    if args.overhead_reps is None:
        args.overhead_reps = overhead.QUICK_REPS if quick else overhead.REPS
    args.overhead_warmup = overhead.QUICK_WARMUP if quick else overhead.WARMUP
    if args.map_items is None:
        args.map_items = mapjob.QUICK_ITEMS if quick else mapjob.ITEMS
    if args.map_concurrency is None:
        args.map_concurrency = mapjob.QUICK_MAX_CONCURRENCY if quick else mapjob.MAX_CONCURRENCY
    if args.map_economy_items is None:
        args.map_economy_items = mapjob.QUICK_ECONOMY_ITEMS if quick else mapjob.ECONOMY_ITEMS
    args.only = [s for s in args.only.split(",") if s]
    args.dbs = [d for d in args.db.split(",") if d]
    args.clients = [c for c in args.clients.split(",") if c]
    args.ns = [int(x) for x in args.ns.split(",")]
    args.latencies = [int(x) for x in args.latencies.split(",")]
    unknown = (
        set(args.only) - set(SECTIONS)
        or set(args.dbs) - {"sqlite", "postgres"}
        or set(args.clients) - set(CLIENTS)
    )
    if unknown:
        parser.error(f"unknown: {', '.join(sorted(unknown))}")
    return args


def tree_version(tree: Path) -> str:
    """The service's commit, marked ``+dirty`` when its files differ from it."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(tree), "status", "--porcelain", "--", "service", "migrations"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return commit + ("+dirty" if dirty else "")


def machine_facts() -> dict[str, Any]:
    import aiohttp as aiohttp_mod
    import openai

    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import uvloop

        uvloop_version = uvloop.__version__
    except ImportError:
        uvloop_version = "not installed"
    load = os.getloadavg()
    return {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "openai": openai.__version__,
        "aiohttp": aiohttp_mod.__version__,
        "uvloop": uvloop_version,
        "load_before": [round(x, 2) for x in load],
    }


async def amain(args: argparse.Namespace) -> int:
    raise_fd_limit()
    facts = machine_facts()
    facts["service"] = tree_version(args.tree)
    logs = Path(tempfile.mkdtemp(prefix="fanout-bench-"))
    started = time.perf_counter()
    log(
        f"logs in {logs}; reps {args.reps} (+{args.warmup} warm-up); "
        f"sections {','.join(args.only)}; databases {','.join(args.dbs)}; "
        f"call paths {','.join(args.clients)}"
    )
    fake_port = free_port()
    fake = Fake(
        Proc(
            "fake-llm",
            python_argv("-m", "service.cli", "fake-llm", "--port", str(fake_port)),
            log=logs / "fake-llm.log",
            tree=args.tree,
        ),
        f"http://127.0.0.1:{fake_port}/v1",
    )
    limits: dict[str, Limit] = {}
    services: dict[str, Service] = {}
    notes: list[str] = []
    pg_databases: list[str] = []
    results: dict[str, Any] = {"facts": facts, "args": {k: str(v) for k, v in vars(args).items()}}
    try:
        fake.proc.wait_http(f"{fake.root}/healthz")
        limits["limit"] = Limit(fake.url, logs)
        if args.raw or {"map", "overhead", "small"} & set(args.only):  # their floor
            limits["raw"] = Limit(fake.url, logs, client="raw")
        # Only the voting section runs the other call paths: without it, lean alone (or
        # the first path asked for, when lean is not).
        clients = args.clients
        if "voting" not in args.only:
            clients = ["lean"] if "lean" in clients else clients[:1]
        max_lanes = max(MAX_LANES_PER_JOB, args.map_items, mapjob.ECONOMY_ITEMS * mapjob.VOTES)
        if "sqlite" in args.dbs:
            for client in clients:  # a database file per service: no shared writer
                services[service_key("sqlite", client)] = start_service(
                    "sqlite",
                    client,
                    f"sqlite+aiosqlite:///{logs}/bench-{client}.db",
                    fake.url,
                    logs,
                    args.tree,
                    max_lanes,
                )
        if "postgres" in args.dbs:
            stamp = f"fanout_bench_{os.getpid()}_{int(time.time())}"
            base = args.postgres_url.rsplit("/", 1)[0].replace(
                "postgresql://", "postgresql+asyncpg://"
            )
            for client in clients:  # a database per service, like SQLite's files
                database = f"{stamp}_{client}"
                try:
                    await postgres_admin(args.postgres_url, f'CREATE DATABASE "{database}"')
                except Exception as exc:  # unreachable, refused, no rights: say so, go on
                    notes.append(
                        f"PostgreSQL rows skipped: {args.postgres_url} not usable "
                        f"({type(exc).__name__}: {exc})"
                    )
                    log(notes[-1])
                    break
                pg_databases.append(database)
                services[service_key("postgres", client)] = start_service(
                    "postgres",
                    client,
                    f"{base}/{database}",
                    fake.url,
                    logs,
                    args.tree,
                    max_lanes,
                )
        for limit in limits.values():  # imports done, client built
            await asyncio.to_thread(limit._call, {"cmd": "ping"})
        results["idle_mb"] = {
            **{who: limit.proc.rss_mb() for who, limit in limits.items()},
            **{key: service.proc.rss_mb() for key, service in services.items()},
        }
        async with fc.session() as http:
            bench = Bench(args, fake, limits, services, http)
            sections = {
                "voting": lambda: bench.voting(),
                "overhead": lambda: bench.overhead_section(),
                "small": lambda: bench.small_jobs(),
                "stream": lambda: bench.stream_delay(),
                "economy": lambda: bench.economy(),
                "map": lambda: bench.map_section(),
            }
            for section in args.only:
                try:
                    found = await sections[section]()
                except Exception as exc:  # one broken section must not lose the others
                    notes.extend(bench.notes)
                    bench.notes.clear()
                    notes.append(f"section {section!r} failed: {type(exc).__name__}: {exc}")
                    log(notes[-1])
                    if dead(services, notes):
                        break
                    continue
                results[section] = (
                    found
                    if isinstance(found, dict)
                    else [x.to_json() if isinstance(x, Scenario) else x for x in found]
                )
                notes.extend(bench.notes)
                bench.notes.clear()
                if dead(services, notes):
                    break
    finally:
        for service in services.values():
            service.proc.stop()
        for limit in limits.values():
            limit.stop()
        fake.proc.stop()
        for database in pg_databases:
            try:
                await postgres_admin(
                    args.postgres_url, f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'
                )
            except Exception as exc:
                log(f"could not drop {database}: {exc}")
    results["notes"] = notes
    results["duration_s"] = time.perf_counter() - started
    if args.merge:
        merge_earlier(results, args)
    facts["load_after"] = [round(x, 2) for x in os.getloadavg()]
    markdown = write_report(results, args)
    args.out.write_text(markdown)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    print(markdown)
    log(
        f"wrote {args.out.relative_to(REPO) if args.out.is_relative_to(REPO) else args.out} "
        f"in {results['duration_s']:.0f} s"
    )
    if not args.keep_logs:
        shutil.rmtree(logs, ignore_errors=True)
    return 0


def merge_earlier(results: dict[str, Any], args: argparse.Namespace) -> None:
    """Keep the sections this run did not measure from the last results (``--merge``),
    with that run's date, commit, command and notes, so the report stays whole."""
    path = args.out.with_suffix(".json")
    try:
        earlier: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        log(f"--merge: nothing to keep ({exc})")
        return
    kept = [s for s in SECTIONS if s not in args.only and earlier.get(s)]
    # An earlier merge's own provenance goes along: each kept section says where it is from.
    origins: dict[str, Any] = earlier.get("merged", {}).get("origins", {})
    this = {
        "date": earlier["facts"]["date"],
        "service": earlier["facts"]["service"],
        "args": earlier.get("args", {}),
        "duration_s": earlier.get("duration_s"),
        "notes": earlier.get("notes", []),
    }
    for section in kept:
        results[section] = earlier[section]
    results["merged"] = {
        "from": str(path),
        "origins": {s: origins.get(s, this) for s in kept},
    }
    idle = earlier.get("idle_mb") or {}
    results["idle_mb"] = {**idle, **(results.get("idle_mb") or {})}
    log(f"--merge: kept {', '.join(kept) or 'nothing'} from {path}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(amain(args))
    return uvloop.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
