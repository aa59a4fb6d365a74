"""Scenario v: ``bulk-tagger report RUN --format html`` of a big run (issue 21). One run of a
job over every image of 100,000 private ones' demo data (the public images fail: a failure
group, the private ones change: per-key counts and diffs), left as it finished (its record
compacted to results.jsonl.gz); then the page is built, measured as its own process: wall
time and peak RSS, and the page's size.

Then the same of a nightly run of 1,000,000 targets, its folder written without running it
(tests/finished_run.py, about 8 s): 5% failed in 5 groups, 5% skipped in 2, 2% unchanged, the
rest updated, 5,000 seconds of time line."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests import finished_run

from . import contenders, storage
from .harness import BULK_TAGGER, SimServer, run_measured

#: issue 21: the page of a 100,000-target run in under 5 s, peak RSS under 150 MB
WALL_S, RSS_MB = 5.0, 150.0
#: the page of a 1,000,000-target run: peak RSS as above (flat in the targets), a page a
#: browser opens at once, one pass over the record in under this
BIG_PAGE_BYTES, BIG_WALL_S = 1_000_000, 60.0


def _job(path: Path) -> Path:
    path.write_text(json.dumps({
        "name": "bench-page",
        "targets": [{"query": {"projects": "all", "regions": "all"}}],
        "changes": {"set_tags": {contenders.TAG_KEY: "v"}, "remove_tags": ["legacy"],
                    "rename_tags": {"team": "owner"}},
        "options": {"concurrency": 64, "max_changes": 10_000_000},
    }))
    return path


def measure(targets: int, progress: Callable[[str], None], workdir: Path) -> dict[str, Any]:
    images = storage.images_for_private(targets)
    state = workdir / "runs-page"
    env = {"GCORE_API_KEY": contenders.API_KEY}
    with SimServer(images=images) as sim:
        progress(f"v: bulk-tagger run over {images:,} images")
        run = run_measured(
            [BULK_TAGGER, "run", str(_job(workdir / "page.json")), "--base-url", sim.url,
             "--state-dir", str(state), "--run-id", "v", "--concurrency", "64",
             "--log-format", "json"], env=env)
    if run.rc not in (0, 1):
        raise RuntimeError(f"v: the run exited {run.rc}:\n{run.stderr[-3000:]}")
    summary = json.loads((state / "v" / "summary.json").read_text())
    page = workdir / "page.html"
    progress("v: bulk-tagger report v --format html")
    proc = run_measured([BULK_TAGGER, "report", "v", "--state-dir", str(state), "--format",
                         "html", "-o", str(page)], env=env)
    if proc.rc != 0:
        raise RuntimeError(f"v: report exited {proc.rc}:\n{proc.stderr[-3000:]}")
    counts = {k: v for k, v in summary["counts"].items() if v}
    return {
        "label": "report --format html", "images": images, "targets": sum(counts.values()),
        "counts": counts, "run_s": round(summary["duration_s"], 1),
        "wall_s": round(proc.wall_s, 3), "cpu_s": round(proc.cpu_s, 3),
        "maxrss_mb": round(proc.maxrss_mb, 1), "page_bytes": page.stat().st_size,
        "compacted": (state / "v" / "results.jsonl.gz").is_file(),
        "cmd": " ".join(proc.cmd),
    }


def measure_written(targets: int, progress: Callable[[str], None],
                    workdir: Path) -> dict[str, Any]:
    """The page of a finished run of ``targets`` targets written by tests/finished_run.py."""
    state = workdir / "runs-written"
    mix = {"failed": targets // 20, "skipped": targets // 20, "unchanged": targets // 50}
    progress(f"v: a finished run of {targets:,} targets written")
    finished_run.write(state, "nightly", targets, **mix, seconds=5_000)
    page = workdir / "nightly.html"
    progress("v: bulk-tagger report nightly --format html")
    proc = run_measured([BULK_TAGGER, "report", "nightly", "--state-dir", str(state),
                         "--format", "html", "-o", str(page)])
    if proc.rc != 0:
        raise RuntimeError(f"v: report exited {proc.rc}:\n{proc.stderr[-3000:]}")
    text = page.read_text()
    return {
        "label": "report --format html, a written run", "targets": targets,
        "counts": {"updated": targets - sum(mix.values()), **mix},
        "wall_s": round(proc.wall_s, 3), "cpu_s": round(proc.cpu_s, 3),
        "maxrss_mb": round(proc.maxrss_mb, 1), "page_bytes": page.stat().st_size,
        "names_listed": text.count("<li>"),
        # the "All N failed (skipped) targets: bulk-tagger report ... --status" lines
        "export_lines": sum(f"All {n:,} {status} targets" in text
                            for status, n in mix.items() if status != "unchanged"),
        "compacted": True, "cmd": " ".join(proc.cmd),
    }
