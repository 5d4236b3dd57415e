"""The OpenAI-compatible simulator, driven over loopback by the real ``openai`` client.

One server process serves the whole module. Tests that share it keep apart by sending
their own message text (the simulator's memory is keyed by model, seed and messages);
tests that read ``/_stats`` reset it first.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletion

from service.tools.fakellm import Behaviour, RequestError, parse_model
from tests.support import free_port, wait_http

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
READY_WITHIN_S = 15.0


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("fakellm") / "server.log"
    code = f"from service.tools.fakellm import serve; serve(port={port})"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-c", code], cwd=REPO, stdout=out, stderr=subprocess.STDOUT
        )
        try:
            url = f"http://127.0.0.1:{port}"
            wait_http(f"{url}/healthz", process, log=log, timeout=READY_WITHIN_S)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture
async def client(base_url: str) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=f"{base_url}/v1", api_key="test", max_retries=0
    ) as client:
        yield client


@pytest.fixture
async def http(base_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=base_url) as http:
        yield http


async def ask(
    client: openai.AsyncOpenAI, model: str, question: str, **kwargs: Any
) -> ChatCompletion:
    completion: ChatCompletion = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], **kwargs
    )
    return completion


def answer_of(completion: ChatCompletion) -> str:
    content = completion.choices[0].message.content
    assert content is not None
    return content.rsplit("Answer: ", 1)[1]


async def stats(http: httpx.AsyncClient) -> dict[str, Any]:
    response = await http.get("/_stats")
    response.raise_for_status()
    result: dict[str, Any] = response.json()
    return result


async def stats_when(
    http: httpx.AsyncClient, condition: Callable[[dict[str, Any]], bool], within_s: float = 5.0
) -> dict[str, Any]:
    """Poll ``/_stats`` (another process: there is no event to wait on) until condition."""
    deadline = time.monotonic() + within_s
    while not condition(current := await stats(http)):
        if time.monotonic() > deadline:
            pytest.fail(f"stats did not settle within {within_s}s: {current}")
        await asyncio.sleep(0.02)
    return current


async def reset(http: httpx.AsyncClient) -> None:
    (await http.post("/_reset")).raise_for_status()


# -- the model grammar, without a server ------------------------------------------------


def test_parse_model_defaults() -> None:
    assert parse_model("fake") == Behaviour()


def test_parse_model_reads_every_parameter() -> None:
    behaviour = parse_model(
        "fake?latency_ms=200&jitter_ms=20&chunk_ms=5&answers=391:3,392&template=It+is+{answer}"
        "&tokens=9&error_rate=0.1&error_status=503&rate_limit=0.2&retry_after=0.5"
        "&fail_first=2&fail_status=429&hang=0&malformed=0.3&empty=1"
    )
    assert behaviour == Behaviour(
        latency_s=0.2,
        jitter_s=0.02,
        chunk_s=0.005,
        answers=("391", "392"),
        weights=(3.0, 1.0),
        template="It is {answer}",
        tokens=9,
        error_rate=0.1,
        error_status=503,
        rate_limit=0.2,
        retry_after="0.5",
        fail_first=2,
        fail_status=429,
        malformed=0.3,
        empty=True,
    )


@pytest.mark.parametrize(
    ("model", "param"),
    [
        ("fake?latency_ms=soon", "latency_ms"),
        ("fake?error_rate=1.5", "error_rate"),
        ("fake?answers=a:x", "answers"),
        ("fake?answers=a:0", "answers"),
        ("fake?status=200", "status"),
        ("fake?retry_after=later", "retry_after"),
        ("fake?hang=maybe", "hang"),
        ("fake?latency=5", "latency"),
    ],
)
def test_parse_model_rejects_bad_parameters(model: str, param: str) -> None:
    with pytest.raises(RequestError) as caught:
        parse_model(model)
    assert caught.value.status == 400
    assert caught.value.param == param


def test_parse_model_rejects_other_models() -> None:
    with pytest.raises(RequestError) as caught:
        parse_model("gpt-4o")
    assert caught.value.status == 404


# -- completions ------------------------------------------------------------------------


async def test_plain_completion_echoes_the_last_user_message(client: openai.AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(
        model="fake",
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "what is two plus two"},
        ],
    )
    assert completion.object == "chat.completion"
    assert completion.model == "fake"
    [choice] = completion.choices
    assert choice.index == 0
    assert choice.finish_reason == "stop"
    assert choice.message.role == "assistant"
    assert choice.message.content == "Echo: what is two plus two"
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == 7
    assert completion.usage.completion_tokens == 6
    assert completion.usage.total_tokens == 13


async def test_words_template_and_tokens(client: openai.AsyncOpenAI) -> None:
    words = await ask(client, "fake?words=4&tokens=1000", "count")
    assert words.choices[0].message.content == "w1 w2 w3 w4"
    assert words.usage is not None
    assert words.usage.completion_tokens == 1000

    templated = await ask(client, "fake?answers=7&template=The+answer+is+{answer}.", "q")
    assert templated.choices[0].message.content == "The answer is 7."


async def test_models_and_healthz(client: openai.AsyncOpenAI, http: httpx.AsyncClient) -> None:
    models = await client.models.list()
    assert [model.id for model in models.data] == ["fake"]
    assert (await http.get("/healthz")).json() == {"ok": True}


async def test_latency_delays_the_response(client: openai.AsyncOpenAI) -> None:
    started = time.monotonic()
    await ask(client, "fake?latency_ms=150", "slowly")
    assert time.monotonic() - started >= 0.15


# -- reproducible randomness ------------------------------------------------------------

FOUR_WAYS = "fake?answers=a:1,b:1,c:1,d:1"


async def test_same_seed_gives_the_same_answer(client: openai.AsyncOpenAI) -> None:
    answers = {answer_of(await ask(client, FOUR_WAYS, "seeded", seed=7)) for _ in range(5)}
    assert len(answers) == 1


async def test_unseeded_calls_vary_and_reproduce_after_reset(
    client: openai.AsyncOpenAI, http: httpx.AsyncClient
) -> None:
    async def run() -> list[str]:
        return [answer_of(await ask(client, FOUR_WAYS, "unseeded")) for _ in range(12)]

    await reset(http)
    first = await run()
    await reset(http)
    assert await run() == first
    assert len(set(first)) > 1


async def test_answer_weights_are_respected_over_seeds(client: openai.AsyncOpenAI) -> None:
    completions = await asyncio.gather(
        *(ask(client, "fake?answers=391:3,392:1", "weights", seed=seed) for seed in range(200))
    )
    counts = Counter(answer_of(completion) for completion in completions)
    assert counts.keys() == {"391", "392"}
    assert 125 <= counts["391"] <= 175  # expected 150; the standard deviation is about 6


# -- failures ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "error"),
    [
        ("fake?error_rate=1", openai.InternalServerError),
        ("fake?error_rate=1&error_status=503", openai.InternalServerError),
        ("fake?status=400", openai.BadRequestError),
        ("fake?status=401", openai.AuthenticationError),
        ("fake?latency_ms=soon", openai.BadRequestError),
        ("gpt-4o", openai.NotFoundError),
    ],
)
async def test_error_statuses_raise_the_matching_exception(
    client: openai.AsyncOpenAI, model: str, error: type[openai.APIStatusError]
) -> None:
    with pytest.raises(error) as caught:
        await ask(client, model, "fail")
    assert caught.value.type is not None
    assert caught.value.code is not None


async def test_bad_model_parameter_is_named(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await ask(client, "fake?jitter_ms=lots", "bad")
    assert caught.value.param == "jitter_ms"
    assert "jitter_ms" in caught.value.message


async def test_request_without_messages_is_rejected(http: httpx.AsyncClient) -> None:
    response = await http.post("/v1/chat/completions", json={"model": "fake"})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "messages"


async def test_rate_limit_sends_retry_after(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.RateLimitError) as caught:
        await ask(client, "fake?rate_limit=1&retry_after=0.2", "limited")
    assert caught.value.response.headers["retry-after"] == "0.2"


async def test_fail_first_fails_then_succeeds(client: openai.AsyncOpenAI) -> None:
    for _ in range(2):
        with pytest.raises(openai.InternalServerError):
            await ask(client, "fake?fail_first=2", "flaky")
    assert (await ask(client, "fake?fail_first=2", "flaky")).choices


async def test_fail_first_with_429_sends_retry_after(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.RateLimitError) as caught:
        await ask(client, "fake?fail_first=1&fail_status=429&retry_after=3", "flaky 429")
    assert caught.value.response.headers["retry-after"] == "3"
    assert (
        await ask(client, "fake?fail_first=1&fail_status=429&retry_after=3", "flaky 429")
    ).choices


async def test_hang_times_out_and_the_server_lets_go(
    client: openai.AsyncOpenAI, http: httpx.AsyncClient
) -> None:
    await reset(http)
    with pytest.raises(openai.APITimeoutError):
        await ask(client, "fake?hang=1", "hang", timeout=0.3)
    settled = await stats_when(http, lambda current: current["in_flight"] == 0)
    assert settled["cancelled"] == 1


async def test_client_leaving_during_latency_ends_the_request(
    client: openai.AsyncOpenAI, http: httpx.AsyncClient
) -> None:
    await reset(http)
    with pytest.raises(openai.APITimeoutError):
        await ask(client, "fake?latency_ms=10000", "impatient", timeout=0.3)
    settled = await stats_when(http, lambda current: current["in_flight"] == 0, within_s=2)
    assert settled["cancelled"] == 1


async def test_malformed_body_raises_json_decode_error(client: openai.AsyncOpenAI) -> None:
    # The client does not wrap this in openai.APIError: callers must catch ValueError.
    with pytest.raises(json.JSONDecodeError):
        await ask(client, "fake?malformed=1", "broken")


async def test_empty_gives_no_choices(client: openai.AsyncOpenAI) -> None:
    assert (await ask(client, "fake?empty=1", "nothing")).choices == []


# -- streaming --------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_ms", [0, 5])
async def test_stream_concatenates_to_the_non_streamed_reply(
    client: openai.AsyncOpenAI, chunk_ms: int
) -> None:
    model = f"fake?answers=391:1,392:1&chunk_ms={chunk_ms}"
    whole = await ask(client, model, "stream me", seed=11)
    stream = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "stream me"}],
        seed=11,
        stream=True,
        stream_options={"include_usage": True},
    )
    async with stream:
        chunks = [chunk async for chunk in stream]

    *content_chunks, final, usage_chunk = chunks
    assert len(content_chunks) == 6  # I worked it out. Answer: 39x
    assert content_chunks[0].choices[0].delta.role == "assistant"
    text = "".join(chunk.choices[0].delta.content or "" for chunk in content_chunks)
    assert text == whole.choices[0].message.content
    assert final.choices[0].finish_reason == "stop"
    assert usage_chunk.choices == []
    assert usage_chunk.usage == whole.usage


async def test_stream_without_usage_ends_with_stop(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model="fake?words=3",
        messages=[{"role": "user", "content": "short stream"}],
        stream=True,
    )
    async with stream:
        chunks = [chunk async for chunk in stream]
    assert [chunk.choices[0].delta.content for chunk in chunks] == ["w1 ", "w2 ", "w3", None]
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(chunk.usage is None for chunk in chunks)


async def test_malformed_stream_raises_json_decode_error(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model="fake?malformed=1",
        messages=[{"role": "user", "content": "broken stream"}],
        stream=True,
    )
    async with stream:
        with pytest.raises(json.JSONDecodeError):
            async for _ in stream:
                pass


async def test_empty_stream_has_no_chunks(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model="fake?empty=1",
        messages=[{"role": "user", "content": "empty stream"}],
        stream=True,
    )
    async with stream:
        assert [chunk async for chunk in stream] == []


# -- counters ---------------------------------------------------------------------------


async def test_stats_count_and_reset(client: openai.AsyncOpenAI, http: httpx.AsyncClient) -> None:
    await reset(http)
    await asyncio.gather(*(ask(client, "fake?latency_ms=300", "counted") for _ in range(3)))
    with pytest.raises(openai.RateLimitError):
        await ask(client, "fake?rate_limit=1", "counted")

    counted = await stats(http)
    assert counted == {
        "requests": 4,
        "completed": 4,
        "cancelled": 0,
        "in_flight": 0,
        "max_in_flight": 3,
        "by_status": {"200": 3, "429": 1},
    }
    await reset(http)
    assert await stats(http) == {
        "requests": 0,
        "completed": 0,
        "cancelled": 0,
        "in_flight": 0,
        "max_in_flight": 0,
        "by_status": {},
    }


async def test_reset_forgets_fail_first(
    client: openai.AsyncOpenAI, http: httpx.AsyncClient
) -> None:
    with pytest.raises(openai.InternalServerError):
        await ask(client, "fake?fail_first=1", "forgotten")
    await ask(client, "fake?fail_first=1", "forgotten")
    await reset(http)
    with pytest.raises(openai.InternalServerError):
        await ask(client, "fake?fail_first=1", "forgotten")


# -- the aiohttp transport --------------------------------------------------------------


async def test_aiohttp_client_works(base_url: str) -> None:
    async with openai.AsyncOpenAI(
        base_url=f"{base_url}/v1",
        api_key="test",
        max_retries=0,
        http_client=openai.DefaultAioHttpClient(),
    ) as client:
        completion = await ask(client, "fake", "over aiohttp")
        assert completion.choices[0].message.content == "Echo: over aiohttp"
        stream = await client.chat.completions.create(
            model="fake?words=3",
            messages=[{"role": "user", "content": "over aiohttp"}],
            stream=True,
        )
        async with stream:
            text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream])
        assert text == "w1 w2 w3"
