"""Live progress of a run: a bar on a terminal, else a periodic ``run.progress`` log line.

The bar is tqdm's, imported only when there is a terminal to draw on (a run without one, and
``--help``, never pay for it). It is redrawn in place on one line that fits the terminal's
width, read again at each redraw (a resized window is followed).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TextIO

from worker import defaults
from worker.log import get_logger

_log = get_logger("bulk_tagger.report")


class Progress:
    """Live progress of a run: a one-line bar on a terminal, else a ``run.progress`` log line.

    ``advance`` is called once per finished target and only bumps counters; ``run`` (a task
    the caller starts and cancels) does the rendering: the bar a few times a second, or one
    structured line (done, total, rate, failed, eta_s) every ``interval_s``. The log line's
    rate is measured over the last minute or so (targets per second); the bar's is tqdm's
    smoothed rate. ``close`` renders the final state once and ends the bar's line.
    """

    _TTY_REFRESH_S = 0.25
    _WINDOW_S = 60.0

    def __init__(
        self, *, stream: TextIO, tty: bool | None = None, interval_s: float = defaults.PROGRESS_S,
        desc: str = "targets", event: str = "run.progress",
        details: Callable[[], dict[str, int]] | None = None,
        poll: Callable[[], tuple[int, int | None]] | None = None,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, not {interval_s!r}")
        self._tty = stream.isatty() if tty is None else tty
        self._interval = self._TTY_REFRESH_S if self._tty else interval_s
        self._done = 0
        self._failed = 0
        self._total: int | None = None
        self._closed = False
        self._started = time.monotonic()
        window = max(2, math.ceil(self._WINDOW_S / self._interval) + 1)
        self._samples: collections.deque[tuple[float, int]] = collections.deque(maxlen=window)
        self._samples.append((self._started, 0))
        self._stream = stream
        self._bar: Any = None  # tqdm's, made at the first redraw
        #: what the bar and the log line are of (``planning``: images read while the
        #: selectors expand, ``run.planning``), and counters they add (e.g. pages read)
        #: ``poll``: (done, total) read at each render where another keeps the counts
        self._desc, self._event, self._details, self._poll = desc, event, details, poll

    @property
    def done(self) -> int:
        return self._done

    @property
    def failed(self) -> int:
        return self._failed

    def set_total(self, total: int | None) -> None:
        """How many targets the run has; None while the selectors are still streaming."""
        self._total = total


    def advance(self, status: str) -> None:
        """Count one finished target (O(1): nothing is rendered here)."""
        self._done += 1
        if status == "failed":
            self._failed += 1

    def _measure(self) -> tuple[float, float | None]:
        """(rate per second, ETA in seconds or None), updating the rate window."""
        now = time.monotonic()
        self._samples.append((now, self._done))
        t0, d0 = self._samples[0]
        rate = (self._done - d0) / (now - t0) if now > t0 else 0.0
        eta = None
        if self._total is not None and rate > 0:
            eta = max(self._total - self._done, 0) / rate
        return rate, eta

    def _draw(self) -> None:
        """Bring the bar up to the counters, which redraws it (trimmed to the width)."""
        extra = [f"{v:,} {k}" for k, v in (self._details() if self._details else {}).items()]
        failed = [f"{self._failed:,} failed"] if self._failed else []
        postfix = ", ".join([*extra, *failed]) or None
        bar = self._bar
        if bar is None:
            from tqdm import tqdm

            self._bar = tqdm(
                total=self._total,
                initial=self._done,
                postfix=postfix,
                file=self._stream,
                desc=self._desc,
                unit="",
                ascii=True,
                dynamic_ncols=True,  # the terminal's width, read at each redraw
                mininterval=0,  # the ticker sets the pace: each update redraws
                miniters=0,
                smoothing=0.1,
            )
            return
        if bar.total != self._total:
            bar.total = self._total
        if postfix:
            bar.set_postfix_str(postfix, refresh=False)
        bar.update(self._done - bar.n)

    def _render(self) -> None:
        if self._poll is not None:
            self._done, self._total = self._poll()
        if self._tty:
            self._draw()
            return
        rate, eta = self._measure()
        _log.info(
            self._event,
            **(self._details() if self._details else {}),
            done=self._done,
            total=self._total,
            rate=round(rate, 2),
            failed=self._failed,
            eta_s=None if eta is None else round(eta, 1),
        )

    async def run(self) -> None:
        """Render until cancelled (the bar a few times a second, a log line every interval)."""
        while not self._closed:
            await asyncio.sleep(self._interval)
            if not self._closed:
                self._render()

    @contextlib.asynccontextmanager
    async def shown(self) -> AsyncIterator[Progress]:
        """``run`` as a task while the block runs; then cancelled, and ``close``."""
        ticker = asyncio.create_task(self.run())
        try:
            yield self
        finally:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
            self.close()

    def close(self) -> None:
        """Render the final state once (and end the bar's line); later calls do nothing."""
        if self._closed:
            return
        self._closed = True
        self._render()
        if self._bar is not None:
            self._bar.close()
