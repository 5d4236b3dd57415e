"""The committed OpenAPI document makes a good client: openapi-python-client generates
one, a small program written against it type-checks under ``mypy --strict``, and that
program runs against a live server (create, get with and without lanes, a job's lanes
and the list paged with their cursors, cancel, a typed 422)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.config import Settings
from tests.e2e.test_readme import blocks
from tests.support import serve

ROOT = Path(__file__).parents[2]
BIN = Path(sys.executable).parent

PROGRAM = '''
"""An integrator's program: only the generated client, typed."""

import json
import sys
import time

from fanout_api import Client
from fanout_api.api.jobs import cancel_job, create_job, get_job, list_job_lanes, list_jobs
from fanout_api.models import (
    JobPage,
    JobStatus,
    JobView,
    LanePage,
    MajorityDetails,
    Problem,
    ResultView,
    VotingSpec,
)
from fanout_api.types import UNSET, Unset

FINAL = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED}


def spec(n: int, model: str = "fake?answers=7") -> VotingSpec:
    task = {"model": model, "messages": [{"role": "user", "content": "7?"}]}
    aggregate = {"kind": "majority", "extract": "number", "early_stop": False}
    return VotingSpec.from_dict({"mode": "voting", "n": n, "task": task, "aggregate": aggregate})


def created(client: Client, body: VotingSpec, key: str | Unset = UNSET) -> JobView:
    job = create_job.sync(client=client, body=body, idempotency_key=key)
    assert isinstance(job, JobView), job
    return job


def finished(client: Client, job_id: str) -> JobView:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        job = get_job.sync(job_id, client=client)
        assert isinstance(job, JobView), job
        if job.status in FINAL:
            return job
        time.sleep(0.05)
    raise TimeoutError(job_id)


def main(base_url: str) -> None:
    report: dict[str, object] = {}
    with Client(base_url=base_url, raise_on_unexpected_status=True) as client:
        job = finished(client, created(client, spec(3), key="first-job").id)
        assert job.result is not None
        details = job.result.details
        assert isinstance(details, MajorityDetails), details
        report["job"] = {
            "status": str(job.status),
            "output": job.result.output,
            "agreement": details.agreement,
            "lanes": [str(lane.status) for lane in job.lanes],
            "created_before_finished": job.finished_at is not None
            and job.created_at <= job.finished_at,
        }
        report["same_key_same_job"] = created(client, spec(3), key="first-job").id == job.id

        slim = get_job.sync(job.id, client=client, lanes=False)
        assert isinstance(slim, JobView), slim
        report["slim"] = {"lanes": len(slim.lanes), "progress": slim.progress.to_dict()}
        paged: list[list[int]] = []
        lane_cursor: str | Unset = UNSET
        while len(paged) < 10:
            lanes = list_job_lanes.sync(job.id, client=client, limit=2, cursor=lane_cursor)
            assert isinstance(lanes, LanePage), lanes
            paged.append([lane.index for lane in lanes.lanes])
            if lanes.next_cursor is None:
                break
            lane_cursor = lanes.next_cursor
        report["lanes_paged"] = paged
        with_results = list_jobs.sync(client=client, results=True)
        assert isinstance(with_results, JobPage), with_results
        (summary,) = [summary for summary in with_results.jobs if summary.id == job.id]
        assert isinstance(summary.result, ResultView), summary.result
        report["listed_output"] = summary.result.output

        ids = {created(client, spec(1)).id for _ in range(3)} | {job.id}
        listed: list[str] = []
        cursor: str | Unset = UNSET
        while True:
            page = list_jobs.sync(client=client, limit=2, cursor=cursor)
            assert not isinstance(page, Problem) and page is not None, page
            listed += [summary.id for summary in page.jobs]
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
        report["listed_all"] = ids <= set(listed) and len(listed) == len(set(listed))

        slow = created(client, spec(2, model="fake?latency_ms=20000"))
        cancelled = cancel_job.sync(slow.id, client=client)
        assert isinstance(cancelled, JobView), cancelled
        report["cancelled"] = str(finished(client, slow.id).status)
        again = cancel_job.sync(slow.id, client=client)
        assert isinstance(again, Problem), again
        report["cancel_again"] = {"status": again.status, "code": str(again.code)}

        refused = create_job.sync(client=client, body=spec(0))
        assert isinstance(refused, Problem), refused
        assert refused.errors, refused
        report["refused"] = {
            "status": refused.status,
            "code": str(refused.code),
            "fields": [[str(part) for part in error.loc] for error in refused.errors],
        }
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
'''


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The client openapi-python-client makes of the committed document, and the
    program beside it."""
    where = tmp_path_factory.mktemp("generated")
    (command,) = blocks("generate-client")  # the README's command, as written
    command = command.replace(".venv/bin/", f"{BIN}/").replace(
        "openapi/openapi.json", str(ROOT / "openapi" / "openapi.json")
    )
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}  # it runs ruff
    subprocess.run(["bash", "-c", command], cwd=where, check=True, capture_output=True, env=env)
    (where / "program.py").write_text(PROGRAM)
    return where


def test_a_program_on_the_generated_client_type_checks(generated: Path) -> None:
    checked = subprocess.run(
        [BIN / "mypy", "--strict", "--no-incremental", "--follow-imports=silent", "program.py"],
        cwd=generated,
        capture_output=True,
        text=True,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


async def test_a_program_on_the_generated_client_runs_against_a_live_server(
    generated: Path, sqlite_settings: Settings
) -> None:
    async with serve(sqlite_settings) as served:
        program = await asyncio.create_subprocess_exec(
            sys.executable,
            "program.py",
            served.url,
            cwd=generated,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(program.communicate(), 60)
    assert program.returncode == 0, err.decode()
    report = json.loads(out)
    assert report["job"] == {
        "status": "succeeded",
        "output": 7,
        "agreement": 1.0,
        "lanes": ["succeeded"] * 3,
        "created_before_finished": True,
    }
    assert report["same_key_same_job"] is True
    assert report["slim"] == {"lanes": 0, "progress": {"succeeded": 3}}
    assert report["lanes_paged"] == [[0, 1], [2]]
    assert report["listed_output"] == 7
    assert report["listed_all"] is True
    assert report["cancelled"] == "cancelled"
    assert report["cancel_again"] == {"status": 409, "code": "job_finished"}
    assert report["refused"]["status"] == 422
    assert report["refused"]["code"] == "invalid_request"
    assert report["refused"]["fields"] == [["body", "n"]]
