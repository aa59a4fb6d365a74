"""What a report tells its reader to do next: the commands it names, and what a run without
an exit code is.

A command is printed so that, copied as it stands, it reaches the same run: quoted for a shell
(``shlex``), with the ``--state-dir`` the report was read from unless it is the default
``./runs`` (README, "The run's record"). A run without an exit code is either worked by a live
process (its ``run.lock``'s holder, worker.runlock) or was left so by one that ended (killed,
or its node lost): the report names the ``--resume`` that continues it.
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from worker import defaults, safety
from worker.retention import parse_time
from worker.runlock import is_held


def command(*words: str, state_dir: Path | None = None) -> str:
    """A command a report names for its reader: ``bulk-tagger`` and ``words``, quoted for a
    shell, with the ``--state-dir`` the report was read from when it is not the default (run
    as printed, it finds the same run, not "no such run"). Not escaped for a terminal or a
    page: the caller shows it so (a path may hold anything but NUL)."""
    if state_dir is not None and Path(state_dir) != Path(defaults.STATE_DIR):
        words = (*words, "--state-dir", str(state_dir))
    return shlex.join(["bulk-tagger", *words])


def resume_command(info: Mapping[str, Any], state_dir: Path | None) -> str:
    """What continues a run a process left unfinished (its run row ``info``): ``run JOB
    --resume`` (with its shard), ``undo RUN --resume``, with ``--resume-within`` when the run
    began longer ago than the default (so the command finds it instead of starting anew); a
    plan is not resumed but made anew (``plan JOB``, an undo's preview ``undo RUN --plan``)."""
    kind = info.get("kind") or "run"
    parent, job = str(info.get("parent_run_id") or ""), str(info.get("job_path") or "JOB")
    if kind == "plan":  # a plan is not resumed: made again, whole (an undo's preview too)
        what = ["undo", parent, "--plan"] if parent else ["plan", job]
        return command(*what, state_dir=state_dir)
    what = ["undo", parent] if kind == "undo" else ["run", job]
    what.append("--resume")
    if info.get("shard"):
        what += ["--shard", str(info["shard"])]
    try:
        hours = (datetime.now(UTC) - parse_time(str(info.get("started_at")))).total_seconds() / 3600
    except ValueError:
        hours = 0.0
    if hours >= defaults.RESUME_WITHIN_HOURS:
        what += ["--resume-within", f"{math.ceil(hours) + 1}h"]
    return command(*what, state_dir=state_dir)


@dataclass(frozen=True, slots=True)
class Seen:
    """A run as its report reads it from its folder (``Seen.of``): its run row, the state
    folder it is in (the commands the report names carry it) and, for a run without an exit
    code, what it is (``unfinished``)."""

    info: Mapping[str, Any]
    state_dir: Path
    still: str = ""

    @classmethod
    def of(cls, info: Mapping[str, Any], run_dir: Path) -> Seen:
        still = unfinished(info, run_dir) if info.get("exit_code") is None else ""
        return cls(info, run_dir.parent, still)

    def command(self, *words: str) -> str:
        """``command(*words)`` in this run's state folder, escaped for a terminal."""
        return safety.printable(command(*words, state_dir=self.state_dir))

    def resume(self) -> str:
        """``resume_command`` of this run, escaped for a terminal."""
        return safety.printable(resume_command(self.info, self.state_dir))


def unfinished_fields(info: Mapping[str, Any], run_dir: Path) -> dict[str, Any]:
    """``unfinished`` for a machine (``report --format json``): ``{"state": "running",
    "holder": {pid, host, since, command}}`` as the lock file names it, or ``{"state":
    "ended", "continue_with": COMMAND}``. Raw text: JSON escapes what a terminal would run."""
    holder = is_held(run_dir)
    if holder is not None:
        return {"state": "running", "holder": {"pid": holder.pid, "host": holder.host,
                                               "since": holder.since, "command": holder.command}}
    return {"state": "ended", "continue_with": resume_command(info, run_dir.parent)}


def unfinished(info: Mapping[str, Any], run_dir: Path) -> str:
    """What a run without an exit code is, for a person: still running (its lock's live
    holder, as the lock file names it: escaped) or left so by a process that ended, and the
    command that continues it (escaped too: its job path and state folder are the user's)."""
    holder = is_held(run_dir)
    if holder is not None:
        return f"still running: {safety.printable(holder.describe())}"
    goes_on = "makes it anew" if info.get("kind") == "plan" else "continues it"
    return ("its process ended without finishing it (killed, or the node was lost): "
            f"`{Seen(info, run_dir.parent).resume()}` {goes_on}")
