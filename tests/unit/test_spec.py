"""What a spec implies: its lanes, their names and tasks, its failure policy."""

from __future__ import annotations

from typing import Any

import pytest

from service.spec import (
    LlmTask,
    OnFailure,
    SectioningSpec,
    VotingSpec,
    lane_names,
    lane_task,
    on_failure,
    provider_name,
    quorum_size,
)

TASK: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def voting(n: int, **fields: Any) -> VotingSpec:
    return VotingSpec.model_validate({"mode": "voting", "n": n, "task": TASK, **fields})


def test_voting_lanes_are_named_by_index_and_seeded_seed_plus_index() -> None:
    spec = voting(3, task={**TASK, "seed": 100})
    assert lane_names(spec) == ["lane-0", "lane-1", "lane-2"]
    seeds = []
    for i in range(3):
        name, task = lane_task(spec, i)
        assert name == f"lane-{i}" and isinstance(task, LlmTask)
        seeds.append(task.seed)
    assert seeds == [100, 101, 102]
    assert spec.task.seed == 100  # the spec itself is left as it was


def test_voting_lanes_without_a_seed_stay_unseeded() -> None:
    _name, task = lane_task(voting(2), 1)
    assert isinstance(task, LlmTask) and task.seed is None


def test_sections_keep_their_names_and_tasks() -> None:
    sections = [
        {"name": "draft", "task": TASK},
        {"name": "stock", "task": {"kind": "http", "url": "https://x.example"}},
    ]
    spec = SectioningSpec.model_validate({"mode": "sectioning", "sections": sections})
    assert lane_names(spec) == ["draft", "stock"]
    assert [provider_name(lane_task(spec, i)[1]) for i in range(2)] == ["default", "http"]


@pytest.mark.parametrize(
    ("spec", "policy"),
    [
        (voting(3), OnFailure.BEST_EFFORT),
        (
            SectioningSpec.model_validate(
                {"mode": "sectioning", "sections": [{"name": "a", "task": TASK}]}
            ),
            OnFailure.FAIL_FAST,
        ),
        (voting(3, policy={"on_failure": "quorum"}), OnFailure.QUORUM),
        (voting(3, policy={"quorum": 2}), OnFailure.QUORUM),  # a quorum implies its policy
    ],
)
def test_the_failure_policy_defaults_by_mode(spec: Any, policy: OnFailure) -> None:
    assert on_failure(spec) is policy


def test_the_quorum_is_a_strict_majority_unless_given() -> None:
    assert [quorum_size(voting(n)) for n in (1, 2, 3, 4, 5)] == [1, 2, 2, 3, 3]
    assert quorum_size(voting(5, policy={"on_failure": "quorum", "quorum": 4})) == 4
