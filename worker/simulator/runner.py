"""Ways to run the simulator outside a test's own loop: a background thread, or a process.

``SimulatorThread`` serves tests that run the CLI as a subprocess: the simulator runs on its
own event loop in a daemon thread, and ``call`` runs a Simulator method on that loop (the
only safe way to read or change its state from the test thread). ``serve`` blocks, for
``bulk-tagger simulate`` and the benchmarks.
"""

from __future__ import annotations

import asyncio
import inspect
import signal
import sys
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any, TypeVar

import structlog

from worker.log import configure
from worker.simulator.config import SimConfig
from worker.simulator.server import Simulator

T = TypeVar("T")

_START_TIMEOUT = 30.0


class SimulatorThread:
    """``with SimulatorThread(config) as st:`` serves ``st.url`` until the block ends."""

    def __init__(
        self, config: SimConfig | None = None, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.sim = Simulator(config)
        self.host = host
        self.port = port
        self.url = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def __enter__(self) -> SimulatorThread:
        self._thread = threading.Thread(target=self._run, name="simulator", daemon=True)
        self._thread.start()
        if not self._ready.wait(_START_TIMEOUT):
            raise RuntimeError("the simulator thread did not start listening in time")
        if self._error is not None:
            raise RuntimeError(f"the simulator failed to start: {self._error}") from self._error
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if not loop.is_closed():
            loop.call_soon_threadsafe(loop.stop)
        thread.join(_START_TIMEOUT)
        self._loop = self._thread = None

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            try:
                self.url = loop.run_until_complete(self.sim.start(self.host, self.port))
            except BaseException as exc:
                self._error = exc
                return
            finally:
                self._ready.set()
            loop.run_forever()
            loop.run_until_complete(self.sim.stop())
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            asyncio.set_event_loop(None)
            loop.close()

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` (a Simulator method; a coroutine is awaited) on the
        simulator's loop, and return its result (its exception is raised here)."""
        loop = self._loop
        if loop is None:
            raise RuntimeError("SimulatorThread is not running: use it in a `with` block")

        async def run() -> Any:
            result = fn(*args, **kwargs)
            if inspect.isawaitable(result):
                result = await result
            return result

        return asyncio.run_coroutine_threadsafe(run(), loop).result(_START_TIMEOUT)


def serve(config: SimConfig, host: str = "127.0.0.1", port: int = 8080) -> None:
    """Serve until SIGTERM or SIGINT; prints ``simulator listening on URL`` once listening.

    That line is the only thing written to stdout: logs go to stderr (structlog is set up
    here with ``worker.log.configure`` unless the caller already did).
    """
    if not structlog.is_configured():
        configure()
    asyncio.run(_serve(config, host, port))


async def _serve(config: SimConfig, host: str, port: int) -> None:
    sim = Simulator(config)
    url = await sim.start(host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"simulator listening on {url}", file=sys.stdout, flush=True)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await sim.stop()
