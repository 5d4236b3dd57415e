"""The overhead section: what Fanout adds to a small vote when upstream costs nothing.

A voting job of ``N`` lanes at 0 ms of upstream latency (``MODEL``, majority on the
number, no early stop), timed from a client: ``POST /v1/jobs`` sent until the final
event arrives on the job's stream, opened right after the 202 (the stream replays the
events it missed, with their ``at``). Against **the floor**: the same ``N`` calls on
bare aiohttp (``bench/limit.py --client raw``). Medians of ``REPS`` runs after
``WARMUP`` warm-ups per contender, back to back.

The phases of a run: (a) POST → 202 (client clock); (b) ``job.queued`` → the first
``lane.started``; (c) the first ``lane.started`` → the last lane's end event; (d) the
last lane's end → ``job.succeeded``; (e) ``job.succeeded`` → its receipt by the client
(the client's clock, same machine). (b) to (d) are differences of the events' ``at``,
which has millisecond resolution; (e) mixes an ``at`` with the client's clock.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import aiohttp

from . import client as fc

N = 10
MODEL = "fake?answers=391:1"
REPS, WARMUP = 30, 5
QUICK_REPS, QUICK_WARMUP = 5, 2
# The target: the total within the floor plus this many ms, per database.
TARGET_MS = {"sqlite": 10.0, "postgres": 15.0}
LANE_ENDS = (b"lane.succeeded", b"lane.failed", b"lane.cancelled", b"lane.skipped")
# The phases, in order: (key, column heading).
PHASES = (
    ("post_s", "(a) POST → 202"),
    ("claim_s", "(b) queued → first lane started"),
    ("calls_s", "(c) first lane started → last lane ended"),
    ("decide_s", "(d) last lane ended → job.succeeded"),
    ("deliver_s", "(e) job.succeeded → client has it"),
)


def spec() -> dict[str, Any]:
    return {
        "mode": "voting",
        "n": N,
        "task": {"model": MODEL, "messages": [{"role": "user", "content": fc.QUESTION}]},
        "aggregate": {"kind": "majority", "extract": "number", "early_stop": False},
        "policy": {"max_concurrency": N},
    }


async def measure(http: aiohttp.ClientSession, base: str) -> dict[str, Any]:
    """One job, POST to the final event on its stream; the phases from its events."""
    sent_at = time.time()
    job_id = await fc.post_job(http, base, spec())
    accepted_at = time.time()
    seen = fc.StreamWatch()
    await fc.watch(http, base, job_id, seen)
    first: dict[bytes, float] = {}
    started, ended = [], []
    final: tuple[bytes, float, float] | None = None
    for kind, _seq, at, received in seen.receipts:
        first.setdefault(kind, at)
        if kind == b"lane.started":
            started.append(at)
        elif kind in LANE_ENDS:
            ended.append(at)
        elif kind in fc.FINAL_TYPES:
            final = (kind, at, received)
    if final is None or final[0] != b"job.succeeded":
        raise fc.JobFailed(f"job {job_id} ended {final[0] if final else 'without a final event'}")
    if len(started) < N or len(ended) != N or b"job.queued" not in first:
        raise fc.JobFailed(
            f"job {job_id}: {len(started)} lane starts, {len(ended)} lane ends, "
            f"events {sorted(k.decode() for k in first)}"
        )
    _, decided, delivered = final
    return {
        "job_id": job_id,
        "total_s": delivered - sent_at,
        "post_s": accepted_at - sent_at,
        "claim_s": min(started) - first[b"job.queued"],
        "calls_s": max(ended) - min(started),
        "decide_s": decided - max(ended),
        "deliver_s": delivered - decided,
        # Context: the POST until the job was stored; the 202 until the stream opened,
        # and whether it opened before the job was decided (live delivery, not replay).
        "stored_s": first[b"job.queued"] - sent_at,
        "stream_open_s": seen.connected_at - accepted_at,
        "live": seen.connected_at < decided,
    }


def describe(reps: int, warmup: int) -> str:
    return (
        f"A voting job of {N} lanes at 0 ms of upstream latency (`{MODEL}`, majority on the "
        "number, `early_stop: false`), timed from a client: `POST /v1/jobs` sent until the "
        "final event arrives on the job's stream, opened right after the 202 (it replays "
        "the events it missed). Against **the floor**: the same "
        f"{N} calls on bare aiohttp (`bench/limit.py --client raw`), no SDK, no database. "
        f"Milliseconds, medians of {reps} runs after {warmup} warm-ups per contender. "
        "The phases: (a) POST → 202 (client clock); (b) `job.queued` → the first "
        "`lane.started`; (c) → the last lane's end event; (d) → `job.succeeded`; (e) → "
        "the client received it (client clock against the event's `at`, same machine). "
        "(b) to (d) are differences of the events' `at`, which has millisecond resolution: "
        "a phase of 0 to 2 ms is below what it can tell apart, and each is ±1 ms. An event's "
        "`at` is when its recording transaction began, and the last lane's end is decided "
        "in the transaction that records it, so (d) is 0 by construction; its commit "
        "falls in (e). (a) overlaps (b): the job is stored, and its lanes start, before "
        "the 202 arrives. *POST → stored* (`job.queued`'s `at`) + (b) + (c) + (d) + (e) "
        "is the total; *live* counts the runs whose stream opened before `job.succeeded` "
        "(so (e) is a live delivery, not a replay)."
    )


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _ms(value: float) -> str:
    return "—" if value != value else f"{1000 * value:.1f}"


def table(found: dict[str, Any], check: Any, label: Any) -> list[str]:
    """The floor, then each service: total, over the floor, the phases, the target.

    ``check``: :meth:`bench.report.Targets.check`; ``label``: a service key's name."""
    floor = _median([s["wall_s"] for s in found["samples"].get("raw", [])])
    heads = " | ".join(head for _, head in PHASES)
    lines = [
        f"| who | total | over the floor | {heads} | POST → stored | live | target |",
        "|---|---:|---:|" + "---:|" * len(PHASES) + "---:|---:|---|",
        f"| the floor: bare aiohttp, no SDK ({N} calls) | {_ms(floor)} | | "
        + " | " * len(PHASES)
        + " | | |",
    ]
    for who, samples in found["samples"].items():
        if who == "raw":
            continue
        db = who.partition("-")[0]
        total = _median([s["total_s"] for s in samples])
        over = total - floor
        cells = " | ".join(_ms(_median([s[key] for s in samples])) for key, _ in PHASES)
        bound = TARGET_MS.get(db)
        mark = ""
        if bound is not None:
            mark = check(
                f"≤ floor + {bound:.0f} ms",
                f"overhead: {N}-lane vote at 0 ms on {label(who)}: total ≤ the floor + "
                f"{bound:.0f} ms",
                f"floor + {1000 * over:.1f} ms",
                1000 * over <= bound,
            )
        live = sum(1 for s in samples if s.get("live"))
        lines.append(
            f"| Fanout · {label(who)} | {_ms(total)} | +{_ms(over)} | {cells} "
            f"| {_ms(_median([s['stored_s'] for s in samples]))} | {live}/{len(samples)} "
            f"| {mark} |"
        )
    return lines
