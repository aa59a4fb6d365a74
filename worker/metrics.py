"""The run's metrics, pushed to a Prometheus Pushgateway when the run ends."""

from __future__ import annotations

import contextlib
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from worker.log import get_logger
from worker.report import _NOT_KINDS

_log = get_logger("bulk_tagger.report")


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


def push_metrics(
    url: str,
    job: str,
    summary: Mapping[str, Any],
    *,
    success: bool,
    timeout_s: float = 10,
    grouping_key: Mapping[str, str] | None = None,
) -> None:
    """Push the run's gauges to a Prometheus Pushgateway at ``url``; never raises.

    Synchronous (run it with ``asyncio.to_thread``). The group is ``/metrics/job/<job>`` (so
    the ``job`` label is the job's name), plus ``grouping_key`` (e.g. ``{"shard": "2"}``
    for the shards of an Indexed Job, which would otherwise replace each other's metrics).
    Uses POST (pushadd): gauges of this run replace the same-named ones of the group, others
    stay, so a failed run (``success=False``, no last-success gauge) keeps the last success.
    A failure is logged as ``report.push_failed`` and swallowed.
    """
    try:
        # imported here: only a run with a Pushgateway pays for it
        from prometheus_client import CollectorRegistry, Gauge, pushadd_to_gateway

        registry = CollectorRegistry()

        def gauge(name: str, doc: str, labels: Sequence[str] = ()) -> Any:
            return Gauge(name, doc, labelnames=tuple(labels), registry=registry)

        finished = _timestamp(summary.get("finished_at"))
        if success:
            gauge(
                "bulk_tagger_last_success_timestamp_seconds",
                "When the job last finished with every target handled (Unix time)",
            ).set(finished)
        gauge(
            "bulk_tagger_last_completion_timestamp_seconds",
            "When the job last finished, successfully or not (Unix time)",
        ).set(finished)
        gauge("bulk_tagger_duration_seconds", "Duration of the last run").set(
            float(summary.get("duration_s") or 0.0)
        )
        gauge("bulk_tagger_exit_code", "Exit code of the last run").set(
            int(summary.get("exit_code") or 0)
        )
        targets = gauge("bulk_tagger_targets", "Targets of the last run by status", ["status"])
        for status, n in (summary.get("counts") or {}).items():
            targets.labels(status=status).set(n)
        reqs: Mapping[str, int] = summary.get("requests") or {}
        by_kind = gauge("bulk_tagger_requests_total", "Requests of the last run by kind", ["kind"])
        for kind, n in reqs.items():
            if kind not in _NOT_KINDS:
                by_kind.labels(kind=kind).set(n)
        gauge("bulk_tagger_rate_limited", "429 answers in the last run").set(
            reqs.get("rate_limited", 0)
        )
        gauge("bulk_tagger_retries", "Retried attempts in the last run").set(reqs.get("retries", 0))
        gauge("bulk_tagger_lock_waits", "Targets that waited for a task lock").set(
            reqs.get("lock_waits", 0)
        )
        gauge("bulk_tagger_rate_per_second", "Achieved useful requests per second").set(
            float(summary.get("rate_per_second") or 0.0)
        )
        latency = gauge(
            "bulk_tagger_request_latency_seconds",
            "Request latency quantiles of the last run",
            ["quantile"],
        )
        for name, q in (("p50", "0.5"), ("p95", "0.95"), ("p99", "0.99")):
            ms = (summary.get("latency_ms") or {}).get(name, 0.0)
            latency.labels(quantile=q).set(float(ms) / 1000)
        pushadd_to_gateway(
            url,
            job=job,
            registry=registry,
            grouping_key=dict(grouping_key) if grouping_key else None,
            timeout=timeout_s,
        )
    except Exception as exc:  # metrics must never fail a run
        _log.warning("report.push_failed", url=_safe_url(url), job=job, error=repr(exc))
    else:
        _log.info("report.pushed", url=_safe_url(url), job=job, success=success)
