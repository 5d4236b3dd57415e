"""The HTTP surface: bad input, listing, health, docs, the OpenAPI document."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.config import Settings
from service.http import create_app
from tests.processes import poll
from tests.support import app_client, fake_reset, run_job, section, sectioning, voting

NUMBER = {"kind": "majority", "extract": "number"}


@pytest.fixture
def database_url(sqlite_url: str) -> str:
    """SQLite: the store's side of listing, cursors and refusals is shown on both
    databases in tests/store."""
    return sqlite_url


async def test_create_returns_202_with_location(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/jobs", json=voting(1, "fake"))
    assert response.status_code == 202
    job = response.json()
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] in ("queued", "running", "aggregating", "succeeded")
    assert job["mode"] == "voting" and len(job["lanes"]) == 1


@pytest.mark.parametrize(
    "spec",
    [
        voting(3, "fake", metadata={"request_id": "abc"}, policy={"deadline_s": 60}),
        sectioning(section("draft"), section("safety", gate={"block_if": "unsafe"})),
    ],
    ids=["voting", "sectioning"],
)
async def test_create_returns_the_job_exactly_as_stored(
    settings: Settings, spec: dict[str, Any]
) -> None:
    """The 202 body is built without reading the job back: with no runner to move it
    on, a GET right after must show the very same job."""
    app = create_app(settings, with_runner=False)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://fanout") as http:
            created = await http.post("/v1/jobs", json=spec)
            assert created.status_code == 202
            stored = await http.get(created.headers["location"])
    assert created.json() == stored.json()
    job = created.json()
    assert job["status"] == "queued" and job["progress"] == {"queued": len(job["lanes"])}
    assert all(lane["attempts"] == 0 and lane["queued_at"] for lane in job["lanes"])


async def test_voting_job_returns_the_majority_answer(client: httpx.AsyncClient) -> None:
    spec = voting(
        5, "fake?answers=391:1", task={"seed": 1}, aggregate={**NUMBER, "early_stop": False}
    )
    job = await run_job(client, spec)
    assert job["status"] == "succeeded"
    assert job["result"]["output"] == 391
    assert job["progress"] == {"succeeded": 5}
    assert job["usage"]["total_tokens"] == sum(
        lane["usage"]["total_tokens"] for lane in job["lanes"]
    )
    assert job["started_at"] and job["finished_at"] and job["created_at"]


BAD_SPECS: list[tuple[str, dict[str, Any], str]] = [
    ("unknown field", {**voting(3), "politcy": {}}, "politcy"),
    ("typo in task", voting(3, task={"temprature": 1}), "task.temprature"),
    ("n below one", voting(0), "n"),
    ("n over the cap", voting(1001), "n"),
    ("no mode", {"n": 3}, "mode"),
    ("duplicate sections", sectioning(section("a"), section("a")), "sections"),
    (
        "quorum over lanes",
        sectioning(section("a"), policy={"on_failure": "quorum", "quorum": 2}),
        "policy.quorum",
    ),
    (
        "quorum with another failure policy",
        voting(3, policy={"on_failure": "best_effort", "quorum": 2}),
        "policy.quorum",
    ),
    (
        "bad gate regex",
        sectioning(section("a", gate={"block_if": "(unclosed"})),
        "sections.0.gate.block_if",
    ),
    (
        "bad extract regex",
        voting(2, aggregate={"kind": "majority", "extract": "regex", "pattern": "("}),
        "aggregate.pattern",
    ),
    (
        "regex without pattern",
        voting(2, aggregate={"kind": "majority", "extract": "regex"}),
        "aggregate",
    ),
    ("unknown provider", voting(2, task={"provider": "nope"}), "task.provider"),
    ("unknown aggregate", voting(2, aggregate={"kind": "average"}), "aggregate"),
    ("empty messages", voting(2, task={"messages": []}), "task.messages"),
    ("temperature out of range", voting(2, task={"temperature": 9}), "task.temperature"),
    ("attempts over the server max", voting(2, policy={"max_attempts": 99}), "policy.max_attempts"),
    (
        "concurrency over the process cap",
        voting(2, policy={"max_concurrency": 100000}),
        "policy.max_concurrency",
    ),
    ("tools not a list", voting(2, task={"tools": {"type": "function"}}), "task.tools"),
    ("logprobs not a boolean", voting(2, task={"logprobs": "yes"}), "task.logprobs"),
    ("max tokens as text", voting(2, task={"max_completion_tokens": "9"}), "task.max_completion"),
    (
        "extra_body sets the model",
        voting(2, task={"extra_body": {"model": "x"}}),
        "task.extra_body",
    ),
    (
        "extra_body sets the messages",
        voting(2, task={"extra_body": {"messages": []}}),
        "task.extra_body",
    ),
    (
        "a tool message without its call",
        voting(2, task={"messages": [{"role": "tool", "content": "4"}]}),
        "task.messages.0",
    ),
    ("a cost budget of zero", voting(2, policy={"max_cost_usd": 0}), "policy.max_cost_usd"),
    (
        "a stopping rule without its parameter",
        voting(3, aggregate={"kind": "majority", "stop": {"rule": "window"}}),
        "aggregate.stop",
    ),
    (
        "a confidence of 1",
        voting(3, aggregate={"kind": "majority", "stop": {"rule": "confidence", "confidence": 1}}),
        "aggregate.stop.confidence",
    ),
    (
        "a weight on a score",
        voting(3, aggregate={"kind": "score", "weight": "confidence"}),
        "aggregate.weight",
    ),
    ("a judge without a task", voting(3, aggregate={"kind": "judge"}), "aggregate.task"),
    ("task and tasks", {**voting(3), "tasks": [voting(1)["task"]]}, ""),
    ("no tasks", {**voting(3), "task": None, "tasks": []}, "tasks"),
    (
        "a window longer than the vote",
        voting(3, aggregate={"kind": "majority", "stop": {"rule": "window", "size": 4}}),
        "aggregate.stop.size",
    ),
    (
        "min_votes over n",
        voting(3, aggregate={"kind": "majority", "stop": {"rule": "none", "min_votes": 9}}),
        "aggregate.stop.min_votes",
    ),
    (
        "more tasks than lanes",
        {**voting(1), "task": None, "tasks": [voting(1)["task"]] * 2},
        "tasks",
    ),
]


@pytest.mark.parametrize(
    ("field", "why"), [("n", "lanes are Fanout's samples"), ("stream_options", "Fanout sets")]
)
async def test_a_field_fanout_owns_is_a_422_that_says_why(
    client: httpx.AsyncClient, field: str, why: str
) -> None:
    response = await client.post("/v1/jobs", json=voting(2, task={field: 3}))
    assert response.status_code == 422, response.text
    (error,) = response.json()["errors"]
    assert error["loc"] == ["body", "task", field] and why in error["msg"]
    assert (await client.get("/v1/jobs")).json()["jobs"] == []


@pytest.mark.parametrize(("case", "spec", "field"), BAD_SPECS, ids=[c[0] for c in BAD_SPECS])
async def test_bad_spec_is_422_naming_the_field_and_stores_nothing(
    client: httpx.AsyncClient, case: str, spec: dict[str, Any], field: str
) -> None:
    response = await client.post("/v1/jobs", json=spec)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["status"] == 422 and problem["title"] and problem["detail"]
    paths = [".".join(str(p) for p in error["loc"][1:]) for error in problem["errors"]]
    assert any(path.startswith(field) for path in paths), paths
    assert "Traceback" not in response.text
    assert (await client.get("/v1/jobs")).json()["jobs"] == []


async def test_cap_is_named_in_the_message(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/jobs", json=voting(1001))
    assert "1000" in response.json()["detail"]


async def test_body_that_is_not_json_is_400_saying_where_it_broke(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post(
        "/v1/jobs", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["code"] == "malformed_json" and problem["type"] == "/problems/malformed_json"
    assert problem["detail"].startswith("the body is not valid JSON: Expecting property name")
    assert "(at byte 1)" in problem["detail"]


async def test_body_over_the_cap_is_413(client: httpx.AsyncClient) -> None:
    spec = voting(1, task={"messages": [{"role": "user", "content": "x" * 1_100_000}]})
    response = await client.post("/v1/jobs", json=spec)
    assert response.status_code == 413
    assert "1048576" in response.json()["detail"]

    async def chunks():  # no Content-Length: counted while it streams in
        body = json.dumps(spec).encode()
        for i in range(0, len(body), 65536):
            yield body[i : i + 65536]

    chunked = await client.post(
        "/v1/jobs", content=chunks(), headers={"content-type": "application/json"}
    )
    assert chunked.status_code == 413
    assert (await client.get("/v1/jobs")).json()["jobs"] == []


async def test_unknown_job_is_404_problem(client: httpx.AsyncClient) -> None:
    for method, path in [("GET", "/v1/jobs/nope"), ("POST", "/v1/jobs/nope/cancel")]:
        response = await client.request(method, path)
        assert response.status_code == 404
        assert response.json()["title"] == "Not Found"


async def test_list_is_newest_first_with_cursor_and_status_filter(
    client: httpx.AsyncClient,
) -> None:
    ids = [(await run_job(client, voting(1, "fake")))["id"] for _ in range(5)]
    failed = (await run_job(client, voting(1, "fake?status=400")))["id"]
    page = (await client.get("/v1/jobs", params={"limit": 4})).json()
    assert [job["id"] for job in page["jobs"]] == [failed, *ids[::-1][:3]]
    rest = (await client.get("/v1/jobs", params={"limit": 4, "cursor": page["next_cursor"]})).json()
    assert [job["id"] for job in rest["jobs"]] == ids[1::-1]
    assert rest["next_cursor"] is None
    only_failed = (await client.get("/v1/jobs", params={"status": "failed"})).json()
    assert [job["id"] for job in only_failed["jobs"]] == [failed]
    bad = await client.get("/v1/jobs", params={"cursor": "garbage"})
    assert bad.status_code == 422
    # A cursor is a position of the form the document states, given out or not.
    created_at, last_id = page["next_cursor"].split("_")
    older = f"{created_at}_{'0' * 8}-0000-0000-0000-{'0' * 12}"
    assert (await client.get("/v1/jobs", params={"cursor": older})).json()["jobs"] == rest["jobs"]
    before_all = (await client.get("/v1/jobs", params={"cursor": f"0_{last_id}"})).json()
    assert before_all == {"jobs": [], "next_cursor": None}


async def test_health_and_readiness(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    assert (await client.get("/readyz")).json() == {"status": "ready"}


async def test_readiness_fails_without_migrations(tmp_path: Path, fake_llm: str) -> None:
    settings = Settings(
        database_url=f"sqlite+aiosqlite:///{tmp_path}/blank.db", run_migrations=False
    )
    app = create_app(settings, with_runner=False)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://fanout") as http:
            response = await http.get("/readyz")
    assert response.status_code == 503
    assert "migrat" in response.json()["detail"]


async def test_docs_are_served_without_a_cdn(client: httpx.AsyncClient) -> None:
    page = await client.get("/docs")
    assert page.status_code == 200
    assert "cdn" not in page.text.lower() and "unpkg" not in page.text.lower()
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
        src = next(
            part.split('"')[0]
            for part in page.text.split('="')
            if part.split('"')[0].endswith(asset)
        )
        assert src.startswith("/")
        assert (await client.get(src)).status_code == 200
    assert (await client.get("/openapi.json")).json()["info"]["title"] == "Fanout"


def test_committed_openapi_document_is_current() -> None:
    committed = json.loads(Path("openapi/openapi.json").read_text())
    assert committed == create_app(Settings()).openapi(), "stale: run `make openapi`"


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format (0 when absent)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        if key == (f"{name}{{{wanted}}}" if labels else name):
            return float(value)
    return 0.0


async def test_metrics_count_jobs_lanes_retries_and_tokens(
    client: httpx.AsyncClient, fake_llm: str
) -> None:
    await fake_reset(fake_llm)
    job = await run_job(
        client, voting(3, "fake?answers=4&tokens=5", aggregate={**NUMBER, "early_stop": False})
    )
    await run_job(
        client, sectioning(section("flaky", model="fake?fail_first=1&fail_status=503&tokens=5"))
    )
    await run_job(client, voting(1, "fake?status=400"))
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert metric(text, "fanout_jobs_total", status="succeeded") == 2
    assert metric(text, "fanout_jobs_total", status="failed") == 1
    assert metric(text, "fanout_lanes_total", status="succeeded") == 4
    assert metric(text, "fanout_lanes_total", status="failed") == 1
    assert metric(text, "fanout_retries_total", reason="upstream_error") == 1
    completion = metric(
        text,
        "fanout_tokens_total",
        provider="default",
        model="fake?answers=4&tokens=5",
        kind="completion",
    )
    assert completion == sum(lane["usage"]["completion_tokens"] for lane in job["lanes"]) == 15
    ok = (
        "fanout_attempt_seconds_count"
        '{model="fake?answers=4&tokens=5",outcome="ok",provider="default"}'
    )
    assert f"{ok} 3.0" in text
    assert metric(text, "fanout_lanes_in_flight") == 0
    assert "fanout_queue_wait_seconds_count" in text
    assert "fanout_stream_clients" in text


async def test_unsupported_method_is_405_problem_with_allow(client: httpx.AsyncClient) -> None:
    response = await client.request("TRACE", "/healthz")
    assert response.status_code == 405
    assert response.headers["allow"] == "GET"
    assert response.headers["content-type"] == "application/problem+json"


async def test_405_names_every_method_of_the_path(client: httpx.AsyncClient) -> None:
    response = await client.request("DELETE", "/v1/jobs")
    assert response.status_code == 405
    assert response.headers["allow"] == "GET, POST"


async def test_malformed_ids_and_event_ids_are_refused_not_crashed(
    client: httpx.AsyncClient,
) -> None:
    for path in ["/v1/jobs/%00", "/v1/jobs/%00/events", "/jobs/not-a-uuid"]:
        assert (await client.get(path)).status_code == 404, path
    assert (await client.post("/v1/jobs/%00/cancel")).status_code == 404
    job = await run_job(client, voting(1, "fake"))
    huge = 100_000_000_000_000_000_000
    assert (
        await client.get(f"/v1/jobs/{job['id']}/events", params={"after": huge})
    ).status_code == 422
    # Headers arrive as latin-1: "²" (0xB2) passes str.isdigit() but not int().
    for bad in (str(huge), "²", "¹0", "-1", "x", " 1"):
        header = {"Last-Event-ID": bad.encode("latin-1")}
        response = await client.get(f"/v1/jobs/{job['id']}/events", headers=header)
        assert response.status_code == 422, bad
    bad_name = sectioning(section("a\x00b"))
    assert (await client.post("/v1/jobs", json=bad_name)).status_code == 422


def total(text: str, name: str, **labels: str) -> float:
    """The sum of a metric's series that carry these labels."""
    found = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            found += float(line.rsplit(" ", 1)[1])
    return found


async def test_token_metrics_equal_the_sum_of_the_jobs_usage(client: httpx.AsyncClient) -> None:
    """Every answer a provider sent is counted once: lanes, retries, early-stopped
    votes and the reducer, in the jobs' usage and in /metrics alike."""
    reducer = {"model": "fake?words=9", "messages": [{"role": "system", "content": "Merge."}]}
    jobs = [
        await run_job(
            client,
            voting(7, "fake?answers=4:9,5:1", aggregate=NUMBER, policy={"max_concurrency": 2}),
        ),
        await run_job(
            client,
            sectioning(section("a"), section("b"), aggregate={"kind": "reduce", "task": reducer}),
        ),
        await run_job(
            client,
            sectioning(section("flaky", model="fake?fail_first=1&fail_status=503&reasoning=3")),
        ),
    ]

    async def agreeing() -> list[tuple[str, float, int]] | None:
        """Both counts, once they agree: a vote's lane cancelled by its early stop may
        still answer after the job's final event, and then counts in both."""
        text = (await client.get("/metrics")).text
        counts = []
        for kind in ("prompt", "completion", "reasoning"):
            summed = 0
            for job in jobs:
                usage = (await client.get(f"/v1/jobs/{job['id']}")).json()["usage"]
                summed += usage[f"{kind}_tokens"]
            counts.append((kind, total(text, "fanout_tokens_total", kind=kind), summed))
        return counts if all(metric == summed > 0 for _, metric, summed in counts) else None

    await poll(agreeing, within=5, what="/metrics and the jobs' usage agree")


async def test_prices_give_lanes_and_jobs_a_cost(
    settings: Settings, fake_llm: str, tmp_path: Path
) -> None:
    providers = tmp_path / "providers.toml"
    providers.write_text(
        f'[providers.default]\nbase_url = "{fake_llm}"\napi_key = "x"\n'
        '[providers.default.prices."fake?answers=7&cached=1"]\n'
        "input = 2.0\ncached_input = 1.0\noutput = 10.0\n"
    )
    async with app_client(settings, providers_file=providers) as http:
        priced = await run_job(http, voting(2, "fake?answers=7&cached=1", aggregate=NUMBER))
        free = await run_job(http, voting(1, "fake?answers=7", aggregate=NUMBER))
    usage = priced["lanes"][0]["usage"]
    expected = (
        (usage["prompt_tokens"] - 1) * 2.0 + 1 * 1.0 + usage["completion_tokens"] * 10.0
    ) / 1e6
    assert usage["cost_usd"] == pytest.approx(expected)
    assert priced["usage"]["cost_usd"] == pytest.approx(
        sum(lane["usage"]["cost_usd"] for lane in priced["lanes"])
    )
    assert "cost_usd" not in free["usage"] and "cost_usd" not in free["lanes"][0]["usage"]
