"""Small helpers shared by tests: running the real CLI against a simulator, reading its output."""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from worker.models import Image
from worker.report import LatencyStats, build_summary
from worker.simulator import SimulatorThread

CLI = [sys.executable, "-m", "worker"]


def make_image(
    tags: dict[str, str] | None = None,
    read_only: dict[str, str] | None = None,
    **fields: Any,
) -> Image:
    """An image as the API would return it: writable and read-only tags, and fields."""
    tag_list = [{"key": k, "value": v, "read_only": False} for k, v in (tags or {}).items()]
    tag_list += [{"key": k, "value": v, "read_only": True} for k, v in (read_only or {}).items()]
    raw: dict[str, Any] = {
        "id": "img-1",
        "project_id": 1337,
        "region_id": 7,
        "name": "ubuntu-22",
        "os_distro": "ubuntu",
        "os_version": "22.04",
        "min_disk": 3,
        "os_type": "linux",
        "ssh_key": "allow",
        "is_baremetal": False,
        "tags": tag_list,
    }
    raw.update(fields)
    return Image.from_api(raw)


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


#: an image's place: (project_id, region_id, image id)
Key = tuple[int, int, str]


def key_of(item: dict[str, Any]) -> Key:
    """The key of an image as the API shows it (``id``) or of a results line (``image_id``)."""
    return (int(item["project_id"]), int(item["region_id"]),
            str(item.get("image_id", item.get("id"))))


def state_of(image: dict[str, Any]) -> dict[str, Any]:
    """What a PATCH can change: every tag (read-only ones too) and the settable fields."""
    return Image.from_api(image).state()


def view(image: dict[str, Any]) -> dict[str, Any]:
    """What must be exactly as expected: every field but updated_at, tags as a mapping."""
    out = {k: v for k, v in image.items() if k not in ("updated_at", "tags", "tags_v2")}
    out["tags"] = {t["key"]: (t["value"], bool(t.get("read_only"))) for t in image["tags"]}
    return out


def images(sim: SimulatorThread) -> dict[Key, dict[str, Any]]:
    """The simulator's images now, by key, each as ``view`` shows it."""
    return {key_of(image): view(image) for image in sim.call(sim.sim.images)}


def run_dirs(state_dir: Path) -> list[Path]:
    return sorted(p for p in state_dir.iterdir() if (p / "journal.sqlite").exists())


def results(run_dir: Path) -> list[dict[str, Any]]:
    """The run's results lines: results.jsonl.gz as the run wrote it."""
    with gzip.open(run_dir / "results.jsonl.gz", "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def summary(run_dir: Path) -> dict[str, Any]:
    return dict(json.loads((run_dir / "summary.json").read_text()))


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


class FakeClock:
    """A clock a test moves by hand (``time.monotonic``'s stand-in)."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


T0 = datetime(2024, 5, 1, 2, 0, 0, tzinfo=UTC)


def sample_summary(**overrides: Any) -> dict[str, Any]:
    """A run's summary.json content, from ``build_summary``; ``overrides`` its arguments."""
    latency = LatencyStats()
    for ms in (10, 20, 30, 40, 1000):
        latency.add(ms)
    kwargs: dict[str, Any] = {
        "run_id": "r-1",
        "job": "nightly-owner-tags",
        "started_at": T0,
        "finished_at": T0 + timedelta(seconds=100),
        "exit_code": 1,
        "counts": {"updated": 900, "unchanged": 50, "failed": 3},
        "requests": {
            "list": 10, "get": 5, "patch": 1000, "task": 5,
            "retries": 40, "rate_limited": 20, "lock_waits": 4,
        },
        "latency": latency,
    }
    kwargs.update(overrides)
    return build_summary(**kwargs)


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


def markdown_table(text: str, heading: str) -> tuple[list[str], list[list[str]]]:
    """The first table under the markdown line ``heading`` (the whole line, ``#``s too): its
    header's cells and its rows' cells, stripped (a cell holding ``|`` is not supported)."""
    lines = text.splitlines()
    start = lines.index(heading)
    table: list[list[str]] = []
    for line in lines[start + 1:]:
        if line.startswith("#"):
            break
        if line.startswith("|"):
            table.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif table:
            break
    assert len(table) >= 2, f"no table under {heading!r}"
    return table[0], table[2:]
