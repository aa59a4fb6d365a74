"""One owner per run (README: "One owner per run"), with the real CLI against a simulator.

- Two ``--resume`` processes started at the same moment on one interrupted run: exactly one
  works it, the other exits 75 within 2 s naming the holder, and has not even opened a
  connection (each process talks to the simulator through its own counting TCP relay); no
  image is PATCHed twice beyond those in flight when the first process stopped.
- A SIGKILLed holder releases the run: a ``--resume`` right after it proceeds, and the
  run's summary counts the killed process's requests (journalled as it went).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests import test_resume
from tests.helpers import results, summary, write_job
from tests.test_resume import (
    JOB,
    Cli,
    applying,
    committed,
    run_args,
    run_cli,
    settled_counters,
    the_run,
    wait_until,
)
from worker.runlock import RunHeld, RunLock, is_held
from worker.simulator import SimulatorThread

fresh_sim = test_resume.fresh_sim  # the fixture, shared
CONCURRENCY = 4


class Relay:
    """A loopback TCP relay to the simulator that counts the connections made through it."""

    def __init__(self, port: int) -> None:
        self.target = ("127.0.0.1", port)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.connections = 0
        self.bytes_in = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target)
        except OSError:  # the simulator has stopped
            client.close()
            return
        with client, upstream:
            back = threading.Thread(target=self._pipe, args=(upstream, client, False))
            back.start()
            self._pipe(client, upstream, True)
            back.join()

    def _pipe(self, src: socket.socket, dst: socket.socket, counted: bool) -> None:
        try:
            while data := src.recv(65536):
                if counted:
                    with self._lock:
                        self.bytes_in += len(data)
                dst.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def relays() -> Iterator[Callable[[SimulatorThread], Relay]]:
    made: list[Relay] = []

    def make(sim: SimulatorThread) -> Relay:
        relay = Relay(int(sim.url.rsplit(":", 1)[1].split("/")[0]))
        made.append(relay)
        return relay

    yield make
    for relay in made:
        relay.close()


@pytest.mark.timing
def test_two_resumes_at_once_one_works_the_run_the_other_refuses(
    tmp_path: Path, fresh_sim: Callable[..., SimulatorThread],
    relays: Callable[[SimulatorThread], Relay],
) -> None:
    sim, job, state = stopped_while_applying(tmp_path, fresh_sim)
    run_dir = the_run(state)
    assert is_held(run_dir) is None, "the stopped process let go of the run"
    at_stop = committed(state)
    patched_at_stop, _ = settled_counters(sim)
    in_flight = {k for k in patched_at_stop if k not in at_stop}
    left = summary(run_dir)["counts"]["planned"]
    assert left > 100, "targets left for the resumes"

    relay_a, relay_b = relays(sim), relays(sim)
    args = ["run", job, "--state-dir", state, "--resume", "--grace-seconds", "5"]
    a = Cli.start(tmp_path, "a", *args, "--base-url", relay_a.url)
    b = Cli.start(tmp_path, "b", *args, "--base-url", relay_b.url)
    try:
        started = time.monotonic()
        # the one that lost: exits 75 within 2 s of its start, naming the holder
        while a.running() and b.running():
            assert time.monotonic() - started < 30, a.text() + b.text()
            time.sleep(0.01)
        took = time.monotonic() - started
        loser, winner, lost_relay = (a, b, relay_a) if not a.running() else (b, a, relay_b)
        assert loser.wait() == 75, loser.text()
        err = loser.err.read_text()
        assert f"the latest unfinished run of this job, {run_dir.name}, is locked" in err, err
        assert f"pid {winner.proc.pid} on {socket.gethostname()} since 20" in err, err
        assert "No parallel new run was started" in err
        assert "Traceback" not in err
        assert winner.running(), "the other works the run meanwhile"
        assert winner.wait() == 0, winner.text()
    finally:
        for cli in (a, b):
            if cli.running():
                cli.proc.kill()
                cli.proc.wait()
    assert lost_relay.connections == 0 and lost_relay.bytes_in == 0, "it sent nothing"
    # 2 s, or on a box too loaded for that: no longer than two start-ups side by side that
    # refuse at once (a job file that is not there) plus 1 s
    startup = time.monotonic()
    pair = [Cli.start(tmp_path, f"startup{i}", "run", tmp_path / "missing.yaml",
                      "--state-dir", state) for i in (1, 2)]
    assert [cli.wait() for cli in pair] == [2, 2]
    startup = time.monotonic() - startup
    print(f"refused after {took:.2f} s (a start-up that fails at once: {startup:.2f} s)")
    assert took <= max(2.0, startup + 1.0), f"the refused process took {took:.2f} s"

    assert the_run(state) == run_dir, "no parallel new run"
    rows = results(run_dir)
    assert len(rows) == len({r["image_id"] for r in rows})
    assert summary(run_dir)["counts"]["planned"] == 0
    patches, _ = settled_counters(sim)
    twice = {k for k, n in patches.items() if n > 1}
    assert twice <= in_flight, f"PATCHed twice: {sorted(twice - in_flight)[:5]}"


def stopped_while_applying(
    tmp_path: Path, fresh_sim: Callable[..., SimulatorThread]
) -> tuple[SimulatorThread, Path, Path]:
    """A run of JOB over 2,000 images (~700 targets, 20 ms answers) stopped by SIGTERM once
    it applies: (the simulator, the job file, the state folder)."""
    sim = fresh_sim(images=2000, latency_ms=20.0)
    job = write_job(tmp_path, {**JOB, "options": {"concurrency": CONCURRENCY}})
    state = tmp_path / "state"
    first = Cli.start(tmp_path, "first", *run_args(job, sim, state, "--grace-seconds", "5"))
    wait_until(lambda: applying(state), first, step_s=0.02)
    first.proc.send_signal(signal.SIGTERM)
    assert first.wait() == 75, first.text()
    return sim, job, state


def test_a_sigkilled_holder_releases_the_run(
    tmp_path: Path, fresh_sim: Callable[..., SimulatorThread]
) -> None:
    sim = fresh_sim(images=2000, latency_ms=10.0)
    job = write_job(tmp_path, {**JOB, "options": {"concurrency": CONCURRENCY}})
    state = tmp_path / "state"
    first = Cli.start(tmp_path, "first", *run_args(job, sim, state, "--rate", "150"))
    wait_until(lambda: applying(state), first, step_s=0.02)
    holder = is_held(the_run(state))
    assert holder is not None and holder.pid == first.proc.pid
    assert holder.host == socket.gethostname() and holder.since.endswith("Z")
    # its exports are the holder's to write: report --export refuses meanwhile
    export = run_cli(tmp_path, "export", "report", the_run(state).name, "--export",
                     "--state-dir", state)
    assert export.proc.returncode == 75, export.text()
    assert f"pid {first.proc.pid}" in export.err.read_text()
    first.proc.send_signal(signal.SIGKILL)
    assert first.wait() == -signal.SIGKILL
    run_dir = the_run(state)
    assert (run_dir / "run.lock").exists() and is_held(run_dir) is None

    second = run_cli(tmp_path, "second", *run_args(job, sim, state, "--resume"))
    assert second.proc.returncode == 0, second.text()
    assert any(e["event"] == "run.resumed" for e in second.events())
    done = summary(run_dir)
    assert done["counts"]["planned"] == 0

    # the killed process's requests count too: its counters were journalled as it went
    # (lost at most: those in flight and the last 50 ms's, COUNTERS_S)
    served = sim.call(lambda: dict(sim.sim.counters.requests))
    assert done["processes"] == 2
    missing = sum(served.values()) - done["requests"]["total"]
    print(f"simulator {sum(served.values())}, summary {done['requests']['total']}")
    assert 0 <= missing <= CONCURRENCY + 10, (served, done["requests"])
    assert done["requests"]["list"] == served["list"], "the plan's reads, all journalled"


def test_the_lock_lives_on_an_open_file_and_a_probe_never_drops_it(tmp_path: Path) -> None:
    run_dir = tmp_path / "r1"
    run_dir.mkdir()
    assert is_held(run_dir) is None and not (run_dir / "run.lock").exists(), "creates nothing"
    lock = RunLock.acquire(run_dir, run_id="r1", command="bulk-tagger run --resume")
    for _ in range(2):  # the probe opens and closes the file: the holder keeps its lock
        holder = is_held(run_dir)
        assert holder is not None and holder.pid == os.getpid()
        assert holder.command == "bulk-tagger run --resume"
    with pytest.raises(RunHeld, match=rf"run r1 is locked: .*pid {os.getpid()} on "):
        RunLock.acquire(run_dir, run_id="r1")
    assert (run_dir / "run.lock").stat().st_mode & 0o777 == 0o600
    lock.release()
    assert is_held(run_dir) is None
    RunLock.acquire(run_dir, run_id="r1").release()


def test_a_refused_process_reading_before_the_holder_wrote_still_names_it(
    tmp_path: Path,
) -> None:
    """The holder takes the lock, then writes who it is: a process refused in between found
    the file empty and said "a process" (a flaky failure of the two-resumes test). It now
    reads again for a moment."""

    run_dir = tmp_path / "r1"
    run_dir.mkdir()
    path = run_dir / "run.lock"
    with path.open("wb") as fh:  # the holder, between its flock and its write
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        writer = threading.Timer(0.05, lambda: path.write_bytes(
            b'{"pid": 4242, "host": "node-7", "since": "2026-11-30T16:00:00Z",'
            b' "command": "bulk-tagger run"}'))
        writer.start()
        with pytest.raises(RunHeld, match=r"pid 4242 on node-7 since 2026-11-30T16:00:00Z"):
            RunLock.acquire(run_dir, run_id="r1")
        writer.join()
        holder = is_held(run_dir)
        assert holder is not None and holder.pid == 4242
