"""Safe defaults, each shown by a test that can fail, against real servers over real sockets.

- TLS is verified: a local HTTPS simulator with a throw-away CA (trustme) is refused without
  the CA and accepted with ``--ca-bundle``; a refused handshake carries no request (no key).
- Plain ``http://`` goes only to loopback unless ``--allow-insecure-http``: exit 2 and
  nothing sent (proven with a server on this machine's non-loopback address).
- Redirects are never followed: a server answering 302/307 to another port never sees the
  other port receive a request, so the Authorization header stays with the configured host.
- The state folder is 0700 and its files 0600, whatever the umask.
- A world-readable key file draws a warning; a private one does not.
- The API key appears in no log line, message, report or file: a canary key over a whole
  chaos run (401 mid-run, failures, debug logs), and an API that echoes the key back.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import socket
import ssl
import stat
import subprocess
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiohttp import web

from tests.chaos_harness import CLI, Scenario, run_cli, run_scenario
from worker.simulator import SimConfig, Simulator, SimulatorThread

CANARY = "canary-7f3a9c2e51d8b604-KEY"
JOB = (
    "name: sec\ntargets:\n  - query: {projects: all, regions: all, visibility: private}\n"
    "changes:\n  set_tags: {checked: 'yes'}\noptions:\n  retry_budget_seconds: 2\n"
)


@pytest.fixture
def job(tmp_path: Path) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(JOB)
    return path


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GCORE_", "BULK_TAGGER_"))}
    env.update(GCORE_API_KEY=CANARY, **extra)
    return env


async def _cli_async(*args: str | Path, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """The CLI in a subprocess, awaited: the test's own loop keeps serving meanwhile."""
    proc = await asyncio.create_subprocess_exec(
        *CLI, *map(str, args), env=env or _env(),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 90)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.fixture
async def serve() -> AsyncIterator[Any]:
    """``await serve(app, host=..., ssl_context=...)`` -> its base URL; all stopped after."""
    runners: list[web.AppRunner] = []

    async def start(app: web.Application, host: str = "127.0.0.1",
                    ssl_context: ssl.SSLContext | None = None) -> str:
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        await web.TCPSite(runner, host, 0, ssl_context=ssl_context).start()
        runners.append(runner)
        port = runner.addresses[0][1]
        return f"{'https' if ssl_context else 'http'}://{host}:{port}"

    yield start
    for runner in reversed(runners):
        await runner.cleanup()


# -- TLS ---------------------------------------------------------------------------------------


async def test_tls_verified_refused_without_the_ca_accepted_with_ca_bundle(
    tmp_path: Path, job: Path, serve: Any
) -> None:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(server_ctx)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    sim = Simulator(SimConfig(images=20, api_key=CANARY))
    url = await serve(sim.app, ssl_context=server_ctx)

    code, out, err = await _cli_async("run", job, "--base-url", url,
                                      "--state-dir", tmp_path / "s1", "--log-format", "json")
    assert code not in (0, 1), (code, err)
    assert "certificate" in err.lower(), err  # the message says why
    assert code == 2 and "--ca-bundle" in err, err  # not retried: the user can fix it
    assert sim.counters.total() == 0  # the handshake failed: no request, no key, was sent

    code, out, err = await _cli_async("run", job, "--base-url", url, "--ca-bundle", ca_file,
                                      "--state-dir", tmp_path / "s2", "--log-format", "json")
    assert code == 0, err
    assert sim.counters.requests["patch"] > 0
    assert CANARY not in out + err


# -- plain http --------------------------------------------------------------------------------


def _non_loopback_ipv4() -> str | None:
    """This machine's address on its default route (no packet is sent), if it has one."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("10.254.254.254", 9))  # a UDP "connect" only picks the route
        address = probe.getsockname()[0]
    except OSError:
        return None
    finally:
        probe.close()
    return None if address.startswith("127.") or address == "0.0.0.0" else address


@pytest.fixture
def lan_sim() -> Iterator[SimulatorThread]:
    address = _non_loopback_ipv4()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address to serve on")
    with SimulatorThread(SimConfig(images=20), host=address) as thread:
        yield thread


def test_plain_http_to_another_host_refused_unless_allowed(
    tmp_path: Path, job: Path, lan_sim: SimulatorThread
) -> None:
    assert lan_sim.url.startswith("http://") and "127.0.0.1" not in lan_sim.url
    for args, env in [
        (("--base-url", lan_sim.url), {}),
        ((), {"GCORE_BASE_URL": lan_sim.url}),
    ]:
        proc = run_cli("plan", job, *args, "--state-dir", tmp_path / "s", env={**env,
                       "GCORE_API_KEY": CANARY}, timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert "--allow-insecure-http" in proc.stderr
        assert CANARY not in proc.stdout + proc.stderr
    assert lan_sim.call(lan_sim.sim.counters.total) == 0  # nothing was sent
    proc = run_cli("plan", job, "--base-url", lan_sim.url, "--allow-insecure-http",
                   "--state-dir", tmp_path / "s", env={"GCORE_API_KEY": CANARY}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert lan_sim.call(lan_sim.sim.counters.total) > 0


# -- redirects ---------------------------------------------------------------------------------


class _Recorder:
    """The other host: records every request and its Authorization header."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str | None]] = []
        self.app = web.Application()
        self.app.router.add_route("*", "/{tail:.*}", self.handle)

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append((request.method, request.path, request.headers.get("Authorization")))
        return web.json_response({"count": 0, "results": []})


class _RedirectingPatches(Simulator):
    """Answers reads as the API does, but every PATCH with a 307 to ``target``."""

    target = ""

    async def patch_image(self, request: web.Request) -> web.StreamResponse:
        raise web.HTTPTemporaryRedirect(self.target + request.path_qs)


async def test_redirects_are_not_followed(tmp_path: Path, job: Path, serve: Any) -> None:
    other = _Recorder()
    other_url = await serve(other.app)

    async def everything_moved(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound(other_url + request.path_qs)

    moved = web.Application()
    moved.router.add_route("*", "/{tail:.*}", everything_moved)
    moved_url = await serve(moved)
    code, _, err = await _cli_async("plan", job, "--base-url", moved_url,
                                    "--state-dir", tmp_path / "s1", "--log-format", "json")
    # the probe's read is redirected: a base URL that moved is a wrong one (exit 2), and the
    # run did not go elsewhere
    assert code == 2, (code, err)
    assert "redirects are not followed" in err and "--base-url" in err, err

    sim = _RedirectingPatches(SimConfig(images=20, api_key=CANARY))
    sim.target = other_url
    url = await serve(sim.app)
    code, _, err = await _cli_async("run", job, "--base-url", url,
                                    "--state-dir", tmp_path / "s2", "--log-format", "json")
    assert code == 1, err  # every PATCH failed (a 307 is an answer, not a place to go)
    assert sim.counters.requests["patch"] > 0
    assert other.seen == []  # the key never reached the other host
    assert sim.counters.requests["list"] > 0


# -- the state folder --------------------------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_state_folder_0700_files_0600_whatever_the_umask(tmp_path: Path, job: Path) -> None:
    state = tmp_path / "state"
    proc = subprocess.run(
        ["sh", "-c", 'umask 000 && exec "$@"', "sh", *CLI, "run", str(job), "--simulate",
         "--simulate-images", "20", "--state-dir", str(state), "--run-id", "perm"],
        env=_env(), capture_output=True, text=True, timeout=90, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    run_dir = state / "perm"
    assert _mode(state) == 0o700
    assert _mode(run_dir) == 0o700
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"journal.sqlite", "results.jsonl.gz", "summary.json"}
    loose = {p.name: oct(_mode(p)) for p in files if _mode(p) != 0o600}
    assert not loose, loose
    assert all(_mode(p) == 0o700 for p in run_dir.rglob("*") if p.is_dir())


# -- the key file ------------------------------------------------------------------------------


def test_world_readable_key_file_warns(tmp_path: Path, job: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(CANARY + "\n")
    outputs = {}
    for mode in (0o644, 0o600):
        key_file.chmod(mode)
        proc = run_cli("plan", job, "--simulate", "--simulate-images", "5", "--api-key-file",
                       key_file, "--state-dir", tmp_path / "s", "--log-format", "json",
                       env={}, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert CANARY not in proc.stdout + proc.stderr
        outputs[mode] = proc.stderr
    assert "key_file_world_readable" in outputs[0o644]
    assert "chmod 600" in outputs[0o644]
    assert "key_file_world_readable" not in outputs[0o600]


# -- the key is never written anywhere ---------------------------------------------------------


def _leaks(texts: dict[str, str], folder: Path) -> list[str]:
    """Where the canary (or its first half) shows up: outputs by name, files by path."""
    needles = [CANARY.encode(), CANARY[:16].encode()]
    found = [name for name, text in texts.items() if any(n.decode() in text for n in needles)]
    for path in folder.rglob("*"):
        if path.is_file() and any(n in path.read_bytes() for n in needles):
            found.append(str(path.relative_to(folder)))
    return found


def test_canary_key_redacted_over_a_whole_chaos_run(tmp_path: Path) -> None:
    """A chaos run (seed 6: 5xx storms, deletions, locks, a 401 mid-apply) with debug logs,
    the key from a world-readable file, and the simulator insisting on that very key."""
    key_file = tmp_path / "key"
    key_file.write_text(CANARY)
    key_file.chmod(0o644)
    result = run_scenario(
        Scenario.build(6, images=300), tmp_path / "chaos", api_key="env-key-unused",
        sim_api_key=CANARY,
        extra_args=("--log-level", "debug", "--api-key-file", str(key_file)),
        timeout=100,
    )
    assert not result.problems, result.problems[:5]
    assert result.exit_code == 4
    assert result.statuses["updated"] > 0  # the key worked until it was revoked
    assert "key_file_world_readable" in result.stderr
    assert '"level": "debug"' in result.stderr  # debug lines were there to leak
    assert result.run_dir is not None
    texts = {"stdout": result.stdout, "stderr": result.stderr}
    run_dir = result.run_dir
    formats = ("summary", "json", "jsonl", "csv")

    def report(fmt: str) -> subprocess.CompletedProcess[str]:
        return run_cli("report", run_dir.name, "--format", fmt, "--state-dir", run_dir.parent,
                       env={"GCORE_API_KEY": CANARY}, timeout=60)

    with ThreadPoolExecutor(max_workers=2) as pool:
        for fmt, proc in zip(formats, pool.map(report, formats), strict=True):
            assert proc.returncode == 0, proc.stderr
            texts[f"report {fmt}"] = proc.stdout + proc.stderr
    assert _leaks(texts, tmp_path / "chaos") == []


class _Echo422(Simulator):
    """An API that quotes the request's Authorization header in its PATCH errors."""

    async def patch_image(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(
            {"message": f"rejected: {request.headers.get('Authorization')}"}, status=422
        )


class _Echo401(Simulator):
    """An API that quotes the Authorization header when it refuses it."""

    async def projects(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(
            {"message": f"invalid credentials {request.headers.get('Authorization')}"},
            status=401,
        )


@pytest.mark.parametrize(
    ("sim_class", "exit_code"),
    [
        (_Echo422, 1),
        (_Echo401, 4),
    ],
    ids=["422-echo", "401-echo"],
)
async def test_key_redacted_when_the_api_echoes_it(
    tmp_path: Path, job: Path, serve: Any, sim_class: type[Simulator], exit_code: int
) -> None:
    sim = sim_class(SimConfig(images=20, api_key=CANARY))
    url = await serve(sim.app)
    state = tmp_path / "state"
    code, out, err = await _cli_async("run", job, "--base-url", url, "--state-dir", state,
                                      "--run-id", "echo", "--log-level", "debug",
                                      "--log-format", "json")
    assert code == exit_code, err
    texts = {"stdout": out, "stderr": err}
    if exit_code == 4:  # refused before the run began (the projects check): no run folder
        assert not (state / "echo").exists()
        assert "***" in err  # the echoed key was there, masked
        assert _leaks(texts, tmp_path) == []
        return
    summary = json.loads((state / "echo" / "summary.json").read_text())
    assert summary["exit_code"] == exit_code
    assert "***" in out + err + gzip.decompress(
        (state / "echo" / "results.jsonl.gz").read_bytes()).decode() + json.dumps(
        summary)  # the echoed key was there, masked
    code, report, _ = await _cli_async("report", "echo", "--format", "jsonl",
                                       "--state-dir", state)
    texts["report"] = report
    assert _leaks(texts, tmp_path) == []

