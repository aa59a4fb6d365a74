"""A real headless browser for the tests: Debian's ``chromium``, driven over the DevTools
protocol on a pipe (``--remote-debugging-pipe``: commands on fd 3, answers and events on fd 4,
each a JSON message ended by a NUL byte).

The network is off: every host resolves to nothing and every connection goes to a proxy on a
dead port. The page's own requests are watched (``Network.requestWillBeSent``), so a page that
tries to load anything is seen trying, whether or not that would have worked; console
messages, uncaught exceptions and the browser's own log (a Content-Security-Policy refusal is
logged there) are kept.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ARGS = (
    "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run", "--disable-extensions",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--proxy-server=127.0.0.1:9",
    "--host-resolver-rules=MAP * ~NOTFOUND", "--remote-debugging-pipe", "--window-size=1000,800",
)


def chromium() -> str:
    """The browser's path; skips when it is not installed, fails under CI (.ci/run installs
    it where apt is available)."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        why = "chromium is not installed (Debian: apt-get install chromium; .ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    return path


@dataclass
class Visit:
    """What one page did while it loaded."""

    requests: list[str] = field(default_factory=list)
    console: list[str] = field(default_factory=list)  # errors and warnings, any source
    values: dict[str, Any] = field(default_factory=dict)


class Browser:
    """``with Browser(tmp) as b: visit = b.open(url, {"name": "js expression"})``."""

    def __init__(self, profile: Path) -> None:
        self.profile = profile
        self._id = 0
        self._buffer = b""
        self._session = ""

    def __enter__(self) -> Browser:
        cmd_r, self._cmd_w = os.pipe()
        self._out_r, out_w = os.pipe()

        def wire() -> None:  # in the child: its fd 3 reads our commands, fd 4 writes back
            a = fcntl.fcntl(cmd_r, fcntl.F_DUPFD, 10)
            b = fcntl.fcntl(out_w, fcntl.F_DUPFD, 10)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen(
            [chromium(), *ARGS, f"--user-data-dir={self.profile}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            pass_fds=(3, 4), preexec_fn=wire,  # noqa: PLW1509 (a test's own child)
        )
        os.close(cmd_r)
        os.close(out_w)
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self._session = self.call("Target.attachToTarget",
                                  {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Network", "Runtime", "Log", "Page"):
            self.call(f"{domain}.enable")
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._session = ""
            self.call("Browser.close")
        except (OSError, TimeoutError, RuntimeError):
            pass
        finally:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            os.close(self._cmd_w)
            os.close(self._out_r)

    def _read(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._out_r], [], [], left)[0]:
                raise TimeoutError("chromium did not answer in time")
            chunk = os.read(self._out_r, 1 << 16)
            if not chunk:
                raise RuntimeError("chromium closed its pipe")
            self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        result: dict[str, Any] = json.loads(message)
        return result

    def call(self, method: str, params: dict[str, Any] | None = None,
             events: list[dict[str, Any]] | None = None, timeout: float = 20) -> Any:
        """Send one command; its result (events seen meanwhile go to ``events``)."""
        self._id += 1
        message: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if self._session:
            message["sessionId"] = self._session
        os.write(self._cmd_w, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            answer = self._read(deadline)
            if answer.get("id") == self._id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer.get("result", {})
            if events is not None and "method" in answer:
                events.append(answer)

    def open(self, url: str, expressions: dict[str, str], timeout: float = 20) -> Visit:
        """Load ``url``, wait for its load event and a moment more, then evaluate each
        JavaScript expression in the page (the page itself runs none: its policy forbids it;
        DevTools' evaluation is not the page's)."""
        events: list[dict[str, Any]] = []
        self.call("Page.navigate", {"url": url}, events)
        deadline = time.monotonic() + timeout
        while not any(e["method"] == "Page.loadEventFired" for e in events):
            message = self._read(deadline)
            if "method" in message:
                events.append(message)
        settle = time.monotonic() + 0.3  # late loads (images, fonts) after the event
        while True:
            try:
                message = self._read(settle)
            except TimeoutError:
                break
            if "method" in message:
                events.append(message)
        visit = Visit()
        for name, expression in expressions.items():
            answer = self.call("Runtime.evaluate", {"expression": expression,
                                                    "returnByValue": True}, events)
            visit.values[name] = answer.get("result", {}).get("value")
        for e in events:
            p = e.get("params", {})
            if e["method"] == "Network.requestWillBeSent":
                visit.requests.append(p["request"]["url"])
            elif e["method"] == "Runtime.consoleAPICalled" and p.get("type") in ("error",
                                                                                 "warning"):
                visit.console.append(json.dumps(p.get("args")))
            elif e["method"] == "Runtime.exceptionThrown":
                visit.console.append(json.dumps(p.get("exceptionDetails")))
            elif e["method"] == "Log.entryAdded" and p["entry"]["level"] in ("error", "warning"):
                visit.console.append(p["entry"]["text"])
        return visit
