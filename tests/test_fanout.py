"""worker.fanout: at most N at a time, results in the items' order, reading 4N items ahead."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from worker import fanout


async def test_batches_bound_concurrency_keep_order_and_read_ahead() -> None:
    running = peak = pulled = 0

    def items() -> Iterator[int]:
        nonlocal pulled
        for i in range(50):
            pulled += 1
            yield i

    async def work(i: int) -> int:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.001 * (i % 3))
        running -= 1
        return i * 2

    got: list[int] = []
    async for batch in fanout.batches(work, items(), concurrency=3):
        assert pulled <= len(got) + 3 * fanout.READ_AHEAD  # never more than a batch ahead
        got += batch
    assert got == [i * 2 for i in range(50)]
    assert peak == 3


async def test_the_first_error_of_a_batch_is_raised() -> None:
    async def work(i: int) -> int:
        if i == 5:
            raise ValueError("five")
        return i

    seen: list[int] = []
    with pytest.raises(ValueError, match="five"):
        async for batch in fanout.batches(work, range(40), concurrency=2):
            seen += batch
    assert seen == []  # 5 is in the first batch (8 items)
