"""The results as Markdown tables, and the plot of requests per second for (c) and (d)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

Row = dict[str, Any]
Column = tuple[str, Callable[[Row], Any]]


def _num(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def _req(row: Row) -> str:
    req = row.get("server", {}).get("requests", {})
    return ", ".join(f"{k} {v:,}" for k, v in req.items())


COMMON: list[Column] = [
    ("contender", lambda r: r["label"]),
    ("images", lambda r: _num(r["images"])),
    ("updated", lambda r: _num(r["updated"])),
    ("failed", lambda r: _num(r["failed"])),
]

COLUMNS: dict[str, list[Column]] = {
    "a": [
        *COMMON,
        ("CPU s", lambda r: _num(r["cpu_s"])),
        ("CPU ms/update", lambda r: _num(r["cpu_per_update_ms"], 3)),
        ("net CPU ms/update", lambda r: _num(r.get("net_cpu_per_update_ms"), 3)),
        ("wall s", lambda r: _num(r["wall_s"])),
        ("peak RSS MB", lambda r: _num(r["maxrss_mb"], 1)),
        ("server CPU s", lambda r: _num(r["server"]["cpu_s"])),
        ("requests (server)", _req),
    ],
    "b": [
        *COMMON,
        ("span s (server)", lambda r: _num(r["span_s"])),
        ("updates/s", lambda r: _num(r["throughput_per_s"], 1)),
        ("2xx/s apply phase", lambda r: _num(r.get("apply_rate"), 1)),
        ("2xx/s full windows", lambda r: _num(r["useful_rate"], 1)),
        ("CPU ms/update", lambda r: _num(r["cpu_per_update_ms"], 3)),
        ("wall s", lambda r: _num(r["wall_s"])),
        ("peak RSS MB", lambda r: _num(r["maxrss_mb"], 1)),
        ("requests (server)", _req),
    ],
    "rate": [
        *COMMON,
        ("2xx/s apply phase", lambda r: _num(r.get("apply_rate"), 1)),
        ("2xx/s full windows", lambda r: _num(r["useful_rate"], 1)),
        ("429s", lambda r: _num(r["server"]["rate_limited"])),
        ("429 share", lambda r: f"{r['r429_share'] * 100:.1f}%"),
        ("429s in first 2 s", lambda r: _num(r.get("r429_first_2s"))),
        ("max 1 s (sliding)", lambda r: _num(r["max_sliding"])),
        ("max 1 s (fixed)", lambda r: _num(r["max_window"])),
        ("span s", lambda r: _num(r["span_s"])),
        ("CPU ms/update", lambda r: _num(r["cpu_per_update_ms"], 3)),
        ("requests (server)", _req),
    ],
    "e": [
        ("contender", lambda r: r["label"]),
        ("rows", lambda r: _num(r["rows"])),
        ("CSV MB", lambda r: _num(r["csv_bytes"] / 1e6, 1)),
        ("peak RSS MB", lambda r: _num(r["maxrss_mb"], 1)),
        ("CPU s", lambda r: _num(r["cpu_s"])),
        ("CPU ms/row", lambda r: _num(r["cpu_per_row_ms"], 3)),
        ("wall s", lambda r: _num(r["wall_s"])),
        ("reads", lambda r: _num(r["reads"])),
        ("record MB", lambda r: _num(sum((r.get("record_bytes") or {}).values()) / 1e6, 1)),
    ],
    "f": [
        ("job", lambda r: r["label"]),
        ("rows/images", lambda r: _num(r.get("rows", r["images"]))),
        ("updated", lambda r: _num(r["updated"])),
        ("PATCH", lambda r: _num(r["patch"])),
        ("list GET", lambda r: _num(r["list"])),
        ("image GET", lambda r: _num(r["get"])),
        ("all requests", lambda r: _num(r["total"])),
        ("requests/change", lambda r: _num(r["requests_per_change"], 4)),
    ],
    "m": [
        *COMMON,
        ("useful PATCHes", lambda r: _num(r["useful_patches"])),
        ("allowed (area)", lambda r: _num(r["allowed"], 0)),
        ("useful / allowed", lambda r: _num(r["useful_share"], 3)),
        ("useful PATCH/s", lambda r: _num(r["useful_per_s"], 1)),
        ("429 share", lambda r: f"{r['r429_share'] * 100:.1f}%"),
        ("back to 90% after (s)", lambda r: ", ".join(
            f"{at} s: {'-' if v is None else f'{v:.2f}'}" for at, v in r["recovery_s"].items())),
        ("span s", lambda r: _num(r["span_s"])),
    ],
    "r": [
        ("run", lambda r: r["label"]),
        ("images", lambda r: _num(r["images"])),
        ("targets", lambda r: _num(r["targets"])),
        ("PATCHed before SIGTERM", lambda r: _num(r["patched_before_stop"])),
        ("pending", lambda r: _num(r["pending"])),
        ("regions", lambda r: _num(r["regions"])),
        ("resume reads", lambda r: _num(r["resume_reads"])),
        ("resume requests (server)", lambda r: ", ".join(
            f"{k} {v:,}" for k, v in r["resume_requests"].items())),
        ("resume wall s", lambda r: _num(r["resume_wall_s"])),
    ],
    "j": [
        ("command", lambda r: r["label"]),
        ("targets", lambda r: _num(r["targets"])),
        ("updated", lambda r: _num(r["updated"])),
        ("CPU s", lambda r: _num(r["cpu_s"])),
        ("CPU ms/target", lambda r: _num(r["cpu_per_target_ms"], 3)),
        ("wall s", lambda r: _num(r["wall_s"])),
        ("record MB", lambda r: _num(sum((r.get("record_bytes") or {}).values()) / 1e6, 1)),
    ],
    "s": [
        ("run", lambda r: r["label"]),
        ("targets", lambda r: _num(r["targets"])),
        ("bytes on disk", lambda r: _num(r["disk_bytes"])),
        ("B/target (disk)", lambda r: _num(r["disk_per_target"], 1)),
        ("B/target (file sizes)", lambda r: _num(r["file_per_target"], 1)),
        ("files", lambda r: ", ".join(f"{k} {v:,}" for k, v in r["files"].items())),
        ("CPU s", lambda r: _num(r["cpu_s"])),
    ],
    "v": [
        ("command", lambda r: r["label"]),
        ("targets", lambda r: _num(r["targets"])),
        ("counts", lambda r: ", ".join(f"{k} {v:,}" for k, v in r["counts"].items())),
        ("record compacted", lambda r: "yes" if r["compacted"] else "no"),
        ("wall s", lambda r: _num(r["wall_s"])),
        ("CPU s", lambda r: _num(r["cpu_s"])),
        ("peak RSS MB", lambda r: _num(r["maxrss_mb"], 1)),
        ("page bytes", lambda r: _num(r["page_bytes"])),
    ],
}


def table(columns: list[Column], rows: list[Row]) -> str:
    lines = ["| " + " | ".join(h for h, _ in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(f(row)) for _, f in columns) + " |")
    return "\n".join(lines)


def checks_table(checks: list[Row]) -> str:
    lines = ["| target | value | wanted | met | note |", "|---|---|---|---|---|"]
    for c in checks:
        lines.append(f"| {c['target']} | {_num(c['value'], 3)} | {c['op']} {_num(c['limit'], 3)}"
                     f" | {'**yes**' if c['ok'] else '**NO**'} | {c.get('note', '')} |")
    return "\n".join(lines)


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    out = [
        f"# make bench: {results['date']}",
        "",
        f"Machine: {m['nproc']} CPUs, Python {m['python']}, {m['platform']}; load average "
        f"at start {' / '.join(f'{x:.2f}' for x in m['loadavg_at_start'])}, at end "
        f"{' / '.join(f'{x:.2f}' for x in m.get('loadavg_at_end', []))}.",
        f"Command: `{results['command']}` ({results['elapsed_s']:.0f} s). Commit "
        f"{m.get('commit') or '?'}"
        + (" with uncommitted changes in worker/." if m.get("worker_uncommitted") else "."),
        "",
    ]
    for sc in results["scenarios"]:
        key = sc["scenario"]
        out += [f"## ({key}) {sc['title']}", ""]
        cols = COLUMNS.get(key) or COLUMNS["rate"]
        out += [table(cols, sc["rows"]), ""]
        if key == "j":
            out += _journal_notes(sc)
        if sc["checks"]:
            out += [checks_table(sc["checks"]), ""]
    all_checks = [c for sc in results["scenarios"] for c in sc["checks"]]
    met = sum(c["ok"] for c in all_checks)
    out += [f"**Targets met: {met} of {len(all_checks)}.**", ""]
    return "\n".join(out)


def _journal_notes(sc: dict[str, Any]) -> list[str]:
    prof = sc.get("profile", {})
    lines = [f"CPU per updated image of the apply phase (run - plan): "
             f"{sc['apply_cpu_per_update_ms']:.3f} ms.", ""]
    if prof.get("available"):
        run = next(r for r in sc["rows"] if r["label"] == "bulk-tagger run")
        ms = run["cpu_s"] * prof["record_share"] / max(1, run["targets"]) * 1000
        lines += [
            f"py-spy ({prof['samples']:,} samples of a run of {prof['updated']:,} updates): "
            f"the journal and the exports hold **{prof['record_share'] * 100:.1f}%** of "
            f"bulk-tagger's CPU samples, about **{ms:.3f} ms per target**.",
            "",
            "| part of the record | share of samples | ms per target |", "|---|---|---|",
            *[f"| {k} | {v * 100:.1f}% | "
              f"{run['cpu_s'] * v / max(1, run['targets']) * 1000:.3f} |"
              for k, v in prof.get("record_parts", {}).items()],
            "",
            "| function (own samples) | share |", "|---|---|",
            *[f"| `{f}` | {s * 100:.1f}% |" for f, s in prof["top_own"][:12]],
            "",
        ]
    else:
        lines += [f"Profile: {prof.get('note', 'not taken')}", ""]
    return lines


def plot(results: dict[str, Any], path: Path) -> Path | None:
    """Requests per second the server saw, over time, for (c), (d) and (m), against the
    limit."""
    rate = [sc for sc in results["scenarios"] if sc["scenario"] in ("c", "d", "m")]
    if not rate:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rate), 1, figsize=(11, 4.2 * len(rate)), squeeze=False)
    for ax, sc in zip(axes[:, 0], rate, strict=True):
        limit = sc["params"].get("limit")
        for row in sc["rows"]:
            total = row["per_second"]["total"]
            r429 = row["per_second"]["r429"]
            xs = list(range(len(total)))
            bold = row["label"].startswith("bulk-tagger")
            ax.step(xs, total, where="post", linewidth=2.4 if bold else 1.2,
                    label=f"{row['label']} ({row['server']['rate_limited']} x 429)")
            if bold and any(r429):
                ax.step(xs, r429, where="post", linestyle=":", color="red",
                        label="bulk-tagger: 429s per second")
        if limit is not None:
            ax.axhline(limit, color="black", linestyle="--", linewidth=1,
                       label=f"limit L={limit:g}/s")
        else:  # a schedule: (from second, limit) steps
            steps = sc["params"]["schedule"]
            end = max(len(row["per_second"]["total"]) for row in sc["rows"])
            ax.step([at for at, _ in steps] + [end], [v for _, v in steps] + [steps[-1][1]],
                    where="post", color="black", linestyle="--", linewidth=1, label="limit")
        ax.set_title(f"({sc['scenario']}) {sc['title']}: requests per one-second window "
                     "(server's view; last window partial)")
        ax.set_xlabel("seconds since the first request")
        ax.set_ylabel("requests in the window")
        ax.legend(fontsize=8, loc="upper right")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
