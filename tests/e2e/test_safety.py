"""Tenants, rate limits, idempotency, http tasks and webhooks, through the real app."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from typing import Any

import httpx
import pytest
from aiohttp import web

from service.config import Settings
from service.runner import webhooks
from tests.support import (
    app_client,
    events_of,
    fake_reset,
    fake_stats,
    receiver,
    run_job,
    section,
    sectioning,
    voting,
)

KEYS = "acme:key-acme,globex:key-globex"
SECRET = "whsec_" + base64.b64encode(b"fanout-test-secret").decode()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def database_url(sqlite_url: str) -> str:
    """SQLite: the store's side of tenants, caps, idempotency and the outbox is shown on
    both databases in tests/store."""
    return sqlite_url


# --- tenants -------------------------------------------------------------------------


async def test_every_v1_route_needs_a_key_when_keys_are_configured(settings: Settings) -> None:
    async with app_client(settings, api_keys=KEYS) as http:
        for method, path in [
            ("GET", "/v1/jobs"),
            ("POST", "/v1/jobs"),
            ("GET", "/v1/jobs/x"),
            ("GET", "/v1/jobs/x/events"),
            ("POST", "/v1/jobs/x/cancel"),
        ]:
            response = await http.request(
                method, path, json=voting(1) if method == "POST" else None
            )
            assert response.status_code == 401, (method, path)
            assert response.headers["www-authenticate"].startswith("Bearer")
            assert response.headers["content-type"] == "application/problem+json"
        wrong = await http.get("/v1/jobs", headers=bearer("nope"))
        assert wrong.status_code == 401
        assert (await http.get("/healthz")).status_code == 200


async def test_a_tenant_sees_only_its_own_jobs(settings: Settings) -> None:
    async with app_client(settings, api_keys=KEYS) as http:
        acme, globex = bearer("key-acme"), bearer("key-globex")
        created = await http.post("/v1/jobs", json=voting(1, "fake?latency_ms=2000"), headers=acme)
        job_id = created.json()["id"]
        for method, path in [
            ("GET", f"/v1/jobs/{job_id}"),
            ("GET", f"/v1/jobs/{job_id}/events"),
            ("POST", f"/v1/jobs/{job_id}/cancel"),
            ("GET", f"/jobs/{job_id}"),
        ]:
            response = await http.request(method, path, headers=globex)
            assert response.status_code == 404, (method, path, response.text)
        assert (await http.get("/v1/jobs", headers=globex)).json()["jobs"] == []
        assert [j["id"] for j in (await http.get("/v1/jobs", headers=acme)).json()["jobs"]] == [
            job_id
        ]
        # The job's stream token reads it (EventSource cannot send headers): only it.
        token = created.json()["stream_token"]
        assert (await http.get(f"/v1/jobs/{job_id}?token={token}")).status_code == 200
        assert (await http.get(f"/v1/jobs?token={token}")).status_code == 401
        assert (await http.post(f"/v1/jobs/{job_id}/cancel?token={token}")).status_code == 401
        assert (await http.post(f"/v1/jobs/{job_id}/cancel", headers=acme)).status_code == 202


async def test_rate_limit_is_429_with_retry_after(settings: Settings) -> None:
    async with app_client(settings, api_keys=KEYS, rate_limit_per_minute=3) as http:
        codes = [
            (await http.get("/v1/jobs", headers=bearer("key-acme"))).status_code for _ in range(4)
        ]
        assert codes == [200, 200, 200, 429]
        limited = await http.get("/v1/jobs", headers=bearer("key-acme"))
        assert int(limited.headers["retry-after"]) >= 1
        assert "3 requests a minute" in limited.json()["detail"]
        # Another tenant has its own budget.
        assert (await http.get("/v1/jobs", headers=bearer("key-globex"))).status_code == 200


async def test_jobs_in_flight_per_tenant_are_capped(settings: Settings) -> None:
    async with app_client(settings, max_jobs_in_flight=2) as http:
        for _ in range(2):
            assert (await http.post("/v1/jobs", json=voting(1, "fake?hang=1"))).status_code == 202
        over = await http.post("/v1/jobs", json=voting(1, "fake?hang=1"))
        assert over.status_code == 429  # a temporary refusal: try again later
        assert over.json()["code"] == "tenant_at_capacity"
        assert int(over.headers["retry-after"]) >= 1
        assert "cap of 2" in over.json()["detail"]
        assert len((await http.get("/v1/jobs")).json()["jobs"]) == 2


# --- idempotency ---------------------------------------------------------------------


async def test_same_idempotency_key_and_body_give_one_job(client: httpx.AsyncClient) -> None:
    headers = {"Idempotency-Key": "order-17"}
    spec = voting(2, "fake?latency_ms=100")
    responses = await asyncio.gather(
        *(client.post("/v1/jobs", json=spec, headers=headers) for _ in range(50))
    )
    assert {r.status_code for r in responses} == {202}
    assert len({r.json()["id"] for r in responses}) == 1
    assert len((await client.get("/v1/jobs")).json()["jobs"]) == 1


async def test_same_idempotency_key_with_another_body_is_422(client: httpx.AsyncClient) -> None:
    headers = {"Idempotency-Key": "order-18"}
    assert (await client.post("/v1/jobs", json=voting(2), headers=headers)).status_code == 202
    other = await client.post("/v1/jobs", json=voting(3), headers=headers)
    assert other.status_code == 422
    assert other.json()["errors"][0]["loc"] == ["header", "Idempotency-Key"]
    assert len((await client.get("/v1/jobs")).json()["jobs"]) == 1


async def test_idempotency_keys_are_scoped_per_tenant(settings: Settings) -> None:
    async with app_client(settings, api_keys=KEYS) as http:
        key = {"Idempotency-Key": "shared"}
        a = await http.post("/v1/jobs", json=voting(1), headers={**key, **bearer("key-acme")})
        b = await http.post("/v1/jobs", json=voting(1), headers={**key, **bearer("key-globex")})
        assert a.json()["id"] != b.json()["id"]


async def test_expired_idempotency_key_makes_a_new_job(settings: Settings) -> None:
    async with app_client(settings, idempotency_ttl_s=0.01) as http:
        key = {"Idempotency-Key": "short-lived"}
        first = await http.post("/v1/jobs", json=voting(1), headers=key)
        await asyncio.sleep(0.05)  # the key's lifetime is the thing under test
        second = await http.post("/v1/jobs", json=voting(1), headers=key)
        assert first.json()["id"] != second.json()["id"]


# --- http tasks ----------------------------------------------------------------------


async def test_http_task_calls_an_allowed_destination(settings: Settings) -> None:
    async def quote(request: web.Request) -> web.Response:
        return web.json_response({"symbol": request.path.rsplit("/", 1)[-1], "price": 42.5})

    async with receiver(quote) as url, app_client(settings, egress_allow="127.0.0.1") as http:
        spec = sectioning(
            {"name": "stock", "task": {"kind": "http", "url": f"{url}/api/ACME"}}, section("draft")
        )
        job = await run_job(http, spec)
    assert job["status"] == "succeeded"
    stock = job["result"]["output"]["stock"]
    assert stock["status"] == 200
    assert stock["body"] == {"symbol": "ACME", "price": 42.5}


async def test_http_task_to_a_private_address_is_refused(settings: Settings) -> None:
    hits = 0

    async def canary(_request: web.Request) -> web.Response:
        nonlocal hits
        hits += 1
        return web.Response(text="should never be reached")

    async with receiver(canary) as url, app_client(settings) as http:  # nothing allowed
        job = await run_job(
            http, sectioning({"name": "probe", "task": {"kind": "http", "url": url}})
        )
    assert job["status"] == "failed"
    assert job["lanes"][0]["error"]["type"] == "egress_denied"
    assert hits == 0


async def test_http_task_with_a_non_http_scheme_is_422(client: httpx.AsyncClient) -> None:
    spec = sectioning({"name": "local", "task": {"kind": "http", "url": "file:///etc/passwd"}})
    response = await client.post("/v1/jobs", json=spec)
    assert response.status_code == 422
    assert response.json()["errors"][0]["loc"][-1] == "url"


# --- webhooks ------------------------------------------------------------------------


def verify(secret: str, headers: Any, body: bytes) -> bool:
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return any(
        hmac.compare_digest(f"v1,{expected}", sig) for sig in headers["webhook-signature"].split()
    )


async def test_webhook_is_signed_retried_and_recorded(settings: Settings) -> None:
    received: list[tuple[dict[str, str], bytes]] = []
    done = asyncio.Event()

    async def hook(request: web.Request) -> web.Response:
        received.append(({k.lower(): v for k, v in request.headers.items()}, await request.read()))
        if len(received) < 3:
            return web.Response(status=500)
        done.set()
        return web.Response(status=204)

    async with (
        receiver(hook) as url,
        app_client(
            settings, egress_allow="127.0.0.1", webhook_secret=SECRET, retry_base_s=0.05
        ) as http,
    ):
        job = await run_job(
            http,
            voting(
                2,
                "fake?answers=5",
                webhook={"url": f"{url}/hooks/fanout"},
                aggregate={"kind": "majority", "extract": "number"},
            ),
        )
        async with asyncio.timeout(15):
            await done.wait()
            while (view := (await http.get(f"/v1/jobs/{job['id']}")).json())["webhook"][
                "status"
            ] != "delivered":
                await asyncio.sleep(0.02)
    assert len(received) == 3
    assert len({headers["webhook-id"] for headers, _ in received}) == 1
    for headers, body in received:
        lowered = {k.lower(): v for k, v in headers.items()}
        assert verify(SECRET, lowered, body)
    payload = json.loads(received[-1][1])
    assert payload["id"] == job["id"] and payload["status"] == "succeeded"
    assert payload["result"]["output"] == 5
    attempts = view["webhook"]["attempts"]
    assert [a["status_code"] for a in attempts] == [500, 500, 204]


async def test_webhook_needs_a_server_secret(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/jobs", json=voting(1, webhook={"url": "https://example.com/h"})
    )
    assert response.status_code == 422
    assert "FANOUT_WEBHOOK_SECRET" in response.json()["detail"]


@pytest.mark.parametrize("url", ["ftp://example.com/hook", "not a url"])
async def test_webhook_with_a_bad_url_is_422(settings: Settings, url: str) -> None:
    async with app_client(settings, webhook_secret=SECRET) as http:
        response = await http.post("/v1/jobs", json=voting(1, webhook={"url": url}))
    assert response.status_code == 422
    assert response.json()["errors"][0]["loc"][-2:] == ["webhook", "url"]


async def test_cancelled_job_also_sends_its_webhook(settings: Settings) -> None:
    got = asyncio.Event()
    bodies: list[dict[str, Any]] = []

    async def hook(request: web.Request) -> web.Response:
        bodies.append(await request.json())
        got.set()
        return web.Response(status=200)

    async with (
        receiver(hook) as url,
        app_client(settings, egress_allow="127.0.0.1", webhook_secret=SECRET) as http,
    ):
        created = await http.post("/v1/jobs", json=voting(1, "fake?hang=1", webhook={"url": url}))
        await http.post(f"/v1/jobs/{created.json()['id']}/cancel")
        async with asyncio.timeout(10):
            await got.wait()
        await events_of(http, created.json()["id"])
    assert bodies[0]["status"] == "cancelled"


async def test_a_big_jobs_webhook_comes_without_its_lanes(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(webhooks, "WEBHOOK_MAX_LANES", 2)
    bodies: list[dict[str, Any]] = []
    got = asyncio.Event()

    async def hook(request: web.Request) -> web.Response:
        bodies.append(await request.json())
        if len(bodies) == 2:
            got.set()
        return web.Response(status=200)

    async with (
        receiver(hook) as url,
        app_client(settings, egress_allow="127.0.0.1", webhook_secret=SECRET) as http,
    ):
        for n in (2, 3):
            await run_job(http, voting(n, "fake?answers=5", webhook={"url": url}))
        async with asyncio.timeout(10):
            await got.wait()
    by_lanes = sorted((sum(b["progress"].values()), len(b["lanes"])) for b in bodies)
    assert by_lanes == [(2, 2), (3, 0)]  # over the cap: counted, not listed


# --- provider limits -----------------------------------------------------------------


def providers_file(tmp_path: Any, fake_llm: str, **limits: int) -> Any:
    path = tmp_path / "providers.toml"
    lines = ["[providers.limited]", f'base_url = "{fake_llm}"', 'api_key_env = "OPENAI_API_KEY"']
    lines += [f"{name} = {value}" for name, value in limits.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def limited(n: int, model: str) -> dict[str, Any]:
    return voting(
        n,
        model,
        task={"provider": "limited"},
        aggregate={"kind": "majority", "extract": "number", "early_stop": False},
    )


async def test_provider_concurrency_cap_keeps_lanes_queued(
    settings: Settings, fake_llm: str, tmp_path: Any
) -> None:
    path = providers_file(tmp_path, fake_llm, max_concurrency=2)
    await fake_reset(fake_llm)
    async with app_client(settings, providers_file=path) as http:
        created = await http.post("/v1/jobs", json=limited(6, "fake?latency_ms=300&answers=1"))
        job_id = created.json()["id"]
        seen_waiting = False
        async with asyncio.timeout(15):
            while (job := (await http.get(f"/v1/jobs/{job_id}")).json())["status"] != "succeeded":
                progress = job["progress"]
                seen_waiting |= progress.get("running", 0) >= 1 and progress.get("queued", 0) >= 1
                await asyncio.sleep(0.05)
    assert seen_waiting
    assert all(lane["attempts"] == 1 for lane in job["lanes"])
    assert (await fake_stats(fake_llm))["max_in_flight"] == 2


async def test_provider_requests_per_minute_pace_the_calls(
    settings: Settings, fake_llm: str, tmp_path: Any
) -> None:
    path = providers_file(tmp_path, fake_llm, rpm=600)  # 10 a second, bursts of 10
    async with app_client(settings, providers_file=path) as http:
        started = time.monotonic()
        job = await run_job(http, limited(20, "fake?answers=1"))
        elapsed = time.monotonic() - started
    assert job["status"] == "succeeded"
    assert elapsed >= 0.9  # the second ten waited for the bucket to refill


async def test_rate_limit_storm_never_multiplies_calls(
    client: httpx.AsyncClient, fake_llm: str
) -> None:
    await fake_reset(fake_llm)
    job = await run_job(
        client, voting(5, "fake?rate_limit=1&retry_after=0.05", policy={"max_attempts": 3})
    )
    assert job["status"] == "failed"
    assert all(
        lane["attempts"] == 3 and lane["error"]["type"] == "rate_limited" for lane in job["lanes"]
    )
    assert (await fake_stats(fake_llm))["requests"] == 15
