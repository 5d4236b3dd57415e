"""schemathesis against the committed OpenAPI document, on the live app.

The document fuzzed is ``openapi/openapi.json``, the file clients get (``test_api``
keeps it equal to the one the app serves). The app is the real one, on SQLite and on
PostgreSQL: its lifespan runs (migrations, the runner, the fake LLM as the default
provider, so created jobs really run), with two tenants' API keys.

- ``test_every_operation_conforms_to_the_document``: every operation, with the
  document's examples, the coverage phase's boundary and invalid values (some 3,900
  variants of ``POST /v1/jobs``, 15 s), and random ones, half the cases as one tenant
  and half as the other. Every response: no 5xx; status, content type,
  headers and body as declared; schema-invalid input refused with a 4xx; a problem's
  ``status`` equal to the HTTP status; an undeclared method a 405 with ``Allow``.
- ``test_workflows_follow_links_and_keep_tenants_apart``: sequences of calls that
  create jobs and follow the document's links (get, cancel, events, lanes), with the
  same checks; every job one tenant gets back is a 404 for the other.

The event stream never ends while its job runs: here it is fuzzed with unknown ids,
``after`` and ``Last-Event-ID`` (refused before any stream starts), and opened on real
jobs only by the workflows, where ``max-stream-events`` and ``request-timeout`` bound it.
"""

from __future__ import annotations

import copy
import json
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis.config import SchemathesisConfig
from starlette.types import ASGIApp, Receive, Scope, Send

from service.config import Settings
from service.http import create_app

# The app runs in this process (on schemathesis's event-loop thread): its retry jitter
# draws from the global `random` while Hypothesis draws a case, which Hypothesis then
# blames on the strategy.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Do not use the `random` module inside strategies"
    ":hypothesis.errors.HypothesisDeprecationWarning"
)

DOCUMENT = json.loads((Path(__file__).parents[2] / "openapi" / "openapi.json").read_text())
KEYS = {"acme": "key-acme", "globex": "key-globex"}


class LiveApp:
    """The app under test as one ASGI object for the schemas loaded at import time; the
    ``live_app`` fixture plugs the real app in. schemathesis starts its lifespan on a
    test's first request and ends it at the test's teardown."""

    app: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert self.app is not None, "the live_app fixture is not active"
        await self.app(scope, receive, send)


LIVE = LiveApp()


def load(document: dict[str, Any]) -> Any:
    config = SchemathesisConfig.from_dict(
        {
            # Bounds every call, and so the event stream of a job that is still running.
            "request-timeout": 10,
            "max-stream-events": 20,
            "generation": {"max-examples": 20},
            "operations": [{"include-name": "POST /v1/jobs", "generation": {"max-examples": 30}}],
            "checks": {
                # Schema-valid is not always runnable: server caps, provider names,
                # destinations the egress guard refuses, a reused Idempotency-Key, and rules
                # across fields the document does not state (a tool message's
                # tool_call_id, task or tasks) are 422s.
                "positive_data_acceptance": {"expected-statuses": ["2xx", 401, 404, 409, 422]},
            },
        }
    )
    schema = schemathesis.openapi.from_dict(document, config=config)
    schema.app = LIVE
    return schema


schema = load(DOCUMENT)


# Specs this server runs (the fake LLM's models), so that workflows get jobs to follow.
def task(model: str) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "What is 17*23?"}]}


RUNNABLE = [
    {"mode": "voting", "n": 3, "task": task("fake?answers=391:2,392:1")},
    {
        "mode": "sectioning",
        "sections": [
            {"name": "draft", "task": task("fake")},
            {"name": "safety", "task": task("fake?answers=safe"), "gate": {"block_if": "unsafe"}},
        ],
    },
    # Still running when a workflow cancels it or opens its event stream.
    {"mode": "voting", "n": 2, "task": task("fake?latency_ms=500")},
]


def runnable_document() -> dict[str, Any]:
    """The committed document with ``POST /v1/jobs`` taking only :data:`RUNNABLE` specs:
    bodies are the plain fuzz test's business; workflows need jobs that exist."""
    document = copy.deepcopy(DOCUMENT)
    body = document["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]
    body["schema"] = {"enum": RUNNABLE}
    body.pop("examples", None)
    return document


workflows = load(runnable_document())


@pytest.fixture
def live_app(settings: Settings) -> Iterator[ASGIApp]:
    """The real app on a fresh database (SQLite, then PostgreSQL), with two tenants."""
    LIVE.app = create_app(
        settings.model_copy(
            update={
                "api_keys": ",".join(f"{tenant}:{key}" for tenant, key in KEYS.items()),
                "rate_limit_per_minute": 0,  # a fuzzer is one long burst; the limit has its test
                "max_lanes_per_job": 8,  # fuzzed jobs stay small; more is a 422 naming the cap
                "default_lane_timeout_s": 2,
            }
        )
    )
    try:
        yield LIVE.app
    finally:
        LIVE.app = None


def bearer(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


def tenant_of(case: Any) -> str:
    """Half the cases go as one tenant, half as the other; a function of the case's data,
    so a replayed or shrunk case goes as the same tenant."""
    data = repr((case.path_parameters, case.query, case.headers, case.body)).encode()
    return sorted(KEYS)[zlib.crc32(data) % len(KEYS)]


def problem_status_is_the_http_status(ctx: Any, response: Any, case: Any) -> bool | None:
    """A problem's ``status`` member repeats the response's status (RFC 9457)."""
    content_type = (response.headers.get("content-type") or [""])[0]
    if not content_type.startswith("application/problem+json"):
        return None
    status = json.loads(response.content)["status"]
    assert status == response.status_code, f"problem {status} in a {response.status_code}"
    return True


@schema.parametrize()
@settings(
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_every_operation_conforms_to_the_document(case: Any, live_app: ASGIApp) -> None:
    case.call_and_validate(
        headers=bearer(tenant_of(case)), additional_checks=[problem_status_is_the_http_status]
    )


class TenantWorkflows(workflows.as_state_machine()):  # type: ignore[misc]
    """Calls as acme, following the links from each created job; every job acme gets
    back must be invisible to globex: a 404 to read, cancel, stream or page its lanes,
    and unlisted."""

    owner, other = "acme", "globex"

    def get_call_kwargs(self, case: Any) -> dict[str, Any]:
        return {"headers": bearer(self.owner)}

    def validate_response(self, response: Any, case: Any, **kwargs: Any) -> None:
        super().validate_response(
            response, case, additional_checks=[problem_status_is_the_http_status], **kwargs
        )
        if case.path.startswith("/v1/jobs") and 200 <= response.status_code < 300:
            content_type = response.headers.get("content-type", [""])[0]  # a 204 has none
            body = response.json() if "json" in content_type else None
            if isinstance(body, dict) and "id" in body:
                self.assert_hidden_from_the_other_tenant(body["id"])

    def assert_hidden_from_the_other_tenant(self, job_id: str) -> None:
        for method, path in [
            ("GET", "/v1/jobs/{job_id}"),
            ("POST", "/v1/jobs/{job_id}/cancel"),
            ("GET", "/v1/jobs/{job_id}/events"),
            ("GET", "/v1/jobs/{job_id}/lanes"),
        ]:
            probe = workflows[path][method].Case(path_parameters={"job_id": job_id})
            response = probe.call(headers=bearer(self.other))
            assert response.status_code == 404, (method, path, response.status_code)
        listed = workflows["/v1/jobs"]["GET"].Case().call(headers=bearer(self.other)).json()
        assert job_id not in {job["id"] for job in listed["jobs"]}


def test_workflows_follow_links_and_keep_tenants_apart(live_app: ASGIApp) -> None:
    TenantWorkflows.run(
        settings=settings(
            max_examples=6,
            stateful_step_count=6,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
            # Not `explain`: it traces every line, which makes a failing run take minutes.
            phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
        )
    )
