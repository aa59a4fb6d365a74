"""Figures from the simulator's arrival log: one-second windows, sliding maxima, useful rate.

Windows are counted from the first arrival, as the simulator's own ``per_second`` counters
are: window k holds the requests that arrived in [k, k+1) seconds. The last window is
partial, so rates average the full windows only (a run shorter than one second divides by
its length instead). ``apply_rate`` is the steady rate of the write phase, free of window
edges: 2xx answers to requests that arrived from the first PATCH on, over the time from the
first PATCH's arrival to the last request's.
"""

from __future__ import annotations

from collections import deque
from typing import Any

Arrival = tuple[float, str, int]


def max_sliding(times: list[float], width: float = 1.0) -> int:
    """The most arrivals in any window (t - width, t] (the simulator's ``max_per_second``)."""
    window: deque[float] = deque()
    best = 0
    for t in times:
        window.append(t)
        edge = t - width
        while window[0] <= edge:
            window.popleft()
        best = max(best, len(window))
    return best


def windows(arrivals: list[Arrival]) -> dict[str, Any]:
    """Per one-second window: all requests, 2xx answers and 429s; and the useful rate."""
    if not arrivals:
        return {"span_s": 0.0, "total": [], "ok": [], "r429": [], "useful_rate": 0.0,
                "max_window": 0, "max_sliding": 0, "apply_span_s": 0.0, "apply_rate": 0.0,
                "r429_first_2s": 0, "r429_share_after_2s": 0.0}
    times = sorted(t for t, _, _ in arrivals)
    span = times[-1]
    n = int(span) + 1
    total, ok, r429 = [0] * n, [0] * n, [0] * n
    for t, _, status in arrivals:
        k = int(t)
        total[k] += 1
        if 200 <= status < 300:
            ok[k] += 1
        elif status == 429:
            r429[k] += 1
    full = n - 1
    useful = sum(ok[:full]) / full if full else (sum(ok) / span if span > 0 else float(sum(ok)))
    # the apply phase: from the first PATCH to the last request, 2xx answers per second
    patches = [t for t, kind, _ in arrivals if kind == "patch"]
    start = min(patches) if patches else 0.0
    apply_span = span - start
    apply_ok = sum(1 for t, _, s in arrivals if t >= start and 200 <= s < 300)
    # 429s while a limit is being found (the first 2 s of the apply phase) and after
    settled = [s for t, _, s in arrivals if t >= start + 2.0]
    early_429 = sum(1 for t, _, s in arrivals if start <= t < start + 2.0 and s == 429)
    return {
        "span_s": round(span, 3),
        "apply_span_s": round(apply_span, 3),
        "apply_rate": round(apply_ok / apply_span, 2) if apply_span > 0 else 0.0,
        "r429_first_2s": early_429,
        "r429_share_after_2s": round(sum(1 for s in settled if s == 429) / len(settled), 4)
        if settled else 0.0,
        "total": total,
        "ok": ok,
        "r429": r429,
        "useful_rate": round(useful, 2),
        "max_window": max(total[:full]) if full else total[0],
        "max_sliding": max_sliding(times),
    }
