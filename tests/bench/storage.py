"""Scenario s: the run's record on disk. One job over 20,000 private images run twice against
one simulator: (i) a mass retag (every target ``updated``), (ii) the same job again (every
target ``unchanged``). The figure is the finished run folder's bytes per target, as ``du``
counts them (allocated blocks) and as file sizes."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from worker.simulator.demo import Demo

from . import contenders
from .harness import BULK_TAGGER, SimServer, run_measured

#: bytes on disk per target of a finished run, at most (issue 16)
LIMITS = {"updated": 300.0, "unchanged": 120.0}


def images_for_private(targets: int) -> int:
    """Demo images holding at least ``targets`` private ones (what the query job selects)."""
    n = targets
    while True:
        demo = Demo(n, 0)
        private = sum(1 for i in range(n) if demo.base(i).visibility == "private")
        if private >= targets:
            return n
        n = max(n + 1, math.ceil(n * targets / max(private, 1)))


def folder_bytes(folder: Path) -> tuple[int, int]:
    """(bytes allocated on disk, bytes of the files) of every file under ``folder``."""
    disk = size = 0
    for path in folder.rglob("*"):
        if path.is_file():
            st = path.stat()
            disk += st.st_blocks * 512
            size += st.st_size
    return disk, size


def measure(
    targets: int, progress: Callable[[str], None], workdir: Path
) -> list[dict[str, Any]]:
    """The two runs' rows: their folders' bytes, per target, and each file's size."""
    images = images_for_private(targets)
    job = contenders.query_job(workdir / "storage.json", concurrency=64, value="s")
    state = workdir / "runs-storage"
    rows: list[dict[str, Any]] = []
    with SimServer(images=images) as sim:
        for run_id, expect in (("s-retag", "updated"), ("s-again", "unchanged")):
            progress(f"s: bulk-tagger run {run_id} over {images} images ({expect} expected)")
            proc = run_measured(
                [BULK_TAGGER, "run", str(job), "--base-url", sim.url, "--state-dir", str(state),
                 "--run-id", run_id, "--concurrency", "64", "--log-format", "json"],
                env={"GCORE_API_KEY": contenders.API_KEY},
            )
            if proc.rc != 0:
                raise RuntimeError(f"s: {run_id} exited {proc.rc}:\n{proc.stderr[-3000:]}")
            folder = state / run_id
            disk, size = folder_bytes(folder)
            files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
            summary = json.loads((folder / "summary.json").read_text())
            counts = {k: v for k, v in summary.get("counts", {}).items() if v}
            n = sum(counts.values())
            rows.append({
                "label": f"{run_id} ({expect})", "expect": expect, "images": images,
                "targets": n, "counts": counts,
                "disk_bytes": disk, "file_bytes": size,
                "disk_per_target": round(disk / n, 1) if n else None,
                "file_per_target": round(size / n, 1) if n else None,
                "files": files, "cpu_s": round(proc.cpu_s, 3), "wall_s": round(proc.wall_s, 3),
            })
    return rows
