"""What a caller of Fanout does: post a job, follow its event stream to the final event.

The client is aiohttp (cheap per request, no pool scan) and reads the stream as raw
bytes: the benchmark shares two cores with the service, so it spends as little CPU
as it can, and parses JSON only where it has to.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import aiohttp

QUESTION = "What is 17*23? End with 'Answer: N'."
FINAL_TYPES = (b"job.succeeded", b"job.failed", b"job.cancelled")


def voting_spec(n: int, latency_ms: int) -> dict[str, Any]:
    """N voting lanes that all run (no early stop), all allowed in flight at once."""
    return {
        "mode": "voting",
        "n": n,
        "task": {
            "model": f"fake?latency_ms={latency_ms}&answers=391:1",
            "messages": [{"role": "user", "content": QUESTION}],
        },
        "aggregate": {"kind": "majority", "extract": "number", "early_stop": False},
        "policy": {"max_concurrency": n},
    }


def session(limit: int = 0) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit, force_close=False),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
    )


class JobFailed(RuntimeError):
    pass


class StreamEnded(JobFailed):
    """The server closed a stream before the job's final event."""


@dataclass
class JobRun:
    job_id: str
    wall_s: float  # POST sent -> final event received
    posted_s: float  # POST sent -> 202 received
    final_type: str
    final: dict[str, Any]
    sent_at: float = 0.0  # epoch time the POST was sent
    final_at: float = 0.0  # epoch time the final event was received
    reconnects: int = 0  # streams the server closed before the final event


async def post_job(
    http: aiohttp.ClientSession,
    base: str,
    spec: dict[str, Any],
    params: dict[str, str] | None = None,
) -> str:
    """Create the job; its id. ``params``: the query (``{"lanes": "false"}``: the 202
    without the job's lanes)."""
    async with http.post(f"{base}/v1/jobs", json=spec, params=params) as response:
        body = await response.read()
        if response.status != 202:
            raise JobFailed(f"POST /v1/jobs: {response.status} {body[:300]!r}")
    job_id: str = json.loads(body)["id"]
    return job_id


def _split_events(buffer: bytes) -> tuple[list[bytes], bytes]:
    """Complete SSE blocks in ``buffer`` and what is left (the stream ends lines CRLF)."""
    buffer = buffer.replace(b"\r\n", b"\n")
    *blocks, rest = buffer.split(b"\n\n")
    return blocks, rest


def _field(block: bytes, name: bytes) -> bytes | None:
    for line in block.split(b"\n"):
        if line.startswith(name + b":"):
            return line[len(name) + 1 :].lstrip(b" ")
    return None


async def wait_final(
    http: aiohttp.ClientSession, base: str, job_id: str
) -> tuple[str, dict[str, Any]]:
    """Follow the job's stream until its final event; return its type and data."""
    async with http.get(f"{base}/v1/jobs/{job_id}/events") as response:
        if response.status != 200:
            raise JobFailed(f"GET events: {response.status} {(await response.read())[:300]!r}")
        tail = b""
        async for chunk in response.content.iter_any():
            data = tail + chunk
            # Only the final event needs parsing; skip the scan when it cannot be here.
            if b"event: job." in data:
                blocks, tail = _split_events(data)
                for block in blocks:
                    kind = _field(block, b"event")
                    if kind in FINAL_TYPES:
                        payload = _field(block, b"data") or b"{}"
                        return kind.decode(), json.loads(payload)
            else:
                # An "event: job." line cut in two is at most this long; a fragment of an
                # earlier block left at the front never reads as an event line.
                tail = data[-64:]
    raise StreamEnded(f"the stream of {job_id} ended without a final event")


async def run_job(
    http: aiohttp.ClientSession,
    base: str,
    spec: dict[str, Any],
    params: dict[str, str] | None = None,
) -> JobRun:
    """POST a job and follow it to its final event: the time a caller waits."""
    sent_at = time.time()
    started = time.perf_counter()
    job_id = await post_job(http, base, spec, params)
    posted = time.perf_counter() - started
    reconnects = 0
    while True:
        try:
            final_type, final = await wait_final(http, base, job_id)
            break
        except StreamEnded:
            # What an EventSource does: connect again (here replaying from the start,
            # which is rare enough not to matter), and count it: it is a service bug.
            reconnects += 1
            if reconnects > 3:
                raise
    wall = time.perf_counter() - started
    return JobRun(job_id, wall, posted, final_type, final, sent_at, time.time(), reconnects)


def epoch(iso_time: str | None) -> float:
    if iso_time is None:
        return float("nan")
    return datetime.fromisoformat(iso_time.replace("Z", "+00:00")).timestamp()


async def phases(http: aiohttp.ClientSession, base: str, run: JobRun) -> dict[str, float]:
    """Where a job's time went, from its stored timestamps (millisecond resolution):
    the POST until the job row exists, until the first lane is claimed, until the last
    attempt ended, until the deciding transaction, until the client had the final event."""
    async with http.get(f"{base}/v1/jobs/{run.job_id}") as response:
        job = await response.json()
    created, decided = epoch(job["created_at"]), epoch(job["finished_at"])
    claimed = min(epoch(lane["started_at"]) for lane in job["lanes"])
    ended = max(epoch(lane["finished_at"]) for lane in job["lanes"])
    return {
        "create_s": created - run.sent_at,
        "claim_s": claimed - created,
        "lanes_s": ended - claimed,
        "decide_s": decided - ended,
        "deliver_s": run.final_at - decided,
    }


def check_voting(run: JobRun, n: int) -> None:
    """Every lane ran and voted 391: the work was really done."""
    if run.final_type != "job.succeeded":
        raise JobFailed(f"job {run.job_id} ended {run.final_type}: {run.final}")
    result = run.final.get("result") or {}
    if result.get("output") != 391:
        raise JobFailed(f"job {run.job_id}: unexpected result {result}")
    usage = run.final.get("usage") or {}
    if n and not usage.get("total_tokens"):
        raise JobFailed(f"job {run.job_id}: no usage recorded {run.final}")


# --- stream delay ----------------------------------------------------------------


@dataclass
class StreamWatch:
    """One stream client's receipts: (event type, seq, ``at`` of the event, received at)."""

    connected_at: float = 0.0
    receipts: list[tuple[bytes, int, float, float]] = field(default_factory=list)


def _parse_at(block: bytes) -> float | None:
    start = block.find(b'"at":"')
    if start < 0:
        return None
    end = block.index(b'"', start + 6)
    text = block[start + 6 : end].decode().replace("Z", "+00:00")
    return datetime.fromisoformat(text).timestamp()


async def watch(
    http: aiohttp.ClientSession, base: str, job_id: str, watch_into: StreamWatch
) -> None:
    """Read one job's stream to its end, noting when each event arrived (epoch time)."""
    async with http.get(f"{base}/v1/jobs/{job_id}/events") as response:
        if response.status != 200:
            raise JobFailed(f"GET events: {response.status} {(await response.read())[:500]!r}")
        watch_into.connected_at = time.time()
        tail = b""
        async for chunk in response.content.iter_any():
            received = time.time()
            blocks, tail = _split_events(tail + chunk)
            for block in blocks:
                kind = _field(block, b"event")
                seq = _field(block, b"id")
                at = _parse_at(block)
                if kind is None or at is None:
                    continue
                watch_into.receipts.append((kind, int(seq or 0), at, received))
                if kind in FINAL_TYPES:
                    return
