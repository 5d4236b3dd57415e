"""``GET /jobs/{id}``: one self-contained HTML page that shows a job's lanes live.

The page is a static file (``static/job.html``, inline CSS and JS, no CDN, no build
step). Its script reads the job id from its own URL, draws the job from
``GET /v1/jobs/{id}``, then follows ``GET /v1/jobs/{id}/events``; this route only
checks that the caller's tenant has the job, so an unknown id is a plain 404.

A big job (over 200 lanes: a 10,000-item map) is read with ``?lanes=false``; the page
counts its lanes by state, and a per-item map's items, from the stream (read from its
first event), and shows its lanes a page of 100 at a time from
``GET /v1/jobs/{id}/lanes``, updating only the rows shown; drawing waits for the next
animation frame, so a burst of events is drawn once.

Everything the page shows comes from callers and LLMs, so the page never parses it
as HTML; the Content-Security-Policy makes that a rule the browser enforces: only the
page's own inline script and style run (pinned by hash), and Trusted Types make any
``innerHTML = string`` throw.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from functools import cache
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from ..states import FINAL_EVENTS, TERMINAL_JOB, EventType, JobStatus, LaneStatus
from .deps import Reader, context
from .openapi import problems

router = APIRouter()
# The banner that says the answers come from the simulator (`make run` with no provider).
SIMULATED_HIDDEN = '<div id="simulated" class="banner" hidden>'
SIMULATED_SHOWN = '<div id="simulated" class="banner">'

PAGE = Path(__file__).with_name("static") / "job.html"


def _hash(source: str) -> str:
    digest = hashlib.sha256(source.encode()).digest()
    return f"'sha256-{base64.b64encode(digest).decode()}'"


def vocabulary() -> dict[str, Any]:
    """What the page's script knows of statuses and events, from :mod:`service.states`."""
    lanes_shown = [LaneStatus.SUCCEEDED, LaneStatus.RUNNING, LaneStatus.QUEUED]
    lanes_shown += [status for status in LaneStatus if status not in lanes_shown]
    rank = {JobStatus.QUEUED: 0, JobStatus.RUNNING: 1, JobStatus.AGGREGATING: 2}
    return {
        "final_events": sorted(FINAL_EVENTS),
        "lane_terminal": [status for status in LaneStatus if status.terminal],
        "job_terminal": list(TERMINAL_JOB),
        "job_rank": {status: rank.get(status, 3) for status in JobStatus},
        "lane_statuses": lanes_shown,
        "event_types": list(EventType),
    }


@cache
def _page() -> tuple[str, str]:
    """The page and its Content-Security-Policy, read once."""
    data = json.dumps(vocabulary(), separators=(",", ":"))
    html = PAGE.read_text(encoding="utf-8").replace("/*VOCABULARY*/", data)
    # Only the page's script runs (the vocabulary is a data block, never executed).
    scripts = " ".join(_hash(s) for s in re.findall(r"<script>(.*?)</script>", html, re.S))
    styles = " ".join(_hash(s) for s in re.findall(r"<style>(.*?)</style>", html, re.S))
    policy = (
        "default-src 'none'; "
        f"script-src {scripts}; style-src {styles}; "
        "connect-src 'self'; img-src data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'; "
        "require-trusted-types-for 'script'"
    )
    return html, policy


@router.get(
    "/jobs/{job_id}",
    response_class=HTMLResponse,
    responses=problems(404),
    tags=["pages"],
    operation_id="jobPage",
)
async def job_page(request: Request, tenant: Reader, job_id: str) -> HTMLResponse:
    """The job's lanes, votes or gate verdicts, usage and result, live in a browser.

    With API keys configured, open it as ``/jobs/{id}?token=...``, with the job's
    ``stream_token``: the page passes it on to the API (an EventSource cannot send an
    ``Authorization`` header, and a key in a URL would end up in logs)."""
    process = context(request).process
    await process.store.jobs.status(job_id, tenant)  # another tenant's: 404
    html, policy = _page()
    if process.settings.simulator:
        html = html.replace(SIMULATED_HIDDEN, SIMULATED_SHOWN, 1)
    return HTMLResponse(
        html,
        headers={
            "Content-Security-Policy": policy,
            "Cache-Control": "no-cache",
            "Referrer-Policy": "no-referrer",
            "X-Content-Type-Options": "nosniff",
        },
    )
