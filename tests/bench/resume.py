"""Scenario r: what a resume reads. A query run over ``r_images`` images is SIGTERMed once the
simulator has seen about 10% of its PATCHes, then ``--resume``d; the reads (list pages and
image GETs) the resume made, against ``pending / 100 + regions`` (the regions holding pending
targets), and the PATCHes of both processes against the targets (none sent twice).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import contenders
from .harness import BULK_TAGGER, SimServer, run_measured

SHARE = 0.10


def _reads(counters: dict[str, Any]) -> int:
    requests = counters["requests"]
    return int(requests.get("list", 0) + requests.get("get", 0))


def _pending_regions(run_dir: Path) -> int:
    uri = f"{(run_dir / 'journal.sqlite').resolve().as_uri()}?mode=ro"
    conn = sqlite3.connect(uri, uri=True)
    try:
        (n,) = conn.execute(
            "SELECT COUNT(*) FROM (SELECT DISTINCT t.project_id, t.region_id FROM targets t"
            " LEFT JOIN outcomes o ON o.seq = t.seq WHERE o.seq IS NULL"
            " AND t.plan_status = 'planned')"
        ).fetchone()
    finally:
        conn.close()
    return int(n)


def scenario_r(sizes: Any, progress: Callable[[str], None], wd: Path,
               concurrency: int, check: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    n = sizes.r_images
    job = contenders.query_job(wd / "r.json", concurrency=concurrency, value="r")
    state = wd / "runs-r"
    cmd = [BULK_TAGGER, "run", str(job), "--state-dir", str(state), "--run-id", "r",
           "--concurrency", str(concurrency), "--log-format", "json", "--grace-seconds", "10"]
    env = {"GCORE_API_KEY": contenders.API_KEY}
    with SimServer(images=n) as sim:
        cmd += ["--base-url", sim.url]
        progress(f"r: bulk-tagger run on {n} images, SIGTERM near {SHARE:.0%} of its PATCHes")
        err = (wd / "r-first.err").open("wb")
        first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err,
                                 env={**os.environ, **env})
        targets = 0
        try:
            while first.poll() is None:
                counters = sim.counters()
                if not targets and state.joinpath("r", "journal.sqlite").exists():
                    targets = _planned(state / "r")
                if targets and counters["requests"].get("patch", 0) >= SHARE * targets:
                    first.send_signal(signal.SIGTERM)
                    break
                time.sleep(0.01)
            first_rc = first.wait(120)
        finally:
            err.close()
        stopped = json.loads((state / "r" / "summary.json").read_text())
        at_stop = sim.counters()
        pending = int(stopped["counts"].get("planned", 0))
        regions = _pending_regions(state / "r")
        progress(f"r: stopped (exit {first_rc}) with {pending} of {targets} pending in "
                 f"{regions} regions; resuming")
        second = run_measured([*cmd, "--resume"], env=env)
        done = sim.counters()
    summary = json.loads((state / "r" / "summary.json").read_text())
    reads = _reads(done) - _reads(at_stop)
    resume_requests = {k: done["requests"].get(k, 0) - at_stop["requests"].get(k, 0)
                       for k in done["requests"]}
    patches = int(done["requests"].get("patch", 0))
    row = {
        "label": "bulk-tagger run, SIGTERM, --resume", "images": n, "targets": targets,
        "first_rc": first_rc, "resume_rc": second.rc,
        "patched_before_stop": int(at_stop["requests"].get("patch", 0)),
        "pending": pending, "regions": regions, "resume_reads": reads,
        "resume_requests": {k: v for k, v in resume_requests.items() if v},
        "patches": patches, "updated": int(summary["counts"].get("updated", 0)),
        "summary_requests_total": summary["requests"]["total"],
        "server_total": done["total"], "resume_wall_s": round(second.wall_s, 3),
        "cmd": " ".join(cmd),
    }
    limit = pending / 100 + regions
    checks = [
        check("r: stopped by SIGTERM (75), resumed to the end (0)",
              float(first_rc == 75 and second.rc == 0), "==", 1.0),
        check("r: reads during the resume <= pending/100 + regions", reads, "<=", limit,
              f"{pending} pending in {regions} regions; one GET a pending image would be "
              f"{pending}"),
        check("r: PATCHes of both processes = targets (none sent twice)", patches, "==",
              targets),
        check("r: every target updated", row["updated"], "==", targets),
        check("r: summary requests.total = the server's count", summary["requests"]["total"],
              "==", done["total"]),
    ]
    return {"scenario": "r", "title": "a resumed run's reads",
            "params": {"images": n, "stop_at": SHARE}, "rows": [row], "checks": checks}


def _planned(run_dir: Path) -> int:
    """Targets the plan committed to change, once it is done (0 before)."""
    uri = f"{(run_dir / 'journal.sqlite').resolve().as_uri()}?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True)
        try:
            row = conn.execute(
                "SELECT (SELECT plan_done FROM run),"
                " (SELECT COUNT(*) FROM targets WHERE plan_status = 'planned')"
            ).fetchone()
        finally:
            conn.close()
    except sqlite3.Error:
        return 0
    return int(row[1]) if row and row[0] else 0
