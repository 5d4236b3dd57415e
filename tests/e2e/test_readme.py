"""The README stays true: its quick start runs, its tables match the code.

Blocks marked ``<!-- test: NAME -->`` (the line right before a fenced block) are the
ones checked here:

- ``quickstart``: run, in order, by bash against a real ``fanout serve
  --simulator-fallback`` (what ``make run`` runs; temp SQLite, no provider configured)
  on a free port; the README's port 8000 and ``.venv/bin/`` are substituted, and
  ``curl`` fails on any HTTP error.
- ``quickstart-server``: ``make run``; the test starts its equivalent itself, and
  checks that the Makefile runs what it assumes.
- ``spec``: job specs that must parse and pass the server's checks.
- ``providers``: a providers file that must load.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import TypeAdapter

from service.admission import check_against
from service.config import Settings, load_providers
from service.http import create_app
from service.spec import JobSpec, stored
from tests.support import free_port, wait_http

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
VENV_BIN = Path(sys.executable).parent

README_API = "http://127.0.0.1:8000"

_BLOCK = re.compile(r"<!--\s*test:\s*([\w-]+)\s*-->\s*\n```[\w-]*\n(.*?)^```", re.S | re.M)

# Every curl of the quick start must succeed: HTTP errors fail the script, nothing hangs.
PRELUDE = """\
set -euo pipefail
curl() { command curl --fail-with-body --show-error --max-time 20 "$@"; }
"""


def readme() -> str:
    return README.read_text(encoding="utf-8")


def blocks(tag: str) -> list[str]:
    found = [body for name, body in _BLOCK.findall(readme()) if name == tag]
    assert found, f"README.md has no block marked <!-- test: {tag} -->"
    return found


def section(title: str) -> str:
    """The text of the README section headed ``## title``, up to the next ``## ``."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", readme(), re.S | re.M)
    assert match, f"README.md has no '## {title}' section"
    return match.group(1)


def table_rows(text: str) -> list[list[str]]:
    """The cells of every markdown table row in ``text`` (header and rule excluded)."""
    rows = []
    for line in text.splitlines():
        if not line.startswith("|") or set(line) <= set("|-: "):
            continue
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows[1:] if rows else rows


# --- processes --------------------------------------------------------------------


def _clean_env() -> dict[str, str]:
    """This environment without any FANOUT_* or OPENAI_* of its own (CI sets some)."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("FANOUT_", "OPENAI_"))}


@dataclass(frozen=True)
class QuickStart:
    api: str  # Fanout's base URL (the README's http://127.0.0.1:8000)
    dir: Path  # terminal 2's working directory
    env: dict[str, str]  # terminal 2's environment


# What `make run` runs (the test checks the Makefile says so).
MAKE_RUN = ["serve", "--simulator-fallback"]


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory: pytest.TempPathFactory) -> Iterator[QuickStart]:
    """The quick start's terminal 1: `make run` with no provider configured (SQLite)."""
    tmp = tmp_path_factory.mktemp("readme")
    port = free_port()
    api_url = f"http://127.0.0.1:{port}"
    env = _clean_env()
    server_env = {
        **env,
        "FANOUT_DATABASE_URL": f"sqlite+aiosqlite:///{tmp}/fanout.db",
        "FANOUT_LOG_FORMAT": "text",
    }
    log = tmp / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", *MAKE_RUN, "--port", str(port)],
            cwd=ROOT,
            env=server_env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_http(f"{api_url}/healthz", proc, log=log, timeout=60)
        said = log.read_text()
        assert "SIMULATOR" in said and f"{api_url}/simulator/v1" in said, said
        yield QuickStart(api_url, tmp, env)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


# --- the quick start --------------------------------------------------------------


def test_quickstart_server_is_the_one_the_test_starts() -> None:
    """Terminal 1 is `make run`, which serves with the simulator fallback on the
    default address."""
    (server,) = blocks("quickstart-server")
    assert server.strip() == "make run"
    makefile = (ROOT / "Makefile").read_text()
    run = re.search(r"^run:.*\n\t(.*)$", makefile, re.M)
    assert run and run.group(1) == "$(BIN)/fanout " + " ".join(MAKE_RUN), run
    defaults = Settings.model_fields
    assert f"http://{defaults['host'].default}:{defaults['port'].default}" == README_API


@pytest.mark.slow
def test_quickstart_commands_run_against_real_processes(quickstart: QuickStart) -> None:
    api = quickstart.api
    script = PRELUDE + "\n".join(blocks("quickstart"))
    script = script.replace(README_API, api).replace(".venv/bin/", f"{VENV_BIN}/")
    env = {**quickstart.env, "FANOUT_URL": api}

    done = subprocess.run(
        ["bash", "-c", script],
        cwd=quickstart.dir,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=90,
    )

    output = f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    assert done.returncode == 0, output
    # Both `curl -sN .../events` streams ran to their final event.
    assert done.stdout.count("event: job.succeeded") == 2, output
    jobs = httpx.get(f"{api}/v1/jobs", timeout=10).json()["jobs"]
    # voting, sectioning, fanout submit, a vote over tool calls, a reasoning model, 4 maps
    assert len(jobs) == 9, jobs
    # 500 summaries in groups of 10: 50 groups, then 5, then the last call over those 5.
    assert "\n55\n" in done.stdout, output
    assert "succeeded {'inputs': 500, 'levels': 3}" in done.stdout, output
    assert "{'succeeded': 300} mean grades: [" in done.stdout, output
    assert "['essay-1', 'essay-2', 'essay-3'] ['Echo: Grade 1-10: Rain" in done.stdout, output
    assert "('Rain', 2, ['doc-1', 'doc-2'])" in done.stdout, output
    for summary in jobs:
        job: dict[str, Any] = httpx.get(f"{api}/v1/jobs/{summary['id']}", timeout=10).json()
        assert job["status"] == "succeeded", job
        assert not job["result"]["blocked"], job
        if job["mode"] == "voting":
            assert job["result"]["output"] == 391, job  # what the README says it is
        page = httpx.get(f"{api}/jobs/{job['id']}", timeout=10)
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert '<div id="simulated" class="banner">' in page.text  # says who answered


# --- the reference ----------------------------------------------------------------


def _default_matches(default: Any, cell: str) -> bool:
    literal = cell[1:-1] if cell.startswith("`") and cell.endswith("`") else None
    if default is None:
        return cell.startswith("none")
    if default == "":
        return cell == "empty"
    if isinstance(default, bool):
        return literal == str(default).lower()
    if isinstance(default, int | float):
        try:
            return literal is not None and float(literal) == float(default)
        except ValueError:
            return False
    return literal == str(default)


def test_configuration_table_lists_every_setting_with_its_default() -> None:
    rows = {
        row[0].strip("`"): row[1]
        for row in table_rows(section("Configuration"))
        if row and row[0].startswith("`")
    }
    settings = {f"FANOUT_{name.upper()}": field for name, field in Settings.model_fields.items()}

    missing = sorted(settings.keys() - rows.keys())
    assert not missing, f"settings missing from the README's configuration table: {missing}"
    unknown = sorted(rows.keys() - settings.keys() - {"OPENAI_API_KEY", "OPENAI_BASE_URL"})
    assert not unknown, f"the configuration table names settings that do not exist: {unknown}"
    wrong = {
        env: (rows[env], field.default)
        for env, field in settings.items()
        if not _default_matches(field.default, rows[env])
    }
    assert not wrong, f"defaults in the README differ from config.py (README, code): {wrong}"


def test_http_api_table_names_real_routes() -> None:
    app = create_app(Settings(database_url="sqlite+aiosqlite:///:memory:"))

    def shape(path: str) -> str:  # `/v1/jobs/{id}` documents `/v1/jobs/{job_id}`
        return re.sub(r"\{[^}]*\}", "{}", path)

    # The OpenAPI document lists the API's routes; the docs' own routes are not in it.
    routes = {
        (method.upper(), shape(path))
        for path, operations in app.openapi()["paths"].items()
        for method in operations
    }
    routes |= {
        (method, shape(route.path))
        for route in app.routes
        if isinstance(getattr(route, "path", None), str)
        for method in (getattr(route, "methods", None) or ())
    }
    documented = []
    for row in table_rows(section("HTTP API")):
        documented += re.findall(r"`([A-Z]+) (/[^`]*)`", row[0])
    assert len(documented) >= 10
    absent = [
        f"{method} {path}" for method, path in documented if (method, shape(path)) not in routes
    ]
    assert not absent, f"the README's API table names routes the app does not have: {absent}"


def test_spec_examples_are_valid_jobs() -> None:
    adapter: TypeAdapter[Any] = TypeAdapter(JobSpec)
    settings = Settings(database_url="sqlite+aiosqlite:///:memory:")
    for body in blocks("spec"):
        spec = adapter.validate_python(json.loads(body))
        check_against(spec, settings)
        assert adapter.validate_python(stored(spec)) == spec  # as another process reads it


def test_providers_file_example_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (body,) = blocks("providers")
    path = tmp_path / "providers.toml"
    path.write_text(body)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env")

    providers = load_providers(path)

    assert providers, "the example defines no provider"
    assert all(p.base_url and p.api_key for p in providers.values()), providers
    assert providers["openai"].api_key == "sk-from-env"
    settings = Settings(database_url="sqlite+aiosqlite:///:memory:", providers_file=path)
    assert {"default", *providers} == set(settings.providers)


def test_every_reliability_command_selects_the_tests_it_names() -> None:
    """The Reliability table's commands name test files that exist and (with ``-k``) a
    word some test in them is named with: the tests a reader would run."""
    commands = [
        shlex.split(args)
        for args in re.findall(r"`make test PYTEST_ARGS='([^']*)'`", section("Reliability"))
    ]
    assert len(commands) >= 7
    files = sorted({args[0] for args in commands})
    collect = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"]
    result = subprocess.run(
        [*collect, *files], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    tests = [line for line in result.stdout.splitlines() if "::" in line]
    for args in commands:
        path, keyword = args[0], args[args.index("-k") + 1] if "-k" in args else ""
        assert any(t.startswith(path + "::") and keyword in t for t in tests), args
