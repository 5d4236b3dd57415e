"""Map jobs' pure rules: placeholders, lane names, and the fan-in (a list in item order,
merged lists)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from service.aggregate import LaneResult, conclude, list_answer, merge
from service.policy import Tally, decide
from service.spec import (
    MapSpec,
    MergeAggregate,
    MissingField,
    fill,
    item_name,
    lane_names,
    lane_task,
    on_failure,
)
from service.spec import OnFailure as Policy
from service.views import ItemsDetails, MergeDetails
from tests.support import mapping


def spec(items: list[Any], content: str, **fields: Any) -> MapSpec:
    return MapSpec.model_validate(mapping(items, content, model="m", **fields))


def test_placeholders_are_item_fields_and_index_and_nothing_else() -> None:
    item = {"text": "hi", "n": 3, "tags": ["a"], "deep": {"er": None}}
    assert fill("{{item.text}}/{{ item.n }}/{{item.tags}}", item, 7) == 'hi/3/["a"]'
    assert fill("{{index}}: {{item.deep.er}}", item, 7) == "7: null"
    # Other braces are text: prompts may hold templates of their own.
    assert fill("{{ user }} {{item.text | upper}} {item}", item, 0) == (
        "{{ user }} {{item.text | upper}} {item}"
    )
    # A value is put in as it is: never read again for placeholders.
    assert fill("{{item}}", "{{index}}", 5) == "{{index}}"
    with pytest.raises(MissingField) as missing:
        fill("{{item.deep.er.x}}", item, 0)
    assert missing.value.placeholder == "{{item.deep.er.x}}"


def test_an_items_id_names_its_lane_and_each_lane_gets_its_item() -> None:
    job = spec([{"id": "doc-1", "t": "x"}, {"id": 7, "t": "y"}, "z"], "{{index}} {{item}}")
    assert lane_names(job) == ["doc-1", "7", "item-2"]
    assert item_name("z", 2) == "item-2"
    assert item_name({"id": True}, 3) == "item-3"  # not an id: a flag
    name, task = lane_task(job, 2)
    assert name == "item-2" and task.messages[0].content == "2 z"
    assert job.task.messages[0].content == "{{index}} {{item}}"  # the spec's task is kept


def test_a_map_is_best_effort_unless_told() -> None:
    assert on_failure(spec(["a"], "x")) is Policy.BEST_EFFORT
    assert on_failure(spec(["a"], "x", policy={"on_failure": "fail_fast"})) is Policy.FAIL_FAST


@pytest.mark.parametrize(
    ("items", "why"),
    [
        ([{"id": "a"}, {"id": "a"}], "duplicate id 'a'"),
        ([{"id": ""}], "1 to 180 characters"),
        ([{"id": "x" * 181}], "1 to 180 characters"),
        ([{"id": "a\nb"}], "no control"),
        (["a", {"id": "item-0"}], "duplicate id 'item-0'"),
    ],
)
def test_item_ids_are_lane_names(items: list[Any], why: str) -> None:
    with pytest.raises(ValidationError, match=why):
        spec(items, "{{item}}")


def lane(index: int, name: str, status: str = "succeeded", output: Any = "x", answer: Any = None):
    error = None if status == "succeeded" else {"type": "upstream_error", "message": "HTTP 500"}
    return LaneResult(index, name, status, output, answer, error=error)


def test_collect_is_the_list_in_item_order_with_failed_items_null_and_named() -> None:
    lanes = [lane(0, "a", output="A"), lane(1, "b", "failed", None), lane(2, "c", output="C")]
    result = conclude(spec(["1", "2", "3"], "{{item}}"), lanes, partial=True).result
    assert result is not None
    assert result["output"] == ["A", None, "C"] and result["partial"] is True
    assert result["details"]["items"] == [
        {
            "index": 1,
            "name": "b",
            "status": "failed",
            "error": {"type": "upstream_error", "message": "HTTP 500"},
        }
    ]
    ItemsDetails.model_validate(result["details"])


def test_lists_are_read_as_json_at_a_field_or_as_lines() -> None:
    at_field = MergeAggregate(extract="json", field="themes")
    assert list_answer(at_field, '```json\n{"themes": ["a", 1]}\n```', None) == ["a", 1]
    assert list_answer(at_field, '{"themes": "a"}', None) is None  # not a list
    assert list_answer(MergeAggregate(), '["x"]', None) == ["x"]
    lines = MergeAggregate(extract="lines")
    assert list_answer(lines, "Themes:\n- rain\n* Sun \n2) wind\n\n", None) == [
        "Themes:",
        "rain",
        "Sun",
        "wind",
    ]
    with pytest.raises(ValidationError, match="cannot yield a list"):
        MergeAggregate.model_validate({"extract": "regex"})
    with pytest.raises(ValidationError, match="'field' is a parameter of extract 'json'"):
        MergeAggregate.model_validate({"extract": "lines", "field": "x"})


def test_merge_keeps_item_order_counts_each_element_and_names_its_items() -> None:
    lanes = [
        lane(0, "a", answer=["Rain", "sun", "rain"]),
        lane(1, "b", answer=None),  # answered no list
        lane(2, "c", "failed", None),
        lane(3, "d", answer=[" RAIN ", {"k": 1}, {"k": 1}]),
    ]
    output, details = merge(lanes, "normalized")
    assert output == [
        {"value": "Rain", "count": 3, "items": ["a", "d"]},
        {"value": "sun", "count": 1, "items": ["a"]},
        {"value": {"k": 1}, "count": 2, "items": ["d"]},
    ]
    assert details["unreadable"] == ["b"] and details["elements"] == 6
    assert [item["name"] for item in details["items"]] == ["c"]
    MergeDetails.model_validate(details)
    exact, _ = merge(lanes, "exact")
    assert [entry["value"] for entry in exact] == ["Rain", "sun", "rain", " RAIN ", {"k": 1}]


# --- a vote per item ------------------------------------------------------------------


def per_item(items: list[Any], n: int, aggregate: dict[str, Any], **fields: Any) -> MapSpec:
    return spec(items, "{{item}}", per_item={"n": n, "aggregate": aggregate}, **fields)


def test_each_item_runs_n_lanes_named_for_it_with_its_own_seeds() -> None:
    job = spec(["x", "y"], "{{item}}", per_item={"n": 3})
    job.task.seed = 10
    assert lane_names(job) == [
        "item-0/0",
        "item-0/1",
        "item-0/2",
        "item-1/0",
        "item-1/1",
        "item-1/2",
    ]
    name, task = lane_task(job, 4)
    assert name == "item-1/1" and task.messages[0].content == "y" and task.seed == 11
    weighted = per_item(["x"], 2, {"kind": "majority", "weight": "confidence"})
    assert lane_task(weighted, 1)[1].logprobs is True


def votes_of(answers: dict[str, int], open_lanes: int) -> Tally:
    listed = [(json.dumps(a), float(c), i) for i, (a, c) in enumerate(answers.items())]
    counted = sum(answers.values())
    statuses = {"succeeded": counted, "running": open_lanes}
    return Tally(counted + open_lanes, statuses, listed, counted=counted)


def test_each_items_vote_stops_on_its_own_and_only_its_lanes_are_skipped() -> None:
    job = per_item(["a", "b", "c"], 5, {"kind": "majority", "stop": {"rule": "ahead_by", "k": 2}})
    items = {0: votes_of({"7": 2}, 3), 1: votes_of({"7": 1, "8": 1}, 3), 2: votes_of({"9": 3}, 2)}
    job_tally = Tally(15, {"succeeded": 7, "running": 8}, items=items)
    decision = decide(job, job_tally)
    assert [stop.lanes for stop in decision.stops] == [(0, 5), (10, 15)]
    assert all(stop.status == "skipped" for stop in decision.stops)
    assert decision.outcome is None  # item 1 still votes
    # When the last open item stops, the job concludes in the same decision.
    items[1] = votes_of({"7": 3}, 2)
    decision = decide(job, Tally(15, {"succeeded": 9, "running": 6}, items=items))
    assert decision.outcome == "aggregate"


def voted(index: int, name: str, answer: Any, status: str = "succeeded") -> LaneResult:
    error = None if status == "succeeded" else {"type": "upstream_error", "message": "HTTP 500"}
    return LaneResult(index, name, status, f"Answer: {answer}", answer, error=error)


def test_an_items_answer_is_its_votes_winner_and_the_list_says_how_each_vote_went() -> None:
    job = per_item(["a", "b"], 3, {"kind": "majority", "extract": "number"})
    lanes = [
        voted(0, "item-0/0", 7),
        voted(1, "item-0/1", 7),
        voted(2, "item-0/2", 8),
        voted(3, "item-1/0", None, "failed"),
        voted(4, "item-1/1", 5),
        voted(5, "item-1/2", None, "skipped"),
    ]
    result = conclude(job, lanes, partial=True).result
    assert result is not None and result["output"] == [7, 5]
    assert [(v["name"], v["winner_votes"], v["agreement"]) for v in result["details"]["votes"]] == [
        ("item-0", 2, 0.6667),
        ("item-1", 1, 1.0),
    ]
    assert result["details"]["items"] == [] and result["partial"] is True
    ItemsDetails.model_validate(result["details"])


def test_a_score_per_item_is_the_mean_of_its_evaluators() -> None:
    job = per_item(["a", "b"], 2, {"kind": "score", "pick": "mean"})
    lanes = [voted(0, "a/0", 6), voted(1, "a/1", 7), voted(2, "b/0", 9), voted(3, "b/1", 10)]
    result = conclude(job, lanes, partial=False).result
    assert result is not None and result["output"] == [6.5, 9.5]


@pytest.mark.parametrize(
    ("policy", "status", "why"),
    [
        ({}, "succeeded", None),  # best effort: a partial list
        ({"on_failure": "fail_fast"}, "failed", "item 'item-1' has no answer: HTTP 500"),
        ({"quorum": 2}, "failed", "1 items have an answer, fewer than the quorum of 2"),
        ({"quorum": 1}, "succeeded", None),
    ],
)
def test_the_failure_policy_is_about_items(
    policy: dict[str, Any], status: str, why: str | None
) -> None:
    job = per_item(["a", "b"], 2, {"kind": "majority"}, policy=policy)
    lanes = [
        voted(0, "item-0/0", "x"),
        voted(1, "item-0/1", "x"),
        voted(2, "item-1/0", None, "failed"),
        voted(3, "item-1/1", None, "failed"),
    ]
    conclusion = conclude(job, lanes, partial=True)
    assert conclusion.status == status
    if why is None:
        assert conclusion.result is not None and conclusion.result["output"] == ["x", None]
        assert conclusion.result["details"]["items"][0]["error"]["message"] == "HTTP 500"
    else:
        assert conclusion.error is not None and conclusion.error["message"] == why
