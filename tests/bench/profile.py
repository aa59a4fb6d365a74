"""Where bulk-tagger's CPU goes, from ``py-spy record`` raw stacks (optional: needs py-spy).

``py-spy`` samples every thread of the process from outside (``--nonblocking``: the process
is never paused), so the journal's writes in ``asyncio.to_thread`` workers are seen too; idle
threads are not sampled, so a share of samples is a share of CPU time.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .contenders import Run
from .harness import PY_SPY, SimServer

#: What counts as the record: the journal's modules (its writer, its file and reads), and the
#: exports written at the end.
RECORD_FILES = ("worker/journal.py", "worker/journalfile.py")


def read_raw(path: Path) -> list[tuple[list[str], int]]:
    """py-spy's raw format: ``frame;frame;...;leaf count`` a line."""
    stacks = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack.split(";"), int(count)))
    return stacks


def _record(frame: str) -> bool:
    return any(f in frame for f in RECORD_FILES)


def _record_part(frames: list[str]) -> str | None:
    """Which part of the record a stack is in: exports, SQLite writes in the writer thread,
    or the journal's work on the event loop (encoding rows, reading pending ones back)."""
    if any(f.startswith(("write_exports ", "JournalFile.iter_results ")) for f in frames):
        return "exports (results.jsonl, results.csv)"
    if not any(_record(f) for f in frames):
        return None
    if any("_bootstrap_inner" in f for f in frames):
        return "journal: SQLite commits (writer thread)"
    return "journal: on the event loop (encode rows, read pending back)"


def summarise(stacks: list[tuple[list[str], int]], top: int = 15) -> dict[str, Any]:
    total = sum(c for _, c in stacks)
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    parts: Counter[str] = Counter()
    for frames, count in stacks:
        part = _record_part(frames)
        if part is not None:
            parts[part] += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count

    def share(n: int) -> float:
        return round(n / total, 4) if total else 0.0

    worker = [(f, c) for f, c in inclusive.most_common() if "worker/" in f]
    return {
        "samples": total,
        "record_share": share(sum(parts.values())),
        "record_parts": {k: share(v) for k, v in parts.most_common()},
        "top_own": [[f, share(c)] for f, c in own.most_common(top)],
        "top_worker_inclusive": [[f, share(c)] for f, c in worker[:top]],
    }


def journal_share(
    start: Callable[[str, Path], Run], images: int, workdir: Path
) -> dict[str, Any]:
    """Run ``start(url, raw_path)`` under py-spy against a fresh simulator; the summary."""
    if not PY_SPY:
        return {"available": False,
                "note": "py-spy not installed (.venv/bin/pip install py-spy) - skipped"}
    out = workdir / "profile.raw"
    with SimServer(images=images) as sim:
        run = start(sim.url, out)
    if not out.exists():
        return {"available": False, "note": f"py-spy wrote nothing (exit {run.proc.rc})",
                "stderr": run.proc.stderr[-1000:]}
    result = summarise(read_raw(out))
    result.update(available=True, updated=run.updated)
    return result
