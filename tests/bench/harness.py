"""Processes and what they cost: the simulator in its own process, each contender in its own.

- ``run_measured(cmd)``: run a child to its end and take its resource usage from ``os.wait4``
  (user and system CPU seconds, peak RSS; the child's reaped descendants included), and the
  wall time seen from here. The child is started by a small launcher process (``LAUNCHER``)
  that takes the figures: Linux keeps a process's peak RSS across exec, so a child spawned
  straight from this process would start with the harness's own high-water mark (scenario e
  builds the simulator's 3.3 million demo images here to write its rows: 163 MB).
- ``SimServer``: ``python -m tests.bench.sim`` on a free loopback port; ``counters()`` is the
  simulator's ``GET /_sim/counters``, ``arrivals()`` the bench log of every request;
  ``stop()`` returns the server's own CPU seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
BIN = Path(sys.executable).parent
BULK_TAGGER = str(BIN / "bulk-tagger")
#: py-spy (optional, for scenario j's profile): beside the interpreter, else on PATH
PY_SPY = str(BIN / "py-spy") if (BIN / "py-spy").exists() else (shutil.which("py-spy") or "")


@dataclass
class Measured:
    """One child process: seconds, megabytes (peak RSS), exit code, its output."""

    cmd: list[str]
    wall_s: float
    user_s: float
    sys_s: float
    maxrss_mb: float
    rc: int
    stdout: str = field(repr=False)
    stderr: str = field(repr=False)

    @property
    def cpu_s(self) -> float:
        return self.user_s + self.sys_s

    def last_json(self) -> dict[str, Any]:
        """The last line of stdout that parses as a JSON object."""
        for line in reversed(self.stdout.splitlines()):
            if line.startswith("{"):
                try:
                    value = json.loads(line)
                except ValueError:
                    continue
                if isinstance(value, dict):
                    return value
        raise RuntimeError(f"no JSON result from {self.cmd!r}:\n{self.stderr[-2000:]}")


#: Starts ``argv[2:]``, waits for it, and writes its CPU seconds and peak RSS (KiB) as JSON
#: to the file ``argv[1]``; exits with its exit code. Small and fresh, so the measured child
#: inherits no high-water mark but the launcher's own (a few MB).
LAUNCHER = """
import json, os, subprocess, sys
proc = subprocess.Popen(sys.argv[2:])
_, status, u = os.wait4(proc.pid, 0)
with open(sys.argv[1], "w") as fh:
    json.dump([u.ru_utime, u.ru_stime, u.ru_maxrss], fh)
sys.exit(os.waitstatus_to_exitcode(status) % 256)
"""


def run_measured(
    cmd: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None,
    timeout: float = 600.0,
) -> Measured:
    """Run ``cmd`` to its end; its CPU and peak RSS from ``wait4``. Killed after ``timeout``."""
    full_env = {**os.environ, **(env or {})}
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.NamedTemporaryFile("r") as usage_file:
        started = time.monotonic()
        proc = subprocess.Popen([PYTHON, "-c", LAUNCHER, usage_file.name, *cmd], stdout=out,
                                stderr=err, env=full_env, cwd=cwd or ROOT,
                                start_new_session=True)
        timer = threading.Timer(timeout, os.killpg, (proc.pid, signal.SIGKILL))
        timer.start()
        try:
            proc.wait()
        finally:
            timer.cancel()
        wall = time.monotonic() - started
        user_s, sys_s, maxrss_kb = json.loads(usage_file.read() or "[0, 0, 0]")
        out.seek(0)
        err.seek(0)
        return Measured(
            cmd=cmd, wall_s=wall, user_s=user_s, sys_s=sys_s,
            maxrss_mb=maxrss_kb / 1024, rc=proc.returncode,
            stdout=out.read().decode("utf-8", "replace"),
            stderr=err.read().decode("utf-8", "replace"),
        )


class SimServer:
    """``with SimServer(images=..., rate_limit=..., latency_ms=...) as sim:`` serves ``sim.url``."""

    def __init__(
        self, *, images: int, rate_limit: float | None = None, latency_ms: float = 0.0,
        options: tuple[str, ...] = (),
    ) -> None:
        self.args = ["--images", str(images), "--latency-ms", str(latency_ms), *options]
        if rate_limit is not None:
            self.args += ["--rate-limit", str(rate_limit)]
        self.url = ""
        self.cpu_s = 0.0
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> SimServer:
        proc = self._proc = subprocess.Popen(
            [PYTHON, "-m", "tests.bench.sim", "--port", "0", *self.args],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT,
        )
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        if "listening on" not in line:
            self.stop()
            raise RuntimeError(f"the simulator did not start: {line!r}")
        self.url = line.split()[-1]
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=60) as resp:
            return json.loads(resp.read())

    def counters(self) -> dict[str, Any]:
        data: dict[str, Any] = self._get("/_sim/counters")
        # per image counts are big and say nothing a benchmark needs
        data.pop("patches_per_image", None)
        data.pop("applied_per_image", None)
        return data

    def arrivals(self) -> list[tuple[float, str, int]]:
        return [(float(t), str(k), int(s)) for t, k, s in self._get("/_bench/arrivals")]

    def stop(self) -> float:
        """Stop the server (SIGTERM, then SIGKILL after 10 s); its CPU seconds."""
        proc, self._proc = self._proc, None
        if proc is None:
            return self.cpu_s
        proc.send_signal(signal.SIGTERM)
        timer = threading.Timer(10.0, proc.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.stdout is not None:
            proc.stdout.close()
        self.cpu_s = usage.ru_utime + usage.ru_stime
        return self.cpu_s


def machine() -> dict[str, Any]:
    """What the figures were taken on."""
    import platform

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                                  check=False, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        # the worker as measured may hold changes not yet committed
        "worker_uncommitted": bool(git("status", "--porcelain", "--", "worker")),
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_at_start": list(os.getloadavg()),
    }
