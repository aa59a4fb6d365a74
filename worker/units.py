"""Durations and sizes as a person reads them, and the duration units the job file and the
command line take: one way to write each, for every stage that shows one (the summary, the HTML
report, ``runs``, ``prune``, a plan too old to apply).

Nothing here imports another worker module.
"""

from __future__ import annotations

#: seconds per unit of a written duration (``90m``, ``24h``, ``30d``, ``2w``)
SECONDS_PER_UNIT: dict[str, int] = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def duration_text(seconds: float) -> str:
    """``12.3s`` under a minute, else ``5m 03s`` or ``1h 02m 03s`` (whole seconds)."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


def size_text(n: int) -> str:
    """Bytes as ``512 B``, ``1.5 KiB``, ``3.2 MiB`` or ``1.1 GiB`` (GiB past that too)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"
