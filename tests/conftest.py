"""Shared fixtures: the local Gcore images API, started for real on a loopback port.

- ``sim``: a ``Simulator`` with the default ``SimConfig`` (60 demo images, any key accepted),
  in the test's own event loop; ``sim.url`` is its base URL.
- ``sim_factory``: ``await sim_factory(SimConfig(...))`` starts another; all are stopped after.
- ``sim_thread``: a ``SimulatorThread`` (its own loop in a daemon thread) for tests that run the
  CLI as a subprocess; read or change its state with ``sim_thread.call(sim_thread.sim.image, ...)``.
- ``log_stream``: worker.log configured to write JSON lines into a StringIO (read them with
  ``helpers.events``); structlog's configuration restored after.
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest
import structlog

from worker import log
from worker.simulator import SimConfig, Simulator, SimulatorThread

SimFactory = Callable[[SimConfig | None], Awaitable[Simulator]]


@pytest.fixture
async def sim_factory() -> AsyncIterator[SimFactory]:
    started: list[Simulator] = []

    async def start(config: SimConfig | None = None) -> Simulator:
        simulator = Simulator(config)
        await simulator.start()
        started.append(simulator)
        return simulator

    yield start
    for simulator in reversed(started):
        await simulator.stop()


@pytest.fixture
async def sim(sim_factory: SimFactory) -> Simulator:
    return await sim_factory(None)


@pytest.fixture
def sim_thread() -> Iterator[SimulatorThread]:
    with SimulatorThread(SimConfig()) as thread:
        yield thread


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    saved = structlog.get_config()
    stream = io.StringIO()
    log.configure("json", stream=stream)
    yield stream
    structlog.configure(**saved)
