"""What callers read back: the views of jobs and lanes, and :class:`Usage`.

Request models are in :mod:`service.spec`; these are built by the store from its rows.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .states import JobStatus, LaneStatus


# Tokens used, and their cost: one value type everywhere (an attempt, a lane, a job),
# with ``+``. (No docstring: it would become the schema's description.) Reasoning tokens
# are part of the completion tokens and cached tokens part of the prompt tokens, as
# providers report them. ``cost_usd`` is absent, never 0, without prices.
class Usage(BaseModel):
    model_config = ConfigDict(frozen=True)

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    reasoning_tokens: int = 0
    cached_tokens: int = 0
    cost_usd: float | None = Field(default=None, exclude_if=lambda cost: cost is None)

    def __add__(self, other: Usage) -> Usage:
        cost = self.cost_usd
        if other.cost_usd is not None:
            cost = other.cost_usd if cost is None else cost + other.cost_usd
        return Usage.model_construct(
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            completion_tokens=self.completion_tokens + other.completion_tokens,
            total_tokens=self.total_tokens + other.total_tokens,
            reasoning_tokens=self.reasoning_tokens + other.reasoning_tokens,
            cached_tokens=self.cached_tokens + other.cached_tokens,
            cost_usd=cost,
        )

    def __bool__(self) -> bool:
        return bool(self.total_tokens or self.prompt_tokens or self.completion_tokens) or (
            self.cost_usd is not None
        )

    @classmethod
    def sum(cls, usages: Any) -> Usage:
        total = NO_USAGE
        for usage in usages:
            total = total + usage
        return total


NO_USAGE = Usage()


class ErrorView(BaseModel):
    type: str
    message: str


class LogprobsSummary(BaseModel):
    """The answer's token log probabilities in short: their mean, and how many."""

    mean: float
    tokens: int


class LaneView(BaseModel):
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
    queued_at: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    duration_s: float | None = None


class ResultView(BaseModel):
    output: Any = None
    details: dict[str, Any] = Field(default_factory=dict)
    partial: bool = False
    blocked: bool = False
    blocked_by: str | None = None


class WebhookView(BaseModel):
    url: str
    # waiting (the job is not finished) | pending | delivered | failed
    status: str
    # One entry per delivery attempt: at, status_code, error, duration_s.
    attempts: list[dict[str, Any]] = Field(default_factory=list)


class JobView(BaseModel):
    id: str
    status: JobStatus
    mode: Literal["voting", "sectioning"]
    spec: dict[str, Any]
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
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


class JobSummary(BaseModel):
    id: str
    status: JobStatus
    mode: Literal["voting", "sectioning"]
    created_at: str
    finished_at: str | None = None
    progress: dict[str, int]
    usage: Usage
    metadata: dict[str, Any] = Field(default_factory=dict)


class JobPage(BaseModel):
    jobs: list[JobSummary]
    next_cursor: str | None = None
