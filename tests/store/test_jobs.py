"""Jobs as callers see them: created with their lanes and first event, idempotent,
capped per tenant, listed a page at a time, cancelled once."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import event

from service.errors import (
    BadCursor,
    IdempotencyConflict,
    JobFinished,
    JobNotFound,
    TenantAtCapacity,
)
from service.states import LaneStatus
from service.store import Outcome, Store
from service.store.db import Database
from tests.store.conftest import OWNER, parse
from tests.support import section, sectioning, voting

NUMBER = {"kind": "majority", "extract": "number"}


async def test_a_job_is_stored_with_its_lanes_queued_and_its_first_event(store: Store) -> None:
    job, created = await store.jobs.create(parse(voting(3)), "acme")
    assert created and job.status == "queued"
    assert [(lane.name, lane.status, lane.attempts) for lane in job.lanes] == [
        ("lane-0", "queued", 0),
        ("lane-1", "queued", 0),
        ("lane-2", "queued", 0),
    ]
    assert await store.jobs.get(job.id, "acme") == job
    events = await store.log.after(job.id, 0)
    assert [(e["seq"], e["type"]) for e in events] == [(1, "job.queued")]
    assert events[0]["data"]["lanes"] == ["lane-0", "lane-1", "lane-2"]


async def test_another_tenants_job_is_not_found(store: Store) -> None:
    job, _ = await store.jobs.create(parse(voting(1)), "acme")
    with pytest.raises(JobNotFound):
        await store.jobs.get(job.id, "globex")
    with pytest.raises(JobNotFound):
        await store.jobs.status(job.id, "globex")
    with pytest.raises(JobNotFound):
        await store.jobs.get("not-a-uuid", "acme")


async def test_one_idempotency_key_and_body_give_one_job(store: Store) -> None:
    spec = parse(voting(2))
    first, created = await store.jobs.create(spec, "acme", idempotency=("k", "hash-1"))
    again, created_again = await store.jobs.create(spec, "acme", idempotency=("k", "hash-1"))
    assert created and not created_again and again.id == first.id
    other_tenant, created_other = await store.jobs.create(
        spec, "globex", idempotency=("k", "hash-1")
    )
    assert created_other and other_tenant.id != first.id  # keys are per tenant


async def test_one_idempotency_key_with_another_body_is_a_conflict(store: Store) -> None:
    await store.jobs.create(parse(voting(2)), "acme", idempotency=("k", "hash-1"))
    with pytest.raises(IdempotencyConflict):
        await store.jobs.create(parse(voting(3)), "acme", idempotency=("k", "hash-2"))
    assert len((await store.jobs.page("acme", status=None, cursor=None, limit=10))[0]) == 1


async def test_a_tenant_at_its_cap_of_jobs_in_flight_is_refused(store: Store) -> None:
    for _ in range(2):
        await store.jobs.create(parse(voting(1)), "acme", max_in_flight=2)
    with pytest.raises(TenantAtCapacity) as refused:
        await store.jobs.create(parse(voting(1)), "acme", max_in_flight=2)
    assert (refused.value.in_flight, refused.value.cap) == (2, 2)
    await store.jobs.create(parse(voting(1)), "globex", max_in_flight=2)


async def test_jobs_are_listed_newest_first_a_page_at_a_time(store: Store) -> None:
    ids = [(await store.jobs.create(parse(voting(1)), "acme"))[0].id for _ in range(5)]
    await store.jobs.create(parse(voting(1)), "globex")
    seen, cursor = [], None
    while True:
        page, cursor = await store.jobs.page("acme", status=None, cursor=cursor, limit=2)
        seen += [job.id for job in page]
        if cursor is None:
            break
    assert seen == ids[::-1]
    await store.jobs.cancel(ids[0], "acme")
    cancelled, _ = await store.jobs.page("acme", status="cancelled", cursor=None, limit=10)
    assert [job.id for job in cancelled] == [ids[0]]


@pytest.mark.parametrize("cursor", ["nope", base64.urlsafe_b64encode(b'[1, "x"]').decode()])
async def test_a_cursor_the_store_did_not_give_out_is_refused(store: Store, cursor: str) -> None:
    with pytest.raises(BadCursor):
        await store.jobs.page("acme", status=None, cursor=cursor, limit=2)


async def test_cancel_ends_every_open_lane_and_the_job_at_once(store: Store) -> None:
    job, _ = await store.jobs.create(parse(sectioning(section("a"), section("b"))), "acme")
    claimed = await store.queue.claim(OWNER, 1)
    assert len(claimed.claims) == 1
    await store.jobs.cancel(job.id, "acme")
    view = await store.jobs.get(job.id, "acme")
    assert view.status == "cancelled"
    assert [lane.status for lane in view.lanes] == ["cancelled", "cancelled"]
    assert view.error is not None and view.error.type == "cancelled"
    events = [e["type"] for e in await store.log.after(job.id, 0)]
    assert events[-3:] == ["lane.cancelled", "lane.cancelled", "job.cancelled"]
    with pytest.raises(JobFinished):
        await store.jobs.cancel(job.id, "acme")


async def test_events_are_read_after_a_sequence_number_in_order(store: Store) -> None:
    job, _ = await store.jobs.create(parse(voting(3)), "acme")
    await store.queue.claim(OWNER, 10)
    events = await store.log.after(job.id, 0)
    assert [e["seq"] for e in events] == [1, 2, 3, 4, 5]
    assert [e["type"] for e in events] == ["job.queued", "job.running", *["lane.started"] * 3]
    assert [e["seq"] for e in await store.log.after(job.id, 3)] == [4, 5]
    assert await store.log.after(job.id, 5) == []
    assert all(json.loads(json.dumps(e["data"]))["seq"] == e["seq"] for e in events)


async def test_concurrent_creates_with_one_key_make_one_job(store: Store) -> None:
    spec = parse(voting(2))
    results = await asyncio.gather(
        *(store.jobs.create(spec, "acme", idempotency=("race", "h")) for _ in range(20))
    )
    assert len({job.id for job, _created in results}) == 1
    assert sum(created for _job, created in results) == 1
    assert len((await store.jobs.page("acme", status=None, cursor=None, limit=50))[0]) == 1


# --- big jobs: read without their lanes, their lanes a page at a time ---------------


@contextmanager
def statements_run(db: Database) -> Iterator[list[str]]:
    """The SQL statements the store sends while the block runs, on its reading engine."""
    sent: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        sent.append(statement)

    engine = db.sync_engine(db.reader)
    event.listen(engine, "before_cursor_execute", record)
    try:
        yield sent
    finally:
        event.remove(engine, "before_cursor_execute", record)


async def test_a_job_read_without_its_lanes_counts_them_and_reads_no_lane_row(
    store: Store, db: Database
) -> None:
    job, _ = await store.jobs.create(parse(voting(5)), "acme")
    await store.queue.claim(OWNER, 2)
    whole = await store.jobs.get(job.id, "acme")
    with statements_run(db) as sent:
        slim = await store.jobs.get(job.id, "acme", with_lanes=False)
    assert slim.lanes == [] and slim.progress == {"running": 2, "queued": 3}
    assert slim == whole.model_copy(update={"lanes": []})
    lane_reads = [sql for sql in sent if re.search(r"\bFROM lanes\b", sql)]
    assert lane_reads and all("GROUP BY" in sql for sql in lane_reads), lane_reads


async def test_a_job_without_its_lanes_is_still_another_tenants_to_hide(store: Store) -> None:
    job, _ = await store.jobs.create(parse(voting(1)), "acme")
    with pytest.raises(JobNotFound):
        await store.jobs.get(job.id, "globex", with_lanes=False)


async def walk_lanes(store: Store, job_id: str, **filters: Any) -> list[list[int]]:
    """Every page of the job's lanes, following the cursors: each page's lane indexes (a
    cursor that went nowhere would page for ever: 100 pages is a failure)."""
    pages, cursor = [], None
    for _ in range(100):
        lanes, cursor = await store.jobs.lane_page(job_id, "acme", cursor=cursor, **filters)
        pages.append([lane.index for lane in lanes])
        if cursor is None:
            return pages
        assert cursor == str(lanes[-1].index)
    raise AssertionError(f"no last page after {len(pages)} pages")


async def test_a_cursor_walks_every_lane_once_in_lane_order(store: Store) -> None:
    job, _ = await store.jobs.create(parse(voting(25)), "acme")
    await store.jobs.create(parse(voting(3)), "acme")  # another job's lanes stay out
    pages = await walk_lanes(store, job.id, limit=10)
    assert pages == [list(range(10)), list(range(10, 20)), list(range(20, 25))]


async def test_a_last_full_page_has_no_next_cursor(store: Store) -> None:
    job, _ = await store.jobs.create(parse(voting(4)), "acme")
    assert await walk_lanes(store, job.id, limit=2) == [[0, 1], [2, 3]]
    first, cursor = await store.jobs.lane_page(job.id, "acme", limit=1)
    assert [lane.index for lane in first] == [0] and cursor == "0"


async def test_a_page_of_lanes_shows_them_as_the_whole_job_does(store: Store) -> None:
    """Each lane as in the job, a mixed ensemble's task index too (read from the spec
    in the database, by a JSON path on both engines)."""
    task = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}
    spec = {"mode": "voting", "n": 5, "tasks": [task, {**task, "temperature": 0.5}]}
    job, _ = await store.jobs.create(parse(spec), "acme")
    await store.queue.claim(OWNER, 2)
    lanes, _ = await store.jobs.lane_page(job.id, "acme", limit=100)
    assert [lane.task for lane in lanes] == [0, 1, 0, 1, 0]
    assert lanes == (await store.jobs.get(job.id, "acme")).lanes


async def test_lanes_are_filtered_by_status_across_pages(store: Store) -> None:
    job, _ = await store.jobs.create(parse(voting(7)), "acme")
    await store.queue.claim(OWNER, 3)
    assert await walk_lanes(store, job.id, status="running", limit=2) == [[0, 1], [2]]
    assert await walk_lanes(store, job.id, status="queued", limit=3) == [[3, 4, 5], [6]]
    assert await walk_lanes(store, job.id, status="succeeded", limit=3) == [[]]


async def test_a_lane_is_found_by_its_name(store: Store) -> None:
    spec = sectioning(section("draft"), section("safety"), section("style"))
    job, _ = await store.jobs.create(parse(spec), "acme")
    lanes, cursor = await store.jobs.lane_page(job.id, "acme", name="safety", limit=10)
    assert [(lane.index, lane.name) for lane in lanes] == [(1, "safety")] and cursor is None
    assert (await store.jobs.lane_page(job.id, "acme", name="Safety", limit=10))[0] == []


async def test_the_lanes_of_another_tenants_or_an_unknown_job_are_not_found(
    store: Store,
) -> None:
    job, _ = await store.jobs.create(parse(voting(2)), "acme")
    for job_id, tenant in [(job.id, "globex"), (str(uuid.uuid4()), "acme"), ("nope", "acme")]:
        with pytest.raises(JobNotFound):
            await store.jobs.lane_page(job_id, tenant, limit=10)
    assert len((await store.jobs.lane_page(job.id, None, limit=10))[0]) == 2


@pytest.mark.parametrize("cursor", ["", "-1", "1.5", "x", "1234567890"])
async def test_a_lane_cursor_of_another_form_is_refused(store: Store, cursor: str) -> None:
    job, _ = await store.jobs.create(parse(voting(2)), "acme")
    with pytest.raises(BadCursor):
        await store.jobs.lane_page(job.id, "acme", cursor=cursor, limit=10)


async def test_any_lane_cursor_of_the_form_is_a_position(store: Store) -> None:
    job, _ = await store.jobs.create(parse(voting(3)), "acme")
    assert (await store.jobs.lane_page(job.id, "acme", cursor="999999999", limit=10))[0] == []
    after_one, _ = await store.jobs.lane_page(job.id, "acme", cursor="001", limit=10)
    assert [lane.index for lane in after_one] == [2]


async def test_jobs_are_listed_with_their_results_when_asked(store: Store) -> None:
    done, _ = await store.jobs.create(parse(voting(1, aggregate=NUMBER)), "acme")
    (claim,) = (await store.queue.claim(OWNER, 1)).claims
    now = time.time()
    answer = Outcome(
        done.id,
        claim.idx,
        claim.attempt_no,
        LaneStatus.SUCCEEDED,
        output="Answer: 7",
        started_at=now,
        finished_at=now,
    )
    await store.outcomes.record(OWNER, [answer])
    cancelled, _ = await store.jobs.create(parse(voting(1)), "acme")
    await store.jobs.cancel(cancelled.id, "acme")
    queued, _ = await store.jobs.create(parse(voting(1)), "acme")

    listed, _ = await store.jobs.page("acme", status=None, cursor=None, limit=10, with_results=True)
    by_id = {job.id: job for job in listed}
    assert by_id[done.id].result is not None and by_id[done.id].result.output == 7
    assert by_id[done.id].error is None
    assert by_id[cancelled.id].result is None
    assert by_id[cancelled.id].error is not None and by_id[cancelled.id].error.type == "cancelled"
    assert by_id[queued.id].result is None and by_id[queued.id].error is None
    plain, _ = await store.jobs.page("acme", status=None, cursor=None, limit=10)
    assert all(job.result is None and job.error is None for job in plain)
