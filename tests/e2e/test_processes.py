"""Real processes on loopback: ``fanout serve`` and ``fanout worker`` killed, frozen and
restarted around running jobs, on SQLite (one process) and PostgreSQL (many).

Each test bounds every wait; the lane latencies are chosen so that the moment a test
acts on (lanes in flight, a lease expired) lasts long enough to be seen by polling.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.processes import (
    Fleet,
    Process,
    Tables,
    first_traceback,
    poll,
    process_env,
    run_sync,
    started,
    tcp_ports,
)
from tests.support import fake_stats, parse_sse, section, sectioning, user, voting

pytestmark = pytest.mark.slow

LANE_END = frozenset(
    {"lane.succeeded", "lane.failed", "lane.timed_out", "lane.cancelled", "lane.skipped"}
)
JOB_END = frozenset({"job.succeeded", "job.failed", "job.cancelled"})
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
MAJORITY_ALL_LANES = {"kind": "majority", "extract": "number", "early_stop": False}

# PostgreSQL processes: a short lease so that a dead or frozen worker's lanes come back
# quickly; the fixture has migrated the database already.
PG_SETTINGS = {"lease_seconds": "2", "poll_interval_s": "0.2", "run_migrations": "false"}


# --- fixtures ------------------------------------------------------------------------


def _report_on_failure(request: pytest.FixtureRequest, fleet: Fleet, failures: int) -> None:
    if request.session.testsfailed > failures:
        print(fleet.report(), file=sys.stderr)


@pytest.fixture
def fleet(request: pytest.FixtureRequest, tmp_path: Path, fake_llm: str) -> Iterator[Fleet]:
    """Processes on one SQLite file; stopped at the end, their logs shown on failure."""
    failures = request.session.testsfailed
    env = process_env(
        f"sqlite+aiosqlite:///{tmp_path}/f.db", fake_llm, lease_seconds="3", poll_interval_s="0.2"
    )
    fleet = Fleet(tmp_path, env)
    try:
        yield fleet
    finally:
        fleet.close()
        _report_on_failure(request, fleet, failures)


@pytest.fixture(scope="module")
def replicas(
    postgres_database: str, fake_llm: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[Process]]:
    """Two API replicas without runners (``serve --no-runner``), shared by the tests here."""
    env = process_env(postgres_database, fake_llm, **PG_SETTINGS)
    fleet = Fleet(tmp_path_factory.mktemp("replicas"), env)
    processes = [fleet.serve("replica-1", runner=False), fleet.serve("replica-2", runner=False)]
    try:
        run_sync(started(*processes))
        yield processes
    finally:
        fleet.close()


@pytest.fixture
async def tables(postgres_database: str) -> AsyncIterator[Tables]:
    """The PostgreSQL tables, emptied first."""
    tables = Tables(postgres_database)
    await tables.truncate()
    yield tables
    await tables.dispose()


@pytest.fixture
def pg_fleet(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    postgres_database: str,
    fake_llm: str,
    replicas: list[Process],
    tables: Tables,
) -> Iterator[Fleet]:
    """Workers this test starts on the PostgreSQL of the shared replicas."""
    failures = request.session.testsfailed
    fleet = Fleet(tmp_path, process_env(postgres_database, fake_llm, **PG_SETTINGS), replicas)
    try:
        yield fleet
    finally:
        fleet.close()
        _report_on_failure(request, fleet, failures)


# --- helpers -------------------------------------------------------------------------


async def post(api: httpx.AsyncClient, spec: dict[str, Any]) -> str:
    response = await api.post("/v1/jobs", json=spec)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


async def get(api: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    response = await api.get(f"/v1/jobs/{job_id}")
    assert response.status_code == 200, response.text
    return dict(response.json())


async def get_job(url: str, job_id: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=url, timeout=10) as api:
        return await get(api, job_id)


async def all_finished(
    api: httpx.AsyncClient, job_ids: list[str]
) -> dict[str, dict[str, Any]] | None:
    views = {job_id: await get(api, job_id) for job_id in job_ids}
    return views if all(v["status"] in TERMINAL for v in views.values()) else None


def check_event_log(job: dict[str, Any], events: list[dict[str, Any]]) -> None:
    """Sequence 1..k without gaps or repeats; one ending per lane, from the attempt whose
    result is stored; one final job event, last."""
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1)), job["id"]
    endings: dict[int, list[dict[str, Any]]] = {}
    for event in events:
        if event["type"] in LANE_END:
            endings.setdefault(event["data"]["lane"], []).append(event)
    for lane in job["lanes"]:
        ends = endings.get(lane["index"], [])
        assert len(ends) == 1, (
            f"lane {lane['index']} of {job['id']} ended {len(ends)} times: {ends}"
        )
        assert ends[0]["type"] == f"lane.{lane['status']}", (lane, ends)
        assert ends[0]["data"]["attempt"] == lane["attempts"], (lane, ends)
    finals = [e for e in events if e["type"] in JOB_END]
    assert [e["type"] for e in finals] == [f"job.{job['status']}"], finals
    assert events[-1] == finals[0]


def owned_by(lease_owner: str | None, process: Process) -> bool:
    """Lease owners are ``host:pid:nonce``."""
    return lease_owner is not None and lease_owner.rsplit(":", 2)[1] == str(process.pid)


def outcome(job: dict[str, Any]) -> dict[str, Any]:
    """What a job's caller gets, less ids and times."""
    keys = ("name", "status", "output", "answer", "usage", "error")
    return {
        "status": job["status"],
        "result": job["result"],
        "error": job["error"],
        "usage": job["usage"],
        "lanes": [{k: lane[k] for k in keys} for lane in job["lanes"]],
    }


# --- SQLite: one process, killed and started again -----------------------------------

SLOW = "fake?latency_ms=1500"


def restart_specs() -> dict[str, dict[str, Any]]:
    """Lanes of ~1.5 s; capped jobs keep some lanes queued while others run."""
    return {
        "voting": voting(
            4, f"{SLOW}&answers=391:1", aggregate=MAJORITY_ALL_LANES, policy={"max_concurrency": 2}
        ),
        "sectioning": sectioning(
            section("draft", SLOW, "Write a draft."),
            section("safety", SLOW, "Check it is safe."),
            section("facts", SLOW, "Check the facts."),
            policy={"max_concurrency": 2},
        ),
        "score": voting(
            3,
            f"{SLOW}&answers=7:1",
            aggregate={"kind": "score", "extract": "number", "pick": "mean"},
        ),
        "reduce": voting(
            2,
            "fake?answers=5:1",
            aggregate={"kind": "reduce", "task": {"model": SLOW, "messages": user("Combine.")}},
        ),
    }


async def test_restart_after_kill_9_resumes_every_job_and_reruns_lanes_in_flight(
    fleet: Fleet, tmp_path: Path
) -> None:
    tables = Tables(f"sqlite+aiosqlite:///{tmp_path}/f.db")
    try:
        first = fleet.serve("serve-before-kill")
        await started(first)
        async with httpx.AsyncClient(base_url=first.url, timeout=10) as api:
            ids = {name: await post(api, spec) for name, spec in restart_specs().items()}

            async def in_flight() -> bool:
                views = {name: await get(api, job_id) for name, job_id in ids.items()}
                lanes_running = all(
                    views[name]["progress"].get("running")
                    for name in ("voting", "sectioning", "score")
                )
                return lanes_running and views["reduce"]["status"] == "aggregating"

            await poll(in_flight, within=10, what="lanes in flight and a reducer running")
        first.kill9()

        # What the dead process left in the file is what the next one starts from.
        at_kill = {(row["job_id"], row["idx"]): row for row in await tables.lanes()}
        statuses = Counter(row["status"] for row in at_kill.values())
        assert statuses["running"] >= 3 and statuses["queued"] >= 1, statuses

        second = fleet.serve("serve-after-kill")
        await started(second)
        async with httpx.AsyncClient(base_url=second.url, timeout=10) as api:
            # The same jobs again, on a process that is not killed: what they should give.
            baseline = {name: await post(api, spec) for name, spec in restart_specs().items()}
            every = [*ids.values(), *baseline.values()]
            views = await poll(
                lambda: all_finished(api, every), within=30, what="every job finished after restart"
            )

        for name, job_id in ids.items():
            job = views[job_id]
            assert job["status"] == "succeeded", job
            check_event_log(job, await tables.events(job_id))
            assert outcome(job) == outcome(views[baseline[name]]), name
        assert views[ids["reduce"]]["result"]["output"].startswith("Echo:")

        reruns = []
        for (job_id, idx), before in at_kill.items():
            lane = views[job_id]["lanes"][idx]
            if before["status"] == "running":
                # In flight at the kill: its attempt is lost, the lane runs once more.
                assert lane["attempts"] == before["attempts"] + 1 >= 2, (lane, before)
                reruns.append(lane)
                retrying = [
                    e
                    for e in await tables.events(job_id)
                    if e["type"] == "lane.retrying" and e["data"]["lane"] == idx
                ]
                assert len(retrying) == 1 and "lease_lost" in retrying[0]["data"]["error"], retrying
            elif before["status"] == "queued":
                assert lane["attempts"] == before["attempts"] + 1, (lane, before)
            else:
                assert lane["attempts"] == before["attempts"], (lane, before)
                assert lane["output"] == before["output"], (lane, before)
        print(f"\nrestart on SQLite: {len(reruns)} lanes in flight at the kill ran again")
    finally:
        await tables.dispose()


async def test_sigterm_stops_serve_within_its_drain_and_gives_back_what_was_running(
    fleet: Fleet, tmp_path: Path
) -> None:
    serve = fleet.serve("serve", drain_seconds="0.5")
    await started(serve)
    async with httpx.AsyncClient(base_url=serve.url, timeout=10) as api:
        job_id = await post(api, voting(2, "fake?hang=1", aggregate=MAJORITY_ALL_LANES))

        async def running() -> bool:
            return (await get(api, job_id))["progress"].get("running") == 2

        await poll(running, within=10, what="two lanes running")
        async with api.stream("GET", f"/v1/jobs/{job_id}/events") as stream:
            lines = stream.aiter_lines()
            async for line in lines:
                if line == "event: lane.started":
                    break
            serve.send(signal.SIGTERM)
            # The open stream ends at once, and cleanly (a body cut off by uvicorn's
            # graceful timeout would raise here): the client reconnects elsewhere.
            async with asyncio.timeout(4):
                rest = [line async for line in lines]
    assert "event: job.cancelled" not in rest
    await poll(
        lambda: asyncio.sleep(0, serve.proc.poll() is not None),
        within=10,
        what="serve exited after its drain",
    )
    # uvicorn ends by the signal it handled, once it has shut down: as a supervisor expects.
    assert serve.proc.returncode in (0, -signal.SIGTERM), serve.log()
    assert first_traceback(serve.log()) is None, serve.log()
    tables = Tables(f"sqlite+aiosqlite:///{tmp_path}/f.db")
    try:
        lanes = await tables.lanes([job_id])
    finally:
        await tables.dispose()
    assert [(lane["status"], lane["lease_owner"]) for lane in lanes] == [("queued", None)] * 2


async def test_an_idle_connection_outlives_a_client_pools_keep_alive(fleet: Fleet) -> None:
    """A client pool keeps an idle connection 15 s (aiohttp) and sends its next request
    on it: the server must not close it first (uvicorn's default of 5 s did, and a
    request sent as it closed was reset)."""
    serve = fleet.serve("serve")
    await started(serve)
    reader, writer = await asyncio.open_connection("127.0.0.1", serve.port)
    request = b"GET /healthz HTTP/1.1\r\nHost: fanout\r\n\r\n"
    try:
        for pause in (0, 6):  # past uvicorn's default
            await asyncio.sleep(pause)
            writer.write(request)
            async with asyncio.timeout(10):
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200"), head
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
    finally:
        writer.close()


# --- PostgreSQL: replicas and workers -------------------------------------------------


@pytest.mark.postgres
async def test_a_worker_killed_mid_run_leaves_every_lane_with_exactly_one_result(
    pg_fleet: Fleet, replicas: list[Process], tables: Tables
) -> None:
    # A cap per worker spreads the 1,000 lanes over both workers and over seconds.
    victim = pg_fleet.worker("worker-1", max_concurrency="40")
    survivor = pg_fleet.worker("worker-2", max_concurrency="40")
    await started(victim, survivor)
    spec = voting(
        50, "fake?latency_ms=100&jitter_ms=100&answers=391:1", aggregate=MAJORITY_ALL_LANES
    )
    apis = [httpx.AsyncClient(base_url=r.url, timeout=10) for r in replicas]
    try:
        job_ids = list(await asyncio.gather(*(post(apis[i % 2], spec) for i in range(20))))

        async def mid_run() -> dict[str, Any] | None:
            [counts] = await tables.rows(
                "SELECT count(*) FILTER (WHERE status = 'succeeded') AS done,"
                " count(*) FILTER (WHERE status = 'running' AND lease_owner LIKE :mine) AS held"
                " FROM lanes",
                mine=f"%:{victim.pid}:%",
            )
            return counts if counts["done"] >= 200 and counts["held"] >= 5 else None

        await poll(mid_run, within=30, what="200 lanes done and the victim running some")
        victim.kill9()
        held_at_kill = {
            (lane["job_id"], lane["idx"]): lane["attempts"]
            for lane in await tables.lanes()
            if lane["status"] == "running" and owned_by(lane["lease_owner"], victim)
        }

        async def finished() -> bool:
            [row] = await tables.rows(
                "SELECT count(*) AS n FROM jobs"
                " WHERE status IN ('succeeded', 'failed', 'cancelled')"
            )
            return bool(row["n"] == len(job_ids))

        await poll(finished, within=40, what="every job finished", every=0.2)
        views = {job_id: await get(apis[1], job_id) for job_id in job_ids}
        lanes = [lane for job_id in job_ids for lane in views[job_id]["lanes"]]
        rerun = sum(lane["attempts"] > 1 for lane in lanes)
        note = f"{rerun} of {len(lanes)} lanes ran again ({len(held_at_kill)} held by the victim)"
        print(f"\nworker killed mid-run: {note}")
        for job_id in job_ids:
            job = views[job_id]
            assert job["status"] == "succeeded", (note, job)
            assert job["result"]["output"] == 391, note
            assert job["progress"] == {"succeeded": 50}, (note, job["progress"])
            check_event_log(job, await tables.events(job_id))
        for (job_id, idx), attempts in held_at_kill.items():
            # Its attempt died with the worker: it ran again, more than once if a lease of
            # the survivor lapsed too (under load), each late write rejected.
            lane = views[job_id]["lanes"][idx]
            assert lane["attempts"] > attempts, (note, lane, attempts)
        assert rerun >= len(held_at_kill) > 0, note
        for process in (survivor, *replicas):
            crash = first_traceback(pg_fleet.logged_here(process))
            assert crash is None, f"{process.name} failed ({note}):\n{crash}"
    finally:
        for api in apis:
            await api.aclose()


async def freeze(process: Process, tables: Tables) -> None:
    """SIGSTOP a process outside any database transaction: frozen inside one, it would
    hold row locks that the other workers' lease sweep waits on."""
    busy: list[dict[str, Any]] = []
    for _ in range(20):
        process.send(signal.SIGSTOP)
        await poll(lambda: asyncio.to_thread(process.stopped), within=5, what="stopped")
        busy = await tables.in_transaction(tcp_ports(process.pid))
        if not busy:
            return
        process.send(signal.SIGCONT)
        await asyncio.sleep(0.05)  # let it finish that transaction, then try again
    raise AssertionError(f"{process.name} was inside a transaction at every SIGSTOP: {busy}")


@pytest.mark.postgres
async def test_a_worker_stopped_past_its_lease_has_its_late_write_rejected(
    pg_fleet: Fleet, replicas: list[Process], tables: Tables, fake_llm: str
) -> None:
    """Worker A is frozen holding the lane; B takes it over once A's lease lapses. A is
    resumed while B's attempt runs (had B finished first, A would hear of the job's end
    and cancel its attempt instead of writing): A's answer, already waiting in its
    socket, is reported and must be rejected; B's is the lane's one result."""
    stale = pg_fleet.worker("worker-a")
    await started(stale)
    async with httpx.AsyncClient(base_url=replicas[0].url, timeout=10) as api:
        requests = (await fake_stats(fake_llm))["requests"]
        spec = voting(1, "fake?latency_ms=4000&answers=391:1", aggregate=MAJORITY_ALL_LANES)
        job_id = await post(api, spec)

        async def claimed_by(process: Process, attempt: int) -> bool:
            [lane] = await tables.lanes([job_id])
            return (
                lane["status"] == "running"
                and lane["attempts"] == attempt
                and owned_by(lane["lease_owner"], process)
            )

        await poll(lambda: claimed_by(stale, 1), within=10, what="worker A running the lane")

        async def asked() -> bool:
            return bool((await fake_stats(fake_llm))["requests"] > requests)

        await poll(asked, within=10, what="worker A's request reaching the fake LLM")
        await freeze(stale, tables)
        fresh = pg_fleet.worker("worker-b")
        await started(fresh)
        await poll(lambda: claimed_by(fresh, 2), within=15, what="worker B reclaiming the lane")

        stale.send(signal.SIGCONT)
        await stale.logged(r"rejected 1 stale lane writes", within=10)
        views = await poll(lambda: all_finished(api, [job_id]), within=15, what="the job finished")

    job = views[job_id]
    assert job["status"] == "succeeded" and job["result"]["output"] == 391, job
    assert job["lanes"][0]["attempts"] == 2, job["lanes"]
    events = await tables.events(job_id)
    check_event_log(job, events)
    lane_events = [
        (e["type"], e["data"]["attempt"]) for e in events if e["type"].startswith("lane.")
    ]
    assert lane_events == [
        ("lane.started", 1),
        ("lane.retrying", 1),
        ("lane.started", 2),
        ("lane.succeeded", 2),
    ]
    assert "lease_lost" in next(e for e in events if e["type"] == "lane.retrying")["data"]["error"]


@pytest.mark.postgres
async def test_an_event_stream_on_one_replica_sees_every_event_of_a_job_run_by_a_worker(
    pg_fleet: Fleet, replicas: list[Process], tables: Tables
) -> None:
    """Stored events and live deltas both: the lanes stream their text on the worker."""
    worker = pg_fleet.worker("worker")  # starts while the stream opens: most events are live
    spec = voting(
        6,
        "fake?latency_ms=200&answers=391:1&chunk_ms=20",
        aggregate=MAJORITY_ALL_LANES,
        policy={"max_concurrency": 2},
        task={"stream": True},
    )
    streamed: list[dict[str, Any]] = []

    async def follow(api: httpx.AsyncClient, job_id: str) -> None:
        block = ""
        async with api.stream("GET", f"/v1/jobs/{job_id}/events") as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line:
                    block += line + "\n"
                    continue
                streamed.extend(parse_sse(block))
                block = ""
                if streamed and streamed[-1]["event"] in JOB_END:
                    return

    async with (
        httpx.AsyncClient(base_url=replicas[0].url, timeout=30) as streaming,
        httpx.AsyncClient(base_url=replicas[1].url, timeout=10) as api,
    ):
        job_id = await post(api, spec)
        stream = asyncio.create_task(follow(streaming, job_id))
        await started(worker)
        await poll(lambda: all_finished(api, [job_id]), within=20, what="the job finished")
        with contextlib.suppress(TimeoutError):  # a stalled stream shows in the comparison
            await asyncio.wait_for(stream, timeout=5)
    stored = await tables.events(job_id)
    deltas = [e["data"] for e in streamed if e["event"] == "lane.delta"]
    seen = [(int(e["id"]), e["event"], e["data"]) for e in streamed if e["event"] != "lane.delta"]
    # Every lane's text reached replica-1 live, from the worker, whole and in order.
    job = await get_job(replicas[0].url, job_id)
    for lane in job["lanes"]:
        texts = [d["text"] for d in deltas if d["lane"] == lane["index"]]
        assert "".join(texts) == lane["output"], (lane["index"], texts)
    assert seen == [(e["seq"], e["type"], e["data"]) for e in stored], (
        f"replica-1 streamed {len(seen)} of {len(stored)} events "
        f"(last: {seen[-1][:2] if seen else None}; stored: {[e['type'] for e in stored]})"
    )


@pytest.mark.postgres
async def test_a_lane_that_kills_every_worker_it_runs_on_ends_after_max_attempts(
    pg_fleet: Fleet, replicas: list[Process], tables: Tables
) -> None:
    """A poison lane: each worker that claims it is killed (kill -9) while it runs. A
    lost lease is a failed attempt: retried after a backoff, then the lane fails and
    the job ends, however many workers are left."""
    spec = sectioning(section("poison", "fake?hang=1"), policy={"max_attempts": 3})
    async with httpx.AsyncClient(base_url=replicas[0].url, timeout=10) as api:
        job_id = await post(api, spec)
        for attempt_no in (1, 2, 3):
            worker = pg_fleet.worker(f"worker-{attempt_no}")
            await started(worker)

            async def claimed(n: int = attempt_no) -> dict[str, Any] | None:
                lane = (await get(api, job_id))["lanes"][0]
                return lane if (lane["status"], lane["attempts"]) == ("running", n) else None

            await poll(claimed, within=30, what=f"attempt {attempt_no} running")
            worker.kill9()
        survivor = pg_fleet.worker("survivor")
        await started(survivor)
        done = await poll(lambda: all_finished(api, [job_id]), within=30, what="the job ended")
    job = done[job_id]
    assert job["status"] == "failed", job
    lane = job["lanes"][0]
    assert (lane["status"], lane["attempts"], lane["error"]["type"]) == ("failed", 3, "lease_lost")
    events = await tables.events(job_id)
    check_event_log(job, events)
    retrying = [e["data"] for e in events if e["type"] == "lane.retrying"]
    assert [r["attempt"] for r in retrying] == [1, 2]
    assert all(r["error"].startswith("lease_lost") and r["retry_in_s"] > 0 for r in retrying)


@pytest.mark.postgres
async def test_sigterm_drains_a_worker_then_releases_what_is_still_running(
    pg_fleet: Fleet, replicas: list[Process]
) -> None:
    # Lanes outlast the drain: the worker stops claiming, waits FANOUT_DRAIN_SECONDS,
    # then gives the rest back, and exits; another worker finishes them.
    draining = pg_fleet.worker("draining", drain_seconds="1", lease_seconds="30")
    spec = voting(3, "fake?latency_ms=4000&answers=7", aggregate=MAJORITY_ALL_LANES)
    async with httpx.AsyncClient(base_url=replicas[0].url, timeout=10) as api:
        await started(draining)
        job_id = await post(api, spec)

        async def running() -> dict[str, Any] | None:
            job = await get(api, job_id)
            return job if job["progress"].get("running") == 3 else None

        await poll(running, within=20, what="three lanes running")
        draining.send(signal.SIGTERM)
        await poll(
            lambda: asyncio.sleep(0, draining.proc.poll() is not None),
            within=15,
            what="the worker exited after its drain",
        )
        released = await get(api, job_id)
        # Released at once, not after the 30 s lease: queued for any worker.
        assert {lane["status"] for lane in released["lanes"]} == {"queued"}
        assert first_traceback(draining.log()) is None, draining.log()
        finisher = pg_fleet.worker("finisher")
        await started(finisher)
        done = await poll(lambda: all_finished(api, [job_id]), within=30, what="the job finished")
    job = done[job_id]
    assert job["status"] == "succeeded" and job["result"]["output"] == 7
    assert [lane["attempts"] for lane in job["lanes"]] == [2, 2, 2]
