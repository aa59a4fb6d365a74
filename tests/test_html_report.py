"""`bulk-tagger report RUN --format html`: a real run through the CLI, its page opened in a
real headless browser with the network off (tests/browser.py), and the page's parts read back.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shlex
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from html import unescape
from pathlib import Path

from tests import finished_run
from tests.browser import Browser
from tests.helpers import results, run_cli, run_dirs, summary, write_job
from worker import html_report, timeline
from worker.simulator import SimulatorThread
from worker.svgchart import Bins, requests_chart
from worker.tally import KeyTally, Tally
from worker.timeline import Timeline

XSS = "<script>alert(1)</script>"
CANARY = "canary-key-7f3a9c1e"


#: a project and region of the demo data with few images (three private)
WHERE = (1338, 38)


def _job(tmp_path: Path, where: tuple[int, int] | None = None) -> Path:
    query = ({"projects": [where[0]], "regions": [where[1]]} if where
             else {"projects": "all", "regions": "all"})
    return write_job(tmp_path, {
        "name": "html-report",
        # public images too: they are refused (403), a failure group with their names
        "targets": [{"query": query}],
        "changes": {"set_tags": {"managed-by": "bulk-tagger"}, "remove_tags": ["legacy"],
                    "rename_tags": {"team": "owner"}},
        "options": {"max_changes": 10_000},
    })


def _xss_images(sim_thread: SimulatorThread) -> None:
    for visibility in ("private", "public"):
        sim_thread.call(sim_thread.sim.add_image, *WHERE, name=XSS,
                        tags={"team": "sre"},
                        visibility=visibility)


def test_the_page_in_a_real_browser(sim_thread: SimulatorThread, tmp_path: Path) -> None:
    _xss_images(sim_thread)
    state = tmp_path / "state"
    # --rate 2: the run's 6 requests last a few seconds, so the chart has several
    proc = run_cli("run", _job(tmp_path, WHERE), "--base-url", sim_thread.url, "--state-dir",
                   state, "--rate", "2", env={"GCORE_API_KEY": CANARY})
    assert proc.returncode == 1, proc.stderr  # the public images failed
    (run_dir,) = run_dirs(state)
    run = summary(run_dir)
    page_path = tmp_path / "report.html"
    out = run_cli("report", run_dir.name, "--state-dir", state, "--format", "html",
                  "-o", page_path, env={"GCORE_API_KEY": CANARY})
    assert out.returncode == 0, out.stderr
    page = page_path.read_text()

    # the chart's record: every request of the run in some second, one row a second
    seconds = list(timeline.read(run_dir / "journal.sqlite"))
    assert sum(r[1] for r in seconds) == run["requests"]["total"]
    assert all(0 < r[6] <= 2 for r in seconds)  # the limiter's rate, within --rate
    span = seconds[-1][0] - seconds[0][0] + 1
    assert span == len(seconds)  # no second missing
    assert run["duration_s"] - 1 <= span <= run["duration_s"] + 2, (span, run["duration_s"])
    assert span >= 3

    # the key nowhere; the API's and the job's texts escaped, none of them markup
    assert CANARY not in page
    assert XSS not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<img" not in page

    failed = [r for r in results(run_dir) if r["status"] == "failed"]
    probes = {
        "seconds": "document.querySelector('svg.chart').dataset.seconds",
        "bins": "document.querySelectorAll('svg.chart g.bin').length",
        "bars": "document.querySelectorAll('svg.chart rect.ok').length",
        "scripts": "document.scripts.length",
        "images": "document.images.length",
        "text": "document.body.innerText",
        "width": "document.documentElement.scrollWidth",
    }
    with Browser(tmp_path / "profile") as browser:
        visit = browser.open(page_path.as_uri(), probes)
        # the watcher sees what a page asks for: the same page with one outside image
        control = tmp_path / "control.html"
        control.write_text(page.replace("</main>", '<img src="http://x.invalid/b.png"></main>'))
        seen = browser.open(control.as_uri(), {})
        # on a phone's width: one column, nothing wider than the screen (tables scroll inside)
        browser.call("Emulation.setDeviceMetricsOverride",
                     {"width": 390, "height": 800, "deviceScaleFactor": 2, "mobile": True})
        phone = browser.open(page_path.as_uri(), {"width": probes["width"]})
    assert visit.requests == [page_path.as_uri()]  # nothing left the file
    assert visit.console == []
    assert "http://x.invalid/b.png" in seen.requests
    assert any("Content Security Policy" in m for m in seen.console)

    values = visit.values
    assert int(values["seconds"]) == span and values["bins"] == span
    assert values["bars"] >= span - 1  # a second with no answer has no bar (the last, maybe)
    assert values["scripts"] == 0 and values["images"] == 0
    text = values["text"]
    assert XSS in text  # shown as text
    assert "Exit code 1" in text and run["run_id"] in text
    assert re.search(rf"rejected, HTTP 403: {len(failed)}\b", text)
    assert "public images cannot be modified" in text  # the API's message
    assert all(r["image_id"] in text for r in failed)  # fewer than 100: every one listed
    assert "to owner" in text and "managed-by" in text  # the changes per key
    assert "rate ceiling" in text and "2.0 req/s" in text  # --rate 2
    assert values["width"] <= 1000  # nothing wider than the window
    assert phone.values["width"] <= 390 and phone.console == []


def test_undo_and_resumed_runs_say_what_they_are(
    sim_thread: SimulatorThread, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    job = _job(tmp_path)
    proc = run_cli("run", job, "--base-url", sim_thread.url, "--state-dir", state)
    assert proc.returncode == 1, proc.stderr
    (first,) = run_dirs(state)
    proc = run_cli("undo", first.name, "--base-url", sim_thread.url, "--state-dir", state)
    assert proc.returncode == 0, proc.stderr
    (undo,) = [d for d in run_dirs(state) if d != first]
    page = run_cli("report", undo.name, "--state-dir", state, "--format", "html")
    assert page.returncode == 0, page.stderr
    assert re.search(rf"undoes run</td><td>{re.escape(first.name)}<", page.stdout)
    assert "<td>kind</td><td>undo</td>" in page.stdout
    # undo sets back what the run changed: owner removed, team set again
    assert re.search(r"<td>owner</td><td class=n>0</td><td class=n>0</td><td>to team: \d",
                     page.stdout)

    # the run's per-target record gone (its results file deleted): summary and chart stay
    (first / "results.jsonl.gz").unlink()
    page = run_cli("report", first, "--format", "html")  # the run named by its folder
    assert page.returncode == 0, page.stderr
    assert f"<h1>html-report: run {first.name}</h1>" in page.stdout
    assert "The per-target record is not available" in page.stdout
    assert '<svg xmlns="http://www.w3.org/2000/svg"' in page.stdout
    assert "Exit code 1</b>" in page.stdout


def test_a_resumed_run_counts_both_processes(
    sim_thread: SimulatorThread, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    job = _job(tmp_path)
    args = ["run", str(job), "--base-url", sim_thread.url, "--state-dir", str(state),
            "--run-id", "twice"]
    env = {**os.environ, "GCORE_API_KEY": "k"}
    first = subprocess.Popen([sys.executable, "-m", "worker", *args, "--rate", "10",
                              "--grace-seconds", "0.5"], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(2.5)  # planned, some PATCHes sent: 10 requests a second
    first.send_signal(signal.SIGTERM)
    assert first.wait(30) == 75

    proc = run_cli(*args, "--resume")
    assert proc.returncode == 1, proc.stderr
    run = summary(state / "twice")
    assert run["processes"] == 2
    seconds = list(timeline.read(state / "twice" / "journal.sqlite"))
    assert sum(r[1] for r in seconds) == run["requests"]["total"]  # both processes' requests
    page = run_cli("report", "twice", "--state-dir", state, "--format", "html").stdout
    assert "<td>processes</td><td>2 (resumed 1x;" in page


def test_a_resumed_run_says_it_runs_and_then_that_it_was_killed(
    sim_thread: SimulatorThread, tmp_path: Path
) -> None:
    """A run stopped by SIGTERM (exit 75, its summary in its row), then taken up by a
    --resume: while that process works it, the summary and the page say it is running, by
    whom (not the earlier process's exit 75); that one SIGKILLed, that its process ended
    without finishing it, and the command that continues it."""
    state = tmp_path / "state"
    job = _job(tmp_path)
    args = ["run", str(job), "--base-url", sim_thread.url, "--state-dir", str(state),
            "--run-id", "twice", "--rate", "10"]
    env = {**os.environ, "GCORE_API_KEY": "k"}
    first = subprocess.Popen([sys.executable, "-m", "worker", *args, "--grace-seconds", "0.5"],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             text=True)
    time.sleep(1.5)  # planned, some PATCHes sent: 10 requests a second
    first.send_signal(signal.SIGTERM)
    ended, _ = first.communicate(timeout=30)
    assert first.returncode == 75
    assert summary(state / "twice")["exit_code"] == 75
    said = ("Exit code 75: interrupted (SIGTERM/SIGINT), or the API unreachable (no answer to the "
            "first read, or past the retry budget): "
            f"`bulk-tagger run {job} --resume --state-dir {state}` goes on; or the run is held")
    shown = run_cli("report", "twice", "--state-dir", state).stdout
    assert shown.splitlines()[-1].startswith(said)
    # the process's own last words say the same: the job it was given, not JOB
    assert said in ended, ended

    # a --resume works it: the report says it is running (the exit 75 summary in its row is
    # the earlier process's); then, that process killed, that it ended without finishing
    second = subprocess.Popen([sys.executable, "-m", "worker", *args, "--resume"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not _reopened_by(state / "twice", second.pid):
            assert second.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        for fmt in ("summary", "html"):
            shown = run_cli("report", "twice", "--state-dir", state, "--format", fmt).stdout
            assert re.search(rf"Exit code none(</b>)?: still running: pid {second.pid} on "
                             rf"{re.escape(socket.gethostname())} since \S+Z "
                             r"\(bulk-tagger run --resume\)", shown), shown[-2000:]
            assert "Exit code 75" not in shown
    finally:
        second.kill()
        second.wait(30)
    shown = run_cli("report", "twice", "--state-dir", state).stdout
    assert shown.splitlines()[-1] == (
        "Exit code none: its process ended without finishing it (killed, or the node was "
        f"lost): `bulk-tagger run {job} --resume --state-dir {state}` continues it")


def _reopened_by(run_dir: Path, pid: int) -> bool:
    """Whether process ``pid`` holds the run's lock and has taken the run up again (its row's
    exit code cleared)."""
    try:
        holder = json.loads((run_dir / "run.lock").read_bytes() or b"{}")
        conn = sqlite3.connect(f"{(run_dir / 'journal.sqlite').as_uri()}?mode=ro", uri=True)
        try:
            (code,) = conn.execute("SELECT exit_code FROM run").fetchone()
        finally:
            conn.close()
    except (OSError, ValueError, sqlite3.Error):
        return False
    return bool(holder.get("pid") == pid and code is None)


def test_a_long_run_is_drawn_in_bins_and_gaps_stay_empty() -> None:
    """3 hours of seconds (one missing stretch between two processes): at most 600 bins."""
    rows = [(t, 10, 1, 0, 2, 0, 9.5) for t in range(1000, 1000 + 10_800) if not 5000 <= t < 6000]
    bins = Bins.of(rows)
    assert bins is not None and bins.seconds == 10_800 and bins.per == 18
    assert len(bins.sent) == 600 and bins.sent[0] == 10.0
    empty = (5000 - 1000) // 18 + 1  # a bin inside the gap
    assert bins.sent[empty] == 0 and bins.rate[empty] is None
    svg = requests_chart(bins, 12.0)
    assert svg.count('<g class="bin">') == 600 and svg.count('<g class="bin"></g>') >= 50
    assert 'data-seconds="10800"' in svg and 'stroke-dasharray="6 4"' in svg  # the ceiling


def test_the_timeline_keeps_each_seconds_growth() -> None:
    clock = [100.2]
    totals = [(0, 0, 0, 0, 0)]
    line = Timeline(lambda: (totals[0], 50.0), clock=lambda: clock[0])
    totals[0] = (7, 1, 0, 1, 0)
    assert line.take() == []  # the second is not over
    clock[0] = 101.05
    assert line.take() == [(100, 7, 1, 0, 1, 0, 50.0)]
    totals[0] = (12, 1, 1, 2, 1)
    clock[0] = 103.4  # a late wake-up: its growth shared out over the two seconds ended
    assert line.take() == [(101, 3, 0, 1, 1, 1, 50.0), (102, 2, 0, 0, 0, 0, 50.0)]
    totals[0] = (13, 1, 1, 2, 1)
    assert line.take(final=True) == [(103, 1, 0, 0, 0, 0, 50.0)]
    assert line.take(final=True) == [(103, 0, 0, 0, 0, 0, 50.0)]  # added to the same second


def test_a_bad_run_id_writes_no_file(tmp_path: Path) -> None:
    out = tmp_path / "r.html"
    proc = run_cli("report", "no-such-run", "--state-dir", tmp_path, "--format", "html",
                   "-o", out)
    assert proc.returncode == 2 and "no run 'no-such-run'" in proc.stderr
    assert not out.exists()


def test_key_tally_tells_renames_from_removals() -> None:
    keys = KeyTally()
    before = {"tags": {"team": "a", "legacy": "x", "keep": "k"}, "ssh_key": "deny"}
    keys.add(before, {"tags": {"owner": "a", "team": None, "legacy": None, "new": "v"},
                      "ssh_key": "allow"})
    keys.add({"tags": {"team": "b"}}, {"tags": {"team": None, "owner": "c"}})  # not a rename
    rows = {k: (c.set, c.removed, dict(c.renamed)) for k, c in keys.rows()}
    assert rows == {
        "team": (0, 1, {"owner": 1}), "legacy": (0, 1, {}), "new": (1, 0, {}),
        "owner": (1, 0, {}), "field:ssh_key": (1, 0, {}),
    }


def test_tally_keeps_fixed_amounts() -> None:
    """A million failures in one group keep 100 names, 3 messages; 50 changes in full."""
    rows = (("r", 1, 2, f"id-{i}", f"n-{i}", "failed", "rejected", None, None, None, 1, 403,
             0.0, 1, f"message {i % 7}") for i in range(100_000))
    tally = Tally.of(rows)
    (group,) = tally.failure_groups()
    assert group.count == 100_000 and len(group.images) == 100 and len(group.messages) == 3
    changes = (("r", 1, 2, f"id-{i}", "n", "updated", None, '{"tags":{}}', None,
                '{"tags":{"k":"v"}}', 1, 200, 0.0, 1, None) for i in range(1_000))
    tally = Tally.of(changes)
    assert len(tally.samples) == 50 and tally.keys.rows()[0][1].set == 1_000


def test_a_big_run_lists_up_to_its_caps_and_names_the_command_for_the_rest(
    tmp_path: Path,
) -> None:
    """3,000 failures in 5 groups and 300 skips in 2 (tests/finished_run.py), the caps lowered:
    40 names a group, 100 a status. Each group lists its first targets in plan order and
    counts the rest; the command the page names (with the page's --state-dir, quoted for a
    shell), run as printed, prints every failed target."""
    state = tmp_path / "the team's state"
    finished_run.write(state, "big", 4_000, failed=3_000, skipped=300, unchanged=100,
                       seconds=30)
    page = html_report.build(state, "big", html_report.Caps(names=40, section=100, diffs=5))
    match = re.search(r"All 3,000 failed targets, one CSV row each: <code>([^<]+)</code>", page)
    assert match, page[:3000]
    command = unescape(match.group(1))
    assert command == ("bulk-tagger report big --format csv --status failed --state-dir "
                       f"{shlex.quote(str(state))}")
    words = shlex.split(command)
    assert words[0] == "bulk-tagger"
    proc = run_cli(*words[1:])  # as printed
    assert proc.returncode == 0, proc.stderr
    failed_rows = list(csv.DictReader(io.StringIO(proc.stdout)))
    assert len(failed_rows) == 3_000 and {r["status"] for r in failed_rows} == {"failed"}

    # every group counted; names listed until the status's 100 are spent, the rest counted
    groups = re.findall(r"<h3>([a-z_]+)(?:, HTTP \d+)?: ([\d,]+)</h3>", page)
    assert groups[:5] == [(r, "600") for r in ("lock_timeout", "not_found", "rejected",
                                               "server_error", "unreachable")]
    assert groups[5:] == [("read_only", "150"), ("rename_conflict", "150")]
    failures = page[page.index("<h2>Failures by reason"):page.index("<h2>Skipped")]
    skips = page[page.index("<h2>Skipped"):page.index("<h2>Not changed")]
    assert re.findall(r"and ([\d,]+) more<", failures) == ["560", "560", "580", "600", "600"]
    assert re.findall(r"and ([\d,]+) more<", skips) == ["110", "110"]
    assert failures.count("<li>") == 100 and skips.count("<li>") == 80
    for reason, shown in (("lock_timeout", 40), ("not_found", 40), ("rejected", 20)):
        first = [r for r in failed_rows if r["reason"] == reason][:shown]
        assert all(f"<li>{r['name']} <span class=note>{r['image_id']}</span>" in failures
                   for r in first)
    assert "All 3,000 failed targets" in failures
    assert failures.index("All 3,000 failed") < failures.index("<ul")  # before the lists
    assert "All 300 skipped targets" in skips and "--status skipped" in skips
    # the updated ones in counts: 600 images a key, 5 changes in full
    assert "<td>managed-by</td><td class=n>600</td>" in page
    assert page.count("tags.managed-by: (none) -&gt; bulk-tagger") == 5
    assert "and 595 more changed images" in page

    # the default caps through the CLI: 100 a group, 1,000 failed names, every skip listed
    proc = run_cli("report", "big", "--state-dir", state, "--format", "html")
    assert proc.returncode == 0, proc.stderr
    whole = proc.stdout
    listed = whole[whole.index("<h2>Failures"):whole.index("<h2>Skipped")]
    assert listed.count("<li>") == 500 and listed.count(" more<") == 5
    skipped = whole[whole.index("<h2>Skipped"):whole.index("<h2>Not changed")]
    assert skipped.count("<li>") == 200 and "All 300 skipped" in skipped
    assert len(whole) < 200_000
    # --status picks results lines: with another format it is refused
    refused = run_cli("report", "big", "--state-dir", state, "--format", "html",
                      "--status", "failed")
    assert refused.returncode == 2 and "--status" in refused.stderr
