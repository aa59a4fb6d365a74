"""The scenarios of issue 18: a limit that moves, and a limit the API states.

    m  moving limit, no ``--rate``: 150/s, 30/s for 4 s, 150/s, a half-second storm refusing
       everything, 150/s (seconds from the first request; the simulator's token bucket, burst
       one second of the rate); bulk-tagger against the floor driven by botocore's adaptive
       mode, concurrency 32
    h  stated limits, no ``--rate``: 150/s stated by the IETF draft's ``RateLimit-Policy`` /
       ``RateLimit``, then by ``X-RateLimit-*``; a windowed quota (300 per 15 s: a 5-minute
       quota scaled down for bench time) stated by ``RateLimit-Policy``, with the floor
       (no limiter) beside it for contrast

Figures from the simulator's arrival log (seconds from the first request, as the schedule):
*allowed* is the area under the schedule over the apply phase (first PATCH to last request);
*useful* the 2xx PATCH answers in it; *recovery* the time from the limit's return (and the
storm's end) until 2xx answers in a sliding half second first reach 90% of the limit.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

from . import contenders
from .contenders import Run
from .scenarios import Sizes, check, measure, workdir

CONCURRENCY = 32
HIGH, LOW = 150.0, 30.0
#: (from second, limit): the moving limit of (m); 0 refuses everything
SCHEDULE: tuple[tuple[float, float], ...] = (
    (0.0, HIGH), (6.0, LOW), (10.0, HIGH), (16.0, 0.0), (16.5, HIGH))
QUOTA, QUOTA_WINDOW_S = 300, 15.0
STATED = 150.0


def schedule_option(schedule: tuple[tuple[float, float], ...]) -> str:
    return ",".join(f"{at:g}:{limit:g}" for at, limit in schedule)


def limit_at(schedule: tuple[tuple[float, float], ...], t: float) -> float:
    value = schedule[0][1]
    for at, limit in schedule:
        if t >= at:
            value = limit
    return value


def area(schedule: tuple[tuple[float, float], ...], start: float, end: float) -> float:
    """Requests the schedule allowed from ``start`` to ``end`` (seconds)."""
    edges = sorted({start, end, *(at for at, _ in schedule if start < at < end)})
    return sum(limit_at(schedule, a) * (b - a) for a, b in itertools.pairwise(edges))


def recovery(log: list[tuple[float, str, int]], at: float, limit: float,
             window: float = 0.5) -> float | None:
    """Seconds from ``at`` until 2xx answers in a sliding ``window`` first reach 90% of
    ``limit`` per second (None: never)."""
    ok = sorted(t for t, _, s in log if 200 <= s < 300 and t >= at - window)
    need = 0.9 * limit * window
    j = 0
    for i, t in enumerate(ok):
        while ok[j] <= t - window:
            j += 1
        if t >= at and i - j + 1 >= need:
            return round(t - at, 3)
    return None


def _figures(row: dict[str, Any], schedule: tuple[tuple[float, float], ...]) -> None:
    log = row.pop("log")
    patches = [t for t, kind, _ in log if kind == "patch"]
    start = min(patches) if patches else 0.0
    end = max(t for t, _, _ in log) if log else 0.0
    useful = sum(1 for t, kind, s in log if kind == "patch" and 200 <= s < 300 and t >= start)
    allowed = area(schedule, start, end)
    row["useful_patches"] = useful
    row["allowed"] = round(allowed, 1)
    row["useful_share"] = round(useful / allowed, 4) if allowed else None
    row["useful_per_s"] = round(useful / (end - start), 2) if end > start else None
    row["apply_start_s"] = round(start, 3)
    row["apply_end_s"] = round(end, 3)
    back = [at for (at, limit), (_, before) in zip(schedule[1:], schedule, strict=False)
            if limit > before]
    row["recovery_s"] = {f"{at:g}": recovery(log, at, limit_at(schedule, at)) for at in back}


def _bt(label: str, wd: Any, images: int) -> Callable[[str], Run]:
    def start(url: str) -> Run:
        job = contenders.query_job(wd / f"{label}.json", concurrency=CONCURRENCY, value=label)
        return contenders.bulk_tagger(label, url, job, wd, concurrency=CONCURRENCY)

    return start


def scenario_m(sizes: Sizes, progress: Callable[[str], None]) -> dict[str, Any]:
    n = sizes.m_images
    option = ("--rate-schedule", schedule_option(SCHEDULE))
    rows = []
    with workdir() as wd:
        for name, start in (
            ("bulk-tagger (no --rate)", _bt("bulk-tagger", wd, n)),
            ("floor + botocore adaptive", lambda url: contenders.floor(
                "floor-boto", url, concurrency=CONCURRENCY, adaptive=True)),
        ):
            progress(f"m: {name} on {n} images, limit {schedule_option(SCHEDULE)}")
            row = measure(name, n, start, sim_options=option, keep_log=True)
            _figures(row, SCHEDULE)
            rows.append(row)
    bt, boto = rows
    checks = [
        check("m: useful PATCHes >= 95% of what the limit allowed", bt["useful_share"] or 0,
              ">=", 0.95, f"{bt['useful_patches']} of {bt['allowed']} (area under the "
              f"schedule from the first PATCH, {bt['apply_start_s']} s, to the last request, "
              f"{bt['apply_end_s']} s)"),
        check("m: 429s share of all requests <= 3%", bt["r429_share"], "<=", 0.03),
    ]
    for at, took in bt["recovery_s"].items():
        checks.append(check(f"m: back to >= 90% of the limit within 2 s of {at} s",
                            took if took is not None else 99.0, "<=", 2.0,
                            f"botocore adaptive: {boto['recovery_s'].get(at)} s"))
    checks.append(check(
        "m: useful PATCHes per second, bulk-tagger / botocore adaptive (same schedule)",
        (bt["useful_per_s"] or 0) / (boto["useful_per_s"] or 1), ">=", 1.0,
        f"bulk-tagger {bt['useful_per_s']}/s ({bt['useful_share']} of allowed, "
        f"{bt['r429_share'] * 100:.1f}% 429s); botocore {boto['useful_per_s']}/s "
        f"({boto['useful_share']} of allowed, {boto['r429_share'] * 100:.1f}% 429s)"))
    return {"scenario": "m", "title": "moving limit: 150/s, 30/s for 4 s, 150/s, a 0.5 s storm",
            "params": {"images": n, "concurrency": CONCURRENCY,
                       "schedule": [list(step) for step in SCHEDULE], "server_burst": "1 s"},
            "rows": rows, "checks": checks}


def scenario_h(sizes: Sizes, progress: Callable[[str], None]) -> dict[str, Any]:
    rows = []
    checks = []
    with workdir() as wd:
        for style, title in (("ietf", "RateLimit-Policy/RateLimit"), ("x", "X-RateLimit-*")):
            n = sizes.h_images
            name = f"bulk-tagger, {title}"
            progress(f"h: {name} on {n} images, limit {STATED:g}/s")
            row = measure(name, n, _bt(f"bt-{style}", wd, n), rate_limit=STATED,
                          sim_options=("--rate-headers", style))
            rows.append(row)
            checks += [
                check(f"h: {title}: useful requests/s in the apply phase >= 98% of L",
                      row["apply_rate"], ">=", 0.98 * STATED),
                check(f"h: {title}: 429s", row["server"]["rate_limited"], "==", 0),
            ]
        n = sizes.h_quota_images
        per_s = QUOTA / QUOTA_WINDOW_S
        option = ("--quota", str(QUOTA), "--quota-window", f"{QUOTA_WINDOW_S:g}",
                  "--rate-headers", "ietf")
        for name, start in (
            ("bulk-tagger, windowed quota", _bt("bt-quota", wd, n)),
            ("floor (no limiter), windowed quota", lambda url: contenders.floor(
                "floor-quota", url, concurrency=CONCURRENCY)),
        ):
            progress(f"h: {name} on {n} images, {QUOTA} per {QUOTA_WINDOW_S:g} s")
            rows.append(measure(name, n, start, sim_options=option))
        bt, floor = rows[-2:]
        checks += [
            check(f"h: quota {QUOTA}/{QUOTA_WINDOW_S:g} s: 429s", bt["server"]["rate_limited"],
                  "==", 0, f"the floor without a limiter: {floor['server']['rate_limited']}"),
            check(f"h: quota: busiest second <= 1.1 x the quota per second ({per_s:g})",
                  bt["max_sliding"], "<=", 1.1 * per_s,
                  f"paced, not spent in a burst; the floor's busiest: {floor['max_sliding']}"),
            check("h: quota: useful requests/s in the apply phase >= 90% of the quota per s",
                  bt["apply_rate"], ">=", 0.9 * per_s),
        ]
    return {"scenario": "h", "title": "limits the API states in headers, no --rate",
            "params": {"images": sizes.h_images, "quota_images": sizes.h_quota_images,
                       "limit": STATED, "quota": QUOTA, "quota_window_s": QUOTA_WINDOW_S,
                       "concurrency": CONCURRENCY},
            "rows": rows, "checks": checks}
