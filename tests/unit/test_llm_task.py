"""An llm task: the chat-completions request surface, checked for types and sent as it
is; the messages' full shape; what Fanout owns; prices and providers files."""

from __future__ import annotations

import math
from functools import reduce
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from service.aggregate import extract, lane_answer
from service.config import Price, ProvidersFileError, load_providers
from service.spec import LlmTask, MajorityAggregate, VotingSpec
from service.views import Usage

USER = [{"role": "user", "content": "hi"}]


def task(**fields: Any) -> LlmTask:
    return LlmTask.model_validate({"model": "m", "messages": USER, **fields})


EVERY_FIELD: dict[str, Any] = {
    "temperature": 0.7,
    "top_p": 0.9,
    "max_tokens": 100,
    "max_completion_tokens": 200,
    "seed": 7,
    "stop": ["END"],
    "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}},
    "tools": [{"type": "function", "function": {"name": "vote", "parameters": {}}}],
    "tool_choice": {"type": "function", "function": {"name": "vote"}},
    "parallel_tool_calls": False,
    "reasoning_effort": "high",
    "verbosity": "low",
    "logprobs": True,
    "top_logprobs": 3,
    "presence_penalty": 0.5,
    "frequency_penalty": -0.5,
    "logit_bias": {"50256": -100},
    "user": "u-1",
    "service_tier": "flex",
    "prediction": {"type": "content", "content": "x"},
    "modalities": ["text"],
    "prompt_cache_key": "k",
    "safety_identifier": "s",
}


def test_every_per_call_field_is_sent_as_given_with_extra_body_merged() -> None:
    body = task(
        **EVERY_FIELD, extra_body={"top_k": 40, "guided_json": {"type": "object"}}
    ).request()
    assert body == {
        "model": "m",
        "messages": USER,
        **EVERY_FIELD,
        "top_k": 40,
        "guided_json": {"type": "object"},
    }


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("tools", {"type": "function"}),
        ("tools", [{"function": {"name": "x"}}]),
        ("tool_choice", "sometimes"),
        ("parallel_tool_calls", "yes"),
        ("logprobs", "yes"),
        ("top_logprobs", 21),
        ("presence_penalty", 3),
        ("logit_bias", {"1": 101}),
        ("max_completion_tokens", 0),
        ("reasoning_effort", 5),
        ("max_tokens", "100"),
        ("temperature", "0.5"),
        ("seed", 1.5),
        ("response_format", {"json_schema": {}}),
        ("extra_body", ["top_k"]),
        ("service_tier", ""),
    ],
)
def test_a_field_of_the_wrong_type_is_refused_by_name(field: str, value: Any) -> None:
    with pytest.raises(ValidationError) as refused:
        task(**{field: value})
    assert field in {str(part) for error in refused.value.errors() for part in error["loc"]}


@pytest.mark.parametrize("key", ["model", "messages", "n", "stream_options", "stream"])
def test_extra_body_may_not_set_what_the_task_or_fanout_owns(key: str) -> None:
    with pytest.raises(ValidationError, match=f"extra_body may not set {key}"):
        task(extra_body={key: 1})


@pytest.mark.parametrize("field", ["n", "stream_options"])
def test_fields_fanout_owns_are_not_the_tasks(field: str) -> None:
    with pytest.raises(ValidationError):
        task(**{field: 2})


def test_top_logprobs_need_logprobs() -> None:
    with pytest.raises(ValidationError, match="top_logprobs needs logprobs"):
        task(top_logprobs=2)


def test_messages_take_the_full_shape_of_a_tool_conversation() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
    messages = [
        {"role": "system", "content": "Use the tools."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "hi"},
                {"type": "image_url", "image_url": {"url": "data:,"}},
            ],
        },
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "42"},
        {"role": "assistant", "refusal": "I can't."},
    ]
    sent = LlmTask.model_validate({"model": "m", "messages": messages}).request()["messages"]
    assert sent == [{k: v for k, v in m.items() if v is not None} for m in messages]


@pytest.mark.parametrize(
    ("message", "why"),
    [
        ({"role": "user", "content": "x", "tool_calls": []}, "tool_calls"),
        (
            {
                "role": "user",
                "content": "x",
                "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": ""}}],
            },
            "only an assistant",
        ),
        ({"role": "tool", "content": "42"}, "tool_call_id"),
        ({"role": "user", "content": "x", "tool_call_id": "c1"}, "only a tool message"),
        ({"role": "assistant"}, "content is required"),
        ({"role": "user", "content": [{"text": "no type"}]}, "type"),
    ],
)
def test_a_message_of_the_wrong_shape_is_refused(message: dict[str, Any], why: str) -> None:
    with pytest.raises(ValidationError, match=why):
        LlmTask.model_validate({"model": "m", "messages": [message]})


def test_a_vote_over_a_functions_arguments_reads_the_first_tool_call() -> None:
    reply = {
        "tool_calls": [
            {
                "id": "c",
                "type": "function",
                "function": {"name": "vote", "arguments": '{"answer": 391}'},
            }
        ]
    }
    how = MajorityAggregate(extract="json", field="answer")
    assert extract(how, None, reply) == 391
    assert extract(how, '{"answer": 7}', reply) == 7  # text first, when there is some
    spec = VotingSpec.model_validate(
        {
            "mode": "voting",
            "n": 1,
            "task": {"model": "m", "messages": USER},
            "aggregate": how.model_dump(),
        }
    )
    assert lane_answer(spec, 0, None, reply).answer == 391
    assert lane_answer(spec, 0, None, {}).answer is None  # no text, no call: an abstention


def test_usage_adds_up_and_its_cost_is_absent_without_prices() -> None:
    a = Usage(
        prompt_tokens=10, completion_tokens=5, total_tokens=15, reasoning_tokens=3, cached_tokens=4
    )
    b = Usage(prompt_tokens=1, completion_tokens=1, total_tokens=2)
    total = a + b
    assert (total.total_tokens, total.reasoning_tokens, total.cached_tokens) == (17, 3, 4)
    assert total.cost_usd is None and "cost_usd" not in total.model_dump()
    priced = total + Usage(cost_usd=0.25) + Usage(cost_usd=0.5)
    assert priced.cost_usd == 0.75 and priced.model_dump()["cost_usd"] == 0.75


_counts = st.integers(min_value=0, max_value=10**9)
_usages = st.builds(
    Usage,
    prompt_tokens=_counts,
    completion_tokens=_counts,
    total_tokens=_counts,
    reasoning_tokens=_counts,
    cached_tokens=_counts,
    cost_usd=st.none() | st.floats(min_value=0, max_value=100, allow_nan=False),
)


@given(st.lists(_usages, max_size=8))
def test_a_sum_of_usages_adds_each_count_and_the_costs_there_are(usages: list[Usage]) -> None:
    total = Usage.sum(usages)
    for name in ("prompt", "completion", "total", "reasoning", "cached"):
        count = f"{name}_tokens"
        assert getattr(total, count) == sum(getattr(usage, count) for usage in usages)
    costs = [usage.cost_usd for usage in usages if usage.cost_usd is not None]
    assert total.cost_usd == (reduce(lambda a, b: a + b, costs) if costs else None)
    assert total == reduce(lambda a, b: a + b, usages, Usage())  # + is the same sum


def test_a_price_charges_cached_prompt_tokens_at_their_own_rate() -> None:
    price = Price(input=2.0, output=8.0, cached_input=0.5)  # USD per million tokens
    assert math.isclose(
        price.cost(prompt=1000, cached=400, completion=100), (600 * 2 + 400 * 0.5 + 100 * 8) / 1e6
    )
    assert Price(input=2.0, output=8.0).cost(1000, 400, 0) == 1000 * 2 / 1e6


# --- the providers file -------------------------------------------------------------


def providers_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "providers.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "says"),
    [
        (
            '[providers.p]\nbase_url = "http://x"\nmax_concurrency = "four"\n',
            "providers.p.max_concurrency",
        ),
        (
            '[providers.p]\nbase_url = "http://x"\nmax_concurency = 4\n',
            "providers.p.max_concurency: not a key",
        ),
        ('[providers.p]\napi_key = "k"\n', "providers.p.base_url: required"),
        (
            '[providers.p]\nbase_url = "http://x"\napi_key_env = "FANOUT_TEST_UNSET_KEY"\n',
            "FANOUT_TEST_UNSET_KEY is not set",
        ),
        (
            '[providers.p]\nbase_url = "http://x"\n[providers.p.prices.m]\ninput = 1\n',
            "providers.p.prices.m.output: required",
        ),
        ("[providers.p\n", "not TOML"),
    ],
)
def test_a_providers_file_that_cannot_be_used_says_where_in_one_line(
    tmp_path: Path, text: str, says: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FANOUT_TEST_UNSET_KEY", raising=False)
    with pytest.raises(ProvidersFileError) as refused:
        load_providers(providers_file(tmp_path, text))
    message = str(refused.value)
    assert message.startswith(str(tmp_path)) and says in message and "\n" not in message


def test_a_providers_file_gives_limits_and_prices(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FANOUT_TEST_KEY", "sk-1")
    text = (
        '[providers.p]\nbase_url = "http://x"\napi_key_env = "FANOUT_TEST_KEY"\nrpm = 60\n'
        '[providers.p.prices."gpt-x"]\ninput = 1\noutput = 2.5\n'
    )
    (provider,) = load_providers(providers_file(tmp_path, text)).values()
    assert (provider.api_key, provider.rpm) == ("sk-1", 60)
    assert provider.prices["gpt-x"] == Price(input=1.0, output=2.5)
