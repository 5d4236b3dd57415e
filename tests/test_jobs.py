"""Jobs end to end: the real app and runner, the fake LLM on loopback, SQLite and PostgreSQL,
each through both of the lanes' call paths (the lean client and the openai SDK)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

from service.config import Settings
from service.http import create_app
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


async def test_seeded_voting_lanes_get_seed_plus_index(client: httpx.AsyncClient) -> None:
    first = await run_job(
        client,
        voting(
            6,
            "fake?answers=1,2,3,4,5,6",
            task={"seed": 100},
            aggregate={**NUMBER, "early_stop": False},
        ),
    )
    again = await run_job(
        client,
        voting(
            6,
            "fake?answers=1,2,3,4,5,6",
            task={"seed": 100},
            aggregate={**NUMBER, "early_stop": False},
        ),
    )
    answers = [lane["answer"] for lane in first["lanes"]]
    assert answers == [lane["answer"] for lane in again["lanes"]]
    assert len(set(answers)) > 1  # seed + i differs per lane


async def test_majority_treats_unextractable_answers_as_abstentions(
    client: httpx.AsyncClient,
) -> None:
    spec = voting(
        4, "fake?answers=391,no%20idea", task={"seed": 3}, aggregate={**NUMBER, "early_stop": False}
    )
    job = await run_job(client, spec)
    abstained = sum(lane["answer"] is None for lane in job["lanes"])
    assert job["result"]["details"]["abstained"] == abstained
    assert job["result"]["details"]["counted"] == 4 - abstained


async def test_score_max_picks_the_best_lane_output(client: httpx.AsyncClient) -> None:
    spec = voting(
        5,
        "fake?answers=3,9,5&template=score%20{answer}",
        task={"seed": 1},
        aggregate={"kind": "score", "pick": "max"},
    )
    job = await run_job(client, spec)
    scores = {lane["name"]: lane["answer"] for lane in job["lanes"]}
    best = max(scores.values())
    assert job["result"]["details"]["score"] == best
    assert job["result"]["output"] == f"score {best}"


async def test_score_mean_is_the_mean_of_lane_scores(client: httpx.AsyncClient) -> None:
    spec = voting(
        4,
        "fake?answers=2,4,8&template={answer}",
        task={"seed": 5},
        aggregate={"kind": "score", "pick": "mean"},
    )
    job = await run_job(client, spec)
    scores = [lane["answer"] for lane in job["lanes"]]
    assert job["result"]["output"] == sum(scores) / len(scores)


async def test_score_min_with_json_extraction(client: httpx.AsyncClient) -> None:
    template = "%7B%22grade%22%3A%20{answer}%7D"  # {"grade": N}
    spec = voting(
        3,
        f"fake?answers=7,3&template={template}",
        task={"seed": 2},
        aggregate={"kind": "score", "pick": "min", "extract": "json", "field": "grade"},
    )
    job = await run_job(client, spec)
    assert job["result"]["details"]["score"] == min(lane["answer"] for lane in job["lanes"])


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


# --- failure policies ----------------------------------------------------------------


async def test_fail_fast_fails_the_job_and_cancels_the_rest(client: httpx.AsyncClient) -> None:
    spec = sectioning(
        section("broken", model="fake?status=400"), section("slow", model="fake?latency_ms=5000")
    )
    started = time.monotonic()
    job = await run_job(client, spec)
    assert time.monotonic() - started < 4
    assert job["status"] == "failed"
    assert job["error"]["type"] == "lane_failed" and "broken" in job["error"]["message"]
    lanes = {lane["name"]: lane for lane in job["lanes"]}
    assert lanes["broken"]["status"] == "failed" and lanes["broken"]["attempts"] == 1
    assert lanes["slow"]["status"] == "cancelled"
    assert job["result"] is None


async def test_best_effort_aggregates_what_succeeded(client: httpx.AsyncClient) -> None:
    spec = sectioning(
        section("ok"),
        section("broken", model="fake?status=400"),
        policy={"on_failure": "best_effort"},
    )
    job = await run_job(client, spec)
    assert job["status"] == "succeeded"
    assert job["result"]["partial"] is True
    assert job["result"]["output"] == {"ok": "Echo: hello", "broken": None}


async def test_best_effort_fails_when_nothing_succeeded(client: httpx.AsyncClient) -> None:
    job = await run_job(client, voting(3, "fake?status=400"))
    assert job["status"] == "failed"
    assert job["error"]["type"] == "no_results"


async def test_quorum_succeeds_with_enough_lanes(client: httpx.AsyncClient) -> None:
    spec = sectioning(
        section("a"),
        section("b"),
        section("c", model="fake?status=400"),
        policy={"on_failure": "quorum", "quorum": 2},
    )
    job = await run_job(client, spec)
    assert job["status"] == "succeeded"
    assert job["result"]["partial"] is True


async def test_quorum_fails_as_soon_as_it_is_out_of_reach(client: httpx.AsyncClient) -> None:
    spec = sectioning(
        section("a", model="fake?status=400"),
        section("b", model="fake?status=400"),
        section("c", model="fake?latency_ms=5000"),
        policy={"on_failure": "quorum"},
    )  # default quorum: 2 of 3
    started = time.monotonic()
    job = await run_job(client, spec)
    assert time.monotonic() - started < 4
    assert job["status"] == "failed" and job["error"]["type"] == "quorum"
    assert {lane["name"]: lane["status"] for lane in job["lanes"]}["c"] == "cancelled"


async def test_deadline_gives_a_partial_result_under_best_effort(client: httpx.AsyncClient) -> None:
    spec = sectioning(
        section("quick"),
        section("stuck", model="fake?hang=1"),
        policy={"on_failure": "best_effort", "deadline_s": 1},
    )
    job = await run_job(client, spec)
    assert job["status"] == "succeeded"
    assert job["result"]["partial"] is True
    assert job["result"]["output"] == {"quick": "Echo: hello", "stuck": None}
    stuck = job["lanes"][1]
    assert stuck["status"] == "timed_out"


async def test_deadline_fails_a_fail_fast_job(client: httpx.AsyncClient) -> None:
    spec = sectioning(section("stuck", model="fake?hang=1"), policy={"deadline_s": 0.5})
    job = await run_job(client, spec)
    assert job["status"] == "failed"
    assert job["lanes"][0]["status"] == "timed_out"


async def test_lane_timeout_bounds_each_attempt_and_is_retried(client: httpx.AsyncClient) -> None:
    spec = sectioning(
        section("stuck", model="fake?hang=1"), policy={"lane_timeout_s": 0.3, "max_attempts": 2}
    )
    job = await run_job(client, spec)
    lane = job["lanes"][0]
    assert lane["status"] == "timed_out"
    assert lane["attempts"] == 2
    assert lane["error"]["type"] == "timeout"


# --- retries -------------------------------------------------------------------------


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


async def test_non_transient_errors_are_not_retried(
    client: httpx.AsyncClient, fake_llm: str
) -> None:
    await fake_reset(fake_llm)
    job = await run_job(
        client, sectioning(section("bad", model="fake?status=401"), policy={"max_attempts": 3})
    )
    assert job["lanes"][0]["attempts"] == 1
    assert job["lanes"][0]["error"]["type"] == "upstream_error"
    assert (await fake_stats(fake_llm))["requests"] == 1


async def test_retries_stop_at_max_attempts(client: httpx.AsyncClient, fake_llm: str) -> None:
    await fake_reset(fake_llm)
    job = await run_job(
        client, sectioning(section("down", model="fake?status=503"), policy={"max_attempts": 2})
    )
    assert job["lanes"][0]["status"] == "failed"
    assert job["lanes"][0]["attempts"] == 2
    assert (await fake_stats(fake_llm))["requests"] == 2


async def test_malformed_response_fails_the_lane_as_invalid(client: httpx.AsyncClient) -> None:
    job = await run_job(client, sectioning(section("garbled", model="fake?malformed=1")))
    assert job["lanes"][0]["error"]["type"] == "invalid_response"


# --- budget, early stop, cancel ------------------------------------------------------


async def test_token_budget_stops_new_attempts(client: httpx.AsyncClient, fake_llm: str) -> None:
    await fake_reset(fake_llm)
    spec = voting(
        10,
        "fake?answers=7&tokens=100",
        aggregate={**NUMBER, "early_stop": False},
        policy={"max_concurrency": 2, "max_total_tokens": 250},
    )
    job = await run_job(client, spec)
    statuses = [lane["status"] for lane in job["lanes"]]
    cancelled = [lane for lane in job["lanes"] if lane["status"] == "cancelled"]
    assert cancelled and all(lane["error"]["type"] == "budget" for lane in cancelled)
    assert all(lane["attempts"] == 0 for lane in cancelled)
    assert statuses.count("succeeded") + len(cancelled) == 10
    # Two lanes at a time: at most one round past the budget.
    assert statuses.count("succeeded") <= 4
    assert job["status"] == "succeeded" and job["result"]["partial"] is True
    assert (await fake_stats(fake_llm))["requests"] == statuses.count("succeeded")


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


# --- gates ---------------------------------------------------------------------------


async def test_gate_that_matches_blocks_the_output(client: httpx.AsyncClient) -> None:
    spec = sectioning(
        section("draft", text="a story"),
        section("safety", text="this is UNSAFE", gate={"block_if": "(?i)\\bunsafe\\b"}),
    )
    job = await run_job(client, spec)
    assert job["status"] == "succeeded"
    assert job["result"]["blocked"] is True
    assert job["result"]["blocked_by"] == "safety"
    assert job["result"]["output"] is None


async def test_gate_that_passes_lets_the_output_through(client: httpx.AsyncClient) -> None:
    spec = sectioning(
        section("draft", text="a story"),
        section("safety", text="all fine", gate={"block_if": "(?i)\\bunsafe\\b"}),
    )
    job = await run_job(client, spec)
    assert job["result"]["blocked"] is False
    assert job["result"]["output"]["draft"] == "Echo: a story"


async def test_gate_lane_that_fails_blocks_fail_closed(client: httpx.AsyncClient) -> None:
    spec = sectioning(
        section("draft", model="fake?latency_ms=3000"),
        section("safety", model="fake?status=400", gate={"block_if": "unsafe"}),
    )
    job = await run_job(client, spec)
    assert job["status"] == "succeeded"
    assert job["result"]["blocked"] is True and job["result"]["blocked_by"] == "safety"
    assert job["result"]["output"] is None


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


# --- claiming without polling ---------------------------------------------------------


@pytest.mark.parametrize("llm_client", ["lean"])
@pytest.mark.parametrize(
    "caps",
    [
        {"policy": {"max_concurrency": 2}},  # the job's own cap
        {"process": 2},  # the process's cap (FANOUT_MAX_CONCURRENCY)
    ],
    ids=["job cap", "process cap"],
)
async def test_lanes_held_back_by_a_cap_start_as_others_end_without_a_poll(
    settings: Settings, caps: dict[str, Any]
) -> None:
    """Three waves of two lanes: each wave must start as the last one ends, not at the
    next poll (30 s here)."""
    settings = settings.model_copy(
        update={"poll_interval_s": 30, "max_concurrency": caps.get("process", 512)}
    )
    spec = voting(6, "fake?latency_ms=50", aggregate={**NUMBER, "early_stop": False})
    spec.update({k: v for k, v in caps.items() if k == "policy"})
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://fanout") as http:
            job = await run_job(http, spec, timeout=10)
    assert job["progress"] == {"succeeded": 6}


@pytest.mark.parametrize("llm_client", ["lean"])
async def test_an_attempt_that_raises_fails_its_lane_and_the_job_still_ends(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A defect in a call path (injected here) is no answer, but the lane must end: one
    that never reported would stay running under a lease its heartbeat keeps renewing."""

    async def broken(*_args: Any, **_kwargs: Any) -> None:
        raise RuntimeError("injected defect")

    monkeypatch.setattr("service.attempts.default.run_llm", broken)
    job = await run_job(client, voting(2, "fake"), timeout=10)
    assert job["status"] == "failed"
    assert [lane["status"] for lane in job["lanes"]] == ["failed", "failed"]
    assert job["lanes"][0]["error"] == {
        "type": "internal_error",
        "message": "RuntimeError: injected defect",
    }


@pytest.mark.parametrize("llm_client", ["lean"])
async def test_a_reducer_that_raises_fails_the_job_instead_of_holding_it(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Likewise for the reducer: the job ends failed, not aggregating for ever."""
    from service.attempts import default as runner

    real = runner.run_llm

    async def reducer_broken(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("messages") is not None:  # only the reducer passes its own messages
            raise RuntimeError("injected defect")
        return await real(*args, **kwargs)

    monkeypatch.setattr(runner, "run_llm", reducer_broken)
    reducer = {"model": "fake", "messages": [{"role": "system", "content": "Synthesise."}]}
    spec = sectioning(section("a"), section("b"), aggregate={"kind": "reduce", "task": reducer})
    job = await run_job(client, spec, timeout=10)
    assert job["status"] == "failed"
    assert job["error"]["type"] == "internal_error"
    assert [lane["status"] for lane in job["lanes"]] == ["succeeded", "succeeded"]
