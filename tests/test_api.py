from __future__ import annotations

import httpx

from tests.support import run_job, voting


async def test_voting_job_returns_the_majority_answer(client: httpx.AsyncClient) -> None:
    job = await run_job(client, voting(5, "fake?answers=391:1", task={"seed": 1},
                                      aggregate={"kind": "majority", "extract": "number",
                                                                 "early_stop": False}))
    assert job["status"] == "succeeded"
    assert job["result"]["output"] == 391
    assert job["progress"] == {"succeeded": 5}
