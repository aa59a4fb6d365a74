"""The html report's charts, drawn here as inline SVG (no script, no request: the page is
opened offline): requests per second over the run's time, stacked by outcome, with the
limiter's rate and the rate ceiling as lines; lock waits per second below it when there were
any.

A run longer than ``MAX_BINS`` seconds is shown in bins of several seconds, each the per-second
mean of its seconds (the limiter's rate: the mean of its readings). Seconds the run has no row
for (between a killed process and its resume) are drawn empty. Every text is escaped.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from html import escape

from worker.timeline import Row

MAX_BINS = 600
#: colours: a request answered (not 429, not a transient failure), a 429, any other transient
#: failure, retries, the limiter's rate, the ceiling, lock waits
COLOURS = {"ok": "#3b8f4a", "limited": "#d1402f", "errors": "#e69a28", "retries": "#7a4cc2",
           "rate": "#1f5fbf", "ceiling": "#555555", "lock_waits": "#8a6d3b"}
LEGEND = {"ok": "answered", "limited": "429 (rate limited)", "errors": "5xx / timeout",
          "retries": "retries", "rate": "limiter's rate", "ceiling": "rate ceiling"}

_W, _H, _LEFT, _RIGHT, _TOP, _BOTTOM = 800, 270, 48, 8, 22, 30


@dataclass(frozen=True)
class Bins:
    """The run's seconds in bins: per-second means of each FIELD, the rate's mean."""

    start: int  # epoch second of the first
    seconds: int  # from the first row's second to the last's, inclusive
    per: int  # seconds a bin
    sent: list[float]
    limited: list[float]
    errors: list[float]
    retries: list[float]
    lock_waits: list[float]
    rate: list[float | None]

    @classmethod
    def of(cls, rows: Iterable[Row], max_bins: int = MAX_BINS,
           span: tuple[int, int] | None = None) -> Bins | None:
        """The bins of ``rows`` (in time order); ``span``: their first and last second, so
        the rows can stream past (a day of seconds need not sit in memory at once)."""
        if span is None:
            rows = list(rows)
            span = (rows[0][0], rows[-1][0]) if rows else None
        if span is None:
            return None
        start, end = span
        seconds = end - start + 1
        per = max(1, math.ceil(seconds / max_bins))
        n = math.ceil(seconds / per)
        sums = [[0.0] * n for _ in range(5)]
        rate_sum, rate_n = [0.0] * n, [0] * n
        for t, *counts, rate in rows:
            if t > end:  # a live run's second written after the span was read
                break
            i = (t - start) // per
            for k in range(5):
                sums[k][i] += counts[k]
            if rate:
                rate_sum[i] += rate
                rate_n[i] += 1
        sent, limited, errors, retries, lock_waits = ([v / per for v in s] for s in sums)
        rates = [rate_sum[i] / rate_n[i] if rate_n[i] else None for i in range(n)]
        return cls(start, seconds, per, sent, limited, errors, retries, lock_waits, rates)


def _nice(top: float) -> float:
    """The smallest round number (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8 times a power of ten) at
    or above ``top``, at least 1."""
    if top <= 1:
        return 1.0
    power = 10.0 ** math.floor(math.log10(top))
    steps = (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10)
    return next(float(m * power) for m in steps if m * power >= top)


def _clock(epoch: int) -> str:
    return f"{epoch // 3600 % 24:02d}:{epoch // 60 % 60:02d}:{epoch % 60:02d}"


def _frame(bins: Bins, top: float, height: int, unit: str, label: str) -> list[str]:
    """The axes, the grid and the time labels of one chart."""
    plot_h = height - _TOP - _BOTTOM
    right = _W - _RIGHT
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {_W} {height}" role="img"'
           f' class="chart" data-seconds="{bins.seconds}" data-bins="{len(bins.sent)}"'
           f' data-per="{bins.per}"><title>{escape(label)}</title>']
    for frac in (0.0, 0.5, 1.0):
        y = _TOP + plot_h * (1 - frac)
        out.append(f'<line x1="{_LEFT}" x2="{right}" y1="{y:.1f}" y2="{y:.1f}"'
                   ' stroke="#ddd" stroke-width="1"/>')
        value = top * frac
        text = f"{value:,.0f}" if value >= 10 or value == 0 else f"{value:,.1f}"
        out.append(f'<text x="{_LEFT - 4}" y="{y + 4:.1f}" text-anchor="end"'
                   f' font-size="11">{text}</text>')
    out.append(f'<text x="{_LEFT}" y="{_TOP - 8}" text-anchor="end" font-size="11">'
               f"{escape(unit)}</text>")
    base = height - _BOTTOM
    end = bins.start + bins.seconds
    for x, anchor, t in ((_LEFT, "start", bins.start), (right, "end", end),
                         ((_LEFT + right) / 2, "middle", (bins.start + end) // 2)):
        out.append(f'<text x="{x:.1f}" y="{base + 16}" text-anchor="{anchor}" font-size="11">'
                   f'{_clock(t)} UTC</text>')
    return out


def _line(values: Sequence[float | None], top: float, height: int, colour: str,
          dash: str = "") -> str:
    """A stepped line through the bins' values (None: a gap)."""
    plot_h = height - _TOP - _BOTTOM
    width = (_W - _LEFT - _RIGHT) / max(1, len(values))
    paths: list[str] = []
    pen = False
    for i, v in enumerate(values):
        if v is None:
            pen = False
            continue
        y = _TOP + plot_h * (1 - min(v, top) / top)
        x0, x1 = _LEFT + i * width, _LEFT + (i + 1) * width
        paths.append(f"{'L' if pen else 'M'}{x0:.1f} {y:.1f}L{x1:.1f} {y:.1f}")
        pen = True
    if not paths:
        return ""
    extra = f' stroke-dasharray="{dash}"' if dash else ""
    return (f'<path d="{"".join(paths)}" fill="none" stroke="{colour}" stroke-width="2"'
            f'{extra}/>')


def _bars(stacks: Sequence[tuple[str, Sequence[float]]], n: int, top: float,
          height: int) -> list[str]:
    """One ``<g class="bin">`` a bin (empty where nothing happened), its parts stacked."""
    plot_h = height - _TOP - _BOTTOM
    width = (_W - _LEFT - _RIGHT) / max(1, n)
    base = _TOP + plot_h
    out = []
    for i in range(n):
        x = _LEFT + i * width
        y: float = base
        parts = []
        for name, values in stacks:
            h = plot_h * min(values[i], top) / top
            if h > 0:
                y -= h
                parts.append(f'<rect class="{name}" x="{x:.1f}" y="{y:.1f}"'
                             f' width="{max(width - 0.3, 0.3):.1f}" height="{h:.1f}"'
                             f' fill="{COLOURS[name]}"/>')
        out.append(f'<g class="bin">{"".join(parts)}</g>')
    return out


def requests_chart(bins: Bins, ceiling: float | None) -> str:
    """Requests per second by outcome, retries, the limiter's rate and the ceiling."""
    ok = [max(s - lim - err, 0.0) for s, lim, err in zip(bins.sent, bins.limited, bins.errors,
                                                          strict=True)]
    peak = max([*bins.sent, *(r for r in bins.rate if r is not None), ceiling or 0.0, 1.0])
    top = _nice(peak * 1.05)
    out = _frame(bins, top, _H, "req/s", "requests per second over the run")
    out += _bars([("ok", ok), ("errors", bins.errors), ("limited", bins.limited)],
                 len(ok), top, _H)
    out.append(_line(bins.retries, top, _H, COLOURS["retries"]))
    out.append(_line(bins.rate, top, _H, COLOURS["rate"]))
    if ceiling:
        out.append(_line([ceiling] * len(ok), top, _H, COLOURS["ceiling"], "6 4"))
    out.append("</svg>")
    return "".join(out)


def lock_chart(bins: Bins) -> str:
    """Targets that began waiting for a task lock, per second ("" when none did)."""
    if not any(bins.lock_waits):
        return ""
    height = 120
    top = _nice(max(bins.lock_waits) * 1.05)
    out = _frame(bins, top, height, "waits/s", "lock waits per second")
    out += _bars([("lock_waits", bins.lock_waits)], len(bins.lock_waits), top, height)
    out.append("</svg>")
    return "".join(out)


def legend(names: Sequence[str]) -> str:
    return "".join(
        f'<span class="key"><span class="swatch" style="background:{COLOURS[n]}"></span>'
        f"{escape(LEGEND[n])}</span>" for n in names)
