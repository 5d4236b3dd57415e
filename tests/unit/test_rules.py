"""The small rules written once: retry or end, the backoff, storable JSON, the token
bucket, provider limits, tenants' keys and rates."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.attempts import Attempt, status_attempt
from service.config import Provider
from service.errors import RateLimited, Unauthorized
from service.http.tenants import OPEN_TENANT, RateLimiter, Tenants
from service.jsonsafe import problems, scrub
from service.policy import (
    Retrying,
    Runnable,
    Step,
    backoff,
    fair_share,
    next_step,
    tokens_to_reserve,
)
from service.rates import TokenBucket
from service.spec import LlmTask
from service.states import ErrorType, LaneStatus
from service.store.providers import Admission, _State

RETRYING = Retrying(base_s=1.0, max_s=8.0)
TASK = LlmTask.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
TRANSIENT = Attempt(error_type=ErrorType.UPSTREAM_ERROR, error_message="HTTP 503", transient=True)


# --- retry or end ---------------------------------------------------------------------


def test_an_answer_ends_the_lane_succeeded() -> None:
    assert next_step(Attempt(output="391"), 1, 3, RETRYING) == Step(LaneStatus.SUCCEEDED)


def test_a_transient_failure_is_retried_while_attempts_are_left() -> None:
    step = next_step(TRANSIENT, 2, 3, RETRYING)
    assert step.retry and step.status is LaneStatus.QUEUED
    assert 1.0 <= step.retry_in <= 2.0  # attempt 2: half to all of 2 s


def test_the_last_attempt_is_not_retried() -> None:
    assert next_step(TRANSIENT, 3, 3, RETRYING) == Step(LaneStatus.FAILED)


def test_a_failure_that_is_not_transient_ends_the_lane_at_once() -> None:
    refused = Attempt(error_type=ErrorType.UPSTREAM_ERROR, error_message="HTTP 400")
    assert next_step(refused, 1, 5, RETRYING) == Step(LaneStatus.FAILED)


def test_a_timeout_on_the_last_attempt_ends_the_lane_timed_out() -> None:
    timeout = Attempt(error_type=ErrorType.TIMEOUT, error_message="slow", transient=True)
    assert next_step(timeout, 2, 2, RETRYING) == Step(LaneStatus.TIMED_OUT)
    assert next_step(timeout, 1, 2, RETRYING).retry


def test_a_retry_is_never_sooner_than_retry_after() -> None:
    limited = Attempt(error_type=ErrorType.RATE_LIMITED, transient=True, retry_after=7.5)
    assert next_step(limited, 1, 3, RETRYING).retry_in == 7.5


@pytest.mark.parametrize(
    ("attempt_no", "low", "high"),
    [(1, 0.5, 1.0), (2, 1.0, 2.0), (3, 2.0, 4.0), (4, 4.0, 8.0), (9, 4.0, 8.0)],
)
def test_the_backoff_doubles_with_jitter_up_to_its_ceiling(
    attempt_no: int, low: float, high: float
) -> None:
    assert backoff(attempt_no, 1.0, 8.0, uniform=lambda a, b: a) == low
    assert backoff(attempt_no, 1.0, 8.0, uniform=lambda a, b: b) == high


# --- HTTP status -> lane error ----------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "error_type", "transient"),
    [
        (400, "upstream_error", False),
        (401, "upstream_error", False),
        (404, "upstream_error", False),
        (408, "upstream_error", True),
        (409, "upstream_error", True),
        (429, "rate_limited", True),
        (500, "upstream_error", True),
        (503, "upstream_error", True),
    ],
)
def test_an_error_status_maps_to_one_lane_error(
    status: int, error_type: str, transient: bool
) -> None:
    attempt = status_attempt(status, "why", "2")
    assert (attempt.error_type, attempt.transient) == (error_type, transient)
    assert attempt.error_message == f"HTTP {status}: why"
    assert attempt.retry_after == (2.0 if transient else None)


# --- storable JSON ----------------------------------------------------------------------


def test_problems_name_each_unstorable_string_and_number_by_path() -> None:
    value = json.loads('{"a": ["ok", "\\ud800", NaN], "\\udfff": {"b": Infinity}, "c": 1e400}')
    found = [(loc, msg.split(" ")[0]) for loc, msg in problems(value)]
    assert found == [
        (("a", 1), "text"),
        (("a", 2), "nan"),
        (("\ufffd",), "a"),
        (("\udfff", "b"), "inf"),
        (("c",), "inf"),
    ]


def test_valid_text_and_numbers_have_no_problems_and_scrub_returns_them_as_they_are() -> None:
    value = {"emoji": "😀", "nul": "a\x00b", "n": [1, -0.0, 1e308]}
    assert list(problems(value)) == []
    assert scrub(value) is value


# JSON as json.loads may give it: any text (lone surrogates too), any float (nan, inf).
_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


@given(_json_values)
def test_problems_name_something_exactly_when_the_value_cannot_be_stored(value: Any) -> None:
    try:
        json.dumps(value, allow_nan=False, ensure_ascii=False).encode("utf-8")
        storable = True
    except ValueError:
        storable = False
    assert (list(problems(value)) == []) == storable
    scrubbed = scrub(value)
    assert list(problems(scrubbed)) == []
    if isinstance(value, dict | list):  # kept as it is exactly when it can be stored
        assert (scrubbed is value) == storable


def test_scrub_replaces_lone_surrogates_and_numbers_json_cannot_carry() -> None:
    value = json.loads('{"t": "a\\ud800b", "\\udc00": [NaN, -Infinity, 2]}')
    assert scrub(value) == {"t": "a\ufffdb", "\ufffd": [None, None, 2]}
    json.dumps(scrub(value), allow_nan=False).encode()  # and it encodes


# --- the token bucket, and what uses it ------------------------------------------------------


def test_a_bucket_refills_continuously_up_to_its_capacity() -> None:
    bucket = TokenBucket(per_minute=60, capacity=2, updated=0.0)
    bucket.take(2, now=0.0)
    assert bucket.wait_s(now=0.0) == 1.0
    assert bucket.wait_s(now=0.5) == pytest.approx(0.5)
    assert bucket.wait_s(now=10.0) == 0.0 and bucket.level == 2


def test_a_bucket_may_be_overdrawn_and_then_waits_until_it_refilled() -> None:
    bucket = TokenBucket.paced(per_minute=600, now=0.0)  # 10 a second, 10 at once
    assert bucket.capacity == 10
    bucket.take(40, now=0.0)
    assert bucket.wait_s(now=0.0, need=1) == pytest.approx(3.1)


def test_a_provider_at_its_concurrency_admits_nothing_until_a_lane_ends() -> None:
    admission = Admission(now=100.0)
    admission.states["p"] = _State(Provider("p", None, None, max_concurrency=2), in_flight=1)
    assert admission.admit("p", TASK) == 0
    assert admission.admit("p", TASK) is None
    assert admission.next_check is None  # only a lane that ends frees it
    assert admission.admit("unlimited", TASK) == 0


def test_a_providers_requests_a_minute_are_paced_and_say_when_to_look_again() -> None:
    admission = Admission(now=100.0)
    state = _State(Provider("p", None, None, rpm=60))  # one a second
    state.requests = TokenBucket.paced(60, 100.0)
    admission.states["p"] = state
    assert admission.admit("p", TASK) == 0
    assert admission.admit("p", TASK) is None
    assert admission.next_check == pytest.approx(101.0)


def test_tokens_a_minute_are_reserved_for_the_prompt_and_the_answer() -> None:
    admission = Admission(now=100.0)
    state = _State(Provider("p", None, None, tpm=600_000, reserve_tokens=500))
    state.tokens = TokenBucket.paced(600_000, 100.0)  # 10,000 a second
    admission.states["p"] = state
    reserved = admission.admit("p", TASK)
    assert reserved == tokens_to_reserve(TASK, 500) and reserved > 500
    assert state.tokens.level == pytest.approx(10_000 - reserved)


def test_a_paused_provider_admits_nothing_until_the_pause_ends() -> None:
    admission = Admission(now=100.0, paused={"p": 102.5})
    assert admission.admit("p", TASK) is None
    assert admission.next_check == 102.5
    assert Admission(now=103.0, paused={"p": 102.5}).admit("p", TASK) == 0


def test_the_reservation_is_the_prompt_estimate_plus_max_tokens_or_the_default() -> None:
    prompt = "x" * 400
    task = LlmTask.model_validate({"model": "m", "messages": [{"role": "user", "content": prompt}]})
    assert tokens_to_reserve(task, 1000) == 100 + 4 + 1000
    capped = task.model_copy(update={"max_tokens": 50})
    assert tokens_to_reserve(capped, 1000) == 100 + 4 + 50


# --- the fair share ------------------------------------------------------------------------


def job(job_id: str, tenant: str, ready: int, running: int = 0, **fields: Any) -> Runnable:
    return Runnable(job_id, tenant, fields.pop("created_at", 0.0), ready, running, **fields)


def test_a_small_job_of_another_tenant_is_not_queued_behind_a_large_one() -> None:
    big = job("big", "acme", ready=980, running=20, created_at=1.0)
    small = job("small", "globex", ready=5, created_at=2.0)
    assert fair_share([big, small], 3) == [("small", 3)]
    assert dict(fair_share([big, small], 10)) == {"small": 5, "big": 5}


def test_tenants_with_nothing_running_share_slots_evenly() -> None:
    plan = fair_share([job("a1", "a", 100), job("b1", "b", 100), job("c1", "c", 100)], 9)
    assert dict(plan) == {"a1": 3, "b1": 3, "c1": 3}


def test_a_tenants_jobs_share_its_slots_and_the_older_goes_first() -> None:
    old = job("old", "a", ready=100, created_at=1.0)
    new = job("new", "a", ready=100, created_at=2.0)
    assert fair_share([new, old], 4) == [("old", 2), ("new", 2)]


def test_weights_give_a_tenant_a_larger_share() -> None:
    plan = fair_share([job("a1", "a", 100), job("b1", "b", 100)], 9, {"a": 2.0})
    assert dict(plan) == {"a1": 6, "b1": 3}


def test_a_jobs_cap_and_its_ready_lanes_bound_what_it_gets() -> None:
    capped = job("capped", "a", ready=10, running=2, cap=3)
    few = job("few", "b", ready=2)
    assert dict(fair_share([capped, few], 10)) == {"capped": 1, "few": 2}


def test_lanes_running_in_jobs_with_nothing_ready_count_for_their_tenant() -> None:
    busy = job("busy", "a", ready=0, running=50)
    more = job("more", "a", ready=10)
    other = job("other", "b", ready=10)
    assert fair_share([busy, more, other], 5) == [("other", 5)]


def test_an_open_server_has_one_tenant_and_takes_any_key() -> None:
    assert Tenants("").tenant_for(None) == OPEN_TENANT
    assert Tenants("").tenant_for("anything") == OPEN_TENANT


def test_keys_map_to_their_tenants_and_others_are_refused() -> None:
    tenants = Tenants("acme:k1, globex:k2")
    assert tenants.tenant_for("k2") == "globex"
    with pytest.raises(Unauthorized):
        tenants.tenant_for("k3")
    with pytest.raises(Unauthorized):
        tenants.tenant_for(None)


@pytest.mark.parametrize("setting", ["acme", "acme:", ":key", "acme:k,broken"])
def test_a_malformed_key_setting_is_refused(setting: str) -> None:
    with pytest.raises(ValueError, match="tenant:key"):
        Tenants(setting)


def test_the_rate_limit_refuses_with_the_seconds_to_wait() -> None:
    limiter = RateLimiter(per_minute=2)
    limiter.check("acme")
    limiter.check("acme")
    with pytest.raises(RateLimited) as refused:
        limiter.check("acme")
    assert 1 <= refused.value.retry_after_s <= math.ceil(60 / 2)
    limiter.check("globex")  # each tenant has its own bucket
