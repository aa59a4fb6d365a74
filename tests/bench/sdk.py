"""The official SDK doing a query job (``python -m tests.bench.sdk``).

``gcore.AsyncGcore`` with its default client (httpx, 2 retries, Retry-After honoured): list
the projects and regions (when "all"), page through each region's images with the job's
filter and page size (``client.cloud.instances.images.list``, auto-paginated), then one
``client.cloud.instances.images.update(..., tags={KEY: VALUE})`` per image under an
``asyncio.Semaphore(N)``, optionally behind a fixed ``aiolimiter.AsyncLimiter(rate, 1)``.

Prints one JSON line like the floor's: ``updated``, ``failed``, ``t_first``, ``t_last``,
``duration_s``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import time

from aiolimiter import AsyncLimiter
from gcore import APIError, AsyncGcore


async def run(args: argparse.Namespace) -> dict[str, float | int]:
    key, _, value = args.tag.partition("=")
    limiter = AsyncLimiter(args.rate, 1) if args.rate else None
    sem = asyncio.Semaphore(args.concurrency)
    counts = {"updated": 0, "failed": 0}
    t_first = time.monotonic()
    async with AsyncGcore(api_key=os.environ.get("GCORE_API_KEY", "bench"),
                          base_url=args.base_url) as client:
        images = client.cloud.instances.images

        async def limited() -> None:
            if limiter is not None:
                await limiter.acquire()

        projects: list[int]
        regions: list[int]
        if args.projects == "all":
            await limited()
            projects = [p.id async for p in client.cloud.projects.list()]
        else:
            projects = [int(x) for x in args.projects.split(",")]
        if args.regions == "all":
            await limited()
            regions = [r.id async for r in client.cloud.regions.list()]
        else:
            regions = [int(x) for x in args.regions.split(",")]
        todo: list[tuple[int, int, str]] = []
        for p in projects:
            for r in regions:
                # the paginator fetches the next page itself: the limiter cannot see those
                await limited()
                async for image in images.list(
                    project_id=p, region_id=r, visibility=args.visibility, limit=args.page_size
                ):
                    todo.append((p, r, image.id))

        async def one(p: int, r: int, image_id: str) -> None:
            async with sem:
                await limited()
                try:
                    await images.update(image_id, project_id=p, region_id=r, tags={key: value})
                except APIError:
                    counts["failed"] += 1
                else:
                    counts["updated"] += 1

        await asyncio.gather(*(one(*t) for t in todo))
    t_last = time.monotonic()
    return {**counts, "t_first": t_first, "t_last": t_last, "duration_s": t_last - t_first}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.sdk")
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rate", type=float, default=None)
    parser.add_argument("--projects", default="all")
    parser.add_argument("--regions", default="all")
    parser.add_argument("--visibility", default="private")
    parser.add_argument("--page-size", type=int, default=1000)
    parser.add_argument("--tag", default="bench=sdk", help="KEY=VALUE")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        print(json.dumps(asyncio.run(run(args))))


if __name__ == "__main__":
    main()
