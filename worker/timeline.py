"""The run's time line: requests per second by outcome and the limiter's rate, for the chart of
``bulk-tagger report RUN --format html`` (worker.html_report).

Sampled, not counted: nothing is added to a request's path. The journal's writer wakes every
``journal.COUNTERS_S`` while a run is tracked; at its first wake-up after a second has turned,
``Timeline.take`` reads the process's running totals once and keeps their growth since the
last reading as that second's row. The rows go into the journal's ``seconds`` table with its
batched commits. One row a second of run, about 30 bytes: 10 hours take about 1 MB. The table
is not one of the per-target tables a finished run's record drops, so the chart outlives them.

A second written twice (the last, partial second of one process, or a resumed run's process
meeting an earlier one's second) adds up; the rate is the later reading's.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from worker.journalfile import open_read_only

#: the running totals a process reports, in this order (requests sent, 429 answers, other
#: transient failures: 5xx, timeouts, lost connections; retried attempts; lock waits)
FIELDS: tuple[str, ...] = ("sent", "limited", "errors", "retries", "lock_waits")

SCHEMA = """
CREATE TABLE IF NOT EXISTS seconds (
    t INTEGER PRIMARY KEY, sent INTEGER NOT NULL, limited INTEGER NOT NULL,
    errors INTEGER NOT NULL, retries INTEGER NOT NULL, lock_waits INTEGER NOT NULL, rate REAL
);
"""

_UPSERT = (
    "INSERT INTO seconds (t, sent, limited, errors, retries, lock_waits, rate)"
    " VALUES (?,?,?,?,?,?,?) ON CONFLICT (t) DO UPDATE SET sent = sent + excluded.sent,"
    " limited = limited + excluded.limited, errors = errors + excluded.errors,"
    " retries = retries + excluded.retries, lock_waits = lock_waits + excluded.lock_waits,"
    " rate = excluded.rate"
)

#: what a process reports: its running totals in FIELDS order and the limiter's rate now
#: (requests/s; 0 where there is no limiter yet)
Sample = Callable[[], tuple[tuple[int, ...], float]]

#: one second of a run: (epoch second, *FIELDS, rate)
Row = tuple[int, int, int, int, int, int, float]


class Timeline:
    """One process's seconds, waiting for the journal's next commit."""

    __slots__ = ("_clock", "_last", "_sample", "_second")

    def __init__(self, sample: Sample, clock: Callable[[], float] = time.time) -> None:
        self._sample = sample
        self._clock = clock
        self._second = int(clock())
        self._last = (0,) * len(FIELDS)  # a process's totals start at 0

    def take(self, *, final: bool = False) -> list[Row]:
        """The rows of the seconds ended since the last call (``final``: the second under way
        too); called from the event loop's thread, as the totals are. A late call (a busy
        loop) shares the growth out evenly over the seconds it spans: no second is missing."""
        second = int(self._clock())
        n = second - self._second + (1 if final else 0)
        if n <= 0:
            return []
        totals, rate = self._sample()
        shares = [divmod(now - then, n) for now, then in zip(totals, self._last, strict=True)]
        self._last = totals
        rows: list[Row] = []
        for i in range(n):
            sent, limited, errors, retries, waits = (q + (i < r) for q, r in shares)
            rows.append((self._second + i, sent, limited, errors, retries, waits,
                         round(float(rate), 2)))
        self._second = second
        return rows


def write(conn: sqlite3.Connection, rows: list[Row] | None) -> None:
    """Add ``rows`` (inside the caller's transaction); none: nothing (the table may not be)."""
    if rows:
        conn.executemany(_UPSERT, rows)


def span(journal_path: Path) -> tuple[int, int] | None:
    """The run's first and last second; None without a row (or the table)."""
    conn = open_read_only(journal_path)
    if conn is None:
        return None
    try:
        first, last = conn.execute("SELECT MIN(t), MAX(t) FROM seconds").fetchone()
    except sqlite3.OperationalError:  # a journal from before the table
        return None
    finally:
        conn.close()
    return None if first is None else (int(first), int(last))


def read(journal_path: Path) -> Iterator[Row]:
    """The run's seconds in order, read-only; none from a journal without the table."""
    conn = open_read_only(journal_path)
    if conn is None:
        return
    try:
        yield from conn.execute(
            "SELECT t, sent, limited, errors, retries, lock_waits, COALESCE(rate, 0)"
            " FROM seconds ORDER BY t"
        )
    except sqlite3.OperationalError:  # a journal from before the table
        return
    finally:
        conn.close()
