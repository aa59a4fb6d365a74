"""What the command line decided for a run, plan or undo (``RunSettings``), and how a new
run is named (``new_run_id``). ``worker.runner`` re-exports both."""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TextIO

from worker import api, defaults
from worker.selectors import Shard


@dataclass(slots=True)
class RunSettings:
    """What the command line decided. Seconds unless named otherwise."""

    state_dir: Path
    api: api.Settings
    simulate: bool = False
    simulate_images: int = defaults.SIMULATE_IMAGES
    concurrency: int | None = None
    rate: float | None = None
    run_id: str | None = None
    resume: bool = False
    resume_within: timedelta = timedelta(hours=defaults.RESUME_WITHIN_HOURS)
    shard: Shard | None = None
    max_changes: int | None = None
    max_changes_percent: float | None = None
    plan_run_id: str | None = None  # run --plan: the plan run to apply, and how old it may be
    plan_max_age: timedelta = timedelta(hours=defaults.PLAN_MAX_AGE_HOURS)
    preview: bool = False  # undo --plan: plan the undo (a plan run) and send nothing
    require_matches: bool = False
    grace_s: float = defaults.GRACE_S
    pushgateway: str | None = None
    plan_samples: int = 20
    out: TextIO = field(default_factory=lambda: sys.stdout)
    progress: TextIO = field(default_factory=lambda: sys.stderr)
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    # knobs for tests: how fast retries and lock polls go
    retry_base_s: float = defaults.RETRY_BASE_S
    retry_max_wait_s: float = defaults.RETRY_MAX_WAIT_S
    progress_s: float = defaults.PROGRESS_S  # a progress log line this often (no terminal)
    lock_poll_s: float = defaults.LOCK_POLL_S
    #: retention: finished runs older than this many days are pruned at the start (0: none)
    keep_days: float = defaults.KEEP_DAYS
    #: the run's clock (tests move it to simulate nights gone by)
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))


def new_run_id(
    name: str, shard: Shard | None, kind: str = "run", now: datetime | None = None
) -> str:
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    suffix = f"-shard{shard.index}of{shard.count}" if shard else ""
    middle = "-undo" if kind == "undo" else ""
    return f"{name}{middle}-{stamp}-{secrets.token_hex(2)}{suffix}"
