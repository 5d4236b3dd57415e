"""The integrator's first hour: problems a program can act on, CORS, keys out of URLs,
stream tokens, a stream a browser can stop, and the ops routes closed by configuration."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import jsonschema_rs
import pytest
from fastapi import FastAPI

from service.config import Settings
from service.http import create_app
from service.http.problems import KINDS
from tests.support import (
    app_client,
    events_of,
    parse_sse,
    run_job,
    section,
    sectioning,
    voting,
)

KEYS = "acme:key-acme,globex:key-globex"
ACME = {"Authorization": "Bearer key-acme"}
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture
def database_url(sqlite_url: str) -> str:
    """SQLite: nothing here depends on the database."""
    return sqlite_url


@asynccontextmanager
async def app_and_client(
    settings: Settings, **overrides: Any
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    app = create_app(settings.model_copy(update=overrides))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://fanout") as http:
            yield app, http


async def nothing_stored(http: httpx.AsyncClient, headers: dict[str, str] | None = None) -> bool:
    return (await http.get("/v1/jobs", headers=headers)).json()["jobs"] == []


# --- problems a program can act on ----------------------------------------------------------


async def test_every_problem_names_its_kind_by_code_and_type(client: httpx.AsyncClient) -> None:
    cases = [
        (await client.get("/v1/jobs/nope"), "not_found"),
        (await client.post("/v1/jobs", json={"mode": "voting"}), "invalid_request"),
        (await client.delete("/v1/jobs"), "method_not_allowed"),
        (await client.get("/v1/jobs?cursor=forged"), "invalid_request"),
    ]
    for response, code in cases:
        problem = response.json()
        assert response.headers["content-type"] == "application/problem+json"
        assert (problem["code"], problem["status"]) == (code, response.status_code)
        assert problem["type"] == f"/problems/{code}"
        assert problem["title"] == KINDS[code].title and problem["detail"]
        about = await client.get(problem["type"])  # the type URI says what it means
        assert about.status_code == 200 and KINDS[code].about.split("`")[0] in about.text


async def test_a_body_that_is_not_sent_as_json_is_415(client: httpx.AsyncClient) -> None:
    body = b'{"mode": "voting", "n": 1, "task": {"model": "fake", "messages": []}}'
    for headers in ({"content-type": "text/plain"}, {}):
        response = await client.post("/v1/jobs", content=body, headers=headers)
        assert response.status_code == 415, response.text
        assert response.json()["code"] == "unsupported_media_type"
    assert await nothing_stored(client)


async def test_every_failing_field_is_named_in_one_answer(settings: Settings) -> None:
    """A field pydantic refuses, and what this server refuses in the parts that parsed
    (an unknown provider, a destination the egress guard never allows): one round trip."""
    spec = {
        "mode": "sectioning",
        "sections": [
            {"name": "a", "task": {"model": "m", "provider": "nope", "messages": HI}},
            {"name": "b", "task": {"kind": "http", "url": "file:///etc/passwd"}},
            {"name": "c", "task": {"model": "m", "messages": HI, "temperature": "hot"}},
        ],
        "policy": {"max_attempts": 0},
    }
    async with app_client(settings) as http:
        response = await http.post("/v1/jobs", json=spec)
        assert response.status_code == 422
        fields = {".".join(map(str, error["loc"][1:])) for error in response.json()["errors"]}
        assert fields == {
            "sections.0.task.provider",
            "sections.1.task.url",
            "sections.2.task.temperature",
            "policy.max_attempts",
        }
        assert await nothing_stored(http)


async def test_a_trailing_slash_is_the_same_path_not_a_redirect(client: httpx.AsyncClient) -> None:
    created = await client.post("/v1/jobs/", json=voting(1, "fake"))
    assert created.status_code == 202
    listed = await client.get("/v1/jobs/")
    assert listed.status_code == 200 and listed.json()["jobs"][0]["id"] == created.json()["id"]


async def test_a_repeated_idempotency_key_says_the_job_was_replayed(
    client: httpx.AsyncClient,
) -> None:
    headers = {"Idempotency-Key": "k-1"}
    first = await client.post("/v1/jobs", json=voting(1, "fake"), headers=headers)
    again = await client.post("/v1/jobs", json=voting(1, "fake"), headers=headers)
    assert "idempotent-replayed" not in first.headers
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]


async def test_a_draining_process_refuses_new_jobs_with_503_and_retry_after(
    settings: Settings,
) -> None:
    async with app_and_client(settings) as (app, http):
        assert (await http.get("/readyz")).status_code == 200
        app.state.fanout.draining = True  # what SIGTERM sets
        refused = await http.post("/v1/jobs", json=voting(1, "fake"))
        assert refused.status_code == 503 and refused.json()["code"] == "unavailable"
        assert int(refused.headers["retry-after"]) >= 1
        ready = await http.get("/readyz")
        assert ready.status_code == 503 and ready.json()["detail"] == "shutting down"
        assert await nothing_stored(http)


# --- keys out of URLs, stream tokens ---------------------------------------------------------


async def test_a_key_in_the_url_is_refused_and_changes_nothing(settings: Settings) -> None:
    async with app_client(settings, api_keys=KEYS) as http:
        for method, path in [("GET", "/v1/jobs?key=key-acme"), ("POST", "/v1/jobs?key=key-acme")]:
            response = await http.request(method, path, json=voting(1, "fake"))
            assert response.status_code == 400
            assert response.json()["code"] == "key_in_url"
        assert await nothing_stored(http, ACME)


async def test_a_stream_token_reads_its_job_and_its_events_only(settings: Settings) -> None:
    async with app_client(settings, api_keys=KEYS) as http:
        job = await run_job_as(http, voting(2, "fake?answers=7"), ACME)
        other = await run_job_as(http, voting(1, "fake"), ACME)
        token = job["stream_token"]
        assert token and other["stream_token"] != token
        read = await http.get(f"/v1/jobs/{job['id']}?token={token}")
        assert read.status_code == 200 and read.json()["status"] == "succeeded"
        events = await http.get(f"/v1/jobs/{job['id']}/events?token={token}")
        assert events.status_code == 200
        assert parse_sse(events.text)[-1]["event"] == "job.succeeded"
        assert (await http.get(f"/jobs/{job['id']}?token={token}")).status_code == 200
        for path in (f"/v1/jobs/{other['id']}", f"/v1/jobs/{other['id']}/events"):
            refused = await http.get(f"{path}?token={token}")
            assert refused.status_code == 401 and "another job" in refused.json()["detail"]
        forged = await http.get(f"/v1/jobs/{job['id']}?token={token[:-2]}xx")
        assert forged.status_code == 401


async def test_a_stream_token_expires(settings: Settings) -> None:
    async with app_client(settings, api_keys=KEYS, stream_token_ttl_s=1) as http:
        created = (await http.post("/v1/jobs", json=voting(1, "fake"), headers=ACME)).json()
        url = f"/v1/jobs/{created['id']}?token={created['stream_token']}"
        assert (await http.get(url)).status_code == 200
        await asyncio.sleep(2.1)  # the token's timestamp has a resolution of 1 s
        expired = await http.get(url)
        assert expired.status_code == 401 and "expired" in expired.json()["detail"]


async def test_an_open_server_needs_no_token(client: httpx.AsyncClient) -> None:
    job = await run_job(client, voting(1, "fake"))
    assert job["stream_token"] is None


async def run_job_as(
    http: httpx.AsyncClient, spec: dict[str, Any], headers: dict[str, str]
) -> dict[str, Any]:
    created = (await http.post("/v1/jobs", json=spec, headers=headers)).json()
    async with asyncio.timeout(20):
        await http.get(f"/v1/jobs/{created['id']}/events", headers=headers)
    job: dict[str, Any] = (await http.get(f"/v1/jobs/{created['id']}", headers=headers)).json()
    return job


async def test_metrics_can_need_their_own_key(settings: Settings) -> None:
    async with app_client(settings, api_keys=KEYS, metrics_key="scrape-me") as http:
        assert (await http.get("/metrics")).status_code == 401
        assert (await http.get("/metrics", headers=ACME)).status_code == 401
        scraped = await http.get("/metrics", headers={"Authorization": "Bearer scrape-me"})
        assert scraped.status_code == 200 and "fanout_jobs_total" in scraped.text


async def test_docs_and_the_document_can_be_closed(settings: Settings) -> None:
    async with app_client(settings, docs=False) as http:
        assert (await http.get("/docs")).status_code == 404
        assert (await http.get("/openapi.json")).status_code == 404
        assert (await http.get("/healthz")).status_code == 200


# --- CORS ----------------------------------------------------------------------------------


async def test_cors_is_off_unless_origins_are_configured(client: httpx.AsyncClient) -> None:
    preflight = await client.options(
        "/v1/jobs",
        headers={"Origin": "http://app.example", "Access-Control-Request-Method": "POST"},
    )
    assert "access-control-allow-origin" not in preflight.headers


async def test_an_allowed_origin_may_call_and_read_what_it_needs(settings: Settings) -> None:
    origin = "http://app.example"
    async with app_client(settings, cors_origins=f"{origin}, http://other.example") as http:
        preflight = await http.options(
            "/v1/jobs",
            headers={
                "Origin": origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type, idempotency-key",
            },
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == origin
        created = await http.post("/v1/jobs", json=voting(1, "fake"), headers={"Origin": origin})
        assert created.headers["access-control-allow-origin"] == origin
        exposed = created.headers["access-control-expose-headers"].lower()
        assert {"location", "retry-after", "idempotent-replayed"} <= set(exposed.split(", "))
        stranger = await http.get("/v1/jobs", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in stranger.headers


# --- a stream a browser can stop ------------------------------------------------------------


async def test_the_stream_tells_a_browser_when_to_retry_and_when_to_stop(
    client: httpx.AsyncClient,
) -> None:
    job = await run_job(client, voting(1, "fake"))
    whole = await client.get(f"/v1/jobs/{job['id']}/events")
    assert whole.text.startswith("retry: 2000\n")
    last = parse_sse(whole.text)[-1]
    # Reconnecting after the final event: 204, which makes an EventSource stop.
    again = await client.get(f"/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": last["id"]})
    assert again.status_code == 204 and again.content == b""
    # An id past the last one (any that the document's pattern admits) is the end too.
    past = await client.get(f"/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": "9" * 20})
    assert past.status_code == 204
    # An empty Last-Event-ID is none: the whole stream again.
    fresh = await events_of_with(client, job["id"], {"Last-Event-ID": ""})
    assert [event["id"] for event in fresh] == [event["id"] for event in parse_sse(whole.text)]


async def events_of_with(
    client: httpx.AsyncClient, job_id: str, headers: dict[str, str]
) -> list[dict[str, Any]]:
    response = await client.get(f"/v1/jobs/{job_id}/events", headers=headers)
    assert response.status_code == 200, response.text
    return parse_sse(response.text)


async def test_a_stream_before_the_end_is_not_204(client: httpx.AsyncClient) -> None:
    job = await run_job(client, voting(2, "fake"))
    events = await events_of(client, job["id"], last_event_id=1)
    assert events and events[-1]["event"] == "job.succeeded"


# --- the document describes what the API sends ------------------------------------------------


def document_validator(name: str) -> Any:
    """A validator of the committed document's schema ``name`` (formats checked)."""
    document = json.loads((Path(__file__).parents[2] / "openapi" / "openapi.json").read_text())
    schema = {"$ref": f"#/components/schemas/{name}", "components": document["components"]}
    return jsonschema_rs.Draft202012Validator(schema, validate_formats=True)


async def test_every_event_a_job_sends_is_one_the_document_describes(
    client: httpx.AsyncClient,
) -> None:
    frames = document_validator("JobEvent")
    merge = {"model": "fake?words=3", "messages": HI, "stream": True}
    jobs = [
        voting(
            4,
            "fake?answers=7:3,8:1",
            task={"seed": 2, "stream": True},
            aggregate={"kind": "majority", "extract": "number", "weight": "confidence"},
        ),
        voting(2, "fake?fail_first=1&fail_status=503", aggregate={"kind": "reduce", "task": merge}),
        voting(2, "fake?status=400"),
    ]
    seen = set()
    for spec in jobs:
        job = await run_job(client, spec)
        for event in await events_of(client, job["id"]):
            frame = {**event, "data": json.dumps(event["data"])}
            errors = [error.message for error in frames.iter_errors(frame)]
            data = document_validator("EventData_" + event["event"].replace(".", "_"))
            errors += [error.message for error in data.iter_errors(event["data"])]
            assert not errors, (event, errors)
            seen.add(event["event"])
    assert {"lane.retrying", "lane.succeeded", "lane.failed", "aggregate.succeeded"} <= seen
    assert {"job.succeeded", "job.failed"} <= seen


async def test_the_job_the_api_returns_is_the_one_the_document_describes(
    client: httpx.AsyncClient,
) -> None:
    validator = document_validator("JobView")
    job = await run_job(
        client,
        voting(3, "fake?answers=7", aggregate={"kind": "majority", "extract": "number"}),
    )
    assert not [error.message for error in validator.iter_errors(job)]
    # A result a gate withheld (fake echoes the prompt: the gate's pattern matches it).
    gated = sectioning(
        section("draft", text="a poem"),
        section("safety", text="is it safe?", gate={"block_if": "(?i)echo"}),
    )
    blocked = await run_job(client, gated)
    assert blocked["result"]["blocked_by"] == "safety"
    assert not [error.message for error in validator.iter_errors(blocked)]
    page = (await client.get("/v1/jobs")).json()
    assert not [error.message for error in document_validator("JobPage").iter_errors(page)]
