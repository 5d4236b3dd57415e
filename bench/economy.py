"""The economy of a vote: each stopping rule beside ``none`` on the same questions.

Each question is a voting job on the fake LLM whose answers are drawn from the
question's distribution (easy, medium or hard), reproducibly: lane i of question q
draws with seed ``1000 q + i``, so every rule sees the same answer from the same lane.
Per rule: mean upstream calls per question (the fake's count, so calls a stop cut
short count too), agreement of its answer with ``none``'s, and the wall time of all
the jobs at once. :func:`describe` says the rest, from the constants below.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from . import client as fc

QUESTIONS = 300
N = 40
MAX_CONCURRENCY = 4
LATENCY_MS, JITTER_MS = 40, 40
LEADER_CONFIDENCE, OTHER_CONFIDENCE = 0.9, 0.5
MIX = (  # kind, share of the questions, answer weights (answer 1 leads)
    ("easy", 0.6, "1:9,2:1"),
    ("medium", 0.3, "1:6,2:2,3:2"),
    ("hard", 0.1, "1:4,2:2,3:2,4:2"),
)
# Rule name -> what the majority aggregate adds. ``none`` first: the others agree with it.
RULES: dict[str, dict[str, Any]] = {
    "none": {"stop": {"rule": "none"}},
    "decided": {"stop": {"rule": "decided"}},
    "ahead_by k=3": {"stop": {"rule": "ahead_by", "k": 3}},
    "window size=5": {"stop": {"rule": "window", "size": 5}},
    "confidence 0.95": {"stop": {"rule": "confidence", "confidence": 0.95}},
    "confidence 0.95, weighted": {
        "stop": {"rule": "confidence", "confidence": 0.95},
        "weight": "confidence",
    },
}


def describe(service: str) -> str:
    """The section's paragraph for the report, from the constants above."""
    shares = ", ".join(
        f"{100 * share:.0f} % {kind} ({_weights(answers)})" for kind, share, answers in MIX
    )
    return (
        f"{QUESTIONS} simulated questions, each a voting job of n = {N} lanes on {service}, "
        "run once per stopping rule with the same answers: lane i of question q draws its "
        "answer with seed 1000 q + i, so every rule sees the same answer from the same "
        f"lane. The mix: {shares}; the leading answer comes with token confidence "
        f"{LEADER_CONFIDENCE}, the others {OTHER_CONFIDENCE}. `max_concurrency: "
        f"{MAX_CONCURRENCY}` (a job overshoots its stopping point by at most "
        f"{MAX_CONCURRENCY - 1} calls, which count here); upstream latency {LATENCY_MS} to "
        f"{LATENCY_MS + JITTER_MS} ms; the {QUESTIONS} jobs of a rule run at once. *Calls* "
        "are the fake LLM's count of requests; *votes counted* is the mean per question at "
        "the stop; *agreement* compares each question's answer with `none`'s (all "
        f"{N} votes). `confidence` is the posterior probability that the leader is the more "
        "likely of the top two answers, under a uniform Beta prior (Adaptive-Consistency, "
        "Aggarwal et al., EMNLP 2023)."
    )


def _weights(answers: str) -> str:
    """``1:6,2:2,3:2`` as ``A .6, B .2, C .2``."""
    pairs = [pair.split(":") for pair in answers.split(",")]
    total = sum(int(weight) for _, weight in pairs)
    return ", ".join(
        f"{chr(ord('A') + i)} {int(weight) / total:.1f}".replace("0.", ".")
        for i, (_, weight) in enumerate(pairs)
    )


def kind_of(question: int) -> tuple[str, str]:
    """The question's kind and answer weights (by its place in the mix)."""
    edge = 0.0
    for kind, share, answers in MIX:
        edge += share * QUESTIONS
        if question < round(edge):
            return kind, answers
    kind, _share, answers = MIX[-1]
    return kind, answers


def question_spec(question: int, rule: dict[str, Any]) -> dict[str, Any]:
    _kind, answers = kind_of(question)
    confidence = ",".join(
        f"{value}:{LEADER_CONFIDENCE if value == '1' else OTHER_CONFIDENCE}"
        for value, _weight in (pair.split(":") for pair in answers.split(","))
    )
    model = (
        f"fake?latency_ms={LATENCY_MS}&jitter_ms={JITTER_MS}"
        f"&answers={answers}&confidence={confidence}"
    )
    return {
        "mode": "voting",
        "n": N,
        "task": {
            "model": model,
            "messages": [{"role": "user", "content": f"Question {question}?"}],
            "seed": 1000 * question,
        },
        "aggregate": {"kind": "majority", "extract": "number", **rule},
        "policy": {"max_concurrency": MAX_CONCURRENCY},
    }


async def measure(
    http: aiohttp.ClientSession,
    base: str,
    reset: Callable[[], Awaitable[None]],
    requests: Callable[[], Awaitable[int]],
    log: Callable[[str], None],
) -> list[dict[str, Any]]:
    """Each rule's 300 jobs at once, one rule after another; a row per rule."""
    rows: list[dict[str, Any]] = []
    reference: list[Any] = []
    for name, rule in RULES.items():
        await reset()
        started = time.perf_counter()
        runs = await asyncio.gather(
            *(fc.run_job(http, base, question_spec(q, rule)) for q in range(QUESTIONS))
        )
        wall = time.perf_counter() - started
        calls = await requests()
        answers = []
        for run in runs:
            if run.final_type != "job.succeeded":
                raise fc.JobFailed(f"job {run.job_id} ended {run.final_type}: {run.final}")
            answers.append((run.final.get("result") or {}).get("output"))
        reference = reference or answers
        by_kind: dict[str, list[int]] = {}
        for q, run in enumerate(runs):
            votes = (run.final.get("result") or {}).get("details", {}).get("stop", {})
            by_kind.setdefault(kind_of(q)[0], []).append(int(votes.get("votes") or N))
        rows.append(
            {
                "rule": name,
                "calls_per_question": calls / QUESTIONS,
                "agreement": sum(a == b for a, b in zip(answers, reference, strict=True))
                / QUESTIONS,
                "wall_s": wall,
                "votes_by_kind": {k: sum(v) / len(v) for k, v in by_kind.items()},
            }
        )
        log(
            f"economy {name:<26} {calls / QUESTIONS:5.1f} calls/question  "
            f"agreement {100 * rows[-1]['agreement']:.1f} %  {wall:.1f} s"
        )
    return rows
