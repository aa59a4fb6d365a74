"""Bounded fan-out: an async function over a stream of items, a few at a time.

``batches(fn, items, concurrency=N)`` reads ``4 * N`` items ahead, runs ``fn`` on them with at
most ``N`` running at once, and yields each batch's results in the items' order: memory stays
bounded by the batch whatever the number of items. The first exception of a batch is raised
(``asyncio.gather``'s rule); the rest of that batch still runs to its end.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

#: items read ahead per concurrent slot
READ_AHEAD = 4


async def batches(
    fn: Callable[[T], Awaitable[R]], items: Iterable[T], *, concurrency: int
) -> AsyncIterator[list[R]]:
    """``fn`` over ``items``, at most ``concurrency`` at a time; each batch's results in order."""
    sem = asyncio.Semaphore(concurrency)

    async def one(item: T) -> R:
        async with sem:
            return await fn(item)

    iterator = iter(items)
    while batch := list(itertools.islice(iterator, concurrency * READ_AHEAD)):
        yield await asyncio.gather(*(one(item) for item in batch))
