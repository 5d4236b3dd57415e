"""What callers post: job specs (request models only), and what a spec implies
(its lanes, their tasks, its failure policy).

Everything here is pure pydantic. Checks that need the server's configuration
(caps, known providers) live in :mod:`service.admission`, so the schema stays static;
what callers read back is in :mod:`service.views`.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)


class Strict(BaseModel):
    """Unknown fields are rejected so typos never pass silently."""

    model_config = ConfigDict(extra="forbid")


def _compiles(pattern: str) -> str:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"not a valid regular expression: {exc}") from None
    return pattern


# --- tasks -------------------------------------------------------------------------


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]]
    name: str | None = None


class LlmTask(Strict):
    """One OpenAI-compatible chat completion. Providers live in server configuration."""

    kind: Literal["llm"] = "llm"
    provider: str = "default"
    model: str = Field(min_length=1)
    messages: list[Message] = Field(min_length=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    response_format: dict[str, Any] | None = None
    stream: bool = False


class HttpTask(Strict):
    """One outbound HTTP call, allowed only to destinations that pass the egress guard."""

    kind: Literal["http"]
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"] = "GET"
    url: str = Field(min_length=1, max_length=4096)
    headers: dict[str, str] = Field(default_factory=dict)
    json_body: Any = Field(default=None, alias="json")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


def _task_kind(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("kind", "llm"))
    return str(getattr(value, "kind", "llm"))


Task = Annotated[
    Annotated[LlmTask, Tag("llm")] | Annotated[HttpTask, Tag("http")],
    Discriminator(_task_kind),
]


# --- aggregates --------------------------------------------------------------------


class Extracting(Strict):
    """How a lane's answer is read from its output (majority and score)."""

    extract: Literal["text", "number", "regex", "json"] = "text"
    pattern: str | None = None
    field: str | None = None

    @field_validator("pattern")
    @classmethod
    def _pattern_compiles(cls, value: str | None) -> str | None:
        return None if value is None else _compiles(value)

    @model_validator(mode="after")
    def _needs_its_parameter(self) -> Extracting:
        if self.extract == "regex" and not self.pattern:
            raise ValueError("extract 'regex' needs a 'pattern'")
        if self.extract == "json" and not self.field:
            raise ValueError("extract 'json' needs a 'field' (a dotted path)")
        return self


class CollectAggregate(Strict):
    kind: Literal["collect"] = "collect"


class MajorityAggregate(Extracting):
    kind: Literal["majority"] = "majority"
    early_stop: bool = True


class ScoreAggregate(Extracting):
    kind: Literal["score"] = "score"
    extract: Literal["text", "number", "regex", "json"] = "number"
    pick: Literal["max", "min", "mean"] = "max"


class ReduceAggregate(Strict):
    kind: Literal["reduce"] = "reduce"
    task: LlmTask


Aggregate = Annotated[
    CollectAggregate | MajorityAggregate | ScoreAggregate | ReduceAggregate,
    Field(discriminator="kind"),
]


# --- policy, sections, jobs --------------------------------------------------------


class OnFailure(StrEnum):
    FAIL_FAST = "fail_fast"
    BEST_EFFORT = "best_effort"
    QUORUM = "quorum"


class Policy(Strict):
    on_failure: OnFailure | None = None
    quorum: int | None = Field(default=None, ge=1)
    lane_timeout_s: float | None = Field(default=None, gt=0)
    deadline_s: float | None = Field(default=None, gt=0)
    max_attempts: int = Field(default=3, ge=1)
    max_concurrency: int | None = Field(default=None, ge=1)
    max_total_tokens: int | None = Field(default=None, ge=1)


class Webhook(Strict):
    url: str = Field(min_length=1, max_length=4096)


class Gate(Strict):
    block_if: str

    @field_validator("block_if")
    @classmethod
    def _compiles(cls, value: str) -> str:
        return _compiles(value)


class Section(Strict):
    name: str = Field(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$")
    task: Task
    gate: Gate | None = None


class _JobSpecBase(Strict):
    policy: Policy = Field(default_factory=Policy)
    webhook: Webhook | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)


class VotingSpec(_JobSpecBase):
    mode: Literal["voting"]
    n: int = Field(ge=1)
    task: Task
    aggregate: Aggregate = Field(default_factory=MajorityAggregate)


class SectioningSpec(_JobSpecBase):
    mode: Literal["sectioning"]
    sections: list[Section] = Field(min_length=1)
    aggregate: Aggregate = Field(default_factory=CollectAggregate)

    @field_validator("sections")
    @classmethod
    def _unique_names(cls, sections: list[Section]) -> list[Section]:
        seen: set[str] = set()
        for section in sections:
            if section.name in seen:
                raise ValueError(f"duplicate section name {section.name!r}")
            seen.add(section.name)
        return sections


JobSpec = Annotated[VotingSpec | SectioningSpec, Field(discriminator="mode")]


def lane_count(spec: VotingSpec | SectioningSpec) -> int:
    return spec.n if isinstance(spec, VotingSpec) else len(spec.sections)


def on_failure(spec: VotingSpec | SectioningSpec) -> OnFailure:
    """The failure policy, defaulting by mode (fail fast for sections, best effort for votes)."""
    if spec.policy.on_failure is not None:
        return spec.policy.on_failure
    return OnFailure.BEST_EFFORT if isinstance(spec, VotingSpec) else OnFailure.FAIL_FAST


def quorum_size(spec: VotingSpec | SectioningSpec) -> int:
    """Successful lanes a quorum job needs: as given, or a strict majority."""
    return spec.policy.quorum or lane_count(spec) // 2 + 1


def lane_task(spec: VotingSpec | SectioningSpec, i: int) -> tuple[str, LlmTask | HttpTask]:
    """Lane *i*'s name and task; voting lane *i* gets ``seed + i`` when a seed is given."""
    if isinstance(spec, SectioningSpec):
        section = spec.sections[i]
        return section.name, section.task
    task = spec.task
    if isinstance(task, LlmTask) and task.seed is not None:
        task = task.model_copy(update={"seed": task.seed + i})
    return f"lane-{i}", task


def lane_names(spec: VotingSpec | SectioningSpec) -> list[str]:
    if isinstance(spec, SectioningSpec):
        return [section.name for section in spec.sections]
    return [f"lane-{i}" for i in range(spec.n)]


def provider_name(task: LlmTask | HttpTask) -> str:
    """The provider a task calls (``http`` for http tasks), for capacity accounting."""
    return task.provider if isinstance(task, LlmTask) else "http"


def lane_providers(spec: VotingSpec | SectioningSpec) -> list[str]:
    """The provider each lane calls, in lane order."""
    if isinstance(spec, SectioningSpec):
        return [provider_name(section.task) for section in spec.sections]
    return [provider_name(spec.task)] * spec.n
