"""The scenarios of issue 8. Each starts a fresh simulator process per contender (the same
demo data, counters from zero), runs the contender in its own process, and returns a JSON-able
dict: parameters, one row per contender, and the checks against the targets.

    a  CPU: 20,000 images, no latency, no limit (the SDK on fewer images; per-image CPU)
    b  latency: 20 ms answers, concurrency 64: throughput against the floor
    c  known limit L=200/s, ``--rate 200``
    d  unknown limit L=200/s, no ``--rate``
    e  memory: ``plan`` of selector files of 100,000 and 1,000,000 rows
    f  requests per change: a query job (from a's run) and a file job
    j  the journal's write cost: ``plan`` against ``run`` on one job, and (with py-spy) the
       share of bulk-tagger's CPU samples in the journal and the exports
    r  a resume's reads: a query run SIGTERMed near 10% and resumed (tests/bench/resume.py)
    s  the run's record on disk: bytes per target of a mass retag and of the same job again
"""

from __future__ import annotations

import math
import shutil
import statistics
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from worker.simulator.demo import COMBOS, Demo

from . import contenders, htmlpage, resume, storage
from .contenders import Run
from .harness import SimServer
from .metrics import windows
from .profile import journal_share

CONCURRENCY = 64
LIMIT = 200.0


@dataclass
class Sizes:
    """How much work each scenario does (``--scale`` multiplies the image and row counts)."""

    a_images: int = 20_000
    a_sdk_images: int = 1_500
    b_images: int = 10_000
    b_sdk_images: int = 1_500
    b_latency_ms: float = 20.0
    c_images: int = 2_000
    d_images: int = 4_000
    #: the SDK is CPU-bound near 150 requests/s here: it cannot reach L, so less work suffices
    rate_sdk_images: int = 1_000
    e_rows: tuple[int, ...] = (100_000, 1_000_000)
    f_rows: int = 5_000
    j_images: int = 10_000
    #: (m) and (h) of issue 18 (``tests/bench/limits.py``)
    m_images: int = 4_000
    h_images: int = 2_000
    h_quota_images: int = 500
    r_images: int = 20_000
    s_targets: int = 20_000
    #: (v) the html report of a run of this many private targets (issue 21), and of a
    #: finished run of this many targets written without running it
    v_targets: int = 100_000
    v_written_targets: int = 1_000_000
    #: (a) and (b): rounds of every contender in turn (the median of per-round ratios counts)
    rounds: int = 5

    def scaled(self, factor: float) -> Sizes:
        """Every count times ``factor`` (at least 10); the latency and the rounds stay."""

        def s(n: int) -> int:
            return max(10, round(n * factor))

        changes: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "rounds":
                continue
            if isinstance(value, int):
                changes[f.name] = s(value)
            elif isinstance(value, tuple):
                changes[f.name] = tuple(s(n) for n in value)
        return replace(self, **changes)


def check(name: str, value: float, op: str, limit: float, note: str = "") -> dict[str, Any]:
    ok = {"<=": value <= limit, ">=": value >= limit, "==": value == limit}[op]
    return {"target": name, "value": round(value, 4), "op": op, "limit": round(limit, 4),
            "ok": bool(ok), "note": note}


@contextmanager
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="bench-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def private_pages(images: int, page: int = 1000) -> int:
    """List GETs a query for private images makes over every demo region (>= 1 per region)."""
    demo = Demo(images, 0)
    pages = 0
    for combo, _ in COMBOS:
        block = demo.blocks[combo]
        n = sum(1 for i in block if demo.base(i).visibility == "private")
        pages += max(1, math.ceil(n / page))
    return pages


def measure(
    label: str, images: int, start: Callable[[str], Run], *, rate_limit: float | None = None,
    latency_ms: float = 0.0, arrivals: bool = True, sim_options: tuple[str, ...] = (),
    keep_log: bool = False,
) -> dict[str, Any]:
    """One contender against a fresh simulator; the row of figures (``keep_log``: with the
    arrival log under ``"log"``, for the caller to read and drop)."""
    with SimServer(images=images, rate_limit=rate_limit, latency_ms=latency_ms,
                   options=sim_options) as sim:
        run = start(sim.url)
        counters = sim.counters()
        log = sim.arrivals() if arrivals else []
    win = windows(log)
    span = win["span_s"]
    proc = run.proc
    row: dict[str, Any] = {
        "label": label,
        "images": images,
        "updated": run.updated,
        "failed": run.failed,
        "rc": proc.rc,
        "cpu_s": round(proc.cpu_s, 3),
        "user_s": round(proc.user_s, 3),
        "sys_s": round(proc.sys_s, 3),
        "wall_s": round(proc.wall_s, 3),
        "duration_s": round(run.duration_s, 3),
        "maxrss_mb": round(proc.maxrss_mb, 1),
        "cpu_per_update_ms": round(proc.cpu_s / run.updated * 1000, 4) if run.updated else None,
        "server": {
            "requests": {k: v for k, v in counters["requests"].items() if v},
            "total": counters["total"],
            "statuses": counters["statuses"],
            "rate_limited": counters["rate_limited"],
            "max_per_second": counters["max_per_second"],
            "cpu_s": round(sim.cpu_s, 3),
        },
        "span_s": span,
        "throughput_per_s": round(run.updated / span, 2) if span else None,
        "useful_rate": win["useful_rate"],
        "apply_rate": win["apply_rate"],
        "apply_span_s": win["apply_span_s"],
        "r429_first_2s": win["r429_first_2s"],
        "r429_share_after_2s": win["r429_share_after_2s"],
        "max_window": win["max_window"],
        "max_sliding": win["max_sliding"],
        "r429_share": round(counters["rate_limited"] / counters["total"], 4)
        if counters["total"] else 0.0,
        "per_second": {"total": win["total"], "ok": win["ok"], "r429": win["r429"]},
        "cmd": " ".join(proc.cmd),
        **run.extra,
    }
    if keep_log:
        row["log"] = log
    return row


def _bt(
    label: str, wd: Path, *, rate: float | None = None, command: str = "run",
    job: Path | None = None,
) -> Callable[[str], Run]:
    def start(url: str) -> Run:
        the_job = job or contenders.query_job(wd / f"{label}.json", concurrency=CONCURRENCY,
                                              value=label)
        return contenders.bulk_tagger(label, url, the_job, wd, command=command,
                                      concurrency=CONCURRENCY, rate=rate)

    return start


def _floor(label: str, rate: float | None = None) -> Callable[[str], Run]:
    return lambda url: contenders.floor(label, url, concurrency=CONCURRENCY, rate=rate)


def _sdk(label: str, rate: float | None = None) -> Callable[[str], Run]:
    return lambda url: contenders.sdk(label, url, concurrency=CONCURRENCY, rate=rate)


# -- a, b: every contender once a round, in rounds ----------------------------------------------
Contender = tuple[str, int, Callable[[int], Callable[[str], Run]]]


def _rounds(
    scenario: str, sizes: Sizes, progress: Callable[[str], None],
    contenders: list[Contender], **sim: Any,
) -> list[dict[str, dict[str, Any]]]:
    """``sizes.rounds`` rounds of every contender in turn (``(name, images, start for round
    k)``), so that all see the same spells of a noisy machine; each round's ratios are taken,
    and the median of those. One dict of rows by name a round."""
    rounds = []
    for k in range(1, sizes.rounds + 1):
        tag = f" #{k}" if sizes.rounds > 1 else ""
        row: dict[str, dict[str, Any]] = {}
        for name, images, start in contenders:
            progress(f"{scenario}: {name} on {images} images (round {k} of {sizes.rounds})")
            row[name] = measure(name + tag, images, start(k), **sim)
        rounds.append(row)
    return rounds


def _paired(
    name: str, values: list[float], op: str, limit: float, note: str = ""
) -> dict[str, Any]:
    """A check on the median of per-round ratios; the rounds' values go in the note."""
    each = ", ".join(f"{v:.3f}" for v in values)
    rounds = f"median of {len(values)} paired rounds ({each})" if len(values) > 1 else ""
    return check(name, statistics.median(values), op, limit,
                 "; ".join(part for part in (rounds, note) if part))


def scenario_a(sizes: Sizes, progress: Callable[[str], None]) -> dict[str, Any]:
    n, n_sdk = sizes.a_images, sizes.a_sdk_images
    with workdir() as wd:
        # each round: the fixed cost of each process (start-up, imports, the run's record:
        # no images), then the work
        rounds = _rounds("a", sizes, progress, [
            ("bulk-tagger (0 images)", 0, lambda k: _bt(f"bt-empty-{k}", wd)),
            ("floor (0 images)", 0, lambda k: _floor("floor")),
            ("sdk (0 images)", 0, lambda k: _sdk("sdk")),
            ("bulk-tagger", n, lambda k: _bt(f"bulk-tagger-{k}", wd)),
            ("floor", n, lambda k: _floor("floor")),
            ("sdk", n_sdk, lambda k: _sdk("sdk")),
        ], arrivals=False)
    for r in rounds:
        for name in ("bulk-tagger", "floor", "sdk"):
            row, fixed = r[name], r[f"{name} (0 images)"]["cpu_s"]
            row["fixed_cpu_s"] = fixed
            row["net_cpu_per_update_ms"] = (
                round((row["cpu_s"] - fixed) / row["updated"] * 1000, 4)
                if row["updated"] else None
            )

    def ratios(a: str, b: str, key: str) -> list[float]:
        return [r[a][key] / r[b][key] for r in rounds]

    checks = [
        _paired("a: CPU/update bulk-tagger / floor (gross, same images)",
                ratios("bulk-tagger", "floor", "cpu_per_update_ms"), "<=", 1.5),
        _paired("a: CPU/update bulk-tagger / floor (net of fixed cost)",
                ratios("bulk-tagger", "floor", "net_cpu_per_update_ms"), "<=", 1.5,
                "informative: the target is the gross figure"),
        _paired("a: CPU/update SDK / bulk-tagger (net of fixed cost)",
                ratios("sdk", "bulk-tagger", "net_cpu_per_update_ms"), ">=", 10.0,
                f"the SDK ran {n_sdk} images, bulk-tagger {n}: per-image CPU net of each "
                "one's no-image run in the same round"),
        _paired("a: CPU/update SDK / bulk-tagger (gross)",
                ratios("sdk", "bulk-tagger", "cpu_per_update_ms"), ">=", 10.0,
                "informative: unequal image counts"),
    ]
    return {"scenario": "a", "title": "CPU: no latency, no limit",
            "params": {"images": n, "sdk_images": n_sdk, "concurrency": CONCURRENCY,
                       "rounds": sizes.rounds},
            "rows": [row for r in rounds for row in r.values()], "checks": checks}


def scenario_b(sizes: Sizes, progress: Callable[[str], None]) -> dict[str, Any]:
    n, lat = sizes.b_images, sizes.b_latency_ms
    with workdir() as wd:
        rounds = _rounds("b", sizes, progress, [
            ("bulk-tagger", n, lambda k: _bt(f"bulk-tagger-{k}", wd)),
            ("floor", n, lambda k: _floor("floor")),
        ], latency_ms=lat)
        progress(f"b: sdk on {sizes.b_sdk_images} images, {lat:g} ms answers")
        sdk = measure("sdk", sizes.b_sdk_images, _sdk("sdk"), latency_ms=lat)
    rows = [row for r in rounds for row in r.values()] + [sdk]
    pairs = [(r["bulk-tagger"], r["floor"]) for r in rounds]
    plans = ", ".join(f"{b['span_s'] - b['apply_span_s']:.2f} of {b['span_s']:.2f} s"
                      for b, _ in pairs)
    checks = [
        _paired("b: throughput bulk-tagger / floor (updates per second of server-seen span)",
                [b["throughput_per_s"] / f["throughput_per_s"] for b, f in pairs], ">=", 0.90),
        _paired("b: 2xx per full second, bulk-tagger / floor",
                [b["useful_rate"] / f["useful_rate"] for b, f in pairs], ">=", 0.90,
                "informative"),
        _paired("b: 2xx/s of the apply phase alone, bulk-tagger / floor",
                [b["apply_rate"] / f["apply_rate"] for b, f in pairs], ">=", 0.90,
                f"informative: bulk-tagger's plan phase (before its first PATCH) took {plans}"),
    ]
    return {"scenario": "b", "title": f"latency: {lat:g} ms answers, concurrency {CONCURRENCY}",
            "params": {"images": n, "sdk_images": sizes.b_sdk_images, "latency_ms": lat,
                       "concurrency": CONCURRENCY, "rounds": sizes.rounds},
            "rows": rows, "checks": checks}


# -- c, d: rate limits -------------------------------------------------------------------------
def _rate(
    scenario: str, images: int, sdk_images: int, known: bool, progress: Callable[[str], None]
) -> dict[str, Any]:
    rows = []
    bt_rate = LIMIT if known else None
    with workdir() as wd:
        label = f"bulk-tagger --rate {LIMIT:g}" if known else "bulk-tagger (no --rate)"
        for name, n, start in (
            (label, images, _bt("bulk-tagger", wd, rate=bt_rate)),
            ("floor", images, _floor("floor")),
            (f"floor + AsyncLimiter({LIMIT:g}, 1)", images, _floor("floor-lim", LIMIT)),
            ("sdk", sdk_images, _sdk("sdk")),
            (f"sdk + AsyncLimiter({LIMIT:g}, 1)", sdk_images, _sdk("sdk-lim", LIMIT)),
        ):
            progress(f"{scenario}: {name} on {n} images, server limit {LIMIT:g}/s")
            rows.append(measure(name, n, start, rate_limit=LIMIT))
    bt = rows[0]
    if known:
        checks = [
            check("c: useful (2xx) requests/s in the apply phase >= 98% of L",
                  bt["apply_rate"], ">=", 0.98 * LIMIT,
                  "from the first PATCH's arrival to the last request's"),
            check("c: useful requests/s, whole run (full one-second windows)",
                  bt["useful_rate"], ">=", 0.98 * LIMIT,
                  "informative: includes the plan phase's reads and the hand-over to apply"),
            check("c: 429s", bt["server"]["rate_limited"], "==", 0),
            check("c: busiest one-second window (sliding) <= L", bt["max_sliding"], "<=", LIMIT),
        ]
    else:
        checks = [
            check("d: useful (2xx) requests/s in the apply phase >= 85% of L",
                  bt["apply_rate"], ">=", 0.85 * LIMIT,
                  "from the first PATCH's arrival to the last request's, discovery included"),
            check("d: useful requests/s, whole run (full one-second windows)",
                  bt["useful_rate"], ">=", 0.85 * LIMIT, "informative"),
            check("d: 429s share of all requests <= 5%", bt["r429_share"], "<=", 0.05,
                  f"{bt['r429_first_2s']} of the {bt['server']['rate_limited']} came in the "
                  "first 2 s of the apply phase; after them the share was "
                  f"{bt['r429_share_after_2s'] * 100:.1f}%"),
        ]
    title = (f"known limit L={LIMIT:g}/s, --rate {LIMIT:g}" if known
             else f"unknown limit L={LIMIT:g}/s, no --rate")
    return {"scenario": scenario, "title": title,
            "params": {"images": images, "sdk_images": sdk_images, "limit": LIMIT,
                       "concurrency": CONCURRENCY,
                       "server_burst": LIMIT},
            "rows": rows, "checks": checks}


def scenario_c(sizes: Sizes, progress: Callable[[str], None]) -> dict[str, Any]:
    return _rate("c", sizes.c_images, sizes.rate_sdk_images, True, progress)


def scenario_d(sizes: Sizes, progress: Callable[[str], None]) -> dict[str, Any]:
    return _rate("d", sizes.d_images, sizes.rate_sdk_images, False, progress)


# -- e: memory ---------------------------------------------------------------------------------
def images_for_region_rows(rows: int) -> int:
    """Demo images so that region (1337, 7) (30% of them) holds at least ``rows``."""
    n = math.ceil(rows / 0.30) + 3
    while len(Demo(n, 0).blocks[(1337, 7)]) < rows:
        n += 1
    return n


def write_rows(path: Path, images: int, rows: int, *, private_only: bool = False) -> int:
    """A CSV naming ``rows`` images of region (1337, 7), in list order; the rows written."""
    demo = Demo(images, 0)
    block = demo.blocks[(1337, 7)]
    written = 0
    with path.open("w") as fh:
        fh.write("project_id,region_id,image_id\n")
        for i in block:
            if written >= rows:
                break
            if private_only and demo.base(i).visibility != "private":
                continue
            fh.write(f"1337,7,{demo.image_id(i)}\n")
            written += 1
    return written


def scenario_e(sizes: Sizes, progress: Callable[[str], None]) -> dict[str, Any]:
    rows_out = []
    with workdir() as wd:
        for n_rows in sizes.e_rows:
            images = images_for_region_rows(n_rows)
            csv_path = wd / f"rows-{n_rows}.csv"
            write_rows(csv_path, images, n_rows)
            job = contenders.file_job(wd / f"file-{n_rows}.json", csv_path,
                                      concurrency=CONCURRENCY, value="e")
            progress(f"e: bulk-tagger plan of {n_rows} rows ({images} simulator images)")
            row = measure(f"bulk-tagger plan, {n_rows:,} rows", images,
                          _bt(f"plan-{n_rows}", wd, command="plan", job=job), arrivals=False)
            row["rows"] = n_rows
            row["csv_bytes"] = csv_path.stat().st_size
            row["cpu_per_row_ms"] = round(row["cpu_s"] / n_rows * 1000, 4)
            row["reads"] = row["server"]["requests"].get("list", 0) + \
                row["server"]["requests"].get("get", 0)
            csv_path.unlink()
            rows_out.append(row)
    checks = []
    big = max(rows_out, key=lambda r: r["rows"])
    small = min(rows_out, key=lambda r: r["rows"])
    checks.append(check(f"e: peak RSS at {big['rows']:,} rows (MB)", big["maxrss_mb"], "<=", 150))
    if big is not small:
        checks.append(check(f"e: peak RSS {big['rows']:,} / {small['rows']:,} rows",
                            big["maxrss_mb"] / small["maxrss_mb"], "<=", 1.2))
    for r in rows_out:
        checks.append(check(f"e/f: reads for a file of {r['rows']:,} rows in one region",
                            r["reads"], "<=", r["rows"] / 100))
    return {"scenario": "e", "title": "memory: plan of a selector file, rows of real images "
            "in one region", "params": {"rows": list(sizes.e_rows)},
            "rows": rows_out, "checks": checks}


# -- f: requests per change --------------------------------------------------------------------
def scenario_f(
    sizes: Sizes, progress: Callable[[str], None], a_result: dict[str, Any] | None
) -> dict[str, Any]:
    rows_out = []
    checks = []
    with workdir() as wd:
        if a_result is not None:
            bt = next(r for r in a_result["rows"] if r["label"].startswith("bulk-tagger #")
                      or r["label"] == "bulk-tagger")
            images = bt["images"]
        else:
            images = sizes.a_images // 4
            progress(f"f: bulk-tagger query job on {images} images")
            bt = measure("bulk-tagger", images, _bt("bulk-tagger", wd), arrivals=False)
        pages = private_pages(images)
        req = bt["server"]["requests"]
        query_row = {
            "label": "bulk-tagger query job", "images": images, "updated": bt["updated"],
            "patch": req.get("patch", 0), "list": req.get("list", 0), "get": req.get("get", 0),
            "projects": req.get("projects", 0), "regions": req.get("regions", 0),
            "total": bt["server"]["total"], "expected_pages": pages,
            "requests_per_change": round(bt["server"]["total"] / bt["updated"], 4)
            if bt["updated"] else None,
        }
        rows_out.append(query_row)
        checks += [
            check("f: query job PATCHes per change", query_row["patch"] / bt["updated"],
                  "==", 1.0),
            check("f: query job list GETs = pages", query_row["list"], "==", pages,
                  "9 regions, 1,000 images a page, at least one page a region"),
            check("f: query job single-image GETs", query_row["get"], "==", 0),
        ]
        n_rows = sizes.f_rows
        images = images_for_region_rows(2 * n_rows)
        csv_path = wd / "rows.csv"
        written = write_rows(csv_path, images, n_rows, private_only=True)
        job = contenders.file_job(wd / "file.json", csv_path, concurrency=CONCURRENCY,
                                  value="f")
        progress(f"f: bulk-tagger file job of {written} rows ({images} simulator images)")
        row = measure("bulk-tagger file job", images,
                      _bt("file", wd, job=job), arrivals=False)
        req = row["server"]["requests"]
        reads = req.get("list", 0) + req.get("get", 0)
        file_row = {
            "label": "bulk-tagger file job", "images": images, "rows": written,
            "updated": row["updated"], "patch": req.get("patch", 0), "list": req.get("list", 0),
            "get": req.get("get", 0), "total": row["server"]["total"], "reads": reads,
            "requests_per_change": round(row["server"]["total"] / row["updated"], 4)
            if row["updated"] else None,
            "cpu_s": row["cpu_s"], "cmd": row["cmd"],
        }
        rows_out.append(file_row)
        checks += [
            check(f"f: file job of {written} rows, reads <= N/100", reads, "<=", written / 100),
            check("f: file job PATCHes per change", file_row["patch"] / max(1, row["updated"]),
                  "==", 1.0),
            check("f: file job rows updated", row["updated"], "==", written),
        ]
    return {"scenario": "f", "title": "requests per change", "params": {"file_rows": n_rows},
            "rows": rows_out, "checks": checks}


# -- j: the journal's write cost ---------------------------------------------------------------
def scenario_j(sizes: Sizes, progress: Callable[[str], None]) -> dict[str, Any]:
    n = sizes.j_images
    rows = []
    with workdir() as wd:
        for command in ("plan", "run"):
            progress(f"j: bulk-tagger {command} on {n} images")
            row = measure(f"bulk-tagger {command}", n, _bt(f"j-{command}", wd, command=command),
                          arrivals=False)
            targets = sum((row.get("summary_counts") or {}).values())
            row["targets"] = targets
            row["cpu_per_target_ms"] = round(row["cpu_s"] / targets * 1000, 4) if targets else None
            rows.append(row)
        progress(f"j: bulk-tagger run on {n} images under py-spy")
        profile = journal_share(
            lambda url, out: contenders.bulk_tagger(
                "j-prof", url, contenders.query_job(wd / "j-prof.json",
                                                    concurrency=CONCURRENCY, value="p"),
                wd, concurrency=CONCURRENCY, profile_to=out),
            n, wd,
        )
    plan, run = rows
    per_target = {r["label"]: r["cpu_per_target_ms"] for r in rows}
    result: dict[str, Any] = {
        "scenario": "j", "title": "the journal's write cost", "params": {"images": n},
        "rows": rows, "profile": profile,
        "apply_cpu_per_update_ms": round(
            (run["cpu_s"] - plan["cpu_s"]) / max(1, run["updated"]) * 1000, 4),
        "per_target": per_target, "checks": [],
    }
    return result


# -- s: the record on disk ---------------------------------------------------------------------
def scenario_s(sizes: Sizes, progress: Callable[[str], None]) -> dict[str, Any]:
    with workdir() as wd:
        rows = storage.measure(sizes.s_targets, progress, wd)
    checks = []
    for row in rows:
        expect, n = row["expect"], row["targets"]
        checks.append(check(
            f"s: bytes on disk per target, a run of {n:,} targets all {expect}",
            row["disk_bytes"] / max(n, 1), "<=", storage.LIMITS[expect],
            f"{row['counts'].get(expect, 0):,} {expect}; files: "
            + ", ".join(f"{k} {v:,} B" for k, v in row["files"].items())))
    return {"scenario": "s", "title": "the run's record on disk (a finished run's folder)",
            "params": {"targets": sizes.s_targets}, "rows": rows, "checks": checks}


def requests_by_kind(rows: list[dict[str, Any]]) -> Counter[str]:
    total: Counter[str] = Counter()
    for r in rows:
        total.update(r.get("server", {}).get("requests", {}))
    return total


def scenario_r(sizes: Sizes, progress: Callable[[str], None]) -> dict[str, Any]:
    with workdir() as wd:
        return resume.scenario_r(sizes, progress, wd, CONCURRENCY, check)


def scenario_v(sizes: Sizes, progress: Callable[[str], None]) -> dict[str, Any]:
    with workdir() as wd:
        row = htmlpage.measure(sizes.v_targets, progress, wd)
    with workdir() as wd:
        big = htmlpage.measure_written(sizes.v_written_targets, progress, wd)
    n, m = row["targets"], big["targets"]
    checks = [
        check(f"v: report --format html of {n:,} targets, wall s", row["wall_s"], "<=",
              htmlpage.WALL_S, f"page {row['page_bytes']:,} B; cpu {row['cpu_s']} s"),
        check(f"v: report --format html of {n:,} targets, peak RSS MB", row["maxrss_mb"],
              "<=", htmlpage.RSS_MB),
        check(f"v: report --format html of {m:,} written targets, peak RSS MB",
              big["maxrss_mb"], "<=", htmlpage.RSS_MB,
              f"wall {big['wall_s']} s, cpu {big['cpu_s']} s"),
        check(f"v: report --format html of {m:,} written targets, page bytes",
              big["page_bytes"], "<=", htmlpage.BIG_PAGE_BYTES,
              f"{big['names_listed']:,} names listed"),
        check(f"v: report --format html of {m:,} written targets, wall s", big["wall_s"],
              "<=", htmlpage.BIG_WALL_S),
        check(f"v: the {m:,}-target page names the command for every failed and skipped "
              "target", big["export_lines"], "==", 2),
    ]
    return {"scenario": "v", "title": "the html report of a big run",
            "params": {"targets": sizes.v_targets, "written_targets": sizes.v_written_targets},
            "rows": [row, big], "checks": checks}
