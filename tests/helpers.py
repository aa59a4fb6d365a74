"""Small helpers shared by tests: running the real CLI against a simulator, reading its output."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

CLI = [sys.executable, "-m", "worker"]


def write_job(folder: Path, job: dict[str, Any], name: str = "job.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def run_cli(
    *args: str | Path, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("GCORE_")}
    full_env.setdefault("GCORE_API_KEY", "test-key-1234")
    full_env.update(env or {})
    return subprocess.run(
        [*CLI, *map(str, args)], capture_output=True, text=True, env=full_env,
        timeout=timeout, check=False,
    )


def run_dirs(state_dir: Path) -> list[Path]:
    return sorted(p for p in state_dir.iterdir() if (p / "journal.sqlite").exists())


def results(run_dir: Path) -> list[dict[str, Any]]:
    with (run_dir / "results.jsonl").open() as fh:
        return [json.loads(line) for line in fh]


def summary(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "summary.json").read_text())


def events(stream: io.StringIO, name: str) -> list[dict[str, Any]]:
    """The JSON log lines in ``stream`` (see the ``log_stream`` fixture) whose event is ``name``."""
    lines = [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]
    return [e for e in lines if e["event"] == name]


class NoLimiter:
    """A rate limiter that never waits (``api.Limiter``), for tests that measure the client or
    the simulator rather than the limiter."""

    rate = float("inf")

    async def acquire(self) -> None:
        return None

    def success(self) -> None:
        return None

    def throttled(self, sent_at: float | None = None) -> None:
        return None

    def stated(self, headers: Mapping[str, str]) -> None:
        return None

    def cancel_waiting(self) -> None:
        return None


def need(name: str) -> str:
    """The path of a Prometheus binary; skips (fails under CI) when it is not installed."""
    path = shutil.which(name)
    if path is None:
        why = (f"{name} is not installed (Debian: apt-get install prometheus-pushgateway "
               "prometheus; .ci/run installs them)")
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    return path
