"""Text and numbers that JSON cannot carry back out: refused at the door (422, nothing
stored), scrubbed when a provider or an http task sends them, and, whatever a request
holds, never a 5xx afterwards: the job it made stays readable, listable and streamable.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import httpx
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.config import Settings
from tests.support import (
    app_client,
    events_of,
    receiver,
    run_job,
    section,
    sectioning,
    user,
    voting,
)

LONE = "\ud800"


def raw(spec: dict[str, Any], numbers: dict[str, str] | None = None) -> bytes:
    """The spec as JSON text; each ``"@@name@@"`` string becomes the raw token given
    (``NaN``, ``1e400``: what Python's json reads but JSON cannot carry)."""
    text = json.dumps(spec)  # lone surrogates are written as \\ud800 escapes
    for name, token in (numbers or {}).items():
        text = text.replace(f'"@@{name}@@"', token)
    return text.encode()


async def post(http: httpx.AsyncClient, body: bytes, **headers: str) -> httpx.Response:
    return await http.post(
        "/v1/jobs", content=body, headers={"content-type": "application/json", **headers}
    )


def content_part(text: str) -> dict[str, Any]:
    return voting(
        1, task={"messages": [{"role": "user", "content": [{"type": "text", "text": text}]}]}
    )


CASES = {
    "metadata value": (voting(1, metadata={"a": LONE}), ["body", "metadata", "a"]),
    "metadata key": (voting(1, metadata={LONE: 1}), ["body", "metadata", "\ufffd"]),
    "stop": (voting(1, task={"stop": ["ok", LONE]}), ["body", "task", "stop", 1]),
    "text content part": (
        content_part("a" + LONE),
        ["body", "task", "messages", 0, "content", 0, "text"],
    ),
    "string content": (
        voting(1, task={"messages": user(LONE)}),
        ["body", "task", "messages", 0, "content"],
    ),
    "gate": (
        sectioning(section("a"), section("g", gate={"block_if": LONE})),
        ["body", "sections", 1, "gate", "block_if"],
    ),
}


@pytest.mark.parametrize("where", list(CASES))
async def test_a_lone_surrogate_anywhere_is_a_422_naming_the_field_and_nothing_is_stored(
    client: httpx.AsyncClient, where: str
) -> None:
    spec, loc = CASES[where]
    response = await post(client, raw(spec))
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert loc in [error["loc"] for error in response.json()["errors"]]
    assert (await client.get("/v1/jobs")).json()["jobs"] == []


@pytest.mark.parametrize("token", ["Infinity", "-Infinity", "NaN", "1e400"])
async def test_a_number_json_cannot_carry_is_a_422_naming_the_field(
    client: httpx.AsyncClient, token: str
) -> None:
    response = await post(client, raw(voting(1, metadata={"x": "@@x@@"}), {"x": token}))
    assert response.status_code == 422, response.text
    assert ["body", "metadata", "x"] in [e["loc"] for e in response.json()["errors"]]
    assert (await client.get("/v1/jobs")).json()["jobs"] == []


async def test_unstorable_text_is_reported_with_the_specs_other_errors(
    client: httpx.AsyncClient,
) -> None:
    spec = voting(0, metadata={"a": LONE})  # n = 0 is invalid too
    response = await post(client, raw(spec))
    assert response.status_code == 422
    locs = [error["loc"] for error in response.json()["errors"]]
    assert ["body", "n"] in locs
    assert ["body", "metadata", "a"] in locs


@pytest.mark.parametrize(
    "decoded",
    [
        [1.0, LONE],
        [1e400, "00000000-0000-0000-0000-000000000000"],
        [1.0, "not-a-uuid"],
        [1.0, ["nested"]],
        "[" * 5000,
    ],
)
async def test_a_cursor_that_decodes_to_something_else_is_a_422(
    client: httpx.AsyncClient, decoded: Any
) -> None:
    text = decoded if isinstance(decoded, str) else json.dumps(decoded)
    cursor = base64.urlsafe_b64encode(text.encode()).decode()
    response = await client.get("/v1/jobs", params={"cursor": cursor})
    assert response.status_code == 422, response.text
    assert response.json()["errors"][0]["loc"] == ["query", "cursor"]


async def test_a_path_or_query_with_bytes_that_are_not_utf8_is_no_5xx(
    client: httpx.AsyncClient,
) -> None:
    for path in [
        "/v1/jobs/%ED%A0%80",
        "/v1/jobs/%ED%A0%80/events",
        "/v1/jobs?cursor=%ED%A0%80",
        "/v1/jobs?status=%ED%A0%80",
        "/jobs/%FF",
    ]:
        response = await client.get(path)
        assert 400 <= response.status_code < 500, (path, response.status_code)


async def test_upstream_text_and_numbers_json_cannot_carry_are_stored_scrubbed(
    settings: Settings,
) -> None:
    """An http task's JSON body with a lone surrogate and NaN: the lane succeeds with
    U+FFFD and null in their place, and the job reads back, lists and streams."""

    async def hostile(_request: web.Request) -> web.Response:
        body = '{"name": "a\\ud800b", "score": NaN, "big": 1e400, "ok": [1, "\\udfff"]}'
        return web.Response(text=body, content_type="application/json")

    async with receiver(hostile) as url, app_client(settings, egress_allow="127.0.0.1") as http:
        job = await run_job(http, sectioning({"name": "api", "task": {"kind": "http", "url": url}}))
        assert job["status"] == "succeeded", job
        body = job["result"]["output"]["api"]["body"]
        assert body == {"name": "a\ufffdb", "score": None, "big": None, "ok": [1, "\ufffd"]}
        assert (await http.get("/v1/jobs")).status_code == 200
        events = await events_of(http, job["id"])
        assert events[-1]["event"] == "job.succeeded"


# --- the property: whatever is posted, no 5xx, and a created job stays readable ----------

HOSTILE_TEXT = st.one_of(
    st.sampled_from(
        [LONE, "\udfff", "a\udc00b", "\udfff\ud800", "\x00", "nul\x00", "\u202e", "\ufeff", "😀"]
    ),
    st.text(max_size=20),
    st.text(alphabet=st.characters(min_codepoint=0xD7F0, max_codepoint=0xE010), max_size=5),
)
HOSTILE_NUMBER = st.sampled_from(
    ["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1e-400", "-0.0", "12345678901234567890123"]
)


def _text_slots(value: str) -> list[dict[str, Any]]:
    """A valid spec with ``value`` in one string field, for every field tried."""
    http_task = {"kind": "http", "url": "http://127.0.0.1:9/", "json": {"k": value}}
    return [
        voting(1, metadata={"note": value}),
        voting(1, metadata={value: "key"}),
        voting(1, task={"messages": user(value)}),
        content_part(value),
        voting(1, task={"stop": value}),
        voting(1, task={"model": f"fake{value}"}),
        voting(1, task={"response_format": {"type": "text", "note": value}}),
        voting(2, aggregate={"kind": "majority", "extract": "regex", "pattern": f"({value})?"}),
        sectioning(section("a", text=value), section("g", gate={"block_if": f"x{value}"})),
        sectioning({"name": f"s{value}", "task": {"model": "fake", "messages": user("hi")}}),
        sectioning({"name": "h", "task": http_task}),
    ]


def _number_slots() -> list[dict[str, Any]]:
    return [
        voting(1, metadata={"n": "@@x@@"}),
        voting(1, task={"temperature": "@@x@@"}),
        voting(1, task={"seed": "@@x@@"}),
        voting("@@x@@"),  # type: ignore[arg-type]
        voting(1, policy={"deadline_s": "@@x@@"}),
        sectioning(
            {"name": "h", "task": {"kind": "http", "url": "http://127.0.0.1:9/", "json": "@@x@@"}}
        ),
    ]


@st.composite
def hostile_requests(draw: st.DrawFn) -> tuple[bytes, dict[str, str]]:
    if draw(st.booleans()):
        specs = _text_slots(draw(HOSTILE_TEXT))
        body = raw(specs[draw(st.integers(0, len(specs) - 1))])
    else:
        specs = _number_slots()
        spec = specs[draw(st.integers(0, len(specs) - 1))]
        body = raw(spec, {"x": draw(HOSTILE_NUMBER)})
    headers = {}
    if draw(st.booleans()):
        headers["idempotency-key"] = draw(st.sampled_from(["k1", "k\x7f", " ", "ключ"]))
    return body, headers


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(request=hostile_requests())
async def test_whatever_is_posted_no_5xx_and_a_created_job_reads_lists_and_streams(
    client: httpx.AsyncClient, request: tuple[bytes, dict[str, str]]
) -> None:
    body, headers = request
    response = await client.post(
        "/v1/jobs",
        content=body,
        headers=[("content-type", "application/json")]
        + [(k, v.encode("utf-8")) for k, v in headers.items()],  # type: ignore[list-item]
    )
    assert response.status_code < 500, response.text
    if response.status_code != 202:
        assert response.status_code in (400, 409, 413, 422), response.text
        return
    job_id = response.json()["id"]
    assert (await client.get(f"/v1/jobs/{job_id}")).status_code == 200
    listed = await client.get("/v1/jobs", params={"limit": 200})
    assert listed.status_code == 200
    assert job_id in [job["id"] for job in listed.json()["jobs"]]
    events = await events_of(client, job_id)
    assert events[-1]["event"] in ("job.succeeded", "job.failed")
    assert (await client.get(f"/v1/jobs/{job_id}")).status_code == 200
