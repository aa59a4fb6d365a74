"""The command line: parse, wire the stages, map errors to exit codes. No logic lives here.

Each command takes typed parameters; the options a command shares with others come as one
frozen group (``LogOptions``, ``ApiOptions``, ``ApplyOptions``, ``JobOptions``), and a command
has only the groups that apply to it. Exit codes: ``worker.errors.ExitCode`` (README, "Exit
codes").
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import gc
import os
import re
import stat
import sys
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast

import click

from worker import defaults, units
from worker.errors import BulkTaggerError, ExitCode, JobError
from worker.models import STATUSES

if TYPE_CHECKING:
    from worker.report import ReportFormat
    from worker.runsettings import RunSettings
    from worker.selectors import Shard

F = TypeVar("F", bound=Callable[..., Any])


def _group(cls: type[Any], name: str, options: list[Callable[[Any], Any]]) -> Callable[[F], F]:
    """A decorator: adds ``options`` to a command and hands the command one ``cls`` made of
    their values, as its parameter ``name`` (the option's names are ``cls``'s fields)."""
    fields = [f.name for f in dataclasses.fields(cls)]

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(**kw: Any) -> Any:
            kw[name] = cls(**{field: kw.pop(field) for field in fields})
            return fn(**kw)

        command: Any = wrapper
        for option in reversed(options):
            command = option(command)
        return cast(F, command)

    return decorate


@dataclass(frozen=True, slots=True)
class LogOptions:
    log_format: str | None
    log_level: str

    def configure(self) -> None:
        from worker import log

        log.configure(self.log_format, level=self.log_level)


@dataclass(frozen=True, slots=True)
class ApiOptions:
    """Options of the commands that talk to the API (plan, run, undo)."""

    api_key_file: Path | None
    base_url: str | None
    ca_bundle: str | None
    allow_insecure_http: bool
    concurrency: int | None
    rate: float | None
    pushgateway: str | None
    run_id: str | None
    retry_base_seconds: float
    retry_max_wait_seconds: float
    progress_seconds: float


@dataclass(frozen=True, slots=True)
class ApplyOptions:
    """Options of the commands that change images (run, undo)."""

    grace_seconds: float
    resume: bool
    resume_within: str
    keep_days: float
    lock_poll_seconds: float


@dataclass(frozen=True, slots=True)
class JobOptions:
    """Options of the commands that read a job file and its targets (plan, run)."""

    simulate: bool
    simulate_images: int
    shard: str | None
    max_changes: int | None
    max_changes_percent: float | None
    require_matches: bool


_STATE_DIR = click.option(
    "--state-dir", type=click.Path(file_okay=False, path_type=Path),
    envvar="BULK_TAGGER_STATE_DIR", default=Path(defaults.STATE_DIR), show_default=True,
    help="Where run folders live.")

_logs = _group(LogOptions, "logs", [
    click.option("--log-format", type=click.Choice(["json", "console"]), default=None,
                 help="Log format on stderr (default: json unless stderr is a terminal)."),
    click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
                 default="info", show_default=True),
])

_api = _group(ApiOptions, "api_opts", [
    click.option("--api-key-file", type=click.Path(dir_okay=False, path_type=Path),
                 help="File holding the API key (else env GCORE_API_KEY)."),
    click.option("--base-url", envvar="GCORE_BASE_URL", default=None,
                 help="API base URL (default https://api.gcore.com)."),
    click.option("--ca-bundle", type=click.Path(dir_okay=False, exists=True),
                 help="Extra CA certificates (PEM) to trust."),
    click.option("--allow-insecure-http", is_flag=True,
                 help="Allow plain http to a host other than loopback."),
    click.option("--concurrency", type=click.IntRange(1, defaults.MAX_CONCURRENCY),
                 default=None, help="Requests in flight at most (overrides the job's option)."),
    click.option("--rate", type=click.FloatRange(min=0, min_open=True), default=None,
                 help="Requests per second at most, all kinds together (overrides the "
                      "job's rate_per_second; shards split it)."),
    click.option("--pushgateway", envvar="BULK_TAGGER_PUSHGATEWAY", default=None,
                 help="Prometheus Pushgateway URL for the run's metrics."),
    click.option("--run-id", default=None, help="Name the run (or the run to resume)."),
    # knobs for tests and benchmarks: how fast retries go
    click.option("--retry-base-seconds", type=click.FloatRange(min=0, min_open=True),
                 default=defaults.RETRY_BASE_S, hidden=True),
    click.option("--retry-max-wait-seconds", type=click.FloatRange(min=0, min_open=True),
                 default=defaults.RETRY_MAX_WAIT_S, hidden=True),
    # and how often a progress line is logged where there is no terminal
    click.option("--progress-seconds", type=click.FloatRange(min=0, min_open=True),
                 default=defaults.PROGRESS_S, hidden=True),
])

_apply = _group(ApplyOptions, "apply", [
    click.option("--grace-seconds", type=click.FloatRange(min=0), default=defaults.GRACE_S,
                 show_default=True, help="On SIGTERM, how long in-flight work may finish."),
    click.option("--resume", is_flag=True,
                 help="Continue the latest unfinished run of this job (or --run-id's)."),
    click.option("--resume-within", default=f"{defaults.RESUME_WITHIN_HOURS}h",
                 show_default=True,
                 help="How old an unfinished run --resume may continue (e.g. 90m, 24h)."),
    click.option("--keep-days", type=click.FloatRange(min=0), envvar="BULK_TAGGER_KEEP_DAYS",
                 default=defaults.KEEP_DAYS, show_default=True,
                 help="First delete finished runs older than this many days (0 keeps all)."),
    # a knob for tests and benchmarks: how fast task-lock polls go
    click.option("--lock-poll-seconds", type=click.FloatRange(min=0, min_open=True),
                 default=defaults.LOCK_POLL_S, hidden=True),
])

_job = _group(JobOptions, "job_opts", [
    click.option("--simulate", is_flag=True,
                 help="Start the local API in-process with demo images; no key needed."),
    click.option("--simulate-images", type=click.IntRange(0), default=defaults.SIMULATE_IMAGES,
                 show_default=True, help="How many demo images --simulate serves."),
    click.option("--shard", default=None,
                 help="I/N: take shard I of N (else JOB_COMPLETION_INDEX and "
                      "BULK_TAGGER_SHARDS)."),
    click.option("--max-changes", type=click.IntRange(0), default=None,
                 help="Stop before any PATCH if the plan changes more images."),
    click.option("--max-changes-percent", type=click.FloatRange(0, 100, min_open=True),
                 default=None, help="... or more than this share of the matched images."),
    click.option("--require-matches", is_flag=True,
                 help="A selector that matches no image stops the run (exit 3)."),
])


def _duration(text: str, field: str = "--resume-within") -> timedelta:
    """A duration as the job file's ages are written (90m, 24h, 30d, 2w), or fractional
    (1.5h), or bare seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text)
    if not match:
        raise JobError(f"not a duration: {text!r}", field=field, hint="e.g. 90m, 24h, 30d, 2w")
    value, unit = float(match.group(1)), match.group(2) or "s"
    return timedelta(seconds=value * units.SECONDS_PER_UNIT[unit])


def _read_key(api_key_file: Path | None, *, required: bool) -> str:
    from worker.log import get_logger, redact
    from worker.safety import read_small_file

    key = ""
    if api_key_file is not None:
        raw = read_small_file(api_key_file, field="--api-key-file", limit=64 * 1024)
        key = raw.decode("utf-8", "replace").strip()
        mode = api_key_file.stat().st_mode
        if mode & stat.S_IROTH:
            get_logger("bulk_tagger.cli").warning(
                "cli.key_file_world_readable", file=str(api_key_file),
                hint="chmod 600 it: anyone on this machine can read the key")
    else:
        key = os.environ.get("GCORE_API_KEY", "").strip()
    redact(key)
    if not key and required:
        raise JobError("no API key", field="GCORE_API_KEY",
                       hint="set GCORE_API_KEY, pass --api-key-file, or use --simulate")
    if any(not ch.isprintable() or ch.isspace() for ch in key):
        raise JobError("the API key holds a space or a control character (a newline?)",
                       field="--api-key-file" if api_key_file is not None else "GCORE_API_KEY",
                       hint="the key is one line of printable characters")
    return key


def _shard(text: str | None) -> Shard | None:
    from worker.selectors import Shard

    if text:
        return Shard.parse(text)
    index, count = os.environ.get("JOB_COMPLETION_INDEX"), os.environ.get("BULK_TAGGER_SHARDS")
    if index is not None and count is not None:
        return Shard.parse(f"{index}/{count}")
    if index is not None or count is not None:  # one without the other: every pod runs all
        given, missing = (("JOB_COMPLETION_INDEX", "BULK_TAGGER_SHARDS") if index is not None
                          else ("BULK_TAGGER_SHARDS", "JOB_COMPLETION_INDEX"))
        raise JobError(f"{given} is set but {missing} is not", field=missing,
                       hint="set both (an Indexed Job sets JOB_COMPLETION_INDEX; the manifest "
                       "sets BULK_TAGGER_SHARDS), or neither, or pass --shard I/N")
    return None


def _settings(
    state_dir: Path, api_opts: ApiOptions, apply: ApplyOptions | None, job_opts: JobOptions | None
) -> RunSettings:
    from worker import api
    from worker.runsettings import RunSettings

    simulate = job_opts is not None and job_opts.simulate
    key = _read_key(api_opts.api_key_file, required=not simulate)
    base_url = api_opts.base_url or api.DEFAULT_BASE_URL
    api_settings = api.Settings(
        base_url=base_url, api_key=key, ca_bundle=api_opts.ca_bundle,
        allow_insecure_http=api_opts.allow_insecure_http,
    )
    if not simulate:
        api.check_base_url(base_url, allow_insecure_http=api_opts.allow_insecure_http)
    settings = RunSettings(
        state_dir=state_dir, api=api_settings, simulate=simulate,
        concurrency=api_opts.concurrency, rate=api_opts.rate, run_id=api_opts.run_id,
        pushgateway=api_opts.pushgateway, retry_base_s=api_opts.retry_base_seconds,
        retry_max_wait_s=api_opts.retry_max_wait_seconds,
        progress_s=api_opts.progress_seconds,
    )
    if apply is not None:
        settings.resume = apply.resume
        settings.resume_within = _duration(apply.resume_within)
        settings.grace_s = apply.grace_seconds
        settings.lock_poll_s = apply.lock_poll_seconds
        settings.keep_days = apply.keep_days
    if job_opts is not None:
        settings.simulate_images = job_opts.simulate_images
        settings.shard = _shard(job_opts.shard)
        settings.max_changes = job_opts.max_changes
        settings.max_changes_percent = job_opts.max_changes_percent
        settings.require_matches = job_opts.require_matches
    return settings


def _execute(kind: str, job_path: str | None, settings: Callable[[], RunSettings],
             parent_run_id: str | None = None) -> None:
    from worker import spec
    from worker.runner import Runner

    made = settings()  # reads the key first: it is redacted before any job file is read
    job = spec.load_job(job_path) if job_path else None
    if job is not None:
        spec.check_selector_files(job)
    runner = Runner(made, kind=kind, job=job, parent_run_id=parent_run_id)
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
@_logs
def validate(job: str, *, logs: LogOptions) -> None:
    """Parse and check JOB and its selector files; nothing is sent."""
    from worker import spec
    from worker.log import redact

    logs.configure()
    redact(os.environ.get("GCORE_API_KEY", "").strip())  # should a file echo it
    try:
        loaded = spec.load_job(job)
        rows = spec.check_selector_files(loaded, every=True)
        from worker.selectors import check_rows_agree

        check_rows_agree(loaded)  # one image in rows that contradict each other
    except JobError as exc:  # every mistake found, one a line (the first few hundred)
        from worker.log import scrub

        for one in (exc, *exc.more):
            click.echo(f"error: {scrub(str(one))}", err=True)
        if exc.unlisted:
            click.echo(f"error: ... and {exc.unlisted:,} more mistakes", err=True)
        sys.exit(ExitCode.BAD_INPUT)
    click.echo(f"{job}: valid ({len(loaded.targets)} selectors, {sum(rows.values())} file rows)")


@cli.command()
def schema() -> None:
    """Print the JSON Schema of the job file (for editors; docs/job-file.md)."""
    import json

    from worker.spec import job_schema

    click.echo(json.dumps(job_schema(), indent=2))


@cli.command()
@click.argument("job", type=click.Path(dir_okay=False))
@_STATE_DIR
@_logs
@_api
@_job
def plan(
    job: str, *, state_dir: Path, logs: LogOptions, api_opts: ApiOptions, job_opts: JobOptions
) -> None:
    """Read-only: expand JOB's targets, read their state, show the diff and counts."""
    logs.configure()
    _execute("plan", job, lambda: _settings(state_dir, api_opts, None, job_opts))


@cli.command()
@click.argument("job", type=click.Path(dir_okay=False), required=False)
@click.option("--plan", "plan_run_id", default=None, metavar="PLAN_RUN_ID",
              help="Apply exactly this earlier plan run's changes (JOB must be the file it "
                   "was made from; none for an undo's preview).")
@click.option("--plan-max-age", default=f"{defaults.PLAN_MAX_AGE_HOURS}h", show_default=True,
              help="How old a plan --plan may apply (e.g. 90m, 24h).")
@_STATE_DIR
@_logs
@_api
@_apply
@_job
def run(
    job: str | None, *, plan_run_id: str | None, plan_max_age: str, state_dir: Path,
    logs: LogOptions, api_opts: ApiOptions, apply: ApplyOptions, job_opts: JobOptions,
) -> None:
    """Plan JOB, then apply it; or apply a reviewed plan (--plan). Writes the run's report."""
    from worker.journal import read_run_info
    from worker.safety import run_dir

    logs.configure()
    kind, undone = "run", None
    if plan_run_id is None:
        if job is None:
            raise JobError("no job file", field="JOB",
                           hint="bulk-tagger run JOB, or bulk-tagger run [JOB] --plan PLAN_RUN_ID")
    else:
        undone = read_run_info(run_dir(state_dir, plan_run_id, field="--plan")).get(
            "parent_run_id") or None
        kind = "undo" if undone else "run"  # an undo's preview, applied, is that undo
    max_age = _duration(plan_max_age, field="--plan-max-age")

    def settings() -> RunSettings:
        made = _settings(state_dir, api_opts, apply, job_opts)
        made.plan_run_id, made.plan_max_age = plan_run_id, max_age
        return made

    _execute(kind, job, settings, parent_run_id=undone)


@cli.command()
@click.argument("undone", metavar="RUN_ID")  # not "run_id": --run-id names the undo itself
@click.option("--plan", "preview", is_flag=True,
              help="Preview: plan the undo and show its diff; nothing is sent "
                   "(run --plan applies that plan).")
@click.option("--max-changes", type=click.IntRange(0), default=None,
              help="Stop before any PATCH if the undo changes more images.")
@click.option("--max-changes-percent", type=click.FloatRange(0, 100, min_open=True),
              default=None, help="... or more than this share of the run's updated images.")
@_STATE_DIR
@_logs
@_api
@_apply
def undo(
    undone: str, *, preview: bool, max_changes: int | None, max_changes_percent: float | None,
    state_dir: Path, logs: LogOptions, api_opts: ApiOptions, apply: ApplyOptions
) -> None:
    """Revert exactly what RUN_ID (an id, or the run's folder) changed, where nobody changed
    it since."""
    from worker import nextstep
    from worker.retention import find_undo, locate_run

    logs.configure()
    state_dir, undone, info = locate_run(state_dir, undone)
    if info.get("kind") != "run":
        raise JobError(f"{undone} is a {info.get('kind')}, not a run: there is nothing to undo",
                       field="RUN_ID", hint="undo takes the id of a `run`")
    done = find_undo(state_dir, undone)
    if done is not None and done[1] == 0:
        shows = nextstep.command("report", done[0], state_dir=state_dir)
        raise JobError(f"run {undone} was undone already, by {done[0]}: nothing was sent",
                       field="RUN_ID", hint=f"`{shows}` shows what it did")
    if done is not None:  # it ended with failures: this undo takes up what is left
        click.echo(f"note: run {undone} was undone before, by {done[0]}, with failures; "
                   "undoing what is still as the run left it", err=True)

    def settings() -> RunSettings:
        made = _settings(state_dir, api_opts, apply, None)
        made.preview, made.max_changes = preview, max_changes
        made.max_changes_percent = max_changes_percent
        return made

    _execute("undo", None, settings, parent_run_id=undone)


@cli.command()
@click.argument("run_id")
@click.option("--format", "fmt",
              type=click.Choice(["summary", "jsonl", "csv", "json", "html"]),
              default="summary", show_default=True)
@click.option("--export", is_flag=True,
              help="Write the plain results.jsonl and results.csv (and summary.json) anew.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the report to this file instead of printing it.")
@click.option("--status", "statuses", multiple=True, type=click.Choice(STATUSES),
              help="--format jsonl or csv: only the targets that ended so (repeatable).")
@_STATE_DIR
@_logs
def report(
    run_id: str, *, fmt: ReportFormat | Literal["html"], export: bool, output: Path | None,
    statuses: tuple[str, ...], state_dir: Path, logs: LogOptions,
) -> None:
    """Print or export RUN_ID's report (an id, or the run's folder; a finished run's from its
    results.jsonl.gz); --format html: one page to look at in a browser."""
    from worker.report import print_report

    if statuses and fmt not in ("jsonl", "csv"):
        raise click.UsageError("--status picks results lines: use it with --format jsonl or csv")
    logs.configure()
    if fmt == "html":  # built whole first: a bad run id leaves no file behind
        from worker.html_report import build

        page = build(state_dir, run_id)
        if output is None:
            sys.stdout.write(page)
        else:
            output.write_text(page, encoding="utf-8")
        return
    if output is None:
        print_report(state_dir, run_id, fmt, export=export, out=sys.stdout, statuses=statuses)
        return
    with output.open("w", encoding="utf-8", newline="") as out:
        print_report(state_dir, run_id, fmt, export=export, out=out, statuses=statuses)


@cli.command()
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table",
              show_default=True)
@_STATE_DIR
@_logs
def runs(*, fmt: str, state_dir: Path, logs: LogOptions) -> None:
    """The runs in the state folder, newest first: one line each."""
    from worker import retention

    logs.configure()
    click.echo(retention.format_runs(retention.list_runs(state_dir), fmt, state_dir))


@cli.command()
@click.option("--older-than", default=None,
              help="Delete finished runs older than this (e.g. 30d, 12h; default: --keep-days).")
@click.option("--keep-last", type=click.IntRange(0), default=None,
              help="Keep the newest N finished runs whatever their age.")
@click.option("--keep-days", type=click.FloatRange(min=0), envvar="BULK_TAGGER_KEEP_DAYS",
              default=defaults.KEEP_DAYS, show_default=True, hidden=True)
@click.option("--dry-run", is_flag=True, help="Say what would be deleted; delete nothing.")
@_STATE_DIR
@_logs
def prune(
    *, older_than: str | None, keep_last: int | None, keep_days: float, dry_run: bool,
    state_dir: Path, logs: LogOptions,
) -> None:
    """Delete finished runs; never an unfinished one, one a live process holds, or one whose
    undo is unfinished."""
    from worker import retention

    logs.configure()
    age = _duration(older_than, field="--older-than") if older_than else None
    if age is None and keep_last is None and keep_days > 0:
        age = timedelta(days=keep_days)
    click.echo(retention.format_prune(
        retention.prune(state_dir, older_than=age, keep_last=keep_last, dry_run=dry_run),
        dry_run=dry_run))


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8080, show_default=True)
@click.option("--images", type=click.IntRange(0), default=defaults.SIMULATE_IMAGES,
              show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--api-key", default=None, help="Accept only this key (default: any key).")
@click.option("--page-max", type=click.IntRange(1), default=defaults.PAGE_SIZE,
              show_default=True)
@click.option("--rate-limit", type=float, default=None, help="Server-side limit, requests/s.")
@click.option("--latency-ms", type=float, default=0.0)
@click.option("--latency-jitter-ms", type=float, default=0.0)
@click.option("--p-429", type=float, default=0.0)
@click.option("--p-5xx", type=float, default=0.0)
@click.option("--p-drop-before", type=float, default=0.0)
@click.option("--p-drop-after", type=float, default=0.0)
@click.option("--retry-after", type=click.Choice(["seconds", "date", "ms"]), default="seconds")
@click.option("--log-format", type=click.Choice(["json", "console"]), default=None)
def simulate(
    *,
    host: str, port: int, images: int, seed: int, api_key: str | None, page_max: int,
    rate_limit: float | None, latency_ms: float, latency_jitter_ms: float, p_429: float,
    p_5xx: float, p_drop_before: float, p_drop_after: float, retry_after: str,
    log_format: str | None,
) -> None:
    """Serve the local Gcore images API (any API key is accepted unless --api-key is given)."""
    from worker import log
    from worker.simulator import Faults, SimConfig, serve

    log.configure(log_format, level="info")
    log.redact(api_key)
    try:
        faults = Faults(
            seed=seed, rate_limit=rate_limit, latency_ms=latency_ms,
            latency_jitter_ms=latency_jitter_ms, p_429=p_429, p_5xx=p_5xx,
            p_drop_before=p_drop_before, p_drop_after=p_drop_after, retry_after=retry_after,
        )
    except ValueError as exc:
        raise JobError(str(exc), field="simulate options") from None
    serve(SimConfig(images=images, seed=seed, api_key=api_key, page_max=page_max, faults=faults),
          host=host, port=port)


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
        from worker.safety import printable

        click.echo(f"error: {printable(scrub(str(exc)))}", err=True)
        sys.exit(exc.exit_code)
    except Exception as exc:
        if os.environ.get("BULK_TAGGER_DEBUG"):
            raise
        from worker.log import scrub
        from worker.safety import operator_mistake, printable

        mistake = operator_mistake(exc)
        if mistake is not None:  # a path that cannot be used: the operator's to fix
            click.echo(f"error: {printable(scrub(mistake))}", err=True)
            sys.exit(ExitCode.BAD_INPUT)

        click.echo(
            f"internal error: {type(exc).__name__}: {scrub(str(exc))} "
            "(set BULK_TAGGER_DEBUG=1 for the traceback, and please report it)",
            err=True,
        )
        sys.exit(ExitCode.INTERNAL)


