"""``bulk-tagger report RUN --format html``: one self-contained page to look at a run.

The page holds everything it shows: its style inline, its charts inline SVG drawn here
(worker.svgchart), no script, no font, no link to anything; its Content-Security-Policy
forbids loading anything at all, so opened offline after a ``kubectl cp`` it shows the same.
It reads like a document on a phone (one column, tables that scroll sideways) and on paper.

What it shows: the summary (summary.json's figures, the exit code's meaning, the rate ceiling,
what the run is: an undo of which run, how many processes worked it); the requests per second
over the run's time (the journal's ``seconds`` table, worker.timeline); the failures grouped
by reason and HTTP status, and the skipped targets by reason, with the first messages and the
first images of each; the changes per key and the first changes in the plan's format
(report.format_change).

Size and memory do not grow with the targets past the fixed caps (``Caps``, worker.tally): one
pass over the results; where a status has more targets than the page lists, it counts the
rest and names the command that prints them all (``report --format csv --status``). A run of
1,000,000 targets gets a page of about 170 KB (bench scenario v). A run whose per-target
record is gone (a pruned results file) still gets its summary and chart, and a line saying
what is missing.
Every text from the API, the job or the journal goes through ``html.escape``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

from worker import svgchart, timeline, units
from worker.errors import JobError
from worker.journal import Journal
from worker.nextstep import Seen
from worker.report import (
    PERCENTILES,
    REQUEST_FIELDS,
    REQUEST_KINDS,
    exit_meaning,
    format_change,
    open_run,
)
from worker.tally import Groups, Tally

CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"

STYLE = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d1d1d;
background:#fff}
main{max-width:60rem;margin:0 auto;padding:1rem}
h1{font-size:1.35rem;margin:.2rem 0 .6rem;overflow-wrap:anywhere}
h2{font-size:1.1rem;margin:1.6rem 0 .5rem;border-bottom:1px solid #ccc;padding-bottom:.2rem}
h3{font-size:1rem;margin:1rem 0 .3rem;overflow-wrap:anywhere}
.scroll{overflow-x:auto}
table{border-collapse:collapse;margin:.3rem 0}
th,td{padding:.2rem .7rem .2rem 0;text-align:left;vertical-align:top}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
.grid{display:flex;flex-wrap:wrap;gap:0 2.5rem}
.exit{padding:.5rem .7rem;border-radius:4px;background:#eef5ee;margin:.6rem 0}
.exit.bad{background:#fbeaea}
.note{color:#555;font-size:.9rem}
svg.chart{width:100%;height:auto;display:block}
.key{display:inline-block;margin-right:1rem;font-size:.85rem;white-space:nowrap}
.swatch{display:inline-block;width:.8rem;height:.8rem;margin-right:.3rem;vertical-align:-1px}
pre{background:#f6f6f6;padding:.5rem;overflow-x:auto;font-size:.85rem;white-space:pre}
ul.images{columns:18rem;font-size:.85rem;padding-left:1.2rem;margin:.3rem 0}
ul.images li{overflow-wrap:anywhere}
blockquote{margin:.3rem 0;padding:.2rem .6rem;border-left:3px solid #d1402f;background:#fdf6f5;
overflow-wrap:anywhere;font-size:.9rem}
@media print{main{max-width:none;padding:0}h2{break-after:avoid}pre,svg{break-inside:avoid}
.exit,pre,blockquote{background:none}}
"""


def _esc(value: Any) -> str:
    return escape(str(value), quote=True)


def _num(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return _esc("-" if value is None else value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.1f}"
    return _esc(value)


def _table(rows: Iterable[tuple[Any, ...]], head: tuple[str, ...] = (), *,
           numbers: bool = True) -> str:
    """A table: the first column text, the others numbers (right-aligned) or text."""
    out = ['<div class="scroll"><table>']
    if head:
        out.append("<tr>" + "".join(
            f'<th{" class=n" if i else ""}>{_esc(h)}</th>' for i, h in enumerate(head)) + "</tr>")
    for row in rows:
        cells = [f"<td>{_esc(row[0])}</td>", *(
            f'<td class="n">{_num(v)}</td>' if numbers else f"<td>{_esc(v)}</td>"
            for v in row[1:])]
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table></div>")
    return "".join(out)


def _summary(summary: Mapping[str, Any], seen: Seen,
             processes: Mapping[str, Any] | None) -> str:
    info = seen.info
    counts: Mapping[str, Any] = summary.get("counts") or {}
    reqs: Mapping[str, Any] = summary.get("requests") or {}
    lat: Mapping[str, Any] = summary.get("latency_ms") or {}
    options: Mapping[str, Any] = info.get("options") or {}
    code = summary.get("exit_code")
    kind = info.get("kind") or summary.get("kind") or "run"
    meaning = exit_meaning(code, kind, seen)
    ceiling = options.get("rate_ceiling")
    run_rows: list[tuple[str, Any]] = [
        ("job", summary.get("job") or info.get("job_name")),
        ("run", summary.get("run_id") or info.get("run_id")),
        ("kind", kind),
        ("started", summary.get("started_at") or info.get("started_at")),
        ("finished", summary.get("finished_at") or info.get("finished_at") or "-"),
        ("duration", units.duration_text(float(summary.get("duration_s") or 0.0))),
    ]
    if info.get("shard"):
        run_rows.append(("shard", info["shard"]))
    parent = info.get("parent_run_id") or summary.get("parent_run_id")
    if parent:
        what = "undoes run" if info.get("kind") == "undo" else "parent run"
        run_rows.append((what, parent))
    n_proc = int(summary.get("processes") or (processes or {}).get("processes") or 1)
    if n_proc > 1:
        run_rows.append(("processes", f"{n_proc} (resumed {n_proc - 1}x; the duration adds "
                                      "their running times)"))
    kinds = [(k, reqs.get(k, 0)) for k in REQUEST_KINDS] + [
        (k, v) for k, v in reqs.items()
        if k not in REQUEST_FIELDS]
    rate_rows: list[tuple[str, Any]] = [
        ("rate ceiling", f"{ceiling:,.1f} req/s" if ceiling else "none set: discovered"),
        ("achieved", f"{float(summary.get('rate_per_second') or 0.0):,.1f} req/s"),
    ]
    if summary.get("rate_limit_final") is not None:
        rate_rows.append(("limiter's rate at the end",
                          f"{float(summary['rate_limit_final']):,.1f} req/s"))
    rate_rows += [(f"latency {p}", f"{float(lat.get(p) or 0.0):,.1f} ms")
                  for p in PERCENTILES]
    error = summary.get("error")
    return "".join([
        f'<div class="exit{"" if code in (0, None) else " bad"}"><b>Exit code '
        f"{_esc(code if code is not None else 'none')}</b>: {_esc(meaning)}"
        + (f"<br>stopped: {_esc(error)}" if error else "") + "</div>",
        '<div class="grid"><div>', _table(run_rows, numbers=False), "</div><div>",
        _table([(s, n) for s, n in counts.items() if n or s in ("updated", "failed")],
               ("targets", f"{sum(int(n) for n in counts.values()):,}")),
        "</div><div>",
        _table([*kinds, ("retries", reqs.get("retries", 0)),
                ("429 answers", reqs.get("rate_limited", 0)),
                ("lock waits", reqs.get("lock_waits", 0))],
               ("requests", f"{int(reqs.get('total') or 0):,}")),
        "</div><div>", _table(rate_rows), "</div></div>",
    ])


def _chart(journal: Journal, ceiling: float | None) -> str:
    span = timeline.span(journal.path)
    bins = svgchart.Bins.of(timeline.read(journal.path), span=span) if span else None
    if bins is None:
        return '<p class="note">No per-second record: the run is older than it, or sent ' \
               "nothing.</p>"
    names = ["ok", "limited", "errors", "retries", "rate"] + (["ceiling"] if ceiling else [])
    per = (f"each bar {bins.per} seconds, the per-second mean" if bins.per > 1
           else "one bar a second")
    out = [svgchart.requests_chart(bins, ceiling),
           f"<p>{svgchart.legend(names)}</p>",
           f'<p class="note">{bins.seconds:,} seconds; {per}. Where the bars reach the '
           "limiter's rate the worker set the pace; red 429s under a falling rate mean the "
           "API did.</p>"]
    locks = svgchart.lock_chart(bins)
    if locks:
        out += ["<h3>Lock waits (targets that began waiting for an image's task)</h3>", locks]
    return "".join(out)


@dataclass(frozen=True)
class Caps:
    """How much of a big run the page lists (README, "Read a run's report from the volume"):
    past these it counts the rest and names the command that prints them all."""

    names: int = 100  # images listed per group of failed (or skipped) targets
    section: int = 1000  # images listed in all the groups of one status
    diffs: int = 50  # changes shown in full


CAPS = Caps()


def _all_of(seen: Seen, status: str, count: int) -> str:
    """The line naming the command that prints every target of ``status``."""
    command = seen.command("report", str(seen.info.get("run_id")), "--format", "csv",
                           "--status", status)
    return (f'<p class="note">All {count:,} {status} targets, one CSV row each: '
            f"<code>{_esc(command)}</code></p>")


def _groups(groups: Groups, status: str, seen: Seen, caps: Caps) -> str:
    """A status's groups, largest first: each with its first messages and images, up to the
    caps; the rest counted, and the command that prints them all."""
    listed = groups.largest_first()
    if not listed:
        return "<p>None.</p>"
    http = status == "failed"
    out = [_table(((g.reason, g.http_status if g.http_status is not None else "-", g.count)
                   if http else (g.reason, g.count) for g in listed),
                  ("reason", "HTTP status", "targets") if http else ("reason", "targets"))]
    listable = sum(min(g.count, caps.names) for g in listed)
    if groups.count > min(listable, caps.section):  # said first: past it, a long list
        out.append(_all_of(seen, status, groups.count))
    left = caps.section
    for g in listed:
        code = f", HTTP {g.http_status}" if g.http_status is not None else ""
        out.append(f"<h3>{_esc(g.reason)}{_esc(code)}: {g.count:,}</h3>")
        out += [f"<blockquote>{_esc(m)}</blockquote>" for m in g.messages]
        images = g.images[:max(0, min(left, caps.names))]
        left -= len(images)
        if images:
            out.append('<ul class="images">' + "".join(
                f"<li>{_esc(name)} <span class=note>{_esc(image_id)}</span></li>"
                for name, image_id in images) + "</ul>")
        if g.count > len(images):
            out.append(f'<p class="note">and {g.count - len(images):,} more</p>')
    if groups.other:
        out.append(f'<p class="note">and {groups.other:,} in further groups</p>')
    return "".join(out)


def _changes(tally: Tally) -> str:
    rows = tally.keys.rows()
    if not rows:
        return "<p>No change.</p>"
    table = []
    for key, c in rows:
        renamed = ", ".join(f"to {new}: {n:,}" for new, n in c.renamed.most_common(5))
        table.append((key, c.set, c.removed, renamed or "-"))
    out = ['<div class="scroll"><table><tr><th>key</th><th class=n>set</th>'
           '<th class=n>removed</th><th>renamed</th></tr>']
    out += [f"<tr><td>{_esc(k)}</td><td class=n>{_num(s)}</td><td class=n>{_num(r)}</td>"
            f"<td>{_esc(n)}</td></tr>" for k, s, r, n in table]
    out.append("</table></div>")
    if tally.keys.other_keys:
        out.append(f'<p class="note">and {tally.keys.other_keys:,} changes to further keys</p>')
    more = tally.keys.images - len(tally.samples)
    out.append(f"<h3>The first {len(tally.samples):,} changes</h3>")
    out.append("<pre>" + _esc("\n".join(format_change(*s) for s in tally.samples)) + "</pre>")
    if more > 0:
        out.append(f'<p class="note">and {more:,} more changed images</p>')
    return "".join(out)


def _record(journal: Journal, run_id: str, kind: str,
            caps: Caps) -> tuple[Tally | None, str]:
    """The results added up, or None and why (a pruned or damaged record)."""
    changed = frozenset({"updated", "planned"} if kind == "plan" else {"updated"})
    try:
        return Tally.of(journal.iter_results(run_id, raw=True), changed=changed,
                        images=caps.names, diffs=caps.diffs), ""
    except JobError as exc:  # the finished run's results file is gone or damaged
        return None, str(exc)


def build(state_dir: Path, run_id: str, caps: Caps = CAPS) -> str:
    """The page for ``run_id`` (a run folder of ``state_dir``), listing targets up to
    ``caps``."""
    journal, info, summary = open_run(state_dir, run_id)
    seen = Seen.of(info, journal.run_dir)
    try:
        processes = journal.earlier_processes()
        ceiling = (info.get("options") or {}).get("rate_ceiling")
        chart = _chart(journal, float(ceiling) if ceiling else None)
        tally, missing = _record(journal, run_id, str(info.get("kind") or "run"), caps)
    finally:
        journal.close()
    run_id = str(info.get("run_id") or run_id)  # RUN_ID may have been the run's folder
    title = f"{summary.get('job') or info.get('job_name')}: run {run_id}"
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_esc(title)}</title><style>{STYLE}</style></head><body><main>",
        f"<h1>{_esc(title)}</h1>",
        _summary(summary, seen, processes),
        "<h2>Requests per second</h2>", chart,
    ]
    if tally is None:
        parts.append(f'<h2>Failures and changes</h2><p class="note">The per-target record is '
                     f"not available: {_esc(missing)}</p>")
    else:
        parts += ["<h2>Failures by reason</h2>", _groups(tally.failed, "failed", seen, caps)]
        if tally.skipped.count:
            parts += ["<h2>Skipped, by reason</h2>",
                      _groups(tally.skipped, "skipped", seen, caps)]
        if tally.reasons:
            parts += ["<h2>Not changed, by reason</h2>",
                      _table(sorted(tally.reasons.items(), key=lambda kv: (-kv[1], kv[0])),
                             ("status: reason", "targets"))]
        parts += ["<h2>Changes per key</h2>", _changes(tally)]
    parts.append('<p class="note">bulk-tagger report, made from the run\'s journal.</p>'
                 "</main></body></html>\n")
    return "".join(parts)
