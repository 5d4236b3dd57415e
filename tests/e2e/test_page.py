"""The job page ``GET /jobs/{id}``: served right, and end to end in headless Chromium.

Browser tests run the real app (runner included) under uvicorn on a loopback port, since
EventSource needs real HTTP, and drive Debian's ``chromium`` (``/usr/bin/chromium``)
with Playwright; Playwright's own browser download is never used. Without either they
are skipped, saying so, unless ``FANOUT_REQUIRE_BROWSER=1`` (set by CI), which makes
that a failure. They run on SQLite only: the page does not care about the database,
and the stream's resume is tested on both in the API tests.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from service.config import Settings
from tests.processes import Fleet, process_env, started
from tests.support import Served, events_of, receiver, section, sectioning, serve, user, voting

if TYPE_CHECKING:
    from playwright.async_api import Browser, ConsoleMessage, Page

CHROMIUM = "/usr/bin/chromium"
# Without the background-networking flags Chromium's own connections get refused here.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
REQUIRE_BROWSER = os.environ.get("FANOUT_REQUIRE_BROWSER") == "1"
ARTIFACTS = Path(__file__).parents[1] / "artifacts"
# A big job (more lanes than the page's BIG_JOB) is shown a page of PAGE_SIZE rows at a time.
PAGE_SIZE = 100
BIG_MAP = 10_000
DASH = "\N{EN DASH}"  # as the page writes a range of lanes
# Every long task (a script run of over 50 ms, when the tab answers nothing) as it ends.
LONG_TASKS = """window.longTasks = [];
new PerformanceObserver((list) => {
  for (const entry of list.getEntries()) window.longTasks.push(entry.duration);
}).observe({ type: "longtask", buffered: true });"""


def _browser_missing() -> str | None:
    if not os.path.exists(CHROMIUM):
        return f"{CHROMIUM} not found (apt-get install chromium)"
    if importlib.util.find_spec("playwright") is None:
        return "playwright is not installed (pip install playwright; never `playwright install`)"
    return None


BROWSER_MISSING = _browser_missing()
needs_browser = pytest.mark.skipif(
    BROWSER_MISSING is not None and not REQUIRE_BROWSER,
    reason=f"browser tests need Chromium and Playwright: {BROWSER_MISSING}",
)


# --- fixtures ------------------------------------------------------------------------


@pytest.fixture
def page_settings(sqlite_settings: Settings) -> Settings:
    return sqlite_settings


@pytest.fixture
async def served(page_settings: Settings) -> AsyncIterator[Served]:
    async with serve(page_settings) as served:
        yield served


@dataclass
class Remote:
    """A server in a process of its own, and a client of it."""

    url: str
    http: httpx.AsyncClient


@pytest.fixture
async def big_server(sqlite_url: str, fake_llm: str, tmp_path: Path) -> AsyncIterator[Remote]:
    """``fanout serve`` as a process of its own that takes a map of BIG_MAP items (its
    spec, about 130 KB, is under the default FANOUT_MAX_BODY_BYTES of 1 MB).

    Not in the test's process: there, its 10,000 lanes would share the event loop that
    drives the browser, and Playwright would wait seconds for each step."""
    env = process_env(sqlite_url, fake_llm, max_lanes_per_job=str(BIG_MAP), log_level="WARNING")
    fleet = Fleet(tmp_path, env)
    try:
        server = fleet.serve("serve")
        await started(server)
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            yield Remote(server.url, http)
    finally:
        fleet.close()


@dataclass
class Pages:
    """A browser context; every page it opens must raise no script or CSP error."""

    browser: Browser
    errors: list[str] = field(default_factory=list)

    async def open(self, url: str, *, init_script: str | None = None) -> Page:
        """The page at ``url``; ``init_script`` runs in it before the page's own."""
        context = await self.browser.new_context(viewport={"width": 1280, "height": 860})
        if init_script is not None:
            await context.add_init_script(init_script)
        page = await context.new_page()
        page.on("pageerror", lambda exc: self.errors.append(f"page error: {exc}"))
        page.on("console", self._console)
        await page.goto(url)
        return page

    def _console(self, message: ConsoleMessage) -> None:
        # Failed requests are logged as errors too (a dropped stream is one): only a
        # refused script, style or HTML sink is the page's fault.
        if message.type == "error" and any(
            word in message.text for word in ("Content Security Policy", "Trusted")
        ):
            self.errors.append(f"console: {message.text}")


@pytest.fixture
async def pages() -> AsyncIterator[Pages]:
    if BROWSER_MISSING is not None:
        pytest.fail(f"FANOUT_REQUIRE_BROWSER=1 but {BROWSER_MISSING}")
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        pages = Pages(browser)
        try:
            yield pages
        finally:
            await browser.close()
    assert pages.errors == []


async def post_job(served: Served, spec: dict[str, Any]) -> str:
    response = await served.http.post("/v1/jobs", json=spec)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def map_of(items: int, model: str, **fields: Any) -> dict[str, Any]:
    task = {"model": model, "messages": user("Say {{item}}."), **fields.pop("task", {})}
    return {"mode": "map", "items": [f"item-{i}" for i in range(items)], "task": task, **fields}


async def shown_counts(page: Page, selector: str, key: str) -> dict[str, int]:
    """The counts a summary list shows: ``{data-<key>: number}``."""
    return dict(
        await page.locator(selector).evaluate_all(
            f"""items => items.map(li => [li.dataset.{key},
                 Number(li.querySelector("b").textContent.replaceAll(",", ""))])"""
        )
    )


async def shown_lanes(page: Page) -> list[int]:
    rows = await page.locator("#lanes tr").evaluate_all("rows => rows.map(r => r.dataset.lane)")
    return [int(index) for index in rows]


# --- the route -----------------------------------------------------------------------


async def test_page_of_a_job_is_html_under_a_strict_content_security_policy(
    client: httpx.AsyncClient,
) -> None:
    job_id = (await client.post("/v1/jobs", json=voting(1))).json()["id"]
    response = await client.get(f"/jobs/{job_id}")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    policy = response.headers["content-security-policy"]
    assert "default-src 'none'" in policy
    assert "script-src 'sha256-" in policy
    assert "require-trusted-types-for 'script'" in policy
    assert "<script>" in response.text
    assert "innerHTML" not in response.text
    await events_of(client, job_id)  # let it finish before the app stops


async def test_page_of_an_unknown_job_is_404(client: httpx.AsyncClient) -> None:
    response = await client.get("/jobs/no-such-job")
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["status"] == 404


# --- in the browser ------------------------------------------------------------------


@needs_browser
async def test_page_shows_a_running_job_live_until_its_result(served: Served, pages: Pages) -> None:
    from playwright.async_api import expect

    spec = voting(
        5,
        "fake?latency_ms=500&jitter_ms=200&answers=391:3,392:1",
        task={"seed": 7},
        aggregate={"kind": "majority", "extract": "number", "early_stop": False},
        policy={"max_concurrency": 1},
    )
    job_id = await post_job(served, spec)
    page = await pages.open(f"{served.url}/jobs/{job_id}")

    await expect(page.locator("#job-id")).to_have_text(job_id)
    await expect(page.locator("#lanes tr[data-status=running]").first).to_be_visible()
    await expect(page.locator("body")).to_have_attribute(
        "data-job-status", "succeeded", timeout=20_000
    )

    job = (await served.http.get(f"/v1/jobs/{job_id}")).json()
    await expect(page.locator("#lanes tr[data-status=succeeded]")).to_have_count(5)
    await expect(page.locator("#result-output")).to_have_text(str(job["result"]["output"]))
    await expect(page.locator("#usage-total")).to_have_text(f"{job['usage']['total_tokens']:,}")
    await expect(page.locator("body")).to_have_attribute("data-stream", "done")
    votes = {
        answer: len([lane for lane in job["lanes"] if lane["answer"] == answer])
        for answer in {lane["answer"] for lane in job["lanes"]}
    }
    for answer, count in votes.items():
        await expect(page.locator(f'#votes li[data-answer="{answer}"] .count')).to_have_text(
            f"{count} / 5"
        )
    rule = re.compile(r"^every lane votes · 5 of 5 votes · leader confidence 0\.\d\d$")
    await expect(page.locator("#votes-rule")).to_have_text(rule)

    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(
        path=str(ARTIFACTS / "job-page.png"), full_page=True, animations="disabled"
    )

    missing = await page.goto(f"{served.url}/jobs/no-such-job")
    assert missing is not None and missing.status == 404


@needs_browser
async def test_page_resumes_after_a_dropped_stream(served: Served, pages: Pages) -> None:
    from playwright.async_api import expect

    spec = voting(
        5,
        "fake?latency_ms=500&answers=7",
        aggregate={"kind": "majority", "extract": "number", "early_stop": False},
        policy={"max_concurrency": 1},
    )
    job_id = await post_job(served, spec)
    page = await pages.open(f"{served.url}/jobs/{job_id}")
    await expect(page.locator("body")).to_have_attribute("data-stream", "live")
    await expect(page.locator("#lanes tr[data-status=running]")).to_have_count(1)

    # Cut the stream, and keep the browser off the network until the job has finished,
    # so the page has certainly missed events when it comes back.
    await page.context.set_offline(True)
    served.drop_connections()
    await expect(page.locator("body")).to_have_attribute("data-stream", "reconnecting")
    final = int((await events_of(served.http, job_id))[-1]["id"])
    await expect(page.locator("body")).to_have_attribute("data-job-status", "running")

    await page.context.set_offline(False)
    await expect(page.locator("body")).to_have_attribute(
        "data-job-status", "succeeded", timeout=20_000
    )
    shown = await page.locator("#lanes tr").evaluate_all("rows => rows.map(r => r.dataset.lane)")
    assert shown == ["0", "1", "2", "3", "4"]
    await expect(page.locator("#lanes tr[data-status=succeeded]")).to_have_count(5)
    await expect(page.locator("#result-output")).to_have_text("7")
    await expect(page.locator("#votes li[data-answer='7'] .count")).to_have_text("5 / 5")
    seen = await page.evaluate("window.fanoutJob")
    assert seen["connections"] >= 2
    # Every stored event arrived exactly once and in order, over both streams.
    assert seen["seqs"] == list(range(1, final + 1))


@needs_browser
async def test_page_shows_untrusted_text_as_text(served: Served, pages: Pages) -> None:
    from playwright.async_api import expect

    name = '<img src=x onerror="window.pwned=1">'
    text = "<script>window.pwned=2</script><b>bold</b> is not unsafe"
    spec = sectioning(
        section(name, text=text),
        section("safety", text="this is unsafe", gate={"block_if": "(?i)\\bunsafe\\b"}),
    )
    job_id = await post_job(served, spec)
    page = await pages.open(f"{served.url}/jobs/{job_id}")
    await expect(page.locator("body")).to_have_attribute(
        "data-job-status", "succeeded", timeout=20_000
    )

    await expect(page.locator("#lanes tr[data-lane='0'] td.name")).to_have_text(name)
    await expect(page.locator("#lanes tr[data-lane='0'] td.preview")).to_have_text(f"Echo: {text}")
    await expect(page.locator("#gates li[data-gate=safety] .badge")).to_have_text("blocked")
    await expect(page.locator("#result")).to_contain_text("blocked by safety")
    injected = ", ".join(
        f"{where} {tag}" for where in ("#lanes", "#result") for tag in ("img", "b", "script")
    )
    await expect(page.locator(injected)).to_have_count(0)
    assert await page.evaluate("window.pwned") is None


@needs_browser
async def test_page_shows_streamed_text_live_and_ends_on_cancel(
    served: Served, pages: Pages
) -> None:
    from playwright.async_api import expect

    spec = voting(2, "fake?words=400&chunk_ms=40", task={"stream": True})
    job_id = await post_job(served, spec)
    page = await pages.open(f"{served.url}/jobs/{job_id}")
    # lane.delta chunks grow the preview of a lane that is still running. They are live
    # only, so the page shows the text from when it connected: some words, not all.
    await page.wait_for_function(
        """() => [...document.querySelectorAll("#lanes tr[data-status=running]")]
                 .some(row => /w\\d+ w\\d+ w\\d+/.test(row.cells[7].textContent))""",
        timeout=10_000,
    )

    response = await served.http.post(f"/v1/jobs/{job_id}/cancel")
    assert response.status_code == 202
    await expect(page.locator("body")).to_have_attribute("data-job-status", "cancelled")
    await expect(page.locator("#lanes tr[data-status=cancelled]")).to_have_count(2)
    await expect(page.locator("#result")).to_contain_text("cancelled")
    await expect(page.locator("body")).to_have_attribute("data-stream", "done")


@needs_browser
async def test_page_carries_its_stream_token_to_the_api(
    page_settings: Settings, pages: Pages
) -> None:
    from playwright.async_api import expect

    keyed = page_settings.model_copy(update={"api_keys": "acme:key-acme"})
    async with serve(keyed) as served:
        spec = voting(2, "fake?latency_ms=300&answers=5")
        response = await served.http.post(
            "/v1/jobs", json=spec, headers={"Authorization": "Bearer key-acme"}
        )
        job_id, token = response.json()["id"], response.json()["stream_token"]
        page = await pages.open(f"{served.url}/jobs/{job_id}?token={token}")
        await expect(page.locator("body")).to_have_attribute(
            "data-job-status", "succeeded", timeout=20_000
        )
        await expect(page.locator("#lanes tr[data-status=succeeded]")).to_have_count(2)

        assert (await served.http.get(f"/jobs/{job_id}")).status_code == 401
        assert (await served.http.get(f"/jobs/{job_id}?token=wrong")).status_code == 401
        assert (await served.http.get(f"/jobs/{job_id}?key=key-acme")).status_code == 400


# --- big jobs: counts, and a page of lanes at a time ---------------------------------------


@needs_browser
async def test_page_of_a_10000_item_map_shows_live_counts_and_a_page_of_lanes(
    big_server: Remote, pages: Pages
) -> None:
    from playwright.async_api import expect

    spec = map_of(BIG_MAP, "fake?latency_ms=5", policy={"max_concurrency": 500})
    response = await big_server.http.post("/v1/jobs?lanes=false", json=spec)
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    opened = time.monotonic()
    page = await pages.open(f"{big_server.url}/jobs/{job_id}", init_script=LONG_TASKS)

    # One page of rows, not 10,000, soon; and counts that move while the job runs.
    await expect(page.locator("#lanes tr")).to_have_count(PAGE_SIZE)
    assert time.monotonic() - opened < 5, f"the page took {time.monotonic() - opened:.1f} s"
    assert await shown_lanes(page) == list(range(PAGE_SIZE))
    await expect(page.locator("#page-info")).to_have_text(f"lanes 1{DASH}100 of 10,000")
    await page.wait_for_function(
        """() => {
             const shown = document.querySelector("#legend li[data-state=succeeded] b");
             const n = Number(shown.textContent.replaceAll(",", ""));
             return n > 0 && n < 10000;
           }""",
        timeout=20_000,
    )

    await page.locator("#page-next").click()
    await expect(page.locator("#lanes tr").first).to_have_attribute("data-lane", "100")
    assert await shown_lanes(page) == list(range(PAGE_SIZE, 2 * PAGE_SIZE))
    await expect(page.locator("#page-info")).to_have_text(f"lanes 101{DASH}200 of 10,000")

    await expect(page.locator("body")).to_have_attribute(
        "data-job-status", "succeeded", timeout=30_000
    )
    job = (await big_server.http.get(f"/v1/jobs/{job_id}?lanes=false")).json()
    assert job["progress"] == {"succeeded": BIG_MAP}
    await expect(page.locator("#legend li[data-state=succeeded] b")).to_have_text("10,000")
    assert await shown_counts(page, "#legend li", "state") == job["progress"]
    # The rows shown were followed live: queued or running when read, succeeded now.
    await expect(page.locator("#lanes tr[data-status=succeeded]")).to_have_count(PAGE_SIZE)
    await page.locator("#page-prev").click()
    await expect(page.locator("#lanes tr").first).to_have_attribute("data-lane", "0")
    await page.locator("#lane-filter").select_option("running")
    await expect(page.locator("#page-info")).to_have_text("no running lanes")
    await expect(page.locator("#lanes tr")).to_have_count(0)
    # The tab never froze: no script ran long enough to be felt (a row each: seconds).
    longest = await page.evaluate("Math.max(0, ...window.longTasks)")
    assert longest < 1000, f"the longest task took {longest:.0f} ms"
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "job-page-big.png"), animations="disabled")


@needs_browser
async def test_page_of_a_vote_per_item_counts_items_and_carries_the_token_to_the_lanes(
    page_settings: Settings, pages: Pages
) -> None:
    from playwright.async_api import expect

    keyed = page_settings.model_copy(update={"api_keys": "acme:key-acme"})
    async with serve(keyed) as served:
        # 70 items, 3 votes each: 210 lanes, over the page's threshold of 200.
        spec = map_of(
            70,
            "fake?latency_ms=20&answers=7:2,8:1",
            task={"temperature": 0.8},
            per_item={"n": 3, "aggregate": {"kind": "majority", "extract": "number"}},
        )
        response = await served.http.post(
            "/v1/jobs?lanes=false", json=spec, headers={"Authorization": "Bearer key-acme"}
        )
        job_id, token = response.json()["id"], response.json()["stream_token"]
        page = await pages.open(f"{served.url}/jobs/{job_id}?token={token}")
        await expect(page.locator("body")).to_have_attribute(
            "data-job-status", "succeeded", timeout=20_000
        )
        headers = {"Authorization": "Bearer key-acme"}
        job = (await served.http.get(f"/v1/jobs/{job_id}?lanes=false", headers=headers)).json()

        await expect(page.locator("#items li[data-item=settled] b")).to_have_text("70")
        items = await shown_counts(page, "#items li[data-item]", "item")
        assert items == {"settled": 70, "voting": 0, "unanswered": 0}
        assert await shown_counts(page, "#legend li", "state") == job["progress"]
        # The first page of lanes, read from /v1/jobs/{id}/lanes with the token.
        await expect(page.locator("#lanes tr")).to_have_count(PAGE_SIZE)
        await expect(page.locator("#lanes tr td.name").first).to_have_text("item-0/0")


@needs_browser
async def test_page_of_a_big_vote_tallies_every_lane(served: Served, pages: Pages) -> None:
    from playwright.async_api import expect

    number = {"kind": "majority", "extract": "number", "early_stop": False}
    job_id = await post_job(served, voting(250, "fake?answers=7", aggregate=number))
    page = await pages.open(f"{served.url}/jobs/{job_id}")
    await expect(page.locator("body")).to_have_attribute(
        "data-job-status", "succeeded", timeout=20_000
    )

    await expect(page.locator("#votes li[data-answer='7'] .count")).to_have_text("250 / 250")
    await expect(page.locator("#lanes tr")).to_have_count(PAGE_SIZE)
    await page.locator("#page-next").click()
    await page.locator("#page-next").click()
    await expect(page.locator("#page-info")).to_have_text(f"lanes 201{DASH}250 of 250")
    assert await shown_lanes(page) == list(range(200, 250))
    await expect(page.locator("#page-next")).to_be_disabled()


# --- a web app on another origin ------------------------------------------------------------

APP_PAGE = """<!doctype html><meta charset=utf-8><title>app</title><pre id=out></pre><script>
const api = new URLSearchParams(location.search).get("api");
const out = document.getElementById("out");
const say = (line) => { out.textContent += line + "\\n"; };
(async () => {
  const response = await fetch(api + "/v1/jobs", {
    method: "POST",
    headers: {"Content-Type": "application/json", "Idempotency-Key": "web-1"},
    body: JSON.stringify(%s),
  });
  say("created " + response.status + " " + response.headers.get("Location"));
  const job = await response.json();
  const events = new EventSource(api + "/v1/jobs/" + job.id + "/events");
  events.addEventListener("job.succeeded", (e) => {
    say("final " + JSON.parse(e.data).result.output);
    events.close();
  });
  events.onerror = () => say("stream error");
})();
</script>"""


@needs_browser
async def test_a_web_app_on_another_origin_creates_and_follows_a_job(
    page_settings: Settings, pages: Pages
) -> None:
    from aiohttp import web
    from playwright.async_api import expect

    number = {"kind": "majority", "extract": "number"}
    spec = json.dumps(voting(3, "fake?latency_ms=100&answers=7", aggregate=number))

    async def app_page(_request: web.Request) -> web.Response:
        return web.Response(text=APP_PAGE % spec, content_type="text/html")

    async with receiver(app_page) as origin:
        allowed = page_settings.model_copy(update={"cors_origins": origin})
        async with serve(allowed) as served:
            page = await pages.open(f"{origin}/?api={served.url}")
            await expect(page.locator("#out")).to_contain_text("final 7", timeout=20_000)
            text = await page.locator("#out").inner_text()
            assert text.splitlines()[0].startswith("created 202 /v1/jobs/")
            assert "stream error" not in text
