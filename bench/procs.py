"""Processes under measurement: start them, read their CPU and memory, stop them.

CPU and peak memory come from ``/proc/<pid>``: ``stat`` (user + system time of
every thread) and ``status`` (``VmHWM``, the peak resident set). The peak is reset
before each scenario by writing ``5`` to ``/proc/<pid>/clear_refs`` (Linux 4.0+),
so each scenario reports its own peak, not the largest one seen so far.
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import httpx

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def raise_fd_limit() -> None:
    """Thousands of sockets at once: lift the soft limit on open files to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Proc:
    """A child process whose CPU time and peak memory the benchmark reads."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        *,
        env: Mapping[str, str] | None = None,
        stdin: int | None = None,
        stdout: int | None = None,
        log: Path | None = None,
        tree: Path = REPO,
    ) -> None:
        self.name = name
        self.log_path = log
        self._log = open(log, "wb") if log is not None else subprocess.DEVNULL  # noqa: SIM115
        self.popen = subprocess.Popen(
            argv,
            # ``python -m`` imports from its working directory first: ``tree`` chooses
            # which checkout of ``service`` runs; ``bench`` comes from this one.
            env={**os.environ, **(env or {}), "PYTHONPATH": str(REPO)},
            cwd=tree,
            stdin=stdin,
            stdout=stdout if stdout is not None else self._log,
            stderr=self._log,
            preexec_fn=raise_fd_limit,
        )
        self.pid = self.popen.pid

    def cpu_s(self) -> float:
        """User + system CPU seconds so far, over all threads."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rpartition(")")[2].split()
        # After the command name: state is field 3, utime 14 and stime 15 (1-based).
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS

    def _status_kb(self, key: str) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        raise KeyError(key)

    def peak_mb(self) -> float:
        """Peak resident memory (VmHWM) since start or the last :meth:`reset_peak`."""
        return self._status_kb("VmHWM") / 1024

    def rss_mb(self) -> float:
        return self._status_kb("VmRSS") / 1024

    def reset_peak(self) -> None:
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            where = f"; see {self.log_path}" if self.log_path else ""
            raise RuntimeError(f"{self.name} exited with {self.popen.returncode}{where}")

    def wait_http(self, url: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                if httpx.get(url, timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"{self.name}: {url} did not answer within {timeout} s")

    def stop(self, timeout: float = 15) -> None:
        """SIGTERM (graceful), then SIGKILL if it does not go in time."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        if self._log is not subprocess.DEVNULL:
            self._log.close()


def python_argv(*args: str) -> list[str]:
    return [sys.executable, *args]
