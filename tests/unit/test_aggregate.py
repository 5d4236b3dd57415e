"""Fan-in as pure functions: reading answers out of lane outputs, and the aggregates."""

from __future__ import annotations

from typing import Any

import pytest

from service.aggregate import (
    LaneResult,
    answer_key,
    collect,
    combine,
    extract,
    lane_answer,
    majority,
    reduce_messages,
    score,
)
from service.spec import (
    CollectAggregate,
    LlmTask,
    MajorityAggregate,
    Message,
    ReduceAggregate,
    ScoreAggregate,
    VotingSpec,
)

NUMBER = MajorityAggregate(extract="number")
TEXT = MajorityAggregate(extract="text")


def lane(
    index: int, answer: Any = None, *, status: str = "succeeded", output: Any = None
) -> LaneResult:
    return LaneResult(
        index=index,
        name=f"lane-{index}",
        status=status,
        output=f"output {index}" if output is None else output,
        answer=answer,
    )


def votes(*answers: Any) -> list[LaneResult]:
    """Succeeded lanes in lane order; ``None`` abstains."""
    return [lane(i, answer) for i, answer in enumerate(answers)]


# --- extract: number -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Answer: 391.", 391),
        ("391", 391),
        ("391.0", 391),
        ("1,234", 1234),
        ("1,234,567.89", 1234567.89),
        ("-2.50", -2.5),
        ("Answer: -5", -5),
        ("+3", 3),
        ("x = .5", 0.5),
        ("1e3", 1000),
        ("1.5e-3", 0.0015),
        ("17*23 = 391", 391),
        ("first 12, then 7", 7),
        ("the point (3,4)", 4),
        ("10,20,30", 30),
        ("pages 5-10", 10),
        ("gpt-4 says 7", 7),
        ("Answer: 391\n", 391),
    ],
)
def test_number_is_the_last_number_in_the_text(text: str, expected: int | float) -> None:
    assert extract(NUMBER, text) == expected


@pytest.mark.parametrize(
    ("text", "shortest"),
    [("Answer: 391.", "391"), ("391.000", "391"), ("-2.50", "-2.5"), ("1,234", "1234")],
)
def test_number_is_reported_in_shortest_form(text: str, shortest: str) -> None:
    answer = extract(NUMBER, text)

    assert repr(answer) == shortest
    assert answer_key(answer) == shortest


def test_answer_with_trailing_period_agrees_with_bare_number() -> None:
    assert answer_key(extract(NUMBER, "Answer: 391.")) == answer_key(extract(NUMBER, "391"))


@pytest.mark.parametrize("text", ["", "no digits here", "Answer: N", "   "])
def test_number_abstains_when_there_is_no_number(text: str) -> None:
    assert extract(NUMBER, text) is None


@pytest.mark.parametrize("text", ["1e100000", "Answer: 1e400", "9" * 5000])
def test_number_beyond_float_range_abstains(text: str) -> None:
    assert extract(NUMBER, text) is None


def test_out_of_range_last_number_does_not_fall_back_to_an_earlier_one() -> None:
    assert extract(NUMBER, "step 1: 391, so the answer is 1e100000") is None


def test_number_is_read_from_an_http_lane_body() -> None:
    assert extract(NUMBER, {"status": 200, "body": "price: 42.10"}) == 42.1


# --- extract: text -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("Paris", "  paris \n"),
        ("New   York", "new york"),
        ("New\tYork\n", "NEW YORK"),
        ("STRASSE", "straße"),
    ],
)
def test_text_agrees_across_case_and_whitespace(a: str, b: str) -> None:
    assert extract(TEXT, a) == extract(TEXT, b)


def test_text_keeps_words_distinct() -> None:
    assert extract(TEXT, "new york") != extract(TEXT, "newyork")


@pytest.mark.parametrize("text", ["", "   ", "\n\t"])
def test_empty_text_abstains(text: str) -> None:
    assert extract(TEXT, text) is None


# --- extract: regex ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "text", "expected"),
    [
        (r"Answer:\s*(\w+)", "Thinking... Answer: Blue. Answer: Red", "Blue"),
        (r"grade (\S+)", "grade B+ overall", "B+"),
        (r"[A-D]\b", "I pick C", "C"),
        (r"Answer:(.*)", "Answer:   spaced out   ", "spaced out"),
    ],
)
def test_regex_is_the_first_capture_group_of_the_first_match(
    pattern: str, text: str, expected: str
) -> None:
    assert extract(MajorityAggregate(extract="regex", pattern=pattern), text) == expected


@pytest.mark.parametrize(
    ("pattern", "text"),
    [
        (r"Answer: (\w+)", "no answer given"),
        (r"Answer:\s*(\w*)", "Answer: "),
        (r"Answer(: \w+)?", "Answer"),
    ],
)
def test_regex_abstains_on_no_match_or_empty_capture(pattern: str, text: str) -> None:
    assert extract(MajorityAggregate(extract="regex", pattern=pattern), text) is None


# --- extract: json -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "text", "expected"),
    [
        ("verdict", '{"verdict": "yes"}', "yes"),
        ("result.score", '{"result": {"score": 7}}', 7),
        ("items.1", '{"items": ["a", "b"]}', "b"),
        ("items.-1", '{"items": ["a", "b", "c"]}', "c"),
        ("ok", '```json\n{"ok": true}\n```', True),
        ("ok", '```\n{"ok": false}\n```', False),
        ("pair", '{"pair": {"b": 2, "a": 1}}', {"a": 1, "b": 2}),
    ],
)
def test_json_reads_the_field_path(field: str, text: str, expected: Any) -> None:
    assert extract(MajorityAggregate(extract="json", field=field), text) == expected


def test_json_reads_an_http_lane_body_that_is_a_document() -> None:
    how = MajorityAggregate(extract="json", field="answer")

    assert extract(how, {"status": 200, "body": {"answer": 4}}) == 4


@pytest.mark.parametrize(
    ("field", "text"),
    [
        ("verdict", "not json at all"),
        ("verdict", '{"other": 1}'),
        ("verdict", '{"verdict": null}'),
        ("a.b", '{"a": "scalar"}'),
        ("items.5", '{"items": [1]}'),
        ("items.x", '{"items": [1]}'),
        ("score", '{"score": NaN}'),
        ("score", '{"score": Infinity}'),
        ("score", '{"score": -Infinity}'),
        ("score", '{"score": 1e400}'),
    ],
)
def test_json_abstains_when_the_field_cannot_be_read(field: str, text: str) -> None:
    assert extract(MajorityAggregate(extract="json", field=field), text) is None


# --- answer_key ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b"),
    [(391, 391.0), ({"a": 1, "b": 2}, {"b": 2, "a": 1}), ("yes", "yes"), ([1, 2], [1, 2])],
)
def test_equal_answers_share_a_key(a: Any, b: Any) -> None:
    assert answer_key(a) == answer_key(b)


@pytest.mark.parametrize(
    ("a", "b"), [(391, "391"), (True, 1), (2.5, 2), ("Yes", "yes"), ([1, 2], [2, 1])]
)
def test_different_answers_have_different_keys(a: Any, b: Any) -> None:
    assert answer_key(a) != answer_key(b)


def test_no_answer_has_no_key() -> None:
    assert answer_key(None) is None


# --- lane_answer ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("aggregate", "output", "expected"),
    [
        (ScoreAggregate(), "Score: 8.", 8),
        (ScoreAggregate(extract="text"), " 7.5 ", 7.5),
        (ScoreAggregate(extract="text"), "eight", None),
        (ScoreAggregate(extract="json", field="score"), '{"score": "9"}', 9),
        (ScoreAggregate(extract="json", field="score"), '{"score": true}', None),
        (ScoreAggregate(extract="regex", pattern=r"(\d+)/10"), "8/10", 8),
        (MajorityAggregate(extract="number"), "Answer: 391.", 391),
        (MajorityAggregate(), "  Blue ", "blue"),
        (CollectAggregate(), "anything", None),
    ],
)
def test_lane_answer_is_the_vote_or_score_of_the_aggregate(
    aggregate: Any, output: str, expected: Any
) -> None:
    assert lane_answer(voting_with(aggregate), 0, output).answer == expected


def test_score_needs_a_number() -> None:
    assert lane_answer(voting_with(ScoreAggregate(extract="text")), 0, "good").answer is None


def voting_with(aggregate: Any) -> VotingSpec:
    task = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    return VotingSpec(mode="voting", n=1, task=task, aggregate=aggregate)  # type: ignore[arg-type]


# --- collect -------------------------------------------------------------------------


def test_collect_maps_section_names_to_outputs_in_spec_order() -> None:
    lanes = [
        LaneResult(0, "draft", "succeeded", "the draft"),
        LaneResult(1, "safety", "succeeded", "safe"),
        LaneResult(2, "stock", "succeeded", {"status": 200, "body": {"price": 3}}),
    ]

    output, details = collect(lanes)

    assert list(output.items()) == [
        ("draft", "the draft"),
        ("safety", "safe"),
        ("stock", {"status": 200, "body": {"price": 3}}),
    ]
    assert details == {"missing": []}


@pytest.mark.parametrize("status", ["failed", "timed_out", "cancelled", "skipped"])
def test_collect_gives_none_for_a_section_without_result_and_names_it(status: str) -> None:
    lanes = [
        LaneResult(0, "a", "succeeded", "one"),
        LaneResult(1, "b", status, "partial text"),
    ]

    output, details = collect(lanes)

    assert output == {"a": "one", "b": None}
    assert details["missing"] == ["b"]


# --- majority ------------------------------------------------------------------------


def test_majority_winner_is_the_most_voted_answer() -> None:
    answer, details = majority(votes(1, 2, 2, 3, 2))

    assert answer == 2
    assert details["winner_votes"] == 3


def test_agreement_is_winner_votes_over_counted_votes() -> None:
    _, details = majority(votes("a", "a", "a", "b"))

    assert details["agreement"] == 0.75
    assert details["counted"] == 4


def test_agreement_is_rounded() -> None:
    _, details = majority(votes("a", "a", "b"))

    assert details["agreement"] == 0.6667


@pytest.mark.parametrize(
    ("answers", "winner"),
    [
        (["a", "b"], "a"),
        (["b", "a"], "b"),
        (["b", "a", "a", "b"], "b"),
        (["c", "a", "b", "b", "a"], "a"),
        ([None, "x", "y"], "x"),
    ],
)
def test_majority_tie_goes_to_the_answer_first_seen_in_lane_order(
    answers: list[Any], winner: str
) -> None:
    answer, _ = majority(votes(*answers))

    assert answer == winner


def test_abstentions_are_counted_apart_from_votes() -> None:
    answer, details = majority(votes("a", None, "a", "b", None))

    assert answer == "a"
    assert details["abstained"] == 2
    assert details["counted"] == 3
    assert details["agreement"] == round(2 / 3, 4)


@pytest.mark.parametrize("status", ["failed", "timed_out", "cancelled", "skipped"])
def test_lanes_without_result_neither_vote_nor_abstain(status: str) -> None:
    lanes = [lane(0, "a"), lane(1, "b", status=status), lane(2, "b", status=status)]

    answer, details = majority(lanes)

    assert answer == "a"
    assert details["counted"] == 1
    assert details["abstained"] == 0


def test_majority_with_only_abstentions_has_no_winner() -> None:
    answer, details = majority(votes(None, None))

    assert answer is None
    assert details["agreement"] == 0.0
    assert details["winner_votes"] == 0
    assert details["abstained"] == 2


def test_majority_lists_votes_most_first_and_ties_in_first_seen_order() -> None:
    _, details = majority(votes("c", "a", "b", "b", "a", "b"))

    assert details["votes"] == [
        {"answer": "b", "count": 3},
        {"answer": "a", "count": 2},
        {"answer": "c", "count": 1},
    ]


def test_majority_counts_numbers_equal_in_value_as_one_answer() -> None:
    lanes = [
        lane(i, extract(NUMBER, text))
        for i, text in enumerate(["Answer: 391.", "391", "I get 390", "so 391.0"])
    ]

    answer, details = majority(lanes)

    assert answer == 391
    assert details["winner_votes"] == 3


def test_majority_winner_can_be_a_falsy_answer() -> None:
    answer, details = majority(votes(0, 0, 1))

    assert answer == 0
    assert details["winner_votes"] == 2


# --- score ---------------------------------------------------------------------------


def test_score_max_picks_the_highest_scored_lanes_output() -> None:
    output, details = score(votes(6, 9, 7), "max")

    assert output == "output 1"
    assert details["score"] == 9
    assert details["lane"] == "lane-1"


def test_score_min_picks_the_lowest_scored_lanes_output() -> None:
    output, details = score(votes(6, 2.5, 7), "min")

    assert output == "output 1"
    assert details["score"] == 2.5
    assert details["lane"] == "lane-1"


@pytest.mark.parametrize("pick", ["max", "min"])
def test_score_tie_goes_to_the_earliest_lane(pick: str) -> None:
    output, details = score(votes(5, 8, 8, 5, 8, 5), pick)

    expected = 1 if pick == "max" else 0
    assert output == f"output {expected}"
    assert details["lane"] == f"lane-{expected}"


@pytest.mark.parametrize(
    ("scores", "mean"),
    [([1, 2], 1.5), ([2, 4], 3), ([7], 7), ([0.1, 0.2], 0.15), ([-1, -2.5], -1.75)],
)
def test_score_mean_is_the_mean_in_shortest_form(scores: list[float], mean: float) -> None:
    output, details = score(votes(*scores), "mean")

    assert output == mean
    assert repr(output) == repr(mean)
    assert details["score"] == mean


def test_score_reports_every_counted_lane() -> None:
    lanes = [lane(0, 3), lane(1, None), lane(2, 9, status="failed"), lane(3, 4)]

    _, details = score(lanes, "max")

    assert details["scores"] == {"lane-0": 3, "lane-3": 4}
    assert details["counted"] == 2


def test_score_ignores_lanes_that_failed_even_with_a_higher_score() -> None:
    lanes = [lane(0, 3), lane(1, 10, status="timed_out")]

    output, _ = score(lanes, "max")

    assert output == "output 0"


@pytest.mark.parametrize("pick", ["max", "min", "mean"])
def test_score_without_any_score_has_no_output(pick: str) -> None:
    output, details = score(votes(None, None), pick)

    assert output is None
    assert details["counted"] == 0


# --- reduce --------------------------------------------------------------------------


REDUCER = LlmTask(
    model="m",
    messages=[
        Message(role="system", content="You synthesise."),
        Message(role="user", content="Merge these reviews."),
    ],
)


def test_reduce_keeps_the_reducers_own_messages_first() -> None:
    messages = reduce_messages(REDUCER, votes("x"))

    assert messages[:2] == REDUCER.messages
    assert len(messages) == 3


def test_reduce_tags_every_succeeded_output_with_its_lane_name_in_lane_order() -> None:
    lanes = [
        LaneResult(0, "skeptic", "succeeded", "too risky"),
        LaneResult(1, "optimist", "failed", "never shown"),
        LaneResult(2, "realist", "succeeded", {"status": 200, "body": "fine"}),
    ]

    content = reduce_messages(REDUCER, lanes)[-1].content

    assert content == (
        '<lane name="skeptic">\ntoo risky\n</lane>\n\n<lane name="realist">\nfine\n</lane>'
    )


def test_reduce_message_is_from_the_user() -> None:
    assert reduce_messages(REDUCER, votes("x"))[-1].role == "user"


# --- combine -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("aggregate", "expected"),
    [
        (CollectAggregate(), {"lane-0": "output 0", "lane-1": "output 1", "lane-2": "output 2"}),
        (MajorityAggregate(), 4),
        (ScoreAggregate(pick="min"), "output 1"),
    ],
)
def test_combine_runs_the_specs_aggregate(aggregate: Any, expected: Any) -> None:
    output, _ = combine(aggregate, votes(4, 2, 4))

    assert output == expected


def test_combine_leaves_reduce_to_the_runner() -> None:
    with pytest.raises(TypeError, match="reducer"):
        combine(ReduceAggregate(task=REDUCER), votes("x"))
