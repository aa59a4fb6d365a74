"""The floor: the least a client can do for a query job (``python -m tests.bench.floor``).

One ``aiohttp.ClientSession``, a bounded queue, N tasks; no validation, no logging, no
journal. It lists ``projects`` and ``regions`` (when "all"), pages through each region's
images with the same server-side filter and page size as the job, and sends one PATCH
``{"tags": {KEY: VALUE}}`` per image, the body encoded once. Its only concessions to the
real world: an optional fixed ``aiolimiter.AsyncLimiter(rate, 1)`` (the library's documented
use: what a user would write), and a 429 is retried after its ``Retry-After`` (else work
would be lost and the comparison unfair). Other errors are counted, not retried.

``--adaptive``: botocore's adaptive retry mode instead, the anchor a user would otherwise
pick: its own ``CubicCalculator`` (``botocore.retries.throttling``), ``RateClocker``
(``botocore.retries.adaptive``) and ``TokenBucket`` (``botocore.retries.bucket``), wired as
its ``ClientRateLimiter`` wires them (aiobotocore's async version of it: one acquirer at a
time; botocore's bucket is taken without blocking and waited for with ``asyncio.sleep``).
Its 429s are retried after the server's ``retry-after-ms`` (as bulk-tagger honours it),
not botocore's backoff of up to seconds: the contest is the rate alone.

Prints one JSON line: ``updated``, ``failed``, ``rate_limited``, ``t_first`` and ``t_last``
(``time.monotonic()`` of the first request and the last answer: system-wide on Linux) and
``duration_s`` (first request to last answer).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from typing import Any

import aiohttp
from aiolimiter import AsyncLimiter


class BotocoreAdaptive:
    """botocore's adaptive mode (``ClientRateLimiter``), its own parts, in asyncio."""

    def __init__(self) -> None:
        from botocore.retries import bucket, throttling
        from botocore.retries.adaptive import RateClocker

        self.clock = bucket.Clock()
        self.cubic = throttling.CubicCalculator(
            starting_max_rate=0, start_time=self.clock.current_time())
        self.bucket = bucket.TokenBucket(max_rate=1, clock=self.clock)
        self.clocker = RateClocker(self.clock)
        self.enabled = False  # as botocore: no limit until the first throttling answer
        self.lock = asyncio.Lock()

    async def acquire(self) -> None:
        from botocore.exceptions import CapacityNotAvailableError

        if not self.enabled:
            return
        async with self.lock:
            while True:
                try:
                    self.bucket.acquire(block=False)
                    return
                except CapacityNotAvailableError:
                    bucket = self.bucket
                    await asyncio.sleep((1 - bucket.available_capacity) / bucket.max_rate)

    def answered(self, throttled: bool) -> None:
        """``ClientRateLimiter.on_receiving_response``."""
        measured = self.clocker.record()
        now = self.clock.current_time()
        if not throttled:
            new_rate = self.cubic.success_received(now)
        else:
            rate = measured if not self.enabled else min(measured, self.bucket.max_rate)
            new_rate = self.cubic.error_received(rate, now)
            self.enabled = True
        self.bucket.max_rate = min(new_rate, 2.0 * measured)


class Floor:
    def __init__(
        self, base_url: str, key: str, concurrency: int, rate: float | None,
        adaptive: bool = False,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.key = key
        self.concurrency = concurrency
        self.limiter = AsyncLimiter(rate, 1) if rate else None
        self.adaptive = BotocoreAdaptive() if adaptive else None
        self.updated = 0
        self.failed = 0
        self.rate_limited = 0
        self.t_first: float | None = None
        self.t_last = 0.0

    async def send(
        self, session: aiohttp.ClientSession, method: str, url: str, **kw: Any
    ) -> tuple[int, bytes]:
        limiter = self.limiter
        adaptive = self.adaptive
        while True:
            if limiter is not None:
                await limiter.acquire()
            if adaptive is not None:
                await adaptive.acquire()
            if self.t_first is None:
                self.t_first = time.monotonic()
            async with session.request(method, url, **kw) as resp:
                body = await resp.read()
                self.t_last = time.monotonic()
                if adaptive is not None:
                    adaptive.answered(resp.status == 429)
                if resp.status != 429:
                    return resp.status, body
                self.rate_limited += 1
                if adaptive is not None:
                    await asyncio.sleep(float(resp.headers.get("retry-after-ms", "1000")) / 1000)
                else:
                    await asyncio.sleep(float(resp.headers.get("Retry-After", "1")))

    async def ids(self, session: aiohttp.ClientSession, what: str, given: str) -> list[int]:
        if given != "all":
            return [int(x) for x in given.split(",")]
        _, body = await self.send(session, "GET", f"{self.base_url}/cloud/v1/{what}")
        return [item["id"] for item in json.loads(body)["results"]]

    async def run(
        self, projects: str, regions: str, params: list[tuple[str, str]], page_size: int,
        patch: bytes,
    ) -> None:
        connector = aiohttp.TCPConnector(limit=self.concurrency + 4)
        headers = {"Authorization": f"APIKey {self.key}"}
        async with aiohttp.ClientSession(connector=connector, headers=headers) as session:
            queue: asyncio.Queue[str | None] = asyncio.Queue(self.concurrency * 2)
            patch_headers = {"Content-Type": "application/json"}

            async def worker() -> None:
                while (url := await queue.get()) is not None:
                    status, _ = await self.send(
                        session, "PATCH", url, data=patch, headers=patch_headers
                    )
                    if 200 <= status < 300:
                        self.updated += 1
                    else:
                        self.failed += 1

            workers = [asyncio.create_task(worker()) for _ in range(self.concurrency)]
            project_ids = await self.ids(session, "projects", projects)
            region_ids = await self.ids(session, "regions", regions)
            for p in project_ids:
                for r in region_ids:
                    base = f"{self.base_url}/cloud/v1/images/{p}/{r}"
                    offset = 0
                    while True:
                        query = [*params, ("limit", str(page_size)), ("offset", str(offset))]
                        status, body = await self.send(session, "GET", base, params=query)
                        if status != 200:
                            break
                        page = json.loads(body)
                        results = page["results"]
                        for image in results:
                            await queue.put(f"{base}/{image['id']}")
                        offset += len(results)
                        if not results or offset >= page["count"]:
                            break
            for _ in workers:
                await queue.put(None)
            await asyncio.gather(*workers)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.floor")
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rate", type=float, default=None)
    parser.add_argument("--adaptive", action="store_true", help="botocore's adaptive mode")
    parser.add_argument("--projects", default="all")
    parser.add_argument("--regions", default="all")
    parser.add_argument("--visibility", default="private")
    parser.add_argument("--page-size", type=int, default=1000)
    parser.add_argument("--tag", default="bench=floor", help="KEY=VALUE")
    args = parser.parse_args(argv)
    key, _, value = args.tag.partition("=")
    params = [("visibility", args.visibility)] if args.visibility else []
    patch = json.dumps({"tags": {key: value}}, separators=(",", ":")).encode()
    floor = Floor(args.base_url, os.environ.get("GCORE_API_KEY", "bench"), args.concurrency,
                  args.rate, args.adaptive)
    asyncio.run(floor.run(args.projects, args.regions, params, args.page_size, patch))
    first = floor.t_first or 0.0
    print(json.dumps({
        "updated": floor.updated, "failed": floor.failed, "rate_limited": floor.rate_limited,
        "t_first": first, "t_last": floor.t_last, "duration_s": floor.t_last - first,
    }))


if __name__ == "__main__":
    main()
