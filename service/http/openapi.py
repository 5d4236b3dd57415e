"""The OpenAPI document: what FastAPI cannot infer from the routes. Every error is
problem+json with the ``Problem`` schema (and its headers), ``/v1`` routes need an API
key, a created job links to what can be done with it, and the spec has examples."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

from ..states import EventType
from ..views import DETAILS
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
    """Declared error responses: the given ones, plus what every route with a caller may
    answer: 400 (a key in the URL), 401 and 429."""
    return {
        status: {"description": PROBLEMS[status], "content": {"application/problem+json": {}}}
        for status in sorted({400, 401, *statuses, 429})
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
    "JobLanes": _link("/v1/jobs/{job_id}/lanes", "get"),
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
    "map": {
        "summary": "one task over many items: each essay graded, the grades as a list",
        "value": {
            "mode": "map",
            "items": [
                {"id": "essay-1", "text": "Rain is the sky's way of saying hello."},
                {"id": "essay-2", "text": "Cats rule the internet."},
            ],
            "task": {
                "model": "gpt-4o-mini",
                "messages": [{"role": "user", "content": "Grade 1-10: {{item.text}}"}],
            },
            "aggregate": {"kind": "collect"},
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
}
# Every route but the ops ones: an API key, or nothing on an open server. (Job-scoped
# reads also take the job's stream token, as their ``token`` query parameter.) Given
# once for the document, so that generated clients take an anonymous client too.
API_SECURITY: list[dict[str, list[str]]] = [{"bearer": []}, {}]


# --- the event stream --------------------------------------------------------------------

_STR, _INT, _NUM = {"type": "string"}, {"type": "integer"}, {"type": "number"}
_ANY: dict[str, Any] = {}
_ERROR = {"$ref": "#/components/schemas/ErrorView"}
_USAGE = {"$ref": "#/components/schemas/Usage"}
_LANE = {"lane": _INT, "name": _STR, "attempt": _INT}
_AGGREGATE = {"kind": {"type": "string", "enum": ["reduce", "judge"]}, "attempt": _INT}
# Each event's data fields beside job_id, seq and at: (required, optional).
EVENT_FIELDS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    EventType.JOB_QUEUED: ({"lanes": {"type": "array", "items": _STR}}, {}),
    EventType.JOB_RUNNING: ({}, {}),
    EventType.JOB_AGGREGATING: ({}, {}),
    EventType.LANE_STARTED: (_LANE, {}),
    EventType.LANE_RETRYING: ({**_LANE, "error": _STR, "retry_in_s": _NUM}, {}),
    EventType.LANE_SUCCEEDED: (
        {**_LANE, "output": _ANY, "usage": _USAGE, "duration_s": _NUM},
        {
            "answer": _ANY,
            "weight": _NUM,
            "note": _STR,
            "vote": {"$ref": "#/components/schemas/VoteStop"},
            "finish_reason": _STR,
            "tool_calls": {"type": "array", "items": {"type": "object"}},
            "refusal": _STR,
            "logprobs": {"$ref": "#/components/schemas/LogprobsSummary"},
        },
    ),
    EventType.LANE_FAILED: ({**_LANE, "error": _ERROR, "usage": _USAGE, "duration_s": _NUM}, {}),
    EventType.LANE_TIMED_OUT: (
        {**_LANE, "error": _ERROR, "usage": _USAGE, "duration_s": _NUM},
        {},
    ),
    EventType.LANE_CANCELLED: ({**_LANE, "error": _ERROR}, {}),
    EventType.LANE_SKIPPED: (_LANE, {}),
    EventType.LANE_DELTA: ({**_LANE, "text": _STR}, {}),
    EventType.AGGREGATE_STARTED: (_AGGREGATE, {}),
    EventType.AGGREGATE_RETRYING: (
        {**_AGGREGATE, "usage": _USAGE, "error": _STR, "retry_in_s": _NUM},
        {},
    ),
    EventType.AGGREGATE_SUCCEEDED: (
        {**_AGGREGATE, "usage": _USAGE},
        # A hierarchical reduce's group (group_size); a map's item judge.
        {"level": _INT, "group": _INT, "item": _INT},
    ),
    EventType.AGGREGATE_FAILED: ({**_AGGREGATE, "usage": _USAGE, "error": _ERROR}, {}),
    EventType.AGGREGATE_DELTA: ({**_AGGREGATE, "text": _STR}, {}),
    EventType.JOB_SUCCEEDED: (
        {"result": {"$ref": "#/components/schemas/ResultView"}, "usage": _USAGE},
        {},
    ),
    EventType.JOB_FAILED: ({"error": _ERROR, "usage": _USAGE}, {}),
    EventType.JOB_CANCELLED: ({"usage": _USAGE}, {}),
}
LIVE_ONLY = (EventType.LANE_DELTA, EventType.AGGREGATE_DELTA)
EVENTS_DESCRIPTION = (
    "`text/event-stream`: every event of the job after `Last-Event-ID` (or `after`), then "
    "live ones, until the final `job.succeeded`, `job.failed` or `job.cancelled`, after "
    "which the server closes the stream. Each frame has `id:` (the job's event sequence "
    "number), `event:` (its type) and `data:` (JSON: `job_id`, `seq`, `at` and the fields "
    "of its type, as the `JobEvent` schema lists them). The stream opens with `retry: "
    "2000`. Reconnect with `Last-Event-ID: <the last id seen>` to get every later event "
    "exactly once, in order; after the final event that answers `204` (stop). "
    "`lane.delta` and `aggregate.delta` are live only: no `id:`, never replayed."
)


def event_schemas() -> dict[str, Any]:
    """``JobEvent``: one frame of the stream, of any type; for each type, its frame
    (``Event_<type>``: ``id:``, ``event:`` and ``data:`` as the text they are) and what
    its ``data:`` holds once parsed as JSON (``EventData_<type>``)."""
    schemas: dict[str, Any] = {}
    frames: dict[str, str] = {}
    for kind, (required, optional) in EVENT_FIELDS.items():
        name = kind.replace(".", "_")
        live = kind in LIVE_ONLY
        schemas[f"EventData_{name}"] = {
            "type": "object",
            "required": ["job_id", "seq", "at", *required],
            "properties": {
                "job_id": _STR,
                "seq": {"type": "integer", "const": 0} if live else {**_INT, "minimum": 1},
                "at": {"type": "string", "format": "date-time"},
                **required,
                **optional,
            },
        }
        frames[str(kind)] = f"#/components/schemas/Event_{name}"
        schemas[f"Event_{name}"] = {
            "type": "object",
            "description": "live only: no `id:`" if live else "stored: its `id:` is its `seq`",
            "required": ["event", "data"] if live else ["id", "event", "data"],
            "properties": {
                **({} if live else {"id": {"type": "string", "pattern": "^[1-9][0-9]*$"}}),
                "event": {"type": "string", "const": str(kind)},
                "data": {
                    "type": "string",
                    "contentMediaType": "application/json",
                    "contentSchema": {"$ref": f"#/components/schemas/EventData_{name}"},
                },
            },
        }
    schemas["JobEvent"] = {
        "description": "One server-sent event: its `id:`, `event:` and `data:` lines.",
        "oneOf": [{"$ref": ref} for ref in frames.values()],
        "discriminator": {"propertyName": "event", "mapping": frames},
    }
    return schemas


def not_null(schema: dict[str, Any]) -> dict[str, Any]:
    """A parameter's schema without its ``null`` (``str | None = None`` in a route): a
    query parameter or header is sent or not, never null."""
    kinds = [kind for kind in schema.get("anyOf", []) if kind != {"type": "null"}]
    if len(kinds) != 1:
        return schema
    rest = {key: value for key, value in schema.items() if key != "anyOf"}
    return {**kinds[0], **rest}


def document(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """``app.openapi`` with what FastAPI cannot infer: every error is problem+json with the
    ``Problem`` schema (and its headers), every route but the ops ones takes an API key
    or none, parameters are never null, and the event stream and details are described."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = generate()
            components = document.setdefault("components", {})
            schemas = components.setdefault("schemas", {})
            for unused in ("HTTPValidationError", "ValidationError"):
                schemas.pop(unused, None)
            document["security"] = copy.deepcopy(API_SECURITY)
            for operations in document["paths"].values():
                for operation in operations.values():
                    if operation.get("tags") == ["ops"]:
                        operation["security"] = []  # open, or guarded by their own key
                    for parameter in operation.get("parameters", []):
                        parameter["schema"] = not_null(parameter["schema"])
                    for status, response in operation["responses"].items():
                        if status[0] in "45":
                            ref = {"$ref": "#/components/schemas/Problem"}
                            response["content"] = {PROBLEM_JSON: {"schema": ref}}
                            if status in ERROR_HEADERS:
                                response["headers"] = copy.deepcopy(ERROR_HEADERS[status])
            schemas["Problem"] = problem_schema()
            schemas.update(event_schemas())
            # A result's details, by aggregate kind (ResultView.details refers to them).
            for model in DETAILS:
                found = model.model_json_schema(
                    mode="serialization", ref_template="#/components/schemas/{model}"
                )
                schemas.update(found.pop("$defs", {}))
                schemas[model.__name__] = found
            components["securitySchemes"] = copy.deepcopy(SECURITY_SCHEMES)
            app.openapi_schema = document
        return app.openapi_schema

    return openapi
