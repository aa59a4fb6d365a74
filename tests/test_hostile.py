"""A hostile API: answers built to hurt the worker, each met through the real CLI.

A small aiohttp server of the test's own (in a thread, so the CLI's peak RSS can be read with
``os.wait4``, by a small launcher: see ``LAUNCHER``) serves one project and one region whose
list is the attack:

- a huge body (150 MB, streamed without a length): refused past the cap, peak RSS bounded;
  and 399,000 small objects (the most an answer may hold): parsed, refused, RSS bounded too;
- a body dripping one byte a second: no request outlives its deadline (the retry budget);
- a ``count`` that lies while the offset is ignored: paging ends;
- JSON nested 200,000 deep, tags that are not objects, a page of 5,000 images where 1,000
  were asked: a clear stop (75), never 70; the same (or over 1 MiB) in the answer to one
  image's PATCH: that target fails (``bad_answer``) unless a read shows the PATCH landed
  (``verified_by_read``), the others go on;
- ids built to leave the URL path (``../../../../projects``, a task id ``../../evil?x=``):
  never sent, the image fails ``bad_id`` / ``bad_answer``; every path the server saw stayed
  under the images and tasks it serves;
- image names with ESC, an OSC 8 link, BEL, a C1 CSI, U+202E: escaped in the plan, the logs
  and ``report --format csv/jsonl`` (JSON lines stay the same JSON); a template copying such
  a name fails that target (``template``) and nothing of it is sent.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.helpers import CLI, results, run_dirs, write_job

LIST = "/cloud/v1/images/1/7"
IMAGE = {"name": "img", "tags": [], "os_type": "linux"}


def _image(image_id: str, **extra: Any) -> dict[str, Any]:
    return {**IMAGE, "id": image_id, **extra}


class Hostile:
    """The server: ``mode`` says how the list of project 1, region 7 answers."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.seen: list[str] = []  # "METHOD raw-path" of every request
        self.durations: list[float] = []  # how long each dripped answer was held open
        self.tags: dict[str, list[dict[str, str]]] = {}  # what PATCHes set, by image id
        self.url = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> Hostile:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _serve(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
        loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        loop.run_until_complete(site.start())
        self.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        self._ready.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())
        loop.close()

    def count(self, prefix: str) -> int:
        return sum(line.startswith(prefix) for line in self.seen)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(f"{request.method} {request.raw_path}")
        path = request.path
        if path in ("/cloud/v1/projects", "/cloud/v1/regions"):
            return web.json_response({"count": 1, "results": [{"id": 1 if "proj" in path
                                                                else 7}]})
        if path == LIST:
            return await self.list_page(request)
        if path.startswith(LIST + "/"):
            image = _image(request.match_info["tail"].rsplit("/", 1)[-1])
            image["tags"] = self.tags.get(image["id"], [])
            if request.method == "PATCH":
                self.tags[image["id"]] = image["tags"] = [
                    {"key": k, "value": v} for k, v in (await request.json())["tags"].items()]
            if self.mode == "answers" and image["id"] == "late-1" and request.method == "PATCH":
                return web.json_response({**image, "tags": "applied, but not said so"})
            if self.mode == "answers" and image["id"] == "odd-1":  # tags that are not objects
                return web.json_response({**image, "tags": ["owner", 7]})
            if self.mode == "answers" and image["id"] == "huge-1":  # 2 MB about one image
                return web.json_response({**image, "description": "x" * 2_000_000})
            if self.mode == "answers" and image["id"] == "deep-1":
                return web.Response(body=b"[" * 200_000 + b"]" * 200_000,
                                    content_type="application/json")
            return web.json_response(image)
        if path.startswith("/cloud/v1/tasks/"):
            return web.json_response({"state": "FINISHED"})
        return web.json_response({"message": "no such path"}, status=404)

    async def list_page(self, request: web.Request) -> web.StreamResponse:
        mode = self.mode
        if mode in ("endless", "drip"):
            resp = web.StreamResponse(headers={"Content-Type": "application/json"})
            await resp.prepare(request)
            started = time.monotonic()
            try:
                if mode == "endless":  # 150 images of a 1 MB name each, no length given
                    await resp.write(b'{"results": [')
                    for i in range(150):
                        await resp.write(b'{"id": "big-%d", "name": "%s"},' % (i, b"x" * 2**20))
                    await resp.write(b'{"id": "last"}]}')
                else:
                    await resp.write(b'{"count": 1, "results": [')
                    for _ in range(120):
                        await asyncio.sleep(1.0)
                        await resp.write(b" ")
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                self.durations.append(time.monotonic() - started)
            return resp
        if mode == "lying":  # the same two images whatever the offset, a billion in all
            return web.json_response({"count": 10**9,
                                      "results": [_image("lie-1"), _image("lie-2")]})
        if mode == "deep":
            depth = 200_000
            return web.Response(body=b"[" * depth + b"]" * depth,
                                content_type="application/json")
        if mode == "swarm":  # just under the cap on values: the most objects an answer holds
            return web.Response(body=b'{"results": [' + b",".join([b'{"a":1}'] * 399_000)
                                + b"]}", content_type="application/json")
        if mode == "crowded":  # far more images than the page's limit
            return web.json_response({"count": 5000, "results": [
                _image(f"c-{i}") for i in range(5000)]})
        if mode == "tags":
            return web.json_response({"count": 2, "results": [
                _image("ok-1"), _image("odd-1", tags=["owner", 7])]})
        if mode == "answers":  # a fine list; the PATCH answers of two images are not
            return web.json_response({"count": 5, "results": [
                _image("ok-1"), _image("odd-1"), _image("deep-1"), _image("huge-1"),
                _image("late-1")]})
        if mode == "names":
            return web.json_response({"count": len(NAMES), "results": [
                _image(image_id, name=name) for image_id, name in NAMES.items()]})
        if mode == "ids":
            return web.json_response({"count": 4, "results": [
                _image("../../../../projects"), _image("good-1"),
                _image("locked-1", task_id="../../../../evil?x="),
                _image("locked-2", task_id={"not": "text"})]})
        raise AssertionError(mode)


#: image names a terminal would obey: an OSC 8 link, a CSI (C1), a right-to-left override, BEL
NAMES = {
    "n-osc": "evil\x1b]8;;http://x.invalid\x07click\x1b]8;;\x07",
    "n-csi": "a\x9b2Jb",
    "n-bidi": "report\u202efdp.exe",
    "n-bel": "bell\x07",
    "n-plain": "plain",
}
RAW_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


@pytest.fixture
def job(tmp_path: Path) -> Path:
    return write_job(tmp_path, {
        "name": "hostile",
        "targets": [{"query": {"projects": [1], "regions": [7]}}],
        "changes": {"set_tags": {"checked": "yes"}},
        "options": {"retry_budget_seconds": 2, "concurrency": 2},
    })


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GCORE_", "BULK_TAGGER_"))}
    env["GCORE_API_KEY"] = "hostile-test-key"
    return env


#: the launcher of the measured run: a small process of its own starts the CLI and prints its
#: ru_maxrss. Linux keeps a process's peak RSS across exec, and a child spawned straight from
#: pytest starts with pytest's own high-water mark (hundreds of MB late in a full suite): the
#: CLI's figure would be the test process's, not the worker's.
LAUNCHER = """
import os, subprocess, sys
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
_, status, usage = os.wait4(proc.pid, 0)
print(usage.ru_maxrss * 1024)
sys.exit(os.waitstatus_to_exitcode(status) % 256)
"""


def run_measured(job: Path, server: Hostile, state: Path,
                 timeout: float = 60) -> tuple[int, str, int]:
    """The CLI's ``run`` in a subprocess: (exit code, stderr, peak RSS in bytes)."""
    err_path = state.parent / "stderr.txt"
    with err_path.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", LAUNCHER, *CLI, "run", str(job), "--base-url", server.url,
             "--state-dir", str(state), "--log-format", "json", "--retry-base-seconds", "0.05",
             "--lock-poll-seconds", "0.05"],
            stdout=subprocess.PIPE, stderr=err, env=_env(), start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and the run it started
        proc.wait()
        pytest.fail(f"the run was still going after {timeout} s: "
                    f"{len(server.seen)} requests, e.g. {server.seen[-3:]}")
    return proc.returncode, err_path.read_text(), int(out)


@pytest.fixture
def hostile(request: pytest.FixtureRequest) -> Iterator[Hostile]:
    with Hostile(request.param) as server:
        yield server


@pytest.mark.parametrize("hostile", ["endless", "swarm"], indirect=True)
def test_an_endless_answer_is_cut_at_the_cap_and_memory_stays_bounded(
    tmp_path: Path, job: Path, hostile: Hostile
) -> None:
    code, err, peak = run_measured(job, hostile, tmp_path / "state")
    print(f"peak RSS of the run ({hostile.mode}): {peak / 2**20:.0f} MB")
    assert peak < 200 * 2**20, f"peak RSS {peak / 2**20:.0f} MB"
    assert code == 75, err[-2000:]
    assert "run.bad_answer" in err, err[-2000:]
    assert ("10,485,760 bytes" if hostile.mode == "endless" else "399,000 images") in err
    assert hostile.count("PATCH") == 0
    assert hostile.count(f"GET {LIST}") == 1  # not retried: the answer would not shrink


@pytest.mark.parametrize("hostile", ["drip"], indirect=True)
def test_a_dripping_answer_does_not_outlive_the_request_deadline(
    tmp_path: Path, job: Path, hostile: Hostile
) -> None:
    code, err, _ = run_measured(job, hostile, tmp_path / "state")
    assert code == 75, err[-2000:]  # the API never answered within the retry budget
    assert "run.api_unreachable" in err
    assert hostile.durations
    # each dripped answer was dropped at the deadline (the job's 2 s retry budget), with
    # a second of slack for the server to notice (it writes a byte a second)
    assert max(hostile.durations) < 2 + 1.5, hostile.durations


@pytest.mark.parametrize("hostile", ["lying"], indirect=True)
def test_paging_ends_when_the_count_lies_and_the_offset_is_ignored(
    tmp_path: Path, job: Path, hostile: Hostile
) -> None:
    code, err, _ = run_measured(job, hostile, tmp_path / "state", timeout=60)
    assert code == 0, err[-2000:]
    assert "selectors.paging_stopped" in err
    assert hostile.count(f"GET {LIST}") <= 8  # the first page, a repeat, the read-ahead
    assert hostile.count("PATCH") == 2  # each image once
    (run_dir,) = run_dirs(tmp_path / "state")
    assert sorted(r["image_id"] for r in results(run_dir)) == ["lie-1", "lie-2"]


MALFORMED = {"deep": "nested too deep", "tags": "malformed", "crowded": "5,000 images"}


@pytest.mark.parametrize("hostile", list(MALFORMED), indirect=True)
def test_a_malformed_list_is_a_clear_stop_not_an_internal_error(
    tmp_path: Path, job: Path, hostile: Hostile
) -> None:
    code, err, _ = run_measured(job, hostile, tmp_path / "state")
    assert code == 75, err[-2000:]
    assert "internal error" not in err
    events = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    (stop,) = [e for e in events if e["event"] == "run.bad_answer"]
    assert MALFORMED[hostile.mode] in stop["error"]
    assert hostile.count("PATCH") == 0


@pytest.mark.parametrize("hostile", ["answers"], indirect=True)
def test_a_malformed_answer_to_one_image_fails_that_target(
    tmp_path: Path, job: Path, hostile: Hostile
) -> None:
    code, err, _ = run_measured(job, hostile, tmp_path / "state")
    assert code == 1, err[-2000:]
    assert "internal error" not in err
    (run_dir,) = run_dirs(tmp_path / "state")
    by_id = {r["image_id"]: (r["status"], r["reason"]) for r in results(run_dir)}
    assert by_id == {"ok-1": ("updated", None), "odd-1": ("failed", "bad_answer"),
                     "deep-1": ("failed", "bad_answer"), "huge-1": ("failed", "bad_answer"),
                     "late-1": ("updated", "verified_by_read")}  # a read showed it landed
    assert hostile.count("PATCH") == 5  # each once: a bad answer is not retried
    huge = next(r for r in results(run_dir) if r["image_id"] == "huge-1")
    assert "at most 1,048,576" in huge["error"]


@pytest.mark.parametrize("hostile", ["ids"], indirect=True)
def test_ids_that_would_leave_the_url_path_are_never_sent(
    tmp_path: Path, job: Path, hostile: Hostile
) -> None:
    code, err, _ = run_measured(job, hostile, tmp_path / "state")
    assert code == 1, err[-2000:]
    allowed = ("GET /cloud/v1/projects", "GET /cloud/v1/regions", f"GET {LIST}?",
               f"GET {LIST}/good-1", f"PATCH {LIST}/good-1", f"GET {LIST}/locked-",
               f"PATCH {LIST}/locked-")
    strays = [line for line in hostile.seen if not line.startswith(allowed)]
    assert not strays, strays
    assert hostile.count(f"PATCH {LIST}/good-1") == 1
    (run_dir,) = run_dirs(tmp_path / "state")
    by_id = {r["image_id"]: r for r in results(run_dir)}
    assert by_id["good-1"]["status"] == "updated"
    assert (by_id["../../../../projects"]["status"], by_id["../../../../projects"]["reason"]) \
        == ("failed", "bad_id")
    for locked in ("locked-1", "locked-2"):
        assert by_id[locked]["status"] == "failed", by_id[locked]
        assert by_id[locked]["reason"] == "bad_answer"
        assert "not a UUID" in by_id[locked]["error"]



@pytest.mark.parametrize("hostile", ["names"], indirect=True)
def test_control_characters_reach_neither_the_terminal_nor_the_api(
    tmp_path: Path, hostile: Hostile
) -> None:
    def cli(*args: str | Path, fmt: str = "console") -> subprocess.CompletedProcess[str]:
        return subprocess.run([*CLI, *map(str, args), "--state-dir", str(tmp_path / "state"),
                               "--log-format", fmt], env=_env(), capture_output=True,
                              text=True, timeout=60, check=False)

    common = ("--base-url", hostile.url)
    plain = write_job(tmp_path, {"name": "names", "targets": [
        {"query": {"projects": [1], "regions": [7]}}], "changes": {"set_tags": {"seen": "1"}}},
        name="plain.yaml")
    plan = cli("plan", plain, *common)
    assert plan.returncode == 0, plan.stderr
    assert "report\\u202efdp.exe" in plan.stdout  # shown, escaped
    assert not RAW_CONTROL.search(plan.stdout), plan.stdout
    assert not RAW_CONTROL.search(plan.stderr), plan.stderr

    # a template copying the name: those names would be sent on, so those targets fail
    job = write_job(tmp_path, {"name": "names", "targets": [
        {"query": {"projects": [1], "regions": [7]}}],
        "changes": {"set_tags": {"label": "{image.name}"}}})
    run = cli("run", job, *common, "--run-id", "named", fmt="json")
    assert run.returncode == 1, run.stderr
    assert not RAW_CONTROL.search(run.stdout + run.stderr)
    assert hostile.count("PATCH") == 1 and hostile.count(f"PATCH {LIST}/n-plain") == 1
    rows = {r["image_id"]: r for r in results(tmp_path / "state" / "named")}
    for image_id in NAMES.keys() - {"n-plain"}:
        assert (rows[image_id]["status"], rows[image_id]["reason"]) == ("failed", "template")
        assert "control character" in rows[image_id]["error"]

    csv_out = cli("report", "named", "--format", "csv")
    jsonl = cli("report", "named", "--format", "jsonl")
    assert csv_out.returncode == jsonl.returncode == 0
    assert not RAW_CONTROL.search(csv_out.stdout.replace("\r\n", "\n")), csv_out.stdout
    assert "evil\\x1b]8;;http://x.invalid\\x07click" in csv_out.stdout
    assert not RAW_CONTROL.search(jsonl.stdout)
    # the JSON lines are the same JSON: the names come back whole
    names = {json.loads(line)["image_id"]: json.loads(line)["name"]
             for line in jsonl.stdout.splitlines()}
    assert names == NAMES
