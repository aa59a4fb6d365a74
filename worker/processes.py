"""The processes that worked a run: the journal's ``processes`` table.

Each process that works a run has a row: its request counters by kind and the seconds it has
run, committed with the journal's batched commits and every ``COUNTERS_S`` between them. So
a resumed run's summary adds up every process's requests, one SIGKILLed or OOM-killed too
(it loses at most its last ``COUNTERS_S`` and the requests then in flight).
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import orjson

SCHEMA = """
CREATE TABLE IF NOT EXISTS processes (
    id INTEGER PRIMARY KEY, pid INTEGER, started_at TEXT NOT NULL,
    running_s REAL NOT NULL DEFAULT 0, requests TEXT NOT NULL DEFAULT '{}'
);
"""
#: this process's row, as the journal's commits update it: (requests JSON, running_s, id)
UPDATE = "UPDATE processes SET requests = ?, running_s = ? WHERE id = ?"
#: how often this process's counters are committed between batches (seconds)
COUNTERS_S = 0.05

#: what a process reports of itself: (requests by kind, seconds it has run)
Counters = Callable[[], tuple[dict[str, int], float]]


def create(conn: sqlite3.Connection, started_at: datetime) -> int:
    """This process's row (the table made if missing); its id."""
    since = started_at.astimezone(UTC).isoformat(timespec="milliseconds")
    conn.executescript(SCHEMA)
    cur = conn.execute("INSERT INTO processes (pid, started_at) VALUES (?, ?)",
                       (os.getpid(), since.replace("+00:00", "Z")))
    assert cur.lastrowid is not None
    return cur.lastrowid


def earlier(conn: sqlite3.Connection, mine: int) -> dict[str, Any] | None:
    """The processes before ``mine``, added up as ``report.build_summary`` takes an earlier
    summary (``requests``, ``duration_s``, ``processes``, the first ``started_at``), or None
    where none is recorded (a journal from before the table, too)."""
    try:
        rows = conn.execute("SELECT requests, running_s, started_at FROM processes"
                            " WHERE id != ? ORDER BY id", (mine,)).fetchall()
    except sqlite3.OperationalError:
        return None
    if not rows:
        return None
    requests: dict[str, int] = {}
    for text, _, _ in rows:
        for name, value in (orjson.loads(text) or {}).items():
            if isinstance(value, int):
                requests[name] = requests.get(name, 0) + value
    return {"requests": requests, "duration_s": sum(r[1] for r in rows),
            "processes": len(rows), "started_at": rows[0][2]}
