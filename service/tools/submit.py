"""``fanout submit SPEC.json [--watch]``: post a job, optionally follow it live.

Without ``--watch`` the command prints the job's id and page URL and returns. With it,
the job is followed on its event stream and shown as one row per lane (a live table
on a terminal; one final table otherwise, so pipes and logs get plain, stable text),
then its result or error is printed as JSON. A big job (more than ``BIG_JOB`` lanes:
a 10,000-item map, say) shows at most a screenful of rows, the busiest (running,
failed, the latest to end), under its counts by state and, for a vote per item, by item.

Following a job, through the client (:mod:`service.client`)::

    Fanout.create(lanes=False) ──► the job ──► Board: counts, one row per lane
                                                  ▲ each event, once (the first,
    Fanout.stream(job id) ────────────────────────┘ job.queued, names the lanes)
        the client reopens a dropped stream after the last event seen; after
        len(RETRY_DELAYS) reconnects in a row that bring no new event, it gives up

Exit codes: 0 the job succeeded; 1 it failed, was cancelled or was blocked by a gate;
2 it was not created (the spec was refused or unreadable, or the server unreachable);
3 the event stream was lost and could not be resumed (the job may still be running);
130 interrupted (Ctrl-C), after cancelling the job if ``--cancel-on-exit`` was given.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from ..client import Event, Fanout, FanoutError, Job, Retries, StreamLost
from ..states import (
    FINAL_EVENTS,
    JOB_EVENT,
    LANE_ENDED,
    OPEN_LANE,
    EventType,
    JobStatus,
    LaneStatus,
)

EXIT_SUCCEEDED = 0
EXIT_FAILED = 1
EXIT_NOT_CREATED = 2
EXIT_LOST = 3
EXIT_INTERRUPTED = 130

# Pauses before each reconnect in a row that brings no new event; then the watch gives up.
RETRY_DELAYS: tuple[float, ...] = (0.2, 0.5, 1.0, 2.0, 4.0, 8.0)
# A job of more lanes than this ends with a screenful of rows, not one row per lane.
BIG_JOB = 200

STATE_STYLES: dict[str, str] = {
    LaneStatus.QUEUED: "dim",
    LaneStatus.RUNNING: "cyan",
    LaneStatus.SUCCEEDED: "green",
    LaneStatus.FAILED: "bold red",
    LaneStatus.TIMED_OUT: "red",
    LaneStatus.CANCELLED: "magenta",
    LaneStatus.SKIPPED: "dim",
}
# A job's status, and a lane's end, as their events announce them.
JOB_STATUS_OF: dict[str, JobStatus] = {event: status for status, event in JOB_EVENT.items()}
LANE_ENDED_BY: dict[str, LaneStatus] = {event: status for status, event in LANE_ENDED.items()}
VERDICT_STYLES = {"passed": "green", "blocked": "bold red"}
# Shown first when not every row fits: lanes that ended badly.
TROUBLE = (LaneStatus.FAILED, LaneStatus.TIMED_OUT)


def _timestamp(at: Any) -> float | None:
    if not isinstance(at, str):
        return None
    try:
        return datetime.fromisoformat(at).timestamp()
    except ValueError:
        return None


@dataclass
class LaneRow:
    index: int
    name: str
    state: str = LaneStatus.QUEUED
    attempts: int = 0
    started: float | None = None  # server time the first attempt started
    attempt_started: float | None = None  # ... and the latest one
    ended: float | None = None
    answer: Any = None
    error: str | None = None


class Board:
    """The job as this client has seen it: one row per lane, updated by each event.

    The live display renders it from its own thread, so every read and write holds
    the lock. Times are the server's (each event's ``at``); between events the clock
    runs on from the last one by the local monotonic clock, so a skewed local clock
    never shows in the elapsed times.
    """

    def __init__(self, job: Mapping[str, Any]) -> None:
        self.job_id: str = job["id"]
        self.status: str = job.get("status", JobStatus.QUEUED)
        spec = job.get("spec") or {}
        self.answer_title = _answer_title(job.get("mode"), spec)
        # Lanes an item has, for a map with a vote per item (its items are counted).
        per_item = spec.get("per_item") if job.get("mode") == "map" else None
        self.votes_per_item: int = per_item.get("n", 0) if isinstance(per_item, dict) else 0
        # The counts by state the job came with (created without its lanes), until the
        # stream's job.queued names the lanes.
        self.progress: dict[str, int] = dict(job.get("progress") or {})
        self.rows = [
            LaneRow(
                lane["index"],
                lane["name"],
                lane.get("status", LaneStatus.QUEUED),
                lane.get("attempts", 0),
            )
            for lane in job.get("lanes", [])
        ]
        self.last_seq = 0
        self.vote: dict[str, Any] | None = None  # where a majority stands, as last told
        self.final: Event | None = None
        self.first_at = _timestamp(job.get("created_at"))
        self._server_time = self.first_at or time.time()
        self._received = time.monotonic()
        self._lock = threading.Lock()

    def apply(self, event: Event) -> bool:
        """Take one event into account; False when it was seen already (or is live-only)."""
        if event.id <= self.last_seq:
            return False
        with self._lock:
            self.last_seq = event.id
            at = _timestamp(event.data.get("at"))
            if at is not None:
                self._server_time, self._received = at, time.monotonic()
                self.first_at = self.first_at or at
            if event.type in JOB_STATUS_OF:
                self.status = JOB_STATUS_OF[event.type]
                names = event.data.get("lanes")
                if event.type == EventType.JOB_QUEUED and not self.rows and isinstance(names, list):
                    self.rows = [LaneRow(i, str(name)) for i, name in enumerate(names)]
                if event.type in FINAL_EVENTS:
                    self.final = event
            else:
                self._apply_lane(event.type, event.data, at)
        return True

    def _apply_lane(self, kind: str, data: dict[str, Any], at: float | None) -> None:
        index = data.get("lane")
        if not isinstance(index, int) or not 0 <= index < len(self.rows):
            return
        row = self.rows[index]
        row.attempts = max(row.attempts, int(data.get("attempt") or 0))
        if kind == EventType.LANE_STARTED:
            row.state, row.error = LaneStatus.RUNNING, None
            row.attempt_started = at
            row.started = row.started if row.started is not None else at
        elif kind == EventType.LANE_RETRYING:
            row.state, row.error = LaneStatus.QUEUED, str(data.get("error") or "")
        elif kind in LANE_ENDED_BY:
            row.state = LANE_ENDED_BY[kind]
            row.ended = at
            duration = data.get("duration_s")
            if (
                row.attempt_started is not None
                and isinstance(duration, int | float)
                and at is not None
            ):
                # Outcomes are recorded in batches: the attempt's own duration is closer.
                row.ended = min(at, row.attempt_started + duration)
            if "answer" in data:
                row.answer = data["answer"]
            if isinstance(data.get("vote"), dict):
                self.vote = data["vote"]
            error = data.get("error")
            row.error = (
                f"{error.get('type')}: {error.get('message')}" if isinstance(error, dict) else None
            )

    def now(self) -> float:
        """The server's clock, as far as this client can tell."""
        if self.final is not None:
            return self._server_time
        return self._server_time + time.monotonic() - self._received

    def table(self, limit: int | None = None) -> Table:
        """The lanes as a table; with ``limit``, at most that many rows (the busiest),
        the last of which says how many more there are."""
        with self._lock:
            rows = self._visible(limit)
            now = self.now()
            table = Table(box=box.SIMPLE, pad_edge=False, show_edge=False)
            table.add_column("lane", no_wrap=True, overflow="ellipsis")
            table.add_column("state", no_wrap=True)
            table.add_column("attempts", justify="right", no_wrap=True)
            table.add_column("elapsed", justify="right", no_wrap=True)
            if self.answer_title:
                table.add_column(self.answer_title, no_wrap=True, max_width=30, overflow="ellipsis")
            with_errors = any(row.error for row in rows)
            if with_errors:
                # The one column that wraps, so the one that gives way on a narrow
                # screen; its cells do not wrap but end in an ellipsis.
                table.add_column("error")
            for row in rows:
                cells: list[RenderableType] = [
                    row.name,
                    Text(row.state, style=STATE_STYLES.get(row.state, "")),
                    str(row.attempts),
                    _elapsed(row, now),
                ]
                if self.answer_title:
                    cells.append(_answer_cell(row.answer))
                if with_errors:
                    cells.append(Text(row.error or "", "red", no_wrap=True, overflow="ellipsis"))
                table.add_row(*cells)
            hidden = len(self.rows) - len(rows)
            if hidden:
                table.add_row(Text(f"... {hidden} more lanes", style="dim"))
            return table

    def final_limit(self, screen: int) -> int | None:
        """Rows of the table printed at the end: every lane's, unless the job is big."""
        return None if len(self.rows) <= BIG_JOB else screen

    def _visible(self, limit: int | None) -> list[LaneRow]:
        if limit is None or len(self.rows) <= limit:
            return self.rows

        # Running lanes first, then those that failed, then the most recently finished,
        # then the ones waiting.
        def busy(row: LaneRow) -> tuple[int, float]:
            if row.state == LaneStatus.RUNNING:
                return (0, 0.0)
            if row.ended is not None:
                return (1 if row.state in TROUBLE else 2, -row.ended)
            return (3, float(row.index))

        chosen = sorted(self.rows, key=busy)[: max(1, limit - 1)]
        return sorted(chosen, key=lambda row: row.index)

    def summary(self) -> Text:
        """``job ID STATUS · n succeeded, m skipped [· items: i settled, j voting, k
        without an answer] [· the vote] · 1.2s [· 123 tokens]``."""
        with self._lock:
            counts = Counter(row.state for row in self.rows) if self.rows else self.progress
            parts = [
                f"job {self.job_id} {self.status}",
                ", ".join(
                    f"{counts[state]} {state}" for state in STATE_STYLES if counts.get(state)
                ),
            ]
            if self.votes_per_item and self.rows:
                parts.append(_items_text(self.rows, self.votes_per_item))
            if self.vote is not None:
                parts.append(_vote_text(self.vote))
            if self.first_at is not None:
                parts.append(_seconds(self.now() - self.first_at))
            usage = self.final.data.get("usage") if self.final is not None else None
            if isinstance(usage, dict) and usage.get("total_tokens"):
                parts.append(f"{usage['total_tokens']} tokens")
            return Text(" · ".join(part for part in parts if part))

    def render(self, limit: int) -> RenderableType:
        return Group(self.table(limit), self.summary())


def _items_text(rows: list[LaneRow], n: int) -> str:
    """``items: 3 settled, 1 voting, 0 without an answer``: a vote per item's items,
    settled once every lane has ended with an answer among them."""
    items = Counter[str]()
    for first in range(0, len(rows), n):
        votes = rows[first : first + n]
        if any(row.state in OPEN_LANE for row in votes):
            items["voting"] += 1
        elif any(row.state == LaneStatus.SUCCEEDED and row.answer is not None for row in votes):
            items["settled"] += 1
        else:
            items["without an answer"] += 1
    return "items: " + ", ".join(
        f"{items[state]} {state}" for state in ("settled", "voting", "without an answer")
    )


def _answer_title(mode: Any, spec: dict[str, Any]) -> str | None:
    """The header of the vote/verdict column, or None when no lane has one."""
    if mode == "voting":
        kind = (spec.get("aggregate") or {}).get("kind", "majority")
        return {"majority": "vote", "score": "score"}.get(kind)
    per_item = spec.get("per_item") if mode == "map" else None
    if isinstance(per_item, dict):
        kind = (per_item.get("aggregate") or {}).get("kind", "majority")
        return {"majority": "vote", "score": "score"}.get(kind)
    sections = spec.get("sections") or []
    if any(isinstance(s, dict) and s.get("gate") for s in sections):
        return "verdict"
    return None


def _vote_text(vote: dict[str, Any]) -> str:
    """``7 leads, 4 of 10 votes, confidence 0.97 · stopped by confidence``."""
    leader = json.dumps(vote.get("leader"), ensure_ascii=False)
    text = (
        f"{leader} leads, {vote.get('votes')} of {vote.get('of')} votes, "
        f"confidence {float(vote.get('confidence') or 0):.2f}"
    )
    if vote.get("stopped"):
        text += f" · stopped by {vote.get('rule')}"
    return text


def _answer_cell(answer: Any) -> Text:
    if answer is None:
        return Text("")
    if isinstance(answer, str):
        return Text(answer, style=VERDICT_STYLES.get(answer, ""))
    return Text(json.dumps(answer, ensure_ascii=False))


def _elapsed(row: LaneRow, now: float) -> str:
    if row.started is None:
        return "-"
    end = row.ended
    if end is None or row.state in OPEN_LANE:
        end = now
    return _seconds(end - row.started)


def _seconds(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, rest = divmod(int(seconds), 60)
    return f"{minutes}m{rest:02d}s"


def follow(fanout: Fanout, board: Board) -> None:
    """Read the job's events into ``board`` until its final event (the client resumes a
    dropped stream). Raises :class:`StreamLost`, or :class:`FanoutError` when the
    stream is refused (the job is not found, the key is not known)."""
    for event in fanout.stream(board.job_id, after=board.last_seq or None):
        board.apply(event)


def page_url(base: str, job: Job) -> str:
    """The job's page; with the job's stream token on a server with keys, so that a
    browser, which sends no key, may open it."""
    page = f"{base}/jobs/{quote(job['id'], safe='')}"
    token = job.get("stream_token")
    return f"{page}?token={quote(token, safe='')}" if token else page


def _say(message: str) -> None:
    """A message for the person, not the pipe: standard error, never wrapped."""
    print(message, file=sys.stderr, flush=True)


def submit(
    spec_path: Path,
    *,
    url: str,
    api_key: str | None,
    watch: bool,
    cancel_on_exit: bool,
    transport: httpx.BaseTransport | None = None,
) -> int:
    """Post the spec; with ``watch``, follow the job to its end. Returns the exit code."""
    try:
        body = sys.stdin.buffer.read() if str(spec_path) == "-" else spec_path.read_bytes()
    except OSError as exc:
        _say(f"cannot read the spec: {exc}")
        return EXIT_NOT_CREATED
    base = url.rstrip("/")
    retries = Retries(reconnect_s=RETRY_DELAYS)
    with Fanout(base, api_key, transport=transport, retries=retries) as fanout:
        try:
            # The file's JSON as it is (the server says what is wrong), and the job back
            # without its lanes: a 10,000-item map's are megabytes, and job.queued names them.
            job = fanout.create(body, lanes=False)
        except httpx.TransportError as exc:
            _say(f"cannot reach {base}: {exc}")
            return EXIT_NOT_CREATED
        except FanoutError as exc:
            _say(f"job refused: {exc}")
            return EXIT_NOT_CREATED
        except KeyboardInterrupt:
            _say("interrupted while posting the job; it may or may not have been created")
            return EXIT_INTERRUPTED
        console = Console(highlight=False)
        page = page_url(base, job)
        if not watch:
            print(f"job {job['id']} {job.get('status', 'queued')}\n{page}", flush=True)
            return EXIT_SUCCEEDED
        return _watch(fanout, Board(job), console, page, cancel_on_exit=cancel_on_exit)


@contextmanager
def _interruptible() -> Iterator[None]:
    """Let SIGINT stop the watch even when it was started with SIGINT ignored (as a
    non-interactive shell starts background commands): ``kill -INT`` means stop."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _watch(
    fanout: Fanout, board: Board, console: Console, page: str, *, cancel_on_exit: bool
) -> int:
    # Rows that fit on the screen with the table's head and the summary under it.
    screen = max(3, console.size.height - 6)
    try:
        with _interruptible():
            # Printed once Ctrl-C is sure to be handled: a script that waits for this
            # line may interrupt the watch from then on.
            print(f"job {board.job_id}  {page}", flush=True)
            if console.is_terminal:
                with Live(
                    console=console,
                    get_renderable=lambda: board.render(screen),
                    transient=True,
                    refresh_per_second=8,
                ):
                    follow(fanout, board)
            else:
                follow(fanout, board)
    except KeyboardInterrupt:
        console.print(board.table(board.final_limit(screen)))
        return _interrupted(fanout, board, cancel_on_exit=cancel_on_exit)
    except (StreamLost, FanoutError) as exc:
        console.print(board.table(board.final_limit(screen)))
        _say(
            f"lost the event stream of job {board.job_id}: {exc}\n"
            f"the job may still be running: GET /v1/jobs/{board.job_id}"
        )
        return EXIT_LOST
    console.print(board.table(board.final_limit(screen)))
    console.print(board.summary(), soft_wrap=True)
    return _report(board.final, console)


def _interrupted(fanout: Fanout, board: Board, *, cancel_on_exit: bool) -> int:
    if not cancel_on_exit:
        _say(f"stopped watching; job {board.job_id} goes on")
        return EXIT_INTERRUPTED
    try:
        fanout.cancel(board.job_id, lanes=False)
    except (httpx.TransportError, FanoutError) as exc:
        _say(f"could not cancel job {board.job_id}: {exc}")
    except KeyboardInterrupt:
        pass
    else:
        _say(f"cancelled job {board.job_id}")
    return EXIT_INTERRUPTED


def _report(final: Event | None, console: Console) -> int:
    assert final is not None
    if final.type == EventType.JOB_SUCCEEDED:
        result = final.data.get("result") or {}
        console.print_json(data=result)
        if result.get("blocked"):
            _say(f"blocked by the gate of section {result.get('blocked_by')!r}")
            return EXIT_FAILED
        return EXIT_SUCCEEDED
    if final.type == EventType.JOB_FAILED:
        console.print_json(data=final.data.get("error"))
        return EXIT_FAILED
    _say("the job was cancelled")
    return EXIT_FAILED
