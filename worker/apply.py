"""The apply phase of ``run``: the planned targets streamed back out of the journal into the
pool, each outcome written back to the journal as it ends.

``wire`` makes the pool of a run: each outcome goes to the journal (``Journal.add_outcome``)
and the progress, and is counted by the run's circuit breaker (README, "Run-level budgets"),
which once tripped aborts the pool with ``CircuitOpen``. ``run`` sends the pending targets
while the progress is shown. A resumed run's pending targets are read again first
(``reread``): the process before may have sent them, or the images may have changed since.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable

from worker.api import Client
from worker.budget import CircuitBreaker
from worker.errors import CircuitOpen
from worker.journal import Journal, Pending
from worker.log import get_logger
from worker.models import Image, Outcome, RunContext
from worker.pool import Pool, PoolSettings
from worker.progress import Progress
from worker.selectors import Expander

log = get_logger("bulk_tagger.run")


def progress_of(journal: Journal, progress: Progress, *, resumed: bool) -> Progress:
    """``progress`` with its total: the targets left to send (a resumed run: those without
    an outcome yet)."""
    planned, _ = journal.plan_counts()
    pending = planned - sum(
        n for status, n in journal.counts().items() if status != "planned"
    ) if resumed else planned
    progress.set_total(max(0, pending))
    return progress


def wire(
    client: Client, settings: PoolSettings, ctx: RunContext, *, journal: Journal,
    progress: Progress, breaker: CircuitBreaker,
) -> Pool:
    """The run's pool: each outcome recorded in ``journal``, shown by ``progress`` and counted
    by ``breaker``."""
    add_outcome = journal.add_outcome
    advance = progress.advance

    def sink(seq: int, outcome: Outcome) -> None:
        add_outcome(seq, outcome)
        advance(outcome.status)

    record = breaker.record

    def observe(outcome: Outcome) -> None:
        trip = record(outcome.status, outcome.reason, outcome.http_status)
        if trip is not None and not pool.stopping:
            log.error("run.circuit_open", reason=trip.reason, http_status=trip.http_status,
                      failures=trip.failures, exit_code=trip.exit_code)
            pool.abort(CircuitOpen(trip.message, exit_code=trip.exit_code))

    pool = Pool(client, settings, ctx, sink, observe=observe)
    return pool


async def run(
    pool: Pool, items: Iterable[Pending] | AsyncIterable[Pending], progress: Progress, *,
    reread: bool,
) -> None:
    """Send ``items`` through ``pool`` while ``progress`` is shown (``reread``: each item is
    planned again against its image as read now, as ``reread`` hands them out)."""
    async with progress.shown():
        await pool.run(items, reread=reread)


async def reread(
    journal: Journal, expander: Expander, batch: int = 500
) -> AsyncIterator[Pending]:
    """A resumed run's pending targets, each with its image as read just now: by list
    pages where a region holds enough of them (the file selectors' join), else a GET
    each. The pool plans each again against it (a target whose image changed since the
    plan is planned against what it is now; one whose PATCH landed is recorded so)."""
    read: dict[int, Image | None] = {}

    def take() -> list[Pending]:
        items = journal.pending_of(sorted(read))
        for item in items:
            item.image, item.read = read[item.seq], True
        read.clear()
        return items

    async for tag, image in expander.reread(journal.pending_keys()):
        read[int(tag)] = image
        if len(read) >= batch:
            for item in take():
                yield item
    for item in take():
        yield item
