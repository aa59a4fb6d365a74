"""The progress bar on a terminal and the structured progress lines off one."""

from __future__ import annotations

import asyncio
import io
from typing import Any

import pytest

from tests.helpers import events
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


