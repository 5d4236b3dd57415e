"""What callers post: job specs (request models only), and what a spec implies
(its lanes, their tasks, its failure policy).

Everything here is pure pydantic. Checks that need the server's configuration
(caps, known providers) live in :mod:`service.admission`, so the schema stays static;
what callers read back is in :mod:`service.views`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from enum import StrEnum
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
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


class ToolCallFunction(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str = Field(min_length=1)
    arguments: str


class ToolCall(BaseModel):
    """A tool call an assistant message made (as the chat-completions API shows it)."""

    model_config = ConfigDict(extra="allow")

    id: str = Field(min_length=1)
    type: str = "function"
    function: ToolCallFunction


class Message(Strict):
    """A chat message in the API's full shape: text or content parts, an assistant's
    tool calls (or refusal), a tool's answer to one of them."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(default=None, min_length=1)
    tool_call_id: str | None = Field(default=None, min_length=1)
    refusal: str | None = None

    @model_validator(mode="after")
    def _shape_fits_the_role(self) -> Message:
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only an assistant message has tool_calls")
        if self.refusal is not None and self.role != "assistant":
            raise ValueError("only an assistant message has a refusal")
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("a tool message needs the tool_call_id it answers")
        if self.tool_call_id is not None and self.role != "tool":
            raise ValueError("only a tool message has a tool_call_id")
        if self.content is None and not (self.tool_calls or self.refusal is not None):
            raise ValueError("content is required (an assistant may give tool_calls instead)")
        return self


class ContentPart(BaseModel):
    """A part of a message's content (``text``, ``image_url``, ``input_audio``,
    ``file``...), passed on as it is."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(min_length=1)


class Tool(BaseModel):
    """A tool the model may call (``{"type": "function", "function": {...}}``, or a
    provider's own kind), passed on as it is."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(min_length=1)


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str = Field(min_length=1)


# Fields of the chat-completions request that Fanout sets itself, and why.
OWNED_FIELDS = {
    "n": "lanes are Fanout's samples: ask for more with a voting job's n",
    "stream_options": "Fanout sets stream_options itself, to read the usage of a stream",
}
# What extra_body may not override: the task's own identity and Fanout's fields.
_NOT_EXTRA = ("model", "messages", "stream", *OWNED_FIELDS)


class LlmTask(Strict):
    """One OpenAI-compatible chat completion. Providers live in server configuration.

    Every per-call field of the chat-completions request is accepted, checked for its
    type and sent as it is; ``extra_body`` is merged into the request for a provider's
    own fields (vLLM's ``guided_json``, ``top_k``...), as the openai client does."""

    kind: Literal["llm"] = "llm"
    provider: str = "default"
    model: str = Field(min_length=1)
    messages: list[Message] = Field(min_length=1)
    temperature: StrictFloat | None = Field(default=None, ge=0, le=2)
    top_p: StrictFloat | None = Field(default=None, ge=0, le=1)
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)
    seed: StrictInt | None = None
    stop: str | list[str] | None = None
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: StrictBool | None = None
    reasoning_effort: str | None = Field(default=None, min_length=1)
    verbosity: str | None = Field(default=None, min_length=1)
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = Field(default=None, ge=0, le=20)
    presence_penalty: StrictFloat | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: StrictFloat | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, StrictInt] | None = None
    user: str | None = None
    service_tier: str | None = Field(default=None, min_length=1)
    prediction: dict[str, Any] | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    stream: bool = False
    extra_body: dict[str, Any] | None = None

    @field_validator("logit_bias")
    @classmethod
    def _biases_in_range(cls, value: dict[str, int] | None) -> dict[str, int] | None:
        for token, bias in (value or {}).items():
            if not -100 <= bias <= 100:
                raise ValueError(f"the bias of token {token!r} is {bias}, not from -100 to 100")
        return value

    @field_validator("extra_body")
    @classmethod
    def _extras_are_extras(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        taken = sorted(set(value or {}) & set(_NOT_EXTRA))
        if taken:
            raise ValueError(
                f"extra_body may not set {', '.join(taken)}: the task's own fields (or "
                "Fanout's) say what they are"
            )
        return value

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> LlmTask:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def request(self, messages: list[Message] | None = None) -> dict[str, Any]:
        """The chat-completions request body, as sent to the provider (streaming aside):
        every field given, then ``extra_body`` merged in. ``messages`` replaces the
        task's own (the reducer's prompt)."""
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [
                m.model_dump(mode="json", exclude_none=True) for m in (messages or self.messages)
            ],
        }
        for name, value in self.__dict__.items():
            if value is not None and name not in _NOT_SENT:
                body[name] = _plain(value)
        if self.extra_body:
            body.update(self.extra_body)
        return body


# Task fields that are not request fields (or are sent another way).
_NOT_SENT = frozenset({"kind", "provider", "model", "messages", "stream", "extra_body"})


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", exclude_none=True)
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


class HttpTask(Strict):
    """One outbound HTTP call, allowed only to destinations that pass the egress guard."""

    kind: Literal["http"]
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"] = "GET"
    url: str = Field(min_length=1, max_length=4096)
    headers: dict[str, str] = Field(default_factory=dict)
    json_body: Any = Field(default=None, alias="json")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


def kind_or(default: str) -> Callable[[Any], str]:
    """A union's discriminator: a value's ``kind``, ``default`` when it gives none."""

    def kind(value: Any) -> str:
        if isinstance(value, dict):
            return str(value.get("kind", default))
        return str(getattr(value, "kind", default))

    return kind


Task = Annotated[
    Annotated[LlmTask, Tag("llm")] | Annotated[HttpTask, Tag("http")],
    Discriminator(kind_or("llm")),
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


class StopRule(Strict):
    """When a vote has enough lanes to stop (the lanes still open are then skipped):

    - ``decided``: no outcome of the open lanes can change the winner (exact);
    - ``ahead_by``: the leader has ``k`` more votes than the runner-up;
    - ``window``: the last ``size`` counted votes, in the order they were recorded, are
      one answer;
    - ``confidence``: the probability that the leader is the majority answer of the
      model's answers, under a Beta posterior over the leader's and the runner-up's
      shares, reaches ``confidence``;
    - ``none``: every lane runs.

    No rule stops a vote before ``min_votes`` counted votes."""

    rule: Literal["decided", "ahead_by", "window", "confidence", "none"]
    k: int | None = Field(default=None, ge=1)
    size: int | None = Field(default=None, ge=2)
    confidence: float | None = Field(default=None, gt=0.5, lt=1)
    min_votes: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _has_its_parameter(self) -> StopRule:
        needs = {"ahead_by": "k", "window": "size", "confidence": "confidence"}
        for rule, name in needs.items():
            if self.rule == rule and getattr(self, name) is None:
                raise ValueError(f"the {rule!r} rule needs {name!r}")
            if self.rule != rule and getattr(self, name) is not None:
                raise ValueError(f"{name!r} is a parameter of the {rule!r} rule only")
        return self


class MajorityAggregate(Extracting):
    """A vote. ``early_stop`` is the short form of ``stop`` (true: ``decided``, false:
    ``none``; without either, ``decided``); ``weight: "confidence"`` weights each vote by
    the lane's confidence (from its tokens' log probabilities); an answer matching
    ``reject_if``, or longer than ``max_answer_chars``, is an abstention."""

    kind: Literal["majority"] = "majority"
    # None, not True, by default: a spec stored without the fields left at None
    # (``exclude_none``) must parse again with ``stop`` alone.
    early_stop: bool | None = None
    stop: StopRule | None = None
    weight: Literal["confidence"] | None = None
    reject_if: str | None = None
    max_answer_chars: int | None = Field(default=None, ge=1)

    @field_validator("reject_if")
    @classmethod
    def _reject_compiles(cls, value: str | None) -> str | None:
        return None if value is None else _compiles(value)

    @model_validator(mode="after")
    def _one_way_to_stop(self) -> MajorityAggregate:
        if self.stop is not None and self.early_stop is not None:
            raise ValueError("give early_stop or stop, not both")
        return self

    @property
    def stop_rule(self) -> StopRule:
        """The stopping rule, early_stop read as ``decided`` or ``none``."""
        if self.stop is not None:
            return self.stop
        return StopRule(rule="none" if self.early_stop is False else "decided")


class ScoreAggregate(Extracting):
    kind: Literal["score"] = "score"
    extract: Literal["text", "number", "regex", "json"] = "number"
    pick: Literal["max", "min", "mean"] = "max"


class ReduceAggregate(Strict):
    """One more LLM call (``task``) over every lane's output. With ``group_size`` k it
    reduces hierarchically: groups of k outputs, then groups of those results, until
    one call reads k or fewer."""

    kind: Literal["reduce"] = "reduce"
    task: LlmTask
    group_size: int | None = Field(default=None, ge=2)


class JudgeAggregate(Strict):
    """One more LLM call (``task``, durable and retried like the reducer's) that reads
    the successful candidates, numbered in lane order, and names the best: a JSON
    ``{"best": k}`` or the last integer of its text. The result is that lane's output."""

    kind: Literal["judge"] = "judge"
    task: LlmTask


class MergeAggregate(Strict):
    """Map jobs: the lists the items answered, merged without an LLM call. Each item's
    answer is read as a list (``json``: a JSON array, the whole answer or at ``field``;
    ``lines``: its non-empty lines, list markers dropped); the elements are merged in
    item order, equal ones (``exact``, or ``normalized``: case and whitespace aside) once,
    each with its count and the items it came from."""

    kind: Literal["merge"] = "merge"
    extract: Literal["json", "lines"] = "json"
    field: str | None = Field(default=None, description="json: a dotted path to the list")
    dedupe: Literal["exact", "normalized"] = "normalized"

    @field_validator("extract", mode="before")
    @classmethod
    def _yields_a_list(cls, value: Any) -> Any:
        if value in ("text", "number", "regex"):
            raise ValueError(
                f"extract {value!r} cannot yield a list: use 'json' (a JSON array) or 'lines'"
            )
        return value

    @model_validator(mode="after")
    def _field_is_for_json(self) -> MergeAggregate:
        if self.field is not None and self.extract != "json":
            raise ValueError("'field' is a parameter of extract 'json' only")
        return self


Aggregate = Annotated[
    CollectAggregate | MajorityAggregate | ScoreAggregate | ReduceAggregate | JudgeAggregate,
    Field(discriminator="kind"),
]
# A map job's fan-in: the items' answers as a list, merged, or reduced by one more call.
MapAggregate = Annotated[
    CollectAggregate | ReduceAggregate | MergeAggregate, Field(discriminator="kind")
]


# --- policy, sections, jobs --------------------------------------------------------


class OnFailure(StrEnum):
    FAIL_FAST = "fail_fast"
    BEST_EFFORT = "best_effort"
    QUORUM = "quorum"


class Policy(Strict):
    on_failure: OnFailure | None = Field(
        default=None,
        description="when not given: 'quorum' if `quorum` is, else 'fail_fast' for "
        "sections and 'best_effort' for votes",
    )
    quorum: int | None = Field(
        default=None,
        ge=1,
        description="successful lanes a quorum job needs (default: a strict majority); "
        "implies on_failure 'quorum', and any other on_failure with it is refused",
    )
    lane_timeout_s: float | None = Field(default=None, gt=0)
    deadline_s: float | None = Field(default=None, gt=0)
    max_attempts: int = Field(default=3, ge=1)
    max_concurrency: int | None = Field(default=None, ge=1)
    max_total_tokens: int | None = Field(default=None, ge=1)
    max_cost_usd: float | None = Field(default=None, gt=0)


class Webhook(Strict):
    url: str = Field(min_length=1, max_length=4096)


class Gate(Strict):
    block_if: str

    @field_validator("block_if")
    @classmethod
    def _compiles(cls, value: str) -> str:
        return _compiles(value)


# A lane's name: a section's, or an item's id (and "/<k>" for its votes).
LANE_NAME_PATTERN = r"^[^\x00-\x1f\x7f]+$"


class Section(Strict):
    name: str = Field(min_length=1, max_length=200, pattern=LANE_NAME_PATTERN)
    task: Task
    gate: Gate | None = None


class _JobSpecBase(Strict):
    policy: Policy = Field(default_factory=Policy)
    webhook: Webhook | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)


class VotingSpec(_JobSpecBase):
    """The same task ``n`` times; or a mixed ensemble: ``tasks`` (models, providers,
    prompts or temperatures voting together), lane i running ``tasks[i % len(tasks)]``."""

    mode: Literal["voting"]
    n: int = Field(ge=1)
    task: Task | None = None
    tasks: list[Task] | None = Field(default=None, min_length=1)
    aggregate: Aggregate = Field(default_factory=MajorityAggregate)

    @model_validator(mode="after")
    def _task_or_tasks(self) -> VotingSpec:
        if (self.task is None) == (self.tasks is None):
            raise ValueError("give task or tasks (a list), one of them")
        return self

    @property
    def ensemble(self) -> list[LlmTask | HttpTask]:
        """The tasks the lanes take turns with (one, unless ``tasks``)."""
        return self.tasks if self.tasks is not None else [self.task]  # type: ignore[list-item]


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


class PerItem(Strict):
    """Each item of a map as its own vote: ``n`` lanes, and how the item's answer is
    decided from them (a majority, with its stopping rule and weights, a score, or a
    judge: one more call per item that names the best of its lanes' outputs)."""

    n: int = Field(ge=1)
    aggregate: Annotated[
        Annotated[MajorityAggregate, Tag("majority")]
        | Annotated[ScoreAggregate, Tag("score")]
        | Annotated[JudgeAggregate, Tag("judge")],
        Discriminator(kind_or("majority")),
    ] = Field(default_factory=MajorityAggregate)

    @property
    def judged(self) -> bool:
        """Whether a judge call decides each item (after its lanes, before the fan-in)."""
        return isinstance(self.aggregate, JudgeAggregate)


class MapSpec(_JobSpecBase):
    """One task over many items: lane *i* runs ``task`` with item *i* put into its
    placeholders (:func:`fill`). An object item's ``id`` names its lane. With
    ``per_item``, each item is a vote of ``per_item.n`` lanes (item *i*'s are lanes
    ``i*n`` to ``i*n + n - 1``, named ``<item>/<k>``)."""

    mode: Literal["map"]
    items: list[StrictStr | dict[str, Any]] = Field(
        min_length=1, description="strings or JSON objects; an object's `id` names its lane"
    )
    task: LlmTask
    per_item: PerItem | None = None
    aggregate: MapAggregate = Field(default_factory=CollectAggregate)

    @property
    def votes(self) -> int:
        """Lanes an item runs: ``per_item.n``, or 1."""
        return self.per_item.n if self.per_item is not None else 1

    @field_validator("items")
    @classmethod
    def _ids_name_lanes(cls, items: list[str | dict[str, Any]]) -> list[str | dict[str, Any]]:
        seen: set[str] = set()
        for index, item in enumerate(items):
            name = item_name(item, index)
            if not name or len(name) > MAX_ITEM_ID or _CONTROL.search(name):
                raise ValueError(
                    f"item {index}: an id is 1 to {MAX_ITEM_ID} characters, no control ones"
                )
            if name in seen:
                raise ValueError(f"item {index}: duplicate id {name!r}")
            seen.add(name)
        return items


JobSpec = Annotated[VotingSpec | SectioningSpec | MapSpec, Field(discriminator="mode")]

# The tags of the unions a spec holds (pydantic names them in an error's location).
TASK_KINDS = frozenset({"llm", "http"})
AGGREGATE_KINDS = frozenset(
    member.model_fields["kind"].default
    for union in (Aggregate, MapAggregate)
    for member in get_args(get_args(union)[0])
)
MODES = frozenset(
    get_args(member.model_fields["mode"].annotation)[0] for member in get_args(get_args(JobSpec)[0])
)


# --- map: an item put into the task ------------------------------------------------

# {{item}}, {{item.a.b}} (a dotted path into an object item) and {{index}}; any other
# {{...}} is text. Plain replacement: nothing in an item or a task is ever evaluated.
PLACEHOLDER = re.compile(r"\{\{\s*(index|item(?:\.[^\s{}.]+)*)\s*\}\}")
# A lane name is 200 characters at most: an item's id, and "/<k>" for its votes.
MAX_ITEM_ID = 180
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def item_name(item: str | dict[str, Any], index: int) -> str:
    """An item's lane name: its ``id`` (an object's), else ``item-<index>``."""
    found = item.get("id") if isinstance(item, dict) else None
    if isinstance(found, str | int) and not isinstance(found, bool):
        return str(found)
    return f"item-{index}"


class MissingField(ValueError):
    def __init__(self, placeholder: str) -> None:
        super().__init__(placeholder)
        self.placeholder = placeholder


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def fill(text: str, item: str | dict[str, Any], index: int) -> str:
    """``text`` with its placeholders replaced by the item's values; raises
    :class:`MissingField` naming a placeholder the item cannot fill."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        if name == "index":
            return str(index)
        found: Any = item
        for part in name.split(".")[1:]:
            if not isinstance(found, dict) or part not in found:
                raise MissingField("{{" + name + "}}")
            found = found[part]
        return _as_text(found)

    return PLACEHOLDER.sub(value, text)


def task_texts(task: LlmTask) -> list[str]:
    """The message contents and text parts of a task: where placeholders may be."""
    found: list[str] = []
    for message in task.messages:
        if isinstance(message.content, str):
            found.append(message.content)
        elif message.content is not None:
            for part in message.content:
                text = (part.model_extra or {}).get("text")
                if part.type == "text" and isinstance(text, str):
                    found.append(text)
    return found


def item_task(task: LlmTask, item: str | dict[str, Any], index: int) -> LlmTask:
    """The task with the item in its message contents and text parts (a message without
    a placeholder is the task's own, not a copy)."""

    def part(content: ContentPart) -> ContentPart:
        text = (content.model_extra or {}).get("text")
        if content.type != "text" or not isinstance(text, str):
            return content
        return content.model_copy(update={"text": fill(text, item, index)})

    messages = []
    for message in task.messages:
        if isinstance(message.content, str) and PLACEHOLDER.search(message.content):
            content: Any = fill(message.content, item, index)
        elif isinstance(message.content, list) and any(
            PLACEHOLDER.search(str((p.model_extra or {}).get("text", ""))) for p in message.content
        ):
            content = [part(p) for p in message.content]
        else:
            messages.append(message)
            continue
        messages.append(message.model_copy(update={"content": content}))
    return task.model_copy(update={"messages": messages})


def stored(spec: JobSpec) -> dict[str, Any]:
    """The spec as it is stored and shown: JSON, without the fields left at None. Any
    process parses it back into the same spec."""
    return spec.model_dump(mode="json", by_alias=True, exclude_none=True)


def lane_count(spec: JobSpec) -> int:
    if isinstance(spec, MapSpec):
        return len(spec.items) * spec.votes
    return spec.n if isinstance(spec, VotingSpec) else len(spec.sections)


def on_failure(spec: JobSpec) -> OnFailure:
    """The failure policy: as given, or quorum when a quorum is, or by mode (fail fast for
    sections, best effort for votes)."""
    if spec.policy.on_failure is not None:
        return spec.policy.on_failure
    if spec.policy.quorum is not None:
        return OnFailure.QUORUM
    return OnFailure.FAIL_FAST if isinstance(spec, SectioningSpec) else OnFailure.BEST_EFFORT


def voters(spec: JobSpec) -> int:
    """What the failure policy counts: lanes, or a per-item map's items."""
    if isinstance(spec, MapSpec) and spec.per_item is not None:
        return len(spec.items)
    return lane_count(spec)


def quorum_size(spec: JobSpec) -> int:
    """Successful lanes (a per-item map's items with an answer) a quorum job needs: as
    given, or a strict majority."""
    return spec.policy.quorum or voters(spec) // 2 + 1


def lane_task(spec: JobSpec, i: int) -> tuple[str, LlmTask | HttpTask]:
    """Lane *i*'s name and task: voting lane *i* runs ``tasks[i % len(tasks)]``, with
    ``seed + i`` when a seed is given, and asks for logprobs when its votes are
    weighted by confidence."""
    if isinstance(spec, SectioningSpec):
        section = spec.sections[i]
        return section.name, section.task
    if isinstance(spec, MapSpec):
        index, k = divmod(i, spec.votes)
        item = spec.items[index]
        task = item_task(spec.task, item, index)
        if spec.per_item is None:
            return item_name(item, index), task
        return f"{item_name(item, index)}/{k}", _voter(task, k, spec.per_item.aggregate)
    ensemble = spec.ensemble
    return f"lane-{i}", _voter(ensemble[i % len(ensemble)], i, spec.aggregate)


def _voter(task: LlmTask | HttpTask, k: int, aggregate: Any) -> LlmTask | HttpTask:
    """A vote's lane *k*: ``seed + k`` when a seed is given, and logprobs asked for when
    the votes are weighted by confidence."""
    if not isinstance(task, LlmTask):
        return task
    update: dict[str, Any] = {}
    if task.seed is not None:
        update["seed"] = task.seed + k
    if isinstance(aggregate, MajorityAggregate) and aggregate.weight and not task.logprobs:
        update["logprobs"] = True
    return task.model_copy(update=update) if update else task


def lane_names(spec: JobSpec) -> list[str]:
    if isinstance(spec, SectioningSpec):
        return [section.name for section in spec.sections]
    if isinstance(spec, MapSpec):
        names = [item_name(item, i) for i, item in enumerate(spec.items)]
        if spec.per_item is None:
            return names
        return [f"{name}/{k}" for name in names for k in range(spec.per_item.n)]
    return [f"lane-{i}" for i in range(spec.n)]


def provider_name(task: LlmTask | HttpTask) -> str:
    """The provider a task calls (``http`` for http tasks), for capacity accounting."""
    return task.provider if isinstance(task, LlmTask) else "http"


def lane_providers(spec: JobSpec) -> list[str]:
    """The provider each lane calls, in lane order."""
    if isinstance(spec, SectioningSpec):
        return [provider_name(section.task) for section in spec.sections]
    if isinstance(spec, MapSpec):
        return [provider_name(spec.task)] * lane_count(spec)
    ensemble = spec.ensemble
    return [provider_name(ensemble[i % len(ensemble)]) for i in range(spec.n)]
