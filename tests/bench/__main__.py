"""``python -m tests.bench [--only a,c] [--scale 0.1]``: run the benchmarks, print the Markdown
table, and save ``tests/bench/results/<date>.json``, ``.md`` and ``.png`` (a partial or
scaled run adds a suffix to the name, so it never overwrites a full run's files)."""

from __future__ import annotations

import argparse
import compileall
import json
import os
import shlex
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import limits, report, scenarios
from .harness import ROOT, machine

ORDER = ("a", "b", "c", "d", "m", "h", "f", "j", "r", "s", "v", "e")
RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__)
    parser.add_argument("--only", default=",".join(ORDER),
                        help="comma-separated scenarios of a,b,c,d,e,f,h,j,m,r,s,v (default: all)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply every image and row count (e.g. 0.1 to iterate)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="rounds of bulk-tagger and the floor in (a) and (b) (default 5)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where results go")
    parser.add_argument("--no-save", action="store_true", help="print only")
    args = parser.parse_args(argv)
    wanted = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(wanted) - set(ORDER))
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(unknown)}: choose from {', '.join(ORDER)}")
    sizes = scenarios.Sizes()
    if args.scale != 1.0:
        sizes = sizes.scaled(args.scale)
    if args.rounds is not None:
        sizes.rounds = max(1, args.rounds)
    # bulk-tagger's bytecode, as a wheel install leaves it: this editable install has none
    # and the box sets PYTHONDONTWRITEBYTECODE, so every start would compile worker/ (0.13 s)
    compileall.compile_dir(ROOT / "worker", quiet=1)
    started = time.monotonic()

    def progress(text: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {text}", file=sys.stderr, flush=True)

    results: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": shlex.join(["python", "-m", "tests.bench", *(argv or sys.argv[1:])]),
        "machine": machine(),
        "sizes": sizes.__dict__,
        "scenarios": [],
    }
    done: dict[str, dict[str, Any]] = {}
    for key in ORDER:
        if key not in wanted:
            continue
        if key == "f":
            result = scenarios.scenario_f(sizes, progress, done.get("a"))
        elif key in ("m", "h"):
            result = getattr(limits, f"scenario_{key}")(sizes, progress)
        else:
            result = getattr(scenarios, f"scenario_{key}")(sizes, progress)
        done[key] = result
        results["scenarios"].append(result)
        for c in result["checks"]:
            progress(f"  {'ok ' if c['ok'] else 'MISS'} {c['target']}: {c['value']} "
                     f"(wanted {c['op']} {c['limit']})")
    results["elapsed_s"] = round(time.monotonic() - started, 1)
    results["machine"]["loadavg_at_end"] = list(os.getloadavg())
    text = report.markdown(results)
    print(text)
    if not args.no_save:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = datetime.now(UTC).strftime("%Y-%m-%d")
        if set(wanted) != set(ORDER):
            stem += "-" + "".join(k for k in ORDER if k in wanted)
        if args.scale != 1.0:
            stem += f"-scale{args.scale:g}"
        (args.out / f"{stem}.json").write_text(json.dumps(results, indent=1) + "\n")
        (args.out / f"{stem}.md").write_text(text + "\n")
        png = report.plot(results, args.out / f"{stem}.png")
        progress(f"saved {args.out / stem}.json, .md" + (", .png" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
