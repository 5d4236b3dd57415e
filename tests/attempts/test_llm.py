"""One lane attempt through each call path: the lean client and the openai SDK.

Every test runs on both clients and expects the same :class:`Attempt`: the lean path
is only worth having if a lane cannot tell them apart. Most cases use the fake LLM;
what it cannot send (a null content, an error object mid-stream, a redirect) comes
from a small server on loopback that answers with fixed bytes.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import pytest
from aiohttp import web
from multidict import CIMultiDict

from service.attempts import Attempt
from service.attempts.llm import LlmClient, Providers, run_llm
from service.config import Provider
from service.spec import LlmTask
from service.views import NO_USAGE
from tests.support import fake_reset, free_port, user

KINDS = ["lean", "sdk"]
ClientFor = Callable[[str | None], LlmClient]  # a client of the test's kind for a base URL


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def client_for(kind: str) -> AsyncIterator[ClientFor]:
    """``client_for(base_url)``: a client of this test's kind for a provider there."""
    made: list[Providers] = []

    def client_for(base_url: str | None) -> LlmClient:
        provider = Provider(name="default", base_url=base_url, api_key="test-key")
        providers = Providers({"default": provider}, max_connections=16, kind=kind)  # type: ignore[arg-type]
        made.append(providers)
        return providers.client("default")

    yield client_for
    for providers in made:
        await providers.close()


@pytest.fixture
async def fake(fake_llm: str, client_for: ClientFor) -> LlmClient:
    await fake_reset(fake_llm)
    return client_for(fake_llm)


def task(model: str = "fake", text: str = "What is 17*23?", **fields: Any) -> LlmTask:
    return LlmTask.model_validate({"model": model, "messages": user(text), **fields})


# --- answers -----------------------------------------------------------------------


async def test_a_completion_gives_the_text_and_the_usage(fake: LlmClient) -> None:
    attempt = await run_llm(fake, task(text="hello there"), timeout=10)
    assert attempt.ok
    assert attempt.output == "Echo: hello there"
    usage = attempt.usage
    assert usage.prompt_tokens > 0 and usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


async def test_sampling_fields_reach_the_provider(fake: LlmClient) -> None:
    """The seed reaches the fake, whose draw depends on it: same seed, same answer."""
    spec = task("fake?answers=1:1,2:1,3:1,4:1,5:1,6:1,7:1,8:1", seed=11, temperature=0.5)
    answers = {(await run_llm(fake, spec, timeout=10)).output for _ in range(4)}
    assert len(answers) == 1


async def test_a_streamed_completion_sends_each_chunk_and_the_same_text(fake: LlmClient) -> None:
    model = "fake?words=12&chunk_ms=1"
    whole = await run_llm(fake, task(model), timeout=10)
    chunks: list[str] = []
    streamed = await run_llm(fake, task(model, stream=True), timeout=10, on_delta=chunks.append)
    assert streamed.ok and streamed.output == whole.output
    assert len(chunks) > 1 and "".join(chunks) == whole.output
    assert streamed.usage == whole.usage != NO_USAGE


async def test_messages_override_the_tasks_own(fake: LlmClient) -> None:
    """The reducer's call: the task's model with messages built from the lanes."""
    attempt = await run_llm(fake, task(), timeout=10, messages=task(text="reduce me").messages)
    assert attempt.output == "Echo: reduce me"


# --- failures ----------------------------------------------------------------------


async def test_429_is_rate_limited_and_carries_retry_after(fake: LlmClient) -> None:
    attempt = await run_llm(fake, task("fake?rate_limit=1&retry_after=0.25"), timeout=10)
    assert attempt.error_type == "rate_limited"
    assert attempt.transient and attempt.retry_after == 0.25
    assert (attempt.error_message or "").startswith("HTTP 429: ")


@pytest.mark.parametrize("status", [408, 409, 500, 502, 503])
async def test_transient_statuses_are_worth_retrying(fake: LlmClient, status: int) -> None:
    attempt = await run_llm(fake, task(f"fake?status={status}"), timeout=10)
    assert attempt == Attempt(
        error_type="upstream_error",
        error_message=attempt.error_message,
        transient=True,
    )
    assert (attempt.error_message or "").startswith(f"HTTP {status}: ")


@pytest.mark.parametrize("status", [400, 401, 403, 422])
async def test_other_client_errors_fail_at_once(fake: LlmClient, status: int) -> None:
    attempt = await run_llm(fake, task(f"fake?status={status}"), timeout=10)
    assert attempt.error_type == "upstream_error" and not attempt.transient
    assert attempt.retry_after is None


async def test_the_providers_error_message_is_kept(fake: LlmClient) -> None:
    attempt = await run_llm(fake, task("nonesuch"), timeout=10)
    assert attempt.error_type == "upstream_error" and not attempt.transient
    assert (attempt.error_message or "").startswith("HTTP 404: The model 'nonesuch' does not exist")


async def test_a_body_that_is_not_json_is_an_invalid_response(fake: LlmClient) -> None:
    attempt = await run_llm(fake, task("fake?malformed=1"), timeout=10)
    assert attempt.error_type == "invalid_response" and not attempt.transient
    assert (attempt.error_message or "").startswith("unreadable response")


async def test_no_choices_is_an_invalid_response(fake: LlmClient) -> None:
    attempt = await run_llm(fake, task("fake?empty=1"), timeout=10)
    assert attempt == Attempt(
        error_type="invalid_response", error_message="the response has no choices"
    )


async def test_an_attempt_that_hangs_times_out(fake: LlmClient, fake_llm: str) -> None:
    attempt = await run_llm(fake, task("fake?hang=1"), timeout=0.3)
    assert attempt == Attempt(
        error_type="timeout", error_message="no answer within 0.3 s", transient=True
    )


async def test_a_refused_connection_is_transient(
    client_for: ClientFor,
) -> None:
    client = client_for(f"http://127.0.0.1:{free_port()}/v1")  # nothing listens there
    attempt = await run_llm(client, task(), timeout=10)
    assert attempt.error_type == "upstream_error" and attempt.transient
    assert (attempt.error_message or "").startswith("connection failed: Cannot connect to host")


# --- what only a hand-made server sends ---------------------------------------------


Reply = tuple[int, dict[str, str], bytes]
# The headers of the last request each canned case received.
RECEIVED: dict[str, CIMultiDict[str]] = {}


@pytest.fixture
async def canned() -> AsyncIterator[Callable[[Reply], str]]:
    """``canned((status, headers, body))``: a base URL whose chat endpoint answers so;
    what the request carried is in ``RECEIVED[case]``."""
    replies: dict[str, Reply] = {}

    async def handle(request: web.Request) -> web.StreamResponse:
        case = request.match_info["case"]
        RECEIVED[case] = CIMultiDict(request.headers)
        status, headers, body = replies[case]
        return web.Response(status=status, headers=headers, body=body)

    app = web.Application()
    app.router.add_post("/{case}/chat/completions", handle)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()

    def canned(reply: Reply) -> str:
        case = f"c{len(replies)}"
        replies[case] = reply
        return f"http://127.0.0.1:{port}/{case}"

    yield canned
    await runner.cleanup()


def completion(message: dict[str, Any], **fields: Any) -> bytes:
    body = {"id": "x", "object": "chat.completion", "created": 0, "model": "m", **fields}
    body["choices"] = [{"index": 0, "finish_reason": "stop", "message": message}]
    return json.dumps(body).encode()


JSON = {"Content-Type": "application/json"}


async def test_a_null_content_is_an_invalid_response(
    canned: Callable[[Reply], str], client_for: ClientFor
) -> None:
    url = canned((200, JSON, completion({"role": "assistant", "content": None})))
    attempt = await run_llm(client_for(url), task(), timeout=10)
    assert attempt == Attempt(
        error_type="invalid_response", error_message="the response has no content"
    )


async def test_a_completion_without_usage_counts_no_tokens(
    canned: Callable[[Reply], str], client_for: ClientFor
) -> None:
    url = canned((200, JSON, completion({"role": "assistant", "content": "391"})))
    attempt = await run_llm(client_for(url), task(), timeout=10)
    assert attempt == Attempt(output="391", usage=NO_USAGE, reply={"finish_reason": "stop"})


async def test_a_redirect_is_followed(
    canned: Callable[[Reply], str], client_for: ClientFor
) -> None:
    """Providers are the operator's own configuration: a moved endpoint still answers."""
    target = canned((200, JSON, completion({"role": "assistant", "content": "moved"})))
    url = canned((307, {"Location": f"{target}/chat/completions"}, b""))
    attempt = await run_llm(client_for(url), task(), timeout=10)
    assert attempt == Attempt(output="moved", reply={"finish_reason": "stop"})


async def test_an_error_object_in_a_stream_fails_the_lane(
    canned: Callable[[Reply], str], client_for: ClientFor
) -> None:
    chunk = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m"}
    first = {**chunk, "choices": [{"index": 0, "delta": {"content": "part"}}]}
    body = (
        f"data: {json.dumps(first)}\n\n"
        f"data: {json.dumps({'error': {'message': 'overloaded', 'type': 'server_error'}})}\n\n"
    ).encode()
    url = canned((200, {"Content-Type": "text/event-stream"}, body))
    chunks: list[str] = []
    attempt = await run_llm(client_for(url), task(stream=True), timeout=10, on_delta=chunks.append)
    assert attempt == Attempt(
        error_type="upstream_error", error_message="the provider sent an error: overloaded"
    )
    assert chunks == ["part"]


async def test_retry_after_as_an_http_date(
    canned: Callable[[Reply], str], client_for: ClientFor
) -> None:
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    error = json.dumps({"error": {"message": "slow down", "type": "rate_limit_error"}})
    url = canned((429, {**JSON, "Retry-After": when}, error.encode()))
    attempt = await run_llm(client_for(url), task(), timeout=10)
    assert attempt.error_type == "rate_limited" and attempt.transient
    assert attempt.error_message == "HTTP 429: slow down"
    assert attempt.retry_after is not None and 25 < attempt.retry_after <= 30


async def test_a_500_without_a_json_body_keeps_its_text(
    canned: Callable[[Reply], str], client_for: ClientFor
) -> None:
    url = canned((502, {"Content-Type": "text/plain", "Retry-After": "3"}, b"bad gateway\n"))
    attempt = await run_llm(client_for(url), task(), timeout=10)
    assert attempt == Attempt(
        error_type="upstream_error",
        error_message="HTTP 502: bad gateway",
        transient=True,
        retry_after=3.0,
    )


async def test_many_attempts_at_once_share_the_pool(fake: LlmClient, fake_llm: str) -> None:
    """Two hundred concurrent attempts through one client all succeed."""
    attempts = await asyncio.gather(
        *(run_llm(fake, task("fake?latency_ms=20"), timeout=30) for _ in range(200))
    )
    assert all(a.ok for a in attempts)


async def test_the_proxy_variables_are_obeyed(
    canned: Callable[[Reply], str],
    client_for: ClientFor,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A provider behind an HTTP proxy, as a company network has it: the request goes
    to the proxy, which here answers it itself (the provider's host does not exist)."""
    url = canned((200, JSON, completion({"role": "assistant", "content": "via proxy"})))
    proxy, _, case = url.rpartition("/")
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", proxy)
    attempt = await run_llm(client_for(f"http://provider.invalid/{case}"), task(), timeout=10)
    assert attempt == Attempt(output="via proxy", reply={"finish_reason": "stop"})
    monkeypatch.setenv("NO_PROXY", "provider.invalid")
    attempt = await run_llm(client_for(f"http://provider.invalid/{case}"), task(), timeout=10)
    assert attempt.error_type == "upstream_error" and attempt.transient  # no such host


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"choices": "none"}, "unreadable response: no choices list"),
        ([], "unreadable response: no choices list"),
        ({"choices": [{"index": 0}]}, "the response has no content"),
        (
            {"choices": [{"index": 0, "message": {"role": "assistant", "content": 5}}]},
            "unreadable response: the content is not text",
        ),
    ],
    ids=["choices not a list", "not an object", "no message", "content not text"],
)
async def test_a_malformed_completion_is_an_invalid_response(
    canned: Callable[[Reply], str],
    client_for: ClientFor,
    body: Any,
    message: str,
) -> None:
    """Valid JSON in the wrong shape fails the lane as invalid (the SDK reads it into
    its models unchecked, so both paths check the fields they use)."""
    url = canned((200, JSON, json.dumps(body).encode()))
    attempt = await run_llm(client_for(url), task(), timeout=10)
    assert attempt == Attempt(error_type="invalid_response", error_message=message)


async def test_a_stream_that_is_not_utf8_fails_the_lane(
    canned: Callable[[Reply], str], client_for: ClientFor
) -> None:
    chunk = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m"}
    first = {**chunk, "choices": [{"index": 0, "delta": {"content": "part"}}]}
    body = f"data: {json.dumps(first)}\n\n".encode() + b'data: {"choices": \xff\xfe}\n\n'
    url = canned((200, {"Content-Type": "text/event-stream"}, body))
    attempt = await run_llm(client_for(url), task(stream=True), timeout=10)
    assert attempt.error_type == "invalid_response" and not attempt.transient


@pytest.mark.parametrize(
    ("error", "message"),
    [({"message": "overloaded", "type": "server_error"}, "overloaded"), ("boom", "boom")],
    ids=["object", "text"],
)
@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
async def test_an_error_sent_with_a_200_fails_the_lane_with_its_message(
    canned: Callable[[Reply], str],
    client_for: ClientFor,
    error: Any,
    message: str,
    streamed: bool,
) -> None:
    """Some gateways answer 200 with an error instead of a completion, whole or as a
    chunk of a stream; its message is kept whether it is an object or text."""
    body = json.dumps({"error": error})
    if streamed:
        reply: Reply = (200, {"Content-Type": "text/event-stream"}, f"data: {body}\n\n".encode())
    else:
        reply = (200, JSON, body.encode())
    attempt = await run_llm(client_for(canned(reply)), task(stream=streamed), timeout=10)
    assert attempt == Attempt(
        error_type="upstream_error", error_message=f"the provider sent an error: {message}"
    )


async def test_an_error_status_with_an_error_text_keeps_the_text(
    canned: Callable[[Reply], str], client_for: ClientFor
) -> None:
    url = canned((400, JSON, json.dumps({"error": "no such model"}).encode()))
    attempt = await run_llm(client_for(url), task(), timeout=10)
    assert attempt.error_message == "HTTP 400: no such model" and not attempt.transient


async def test_the_sdks_environment_applies_to_both_paths(
    canned: Callable[[Reply], str],
    client_for: ClientFor,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A provider with no base URL of its own calls OPENAI_BASE_URL; OPENAI_ORG_ID and
    OPENAI_PROJECT_ID become the headers OpenAI reads."""
    url = canned((200, JSON, completion({"role": "assistant", "content": "here"})))
    monkeypatch.setenv("OPENAI_BASE_URL", url)
    monkeypatch.setenv("OPENAI_ORG_ID", "org-123")
    monkeypatch.setenv("OPENAI_PROJECT_ID", "proj-456")
    attempt = await run_llm(client_for(None), task(), timeout=10)
    assert attempt == Attempt(output="here", reply={"finish_reason": "stop"})
    received = RECEIVED[url.rpartition("/")[2]]
    assert received["OpenAI-Organization"] == "org-123"
    assert received["OpenAI-Project"] == "proj-456"
    assert received["Authorization"] == "Bearer test-key"


async def test_a_stream_cut_off_before_its_end_is_a_transient_failure(
    canned: Callable[[Reply], str], client_for: ClientFor
) -> None:
    """A connection that closes mid-answer leaves text but no finish_reason (and no
    [DONE]): that is no shorter answer, but an attempt worth making again."""
    chunk = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m"}
    first = {**chunk, "choices": [{"index": 0, "delta": {"content": "half an"}}]}
    url = canned(
        (200, {"Content-Type": "text/event-stream"}, f"data: {json.dumps(first)}\n\n".encode())
    )
    chunks: list[str] = []
    attempt = await run_llm(client_for(url), task(stream=True), timeout=10, on_delta=chunks.append)
    assert attempt == Attempt(
        error_type="upstream_error",
        error_message="the stream ended before the answer was complete",
        transient=True,
    )
    assert chunks == ["half an"]  # what did arrive was passed on live


# --- the whole request surface, and the answer as it came -----------------------------

FIELDS: dict[str, Any] = {
    "temperature": 0.3,
    "top_p": 0.9,
    "max_completion_tokens": 64,
    "seed": 5,
    "stop": ["END"],
    "response_format": {"type": "json_object"},
    "reasoning_effort": "low",
    "logprobs": True,
    "top_logprobs": 2,
    "presence_penalty": 0.1,
    "frequency_penalty": 0.2,
    "logit_bias": {"42": -5},
    "user": "u-7",
    "service_tier": "auto",
    "extra_body": {"top_k": 20, "guided_json": {"type": "object"}},
}
VOTE_TOOL = [{"type": "function", "function": {"name": "vote", "parameters": {"type": "object"}}}]


async def last_request(fake_llm: str) -> dict[str, Any]:
    async with httpx.AsyncClient() as http:
        return dict((await http.get(fake_llm.removesuffix("/v1") + "/_last")).json())


async def test_both_call_paths_send_the_same_request_for_the_same_task(fake_llm: str) -> None:
    """Every per-call field and a provider's own (extra_body) reach the provider, and
    the SDK path and the lean one send the same body."""
    provider = Provider(name="default", base_url=fake_llm, api_key="test-key")
    sent = {}
    for kind in KINDS:
        providers = Providers({"default": provider}, max_connections=4, kind=kind)  # type: ignore[arg-type]
        try:
            for stream in (False, True):
                spec = task(tools=VOTE_TOOL, tool_choice="auto", stream=stream, **FIELDS)
                assert (await run_llm(providers.client("default"), spec, timeout=10)).ok
                sent[kind, stream] = await last_request(fake_llm)
        finally:
            await providers.close()
    for stream in (False, True):
        assert sent["lean", stream] == sent["sdk", stream]
    body = sent["lean", False]
    extra = FIELDS["extra_body"]
    assert body == {
        "model": "fake",
        "messages": user("What is 17*23?"),
        "tools": VOTE_TOOL,
        "tool_choice": "auto",
        **{k: v for k, v in FIELDS.items() if k != "extra_body"},
        **extra,
    }
    assert sent["lean", True]["stream"] is True
    assert sent["lean", True]["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize("stream", [False, True])
async def test_a_tool_call_comes_back_as_the_model_made_it(fake: LlmClient, stream: bool) -> None:
    spec = task("fake?answers=391", tools=VOTE_TOOL, stream=stream)
    attempt = await run_llm(fake, spec, timeout=10)
    assert attempt.ok and attempt.output is None
    assert attempt.reply is not None and attempt.reply["finish_reason"] == "tool_calls"
    (call,) = attempt.reply["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "vote", "arguments": '{"answer":391}'}


@pytest.mark.parametrize("stream", [False, True])
async def test_logprobs_come_back_as_a_summary(fake: LlmClient, stream: bool) -> None:
    spec = task("fake?answers=391:1&confidence=0.8", logprobs=True, stream=stream)
    attempt = await run_llm(fake, spec, timeout=10)
    assert attempt.reply is not None
    summary = attempt.reply["logprobs"]
    assert summary["tokens"] == 6  # "I worked it out. Answer: 391": a token a word
    assert math.isclose(summary["mean"], math.log(0.8))
    plain = await run_llm(fake, task("fake?answers=391:1"), timeout=10)
    assert plain.reply is not None and "logprobs" not in plain.reply


@pytest.mark.parametrize("stream", [False, True])
async def test_reasoning_and_cached_tokens_are_counted(fake: LlmClient, stream: bool) -> None:
    spec = task("fake?answers=7&reasoning=120&cached=3", text="one two three four", stream=stream)
    usage = (await run_llm(fake, spec, timeout=10)).usage
    assert (usage.prompt_tokens, usage.cached_tokens) == (4, 3)
    assert usage.reasoning_tokens == 120 and usage.completion_tokens == 120 + 6
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


@pytest.mark.parametrize("stream", [False, True])
async def test_a_cut_off_answer_says_so(fake: LlmClient, stream: bool) -> None:
    attempt = await run_llm(fake, task("fake?words=3&finish=length", stream=stream), timeout=10)
    assert attempt.ok and attempt.output == "w1 w2 w3"
    assert attempt.reply == {"finish_reason": "length"}


async def test_a_refusal_is_an_answer_without_text(
    canned: Callable[[Reply], str], client_for: ClientFor
) -> None:
    message = {"role": "assistant", "content": None, "refusal": "I can't help with that."}
    attempt = await run_llm(
        client_for(canned((200, JSON, completion(message)))), task(), timeout=10
    )
    assert attempt.ok and attempt.output is None
    assert attempt.reply == {"finish_reason": "stop", "refusal": "I can't help with that."}
