"""Pushgateway metrics against a real Pushgateway, checked with promtool.

The gateway and promtool are Debian's (`apt-get install prometheus-pushgateway prometheus`;
`.ci/run` installs them): the gateway is started on a free loopback port without a
persistence file and stopped after the test. Without them these tests skip, except under CI,
where they fail.
"""

from __future__ import annotations

import io
import math
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import T0, events, need, run_cli, run_dirs, sample_summary, summary
from worker.metrics import LATENCY_BUCKETS_S, push_metrics
from worker.report import LatencyStats


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Pushgateway:
    """A real Pushgateway on a free loopback port, metrics in memory only."""

    def __init__(self, binary: str, log: Path) -> None:
        self.binary, self.log = binary, log
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self) -> None:
        for _ in range(3):  # the free port may be taken before the gateway binds it
            port = free_port()
            with self.log.open("ab") as out:
                self.proc = subprocess.Popen(
                    [self.binary, f"--web.listen-address=127.0.0.1:{port}",
                     "--persistence.file=", "--log.level=warn"],
                    stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                )  # fmt: skip
            self.url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 15
            while self.proc.poll() is None and time.monotonic() < deadline:
                try:
                    with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as answer:
                        if answer.status == 200:
                            return
                except OSError:
                    time.sleep(0.05)
            self.stop()
        raise AssertionError(f"the Pushgateway did not start: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def exposition(self) -> str:
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=5) as answer:
            text: str = answer.read().decode()
            return text

    def group(self, job: str, **labels: str) -> dict[str, list[tuple[dict[str, str], float]]]:
        """Our samples of one group as the gateway serves them, without its group labels."""
        group = {"job": job, "instance": "", **labels}
        got: dict[str, list[tuple[dict[str, str], float]]] = {}
        for family in text_string_to_metric_families(self.exposition()):
            for s in family.samples:
                if s.name.startswith("bulk_tagger_") and all(
                    s.labels.get(k, "") == v for k, v in group.items()
                ) and set(s.labels) - set(group) <= {"status", "kind", "le"}:
                    rest = {k: v for k, v in s.labels.items() if k not in group}
                    got.setdefault(s.name, []).append((rest, s.value))
        return got


@pytest.fixture
def pushgateway(tmp_path: Path) -> Iterator[Pushgateway]:
    gateway = Pushgateway(need("prometheus-pushgateway"), tmp_path / "pushgateway.log")
    gateway.start()
    try:
        yield gateway
    finally:
        gateway.stop()


def promtool_check_metrics(text: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [need("promtool"), "check", "metrics"], input=text, capture_output=True, text=True,
        timeout=30, check=False,
    )


def value(samples: list[tuple[dict[str, str], float]], **labels: str) -> float:
    (found,) = [v for lb, v in samples if lb == labels]
    return found


def test_a_run_and_two_shards_keep_their_own_groups_and_pass_promtool(
    pushgateway: Pushgateway, tmp_path: Path
) -> None:
    """The real CLI pushes an unsharded run and shards 0 and 1 of 2 of the demo job: three
    groups, the shards' target counts adding up to the whole run's, promtool clean."""
    demo = Path(__file__).resolve().parent.parent / "jobs" / "demo.yaml"
    for name, shard in (("whole", None), ("s0", "0/2"), ("s1", "1/2")):
        args = ["run", demo, "--simulate", "--state-dir", tmp_path / name,
                "--pushgateway", pushgateway.url]
        if shard:
            args += ["--shard", shard]
        result = run_cli(*args)
        assert result.returncode == 0, result.stderr[-2000:]
    whole = pushgateway.group("demo-retag", shard="")
    shards = [pushgateway.group("demo-retag", shard=i) for i in ("0", "1")]
    for group, name in zip((whole, *shards), ("whole", "s0", "s1"), strict=True):
        (run_dir,) = run_dirs(tmp_path / name)
        written = summary(run_dir)
        assert value(group["bulk_tagger_exit_code"]) == 0
        assert value(group["bulk_tagger_targets"], status="updated") == written["counts"]["updated"]
        assert value(group["bulk_tagger_requests"], kind="patch") == written["requests"]["patch"]
        assert value(group["bulk_tagger_last_success_timestamp_seconds"]) > 0
        assert value(group["bulk_tagger_request_latency_seconds_count"]) > 0
    assert value(whole["bulk_tagger_shards"]) == 1
    assert [value(s["bulk_tagger_shards"]) for s in shards] == [2, 2]
    for status in ("updated", "skipped"):
        parts = [value(s["bulk_tagger_targets"], status=status) for s in shards]
        assert all(parts), "each shard did some of the work"
        assert sum(parts) == value(whole["bulk_tagger_targets"], status=status)
    checked = promtool_check_metrics(pushgateway.exposition())
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout + checked.stderr == ""


def test_promtool_flags_the_old_metrics() -> None:
    """The check above can fail: the metrics as they were (a gauge with a quantile label, a
    gauge named like a counter) are what promtool reports."""
    old = (
        "# HELP bulk_tagger_request_latency_seconds Request latency quantiles\n"
        "# TYPE bulk_tagger_request_latency_seconds gauge\n"
        'bulk_tagger_request_latency_seconds{quantile="0.5"} 0.01\n'
        "# HELP bulk_tagger_requests_total Requests of the last run by kind\n"
        "# TYPE bulk_tagger_requests_total gauge\n"
        'bulk_tagger_requests_total{kind="get"} 5\n'
    )
    checked = promtool_check_metrics(old)
    out = checked.stdout + checked.stderr
    assert checked.returncode != 0
    assert 'non-summary metrics should not have "quantile" label' in out
    assert 'non-counter metrics should not have "_total" suffix' in out


def test_a_failed_run_keeps_the_shards_last_success(pushgateway: Pushgateway) -> None:
    good = sample_summary(exit_code=0)
    bad = sample_summary(exit_code=1, finished_at=T0 + timedelta(days=1))
    latency = LatencyStats()
    for ms in (3, 20, 30, 40, 1000):
        latency.add(ms)
    push_metrics(pushgateway.url, "nightly", good, success=True, latency=latency, shard=(1, 4))
    push_metrics(pushgateway.url, "nightly", bad, success=False, shard=(1, 4))
    got = pushgateway.group("nightly", shard="1")
    assert value(got["bulk_tagger_last_success_timestamp_seconds"]) == (
        datetime.fromisoformat(good["finished_at"]).timestamp()
    )
    assert value(got["bulk_tagger_last_completion_timestamp_seconds"]) == (
        datetime.fromisoformat(bad["finished_at"]).timestamp()
    )
    assert value(got["bulk_tagger_exit_code"]) == 1
    assert value(got["bulk_tagger_targets"], status="failed") == 3
    assert {lb["kind"]: v for lb, v in got["bulk_tagger_requests"]} == {
        "list": 10, "get": 5, "patch": 1000, "task": 5,
    }  # fmt: skip
    assert value(got["bulk_tagger_rate_limited"]) == 20
    # the histogram of the first push stays (the second had none): cumulative, in seconds
    buckets = {float(lb["le"]): v for lb, v in got["bulk_tagger_request_latency_seconds_bucket"]}
    assert sorted(buckets) == [*LATENCY_BUCKETS_S, math.inf]
    assert [buckets[le] for le in (0.005, 0.01, 0.025, 0.05, 0.75, 1, math.inf)] == [
        1, 1, 2, 4, 4, 5, 5
    ]
    assert value(got["bulk_tagger_request_latency_seconds_count"]) == 5
    assert value(got["bulk_tagger_request_latency_seconds_sum"]) == pytest.approx(1.093)
    assert "bulk_tagger_requests_total" not in got
    checked = promtool_check_metrics(pushgateway.exposition())
    assert checked.returncode == 0, checked.stdout + checked.stderr


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
