"""The contenders, each run as its own process against a fresh simulator.

- ``bulk_tagger``: ``bulk-tagger run|plan JOB --base-url URL`` with ``GCORE_API_KEY`` set,
  journal and report on (they cannot be turned off), figures from its ``summary.json``;
- ``floor``: ``python -m tests.bench.floor`` (bare aiohttp; ``adaptive``: botocore's adaptive
  mode drives it);
- ``sdk``: ``python -m tests.bench.sdk`` (``gcore.AsyncGcore``).

Every query contender does the same work: list projects and regions ("all"), page through
every region with ``visibility=private`` and ``limit=1000``, and PATCH one tag on each image.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .harness import BULK_TAGGER, PY_SPY, PYTHON, Measured, run_measured

API_KEY = "bench-key"
TAG_KEY = "bench"


def query_job(path: Path, *, concurrency: int, value: str) -> Path:
    """A job over every private image of every project and region, setting one tag."""
    job = {
        "name": "bench-query",
        "targets": [{"query": {"projects": "all", "regions": "all", "visibility": "private"}}],
        "changes": {"set_tags": {TAG_KEY: value}},
        "options": {"concurrency": concurrency},
    }
    path.write_text(json.dumps(job, indent=2))
    return path


def file_job(path: Path, csv_path: Path, *, concurrency: int, value: str) -> Path:
    """A job over the rows of ``csv_path``, setting one tag."""
    job = {
        "name": "bench-file",
        "targets": [{"file": str(csv_path)}],
        "changes": {"set_tags": {TAG_KEY: value}},
        "options": {"concurrency": concurrency},
    }
    path.write_text(json.dumps(job, indent=2))
    return path


@dataclass
class Run:
    """What one contender did: the process's cost and its own account of the work."""

    label: str
    proc: Measured
    updated: int
    failed: int
    duration_s: float  # the contender's own: first request (or run start) to last answer
    extra: dict[str, Any]

    def check(self) -> None:
        if self.proc.rc not in (0, 1):
            raise RuntimeError(
                f"{self.label} exited {self.proc.rc}:\n{self.proc.stderr[-3000:]}"
            )


def bulk_tagger(
    label: str, url: str, job: Path, workdir: Path, *, command: str = "run",
    concurrency: int = 64, rate: float | None = None, keep: bool = False,
    profile_to: Path | None = None,
) -> Run:
    """``bulk-tagger COMMAND JOB``; with ``profile_to``, under ``py-spy record`` (raw
    stacks written there; the process figures then include py-spy's own)."""
    state = workdir / f"runs-{label}"
    wrap = [] if profile_to is None else [
        PY_SPY, "record", "--nonblocking", "-r", "200", "-f", "raw", "-o", str(profile_to), "--"]
    cmd = [*wrap, BULK_TAGGER, command, str(job), "--base-url", url, "--state-dir", str(state),
           "--run-id", "bench", "--concurrency", str(concurrency), "--log-format", "json"]
    if rate is not None:
        cmd += ["--rate", str(rate)]
    proc = run_measured(cmd, env={"GCORE_API_KEY": API_KEY})
    summary_path = state / "bench" / "summary.json"
    if not summary_path.exists():
        raise RuntimeError(f"{label}: no summary (exit {proc.rc}):\n{proc.stderr[-3000:]}")
    summary = json.loads(summary_path.read_text())
    counts = summary.get("counts", {})
    sizes = {p.name: p.stat().st_size for p in (state / "bench").iterdir() if p.is_file()}
    if not keep:
        shutil.rmtree(state, ignore_errors=True)
    run = Run(
        label=label, proc=proc, updated=int(counts.get("updated", 0)),
        failed=int(counts.get("failed", 0)), duration_s=float(summary.get("duration_s", 0.0)),
        extra={"summary_counts": counts, "summary_requests": summary.get("requests"),
               "rate_limit_final": summary.get("rate_limit_final"), "record_bytes": sizes},
    )
    run.check()
    return run


def _script(
    module: str, label: str, url: str, *, concurrency: int, rate: float | None,
    options: tuple[str, ...] = (),
) -> Run:
    cmd = [PYTHON, "-m", module, "--base-url", url, "--concurrency", str(concurrency),
           "--tag", f"{TAG_KEY}={label}", *options]
    if rate is not None:
        cmd += ["--rate", str(rate)]
    proc = run_measured(cmd, env={"GCORE_API_KEY": API_KEY})
    if proc.rc != 0:
        raise RuntimeError(f"{label} exited {proc.rc}:\n{proc.stderr[-3000:]}")
    out = proc.last_json()
    return Run(label=label, proc=proc, updated=int(out["updated"]), failed=int(out["failed"]),
               duration_s=float(out["duration_s"]), extra={})


def floor(
    label: str, url: str, *, concurrency: int = 64, rate: float | None = None,
    adaptive: bool = False,
) -> Run:
    """The floor; ``adaptive``: driven by botocore's adaptive mode."""
    return _script("tests.bench.floor", label, url, concurrency=concurrency, rate=rate,
                   options=("--adaptive",) if adaptive else ())


def sdk(label: str, url: str, *, concurrency: int = 64, rate: float | None = None) -> Run:
    return _script("tests.bench.sdk", label, url, concurrency=concurrency, rate=rate)
