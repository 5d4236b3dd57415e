"""Big jobs over HTTP: a job read without its lanes, its lanes a page at a time (filtered
by status or name), and the list of jobs with their results."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from service.config import Settings
from tests.support import app_client, run_job, section, sectioning, voting

KEYS = "acme:key-acme,globex:key-globex"
ACME = {"Authorization": "Bearer key-acme"}
GLOBEX = {"Authorization": "Bearer key-globex"}


@pytest.fixture
def database_url(sqlite_url: str) -> str:
    """SQLite: the store's side of pages, cursors and filters is shown on both databases
    in tests/store."""
    return sqlite_url


async def lanes_of(
    client: httpx.AsyncClient, job_id: str, query: str = "", headers: dict[str, str] | None = None
) -> list[list[dict[str, Any]]]:
    """Every page of the job's lanes, following ``next_cursor`` from the first page (a
    cursor that went nowhere would page for ever: 100 pages is a failure)."""
    pages, cursor = [], None
    for _ in range(100):
        url = f"/v1/jobs/{job_id}/lanes?{query}" + (f"&cursor={cursor}" if cursor else "")
        response = await client.get(url, headers=headers)
        assert response.status_code == 200, response.text
        page = response.json()
        pages.append(page["lanes"])
        cursor = page["next_cursor"]
        if cursor is None:
            return pages
    raise AssertionError(f"no last page after {len(pages)} pages")


async def test_a_job_read_without_its_lanes_still_counts_them(client: httpx.AsyncClient) -> None:
    job = await run_job(client, voting(3, "fake?answers=391"))
    slim = await client.get(f"/v1/jobs/{job['id']}?lanes=false")
    assert slim.status_code == 200
    assert slim.json()["lanes"] == [] and slim.json()["progress"] == {"succeeded": 3}
    assert slim.json() == {**job, "lanes": []}
    assert len((await client.get(f"/v1/jobs/{job['id']}?lanes=true")).json()["lanes"]) == 3


async def test_creating_and_cancelling_can_answer_without_the_lanes(
    client: httpx.AsyncClient,
) -> None:
    spec = voting(4, "fake?latency_ms=20000")
    created = await client.post("/v1/jobs?lanes=false", json=spec)
    assert created.status_code == 202
    job = created.json()
    assert job["lanes"] == [] and job["progress"] == {"queued": 4}
    # The same key again answers the same job, as asked.
    keyed = {"Idempotency-Key": "slim"}
    first = (await client.post("/v1/jobs?lanes=false", json=spec, headers=keyed)).json()
    again = await client.post("/v1/jobs", json=spec, headers=keyed)
    assert again.json()["id"] == first["id"] and len(again.json()["lanes"]) == 4
    cancelled = await client.post(f"/v1/jobs/{job['id']}/cancel?lanes=false")
    assert cancelled.status_code == 202
    assert cancelled.json()["lanes"] == [] and cancelled.json()["status"] == "cancelled"
    await client.post(f"/v1/jobs/{first['id']}/cancel")


async def test_a_25_lane_job_paged_by_10_gives_every_lane_once(client: httpx.AsyncClient) -> None:
    # Every lane runs (no early stop), so none changes after the final event: a stopped
    # lane's late answer would still count its tokens on it.
    every = {"kind": "majority", "extract": "number", "early_stop": False}
    job = await run_job(client, voting(25, "fake?answers=391", aggregate=every))
    pages = await lanes_of(client, job["id"], "limit=10")
    assert [len(page) for page in pages] == [10, 10, 5]
    assert [lane for page in pages for lane in page] == job["lanes"]  # in order, each once


async def test_lanes_are_filtered_by_status_and_found_by_name(client: httpx.AsyncClient) -> None:
    spec = sectioning(
        section("draft"),
        section("safety", model="fake?status=400"),
        section("style"),
        section("facts", model="fake?status=400"),
        policy={"on_failure": "best_effort"},
    )
    job = await run_job(client, spec)
    failed = await lanes_of(client, job["id"], "status=failed&limit=1")
    assert [[lane["name"] for lane in page] for page in failed] == [["safety"], ["facts"]]
    assert all(page[0]["error"]["type"] == "upstream_error" for page in failed)
    succeeded = await lanes_of(client, job["id"], "status=succeeded")
    assert [lane["name"] for lane in succeeded[0]] == ["draft", "style"]
    (style,) = (await client.get(f"/v1/jobs/{job['id']}/lanes?name=style")).json()["lanes"]
    assert style == job["lanes"][2]
    nothing = await client.get(f"/v1/jobs/{job['id']}/lanes?name=style&status=failed")
    assert nothing.json() == {"lanes": [], "next_cursor": None}


async def test_another_tenants_or_an_unknown_jobs_lanes_are_not_found(
    settings: Settings,
) -> None:
    async with app_client(settings, api_keys=KEYS) as http:
        created = await http.post("/v1/jobs", json=voting(2), headers=ACME)
        job_id = created.json()["id"]
        assert (await http.get(f"/v1/jobs/{job_id}/lanes", headers=ACME)).status_code == 200
        for path, headers in [
            (f"/v1/jobs/{job_id}/lanes", GLOBEX),
            (f"/v1/jobs/{job_id}?lanes=false", GLOBEX),
            ("/v1/jobs/0193e7a0-0000-7000-8000-000000000000/lanes", ACME),
            ("/v1/jobs/nope/lanes", ACME),
        ]:
            response = await http.get(path, headers=headers)
            assert response.status_code == 404, path
            assert response.json()["code"] == "not_found"
        assert (await http.get(f"/v1/jobs/{job_id}/lanes")).status_code == 401


async def test_a_stream_token_reads_its_jobs_lanes(settings: Settings) -> None:
    async with app_client(settings, api_keys=KEYS) as http:
        created = (await http.post("/v1/jobs", json=voting(2), headers=ACME)).json()
        token = created["stream_token"]
        read = await http.get(f"/v1/jobs/{created['id']}/lanes?token={token}")
        assert read.status_code == 200
        assert [lane["name"] for lane in read.json()["lanes"]] == ["lane-0", "lane-1"]


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("cursor=abc", "cursor"),
        ("cursor=-1", "cursor"),
        ("cursor=1234567890", "cursor"),
        ("status=done", "status"),
        ("name=", "name"),
    ],
)
async def test_a_bad_page_request_is_a_422_naming_its_field(
    client: httpx.AsyncClient, query: str, field: str
) -> None:
    created = (await client.post("/v1/jobs", json=voting(1))).json()
    response = await client.get(f"/v1/jobs/{created['id']}/lanes?{query}")
    assert response.status_code == 422
    problem = response.json()
    assert problem["code"] == "invalid_request"
    assert [error["loc"] for error in problem["errors"]] == [["query", field]]


async def test_jobs_are_listed_with_their_results_when_asked(client: httpx.AsyncClient) -> None:
    won = await run_job(client, voting(3, "fake?answers=391"))
    lost = await run_job(client, sectioning(section("a", model="fake?status=400")))
    assert (won["status"], lost["status"]) == ("succeeded", "failed")

    listed = (await client.get("/v1/jobs?results=true")).json()["jobs"]
    by_id = {job["id"]: job for job in listed}
    assert by_id[won["id"]]["result"] == won["result"] and "error" not in by_id[won["id"]]
    assert by_id[lost["id"]]["error"] == lost["error"] and "result" not in by_id[lost["id"]]
    assert by_id[lost["id"]]["error"]["type"] == "lane_failed"

    plain = (await client.get("/v1/jobs")).json()["jobs"]
    assert {job["id"] for job in plain} == {won["id"], lost["id"]}
    assert all("result" not in job and "error" not in job for job in plain)
