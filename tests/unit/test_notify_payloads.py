"""The NOTIFY wire format: what a transaction announces, and live deltas, each payload
under PostgreSQL's 8,000-byte limit. No database."""

from __future__ import annotations

import json
from typing import Any

from service.notify import (
    DELTAS_CHANNEL,
    EVENTS_CHANNEL,
    MAX_PAYLOAD,
    WORK_CHANNEL,
    delta_notifications,
    notifications,
)


def event(job_id: str, seq: int, kind: str = "lane.started") -> dict[str, Any]:
    return {"job_id": job_id, "seq": seq, "type": kind, "data": {}}


def test_a_transaction_is_announced_as_one_seq_range_per_job() -> None:
    notes = notifications("me", [event("a", 4), event("a", 5), event("b", 1), event("a", 6)])
    assert notes == [(EVENTS_CHANNEL, '{"o":"me","j":[["a",4,6],["b",1,1]]}')]


def test_payloads_stay_under_the_postgres_limit_however_many_jobs() -> None:
    batch = [event(f"{i:036d}", 7) for i in range(1000)]
    notes = notifications("me", batch)
    assert len(notes) > 1
    assert all(len(payload.encode()) < MAX_PAYLOAD < 8000 for _channel, payload in notes)
    announced = [tuple(item) for _c, payload in notes for item in json.loads(payload)["j"]]
    assert announced == [(e["job_id"], 7, 7) for e in batch]


def test_workers_are_woken_only_when_lanes_became_claimable() -> None:
    def channels(kind: str) -> list[str]:
        return [channel for channel, _payload in notifications("me", [event("a", 1, kind)])]

    assert channels("job.queued") == [EVENTS_CHANNEL, WORK_CHANNEL]
    assert channels("lane.retrying") == [EVENTS_CHANNEL, WORK_CHANNEL]
    assert channels("lane.succeeded") == [EVENTS_CHANNEL]


def delta(job_id: str, text: str, lane: int = 0) -> dict[str, Any]:
    data = {
        "job_id": job_id,
        "seq": 0,
        "at": "t",
        "lane": lane,
        "name": "n",
        "attempt": 1,
        "text": text,
    }
    return {"job_id": job_id, "seq": 0, "type": "lane.delta", "data": data}


def carried(notes: list[tuple[str, str]]) -> list[dict[str, Any]]:
    assert all(channel == DELTAS_CHANNEL for channel, _payload in notes)
    assert all(len(payload.encode()) < MAX_PAYLOAD for _channel, payload in notes)
    return [data for _c, payload in notes for data in json.loads(payload)["d"]]


def test_deltas_share_a_payload_while_they_fit() -> None:
    notes = delta_notifications("me", [delta("a", "Hello "), delta("b", "world", lane=1)])
    assert len(notes) == 1 and json.loads(notes[0][1])["o"] == "me"
    assert [(d["job_id"], d["lane"], d["text"]) for d in carried(notes)] == [
        ("a", 0, "Hello "),
        ("b", 1, "world"),
    ]


def test_a_delta_too_long_for_one_payload_is_split_and_joins_back() -> None:
    text = "é" * 3000 + '\n"quoted"' + "x" * 9000  # multi-byte and escaped characters
    parts = carried(delta_notifications("me", [delta("a", text)]))
    assert len(parts) > 2
    assert "".join(part["text"] for part in parts) == text
    assert {(part["job_id"], part["lane"], part["attempt"]) for part in parts} == {("a", 0, 1)}


def test_many_deltas_are_spread_over_payloads_in_order() -> None:
    batch = [delta(f"{i:036d}", f"chunk {i} " * 20) for i in range(200)]
    parts = carried(delta_notifications("me", batch))
    assert [part["job_id"] for part in parts] == [e["job_id"] for e in batch]
