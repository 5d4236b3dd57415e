"""Map jobs through the API: one task over many items, each item put into the task's
messages, fanned back in as a list, merged, or reduced; and what a map spec gets
refused for."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from service.config import Settings
from tests.support import app_client, fake_last, mapping, run_job

ESSAYS = [
    {"id": "essay-1", "text": "Rain falls.", "author": {"name": "Ada"}},
    "A bare string item.",
    {"text": "No id here.", "author": {"name": "Grace"}},
]


async def test_each_item_is_a_lane_and_collect_lists_the_answers_in_item_order(
    client: httpx.AsyncClient,
) -> None:
    spec = mapping(["one", "two", "three"], "Item {{index}}: {{item}}")
    job = await run_job(client, spec)
    assert job["status"] == "succeeded" and job["mode"] == "map"
    assert [lane["name"] for lane in job["lanes"]] == ["item-0", "item-1", "item-2"]
    assert job["result"]["output"] == [
        "Echo: Item 0: one",
        "Echo: Item 1: two",
        "Echo: Item 2: three",
    ]
    assert job["result"]["details"] == {"items": []}
    assert job["spec"]["items"] == ["one", "two", "three"]  # stored as posted


async def test_an_object_items_fields_and_id_fill_the_task_and_name_its_lane(
    client: httpx.AsyncClient, fake_llm: str
) -> None:
    objects = [item for item in ESSAYS if isinstance(item, dict)]
    spec = mapping(objects, "Grade {{ item.text }} by {{item.author.name}}")
    job = await run_job(client, spec)
    assert [lane["name"] for lane in job["lanes"]] == ["essay-1", "item-1"]
    assert job["result"]["output"] == [
        "Echo: Grade Rain falls. by Ada",
        "Echo: Grade No id here. by Grace",
    ]
    # A whole object item is its JSON.
    job = await run_job(client, mapping(objects[:1], "{{item}}"))
    assert job["result"]["output"] == [
        'Echo: {"id": "essay-1", "text": "Rain falls.", "author": {"name": "Ada"}}'
    ]
    # Text parts get the item too; other parts are sent as they are.
    parts = [
        {"type": "text", "text": "Describe {{item.text}}"},
        {"type": "image_url", "image_url": {"url": "https://example.com/{{item.text}}.png"}},
    ]
    spec = {**mapping(objects[:1], ""), "task": {"model": "fake", "messages": []}}
    spec["task"]["messages"] = [{"role": "user", "content": parts}]
    await run_job(client, spec)
    sent = (await fake_last(fake_llm))["messages"][0]["content"]
    assert sent[0] == {"type": "text", "text": "Describe Rain falls."}
    assert sent[1]["image_url"]["url"] == "https://example.com/{{item.text}}.png"


async def test_merge_combines_the_items_lists_with_counts_and_sources(
    client: httpx.AsyncClient,
) -> None:
    items = [
        {"id": "a", "first": "Rain", "second": "sun"},
        {"id": "b", "first": "rain  ", "second": "Wind"},
    ]
    # The simulator echoes the message: "Echo: \n<first>\n<second>", one element a line.
    spec = mapping(
        items,
        "\n- {{item.first}}\n- {{item.second}}",
        aggregate={"kind": "merge", "extract": "lines"},
    )
    job = await run_job(client, spec)
    assert job["result"]["output"] == [
        {"value": "Echo:", "count": 2, "items": ["a", "b"]},
        {"value": "Rain", "count": 2, "items": ["a", "b"]},
        {"value": "sun", "count": 1, "items": ["a"]},
        {"value": "Wind", "count": 1, "items": ["b"]},
    ]
    assert job["result"]["details"] == {"items": [], "unreadable": [], "elements": 6}
    exact = await run_job(client, {**spec, "aggregate": {**spec["aggregate"], "dedupe": "exact"}})
    assert [entry["value"] for entry in exact["result"]["output"]] == [
        "Echo:",
        "Rain",
        "sun",
        "rain",
        "Wind",
    ]


async def test_reduce_reads_every_items_answer_tagged_with_its_name(
    client: httpx.AsyncClient,
) -> None:
    reducer = {
        "kind": "reduce",
        "task": {"model": "fake", "messages": [{"role": "user", "content": "Synthesise."}]},
    }
    job = await run_job(client, mapping(ESSAYS[:2], "Summarise: {{item}}", aggregate=reducer))
    assert job["status"] == "succeeded"
    output = job["result"]["output"]
    assert '<lane name="essay-1">' in output and '<lane name="item-1">' in output
    assert "Echo: Summarise: A bare string item." in output
    assert job["result"]["details"] == {"inputs": 2}


# --- refusals ---------------------------------------------------------------------------


@pytest.fixture
async def sqlite_client(sqlite_settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """Refusals store nothing: SQLite shows it."""
    async with app_client(sqlite_settings) as client:
        yield client


async def refused(client: httpx.AsyncClient, spec: dict[str, Any]) -> list[dict[str, Any]]:
    before = (await client.get("/v1/jobs")).json()["jobs"]
    response = await client.post("/v1/jobs", json=spec)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert (await client.get("/v1/jobs")).json()["jobs"] == before  # nothing stored
    return list(response.json()["errors"])


async def test_an_item_that_cannot_fill_a_placeholder_is_named_with_the_field(
    sqlite_client: httpx.AsyncClient,
) -> None:
    client = sqlite_client
    errors = await refused(client, mapping(ESSAYS, "Grade {{item.text}} by {{item.author.name}}"))
    assert [(e["loc"], e["msg"]) for e in errors] == [
        (["body", "items", 1], "item 1 (a string) has no value for {{item.text}} in the task"),
    ]
    errors = await refused(client, mapping(["a", "b"], "{{item.title}}"))
    assert [e["loc"] for e in errors] == [["body", "items", 0], ["body", "items", 1]]
    # Many at once: the first ten, and how many more.
    errors = await refused(client, mapping([{"x": 1}] * 25, "{{item.y}}"))
    assert len(errors) == 11 and errors[-1]["msg"] == "and 15 more items like these"


async def test_map_specs_that_cannot_run_are_refused_naming_the_field(
    sqlite_client: httpx.AsyncClient,
) -> None:
    client = sqlite_client
    cases: list[tuple[dict[str, Any], list[Any], str]] = [
        (mapping([], "{{item}}"), ["body", "items"], "at least 1 item"),
        (mapping([1, 2], "{{item}}"), ["body", "items", 0], "string"),
        (mapping([{"id": "x"}, {"id": "x"}], "{{item}}"), ["body", "items"], "duplicate id 'x'"),
        (
            mapping(["a"], "{{item}}", aggregate={"kind": "merge", "extract": "number"}),
            ["body", "aggregate", "extract"],
            "cannot yield a list",
        ),
        (
            mapping(["a"], "{{item}}", aggregate={"kind": "majority"}),
            ["body", "aggregate"],
            "majority",
        ),
        (
            mapping(["a"], "{{item}}", per_item={"n": 0}),
            ["body", "per_item", "n"],
            "greater than or equal to 1",
        ),
        (
            mapping(
                ["a"],
                "{{item}}",
                per_item={"n": 3, "aggregate": {"stop": {"rule": "ahead_by", "k": 4}}},
            ),
            ["body", "per_item", "aggregate", "stop", "k"],
            "k 4 is more than the 3 lanes",
        ),
        (
            mapping(
                ["a"],
                "{{item}}",
                aggregate={"kind": "reduce", "task": {"model": "fake", "messages": []}},
            ),
            ["body", "aggregate", "task", "messages"],
            "at least 1",
        ),
        (
            mapping(
                ["a"],
                "{{item}}",
                aggregate={
                    "kind": "reduce",
                    "group_size": 1,
                    "task": {"model": "fake", "messages": [{"role": "user", "content": "x"}]},
                },
            ),
            ["body", "aggregate", "group_size"],
            "greater than or equal to 2",
        ),
        (
            mapping(["a", "b"], "{{item}}", per_item={"n": 3}, policy={"quorum": 3}),
            ["body", "policy", "quorum"],
            "quorum 3 is larger than the 2 items",
        ),
    ]
    for spec, loc, why in cases:
        errors = await refused(client, spec)
        assert any(e["loc"][: len(loc)] == loc and why in e["msg"] for e in errors), (spec, errors)


async def test_more_items_than_the_cap_is_refused_naming_the_cap(
    sqlite_settings: Settings,
) -> None:
    async with app_client(sqlite_settings, max_lanes_per_job=3) as client:
        errors = await refused(client, mapping(["a", "b", "c", "d"], "{{item}}"))
        votes = await refused(client, mapping(["a", "b"], "{{item}}", per_item={"n": 2}))
    assert errors == [
        {"loc": ["body", "items"], "msg": "4 lanes is over the cap of 3 lanes per job"}
    ]
    message = "4 lanes (2 items of 2 votes) is over the cap of 3 lanes per job"
    assert votes == [{"loc": ["body", "items"], "msg": message}]


async def test_a_vote_per_item_stops_each_item_when_it_is_settled(
    client: httpx.AsyncClient,
) -> None:
    spec = mapping(
        ["7?", "also 7?", "and 7?"],
        "{{item}}",
        model="fake?answers=7",
        per_item={
            "n": 5,
            "aggregate": {
                "kind": "majority",
                "extract": "number",
                "stop": {"rule": "ahead_by", "k": 2},
            },
        },
        policy={"max_concurrency": 2},
    )
    job = await run_job(client, spec)
    assert job["status"] == "succeeded", (job["error"], [lane["error"] for lane in job["lanes"]])
    assert job["result"]["output"] == [7, 7, 7]
    by_item: dict[str, list[str]] = {}
    for lane in job["lanes"]:
        by_item.setdefault(lane["name"].split("/")[0], []).append(lane["status"])
    # Two agreeing votes settle an item: its other three lanes never run.
    assert by_item == {
        name: ["succeeded"] * 2 + ["skipped"] * 3 for name in ("item-0", "item-1", "item-2")
    }
    assert [vote["counted"] for vote in job["result"]["details"]["votes"]] == [2, 2, 2]
