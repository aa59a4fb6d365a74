"""The benchmark's simulator process: ``worker.simulator`` plus an arrival log.

``python -m tests.bench.sim --port 0 --images N [--rate-limit L] [--latency-ms X]`` (and the
rate-limit options of ``worker.simulator.limits``: ``--rate-schedule 0:150,6:30``, ``--quota
300 --quota-window 15``, ``--rate-headers ietf|x``) serves the
simulator exactly as ``bulk-tagger simulate`` does (same ``Simulator``, same faults), and
adds one admin path, ``GET /_bench/arrivals``: every ``/cloud/`` request as
``[seconds since the first arrival, kind, status]`` (status 0: a dropped connection). The
server's own ``GET /_sim/counters`` stays the authoritative count; the log only adds *when*,
so the harness can count 2xx and 429 answers per one-second window and draw the plot.

The arrival time is taken before the simulated latency, the token bucket and the handler, as
the simulator's own per-second counters take it. Prints ``simulator listening on URL``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from typing import Any

from aiohttp import web

from worker.simulator import Faults, SimConfig, Simulator
from worker.simulator.server import Handler


class BenchSimulator(Simulator):
    """A ``Simulator`` that also logs each ``/cloud/`` request's arrival and status."""

    def __init__(self, config: SimConfig) -> None:
        self.arrivals: list[tuple[float, str, int]] = []
        super().__init__(config)
        self.app.router.add_get("/_bench/arrivals", self._arrivals)

    def cloud(self, kind: str, handler: Handler) -> Handler:
        inner = super().cloud(kind, handler)
        log = self.arrivals
        clock = time.monotonic

        async def wrapped(request: web.Request) -> web.StreamResponse:
            arrived = clock()
            response = await inner(request)
            status = 0 if response.status == 599 else response.status
            log.append((arrived, kind, status))
            return response

        return wrapped

    async def _arrivals(self, request: web.Request) -> web.StreamResponse:
        rows = sorted(self.arrivals)
        t0 = rows[0][0] if rows else 0.0
        body = [[round(t - t0, 6), kind, status] for t, kind, status in rows]
        return web.Response(text=json.dumps(body, separators=(",", ":")),
                            content_type="application/json")


async def _serve(config: SimConfig, host: str, port: int) -> None:
    sim = BenchSimulator(config)
    url = await sim.start(host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"simulator listening on {url}", flush=True)
    try:
        await stop.wait()
    finally:
        await sim.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.sim")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--images", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rate-limit", type=float, default=None)
    parser.add_argument("--rate-burst", type=float, default=None)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--rate-schedule", default="",
                        help="FROM_S:LIMIT,... (the bucket's rate over time; 0 refuses all)")
    parser.add_argument("--quota", type=int, default=None)
    parser.add_argument("--quota-window", type=float, default=60.0)
    parser.add_argument("--rate-headers", default="none", choices=("none", "ietf", "x"))
    args = parser.parse_args(argv)
    schedule = tuple(
        (float(at), float(limit))
        for at, _, limit in (step.partition(":") for step in args.rate_schedule.split(",") if step)
    )
    kw: dict[str, Any] = {"seed": args.seed, "rate_limit": args.rate_limit,
                          "rate_burst": args.rate_burst, "latency_ms": args.latency_ms,
                          "rate_schedule": schedule, "quota": args.quota,
                          "quota_window_s": args.quota_window, "rate_headers": args.rate_headers}
    config = SimConfig(images=args.images, seed=args.seed, faults=Faults(**kw))
    from worker import log

    log.configure("json", level="warning")
    try:
        asyncio.run(_serve(config, args.host, args.port))
    except KeyboardInterrupt:  # pragma: no cover - a second signal
        sys.exit(130)


if __name__ == "__main__":
    main()
