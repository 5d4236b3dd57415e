# ruff: noqa: RUF001
"""The results as markdown: tables with the issue's targets beside each row."""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

from . import economy, mapjob, overhead

DB_NAMES = {"sqlite": "SQLite", "postgres": "PostgreSQL"}
LABELS = {"limit": "limit", "raw": "(reference) bare aiohttp, no SDK"}
FLOOR = "the floor: bare aiohttp, no SDK"
# The lane call paths (FANOUT_LLM_CLIENT): the targets are judged on the default, lean;
# the SDK path is the reference, reported beside it.
CLIENTS = ("lean", "sdk", "limited")
PATH_NAMES = {"sdk": "SDK path", "limited": "provider limits (not binding)"}
PASS, MISS = "✓ pass", "✗ miss"
SECTION_TITLES = {
    "voting": "voting jobs",
    "overhead": "overhead",
    "small": "many small jobs",
    "stream": "stream delay",
    "economy": "the economy of a vote",
    "map": "map jobs",
}


def _split(who: str) -> tuple[str, str]:
    """A service's key (``sqlite``, ``postgres-sdk``) as (database, call path)."""
    db, _, client = who.partition("-")
    return db, client or "lean"


def _is_service(who: str) -> bool:
    return _split(who)[0] in DB_NAMES


def _service(who: str) -> str:
    """``SQLite`` for the lean path, ``SQLite · SDK path`` for the reference."""
    db, client = _split(who)
    return DB_NAMES[db] + ("" if client == "lean" else f" · {PATH_NAMES[client]}")


def _label(who: str) -> str:
    return LABELS.get(who) or f"Fanout · {_service(who)}"


def _order(who: str) -> tuple[int, int, int]:
    """Rows in a fixed order: the limit, its reference, then by database and path."""
    if not _is_service(who):
        return (0, list(LABELS).index(who) if who in LABELS else len(LABELS), 0)
    db, client = _split(who)
    return (1, list(DB_NAMES).index(db), CLIENTS.index(client) if client in CLIENTS else 9)


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _m(samples: list[dict[str, Any]], key: str) -> float:
    return _median([s[key] for s in samples])


def _mark(ok: bool, judged: bool = True) -> str:
    if not judged:  # the reference path: what it would score, not a verdict
        return "would pass" if ok else "would miss"
    return PASS if ok else MISS


def _fmt(value: float, digits: int = 3) -> str:
    return "—" if value != value else f"{value:.{digits}f}"  # NaN check


class Targets:
    """Each target the issue sets, with what was measured and whether it held.

    Judged on the default (lean) call path; the SDK path's measure of the same target
    is kept beside it as the reference."""

    def __init__(self) -> None:
        # target -> call path -> (measured, held)
        self.rows: dict[str, dict[str, tuple[str, bool]]] = {}

    def check(self, short: str, what: str, measured: str, ok: bool, client: str = "lean") -> str:
        """Record a target; return the short form for a table cell."""
        self.rows.setdefault(what, {})[client] = (measured, ok)
        return f"{short} {_mark(ok, client == 'lean')}".strip()

    def table(self) -> list[str]:
        reference = any("sdk" in paths for paths in self.rows.values())
        if not reference:
            lines = ["| target | measured | |", "|---|---:|---|"]
        else:
            lines = [
                "| target | measured | | SDK path (reference, not judged) |",
                "|---|---:|---|---:|",
            ]
        for what, paths in self.rows.items():
            measured, ok = paths.get("lean", ("—", None))
            line = f"| {what} | {measured} | {'' if ok is None else _mark(ok)} |"
            if reference:
                sdk = paths.get("sdk")
                line += f" {sdk[0]} · {_mark(sdk[1], judged=False)} |" if sdk else " — |"
            lines.append(line)
        return lines


def _voting_targets(
    sc: dict[str, Any],
    who: str,
    ratio: float,
    rate_share: float,
    mem_ratio: float,
    targets: Targets,
    floor_ratio: float | None = None,
) -> list[str]:
    n, latency = sc["n"], sc["latency_ms"]
    db, client = _split(who)
    where = f"N={n:,} @ {latency} ms on {DB_NAMES[db]}"
    marks = []
    if latency == 200 and n == 1000:
        bound = 1.10 if db == "sqlite" else 1.20
        what = f"{where}: ≤ {bound:.2f}× the limit"
        marks.append(
            targets.check(f"≤ {bound:.2f}×", what, f"{ratio:.2f}×", ratio <= bound, client)
        )
        marks.append(f"stretch < 1.00× {_mark(ratio < 1.0, client == 'lean')}")
        if floor_ratio is not None:  # issue 16: against bare aiohttp
            bound = 1.10 if db == "sqlite" else 1.25
            what = f"{where}: ≤ {bound:.2f}× the floor (bare aiohttp)"
            measured = f"{floor_ratio:.2f}×"
            marks.append(
                targets.check(
                    f"≤ {bound:.2f}× the floor", what, measured, floor_ratio <= bound, client
                )
            )
    if latency == 200 and n == 100:
        what = f"{where}: ≤ 1.05× the limit"
        marks.append(targets.check("≤ 1.05×", what, f"{ratio:.2f}×", ratio <= 1.05, client))
    if latency == 0 and n == 1000:
        what = f"{where}: ≥ 90 % of the limit's lanes/s"
        measured = f"{100 * rate_share:.0f} %"
        marks.append(
            targets.check("≥ 90 % of its lanes/s", what, measured, rate_share >= 0.90, client)
        )
    if n == 1000:
        what = f"peak memory, {where}: ≤ 1.5× the limit's"
        marks.append(
            targets.check("peak ≤ 1.5×", what, f"{mem_ratio:.2f}×", mem_ratio <= 1.5, client)
        )
    return marks


def voting_table(scenarios: list[dict[str, Any]], targets: Targets) -> list[str]:
    lines = [
        "| upstream | N | who | wall s | × limit | lanes/s | CPU s | peak MB | in flight "
        "| targets |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for sc in scenarios:
        n, latency = sc["n"], sc["latency_ms"]
        limit = sc["samples"]["limit"]
        limit_wall = _m(limit, "wall_s")
        limit_peak = sc["peak_mb"]["limit"]
        floor = sc["samples"].get("raw")
        for who in sorted(sc["samples"], key=_order):
            samples = sc["samples"][who]
            wall = _m(samples, "wall_s")
            ratio = wall / limit_wall
            cell = ""
            if _is_service(who):
                marks = _voting_targets(
                    sc,
                    who,
                    ratio,
                    limit_wall / wall,
                    sc["peak_mb"][who] / limit_peak,
                    targets,
                    wall / _m(floor, "wall_s") if floor else None,
                )
                cell = "; ".join(marks)
                if marks and _split(who)[1] != "lean":
                    cell = f"(reference, not judged) {cell}"
            lines.append(
                f"| {latency} ms | {n:,} | {_label(who)} | {_fmt(wall)} | {ratio:.2f} "
                f"| {n / wall:,.0f} | {_fmt(_m(samples, 'cpu_s'), 2)} | {sc['peak_mb'][who]:.0f} "
                f"| {int(_m(samples, 'in_flight'))} | {cell} |"
            )
    return lines


PHASES = ("create_s", "claim_s", "lanes_s", "decide_s", "deliver_s")


def phases_table(scenarios: list[dict[str, Any]], small: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| upstream | N | service | POST → job stored | → first lane claimed "
        "| → last attempt ended | → job decided | → caller has the final event | wall |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for sc in scenarios:
        for who in sorted(sc["samples"], key=_order):
            samples = sc["samples"][who]
            if not _is_service(who) or not all(p in samples[0]["extra"] for p in PHASES):
                continue
            cells = [f"{1000 * _median([s['extra'][p] for s in samples]):,.0f}" for p in PHASES]
            wall = 1000 * _m(samples, "wall_s")
            lines.append(
                f"| {sc['latency_ms']} ms | {sc['n']:,} | {_service(who)} | {' | '.join(cells)} "
                f"| {wall:,.0f} |"
            )
    for sc in small:
        db = next(iter(sc["peak_mb"]))
        many = sc["samples"]["many"]
        if not all(p in many[0]["extra"] for p in PHASES):
            continue
        cells = [f"{1000 * _median([s['extra'][p] for s in many]):,.0f}" for p in PHASES]
        wall = 1000 * _median([s["extra"]["job_p50_s"] for s in many])
        lines.append(
            f"| {sc['latency_ms']} ms | 5 (one of many at once) | {_service(db)} "
            f"| {' | '.join(cells)} | {wall:,.0f} |"
        )
    return lines


# Issue 16's targets for the small jobs, per database: the burst against the floor's
# same calls at once, and the service's CPU per job.
SMALL_TARGETS = {"sqlite": (2.5, 4.0), "postgres": (3.0, 6.0)}


def small_table(
    scenarios: list[dict[str, Any]], targets: Targets, jobs: int, limit_1000: float
) -> list[str]:
    lines = [
        f"| database | one 5-lane job s | {jobs} jobs at once s (every final event) "
        "| the floor's same calls at once s | × the floor | × one job "
        "| × the limit's 1,000 calls | median job s | slowest job s | CPU s | CPU ms a job "
        "| peak MB | in flight | streams closed early | targets |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for sc in scenarios:
        db = next(k for k in sc["peak_mb"])
        name, client = _split(db)
        single, many = sc["samples"]["single"], sc["samples"]["many"]
        one, all_done = _m(single, "wall_s"), _m(many, "wall_s")
        floor = _m(sc["samples"]["floor"], "wall_s") if "floor" in sc["samples"] else float("nan")
        cpu_ms = _m(many, "cpu_s") / jobs * 1000
        most_floor, most_cpu = SMALL_TARGETS.get(name, (3.0, 6.0))
        where = f"{jobs} jobs of 5 lanes at once on {DB_NAMES[name]}"
        marks = [
            targets.check(
                "",
                f"{where}: ≤ {most_floor}× the floor's same calls at once",
                f"{all_done / floor:.2f}×",
                all_done / floor <= most_floor,
                client,
            ),
            targets.check(
                "",
                f"{where}: service CPU ≤ {most_cpu:.0f} ms a job",
                f"{cpu_ms:.1f} ms",
                cpu_ms <= most_cpu,
                client,
            ),
        ]
        extra = [s["extra"] for s in many]
        lines.append(
            f"| {_service(db)} | {_fmt(one)} | {_fmt(all_done)} | {_fmt(floor)} "
            f"| {all_done / floor:.2f} | {all_done / one:.2f} "
            f"| {_fmt(all_done / limit_1000, 2)} "
            f"| {_fmt(_median([e['job_p50_s'] for e in extra]))} "
            f"| {_fmt(_median([e['job_max_s'] for e in extra]))} | {_fmt(_m(many, 'cpu_s'), 2)} "
            f"| {cpu_ms:.1f} | {sc['peak_mb'][db]:.0f} | {int(_m(many, 'in_flight'))} "
            f"| {sum(e.get('reconnects', 0) for e in extra)} | {' · '.join(marks)} |"
        )
    return lines


def stream_table(results: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| database | job | clients | events per client | deliveries measured | p50 ms | p99 ms "
        "| max ms | server CPU s | job wall s | connected within s "
        "| failed / closed early |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        runs = r["runs"]
        lines.append(
            f"| {_service(r['db'])} | {r['n']:,} lanes @ {r['latency_ms']} ms | {r['clients']} "
            f"| {int(_median([x['events_per_client'] for x in runs])):,} "
            f"| {int(_median([x['deliveries_measured'] for x in runs])):,} "
            f"| {_fmt(r['p50_ms'], 1)} | {_fmt(r['p99_ms'], 1)} | {_fmt(r['max_ms'], 1)} "
            f"| {_fmt(r['cpu_s'], 2)} | {_fmt(r['wall_s'], 2)} | {_fmt(r['connect_s'], 1)} "
            f"| {r['errors']} / {r['unfinished']} |"
        )
    return lines


def economy_table(rows: list[dict[str, Any]], targets: Targets) -> list[str]:
    """Each rule beside ``none``: calls, votes counted by kind, agreement, wall time."""
    none = next((row for row in rows if row["rule"] == "none"), None)
    kinds = list(rows[0]["votes_by_kind"]) if rows else []
    lines = [
        "| rule | calls per question | × fewer than none | "
        + " | ".join(f"votes counted, {kind}" for kind in kinds)
        + f" | agreement with none | wall s ({economy.QUESTIONS} jobs) | target |",
        "|---|---:|---:|" + "---:|" * len(kinds) + "---:|---:|---|",
    ]
    for row in rows:
        fewer = none["calls_per_question"] / row["calls_per_question"] if none else float("nan")
        agreement = 100 * row["agreement"]
        mark = ""
        if row["rule"] == "decided":
            what = "economy: `decided` agrees with `none` on every question"
            mark = targets.check("100 %", what, f"{agreement:.1f} %", row["agreement"] == 1.0)
        elif row["rule"] == "confidence 0.95":
            what = "economy: `confidence` 0.95 makes ≥ 3× fewer calls than `none`"
            mark = targets.check("≥ 3×", what, f"{fewer:.2f}×", fewer >= 3.0)
            what = "economy: `confidence` 0.95 agrees with `none` on ≥ 99 % of questions"
            mark += ", " + targets.check(
                "≥ 99 %", what, f"{agreement:.1f} %", row["agreement"] >= 0.99
            )
        votes = " | ".join(f"{row['votes_by_kind'].get(kind, 0):.1f}" for kind in kinds)
        lines.append(
            f"| {row['rule']} | {row['calls_per_question']:.1f} | {_fmt(fewer, 2)}× | {votes} "
            f"| {agreement:.1f} % | {_fmt(row['wall_s'], 1)} | {mark} |"
        )
    return lines


def map_table(scale: dict[str, Any], targets: Targets) -> list[str]:
    """The big map job on each database against the floor, with issue 13's targets."""
    items, concurrency = scale["n"], scale["max_concurrency"]
    floor = _m(scale["samples"]["raw"], "wall_s")
    lines = [
        "| who | wall s | × the floor | items/s | POST → 202 s | CPU s | peak MB | in flight "
        "| targets |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    size = f"{items:,} items @ {scale['latency_ms']} ms, max_concurrency {concurrency:,}"
    for who in sorted(scale["samples"], key=_order):
        samples = scale["samples"][who]
        wall, peak = _m(samples, "wall_s"), scale["peak_mb"][who]
        post, cell = "", ""
        if _is_service(who):
            db, client = _split(who)
            post_s = _median([s["extra"]["post_s"] for s in samples])
            post = _fmt(post_s, 2)
            bound = mapjob.RATIO_TARGETS.get(db, float("nan"))
            where = f"map of {size} on {DB_NAMES[db]}"
            marks = [
                targets.check(
                    f"≤ {bound:.1f}×",
                    f"{where}: ≤ {bound:.1f}× the floor",
                    f"{wall / floor:.2f}×",
                    wall / floor <= bound,
                    client,
                ),
                targets.check(
                    f"POST < {mapjob.POST_TARGET_S:.0f} s",
                    f"{where}: POST → 202 < {mapjob.POST_TARGET_S:.0f} s",
                    f"{post_s:.2f} s",
                    post_s < mapjob.POST_TARGET_S,
                    client,
                ),
                targets.check(
                    f"peak < {mapjob.PEAK_TARGET_MB:.0f} MB",
                    f"{where}: service peak memory < {mapjob.PEAK_TARGET_MB:.0f} MB",
                    f"{peak:.0f} MB",
                    peak < mapjob.PEAK_TARGET_MB,
                    client,
                ),
            ]
            cell = "; ".join(marks)
        label = FLOOR if who == "raw" else _label(who)
        lines.append(
            f"| {label} | {_fmt(wall)} | {wall / floor:.2f} | {items / wall:,.0f} | {post or '—'} "
            f"| {_fmt(_m(samples, 'cpu_s'), 2)} | {peak:.0f} | {int(_m(samples, 'in_flight'))} "
            f"| {cell} |"
        )
    return lines


def map_phases_table(scale: dict[str, Any]) -> list[str]:
    lines = [
        "| service | POST → job stored | → first lane claimed | → last attempt ended "
        "| → job decided | → caller has the final event | wall |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for who, phases in sorted(scale.get("phases", {}).items(), key=lambda kv: _order(kv[0])):
        total = sum(phases[p] for p in PHASES)
        cells = " | ".join(f"{1000 * phases[p]:,.0f}" for p in PHASES)
        lines.append(f"| {_service(who)} | {cells} | {1000 * total:,.0f} |")
    return lines


def map_economy_table(rows: list[dict[str, Any]]) -> list[str]:
    """Each rule beside ``none`` at each concurrency: lanes that ran, calls, agreement."""
    lines = [
        "| questions | max_concurrency | rule | lanes that ran per item | × fewer than none "
        "| calls per item (simulator) | votes counted per item | agreement with none "
        "| items without an answer | wall s |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        none = next(
            r
            for r in rows
            if r["rule"] == "none"
            and r["max_concurrency"] == row["max_concurrency"]
            and r.get("questions") == row.get("questions")
        )
        items = row["items"]
        fewer = none["lanes_ran"] / row["lanes_ran"] if row["lanes_ran"] else float("nan")
        lines.append(
            f"| {row.get('questions', '')} (`{row.get('answers', '')}`) "
            f"| {row['max_concurrency']} | {row['rule']} | {row['lanes_ran'] / items:.1f} "
            f"| {_fmt(fewer, 2)}× | {row['calls'] / items:.1f} | {_fmt(row['votes_counted'], 1)} "
            f"| {100 * row['agreement']:.1f} % | {row['unanswered']} | {_fmt(row['wall_s'], 1)} |"
        )
    return lines


def _limit_1000(results: dict[str, Any]) -> float:
    """The limit's time for 1,000 calls at 200 ms (the small jobs' total work), if measured."""
    for sc in results.get("voting") or []:
        if sc["n"] == 1000 and sc["latency_ms"] == 200:
            return _m(sc["samples"]["limit"], "wall_s")
    return float("nan")


def write_report(results: dict[str, Any], args: argparse.Namespace) -> str:
    facts = results["facts"]
    targets = Targets()
    body: list[str] = []
    if results.get("voting"):
        body += [
            "## Voting jobs against the limit",
            "",
            "The limit is a bare `asyncio.gather` of the same N calls (same `openai` client on "
            "its aiohttp transport, same fake LLM, no database) in a process of its own. "
            "Fanout's wall time is a caller's: `POST /v1/jobs` to the final event on the "
            "job's stream. `× limit` is the median over the median; lanes/s is N ÷ wall; "
            "CPU s is the process's user + system time over the run; peak MB is its VmHWM "
            "during the scenario (the limit's client or the whole service); in flight is the "
            "fake LLM's peak of concurrent requests. The *(reference)* row makes the same calls "
            "on bare aiohttp without the SDK (`bench/limit.py --client raw`): what a lean call "
            "path could reach; `--no-raw` skips it. Fanout has a row per database and lane "
            "call path (`FANOUT_LLM_CLIENT`): *Fanout · SQLite* is the default, lean path "
            "(aiohttp, plain dicts), on which the targets are judged; *· SDK path* runs the same "
            "jobs through the `openai` client, like the limit, kept as the reference and not "
            "judged; *· provider limits (not binding)* runs the lean path with the default "
            "provider's `max_concurrency`, `rpm` and `tpm` set so high that they never bind: "
            "beside the lean row, it shows what the cluster-wide provider limits cost a claim "
            "(a lock on the provider's row, a count of its lanes in flight, a token "
            "reservation per lane, settled when it ends). `--clients lean` runs the default "
            "path only.",
            "",
            *voting_table(results["voting"], targets),
            "",
            "### Where Fanout's time goes",
            "",
            "Milliseconds, medians; from the job's stored timestamps (millisecond "
            "resolution, one clock): the POST until the job is stored, until its first "
            "lane is claimed, until its last attempt ended (this includes the upstream "
            "latency), until the transaction that decided the job, until the caller "
            "received the final event."
            + (" The small jobs ran on the lean path only." if results.get("small") else ""),
            "",
            *phases_table(results["voting"], results.get("small") or []),
            "",
        ]
    found = results.get("overhead")
    if isinstance(found, dict) and found.get("samples"):
        body += [
            f"## Overhead: a {found['n']}-lane vote at 0 ms against the floor",
            "",
            overhead.describe(found["reps"], found["warmup"]),
            "",
            *overhead.table(found, targets.check, _service),
            "",
        ]
    if results.get("small"):
        body += [
            "## Many small jobs at once",
            "",
            f"{args.small_jobs} voting jobs of 5 lanes at 200 ms, each posted and followed on its "
            "own stream, all at once; the time until every job's final event, against "
            "**the floor**: the same calls at once on bare aiohttp (`bench/limit.py --client "
            "raw`, measured beside each burst), one such job alone, and the limit's time for "
            "the same 1,000 calls at once (from the voting section). *CPU ms a job* is the "
            "service's CPU over the burst divided by the jobs (issue 16: under 4 ms on SQLite, "
            "6 ms on PostgreSQL).",
            "",
            *small_table(results["small"], targets, args.small_jobs, _limit_1000(results)),
            "",
        ]
    if results.get("stream"):
        body += [
            "## Stream delay",
            "",
            f"One 1,000-lane job followed by {args.stream_clients} stream clients that connect "
            "right after the POST. Delay = receipt by a client − the event's `at` (the time "
            "its recording transaction began, so the delay includes that transaction and its "
            "commit; `at` has millisecond resolution). A client's delays count the events "
            "stamped after its stream opened; earlier ones are history it replays. "
            "*Connected within* is the time from the POST's answer until the last client's "
            "stream opened; *failed* counts clients refused (an error status), *closed early* "
            "streams that ended before the job's final event.",
            "",
            *stream_table(results["stream"]),
            "",
        ]
    if results.get("economy"):
        service = results["economy"][0]["service"]
        body += [
            "## The economy of a vote",
            "",
            economy.describe(_service(service)),
            "",
            *economy_table(results["economy"], targets),
            "",
        ]
    found = results.get("map")
    if isinstance(found, dict) and (found.get("scale") or found.get("economy")):
        body += ["## Map jobs", ""]
        scale = found.get("scale")
        if scale:
            body += [
                f"### {scale['n']:,} items against the floor",
                "",
                mapjob.describe_scale(scale["n"], scale["max_concurrency"]),
                "",
                *map_table(scale, targets),
                "",
            ]
            if scale.get("phases"):
                body += [
                    "Where the time went, in milliseconds, in each service's last run (its "
                    "stored timestamps, as in the voting section):",
                    "",
                    *map_phases_table(scale),
                    "",
                ]
        rows = found.get("economy")
        if rows:
            body += [
                f"### A vote per item: {rows[0]['items']} items of n = {mapjob.VOTES}",
                "",
                mapjob.describe_economy(_service(rows[0]["service"]), rows[0]["items"]),
                "",
                *map_economy_table(rows),
                "",
            ]
    head = [
        "# Fanout benchmark results",
        "",
        f"Run on {facts['date']} with `{' '.join(['python -m bench.run', *_argv(args)])}` "
        f"({results['duration_s']:.0f} s).",
        "",
        f"Service: commit {facts['service']}. "
        f"Machine: {facts['nproc']} CPUs ({facts['cpu']}), Linux {facts['kernel']}, "
        f"Python {facts['python']}, openai {facts['openai']}, aiohttp {facts['aiohttp']}, "
        f"uvloop {facts['uvloop']} (the service, the limit and the bench client all run on it). "
        f"Load average before {facts['load_before']}, after {facts.get('load_after')}.",
        "",
        f"Medians of {args.reps} repetition(s) after {args.warmup} warm-up. In a scenario each "
        "contender runs its warm-up and repetitions back to back, so its upstream connections "
        "stay warm (pools drop them after 5 idle seconds); who goes first rotates. The fake "
        "LLM keeps idle connections 75 s. Service "
        "settings: `FANOUT_MAX_CONCURRENCY=2000`, `FANOUT_MAX_LANES_PER_JOB=10000` and "
        "`FANOUT_MAX_BODY_BYTES=16000000` (raised for the map section's job; they only "
        "admit bigger jobs), "
        "`FANOUT_LOG_LEVEL=WARNING`, per-tenant caps off (`FANOUT_RATE_LIMIT_PER_MINUTE=0`, "
        "`FANOUT_MAX_JOBS_IN_FLIGHT=100000`), `FANOUT_LLM_CLIENT=lean` (the default) or `sdk` "
        "(the voting section only; the small-jobs, stream and map sections use the lean "
        "path, which keeps the bench's time bounded); each service has a database of its own; "
        "jobs: `fake?latency_ms=L&answers=391:1`, majority "
        "vote on the number, `early_stop: false`, `max_concurrency: N`.",
        "",
    ]
    idle = results.get("idle_mb")
    if idle:
        named = ", ".join(
            f"{LABELS[who] if who in LABELS else _service(who) + ' service'} {mb:.0f} MB"
            for who, mb in sorted(idle.items(), key=lambda item: _order(item[0]))
        )
        head += [f"Resident memory of each process before any work: {named}.", ""]
    closed_early = sum(
        sample["extra"].get("reconnects", 0)
        for section in ("voting", "small")
        for sc in results.get(section) or []
        for samples in sc["samples"].values()
        for sample in samples
    )
    if closed_early:
        head += [
            f"> {closed_early} event stream(s) closed before their job's final event; the "
            "client connected again, as an EventSource does, and the time includes that. "
            "This is a service bug (see the stream section).",
            "",
        ]
    for note in results.get("notes", []):
        head += [f"> {note}", ""]
    merged = results.get("merged")
    if merged and merged.get("origins"):
        by_run: dict[tuple[str, str], list[str]] = {}
        for section, origin in merged["origins"].items():
            by_run.setdefault((origin["date"], origin["service"]), []).append(section)
        for (date, commit), sections in by_run.items():
            origin = merged["origins"][sections[0]]
            duration = origin.get("duration_s")
            head += [
                f"> Kept from an earlier run (`--merge`): the section(s) "
                f"{', '.join(SECTION_TITLES.get(s, s) for s in sections)}, run on {date} "
                f"with commit {commit}"
                + (f" ({duration:.0f} s)" if isinstance(duration, int | float) else "")
                + "; this run measured "
                + ", ".join(SECTION_TITLES.get(s, s) for s in args.only)
                + ".",
                "",
            ]
            head += [f"> (earlier run) {note}" for note in origin.get("notes", [])]
            if origin.get("notes"):
                head.append("")
    if targets.rows:
        head += ["## Targets (issues 6, 12, 13 and 16)", ""]
        if any("sdk" in paths for paths in targets.rows.values()):
            head += [
                "Judged on the default, lean call path; the last column is the same target "
                "measured on the SDK path, the reference, for comparison only.",
                "",
            ]
        head += [*targets.table(), ""]
    return "\n".join(head + body)


def _argv(args: argparse.Namespace) -> list[str]:
    out = []
    if args.quick:
        out.append("--quick")
    if args.reps != (1 if args.quick else 3):
        out.append(f"--reps {args.reps}")
    if args.only != ["voting", "overhead", "small", "stream", "economy", "map"]:
        out.append(f"--only {','.join(args.only)}")
    if args.dbs != ["sqlite", "postgres"]:
        out.append(f"--db {','.join(args.dbs)}")
    if args.clients != list(CLIENTS):
        out.append(f"--clients {','.join(args.clients)}")
    if args.ns != [10, 100, 1000]:
        out.append(f"--ns {','.join(map(str, args.ns))}")
    if args.latencies != [200, 0]:
        out.append(f"--latencies {','.join(map(str, args.latencies))}")
    quick = args.quick
    if args.overhead_reps != (overhead.QUICK_REPS if quick else overhead.REPS):
        out.append(f"--overhead-reps {args.overhead_reps}")
    for flag, value, default in (
        ("--map-items", args.map_items, mapjob.QUICK_ITEMS if quick else mapjob.ITEMS),
        (
            "--map-concurrency",
            args.map_concurrency,
            mapjob.QUICK_MAX_CONCURRENCY if quick else mapjob.MAX_CONCURRENCY,
        ),
        (
            "--map-economy-items",
            args.map_economy_items,
            mapjob.QUICK_ECONOMY_ITEMS if quick else mapjob.ECONOMY_ITEMS,
        ),
    ):
        if value != default:
            out.append(f"{flag} {value}")
    if args.merge:
        out.append("--merge")
    if args.tree.resolve() != Path(__file__).resolve().parent.parent:
        out.append(f"--tree {args.tree}")
    return out
