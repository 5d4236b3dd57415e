"""The economy of a vote: each stopping rule beside ``none`` on the same 300 questions.

Each question is a voting job of n = 40 lanes on the fake LLM, whose answers are drawn
from the question's distribution (reproducibly: lane i of question q draws with seed
``1000 q + i``, so every rule sees the same answer from the same lane). The mix:

- 60 % easy: the leading answer has probability 0.9 (``A .9, B .1``);
- 30 % medium: 0.6 (``A .6, B .2, C .2``);
- 10 % hard: 0.4 (``A .4, B .2, C .2, D .2``).

The leading answer is reported with confidence 0.9, the others with 0.5 (as the
token probabilities of a model that knows more often than it guesses, CISC's
premise). A job runs at most ``max_concurrency`` = 4 lanes at once, so it overshoots
its stopping point by at most 3 calls. All 300 jobs of a rule run at once; the fake
answers after 40 to 80 ms.

Per rule: mean upstream calls per question (the fake's count, so calls a stop cut
short count too), agreement of its answer with ``none``'s (all 40 votes), and the wall
time of the 300 jobs.
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
MIX = (  # kind, share of the questions, answer weights, confidence per answer
    ("easy", 0.6, "1:9,2:1", "1:0.9,2:0.5"),
    ("medium", 0.3, "1:6,2:2,3:2", "1:0.9,2:0.5,3:0.5"),
    ("hard", 0.1, "1:4,2:2,3:2,4:2", "1:0.9,2:0.5,3:0.5,4:0.5"),
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


def kind_of(question: int) -> tuple[str, str, str]:
    """The question's kind, answer weights and confidences (by its place in the mix)."""
    edge = 0.0
    for kind, share, answers, confidence in MIX:
        edge += share * QUESTIONS
        if question < round(edge):
            return kind, answers, confidence
    kind, _share, answers, confidence = MIX[-1]
    return kind, answers, confidence


def question_spec(question: int, rule: dict[str, Any]) -> dict[str, Any]:
    _kind, answers, confidence = kind_of(question)
    model = f"fake?latency_ms=40&jitter_ms=40&answers={answers}&confidence={confidence}"
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
