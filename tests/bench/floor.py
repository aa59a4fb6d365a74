"""The floor: the least a client can do for a query job (``python -m tests.bench.floor``).

One ``aiohttp.ClientSession``, a bounded queue, N tasks; no validation, no logging, no
journal. It lists ``projects`` and ``regions`` (when "all"), pages through each region's
images with the same server-side filter and page size as the job, and sends one PATCH
``{"tags": {KEY: VALUE}}`` per image, the body encoded once. Its only concessions to the
real world: an optional fixed ``aiolimiter.AsyncLimiter(rate, 1)`` (the library's documented
use: what a user would write), and a 429 is retried after its ``Retry-After`` (else work
would be lost and the comparison unfair). Other errors are counted, not retried.

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


class Floor:
    def __init__(self, base_url: str, key: str, concurrency: int, rate: float | None) -> None:
        self.base_url = base_url.rstrip("/")
        self.key = key
        self.concurrency = concurrency
        self.limiter = AsyncLimiter(rate, 1) if rate else None
        self.updated = 0
        self.failed = 0
        self.rate_limited = 0
        self.t_first: float | None = None
        self.t_last = 0.0

    async def send(
        self, session: aiohttp.ClientSession, method: str, url: str, **kw: Any
    ) -> tuple[int, bytes]:
        limiter = self.limiter
        while True:
            if limiter is not None:
                await limiter.acquire()
            if self.t_first is None:
                self.t_first = time.monotonic()
            async with session.request(method, url, **kw) as resp:
                body = await resp.read()
                self.t_last = time.monotonic()
                if resp.status != 429:
                    return resp.status, body
                self.rate_limited += 1
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
                  args.rate)
    asyncio.run(floor.run(args.projects, args.regions, params, args.page_size, patch))
    first = floor.t_first or 0.0
    print(json.dumps({
        "updated": floor.updated, "failed": floor.failed, "rate_limited": floor.rate_limited,
        "t_first": first, "t_last": floor.t_last, "duration_s": floor.t_last - first,
    }))


if __name__ == "__main__":
    main()
