"""The report stage: the summary, latency percentiles and the plan's text.

The journal is the truth; this module turns it into what a person reads (``format_summary``,
``format_plan``) and summary.json's content (``build_summary``); the exports (results.jsonl.gz,
summary.json on disk) are in ``worker.exports``, the progress bar in
``worker.progress``, the Pushgateway metrics in ``worker.metrics``. It keeps no module-level
state and nothing here grows with the number of targets: latencies go into a fixed histogram.
Units: seconds unless a name says ``_ms``.
"""

from __future__ import annotations

import collections
import json
import math
import re
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TextIO

from worker import exports, safety, units
from worker.errors import ExitCode
from worker.journal import Journal
from worker.models import RESULT_FIELDS, STATUSES
from worker.nextstep import Seen, unfinished_fields
from worker.retention import locate_run
from worker.runlock import RunHeld, held_message, is_held

#: The request counters of summary.json (README, "Read a run's report from the volume"); the
#: first four are request kinds.
REQUEST_KINDS: tuple[str, ...] = ("list", "get", "patch", "task")
REQUEST_FIELDS: tuple[str, ...] = ("total", *REQUEST_KINDS, "retries", "rate_limited", "lock_waits")
#: the counters of summary.json's ``requests`` that are not a request kind (``total`` adds
#: the kinds up)
NOT_KINDS = frozenset(REQUEST_FIELDS) - frozenset(REQUEST_KINDS)
#: summary.json's ``latency_ms`` percentiles, and the quantile each is
PERCENTILES: dict[str, float] = {"p50": 0.50, "p95": 0.95, "p99": 0.99}

# --------------------------------------------------------------------------- latency

_BASE = 1.02  # bucket width 2%: the bucket's geometric middle is within 1% of any value in it
_LOG_BASE = math.log(_BASE)
_MIN_MS = 0.001  # 1 microsecond; smaller values share bucket 0
_BUCKETS = math.ceil(math.log(1e8 / _MIN_MS) / _LOG_BASE) + 1  # up to ~28 hours


class LatencyStats:
    """Latency percentiles in fixed memory: a log-bucketed histogram, about 1% precision.

    Percentiles are nearest-rank (the smallest value with at least q of the samples at or
    below it), reported as the middle of its bucket, clamped to the exact min and max seen.
    """

    __slots__ = ("_buckets", "count", "max_ms", "min_ms", "sum_ms")

    def __init__(self) -> None:
        self._buckets = [0] * _BUCKETS
        self.count = 0
        self.sum_ms = 0.0
        self.min_ms = math.inf
        self.max_ms = 0.0

    def add(self, ms: float) -> None:
        """Record one latency in milliseconds (negative counts as 0; NaN is ignored)."""
        if math.isnan(ms):
            return
        ms = max(float(ms), 0.0)
        index = 0
        if ms > _MIN_MS:
            index = min(int(math.log(ms / _MIN_MS) / _LOG_BASE), _BUCKETS - 1)
        self._buckets[index] += 1
        self.count += 1
        self.sum_ms += ms
        self.min_ms = min(ms, self.min_ms)
        self.max_ms = max(ms, self.max_ms)

    def merge(self, other: LatencyStats) -> None:
        """Add ``other``'s samples to these (e.g. one per worker, merged at the end)."""
        if not other.count:
            return
        self._buckets = [a + b for a, b in zip(self._buckets, other._buckets, strict=True)]
        self.count += other.count
        self.sum_ms += other.sum_ms
        self.min_ms = min(self.min_ms, other.min_ms)
        self.max_ms = max(self.max_ms, other.max_ms)

    def quantile(self, q: float) -> float:
        """The ``q`` quantile (0 < q <= 1) in milliseconds; 0.0 when there are no samples."""
        if not self.count:
            return 0.0
        rank = max(1, math.ceil(q * self.count))
        if rank >= self.count:  # the largest sample is known exactly
            return self.max_ms
        seen = 0
        for index, n in enumerate(self._buckets):
            seen += n
            if seen >= rank:
                middle = _MIN_MS * _BASE ** (index + 0.5) if index else 0.0
                return min(max(middle, self.min_ms), self.max_ms)
        return self.max_ms  # unreachable: the buckets hold every sample

    def count_at_most(self, ms: float) -> int:
        """How many samples are at or below ``ms`` milliseconds, to the buckets' 2%: the
        samples of the bucket holding ``ms`` count when ``ms`` is past its middle."""
        if ms >= self.max_ms:
            return self.count
        if ms < self.min_ms:
            return 0
        index = 0
        if ms > _MIN_MS:
            index = min(int(math.log(ms / _MIN_MS) / _LOG_BASE), _BUCKETS - 1)
        if not index or ms >= _MIN_MS * _BASE ** (index + 0.5):
            index += 1
        return sum(self._buckets[:index])

    def percentiles(self) -> dict[str, float]:
        """``PERCENTILES`` in milliseconds (3 decimals); 0.0 each when empty."""
        return {name: round(self.quantile(q), 3) for name, q in PERCENTILES.items()}


# --------------------------------------------------------------------------- summary


def _iso_utc(moment: datetime) -> str:
    if moment.tzinfo is None:  # naive times are taken as UTC, as the worker writes them
        moment = moment.replace(tzinfo=UTC)
    text = moment.astimezone(UTC).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")


def build_summary(
    *,
    run_id: str,
    job: str,
    started_at: datetime,
    finished_at: datetime,
    exit_code: int,
    counts: Mapping[str, int],
    requests: Mapping[str, int],
    latency: LatencyStats,
    extra: Mapping[str, Any] | None = None,
    earlier: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """summary.json's content (README, "Read a run's report from the volume"), ``extra``'s
    keys added last (they win).

    ``earlier``: the summary the run's earlier process left (this one resumed it). Its
    requests are added to these, its ``duration_s`` to this process's (``duration_s`` is the
    time the run's processes ran, gaps between them left out), its ``started_at`` kept, and
    ``processes`` counts them. Latency percentiles are this process's alone.

    ``counts`` has every status of models.STATUSES (0 where none), plus any other status it
    was given. ``requests`` has every field of REQUEST_FIELDS (0 where missing) plus any other
    kind given; ``total``, when not given, is the sum of the request kinds (every key but
    retries, rate_limited and lock_waits). ``rate_per_second`` counts the useful requests:
    those the API did not refuse with a 429, per second of the run.
    """
    duration = max((finished_at - started_at).total_seconds(), 0.0)
    processes = 1
    if earlier:
        merged = dict(requests)
        for name, value in (earlier.get("requests") or {}).items():
            if name != "total" and isinstance(value, int):
                merged[name] = merged.get(name, 0) + value
        requests = merged
        duration += float(earlier.get("duration_s") or 0.0)
        processes += int(earlier.get("processes") or 1)
    all_counts = {status: int(counts.get(status, 0)) for status in STATUSES}
    all_counts.update({k: int(v) for k, v in counts.items() if k not in all_counts})
    reqs = {name: int(requests.get(name, 0)) for name in REQUEST_FIELDS}
    reqs.update({k: int(v) for k, v in requests.items() if k not in reqs})
    if "total" not in requests:
        reqs["total"] = sum(v for k, v in reqs.items() if k not in NOT_KINDS)
    useful = max(reqs["total"] - reqs["rate_limited"], 0)
    first_start = (earlier or {}).get("started_at") or _iso_utc(started_at)
    summary: dict[str, Any] = {
        "run_id": run_id,
        "job": job,
        "started_at": first_start,
        "finished_at": _iso_utc(finished_at),
        "duration_s": round(duration, 3),
        "exit_code": exit_code,
        "counts": all_counts,
        "requests": reqs,
        "rate_per_second": round(useful / duration, 2) if duration > 0 else 0.0,
        "latency_ms": latency.percentiles(),
    }
    if processes > 1:
        summary["processes"] = processes
    if extra:
        summary.update(extra)
    return summary


def _table(pairs: Iterable[tuple[str, Any]], indent: str = "  ") -> list[str]:
    rows = [(str(k), f"{v:,}" if isinstance(v, int) else str(v)) for k, v in pairs]
    if not rows:
        return []
    key_w = max(len(k) for k, _ in rows)
    val_w = max(len(v) for _, v in rows)
    return [f"{indent}{k:<{key_w}}  {v:>{val_w}}" for k, v in rows]


#: What exit code 0 means for a plan (it changes nothing, so "every target ended" is wrong).
PLAN_DONE = "the plan is made; nothing was changed (`bulk-tagger run` applies it)"
#: the command exit code 1's meaning names (``ExitCode.meaning``), this run's in a report
_LISTING = "`bulk-tagger report RUN_ID --format jsonl`"


def exit_meaning(code: object, kind: str = "run", seen: Seen | None = None) -> str:
    """What a summary's ``exit_code`` says to a person: ``ExitCode``'s meaning, a plan's own,
    or why there is none. ``seen``: the commands it names are this run's, in its state
    folder, and a run without an exit code is told as ``unfinished`` tells it."""
    if code is None:
        return (seen and seen.still) or (
            "the run is still going, or its process was killed (`--resume` goes on)")
    run_id = str(seen.info.get("run_id")) if seen else ""
    if kind == "plan" and code == ExitCode.OK:
        if not seen:
            return PLAN_DONE
        job = seen.info.get("job_path")
        apply = seen.command("run", *([str(job)] if job else []), "--plan", run_id)
        return PLAN_DONE.replace("`bulk-tagger run`", f"`{apply}`")
    known = [member for member in ExitCode if member == code]
    if not known:
        return "unknown exit code"
    if not seen:
        return known[0].meaning
    listing = seen.command("report", run_id, "--format", "jsonl", "--status", "failed")
    meaning = known[0].meaning.replace(_LISTING, f"`{listing}`")
    if kind != "plan":  # exit 74 and 75 say `--resume` goes on: the whole command, this run's
        meaning = meaning.replace("`--resume`", f"`{seen.resume()}`")
    return meaning


def _by_reason(summary: Mapping[str, Any]) -> list[str]:
    lines: list[str] = []
    reasons: Mapping[str, Mapping[str, int]] = summary.get("reasons") or {}
    for status in ("skipped", "failed"):
        pairs = sorted((reasons.get(status) or {}).items(), key=lambda p: (-p[1], p[0]))
        if pairs:
            lines += [f"{status.capitalize()}, by reason:", *_table(pairs, indent="    ")]
    return lines


def format_summary(
    summary: Mapping[str, Any], *, targets: bool = True, seen: Seen | None = None
) -> str:
    """A summary as multi-line text for a terminal (no trailing newline).

    It speaks of what the run was (``kind``: a run, a plan, an undo of a run): a plan's
    ``planned`` targets are the ones it would update, and its exit code 0 says nothing was
    changed. Skipped and failed targets are counted by reason (``reasons``), and the images
    each selector matched are listed (``matched``). ``targets=False`` leaves the counts out
    (``plan`` prints its own above). ``seen``: the run as ``report`` reads it from its folder
    (the commands named are this run's, in its state folder; a run without an exit code is
    told as ``unfinished`` tells it).
    """
    counts: Mapping[str, int] = summary.get("counts") or {}
    reqs: Mapping[str, int] = summary.get("requests") or {}
    lat: Mapping[str, float] = summary.get("latency_ms") or {}
    kind = summary.get("kind") or "run"
    head = f"{kind.capitalize()} {summary.get('run_id', '?')} of job {summary.get('job', '?')}"
    if kind == "undo" and summary.get("parent_run_id"):
        head += f" (undoes run {summary['parent_run_id']})"
    lines = [
        head,
        f"  {summary.get('started_at', '?')} -> {summary.get('finished_at', '?')}"
        f"  ({units.duration_text(float(summary.get('duration_s') or 0.0))})",
    ]
    if summary.get("plan_run_id"):
        lines.append(f"  applied the plan {summary['plan_run_id']} (nothing else)")
    if summary.get("preview"):
        apply = f"bulk-tagger run --plan {summary.get('run_id')}"
        if seen:
            apply = seen.command("run", "--plan", str(summary.get("run_id")))
        lines.append(f"  a preview of undoing {summary.get('parent_run_id')}: nothing was sent"
                     f" ({apply} applies it)")
    if targets:
        shown = [(status, n) for status, n in counts.items() if n or status in STATUSES[:4]]
        if kind == "plan":
            shown = [("would update" if status == "planned" else status, n)
                     for status, n in shown if status != "updated"]
        lines += [f"Targets: {sum(counts.values()):,}", *_table(shown), *_by_reason(summary)]
    matched: Mapping[str, int] = summary.get("matched") or {}
    if matched:
        lines += ["Images matched, by selector:", *_table(matched.items(), indent="    ")]
    kinds = [(k, v) for k, v in reqs.items() if k not in NOT_KINDS]
    kinds_text = ", ".join(f"{k} {v:,}" for k, v in kinds)
    lines += [
        f"Requests: {int(reqs.get('total', 0)):,} total ({kinds_text})",
        *_table(
            [
                ("retries", int(reqs.get("retries", 0))),
                ("rate limited (429)", int(reqs.get("rate_limited", 0))),
                ("lock waits", int(reqs.get("lock_waits", 0))),
                ("achieved rate", f"{float(summary.get('rate_per_second') or 0.0):,.1f} req/s"),
            ]
        ),
        "Latency: "
        + ", ".join(f"{p} {float(lat.get(p, 0.0)):,.1f} ms" for p in PERCENTILES),
    ]
    code = summary.get("exit_code")
    meaning = exit_meaning(code, kind, seen)
    lines.append(f"Exit code {'none' if code is None else code}: {meaning}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- plan output

_MARKERS = frozenset({"null", "(none)", "(removed)"})
_PLAIN = re.compile(r"[^\s\x00-\x1f\x7f-\x9f\"]+(?: [^\s\x00-\x1f\x7f-\x9f\"]+)*")


def _show(value: Any) -> str:
    """A value for a terminal: plain text where that is unambiguous, else JSON (escaped)."""
    if isinstance(value, str) and _PLAIN.fullmatch(value) and value not in _MARKERS:
        return value
    return json.dumps(value, ensure_ascii=False, default=str)


def _change_lines(before: Mapping[str, Any], patch: Mapping[str, Any]) -> Iterator[str]:
    for field, new in patch.items():
        if field == "tags" and isinstance(new, Mapping):
            old_tags = before.get("tags") or {}
            for key, value in new.items():
                old = _show(old_tags[key]) if key in old_tags else "(none)"
                shown = "(removed)" if value is None else _show(value)
                yield f"  tags.{_show(key)}: {old} -> {shown}"
        else:
            old = _show(before[field]) if field in before else "(none)"
            shown = "(removed)" if new is None else _show(new)
            yield f"  {_show(field)}: {old} -> {shown}"


def format_change(
    name: str, image_id: str, before: Mapping[str, Any], patch: Mapping[str, Any]
) -> str:
    """One planned change, readable: a heading, then one ``field: old -> new`` line each.

    ``before`` is the image's state (``{"tags": {...}, "ssh_key": ...}``), ``patch`` the
    merge-patch body (a tag set to None is removed). Lines follow the patch's order; strings
    that could mislead on a terminal (control characters, quotes, edge spaces) are shown as
    JSON.
    """
    lines = [f"{_show(name)} ({_show(image_id)})", *_change_lines(before, patch)]
    if len(lines) == 1:
        lines.append("  (no change)")
    return "\n".join(lines)


def format_plan(
    counts: Mapping[str, int],
    reasons: Mapping[str, int],
    samples: Sequence[tuple[str, str, dict[str, Any], dict[str, Any]]],
    more: int,
    keys: Sequence[str] = (),
) -> str:
    """``bulk-tagger plan``'s output (no trailing newline).

    ``counts`` per status (``planned`` or ``updated``: would be updated). ``reasons`` counts
    targets by ``"<status>:<reason>"`` (e.g. ``"skipped:read-only tag"``), shown under that
    status; a key without a known status prefix is shown under "other reasons". ``samples``
    are ``(name, image_id, before, patch)`` shown with format_change; ``more`` is how many
    changes were not shown; ``keys`` the changes in aggregate, a line a key
    (``tally.KeyTally.lines``), shown before them.
    """
    grouped: dict[str, list[tuple[str, int]]] = collections.defaultdict(list)
    for key, n in reasons.items():
        status, sep, reason = key.partition(":")
        if sep and status in STATUSES:
            grouped[status].append((reason, n))
        else:
            grouped["other"].append((key, n))
    would_update = int(counts.get("planned", 0)) + int(counts.get("updated", 0))
    total = sum(int(n) for n in counts.values())
    lines = [
        f"Plan: {total:,} targets",
        *_table(
            [
                ("would update", would_update),
                ("unchanged", int(counts.get("unchanged", 0))),
                ("skipped", int(counts.get("skipped", 0))),
                ("failed", int(counts.get("failed", 0))),
            ]
        ),
    ]
    for status, title in (
        ("unchanged", "Unchanged"),
        ("skipped", "Skipped"),
        ("failed", "Failed"),
        ("planned", "Would update"),
        ("updated", "Would update"),
        ("other", "Other reasons"),
    ):
        if grouped.get(status):
            pairs = sorted(grouped[status], key=lambda p: (-p[1], p[0]))
            lines += [f"{title}, by reason:", *_table(pairs, indent="    ")]
    if keys:
        lines += ["Changes per key:", *(f"  {line}" for line in keys)]
    if samples:
        lines.append("Changes:")
        lines += [format_change(*sample) for sample in samples]
    if more > 0:
        lines.append(f"... and {more:,} more changes")
    return "\n".join(lines)


# --------------------------------------------------------------------------- a run's report again

ReportFormat = Literal["summary", "jsonl", "csv", "json"]
_STATUS = RESULT_FIELDS.index("status")


def open_run(state_dir: Path, run_id: str) -> tuple[Journal, dict[str, Any], dict[str, Any]]:
    """RUN_ID's journal (the caller closes it), its run row and its summary; a run without a
    summary (killed, or still going) gets one made of its journal's counts, exit code null."""
    state_dir, run_id, _ = locate_run(state_dir, run_id)  # an id (one segment, ours) or a folder
    journal = Journal(state_dir / run_id)
    try:
        info = journal.run_info()
        # a summary is the run's once its row has an exit code (finish_run writes both); a
        # resumed run's earlier process left one its --resume took up again (reopen_run)
        summary = info.get("summary") if info.get("exit_code") is not None else None
        summary = summary or {"run_id": run_id, "job": info.get("job_name"),
                              "kind": info.get("kind"), "counts": journal.counts(),
                              "exit_code": None}
        if "reasons" not in summary:  # a run recorded before summaries had them
            summary = {**summary, "reasons": journal.reasons()}
    except BaseException:
        journal.close()
        raise
    return journal, info, summary


def print_report(
    state_dir: Path, run_id: str, fmt: ReportFormat, *, export: bool, out: TextIO,
    statuses: Collection[str] = (),
) -> None:
    """``bulk-tagger report``: RUN_ID's summary or results, read from its journal alone.

    ``export`` writes the plain results.jsonl and results.csv, and summary.json, anew first. A
    finished run's results come from its results.jsonl.gz (``Journal.iter_results``). A run
    without a summary (killed, or still going) gets one made of its journal's counts, exit
    code null. ``statuses``: only the results lines of these statuses are printed (jsonl and
    csv; the exports stay whole).
    """
    journal, info, summary = open_run(state_dir, run_id)
    run_dir = journal.run_dir
    try:
        holder = is_held(run_dir) if export else None
        if holder is not None:  # its exports are the live process's to write
            raise RunHeld(held_message(run_id, holder))
        if export:
            exports.write_exports(run_dir, journal.iter_results(run_id, raw=True), summary,
                                  formats=("jsonl", "csv"))
        if fmt == "summary":
            out.write(format_summary(summary, seen=Seen.of(info, run_dir)) + "\n")
        elif fmt == "json":
            if summary.get("exit_code") is None:  # who works it now, or what continues it
                summary = {**summary, "unfinished": unfinished_fields(info, run_dir)}
            out.write(json.dumps(summary, indent=2) + "\n")
        else:
            # what a person may read on a terminal: no control character goes out raw
            # (JSON lines stay the same JSON; CSV cells show them escaped, as \x1b)
            if fmt == "csv":
                out.write(",".join(RESULT_FIELDS) + "\r\n")
            for row in journal.iter_results(run_id, raw=True):
                if statuses and row[_STATUS] not in statuses:
                    continue
                if fmt == "jsonl":
                    out.write(safety.json_printable(exports.jsonl_line(row).decode()))
                else:
                    line = exports.csv_line(row)
                    out.write(safety.printable(line.removesuffix("\r\n")) + "\r\n")
    finally:
        journal.close()
