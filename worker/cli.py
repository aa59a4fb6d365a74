"""The command line: parse, wire the stages, map errors to exit codes. No logic lives here.

Exit codes (CONTRACT.md): 0 all done; 1 some targets failed; 2 bad input (nothing sent);
3 safety limit (nothing changed); 4 credentials refused; 75 interrupted or API unreachable.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import re
import stat
import sys
from collections.abc import Callable, Coroutine
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import click

from worker import defaults
from worker.errors import BulkTaggerError, ExitCode, JobError

F = TypeVar("F", bound=Callable[..., Any])

def _common(fn: F) -> F:
    """Options every command takes."""
    options = [
        click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path),
                     envvar="BULK_TAGGER_STATE_DIR", default=Path("runs"), show_default=True,
                     help="Where run folders live."),
        click.option("--log-format", type=click.Choice(["json", "console"]), default=None,
                     help="Log format on stderr (default: json unless stderr is a terminal)."),
        click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
                     default="info", show_default=True),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _api(fn: F) -> F:
    """Options of commands that talk to the API."""
    options = [
        click.option("--api-key-file", type=click.Path(dir_okay=False, path_type=Path),
                     help="File holding the API key (else env GCORE_API_KEY)."),
        click.option("--base-url", envvar="GCORE_BASE_URL", default=None,
                     help="API base URL (default https://api.gcore.com)."),
        click.option("--ca-bundle", type=click.Path(dir_okay=False, exists=True),
                     help="Extra CA certificates (PEM) to trust."),
        click.option("--allow-insecure-http", is_flag=True,
                     help="Allow plain http to a host other than loopback."),
        click.option("--concurrency", type=click.IntRange(1, defaults.MAX_CONCURRENCY),
                     default=None,
                     help="Requests in flight at most (overrides the job's option)."),
        click.option("--rate", type=click.FloatRange(min=0, min_open=True), default=None,
                     help="Requests per second at most, all kinds together."),
        click.option("--grace-seconds", type=click.FloatRange(min=0), default=defaults.GRACE_S,
                     show_default=True, help="On SIGTERM, how long in-flight work may finish."),
        click.option("--pushgateway", envvar="BULK_TAGGER_PUSHGATEWAY", default=None,
                     help="Prometheus Pushgateway URL for the run's metrics."),
        click.option("--resume", is_flag=True,
                     help="Continue the latest unfinished run of this job (or --run-id's)."),
        click.option("--resume-within", default=f"{defaults.RESUME_WITHIN_HOURS}h",
                     show_default=True,
                     help="How old an unfinished run --resume may continue (e.g. 90m, 24h)."),
        click.option("--run-id", default=None, help="Name the run (or the run to resume)."),
        # knobs for tests and benchmarks: how fast retries and task-lock polls go
        click.option("--retry-base-seconds", type=click.FloatRange(min=0, min_open=True),
                     default=defaults.RETRY_BASE_S, hidden=True),
        click.option("--retry-max-wait-seconds", type=click.FloatRange(min=0, min_open=True),
                     default=defaults.RETRY_MAX_WAIT_S, hidden=True),
        click.option("--lock-poll-seconds", type=click.FloatRange(min=0, min_open=True),
                     default=defaults.LOCK_POLL_S, hidden=True),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _job_options(fn: F) -> F:
    options = [
        click.option("--simulate", is_flag=True,
                     help="Start the local API in-process with demo images; no key needed."),
        click.option("--simulate-images", type=click.IntRange(0),
                     default=defaults.SIMULATE_IMAGES, show_default=True,
                     help="How many demo images --simulate serves."),
        click.option("--shard", default=None,
                     help="I/N: take shard I of N (else JOB_COMPLETION_INDEX and "
                          "BULK_TAGGER_SHARDS)."),
        click.option("--max-changes", type=click.IntRange(0), default=None,
                     help="Stop before any PATCH if the plan changes more images."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _duration(text: str) -> timedelta:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not match:
        raise JobError(f"not a duration: {text!r}", field="--resume-within", hint="e.g. 90m, 24h")
    value, unit = float(match.group(1)), match.group(2) or "s"
    return timedelta(seconds=value * {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit])


def _read_key(api_key_file: Path | None, *, required: bool) -> str:
    from worker.log import get_logger, redact

    key = ""
    if api_key_file is not None:
        try:
            mode = api_key_file.stat().st_mode
            key = api_key_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise JobError(f"cannot read the API key file: {exc.strerror}",
                           file=str(api_key_file), field="--api-key-file") from None
        if mode & stat.S_IROTH:
            get_logger("bulk_tagger.cli").warning(
                "cli.key_file_world_readable", file=str(api_key_file),
                hint="chmod 600 it: anyone on this machine can read the key")
    else:
        key = os.environ.get("GCORE_API_KEY", "").strip()
    if not key and required:
        raise JobError("no API key", field="GCORE_API_KEY",
                       hint="set GCORE_API_KEY, pass --api-key-file, or use --simulate")
    redact(key)
    return key


def _shard(text: str | None) -> Any:
    from worker.selectors import Shard

    if text:
        return Shard.parse(text)
    index, count = os.environ.get("JOB_COMPLETION_INDEX"), os.environ.get("BULK_TAGGER_SHARDS")
    if index is not None and count is not None:
        return Shard.parse(f"{index}/{count}")
    return None


def _settings(kw: dict[str, Any], *, simulate: bool = False) -> Any:
    from worker import api
    from worker.runner import RunSettings

    key = _read_key(kw["api_key_file"], required=not simulate)
    base_url = kw["base_url"] or api.DEFAULT_BASE_URL
    api_settings = api.Settings(
        base_url=base_url, api_key=key, ca_bundle=kw["ca_bundle"],
        allow_insecure_http=kw["allow_insecure_http"],
    )
    if not simulate:
        api.check_base_url(base_url, allow_insecure_http=kw["allow_insecure_http"])
    return RunSettings(
        state_dir=kw["state_dir"], api=api_settings, simulate=simulate,
        simulate_images=kw.get("simulate_images", defaults.SIMULATE_IMAGES),
        concurrency=kw["concurrency"],
        rate=kw["rate"], run_id=kw["run_id"], resume=kw["resume"],
        resume_within=_duration(kw["resume_within"]), shard=_shard(kw.get("shard")),
        max_changes=kw.get("max_changes"), grace_s=kw["grace_seconds"],
        pushgateway=kw["pushgateway"], retry_base_s=kw["retry_base_seconds"],
        retry_max_wait_s=kw["retry_max_wait_seconds"], lock_poll_s=kw["lock_poll_seconds"],
    )


def _setup_logs(kw: dict[str, Any]) -> None:
    from worker import log

    log.configure(kw["log_format"], level=kw["log_level"])


def _execute(kind: str, job_path: str | None, kw: dict[str, Any]) -> None:
    from worker import spec
    from worker.runner import Runner

    _setup_logs(kw)
    job = spec.load_job(job_path) if job_path else None
    if job is not None:
        spec.check_selector_files(job)
    settings = _settings(kw, simulate=kw.get("simulate", False))
    runner = Runner(settings, kind=kind, job=job, parent_run_id=kw.get("parent_run_id"))
    # what start-up made (modules, the job's models) lives as long as the process: full
    # collections need not scan it again (a 20,000-image run's GC time halved)
    gc.freeze()
    sys.exit(_run_loop(runner.execute()))


def _run_loop(main: Coroutine[Any, Any, int]) -> int:
    """``asyncio.run`` on uvloop where it is installed (``BULK_TAGGER_LOOP=asyncio``: the
    standard loop). uvloop's transports took about 3.5% off a run's CPU in paired runs."""
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if os.environ.get("BULK_TAGGER_LOOP", "uvloop") != "asyncio":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="bulk-tagger")
def cli() -> None:
    """bulk-tagger: change the tags and settings of very many Gcore Cloud VM images."""


@cli.command()
@click.argument("job", type=click.Path(dir_okay=False))
@_common
def validate(job: str, **kw: Any) -> None:
    """Parse and check JOB and its selector files; nothing is sent."""
    from worker import spec

    _setup_logs(kw)
    loaded = spec.load_job(job)
    rows = spec.check_selector_files(loaded)
    click.echo(f"{job}: valid ({len(loaded.targets)} selectors, {sum(rows.values())} file rows)")


@cli.command()
@click.argument("job", type=click.Path(dir_okay=False))
@_common
@_api
@_job_options
def plan(job: str, **kw: Any) -> None:
    """Read-only: expand JOB's targets, read their state, show the diff and counts."""
    kw["resume"] = False
    _execute("plan", job, kw)


@cli.command()
@click.argument("job", type=click.Path(dir_okay=False))
@_common
@_api
@_job_options
def run(job: str, **kw: Any) -> None:
    """Plan JOB, then apply it; writes the run's report."""
    _execute("run", job, kw)


@cli.command()
@click.argument("undone", metavar="RUN_ID")  # not "run_id": --run-id names the undo itself
@_common
@_api
def undo(undone: str, **kw: Any) -> None:
    """Revert exactly what RUN_ID changed, where nobody changed it since."""
    from worker.journal import read_run_info

    info = read_run_info(kw["state_dir"] / undone)
    if not info or info.get("kind") != "run":
        raise JobError(f"no run {undone!r} in {kw['state_dir']}", field="RUN_ID",
                       hint="`ls` the state dir; undo takes the id of a `run`")
    kw["parent_run_id"] = undone
    kw["shard"] = None
    _execute("undo", None, kw)


@cli.command()
@click.argument("run_id")
@click.option("--format", "fmt", type=click.Choice(["summary", "jsonl", "csv", "json"]),
              default="summary", show_default=True)
@click.option("--export", is_flag=True, help="Write results.jsonl/csv and summary.json anew.")
@_common
def report(run_id: str, fmt: str, export: bool, **kw: Any) -> None:
    """Print or re-export RUN_ID's report (from its journal)."""
    from worker import exports
    from worker import report as rep
    from worker.journal import Journal, read_run_info
    from worker.models import RESULT_FIELDS

    _setup_logs(kw)
    run_dir = kw["state_dir"] / run_id
    if not read_run_info(run_dir):
        raise JobError(f"no run {run_id!r} in {kw['state_dir']}", field="RUN_ID")
    journal = Journal(run_dir)
    try:
        info = journal.run_info()
        summary = info.get("summary") or {"run_id": run_id, "job": info.get("job_name"),
                                          "counts": journal.counts(), "exit_code": None}
        if export:
            exports.write_exports(run_dir, journal.iter_results(run_id, raw=True), summary)
        if fmt == "summary":
            click.echo(rep.format_summary(summary))
        elif fmt == "json":
            click.echo(json.dumps(summary, indent=2))
        else:
            if fmt == "csv":
                sys.stdout.write(",".join(RESULT_FIELDS) + "\r\n")
            which = 0 if fmt == "jsonl" else 1
            for row in journal.iter_results(run_id, raw=True):
                sys.stdout.write(exports.export_lines(row)[which])
    finally:
        journal.close()


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8080, show_default=True)
@click.option("--images", type=click.IntRange(0), default=defaults.SIMULATE_IMAGES,
              show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--api-key", default=None, help="Accept only this key (default: any key).")
@click.option("--page-max", type=click.IntRange(1), default=1000, show_default=True)
@click.option("--rate-limit", type=float, default=None, help="Server-side limit, requests/s.")
@click.option("--latency-ms", type=float, default=0.0)
@click.option("--latency-jitter-ms", type=float, default=0.0)
@click.option("--p-429", type=float, default=0.0)
@click.option("--p-5xx", type=float, default=0.0)
@click.option("--p-drop-before", type=float, default=0.0)
@click.option("--p-drop-after", type=float, default=0.0)
@click.option("--retry-after", type=click.Choice(["seconds", "date", "ms"]), default="seconds")
@click.option("--log-format", type=click.Choice(["json", "console"]), default=None)
def simulate(**kw: Any) -> None:
    """Serve the local Gcore images API (any API key is accepted unless --api-key is given)."""
    from worker import log
    from worker.simulator import Faults, SimConfig, serve

    log.configure(kw.pop("log_format"), level="info")
    log.redact(kw["api_key"])
    try:
        faults = Faults(
            seed=kw["seed"], rate_limit=kw["rate_limit"], latency_ms=kw["latency_ms"],
            latency_jitter_ms=kw["latency_jitter_ms"], p_429=kw["p_429"], p_5xx=kw["p_5xx"],
            p_drop_before=kw["p_drop_before"], p_drop_after=kw["p_drop_after"],
            retry_after=kw["retry_after"],
        )
    except ValueError as exc:
        raise JobError(str(exc), field="simulate options") from None
    serve(
        SimConfig(images=kw["images"], seed=kw["seed"], api_key=kw["api_key"],
                  page_max=kw["page_max"], faults=faults),
        host=kw["host"], port=kw["port"],
    )


def main(argv: list[str] | None = None) -> None:
    try:
        cli.main(args=argv, standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(ExitCode.ABORTED)
    except click.ClickException as exc:
        exc.show()
        sys.exit(ExitCode.BAD_INPUT)
    except BulkTaggerError as exc:
        from worker.log import scrub

        click.echo(f"error: {scrub(str(exc))}", err=True)
        sys.exit(exc.exit_code)
    except Exception as exc:
        if os.environ.get("BULK_TAGGER_DEBUG"):
            raise
        from worker.log import scrub

        click.echo(
            f"internal error: {type(exc).__name__}: {scrub(str(exc))} "
            "(set BULK_TAGGER_DEBUG=1 for the traceback, and please report it)",
            err=True,
        )
        sys.exit(ExitCode.INTERNAL)


