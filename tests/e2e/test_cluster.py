"""Many tenants, many processes, measured on real ones: provider limits that hold for
the cluster, and the fair share of claims between tenants."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.processes import Fleet, Tables, poll, process_env, run_sync, started
from tests.support import fake_reset, fake_stats, voting

pytestmark = pytest.mark.slow

MAJORITY_ALL_LANES = {"kind": "majority", "extract": "number", "early_stop": False}
KEYS = "acme:key-acme,globex:key-globex"


def seconds(at: str) -> float:
    return datetime.fromisoformat(at.replace("Z", "+00:00")).timestamp()


async def run(api: httpx.AsyncClient, spec: dict[str, Any], within: float = 60) -> dict[str, Any]:
    """Post a job and poll it to its end; the job as stored."""
    response = await api.post("/v1/jobs", json=spec)
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]

    async def ended() -> dict[str, Any] | None:
        job = (await api.get(f"/v1/jobs/{job_id}")).json()
        return job if job["status"] in ("succeeded", "failed", "cancelled") else None

    return await poll(ended, within=within, what=f"job {job_id} ended", every=0.02)


# --- provider limits for the cluster (PostgreSQL: two processes run lanes) -------------


@pytest.fixture
def two_runners(
    tmp_path: Path, postgres_database: str, fake_llm: str
) -> Iterator[tuple[Fleet, str]]:
    """``serve`` (API and runner) and a ``worker`` on one PostgreSQL, with providers of
    limits in their providers file; yields the fleet and the API's URL."""
    run_sync(Tables(postgres_database).truncate())
    providers = tmp_path / "providers.toml"
    providers.write_text(
        f"""
[providers.capped]
base_url = "{fake_llm}"
api_key = "x"
max_concurrency = 4

[providers.paced]
base_url = "{fake_llm}"
api_key = "x"
rpm = 60
"""
    )
    env = process_env(
        postgres_database,
        fake_llm,
        lease_seconds="5",
        poll_interval_s="0.2",
        run_migrations="false",
        providers_file=str(providers),
    )
    fleet = Fleet(tmp_path, env)
    try:
        api = fleet.serve("serve")
        worker = fleet.worker("worker")
        run_sync(started(api, worker))
        yield fleet, api.url
    finally:
        fleet.close()


@pytest.mark.postgres
async def test_provider_limits_and_pauses_hold_across_processes(
    two_runners: tuple[Fleet, str], fake_llm: str
) -> None:
    _fleet, url = two_runners
    async with httpx.AsyncClient(base_url=url, timeout=10) as api:
        # max_concurrency 4: two processes with room for hundreds each still make 4 calls
        # at once at most (each would make 4 of its own if the cap were per process).
        await fake_reset(fake_llm)
        capped = voting(
            12,
            "fake?latency_ms=300&answers=7",
            aggregate=MAJORITY_ALL_LANES,
            task={"provider": "capped"},
        )
        job = await run(api, capped)
        stats = await fake_stats(fake_llm)
        assert job["status"] == "succeeded", job
        assert stats["completed"] == 12 and stats["max_in_flight"] == 4, stats

        # rpm 60: one call a second for the cluster, not one a second per process.
        paced = voting(
            4, "fake?answers=7", aggregate=MAJORITY_ALL_LANES, task={"provider": "paced"}
        )
        job = await run(api, paced)
        starts = sorted(seconds(lane["started_at"]) for lane in job["lanes"])
        assert starts[-1] - starts[0] >= 2.5, starts

        # A 429 with Retry-After: 2 pauses the provider for both processes. One lane at a
        # time: without the pause, either process would start lane 1 at once.
        await fake_reset(fake_llm)
        model = "fake?fail_first=1&fail_status=429&retry_after=2&answers=7"
        limited = voting(
            2, model, aggregate=MAJORITY_ALL_LANES, policy={"max_concurrency": 1, "max_attempts": 3}
        )
        job = await run(api, limited)
        assert job["status"] == "succeeded", job
        first, second = (seconds(lane["started_at"]) for lane in job["lanes"])
        assert second - first >= 1.9, job["lanes"]


# --- a fair share between tenants --------------------------------------------------------


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def capped_service(request: pytest.FixtureRequest, tmp_path: Path, fake_llm: str) -> Iterator[str]:
    """``fanout serve`` with room for 20 lanes at once, two tenants; yields its URL."""
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path}/f.db"
        settings = {}
    else:
        url = request.getfixturevalue("postgres_database")
        run_sync(Tables(url).truncate())
        settings = {"run_migrations": "false"}
    env = process_env(
        url, fake_llm, max_concurrency="20", api_keys=KEYS, poll_interval_s="0.2", **settings
    )
    fleet = Fleet(tmp_path, env)
    try:
        serve = fleet.serve("serve")
        run_sync(started(serve))
        yield serve.url
    finally:
        fleet.close()


async def test_a_small_job_is_not_queued_behind_another_tenants_large_one(
    capped_service: str,
) -> None:
    small = voting(5, "fake?latency_ms=200&answers=7", aggregate=MAJORITY_ALL_LANES)
    large = voting(1000, "fake?latency_ms=200&answers=7", aggregate=MAJORITY_ALL_LANES)
    acme = httpx.AsyncClient(
        base_url=capped_service, timeout=10, headers={"Authorization": "Bearer key-acme"}
    )
    globex = httpx.AsyncClient(
        base_url=capped_service, timeout=10, headers={"Authorization": "Bearer key-globex"}
    )
    async with acme, globex:

        def took(job: dict[str, Any]) -> float:
            return seconds(job["finished_at"]) - seconds(job["created_at"])

        alone = took(await run(globex, small))
        response = await acme.post("/v1/jobs", json=large)
        assert response.status_code == 202
        await asyncio.sleep(1)  # as the scenario goes: one second later
        shared = await run(globex, small)
        busy = (await acme.get(f"/v1/jobs/{response.json()['id']}")).json()
        await acme.post(f"/v1/jobs/{response.json()['id']}/cancel")
    assert busy["progress"].get("queued", 0) > 500, busy["progress"]  # it was still waiting
    assert shared["status"] == "succeeded"
    print(
        f"\nthe 5-lane job alone: {alone:.3f} s; behind 1,000 lanes of another tenant: "
        f"{took(shared):.3f} s"
    )
    # Queued behind the large job it would wait about 10 s (1,000 lanes, 20 at a time,
    # 0.2 s each); a fair share leaves it a few claims' delay behind running alone.
    assert took(shared) < alone + 1.5, (alone, took(shared))
