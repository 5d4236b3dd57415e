"""Jobs end to end: the real app and runner, the fake LLM on loopback, each through both
of the lanes' call paths (the lean client and the openai SDK). What a job's rules do is
shown at lower layers (``tests/unit``, ``tests/store``, ``tests/runner``, on both
databases); here, what only the whole shows: real calls, retries and cancels on the
wire, and the event stream over HTTP."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.support import (
    events_of,
    fake_reset,
    fake_stats,
    run_job,
    section,
    sectioning,
    voting,
)

NUMBER = {"kind": "majority", "extract": "number"}


@pytest.fixture(params=["lean", "sdk"])
def llm_client(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def database_url(sqlite_url: str) -> str:
    """SQLite: the store's behaviour on both databases is the store tests' to show."""
    return sqlite_url


def lane_events(events: list[dict], kind: str) -> list[dict]:
    return [e["data"] for e in events if e["event"] == kind]


# --- aggregates ----------------------------------------------------------------------


async def test_collect_puts_sections_side_by_side_in_spec_order(client: httpx.AsyncClient) -> None:
    spec = sectioning(section("weather", text="rain?"), section("draft", text="a poem"))
    job = await run_job(client, spec)
    assert job["status"] == "succeeded"
    assert list(job["result"]["output"]) == ["weather", "draft"]
    assert job["result"]["output"] == {"weather": "Echo: rain?", "draft": "Echo: a poem"}
    assert [lane["name"] for lane in job["lanes"]] == ["weather", "draft"]


async def test_majority_reports_the_winner_votes_and_agreement(client: httpx.AsyncClient) -> None:
    spec = voting(
        20,
        "fake?answers=391:3,392:1",
        task={"seed": 7},
        aggregate={**NUMBER, "early_stop": False},
    )
    job = await run_job(client, spec)
    outputs = [lane["output"] for lane in job["lanes"]]
    wins = sum("391" in text for text in outputs)
    assert job["result"]["output"] == (391 if wins > 10 else 392)
    details = job["result"]["details"]
    assert details["counted"] == 20
    assert details["winner_votes"] == max(wins, 20 - wins)
    assert details["agreement"] == round(details["winner_votes"] / 20, 4)


async def test_reduce_receives_every_lane_output_tagged_in_lane_order(
    client: httpx.AsyncClient,
) -> None:
    reducer = {"model": "fake", "messages": [{"role": "system", "content": "Synthesise."}]}
    spec = sectioning(
        section("skeptic", text="risky"),
        section("optimist", text="great"),
        aggregate={"kind": "reduce", "task": reducer},
    )
    job = await run_job(client, spec)
    assert job["status"] == "succeeded"
    # The fake echoes the last user message: the reducer's input, lanes tagged by name.
    output = job["result"]["output"]
    assert output.startswith("Echo: ")
    assert output.index('<lane name="skeptic">') < output.index('<lane name="optimist">')
    assert "Echo: risky" in output and "Echo: great" in output
    lane_tokens = sum(lane["usage"]["total_tokens"] for lane in job["lanes"])
    assert job["usage"]["total_tokens"] > lane_tokens  # the reducer's tokens count too


# --- timeouts and retries on the real call paths --------------------------------------


async def test_lane_timeout_bounds_each_attempt_and_is_retried(client: httpx.AsyncClient) -> None:
    spec = sectioning(
        section("stuck", model="fake?hang=1"), policy={"lane_timeout_s": 0.3, "max_attempts": 2}
    )
    job = await run_job(client, spec)
    lane = job["lanes"][0]
    assert lane["status"] == "timed_out"
    assert lane["attempts"] == 2
    assert lane["error"]["type"] == "timeout"


async def test_retries_transient_errors_and_honors_retry_after(
    client: httpx.AsyncClient, fake_llm: str
) -> None:
    await fake_reset(fake_llm)
    model = "fake?fail_first=2&fail_status=429&retry_after=0.4"
    started = time.monotonic()
    response = await client.post("/v1/jobs", json=sectioning(section("flaky", model=model)))
    job_id = response.json()["id"]
    events = await events_of(client, job_id)
    elapsed = time.monotonic() - started
    job = (await client.get(f"/v1/jobs/{job_id}")).json()
    assert job["status"] == "succeeded"
    assert job["lanes"][0]["attempts"] == 3
    retrying = lane_events(events, "lane.retrying")
    assert [r["attempt"] for r in retrying] == [1, 2]
    assert all(r["retry_in_s"] >= 0.4 for r in retrying)
    assert "rate_limited" in retrying[0]["error"]
    assert elapsed >= 0.8
    assert (await fake_stats(fake_llm))["requests"] == 3


# --- early stop, cancel ----------------------------------------------------------------


async def test_early_stop_makes_fewer_calls_for_the_same_answer(
    client: httpx.AsyncClient, fake_llm: str
) -> None:
    model = "fake?answers=391:9,392:1"
    base = {"task": {"seed": 11}, "policy": {"max_concurrency": 2}}
    await fake_reset(fake_llm)
    full = await run_job(
        client, voting(15, model, aggregate={**NUMBER, "early_stop": False}, **base)
    )
    all_calls = (await fake_stats(fake_llm))["requests"]
    await fake_reset(fake_llm)
    stopped = await run_job(client, voting(15, model, aggregate=NUMBER, **base))
    fewer_calls = (await fake_stats(fake_llm))["requests"]
    assert stopped["result"]["output"] == full["result"]["output"] == 391
    assert all_calls == 15
    assert fewer_calls < all_calls
    skipped = [lane for lane in stopped["lanes"] if lane["status"] == "skipped"]
    assert len(skipped) == 15 - sum(lane["status"] == "succeeded" for lane in stopped["lanes"])
    assert stopped["result"]["partial"] is False


async def test_cancel_stops_running_lanes_and_closes_upstream_requests(
    client: httpx.AsyncClient, fake_llm: str
) -> None:
    await fake_reset(fake_llm)
    response = await client.post("/v1/jobs", json=voting(4, "fake?hang=1"))
    job_id = response.json()["id"]
    async with asyncio.timeout(10):
        while (await fake_stats(fake_llm))["in_flight"] < 4:
            await asyncio.sleep(0.02)
    cancel = await client.post(f"/v1/jobs/{job_id}/cancel")
    assert cancel.status_code == 202
    assert cancel.json()["status"] == "cancelled"
    assert {lane["status"] for lane in cancel.json()["lanes"]} == {"cancelled"}
    async with asyncio.timeout(10):
        while (await fake_stats(fake_llm))["in_flight"] > 0:
            await asyncio.sleep(0.02)
    events = await events_of(client, job_id)
    assert events[-1]["event"] == "job.cancelled"
    again = await client.post(f"/v1/jobs/{job_id}/cancel")
    assert again.status_code == 409
    assert again.headers["content-type"] == "application/problem+json"


# --- the event stream ----------------------------------------------------------------


async def test_event_stream_is_ordered_and_complete(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/jobs",
        json=voting(5, "fake?latency_ms=50&answers=1", aggregate={**NUMBER, "early_stop": False}),
    )
    job_id = response.json()["id"]
    events = await events_of(client, job_id)
    assert [int(e["id"]) for e in events] == list(range(1, len(events) + 1))
    assert all(e["data"]["seq"] == int(e["id"]) and e["data"]["job_id"] == job_id for e in events)
    kinds = [e["event"] for e in events]
    assert kinds[:2] == ["job.queued", "job.running"]
    assert kinds[-2:] == ["job.aggregating", "job.succeeded"]
    assert kinds.count("lane.started") == 5 and kinds.count("lane.succeeded") == 5
    for lane in range(5):
        lane_kinds = [e["event"] for e in events if e["data"].get("lane") == lane]
        assert lane_kinds == ["lane.started", "lane.succeeded"]
    succeeded = lane_events(events, "lane.succeeded")[0]
    assert {"lane", "output", "usage", "duration_s"} <= set(succeeded)
    final = events[-1]["data"]
    assert final["result"]["output"] == 1 and final["usage"]["total_tokens"] > 0


async def test_stream_resumes_after_last_event_id_at_every_cut(client: httpx.AsyncClient) -> None:
    job = await run_job(client, voting(3, "fake?answers=5", aggregate=NUMBER))
    events = await events_of(client, job["id"])
    for cut in range(len(events) + 1):
        rest = await events_of(client, job["id"], last_event_id=cut)
        assert [e["id"] for e in rest] == [e["id"] for e in events[cut:]]


async def test_stream_headers_and_unknown_job(client: httpx.AsyncClient) -> None:
    job = await run_job(client, voting(1, "fake"))
    response = await client.get(f"/v1/jobs/{job['id']}/events")
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["x-accel-buffering"] == "no"
    assert "content-encoding" not in response.headers
    missing = await client.get("/v1/jobs/nope/events")
    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/problem+json"


async def test_streaming_lane_sends_coalesced_deltas_live_only(client: httpx.AsyncClient) -> None:
    # The latency lets the stream subscribe before the first chunk (deltas are live only).
    spec = sectioning(section("story", model="fake?latency_ms=500&words=60&chunk_ms=20"))
    spec["sections"][0]["task"]["stream"] = True
    response = await client.post("/v1/jobs", json=spec)
    job_id = response.json()["id"]
    live = await events_of(client, job_id)
    deltas = [e for e in live if e["event"] == "lane.delta"]
    job = (await client.get(f"/v1/jobs/{job_id}")).json()
    stored_text = job["lanes"][0]["output"]
    assert stored_text == " ".join(f"w{i}" for i in range(1, 61))
    assert "".join(d["data"]["text"] for d in deltas) == stored_text
    # 60 chunks over ~1.2 s, coalesced to about 10 a second.
    assert 2 <= len(deltas) <= 16
    assert all("id" not in d for d in deltas)
    kinds = [e["event"] for e in live]
    assert kinds.index("lane.started") < kinds.index("lane.delta") < kinds.index("lane.succeeded")
    replay = await events_of(client, job_id, last_event_id=0)
    assert not any(e["event"] == "lane.delta" for e in replay)
    assert job["lanes"][0]["usage"]["completion_tokens"] == 60


# --- the answer as it came, and usage that matches the bill -----------------------------


async def test_a_vote_over_a_functions_arguments(client: httpx.AsyncClient) -> None:
    tools = [{"type": "function", "function": {"name": "answer", "parameters": {"type": "object"}}}]
    spec = voting(
        5,
        "fake?answers=391:3,392:1",
        task={"seed": 4, "tools": tools, "tool_choice": "required"},
        aggregate={"kind": "majority", "extract": "json", "field": "answer", "early_stop": False},
    )
    job = await run_job(client, spec)
    assert job["status"] == "succeeded", job
    votes = [lane["answer"] for lane in job["lanes"]]
    assert all(
        lane["output"] is None and lane["finish_reason"] == "tool_calls" for lane in job["lanes"]
    )
    assert [lane["tool_calls"][0]["function"]["name"] for lane in job["lanes"]] == ["answer"] * 5
    assert job["result"]["output"] == max(set(votes), key=votes.count)


async def test_a_reasoning_model_reports_its_reasoning_and_where_it_stopped(
    client: httpx.AsyncClient,
) -> None:
    spec = sectioning(
        section("think", model="fake?answers=7&reasoning=200&finish=length"),
        policy={"on_failure": "best_effort"},
    )
    spec["sections"][0]["task"].update({"max_completion_tokens": 50, "reasoning_effort": "high"})
    job_id = (await client.post("/v1/jobs", json=spec)).json()["id"]
    events = await events_of(client, job_id)
    job = (await client.get(f"/v1/jobs/{job_id}")).json()
    lane = job["lanes"][0]
    assert lane["finish_reason"] == "length" and lane["usage"]["reasoning_tokens"] == 200
    assert job["usage"]["reasoning_tokens"] == 200
    (succeeded,) = [e["data"] for e in events if e["event"] == "lane.succeeded"]
    assert succeeded["finish_reason"] == "length"


# --- smarter votes -------------------------------------------------------------------------


async def test_a_mixed_ensemble_votes_by_confidence_over_real_logprobs(
    client: httpx.AsyncClient,
) -> None:
    task = {"messages": [{"role": "user", "content": "17*23?"}]}
    spec = {
        "mode": "voting",
        "n": 3,
        "tasks": [
            {**task, "model": "fake?answers=391&confidence=0.9"},
            {**task, "model": "fake?answers=392&confidence=0.3"},
            {**task, "model": "fake?answers=392&confidence=0.3"},
        ],
        "aggregate": {**NUMBER, "weight": "confidence", "early_stop": False},
    }
    job = await run_job(client, spec)
    assert job["status"] == "succeeded", job
    # One sure vote (0.9) outweighs two unsure ones (0.3 + 0.3).
    assert job["result"]["output"] == 391
    assert [lane["task"] for lane in job["lanes"]] == [0, 1, 2]
    assert [lane["weight"] for lane in job["lanes"]] == pytest.approx([0.9, 0.3, 0.3])
    assert job["result"]["details"]["votes"] == [
        {"answer": 391, "count": 1, "weight": 0.9},
        {"answer": 392, "count": 2, "weight": 0.6},
    ]


async def test_a_judge_over_the_fake_llm_returns_the_candidate_it_named(
    client: httpx.AsyncClient, fake_llm: str
) -> None:
    await fake_reset(fake_llm)
    judge = {"model": "fake?answers=2", "messages": [{"role": "system", "content": "Pick."}]}
    spec = voting(
        3, "fake?answers=391", task={"seed": 1}, aggregate={"kind": "judge", "task": judge}
    )
    job = await run_job(client, spec)
    assert job["status"] == "succeeded", job
    assert job["result"]["details"]["best"] == 2 and job["result"]["details"]["lane"] == "lane-1"
    assert job["result"]["output"] == job["lanes"][1]["output"]
    assert (await fake_stats(fake_llm))["requests"] == 4  # three candidates and the judge
