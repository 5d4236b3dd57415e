"""Map jobs' pure rules: placeholders, lane names, and the fan-in (a list in item order,
merged lists)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from service.aggregate import LaneResult, conclude, list_answer, merge
from service.spec import (
    MapSpec,
    MergeAggregate,
    MissingField,
    fill,
    item_name,
    lane_names,
    lane_task,
    on_failure,
    placeholders,
)
from service.spec import OnFailure as Policy
from service.views import ItemsDetails, MergeDetails


def spec(items: list[Any], content: str, **fields: Any) -> MapSpec:
    task = {"model": "m", "messages": [{"role": "user", "content": content}]}
    return MapSpec.model_validate({"mode": "map", "items": items, "task": task, **fields})


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
    name, task = lane_task(job, 2)
    assert name == "item-2" and task.messages[0].content == "2 z"
    assert placeholders(job.task) == ["{{index}}", "{{item}}"]
    assert job.task.messages[0].content == "{{index}} {{item}}"  # the spec's task is kept


def test_a_map_is_best_effort_unless_told() -> None:
    assert on_failure(spec(["a"], "x")) is Policy.BEST_EFFORT
    assert on_failure(spec(["a"], "x", policy={"on_failure": "fail_fast"})) is Policy.FAIL_FAST


@pytest.mark.parametrize(
    ("items", "why"),
    [
        ([{"id": "a"}, {"id": "a"}], "duplicate id 'a'"),
        ([{"id": ""}], "1 to 200 characters"),
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
