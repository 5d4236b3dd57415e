"""``fanout submit``: the CLI as a process against ``fanout serve`` as a process, which runs
its lanes on the fake LLM as a process. Reconnecting is tested in-process, with the
network swapped for a function (``httpx.MockTransport``), because only there can a
stream be made to drop at a chosen event."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.config import Settings
from service.tools import submit as submit_module
from service.tools.submit import submit
from tests.support import free_port, section, sectioning, serve, voting, wait_http

CLI = [sys.executable, "-m", "service.cli"]
# A map of 2,000 items, each a vote of 2 lanes.
BIG_MAP_ITEMS, VOTES_PER_ITEM = 2_000, 2
BIG_MAP_LANES = BIG_MAP_ITEMS * VOTES_PER_ITEM
# Variables that would change what the CLI or the server does if the caller's shell set them.
_FOREIGN = ("FORCE_COLOR", "NO_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "COLUMNS", "LINES")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FANOUT_") and k not in _FOREIGN}
    return {**env, "COLUMNS": "120", **extra}


@pytest.fixture(scope="module")
def server(fake_llm: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``fanout serve`` on a free port with a fresh SQLite file; yields its URL."""
    directory = tmp_path_factory.mktemp("serve")
    port = free_port()
    log = (directory / "serve.log").open("wb")
    env = _env(
        FANOUT_DATABASE_URL=f"sqlite+aiosqlite:///{directory}/f.db",
        FANOUT_POLL_INTERVAL_S="0.2",
        FANOUT_MAX_LANES_PER_JOB=str(BIG_MAP_LANES),
        OPENAI_BASE_URL=fake_llm,
        OPENAI_API_KEY="x",
    )
    proc = subprocess.Popen(
        [*CLI, "serve", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        # Generous: importing the app takes seconds, many more on a busy CI machine.
        wait_http(f"http://127.0.0.1:{port}/healthz", proc, timeout=60)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


def spec_file(tmp_path: Path, spec: dict[str, Any]) -> Path:
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    return path


def fanout_submit(
    *args: str | Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "submit", *map(str, args)],
        env=env or _env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def lane_row(stdout: str, lane: str) -> list[str]:
    """The cells of one lane's row in the final table (split on runs of spaces)."""
    rows = [line.split() for line in stdout.splitlines() if line.split()[:1] == [lane]]
    assert len(rows) == 1, f"expected one row for {lane!r} in:\n{stdout}"
    return rows[0]


def printed_json(stdout: str) -> Any:
    """The JSON the CLI prints last (the job's result or error)."""
    lines = stdout.splitlines()
    return json.loads("\n".join(lines[lines.index("{") :]))


def wait_until(condition: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not true within {timeout} s: {condition}")
        time.sleep(0.05)


# --- against the real server --------------------------------------------------------------

slow = pytest.mark.slow


@slow
def test_watch_shows_each_lanes_vote_and_prints_the_result(server: str, tmp_path: Path) -> None:
    spec = voting(
        5,
        "fake?latency_ms=200&answers=391:3,392:1",
        task={"seed": 3},
        aggregate={"kind": "majority", "extract": "number", "early_stop": False},
    )
    done = fanout_submit(spec_file(tmp_path, spec), "--watch", "--url", server)

    assert done.returncode == 0, done.stderr
    rows = [lane_row(done.stdout, f"lane-{i}") for i in range(5)]
    assert [row[1:3] for row in rows] == [["succeeded", "1"]] * 5
    assert all(re.fullmatch(r"\d+\.\ds", row[3]) for row in rows)
    result = printed_json(done.stdout)
    assert result["output"] == 391
    votes = Counter(int(row[4]) for row in rows)
    assert votes == {v["answer"]: v["count"] for v in result["details"]["votes"]}
    # Where the vote stood after its last counted vote.
    summary = r"^job \S+ succeeded · 5 succeeded · 391 leads, 5 of 5 votes, confidence 0\.\d\d · "
    assert re.search(summary, done.stdout, re.M), done.stdout


@slow
def test_watch_exits_1_and_prints_the_error_of_a_failed_job(server: str, tmp_path: Path) -> None:
    spec = sectioning(
        section("draft", "fake?latency_ms=2000"),
        section("lookup", "fake?status=400"),
    )
    done = fanout_submit(spec_file(tmp_path, spec), "--watch", "--url", server)

    assert done.returncode == 1, done.stderr
    assert lane_row(done.stdout, "lookup")[1] == "failed"
    assert lane_row(done.stdout, "draft")[1] == "cancelled"  # fail_fast stopped it
    error = printed_json(done.stdout)
    assert error["type"] == "lane_failed"
    assert "lookup" in error["message"]


@slow
def test_watch_exits_1_when_a_gate_blocks_the_job(server: str, tmp_path: Path) -> None:
    spec = sectioning(
        section("draft", text="a poem"),
        section("safety", text="is it safe?", gate={"block_if": "(?i)echo"}),
    )
    done = fanout_submit(spec_file(tmp_path, spec), "--watch", "--url", server)

    assert done.returncode == 1, done.stderr
    safety = lane_row(done.stdout, "safety")
    assert (safety[1], safety[2], safety[4]) == ("succeeded", "1", "blocked")
    assert lane_row(done.stdout, "draft")[1] == "succeeded"
    result = printed_json(done.stdout)
    assert result["blocked"] is True
    assert result["blocked_by"] == "safety"
    assert "blocked by the gate of section 'safety'" in done.stderr


@slow
def test_a_refused_spec_exits_2_with_the_problem_detail(server: str, tmp_path: Path) -> None:
    spec = voting(0)
    done = fanout_submit(spec_file(tmp_path, spec), "--watch", "--url", server)

    assert done.returncode == 2
    assert "HTTP 422" in done.stderr
    assert "n: Input should be greater than or equal to 1" in done.stderr
    assert done.stdout == ""


@slow
def test_without_watch_it_prints_the_job_id_and_page_from_fanout_url(
    server: str, tmp_path: Path
) -> None:
    spec = voting(1, "fake?answers=391")
    done = fanout_submit(spec_file(tmp_path, spec), env=_env(FANOUT_URL=server))

    assert done.returncode == 0, done.stderr
    first, page = done.stdout.splitlines()
    job_id = re.fullmatch(r"job (\S+) (queued|running)", first)
    assert job_id is not None, done.stdout
    assert page == f"{server}/jobs/{job_id[1]}"
    assert httpx.get(f"{server}/v1/jobs/{job_id[1]}").status_code == 200


@slow
def test_ctrl_c_with_cancel_on_exit_cancels_the_job(server: str, tmp_path: Path) -> None:
    spec = voting(3, "fake?latency_ms=5000")
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    with out.open("w") as stdout, err.open("w") as stderr:
        proc = subprocess.Popen(
            [
                *CLI,
                "submit",
                str(spec_file(tmp_path, spec)),
                "--watch",
                "--cancel-on-exit",
                "--url",
                server,
            ],
            env=_env(),
            stdout=stdout,
            stderr=stderr,
        )
    try:
        # The job line is printed once the watch handles Ctrl-C.
        wait_until(lambda: out.read_text().startswith("job "))
        job_url = f"{server}/v1/jobs/{out.read_text().split()[1]}"
        wait_until(lambda: httpx.get(job_url).json()["progress"].get("running") == 3)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)

    job = httpx.get(job_url).json()
    assert job["status"] == "cancelled"
    assert job["progress"] == {"cancelled": 3}
    assert "cancelled job" in err.read_text()
    assert lane_row(out.read_text(), "lane-0")[1] == "running"  # the table as last seen


@slow
def test_watch_of_a_big_map_shows_a_screenful_of_lanes_and_the_counts(
    server: str, tmp_path: Path
) -> None:
    spec = {
        "mode": "map",
        "items": [f"item-{i}" for i in range(BIG_MAP_ITEMS)],
        "task": {
            "model": "fake?latency_ms=5&answers=7",
            "messages": [{"role": "user", "content": "Grade {{item}}, end with Answer: N."}],
        },
        "per_item": {"n": VOTES_PER_ITEM, "aggregate": {"kind": "majority", "extract": "number"}},
        "policy": {"max_concurrency": 500},
    }
    done = fanout_submit(spec_file(tmp_path, spec), "--watch", "--url", server)

    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    shown = lines[: lines.index("{")]  # then the result: a list of 2,000 answers
    job_id = shown[0].split()[1]
    job = httpx.get(f"{server}/v1/jobs/{job_id}?lanes=false").json()
    # A screenful (25 lines, not a terminal: 19 rows), not a row per lane.
    rows = [line for line in shown if re.match(r"item-\d+/\d ", line)]
    assert 3 <= len(rows) <= 19, done.stdout[:5000]
    assert len(shown) <= 25, "\n".join(shown)
    assert f"... {BIG_MAP_LANES - len(rows)} more lanes" in done.stdout
    summary = re.search(r"^job \S+ succeeded · (.+?) · items: (.+?) · ", done.stdout, re.M)
    assert summary is not None, "\n".join(shown)
    counts = {state: int(n) for n, state in (c.split() for c in summary[1].split(", "))}
    assert counts == job["progress"]
    assert summary[2] == f"{BIG_MAP_ITEMS} settled, 0 voting, 0 without an answer"
    assert printed_json(done.stdout)["output"] == [7] * BIG_MAP_ITEMS


async def test_on_a_server_with_keys_the_page_it_prints_opens_without_the_key(
    sqlite_settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with serve(sqlite_settings.model_copy(update={"api_keys": "acme:key-acme"})) as served:
        spec = spec_file(tmp_path, voting(1, "fake"))
        code = await asyncio.to_thread(
            submit, spec, url=served.url, api_key="key-acme", watch=False, cancel_on_exit=False
        )
        page = capsys.readouterr().out.splitlines()[1]
        with_token = await served.http.get(page)  # as a browser opens it: no key
        without = await served.http.get(page.partition("?")[0])

    assert code == 0
    assert re.fullmatch(rf"{served.url}/jobs/\S+\?token=\S+", page), page
    assert with_token.status_code == 200, with_token.text
    assert without.status_code == 401


# --- reconnecting, in-process --------------------------------------------------------------


def sse(*events: tuple[int, str, dict[str, Any]]) -> bytes:
    return b"".join(
        f"id: {seq}\nevent: {kind}\ndata: {json.dumps({'seq': seq, **data})}\n\n".encode()
        for seq, kind, data in events
    )


JOB = {
    "id": "j1",
    "status": "queued",
    "mode": "voting",
    "spec": {"mode": "voting", "n": 2},
    "created_at": "2026-01-01T00:00:00.000Z",
    "lanes": [
        {"index": 0, "name": "lane-0", "status": "queued", "attempts": 0},
        {"index": 1, "name": "lane-1", "status": "queued", "attempts": 0},
    ],
}
AT = {"at": "2026-01-01T00:00:01.000Z"}
EVENTS = [
    (1, "job.queued", {}),
    (2, "job.running", {}),
    (3, "lane.started", {"lane": 0, "name": "lane-0", "attempt": 1, **AT}),
    (4, "lane.started", {"lane": 1, "name": "lane-1", "attempt": 1, **AT}),
    (5, "lane.succeeded", {"lane": 0, "name": "lane-0", "attempt": 1, "answer": 391, **AT}),
    (6, "lane.retrying", {"lane": 1, "name": "lane-1", "attempt": 1, "error": "timeout: slow"}),
    (7, "lane.started", {"lane": 1, "name": "lane-1", "attempt": 2, **AT}),
    (8, "lane.succeeded", {"lane": 1, "name": "lane-1", "attempt": 2, "answer": 391, **AT}),
    (9, "job.aggregating", {}),
    (10, "job.succeeded", {"result": {"output": 391, "blocked": False}}),
]


class Dropping(httpx.SyncByteStream):
    """A response body that breaks off like a lost connection after ``body``."""

    def __init__(self, body: bytes) -> None:
        self.body = body

    def __iter__(self) -> Iterator[bytes]:
        yield self.body
        raise httpx.ReadError("connection reset by peer")


@pytest.fixture
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(submit_module, "RETRY_DELAYS", (0.0, 0.0, 0.0))


def run_submit(tmp_path: Path, handler: Callable[[httpx.Request], httpx.Response]) -> int:
    return submit(
        spec_file(tmp_path, {"mode": "voting", "n": 2}),
        url="http://fanout",
        api_key="k1",
        watch=True,
        cancel_on_exit=False,
        transport=httpx.MockTransport(handler),
    )


@pytest.mark.usefixtures("no_backoff")
def test_a_dropped_stream_resumes_after_the_last_event_seen(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.method == "POST":
            return httpx.Response(202, json=JOB)
        after = int(request.headers.get("Last-Event-ID", "0"))
        headers = {"Content-Type": "text/event-stream"}
        if after == 0:  # the first connection drops after event 4 ...
            return httpx.Response(200, headers=headers, stream=Dropping(sse(*EVENTS[:4])))
        if after == 4:  # ... the next ends cleanly after 7, with a duplicate of 4 ...
            return httpx.Response(200, headers=headers, content=sse(*EVENTS[3:7]))
        return httpx.Response(200, headers=headers, content=sse(*EVENTS[after:]))

    assert run_submit(tmp_path, handler) == 0

    streams = [r for r in seen if r.method == "GET"]
    assert [r.headers.get("Last-Event-ID") for r in streams] == [None, "4", "7"]
    assert all(r.headers["Authorization"] == "Bearer k1" for r in seen)
    out = capsys.readouterr().out
    assert lane_row(out, "lane-0") == ["lane-0", "succeeded", "1", "0.0s", "391"]
    assert lane_row(out, "lane-1")[:3] == ["lane-1", "succeeded", "2"]
    assert printed_json(out) == {"output": 391, "blocked": False}


@pytest.mark.usefixtures("no_backoff")
def test_watching_gives_up_after_bounded_reconnects(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    streams = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal streams
        if request.method == "POST":
            return httpx.Response(202, json=JOB)
        streams += 1
        if streams == 1:
            return httpx.Response(200, content=sse(*EVENTS[:3]))
        raise httpx.ConnectError("connection refused")

    assert run_submit(tmp_path, handler) == 3

    assert streams == 1 + 1 + 3  # the first, one that brought nothing new, then 3 retries
    captured = capsys.readouterr()
    assert "lost the event stream of job j1" in captured.err
    assert "gave up after 3 reconnects" in captured.err
    assert lane_row(captured.out, "lane-0")[1] == "running"
