"""Pushgateway metrics against a real local HTTP server."""

from __future__ import annotations

import io
import socket
import threading
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import events
from worker.metrics import push_metrics
from worker.report import LatencyStats, build_summary

T0 = datetime(2024, 5, 1, 2, 0, 0, tzinfo=UTC)


def sample_summary(**overrides: Any) -> dict[str, Any]:
    latency = LatencyStats()
    for ms in (10, 20, 30, 40, 1000):
        latency.add(ms)
    kwargs: dict[str, Any] = {
        "run_id": "r-1",
        "job": "nightly-owner-tags",
        "started_at": T0,
        "finished_at": T0 + timedelta(seconds=100),
        "exit_code": 1,
        "counts": {"updated": 900, "unchanged": 50, "failed": 3},
        "requests": {
            "list": 10, "get": 5, "patch": 1000, "task": 5,
            "retries": 40, "rate_limited": 20, "lock_waits": 4,
        },
        "latency": latency,
    }
    kwargs.update(overrides)
    return build_summary(**kwargs)



class Gateway:
    """A local HTTP server that records requests, as a Pushgateway would receive them."""

    def __init__(self, status: int = 200) -> None:
        self.requests: list[tuple[str, str, str, str]] = []
        gateway = self

        class Handler(BaseHTTPRequestHandler):
            def _record(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length).decode()
                gateway.requests.append(
                    (self.command, self.path, self.headers.get("Content-Type", ""), body)
                )
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_POST = do_PUT = do_DELETE = _record

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> Gateway:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


def families(body: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    return {
        f.name: [(s.labels, s.value) for s in f.samples]
        for f in text_string_to_metric_families(body)
    }


def test_push_metrics_success(log_stream: io.StringIO) -> None:
    summary = sample_summary(exit_code=0)
    with Gateway() as gw:
        push_metrics(gw.url, "nightly-owner-tags", summary, success=True)
    assert len(gw.requests) == 1
    method, path, content_type, body = gw.requests[0]
    assert (method, path) == ("POST", "/metrics/job/nightly-owner-tags")
    assert content_type.startswith("text/plain")
    got = families(body)
    finished = datetime.fromisoformat(summary["finished_at"]).timestamp()
    assert got["bulk_tagger_last_success_timestamp_seconds"] == [({}, finished)]
    assert got["bulk_tagger_last_completion_timestamp_seconds"] == [({}, finished)]
    assert got["bulk_tagger_duration_seconds"] == [({}, 100.0)]
    assert got["bulk_tagger_exit_code"] == [({}, 0.0)]
    assert dict((lb["status"], v) for lb, v in got["bulk_tagger_targets"]) == {
        "updated": 900,
        "unchanged": 50,
        "skipped": 0,
        "failed": 3,
        "planned": 0,
    }
    assert dict((lb["kind"], v) for lb, v in got["bulk_tagger_requests_total"]) == {
        "list": 10,
        "get": 5,
        "patch": 1000,
        "task": 5,
    }
    assert got["bulk_tagger_rate_limited"] == [({}, 20.0)]
    assert got["bulk_tagger_retries"] == [({}, 40.0)]
    assert all("job" not in lb and "instance" not in lb for f in got.values() for lb, _ in f)
    assert events(log_stream, "report.pushed")[0]["success"] is True


def test_push_metrics_failed_run_leaves_last_success_alone(log_stream: io.StringIO) -> None:
    with Gateway() as gw:
        push_metrics(
            gw.url,
            "nightly-owner-tags",
            sample_summary(),
            success=False,
            grouping_key={"shard": "2"},
        )
    method, path, _, body = gw.requests[0]
    assert (method, path) == ("POST", "/metrics/job/nightly-owner-tags/shard/2")
    got = families(body)
    assert "bulk_tagger_last_success_timestamp_seconds" not in got
    assert "bulk_tagger_last_completion_timestamp_seconds" in got
    assert got["bulk_tagger_exit_code"] == [({}, 1.0)]


def test_push_metrics_dead_url_logs_and_returns(log_stream: io.StringIO) -> None:
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    push_metrics(
        f"http://user:hunter22@127.0.0.1:{port}", "j", sample_summary(), success=True, timeout_s=2
    )
    warnings = events(log_stream, "report.push_failed")
    assert len(warnings) == 1
    assert warnings[0]["level"] == "warning" and warnings[0]["job"] == "j"
    assert warnings[0]["url"] == f"http://127.0.0.1:{port}"
    assert "hunter22" not in log_stream.getvalue()


def test_push_metrics_gateway_error_logs_and_returns(log_stream: io.StringIO) -> None:
    with Gateway(status=500) as gw:
        push_metrics(gw.url, "j", sample_summary(), success=True)
    assert len(gw.requests) == 1
    assert len(events(log_stream, "report.push_failed")) == 1
    assert events(log_stream, "report.pushed") == []
