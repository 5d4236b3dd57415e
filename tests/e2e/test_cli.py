"""``fanout`` started with settings it cannot use: one line that says what is wrong and
where, exit status 2, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def fanout(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FANOUT_")}
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        cwd=ROOT,
        env={**clean, "FANOUT_DATABASE_URL": "sqlite+aiosqlite:///:memory:", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("providers", "says"),
    [
        ('[providers.openai]\nbase_url = "http://x"\nrpm = "lots"\n', "providers.openai.rpm"),
        (
            '[providers.openai]\nbase_url = "http://x"\nrpms = 5\n',
            "providers.openai.rpms: not a key",
        ),
        ('[providers.openai]\napi_key = "x"\n', "providers.openai.base_url: required"),
        (
            '[providers.openai]\nbase_url = "http://x"\napi_key_env = "FANOUT_TEST_NO_SUCH_KEY"\n',
            "FANOUT_TEST_NO_SUCH_KEY is not set",
        ),
    ],
)
def test_serve_refuses_a_providers_file_it_cannot_use_in_one_line(
    tmp_path: Path, providers: str, says: str
) -> None:
    path = tmp_path / "providers.toml"
    path.write_text(providers)
    result = fanout("serve", FANOUT_PROVIDERS_FILE=str(path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and says in lines[0], result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_a_setting_of_the_wrong_type_is_named_at_start() -> None:
    result = fanout("migrate", FANOUT_MAX_CONCURRENCY="many")
    assert result.returncode == 2
    assert "FANOUT_MAX_CONCURRENCY" in result.stderr and "Traceback" not in result.stderr
