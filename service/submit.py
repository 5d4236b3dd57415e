"""``fanout submit SPEC.json [--watch]``: post a job, optionally follow it live."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def sse_events(response: httpx.Response) -> Iterator[tuple[str, dict[str, Any]]]:
    """Parse a text/event-stream response into (event type, data) pairs."""
    kind, data = "message", []
    for line in response.iter_lines():
        if not line:
            if data:
                yield kind, json.loads("\n".join(data))
            kind, data = "message", []
        elif line.startswith("event:"):
            kind = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())


def submit(spec_path: Path, *, url: str, api_key: str | None, watch: bool, cancel_on_exit: bool) -> int:
    body = sys.stdin.read() if str(spec_path) == "-" else spec_path.read_text()
    with httpx.Client(base_url=url, headers=_headers(api_key), timeout=30) as client:
        response = client.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"})
        if response.status_code != 202:
            print(f"error {response.status_code}: {response.text}", file=sys.stderr)
            return 2
        job = response.json()
        print(f"job {job['id']}  {url.rstrip('/')}/jobs/{job['id']}")
        if not watch:
            return 0
        try:
            return _watch(client, job["id"])
        except KeyboardInterrupt:
            if cancel_on_exit:
                client.post(f"/v1/jobs/{job['id']}/cancel")
                print("cancelled", file=sys.stderr)
            return 130


def _watch(client: httpx.Client, job_id: str) -> int:
    final: dict[str, Any] = {}
    with client.stream("GET", f"/v1/jobs/{job_id}/events", timeout=None) as response:
        for kind, data in sse_events(response):
            if kind.startswith("lane."):
                print(f"  {data.get('name', data.get('lane'))}: {kind[5:]}")
            elif kind.startswith("job."):
                print(kind)
                final = data
    if "result" in final:
        print(json.dumps(final["result"], indent=2))
        return 1 if final["result"].get("blocked") else 0
    print(json.dumps(final.get("error"), indent=2))
    return 1
