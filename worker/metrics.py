"""The run's metrics, pushed to a Prometheus Pushgateway when the run ends.

Names and types follow Prometheus' conventions (``promtool check metrics`` is clean): the
numbers of the last run are gauges without a ``_total`` suffix, request latency is a
histogram (``_bucket``/``_sum``/``_count``, which ``histogram_quantile`` reads and which add
up across the shards of a sharded run). Each shard pushes to its own group, so shards never
replace each other's metrics.
"""

from __future__ import annotations

import contextlib
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from datetime import datetime
from typing import Any

from worker.errors import ExitCode
from worker.log import get_logger
from worker.report import NOT_KINDS, LatencyStats

_log = get_logger("bulk_tagger.report")

#: Upper bounds (seconds) of the latency histogram's buckets: Prometheus' defaults, which span
#: a fast answer (5 ms) to a slow one (10 s), plus 30 s for the tail of a struggling API.
LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 30.0,
)  # fmt: skip


def _safe_url(url: str) -> str:
    """The URL without any user:password part, for log lines."""
    parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
    if parts.username or parts.password:
        host = parts.hostname or ""
        netloc = f"{host}:{parts.port}" if parts.port else host
        parts = parts._replace(netloc=netloc)
    return urllib.parse.urlunsplit(parts)


def _timestamp(text: Any) -> float:
    if isinstance(text, str):
        with contextlib.suppress(ValueError):
            return datetime.fromisoformat(text).timestamp()
    return time.time()


def metric_families(
    summary: Mapping[str, Any],
    *,
    success: bool,
    latency: LatencyStats | None = None,
    shards: int = 1,
) -> Iterator[Any]:
    """The run's metric families (prometheus_client's), from its summary.json content.

    ``success``: the run ended with every target handled; only then is the last-success gauge
    among them. ``latency``: this process's request latencies (no histogram without it).
    ``shards``: how many shards the run was split into (1 when not sharded).
    """
    from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily

    def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
        return GaugeMetricFamily(name, doc, value=value)

    finished = _timestamp(summary.get("finished_at"))
    if success:
        yield gauge(
            "bulk_tagger_last_success_timestamp_seconds",
            "When the job last finished with every target handled (Unix time)",
            finished,
        )
    yield gauge(
        "bulk_tagger_last_completion_timestamp_seconds",
        "When the job last finished, successfully or not (Unix time)",
        finished,
    )
    yield gauge("bulk_tagger_duration_seconds", "Duration of the last run",
                float(summary.get("duration_s") or 0.0))
    yield gauge("bulk_tagger_exit_code", "Exit code of the last run",
                int(summary.get("exit_code") or ExitCode.OK))
    yield gauge("bulk_tagger_shards", "How many shards the last run was split into", shards)
    targets = GaugeMetricFamily(
        "bulk_tagger_targets", "Targets of the last run by status", labels=["status"]
    )
    for status, n in (summary.get("counts") or {}).items():
        targets.add_metric([status], n)
    yield targets
    reqs: Mapping[str, int] = summary.get("requests") or {}
    by_kind = GaugeMetricFamily(
        "bulk_tagger_requests", "Requests of the last run by kind", labels=["kind"]
    )
    for kind, n in reqs.items():
        if kind not in NOT_KINDS:
            by_kind.add_metric([kind], n)
    yield by_kind
    yield gauge("bulk_tagger_rate_limited", "429 answers in the last run",
                reqs.get("rate_limited", 0))
    yield gauge("bulk_tagger_retries", "Retried attempts in the last run", reqs.get("retries", 0))
    yield gauge("bulk_tagger_lock_waits", "Targets of the last run that waited for a task lock",
                reqs.get("lock_waits", 0))
    yield gauge("bulk_tagger_rate_per_second", "Achieved useful requests per second",
                float(summary.get("rate_per_second") or 0.0))
    if latency is not None:
        buckets = [(str(le), latency.count_at_most(le * 1000)) for le in LATENCY_BUCKETS_S]
        buckets.append(("+Inf", latency.count))
        yield HistogramMetricFamily(
            "bulk_tagger_request_latency_seconds",
            "Latency of the last run's requests (this process's, on a resumed run)",
            buckets=buckets,
            sum_value=latency.sum_ms / 1000,
        )


def push_metrics(
    url: str,
    job: str,
    summary: Mapping[str, Any],
    *,
    success: bool,
    latency: LatencyStats | None = None,
    shard: tuple[int, int] | None = None,
    timeout_s: float = 10,
) -> None:
    """Push the run's metrics (``metric_families``) to a Pushgateway at ``url``; never raises.

    Synchronous (run it with ``asyncio.to_thread``). The group is ``/metrics/job/<job>`` (so
    the ``job`` label is the job's name); ``shard`` ``(index, count)`` adds ``/shard/<index>``,
    so the shards of an Indexed Job each keep their own group (and ``shard`` label) instead
    of replacing each other's. Uses POST (pushadd): metrics of this run replace the
    same-named ones of the group, others stay, so a failed run (``success=False``, no
    last-success gauge) keeps the group's last success. A failure is logged as
    ``report.push_failed`` and swallowed.
    """
    try:
        # imported here: only a run with a Pushgateway pays for it
        from prometheus_client import CollectorRegistry, pushadd_to_gateway

        families = list(
            metric_families(summary, success=success, latency=latency,
                            shards=shard[1] if shard else 1)
        )

        class _Run:
            def collect(self) -> list[Any]:
                return families

        registry = CollectorRegistry()
        registry.register(_Run())
        pushadd_to_gateway(
            url,
            job=job,
            registry=registry,
            grouping_key={"shard": str(shard[0])} if shard else None,
            timeout=timeout_s,
        )
    except Exception as exc:  # metrics must never fail a run
        _log.warning("report.push_failed", url=_safe_url(url), job=job, error=repr(exc))
    else:
        _log.info("report.pushed", url=_safe_url(url), job=job, success=success)
