"""What callers read back: the views of jobs and lanes, and :class:`Usage`.

Request models are in :mod:`service.spec`; these are built by the store from its rows.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from .states import JobStatus, LaneStatus, WebhookStatus

# A time as the API writes it: ISO 8601, UTC, milliseconds ("2026-12-04T10:00:00.123Z").
Time = Annotated[str, WithJsonSchema({"type": "string", "format": "date-time"})]


class View(BaseModel):
    """A response body: in the document, every field it always sends is required (null
    where it has no value), so generated clients need no "unset" for them."""

    model_config = ConfigDict(json_schema_serialization_defaults_required=True)


# Tokens used, and their cost: one value type everywhere (an attempt, a lane, a job),
# with ``+``. (No docstring: it would become the schema's description.) Reasoning tokens
# are part of the completion tokens and cached tokens part of the prompt tokens, as
# providers report them. ``cost_usd`` is absent, never 0, without prices.
class Usage(BaseModel):
    model_config = ConfigDict(frozen=True, json_schema_serialization_defaults_required=True)

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    reasoning_tokens: int = 0
    cached_tokens: int = 0
    cost_usd: float | None = Field(default=None, exclude_if=lambda cost: cost is None)

    def __add__(self, other: Usage) -> Usage:
        return Usage.sum((self, other))

    def __bool__(self) -> bool:
        return bool(self.total_tokens or self.prompt_tokens or self.completion_tokens) or (
            self.cost_usd is not None
        )

    @classmethod
    def sum(cls, usages: Any) -> Usage:
        """The usages added up (a cost is absent unless one of them has one), making one
        model for them all: a record batch sums an outcome's usage per lane."""
        prompt = completion = total = reasoning = cached = 0
        cost: float | None = None
        for usage in usages:
            prompt += usage.prompt_tokens
            completion += usage.completion_tokens
            total += usage.total_tokens
            reasoning += usage.reasoning_tokens
            cached += usage.cached_tokens
            if usage.cost_usd is not None:
                cost = usage.cost_usd if cost is None else cost + usage.cost_usd
        return cls.of(prompt, completion, total, reasoning, cached, cost)

    @classmethod
    def of(
        cls,
        prompt: int,
        completion: int,
        total: int,
        reasoning: int,
        cached: int,
        cost: float | None,
    ) -> Usage:
        """From counts already checked (summed here, or read from the store): made
        without validating them again."""
        return cls.model_construct(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=total,
            reasoning_tokens=reasoning,
            cached_tokens=cached,
            cost_usd=cost,
        )


NO_USAGE = Usage()


class ErrorView(View):
    type: str
    message: str


class LogprobsSummary(View):
    """The answer's token log probabilities in short: their mean, and how many."""

    mean: float
    tokens: int


class LaneView(View):
    index: int
    name: str
    status: LaneStatus
    attempts: int
    # An llm lane's text (null when it answered with tool calls only, or a refusal), or
    # an http lane's response.
    output: Any = None
    answer: Any = None
    # The weight of its vote (its confidence, when votes are weighted), and why it
    # abstained (a red flag) or weighs 1 (no logprobs), if so.
    weight: float | None = None
    note: str | None = None
    # Which of a mixed ensemble's tasks it ran (its index in ``tasks``).
    task: int | None = None
    finish_reason: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    refusal: str | None = None
    logprobs: LogprobsSummary | None = None
    error: ErrorView | None = None
    usage: Usage
    queued_at: Time | None = None
    started_at: Time | None = None
    finished_at: Time | None = None
    duration_s: float | None = None


# --- a result's details, by the aggregate's kind (what the document says they are) ---
# Plain models: a field with a default is sent only when it applies (weights, scores).
# (Forbidding other fields keeps them honest: the tests check real details against them.)


class Details(BaseModel):
    model_config = ConfigDict(extra="forbid")


class VoteCount(Details):
    answer: Any
    count: int
    weight: float | None = Field(default=None, description="weighted votes only")


class VoteStop(Details):
    """How a vote's stopping rule went (also each ``lane.succeeded`` event's ``vote``)."""

    rule: Literal["decided", "ahead_by", "window", "confidence", "none"]
    stopped: bool
    votes: int = Field(description="counted votes at the stop")
    of: int = Field(description="the vote's lanes")
    leader: Any
    confidence: float


class CollectDetails(Details):
    missing: list[str] = Field(description="sections without a result")


class MajorityDetails(Details):
    votes: list[VoteCount]
    winner_votes: int
    counted: int
    abstained: int
    agreement: float
    stop: VoteStop
    winner_weight: float | None = Field(default=None, description="weighted votes only")
    weighted_agreement: float | None = Field(default=None, description="weighted votes only")


class ScoreDetails(Details):
    scores: dict[str, Any] = Field(description="each scored lane's score, by lane name")
    pick: Literal["max", "min", "mean"]
    counted: int
    score: Any = None
    lane: str | None = Field(default=None, description="the picked lane (max, min)")


class ReduceDetails(Details):
    inputs: int = Field(description="the outputs the reducer read")
    levels: int | None = Field(default=None, description="group_size: the levels of reduces")


class JudgeDetails(Details):
    judge: str = Field(description="the judge's answer, as it came")
    best: int = Field(description="the candidate it named, from 1")
    lane: str
    candidates: int


class ItemWithoutResult(Details):
    index: int
    name: str
    status: LaneStatus
    error: ErrorView | None


class ItemsDetails(Details):
    """A map job's collected list."""

    items: list[ItemWithoutResult] = Field(description="the items without a result")
    votes: list[dict[str, Any]] | None = Field(
        default=None,
        description="per_item: each item's vote (its `name`, and a majority's or a score's "
        "details)",
    )


class MergeDetails(ItemsDetails):
    unreadable: list[str] = Field(description="items whose answer was not a list")
    elements: int = Field(description="elements read, before equal ones were merged")


DETAILS = (
    CollectDetails,
    MajorityDetails,
    ScoreDetails,
    ReduceDetails,
    JudgeDetails,
    ItemsDetails,
    MergeDetails,
)


class ResultView(View):
    output: Any = None
    details: Annotated[
        dict[str, Any],
        WithJsonSchema(
            {
                "description": "what the aggregate says of the result, by its kind; "
                "empty when a gate withheld the result (``blocked``)",
                "anyOf": [
                    *({"$ref": f"#/components/schemas/{model.__name__}"} for model in DETAILS),
                    {"type": "object", "maxProperties": 0},
                ],
            }
        ),
    ] = Field(default_factory=dict)
    partial: bool = False
    blocked: bool = False
    blocked_by: str | None = None


class WebhookAttempt(View):
    at: Time
    status_code: int | None = None
    error: str | None = None
    duration_s: float | None = None


class WebhookView(View):
    url: str
    status: WebhookStatus
    attempts: list[WebhookAttempt] = Field(default_factory=list)


class JobView(View):
    id: str
    status: JobStatus
    mode: Literal["voting", "sectioning", "map"]
    spec: Annotated[
        dict[str, Any],
        WithJsonSchema(
            {
                "description": "the spec as posted, with its defaults filled in",
                "oneOf": [
                    {"$ref": "#/components/schemas/VotingSpec"},
                    {"$ref": "#/components/schemas/SectioningSpec"},
                    {"$ref": "#/components/schemas/MapSpec"},
                ],
                "discriminator": {
                    "propertyName": "mode",
                    "mapping": {
                        "voting": "#/components/schemas/VotingSpec",
                        "sectioning": "#/components/schemas/SectioningSpec",
                        "map": "#/components/schemas/MapSpec",
                    },
                },
            }
        ),
    ]
    created_at: Time
    started_at: Time | None = None
    finished_at: Time | None = None
    progress: dict[str, int]
    lanes: list[LaneView]
    result: ResultView | None = None
    error: ErrorView | None = None
    usage: Usage
    metadata: dict[str, Any] = Field(default_factory=dict)
    webhook: WebhookView | None = None
    # Lets a browser read this job (its page, and its event stream, as ``?token=``)
    # without the API key in a URL; for a while (FANOUT_STREAM_TOKEN_TTL_S). Absent on
    # an open server.
    stream_token: str | None = None


def _never_null(schema: dict[str, Any]) -> None:
    """The schema of a field left out when it is None: its value's, without ``null``."""
    (kind,) = [kind for kind in schema.pop("anyOf") if kind != {"type": "null"}]
    schema.update(kind)


class JobSummary(View):
    id: str
    status: JobStatus
    mode: Literal["voting", "sectioning", "map"]
    created_at: Time
    finished_at: Time | None = None
    progress: dict[str, int]
    usage: Usage
    metadata: dict[str, Any] = Field(default_factory=dict)
    # Sent only when asked for (``GET /v1/jobs?results=true``: a page of big results is
    # big) and the job has one: never null, and not required, in the document.
    result: ResultView | None = Field(
        default=None,
        exclude_if=lambda result: result is None,
        description="with `results=true`: the result, once the job has succeeded",
        json_schema_extra=_never_null,
    )
    error: ErrorView | None = Field(
        default=None,
        exclude_if=lambda error: error is None,
        description="with `results=true`: why the job failed or was cancelled",
        json_schema_extra=_never_null,
    )


class JobPage(View):
    jobs: list[JobSummary]
    next_cursor: str | None = None


class LanePage(View):
    """A page of a job's lanes, in lane order (``GET /v1/jobs/{id}/lanes``)."""

    lanes: list[LaneView]
    next_cursor: str | None = None
