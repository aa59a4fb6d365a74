"""The report stage against real files, a real log stream and a real local HTTP server."""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import random
import re
import shlex
import stat
import tracemalloc
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import T0, sample_summary
from worker import units
from worker.exports import write_exports
from worker.journal import Journal
from worker.models import RESULT_FIELDS
from worker.report import (
    LatencyStats,
    build_summary,
    format_change,
    format_plan,
    format_summary,
    print_report,
)

# --------------------------------------------------------------------------- exports


def make_row(i: int) -> dict[str, Any]:
    status = ("updated", "unchanged", "skipped", "failed")[i % 4]
    row: dict[str, Any] = {
        "error": 'boom,\n"quoted" line two' if status == "failed" else None,  # any key order
        "run_id": "r-1",
        "project_id": 1337,
        "region_id": 7 + i % 3,
        "image_id": f"img-{i:06d}",
        "name": f"ubuntu-{i}, ünïcode",
        "status": status,
        "reason": None if status == "updated" else f"reason {i % 5}",
        "before": {"tags": {"team": "ops", "n": str(i)}, "ssh_key": "deny"},
        "after": {"tags": {"owner": "ops", "n": str(i)}, "ssh_key": "allow"},
        "patch": {"tags": {"team": None, "owner": "ops"}, "ssh_key": "allow"},
        "attempts": 1 + i % 3,
        "http_status": 200 if status == "updated" else None,
        "lock_wait_s": 0.5 * (i % 2),
        "duration_ms": 40 + i % 17,
        "source": "not a result field",
    }
    if i % 10 == 3:  # the journal holds compact JSON text; the exports embed it as it is
        row["before"] = json.dumps(row["before"], separators=(",", ":"))
    if i % 10 == 5:
        del row["after"]  # a missing key is null
    return row


def expected_row(i: int) -> dict[str, Any]:
    row = make_row(i)
    if isinstance(row["before"], str):
        row["before"] = json.loads(row["before"])
    return {name: row.get(name) for name in RESULT_FIELDS}



def test_csv_cells_a_spreadsheet_would_run_as_formulas_are_neutralised(tmp_path: Path) -> None:
    """An image name (set by anyone who may name images) such as ``=HYPERLINK(...)`` must not
    run when an operator opens results.csv: the cell gets a leading apostrophe (OWASP's CSV
    injection advice); results.jsonl keeps the name exactly; other cells are untouched."""
    names = ['=HYPERLINK("http://x","y")', "+1+2", "-3", "@SUM(A1)", "\tx", "plain", "a-b=c"]
    rows = []
    for i, name in enumerate(names):
        row = make_row(4 * i)  # updated: no error text
        row["name"] = name
        rows.append(row)
    write_exports(tmp_path, rows, sample_summary(), formats=("jsonl", "csv"))
    with (tmp_path / "results.csv").open(newline="", encoding="utf-8") as f:
        cells = [dict(zip(RESULT_FIELDS, r, strict=True)) for r in list(csv.reader(f))[1:]]
    assert [c["name"] for c in cells] == [
        "'" + n if n[0] in "=+-@\t" else n for n in names
    ]
    assert all(json.loads(c["patch"]) == rows[0]["patch"] for c in cells)  # JSON cells as they were
    lines = (tmp_path / "results.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["name"] for line in lines] == names

def test_write_exports_streams_every_row_once_in_order(tmp_path: Path) -> None:
    n = 3000
    summary = sample_summary()
    written = write_exports(tmp_path, (make_row(i) for i in range(n)), summary,
                            formats=("jsonl.gz", "jsonl", "csv"))
    assert written == n

    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "results.csv",
        "results.jsonl",
        "results.jsonl.gz",
        "summary.json",
    ]  # no temp file left behind
    for name in ("results.csv", "results.jsonl", "results.jsonl.gz", "summary.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600, name
    # the compressed file holds the plain one's bytes, in a fraction of the space
    compressed = (tmp_path / "results.jsonl.gz").read_bytes()
    assert gzip.decompress(compressed) == (tmp_path / "results.jsonl").read_bytes()
    assert len(compressed) < (tmp_path / "results.jsonl").stat().st_size / 4

    lines = (tmp_path / "results.jsonl").read_text(encoding="utf-8").split("\n")
    assert lines[-1] == ""  # the file ends with a newline, and nothing after it
    lines = lines[:-1]
    assert len(lines) == n
    for i, line in enumerate(lines):
        obj = json.loads(line)
        assert list(obj) == list(RESULT_FIELDS)
        assert obj == expected_row(i)

    with (tmp_path / "results.csv").open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0] == list(RESULT_FIELDS)
    assert len(rows) == n + 1
    for i, cells in enumerate(rows[1:]):
        want = expected_row(i)
        got = dict(zip(RESULT_FIELDS, cells, strict=True))
        for name in ("before", "after", "patch"):
            assert (json.loads(got[name]) if got[name] else None) == want[name]
            assert ", " not in got[name] and ": " not in got[name]  # compact JSON text
        for name in ("project_id", "region_id", "attempts", "duration_ms", "http_status"):
            assert got[name] == ("" if want[name] is None else str(want[name]))
        assert float(got["lock_wait_s"]) == want["lock_wait_s"]
        for name in ("run_id", "image_id", "name", "status", "reason", "error"):
            assert got[name] == (want[name] or "")

    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == summary
    for key in (
        "run_id",
        "job",
        "started_at",
        "finished_at",
        "duration_s",
        "exit_code",
        "counts",
        "requests",
        "rate_per_second",
        "latency_ms",
    ):
        assert key in on_disk
    assert "\n  " in (tmp_path / "summary.json").read_text()  # indented


def test_write_exports_with_no_rows(tmp_path: Path) -> None:
    assert write_exports(tmp_path / "run", [], sample_summary()) == 0
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "results.jsonl.gz", "summary.json"]  # what a run writes: no plain file
    assert gzip.decompress((tmp_path / "run" / "results.jsonl.gz").read_bytes()) == b""
    write_exports(tmp_path / "new", [], sample_summary(), formats=("jsonl", "csv"))
    assert (tmp_path / "new" / "results.jsonl").read_text() == ""
    assert (tmp_path / "new" / "results.csv").read_text().strip() == ",".join(RESULT_FIELDS)


def test_write_exports_failure_keeps_old_files_and_leaves_no_temp(tmp_path: Path) -> None:
    write_exports(tmp_path, [make_row(0)], sample_summary(run_id="old"))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def broken() -> Iterator[dict[str, Any]]:
        yield make_row(1)
        raise RuntimeError("journal read failed")

    with pytest.raises(RuntimeError, match="journal read failed"):
        write_exports(tmp_path, broken(), sample_summary(run_id="new"))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_write_exports_memory_stays_flat(tmp_path: Path) -> None:
    row = make_row(3)  # one row object: what grows with n is only what the writer keeps

    def peak(n: int) -> int:
        tracemalloc.start()
        try:
            write_exports(tmp_path, (row for _ in range(n)), sample_summary())
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    small, large = peak(500), peak(3000)
    with gzip.open(tmp_path / "results.jsonl.gz", "rt") as fh:
        assert sum(1 for _ in fh) == 3000
    # holding 2,500 more rows' values (a dict and a list each, ~1 KB) would add megabytes
    assert large - small < 200_000, (small, large)


# --------------------------------------------------------------------------- latency


def exact(sorted_values: list[float], q: float) -> float:
    return sorted_values[max(1, math.ceil(q * len(sorted_values))) - 1]


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("dist", ["lognormal", "uniform", "bimodal"])
def test_latency_percentiles_within_2_percent(seed: int, dist: str) -> None:
    rng = random.Random(seed)
    draw = {
        "lognormal": lambda: rng.lognormvariate(3.5, 1.0),
        "uniform": lambda: rng.uniform(0.05, 5000),
        "bimodal": lambda: rng.gauss(40, 5) if rng.random() < 0.9 else rng.gauss(900, 100),
    }[dist]
    values = [max(draw(), 0.01) for _ in range(20_000)]
    stats = LatencyStats()
    for v in values:
        stats.add(v)
    values.sort()
    got = stats.percentiles()
    assert set(got) == {"p50", "p95", "p99"}
    for name, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99)):
        want = exact(values, q)
        assert abs(got[name] - want) <= 0.02 * want, (name, got[name], want)


def test_latency_merge_equals_one_histogram() -> None:
    rng = random.Random(7)
    values = [rng.lognormvariate(2, 1.5) for _ in range(5000)]
    whole, left, right = LatencyStats(), LatencyStats(), LatencyStats()
    for i, v in enumerate(values):
        whole.add(v)
        (left if i % 2 else right).add(v)
    left.merge(right)
    left.merge(LatencyStats())  # merging an empty one changes nothing
    assert left.percentiles() == whole.percentiles()
    assert left.count == 5000
    assert left.max_ms == max(values)


def test_latency_edges() -> None:
    empty = LatencyStats()
    assert empty.percentiles() == {"p50": 0.0, "p95": 0.0, "p99": 0.0}
    same = LatencyStats()
    for _ in range(100):
        same.add(41.0)
    assert same.percentiles() == {"p50": 41.0, "p95": 41.0, "p99": 41.0}  # clamped to min/max
    odd = LatencyStats()
    for v in (0.0, -3.0, float("nan"), 1e12):
        odd.add(v)
    assert odd.count == 3  # NaN ignored; negative counts as 0; huge clamps into the last bucket
    assert odd.percentiles()["p50"] == 0.0
    assert odd.percentiles()["p99"] == 1e12


# --------------------------------------------------------------------------- summary


def test_build_summary_fills_every_field() -> None:
    s = sample_summary(extra={"shard": "1/4", "exit_code": 1})
    assert s["run_id"] == "r-1" and s["job"] == "nightly-owner-tags"
    assert s["started_at"] == "2024-05-01T02:00:00.000Z"
    assert datetime.fromisoformat(s["finished_at"]) == T0 + timedelta(seconds=100)
    assert s["duration_s"] == 100.0
    assert s["exit_code"] == 1
    assert s["counts"] == {"updated": 900, "unchanged": 50, "skipped": 0, "failed": 3, "planned": 0}
    assert s["requests"] == {
        "total": 1020,
        "list": 10,
        "get": 5,
        "patch": 1000,
        "task": 5,
        "retries": 40,
        "rate_limited": 20,
        "lock_waits": 4,
    }
    assert s["rate_per_second"] == 10.0  # (1020 - 20 refused with 429) / 100 s
    assert s["latency_ms"]["p50"] == pytest.approx(30, rel=0.01)
    assert s["latency_ms"]["p99"] == 1000.0
    assert s["shard"] == "1/4"
    json.dumps(s)  # plain JSON data


def test_build_summary_defaults_and_naive_times() -> None:
    s = build_summary(
        run_id="r",
        job="j",
        started_at=datetime(2024, 1, 1),
        finished_at=datetime(2024, 1, 1),
        exit_code=0,
        counts={},
        requests={"total": 3},
        latency=LatencyStats(),
    )
    assert s["counts"] == dict.fromkeys(("updated", "unchanged", "skipped", "failed", "planned"), 0)
    assert s["requests"]["total"] == 3 and s["requests"]["rate_limited"] == 0
    assert s["started_at"] == "2024-01-01T00:00:00.000Z"
    assert s["duration_s"] == 0.0 and s["rate_per_second"] == 0.0
    assert s["latency_ms"] == {"p50": 0.0, "p95": 0.0, "p99": 0.0}


def test_format_summary_says_what_happened() -> None:
    text = format_summary(sample_summary())
    assert "nightly-owner-tags" in text and "r-1" in text
    lines = text.splitlines()
    assert any(line.split() == ["updated", "900"] for line in lines)
    assert any(line.split() == ["failed", "3"] for line in lines)
    assert any(line.split() == ["skipped", "0"] for line in lines)
    assert "Targets: 953" in text
    assert "1,020 total" in text and "patch 1,000" in text
    assert any(line.split() == ["retries", "40"] for line in lines)
    assert any("429" in line and line.split()[-1] == "20" for line in lines)
    assert any(line.split() == ["lock", "waits", "4"] for line in lines)
    assert "10.0 req/s" in text
    p50 = re.search(r"p50 ([\d.]+) ms", text)
    assert p50 is not None and float(p50.group(1)) == pytest.approx(30, rel=0.01)
    assert "p99 1,000.0 ms" in text
    assert "(1m 40s)" in text
    assert "Exit code 1: the run finished and some targets failed" in text
    ok = format_summary(sample_summary(exit_code=0))
    assert "Exit code 0: every target ended updated, unchanged or skipped" in ok
    assert "Exit code 75:" in format_summary(sample_summary(exit_code=75))
    assert "Exit code 9: unknown exit code" in format_summary(sample_summary(exit_code=9))
    assert "Exit code none: the run is still going" in format_summary(
        sample_summary(exit_code=None))


def test_an_unfinished_run_names_what_continues_it(tmp_path: Path) -> None:
    """Run folders as killed processes leave them (a run row, no exit code, no lock held):
    the summary names the command that continues each, quoted for a shell, in the state dir
    it was read from: a sharded run's --shard, an undo's run, a run older than
    --resume-within's default 24h reached back to; a plan (or an undo's preview) made anew."""
    state = tmp_path / "the team's runs"
    now = datetime.now(UTC)

    def last_line(run_id: str, kind: str, *, job: str | None = None, parent: str | None = None,
                  shard: str | None = None, hours: float = 1.0) -> str:
        journal = Journal(state / run_id)
        journal.create_run(run_id=run_id, kind=kind, job_name="nightly", job_path=job,
                           job_hash="x", options={}, parent_run_id=parent, shard=shard,
                           started_at=(now - timedelta(hours=hours)).isoformat())
        journal.close()
        out = io.StringIO()
        print_report(state, run_id, "summary", export=False, out=out)
        return out.getvalue().splitlines()[-1]

    ended = ("Exit code none: its process ended without finishing it (killed, or the node was "
             "lost): `bulk-tagger ")
    where = f"--state-dir {shlex.quote(str(state))}`"
    assert last_line("a", "run", job="/jobs/night ly.yaml", shard="1/4") == (
        f"{ended}run '/jobs/night ly.yaml' --resume --shard 1/4 {where} continues it")
    assert last_line("b", "undo", parent="a", hours=30) == (
        f"{ended}undo a --resume --resume-within 32h {where} continues it")
    assert last_line("c", "plan", job="/jobs/n.yaml") == (
        f"{ended}plan /jobs/n.yaml {where} makes it anew")
    assert last_line("d", "plan", parent="a") == f"{ended}undo a --plan {where} makes it anew"


def test_durations_and_sizes_read_one_way() -> None:
    durations = [units.duration_text(s) for s in (0.04, 59.94, 100, 3723.4)]
    assert durations == ["0.0s", "59.9s", "1m 40s", "1h 02m 03s"]
    sizes = [units.size_text(n) for n in (512, 1536, 5 * 1024**2, 3 * 1024**4)]
    assert sizes == ["512 B", "1.5 KiB", "5.0 MiB", "3072.0 GiB"]


# --------------------------------------------------------------------------- plan output


def test_format_change_reads_like_a_diff() -> None:
    before = {"tags": {"team": "ops", "env": "prod"}, "ssh_key": "deny"}
    patch = {"tags": {"team": None, "owner": "ops"}, "ssh_key": "allow", "is_baremetal": True}
    assert format_change("ubuntu-22", "img-1", before, patch) == (
        "ubuntu-22 (img-1)\n"
        "  tags.team: ops -> (removed)\n"
        "  tags.owner: (none) -> ops\n"
        "  ssh_key: deny -> allow\n"
        "  is_baremetal: (none) -> true"
    )


def test_format_change_escapes_what_a_terminal_would_hide() -> None:
    text = format_change("evil\x1b[2Jname", "id\n2", {"name": "a b"}, {"name": " padded"})
    assert "\x1b" not in text and text.count("\n") == 1
    assert text.startswith('"evil\\u001b[2Jname" ("id\\n2")')
    assert text.endswith('name: a b -> " padded"')
    assert format_change("x", "1", {}, {}) == "x (1)\n  (no change)"


def test_format_plan_counts_reasons_samples_and_more() -> None:
    counts = {"planned": 1200, "unchanged": 300, "skipped": 25, "failed": 2}
    reasons = {
        "unchanged:already so": 300,
        "skipped:read-only tag": 20,
        "skipped:rename target exists": 5,
        "failed:template gap: tags.owner": 2,
        "odd": 1,
    }
    samples = [
        ("img-a", "1", {"tags": {"team": "ops"}}, {"tags": {"team": None, "owner": "ops"}}),
        ("img-b", "2", {"tags": {}}, {"tags": {"owner": "dev"}}),
    ]
    text = format_plan(counts, reasons, samples, 1198)
    lines = text.splitlines()
    assert lines[0] == "Plan: 1,527 targets"
    assert any(line.split() == ["would", "update", "1,200"] for line in lines)
    assert any(line.split() == ["unchanged", "300"] for line in lines)
    skipped = lines.index("Skipped, by reason:")
    assert lines[skipped + 1].split() == ["read-only", "tag", "20"]  # most frequent first
    assert lines[skipped + 2].split() == ["rename", "target", "exists", "5"]
    assert "Failed, by reason:" in lines
    assert any(line.split() == ["template", "gap:", "tags.owner", "2"] for line in lines)
    assert any(line.split() == ["odd", "1"] for line in lines)
    assert format_change(*samples[0]) in text and format_change(*samples[1]) in text
    assert text.index("img-a (1)") < text.index("img-b (2)")
    assert lines[-1] == "... and 1,198 more changes"
    assert "more changes" not in format_plan(counts, {}, samples, 0)
