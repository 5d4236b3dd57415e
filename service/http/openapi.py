"""The OpenAPI document: what FastAPI cannot infer from the routes. Every error is
problem+json with the ``Problem`` schema (and its headers), ``/v1`` routes need an API
key, a created job links to what can be done with it, and the spec has examples."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

from .problems import KINDS, PROBLEM_JSON

# The error responses of each route (``document`` gives every one the ``Problem``
# schema), and the links from a created job to what can be done with it.

PROBLEMS = {
    400: "the body is not valid JSON (`malformed_json`), or an API key is in the URL "
    "(`key_in_url`)",
    401: "no API key, or an unknown one (or an invalid stream token)",
    404: "no such job for this tenant",
    409: "the job has already finished",
    413: "the request body is over the cap",
    415: "the body is not sent as `application/json`",
    422: "the request is invalid or over a cap; `errors` names each failing field",
    429: "over the tenant's rate limit (`rate_limited`) or at its cap of jobs in flight "
    "(`tenant_at_capacity`): retry after `Retry-After`",
    503: "not ready (the database is unreachable or not migrated) or shutting down: retry "
    "after `Retry-After`",
}


def problems(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """Declared error responses: the given ones, plus 401 and 429 on every ``/v1`` route."""
    return {
        status: {"description": PROBLEMS[status], "content": {"application/problem+json": {}}}
        for status in sorted({401, *statuses, 429})
    }


def _link(path: str, method: str) -> dict[str, Any]:
    pointer = path.replace("/", "~1").replace("{", "%7B").replace("}", "%7D")
    return {
        "operationRef": f"#/paths/{pointer}/{method}",
        "parameters": {"job_id": "$response.body#/id"},
    }


JOB_LINKS = {
    "GetJob": _link("/v1/jobs/{job_id}", "get"),
    "CancelJob": _link("/v1/jobs/{job_id}/cancel", "post"),
    "JobEvents": _link("/v1/jobs/{job_id}/events", "get"),
}
SPEC_EXAMPLES: dict[str, Any] = {
    "voting": {
        "summary": "self-consistency: 5 votes, majority on the number",
        "value": {
            "mode": "voting",
            "n": 5,
            "task": {
                "model": "gpt-4o-mini",
                "temperature": 0.8,
                "messages": [{"role": "user", "content": "What is 17*23? End with 'Answer: N'."}],
            },
            "aggregate": {"kind": "majority", "extract": "number"},
        },
    },
    "sectioning": {
        "summary": "a draft and a safety check in parallel; the check gates the output",
        "value": {
            "mode": "sectioning",
            "sections": [
                {
                    "name": "draft",
                    "task": {
                        "model": "gpt-4o-mini",
                        "messages": [{"role": "user", "content": "Write a haiku about rain."}],
                    },
                },
                {
                    "name": "safety",
                    "task": {
                        "model": "gpt-4o-mini",
                        "messages": [
                            {"role": "system", "content": "Answer 'safe' or 'unsafe'."},
                            {"role": "user", "content": "A haiku about rain."},
                        ],
                    },
                    "gate": {"block_if": "(?i)\\bunsafe\\b"},
                },
            ],
        },
    },
    "fake-llm": {
        "summary": "a vote against the simulator (`fanout fake-llm`)",
        "value": {
            "mode": "voting",
            "n": 3,
            "task": {
                "model": "fake?answers=391:2,392:1",
                "messages": [{"role": "user", "content": "What is 17*23?"}],
            },
            "aggregate": {"kind": "majority", "extract": "number"},
        },
    },
}
CREATED: dict[int | str, dict[str, Any]] = {
    202: {
        "description": "the job (for a repeated Idempotency-Key, the job it created)",
        "headers": {
            "Location": {"required": True, "schema": {"type": "string"}, "description": "the job"}
        },
        "links": JOB_LINKS,
    },
}


def problem_schema() -> dict[str, Any]:
    """RFC 9457 problem details, with the kinds this service answers as enums."""
    return {
        "title": "Problem",
        "description": "RFC 9457 problem details. `code` (and `type`, its URI) names the kind "
        "of error, for programs; `detail` says what went wrong, for people; a 422 names "
        "each failing field in `errors`.",
        "type": "object",
        "required": ["type", "title", "status", "detail", "code"],
        "properties": {
            "type": {"type": "string", "enum": sorted(kind.type for kind in KINDS.values())},
            "code": {"type": "string", "enum": sorted(KINDS)},
            "title": {"type": "string"},
            "status": {"type": "integer", "minimum": 400, "maximum": 599},
            "detail": {"type": "string"},
            "errors": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["loc", "msg"],
                    "properties": {
                        "loc": {"type": "array", "items": {"type": ["string", "integer"]}},
                        "msg": {"type": "string"},
                        "type": {"type": "string"},
                    },
                },
            },
        },
    }


# Headers that come with an error, whichever route refuses.
ERROR_HEADERS: dict[str, dict[str, Any]] = {
    "401": {
        "WWW-Authenticate": {
            "required": True,
            "schema": {"type": "string"},
            "description": "the Bearer challenge",
        }
    },
    "429": {
        "Retry-After": {
            "required": True,
            "schema": {"type": "integer", "minimum": 1},
            "description": "seconds to wait before trying again",
        }
    },
    "503": {
        "Retry-After": {
            "required": True,
            "schema": {"type": "integer", "minimum": 1},
            "description": "seconds to wait before trying again",
        }
    },
}
SECURITY_SCHEMES: dict[str, Any] = {
    "bearer": {
        "type": "http",
        "scheme": "bearer",
        "description": "An API key from `FANOUT_API_KEYS`. With none configured the service "
        "runs open (local use only): then no credentials are needed.",
    },
    "stream-token": {
        "type": "apiKey",
        "in": "query",
        "name": "token",
        "description": "A job's `stream_token` (in the job's JSON), for its page, the job "
        "and its event stream only: an EventSource cannot send headers, and an API key in "
        "a URL would end up in logs. It expires (`FANOUT_STREAM_TOKEN_TTL_S`).",
    },
}
# Every /v1 route: an API key, or nothing on an open server.
API_SECURITY: list[dict[str, list[str]]] = [{"bearer": []}, {}]
# Job-scoped reads (the job, its events, its page) also take the job's stream token.
READER_SECURITY: dict[str, Any] = {"security": [{"bearer": []}, {"stream-token": []}, {}]}


def document(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """``app.openapi`` with what FastAPI cannot infer: every error is problem+json with the
    ``Problem`` schema (and its headers), and ``/v1`` routes need an API key."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = generate()
            components = document.setdefault("components", {})
            schemas = components.setdefault("schemas", {})
            for unused in ("HTTPValidationError", "ValidationError"):
                schemas.pop(unused, None)
            for path, operations in document["paths"].items():
                for operation in operations.values():
                    if path.startswith("/v1/") and "security" not in operation:
                        operation["security"] = copy.deepcopy(API_SECURITY)
                    for status, response in operation["responses"].items():
                        if status[0] in "45":
                            ref = {"$ref": "#/components/schemas/Problem"}
                            response["content"] = {PROBLEM_JSON: {"schema": ref}}
                            if status in ERROR_HEADERS:
                                response["headers"] = copy.deepcopy(ERROR_HEADERS[status])
            schemas["Problem"] = problem_schema()
            components["securitySchemes"] = copy.deepcopy(SECURITY_SCHEMES)
            app.openapi_schema = document
        return app.openapi_schema

    return openapi
