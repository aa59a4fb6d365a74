"""The API key is in no byte a command writes: stdout, stderr (JSON and console logs, at debug
level), the journal and its -wal/-shm files, the staging file, results.jsonl.gz (decompressed
too), the plain results.jsonl/csv of ``report --export``, summary.json.

A canary key is handed over as a mounted secret (``--api-key-file``) and through
``GCORE_API_KEY``, to a simulator that accepts that key alone, so a successful run proves the
key was used; a wrong key ends with exit 4 and is not written anywhere either. Faults are on
(5xx, 429, a missing image) so that retry, failure and error paths log too.
"""

from __future__ import annotations

import gzip
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from worker.simulator import Faults, SimConfig, SimulatorThread

CANARY = f"canary-KEY-7f3a9c{secrets.token_hex(8)}"
WRONG = f"canary-WRONG-KEY-{secrets.token_hex(8)}"

JOB = {
    "name": "secret-test",
    "targets": [
        {"query": {"projects": [1337], "regions": [7, 76], "visibility": "private"}},
        {"file": "rows.csv"},
    ],
    "changes": {"set_tags": {"managed-by": "bulk-tagger"}, "remove_tags": ["legacy"]},
    "options": {"concurrency": 4, "retry_budget_seconds": 30},
}


@pytest.fixture
def sim() -> Iterator[SimulatorThread]:
    faults = Faults(seed=5, p_5xx=0.05, p_429=0.05, retry_after_s=0.0)
    with SimulatorThread(SimConfig(images=200, api_key=CANARY, faults=faults)) as thread:
        yield thread


def write_job(folder: Path, rows: int = 3) -> Path:
    lines = ["project_id,region_id,image_id,tag:owner"]
    lines += [f"1338,7,00000000-0000-4000-8000-{i:012x},someone" for i in range(rows)]
    (folder / "rows.csv").write_text("\n".join(lines) + "\n")
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(JOB, sort_keys=False))
    return path


def bulk_tagger(folder: Path, name: str, *args: str | Path, key_env: str | None = None,
                wait: bool = True) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GCORE_", "BULK_TAGGER_"))}
    if key_env is not None:
        env["GCORE_API_KEY"] = key_env
    with (folder / f"{name}.out").open("wb") as out, (folder / f"{name}.err").open("wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "worker", *map(str, args)],
                                stdout=out, stderr=err, env=env)
    if wait:
        proc.wait(120)
    return proc


def every_byte_written(folder: Path) -> dict[Path, bytes]:
    """Every file under ``folder`` but the inputs the test wrote (the key file, the job)."""
    inputs = {"key", "key-open", "job.yaml", "rows.csv"}  # the key file is the only one with it
    written = {p: p.read_bytes() for p in folder.rglob("*")
               if p.is_file() and p.name not in inputs}
    for path, data in list(written.items()):
        if path.suffix == ".gz":  # what is inside counts too: a key compressed is still there
            written[path.with_suffix(path.suffix + " (decompressed)")] = gzip.decompress(data)
    return written


def assert_absent(folder: Path, *keys: str) -> int:
    written = every_byte_written(folder)
    for path, data in written.items():
        for key in keys:
            assert key.encode() not in data, f"the key is in {path.relative_to(folder)}"
            # nor in a form an encoder might have produced
            assert key.encode("utf-16-le") not in data, path
    return len(written)


def key_file(folder: Path, name: str = "key", mode: int = 0o600) -> Path:
    path = folder / name
    path.write_text(CANARY + "\n")  # a mounted secret often ends with a newline
    os.chmod(path, mode)
    return path


def test_the_key_is_in_no_byte_written(tmp_path: Path, sim: SimulatorThread) -> None:
    job = write_job(tmp_path)
    state = tmp_path / "state"
    common = ["--base-url", sim.url, "--state-dir", state, "--log-level", "debug",
              "--retry-base-seconds", "0.01"]

    # a mounted secret, JSON logs
    first = bulk_tagger(tmp_path, "file-json", "run", job, *common, "--log-format", "json",
                        "--api-key-file", key_file(tmp_path))
    assert first.returncode == 1, (tmp_path / "file-json.err").read_text()[-3000:]  # 3 missing
    assert "world_readable" not in (tmp_path / "file-json.err").read_text()  # it is 0600
    counters = sim.call(sim.sim.counters.as_dict)
    assert counters["requests"]["patch"] > 20, "the key was accepted"
    assert counters["faults"]["5xx"] + counters["faults"]["429"] > 0, "error paths were taken"
    (run_dir,) = [p for p in state.iterdir() if p.is_dir()]
    for name in ("journal.sqlite", "results.jsonl.gz", "summary.json"):
        assert (run_dir / name).stat().st_size > 0
    # the plain exports, on request
    export = bulk_tagger(tmp_path, "export", "report", run_dir.name, "--state-dir", state,
                         "--export", "--log-level", "debug")
    assert export.returncode == 0, (tmp_path / "export.err").read_text()[-3000:]
    for name in ("results.jsonl", "results.csv"):
        assert (run_dir / name).stat().st_size > 0

    # the environment, console logs: an undo of that run
    undo = bulk_tagger(tmp_path, "undo", "undo", run_dir.name, *common, "--log-format",
                       "console", key_env=CANARY)
    assert undo.returncode == 0, (tmp_path / "undo.err").read_text()[-3000:]
    assert "run.finished" in (tmp_path / "undo.err").read_text()

    # a wrong key: refused at once, and written nowhere either
    wrong = bulk_tagger(tmp_path, "wrong", "run", job, *common, key_env=WRONG)
    assert wrong.returncode == 4, (tmp_path / "wrong.err").read_text()[-3000:]
    assert "run.auth_failed" in (tmp_path / "wrong.err").read_text()

    # no API at all: the probe's connection error (exception texts), exit 75
    quick = tmp_path / "quick"
    quick.mkdir()
    (quick / "rows.csv").write_text((tmp_path / "rows.csv").read_text())
    (quick / "job.yaml").write_text(yaml.safe_dump(
        {**JOB, "options": {"concurrency": 2, "retry_budget_seconds": 1}}, sort_keys=False))
    down = bulk_tagger(tmp_path, "down", "run", quick / "job.yaml", "--base-url",
                       "http://127.0.0.1:9", "--state-dir", state, "--log-level", "debug",
                       "--log-format", "console", "--retry-base-seconds", "0.05",
                       key_env=CANARY)
    assert down.returncode == 75, (tmp_path / "down.err").read_text()[-3000:]

    files = assert_absent(tmp_path, CANARY, WRONG)
    # two run folders (journal, results.jsonl.gz and what it holds, summary; a refused key and
    # no API end at the probe, before a run is made), the plain exports of one, and the five
    # commands' stdout/stderr
    assert len([p for p in state.iterdir() if p.is_dir()]) == 2
    assert files >= 2 * 4 + 2 + 5 * 2


def test_the_staging_file_of_a_killed_plan_holds_no_key(
    tmp_path: Path, sim: SimulatorThread
) -> None:
    job = write_job(tmp_path, rows=400)  # one GET a row: the plan lasts
    sim.call(sim.sim.set_faults, latency_ms=50.0, p_5xx=0.0, p_429=0.0)
    state = tmp_path / "state"
    proc = bulk_tagger(tmp_path, "killed", "run", job, "--base-url", sim.url, "--state-dir",
                       state, "--api-key-file", key_file(tmp_path), wait=False)
    deadline = time.monotonic() + 60
    while not list(state.glob("*/stage.sqlite")):
        assert proc.poll() is None, (tmp_path / "killed.err").read_text()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    (stage,) = state.glob("*/stage.sqlite")
    assert stage.stat().st_size > 0
    assert_absent(tmp_path, CANARY)


def test_a_world_readable_key_file_is_warned_about(tmp_path: Path, sim: SimulatorThread) -> None:
    job = write_job(tmp_path, rows=0)
    proc = bulk_tagger(tmp_path, "open", "run", job, "--base-url", sim.url, "--state-dir",
                       tmp_path / "state", "--log-format", "json",
                       "--api-key-file", key_file(tmp_path, "key-open", 0o644))
    assert proc.returncode == 0
    err = (tmp_path / "open.err").read_text()
    assert "cli.key_file_world_readable" in err and "chmod 600" in err
    assert_absent(tmp_path, CANARY)


def test_no_selector_file_prints_the_key(tmp_path: Path) -> None:
    """The key file itself, /proc/self/environ, and a CSV whose header holds the key, named as
    selector files: each is exit 2, and no command prints the key (nor its secret part)."""
    secret = CANARY[len("canary-KEY-"):]
    key = key_file(tmp_path)
    (tmp_path / "echo.csv").write_text(f"project_id,region_id,image_id,{CANARY}\n1,7,img-1\n")
    selectors = {"keyfile": str(key), "environ": "/proc/self/environ", "header": "echo.csv"}
    for name, selector in selectors.items():
        job = tmp_path / f"{name}.yaml"
        job.write_text(yaml.safe_dump({**JOB, "targets": [{"file": selector, "format": "csv"}]}))
        for command, extra in (("validate", {}), ("run", {"--api-key-file": key}),
                               ("plan", {})):
            args: list[str | Path] = [command, job]
            if command != "validate":
                args += ["--base-url", "http://127.0.0.1:9", "--state-dir", tmp_path / "state"]
            for option, value in extra.items():
                args += [option, value]
            out = f"{name}-{command}"
            proc = bulk_tagger(tmp_path, out, *args, key_env=CANARY)
            err = (tmp_path / f"{out}.err").read_text()
            assert proc.returncode == 2, (out, err)
            assert secret not in err + (tmp_path / f"{out}.out").read_text(), (out, err)
            if name == "environ":
                assert "under /proc, /sys or /dev" in err, err
            elif name == "header":
                assert "echo.csv:1" in err and "unknown column" in err, err
    (tmp_path / "echo.csv").unlink()  # the one input holding it, besides the key file
    assert_absent(tmp_path, CANARY)
    assert not (tmp_path / "state").exists()  # nothing was begun
