"""The map section: one big map job against the floor, and the economy of a vote per item.

**Scale.** A map job of ``ITEMS`` items (one lane each) at ``LATENCY_MS`` of upstream
latency with ``policy.max_concurrency`` ``MAX_CONCURRENCY``, against the floor: the
same calls (the same prompts, item i's text in call i) on bare aiohttp with at most as
many in flight (``bench/limit.py --client raw``, a semaphore), no database, no API.
Fanout's time is a caller's, POST to the final event; the POST is sent with
``?lanes=false`` (the 202 then carries no lanes), and its time to the 202 is reported
apart.

**Economy.** ``ECONOMY_ITEMS`` items, each a vote of ``VOTES`` lanes
(``per_item``), on simulated questions whose answers vary (``QUESTIONS``, a job per
kind: a map's items share its model), at a job-wide concurrency below n and far above
it (``ECONOMY_MAX_CONCURRENCIES``), once per stopping rule (``none`` first: the others
are compared with it). The task's ``seed`` gives lane k of
item i the seed ``SEED + k``, and the simulator draws from (model, messages, seed), so
item i's text makes its draws its own and every rule sees the same answer from the
same lane. Per rule: lanes that ran (not skipped), the simulator's calls (a lane cut
short by a stop counts there too), votes counted, agreement per item with ``none``,
wall time.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from . import client as fc

ITEMS, QUICK_ITEMS = 10_000, 1_000
MAX_CONCURRENCY, QUICK_MAX_CONCURRENCY = 1_000, 100
LATENCY_MS = 200
# The floor's prompt, ``{index}`` filled per call; the map's task is the same text with
# ``{{item}}``, and item i is the string ``i``: the same requests, byte for byte.
PROMPT = "Item {index}: what is 17*23? End with 'Answer: N'."
ANSWER = 391

ECONOMY_ITEMS, QUICK_ECONOMY_ITEMS = 200, 50
VOTES = 10
ECONOMY_LATENCY_MS, ECONOMY_JITTER_MS = 20, 20
# Question kinds (each its own job: a map's items share one model): the answers drawn.
QUESTIONS = {"medium": "7:6,8:3,9:1", "easy": "7:9,8:1"}
ECONOMY_MAX_CONCURRENCIES = (4, 100)  # below n, and far above it
SEED = 1000
RULES: dict[str, dict[str, Any]] = {
    "none": {"rule": "none"},
    "confidence 0.95": {"rule": "confidence", "confidence": 0.95},
}

# Targets (issue 13): the map job against the floor, per database; its POST; its memory.
RATIO_TARGETS = {"sqlite": 1.3, "postgres": 1.5}
POST_TARGET_S = 1.0
PEAK_TARGET_MB = 400.0


def floor_model(latency_ms: int = LATENCY_MS) -> str:
    return f"fake?latency_ms={latency_ms}&answers={ANSWER}:1"


def scale_spec(items: int, max_concurrency: int) -> dict[str, Any]:
    """``items`` items, one lane each, every answer ``391``; collected in item order."""
    return {
        "mode": "map",
        "items": [str(i) for i in range(items)],
        "task": {
            "model": floor_model(),
            "messages": [{"role": "user", "content": PROMPT.replace("{index}", "{{item}}")}],
        },
        "aggregate": {"kind": "collect"},
        "policy": {"max_concurrency": max_concurrency},
    }


_LAST_NUMBER = re.compile(r"(\d+)\D*$")


def _number(answer: Any) -> int | None:
    """The last number of an item's answer (``collect`` lists the answers' text)."""
    found = _LAST_NUMBER.search(answer) if isinstance(answer, str) else None
    return int(found.group(1)) if found else None


def check_scale(run: fc.JobRun, items: int) -> None:
    """Every item answered 391, in item order: the work was really done."""
    if run.final_type != "job.succeeded":
        raise fc.JobFailed(f"job {run.job_id} ended {run.final_type}: {str(run.final)[:300]}")
    output = (run.final.get("result") or {}).get("output")
    if not isinstance(output, list) or len(output) != items:
        raise fc.JobFailed(f"job {run.job_id}: an output of {type(output).__name__}")
    wrong = sum(_number(answer) != ANSWER for answer in output)
    if wrong:
        raise fc.JobFailed(f"job {run.job_id}: {wrong} of {items} items did not answer {ANSWER}")


def economy_spec(
    items: int, answers: str, rule: dict[str, Any], max_concurrency: int
) -> dict[str, Any]:
    model = f"fake?latency_ms={ECONOMY_LATENCY_MS}&jitter_ms={ECONOMY_JITTER_MS}&answers={answers}"
    return {
        "mode": "map",
        "items": [f"question {i}" for i in range(items)],
        "task": {
            "model": model,
            "temperature": 0.8,
            "seed": SEED,
            "messages": [{"role": "user", "content": "{{item}}: which number? Answer: N."}],
        },
        "per_item": {
            "n": VOTES,
            "aggregate": {"kind": "majority", "extract": "number", "stop": rule},
        },
        "aggregate": {"kind": "collect"},
        "policy": {"max_concurrency": max_concurrency},
    }


async def job_progress(http: aiohttp.ClientSession, base: str, job_id: str) -> dict[str, int]:
    """The job's lanes per final state, without its lanes."""
    async with http.get(f"{base}/v1/jobs/{job_id}", params={"lanes": "false"}) as response:
        response.raise_for_status()
        progress: dict[str, int] = (await response.json())["progress"]
        return progress


async def economy(
    http: aiohttp.ClientSession,
    base: str,
    items: int,
    reset: Callable[[], Awaitable[None]],
    requests: Callable[[], Awaitable[int]],
    log: Callable[[str], None],
) -> list[dict[str, Any]]:
    """Each rule's job, one after another, per kind of question and job-wide
    concurrency; a row each."""
    rows: list[dict[str, Any]] = []
    for (kind, drawn), max_concurrency in itertools.product(
        QUESTIONS.items(), ECONOMY_MAX_CONCURRENCIES
    ):
        reference: list[Any] = []
        for name, rule in RULES.items():
            await reset()
            spec = economy_spec(items, drawn, rule, max_concurrency)
            run = await fc.run_job(http, base, spec, params={"lanes": "false"})
            calls = await requests()
            if run.final_type != "job.succeeded":
                raise fc.JobFailed(f"job {run.job_id} ended {run.final_type}: {run.final}")
            result = run.final.get("result") or {}
            answers: list[Any] = result.get("output") or []
            if len(answers) != items:
                raise fc.JobFailed(f"job {run.job_id}: {len(answers)} answers for {items} items")
            reference = reference or answers
            progress = await job_progress(http, base, run.job_id)
            skipped = progress.get("skipped", 0)
            ran = sum(progress.values()) - skipped
            counted = [vote.get("counted", 0) for vote in result["details"].get("votes") or []]
            rows.append(
                {
                    "rule": name,
                    "questions": kind,
                    "answers": drawn,
                    "max_concurrency": max_concurrency,
                    "items": items,
                    "lanes_ran": ran,
                    "lanes_skipped": skipped,
                    "calls": calls,
                    "votes_counted": sum(counted) / len(counted) if counted else float("nan"),
                    "agreement": sum(a == b for a, b in zip(answers, reference, strict=True))
                    / items,
                    "unanswered": sum(answer is None for answer in answers),
                    "wall_s": run.wall_s,
                    "progress": progress,
                }
            )
            log(
                f"map economy, {kind}, max_concurrency {max_concurrency}, {name:<16} "
                f"{ran / items:4.1f} lanes ran/item  {calls / items:4.1f} calls/item  "
                f"agreement {100 * rows[-1]['agreement']:.1f} %  {run.wall_s:.1f} s"
            )
    return rows


def describe_scale(items: int, max_concurrency: int) -> str:
    return (
        f"One map job of {items:,} items (one lane each) at {LATENCY_MS} ms of upstream "
        f"latency, `policy.max_concurrency: {max_concurrency:,}`, `aggregate: collect`, "
        "against **the floor**: the same calls (the same prompts: item i's text in call i) "
        "on bare aiohttp with at most as many in flight (`bench/limit.py --client raw`, "
        "an `asyncio.Semaphore`), no SDK, no database, no API, in a process of its own. "
        "Fanout's time is a caller's: `POST /v1/jobs?lanes=false` to the final event on "
        "the job's stream (every lane's events go past the caller); *POST → 202* is the "
        "POST alone (the whole body: items validated, every lane stored). Peak MB is the "
        "process's VmHWM over the scenario (its runs back to back, warm-up included); "
        "CPU s is per run; in flight is the simulator's peak of concurrent requests."
    )


def describe_economy(service: str, items: int) -> str:
    return (
        f"One map job of {items} simulated questions, each a vote of n = {VOTES} lanes "
        f"(`per_item`, majority on the number) on {service}, run once per stopping rule "
        f"with the same answers: the task's `seed` {SEED} gives lane k of item i the seed "
        f"{SEED} + k, and item i's text makes its draws its own. A job's items share its "
        "model, so each kind of question is a job of its own: "
        + ", ".join(f"{kind} `answers={answers}`" for kind, answers in QUESTIONS.items())
        + f"; upstream latency {ECONOMY_LATENCY_MS} to "
        f"{ECONOMY_LATENCY_MS + ECONOMY_JITTER_MS} ms; at a job-wide `max_concurrency` below "
        "n and far above it (an item's votes become ready vote by vote, so a claim takes "
        "every item's first vote before any item's second). The stop: `confidence` "
        "0.95 against `none`. *Lanes that ran* are the lanes not "
        "skipped; *calls* are the simulator's count of requests (a running lane that a "
        "stop cut short counts there, and ends skipped); *votes counted* is the mean per "
        "item at the stop; *agreement* compares each item's answer with `none`'s (all "
        f"{VOTES} votes)."
    )
