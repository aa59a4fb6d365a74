"""The progress bar on a terminal and the structured progress lines off one."""

from __future__ import annotations

import asyncio
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import events, write_job
from worker.progress import Progress


async def wait_for(check: Any, limit_s: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_s
    while not check():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_progress_logs_structured_lines_off_a_tty(log_stream: io.StringIO) -> None:
    out = io.StringIO()
    progress = Progress(stream=out, tty=None, interval_s=0.02)  # a StringIO is not a tty
    task = asyncio.create_task(progress.run())
    try:
        await wait_for(lambda: events(log_stream, "run.progress"))
        first = events(log_stream, "run.progress")[0]
        assert first["done"] == 0 and first["total"] is None and first["eta_s"] is None
        progress.set_total(10)
        for status in ("updated", "failed", "updated", "skipped"):
            progress.advance(status)
        await wait_for(lambda: events(log_stream, "run.progress")[-1]["done"] == 4)
        line = events(log_stream, "run.progress")[-1]
        assert line["total"] == 10 and line["failed"] == 1
        assert line["rate"] > 0 and line["eta_s"] is not None and line["eta_s"] >= 0
        assert line["level"] == "info"
        for _ in range(6):
            progress.advance("updated")
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    progress.close()
    progress.close()  # once only
    final = events(log_stream, "run.progress")[-1]
    assert (final["done"], final["total"], final["failed"]) == (10, 10, 1)
    assert final["eta_s"] in (0.0, None)
    assert [e["done"] for e in events(log_stream, "run.progress")].count(10) >= 1
    assert out.getvalue() == ""  # off a tty, nothing but log lines


async def test_progress_draws_a_bar_on_a_tty(log_stream: io.StringIO) -> None:
    out = io.StringIO()
    progress = Progress(stream=out, tty=True)
    progress.set_total(None)
    task = asyncio.create_task(progress.run())
    try:
        for _ in range(7):
            progress.advance("updated")
        progress.advance("failed")
        progress.set_total(8)
        await wait_for(lambda: "8/8" in out.getvalue())
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    progress.close()
    text = out.getvalue()
    assert "8/8" in text and "1 failed" in text and "/s" in text
    assert events(log_stream, "run.progress") == []  # on a tty, the bar instead of log lines


def test_progress_close_without_run_draws_the_final_state(log_stream: io.StringIO) -> None:
    out = io.StringIO()
    bar = Progress(stream=out, tty=True)
    bar.set_total(3)
    for _ in range(3):
        bar.advance("updated")
    bar.close()
    assert "3/3" in out.getvalue()
    lines = Progress(stream=io.StringIO(), tty=False)
    lines.advance("failed")
    lines.close()
    final = events(log_stream, "run.progress")
    assert [(e["done"], e["failed"], e["total"]) for e in final] == [(1, 1, None)]


def test_progress_rejects_a_bad_interval() -> None:
    with pytest.raises(ValueError, match="interval_s"):
        Progress(stream=io.StringIO(), interval_s=0)




# --------------------------------------------------------------------------- in a terminal


def tmux(sock: Path, *args: str) -> str:
    out = subprocess.run(
        ["tmux", "-S", str(sock), *args], capture_output=True, text=True, timeout=30, check=True
    )
    return out.stdout


def test_the_bar_redraws_in_place_in_a_50_column_terminal(tmp_path: Path) -> None:
    """A real run in a real terminal 50 columns wide (tmux): while it runs the screen shows one
    bar line that fits; when it is done, one final bar line above the summary, no scrolled
    copies of it (the hand-drawn bar, 70 columns and more, wrapped and scrolled a line a draw)."""
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed (Debian: apt-get install tmux)")
    job = write_job(tmp_path, {
        "name": "bar-check",
        "targets": [{"query": {"projects": "all", "regions": "all", "visibility": "private"}}],
        "changes": {"set_tags": {"checked": "yes"}},
        "options": {"rate_per_second": 20},  # 54 images: about 3 s of bar
    })  # fmt: skip
    sock = tmp_path / "tmux.sock"
    command = (
        f"{shlex.quote(sys.executable)} -m worker run {shlex.quote(str(job))} --simulate "
        f"--state-dir {shlex.quote(str(tmp_path / 'runs'))} --log-level warning; "
        "echo EXIT=$?; sleep 60"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GCORE_", "TMUX"))}
    env["GCORE_API_KEY"] = "test-key-1234"
    subprocess.run(
        ["tmux", "-S", str(sock), "-f", "/dev/null", "new-session", "-d", "-x", "50", "-y", "40",
         command], env=env, check=True, timeout=30,
    )  # fmt: skip
    try:
        during: list[str] = []
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            screen = tmux(sock, "capture-pane", "-p", "-S", "-")
            if "EXIT=" in screen:
                break
            bars = [line for line in screen.splitlines() if line.startswith("targets")]
            count = re.search(r"\| (\d+)/(\d+) ", bars[-1]) if bars else None
            if count and int(count[1]) < int(count[2]):
                during.append(screen)
            time.sleep(0.2)
        else:
            raise AssertionError(f"the run did not end:\n{screen}")
    finally:
        subprocess.run(["tmux", "-S", str(sock), "kill-server"], timeout=30, check=False)
    assert "EXIT=0" in screen, screen
    assert during, f"no bar seen while the run went on:\n{screen}"
    for seen in (*during, screen):
        bars = [line for line in seen.splitlines() if line.startswith("targets")]
        assert len(bars) == 1, seen  # drawn in place: no scrolled copies, no wrapped halves
        assert bars[0].rstrip().endswith("]") and len(bars[0].rstrip()) <= 50, seen
    (final,) = [line for line in screen.splitlines() if line.startswith("targets")]
    count = re.search(r"\| (\d+)/(\d+) ", final)
    assert "100%|" in final and count and count[1] == count[2] != "0", screen
    lines = screen.splitlines()
    assert lines.index(final) < next(i for i, ln in enumerate(lines) if ln.startswith("Run "))
