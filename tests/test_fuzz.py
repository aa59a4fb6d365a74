"""The fuzzed front door: mutated job and selector files give a valid job/rows or a JobError.

tests/test_badinput.py feeds the parsers arbitrary text, bytes and structures; this module
starts from the real example files (jobs/), which reach deep into the parsers before they go
wrong, and mutates them a line or a token at a time. Then pathological inputs (nesting, alias
fan-out, unsafe YAML tags, huge numbers, NULs, unterminated quotes) must end in a JobError
well inside the per-test timeout: never another exception, never a hang. Last, a handful of
fuzzed files through the real CLI (``validate`` and ``plan``) against a simulator: every
invalid one exits 2 with one line naming the file, and the simulator sees no request at all.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker import spec
from worker.errors import JobError
from worker.simulator import SimConfig, SimulatorThread

REPO = Path(__file__).resolve().parent.parent
JOBS = REPO / "jobs"
ENV = {"GCORE_CLOUD_PROJECT_ID": "1337", "GCORE_CLOUD_REGION_ID": "7"}
EXAMPLE_JOBS = sorted(p.name for p in JOBS.iterdir() if p.suffix in (".yaml", ".json"))
ROW_FILES = ["demo-owners.csv", "rows/decommissioned.json", "rows/inventory.jsonl"]

FUZZ = settings(
    max_examples=300,
    deadline=None,  # a hang is caught by the per-test timeout, not by a timing assertion
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,  # the same examples every run: a failure can be replayed
)

# -- mutations ---------------------------------------------------------------------------------

#: Tokens that have tripped YAML/JSON/CSV readers somewhere: types, YAML specials, templates.
TOKENS = [
    "null", "~", "[]", "{}", "''", '""', "*x", "&x", "&x [*x]", "<<: *x", "<<: [1]",
    "!!python/object/apply:os.system ['touch pwned']", "!!binary aGk=", "!!set {a}",
    "1e999", "-1e999", ".nan", ".inf", "-1", "0", "0x10", "0o17", "1_000", "9" * 40,
    "'unterminated", '"unterminated', '"\\ud800"', '"\\u0000"', "{run.id}", "{run.nope}",
    "{image.nope}", "{tags.}", "{{", "}", "\t", "  ", "yes", "no", "on", "off", "all", "2024-01-01",
    "x" * 300, "é", "\u202e", "\ufeff", ",", ":", ": :", "- ", "-", "#", "|", ">", "%YAML 1.1",
    "---", "...", "?", "[", "]", "{", "\\", '"', "'", ";", "tag:", "tag:owner", "remove_tags",
    "image_id", "project_id", "region_id", "ssh_key", "is_baremetal", "true", "false",
]
OPS = ["delete", "dup", "swap", "indent", "insert", "replace", "truncate", "join"]
Mutation = tuple[str, int, int, str]
MUTATIONS = st.lists(
    st.tuples(
        st.sampled_from(OPS), st.integers(0, 10**6), st.integers(0, 10**6),
        st.sampled_from(TOKENS),
    ),
    min_size=1,
    max_size=5,
)


def mutate(text: str, mutations: list[Mutation]) -> str:
    """``text`` with each mutation applied to a line (chosen modulo the number of lines)."""
    lines = text.split("\n")
    for op, a, b, token in mutations:
        if not lines:
            lines = [""]
        i, j = a % len(lines), b % len(lines)
        line = lines[i]
        if op == "delete":
            del lines[i]
        elif op == "dup":
            lines.insert(i, line)
        elif op == "swap":
            lines[i], lines[j] = lines[j], line
        elif op == "indent":
            lines[i] = " " * (b % 7) + line.lstrip()
        elif op == "insert":
            lines.insert(i, " " * (b % 5) + token)
        elif op == "replace":
            parts = re.split(r"(\W+)", line)
            parts[b % len(parts)] = token
            lines[i] = "".join(parts)
        elif op == "truncate":
            lines[i] = line[: b % (len(line) + 1)]
        elif op == "join" and i + 1 < len(lines):
            lines[i : i + 2] = [line + lines[i + 1]]
    return "\n".join(lines)


# -- the front door, in process ----------------------------------------------------------------


def front_door(path: Path) -> tuple[spec.Job | None, int]:
    """Load a job and read every row of its selector files: (job, rows), or (None, 0) for a
    JobError. Any other exception fails the test."""
    try:
        job = spec.load_job(path, env=ENV)
        rows = 0
        for selector in job.file_selectors:
            for row in spec.iter_rows(job, selector, env=ENV):
                assert isinstance(row, spec.Row)
                assert row.image_id and isinstance(row.project_id, int)
                rows += 1
    except JobError as exc:
        text = str(exc)
        assert text and exc.file, repr(exc)
        assert "Traceback" not in text
        return None, 0
    assert isinstance(job, spec.Job)
    assert re.fullmatch(r"[a-z0-9-]{1,63}", job.name)
    assert job.targets
    job.changes_model()  # a valid job always yields changes the planner takes
    return job, rows


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of jobs/ (selector paths are relative to the job file)."""
    folder = tmp_path_factory.mktemp("fuzz") / "jobs"
    shutil.copytree(JOBS, folder, ignore=shutil.ignore_patterns("k8s"))
    return folder


def test_examples_are_valid_before_mutation(workdir: Path) -> None:
    """The seeds of the mutations are valid: a mutant's failure is the mutation's doing."""
    assert len(EXAMPLE_JOBS) >= 3
    for name in EXAMPLE_JOBS:
        job, _ = front_door(workdir / name)
        assert job is not None, name


@FUZZ
@given(source=st.sampled_from(EXAMPLE_JOBS), mutations=MUTATIONS)
def test_mutated_job_files(workdir: Path, source: str, mutations: list[Mutation]) -> None:
    text = (workdir / source).read_text(encoding="utf-8")
    path = workdir / f"mutant{Path(source).suffix}"
    path.write_text(mutate(text, mutations), encoding="utf-8")
    front_door(path)
    assert not (workdir / "pwned").exists()  # no YAML tag ever ran anything


@FUZZ
@given(source=st.sampled_from(ROW_FILES), mutations=MUTATIONS)
def test_mutated_selector_files(workdir: Path, source: str, mutations: list[Mutation]) -> None:
    suffix = Path(source).suffix
    rows = workdir / f"mutant-rows{suffix}"
    rows.write_text(mutate((workdir / source).read_text(encoding="utf-8"), mutations),
                    encoding="utf-8")
    job = workdir / "rows-host.yaml"
    job.write_text(f"name: fuzz-rows\ntargets:\n  - file: {rows.name}\n"
                   "changes:\n  set_tags: {fuzzed: 'yes'}\n")
    front_door(job)


# -- pathological inputs -----------------------------------------------------------------------

HEAD = "name: x\ntargets:\n  - query: {projects: [1], regions: [2]}\n"
JOB_OK = HEAD + "changes:\n  set_tags: {a: b}\n"
JSON_HEAD = '{"name": "x", "targets": [{"query": {"projects": [1], "regions": [2]}}], '


def _bomb(depth: int, mapping: bool) -> str:
    if mapping:
        parts = ["&a0 {k: v}"] + [f"&a{i} {{l: *a{i - 1}, r: *a{i - 1}}}" for i in range(1, depth)]
    else:
        parts = ["&a0 [x, x]"] + [f"&a{i} [*a{i - 1}, *a{i - 1}]" for i in range(1, depth)]
    return "[" + ", ".join(parts) + "]"


PATHOLOGICAL_JOBS: dict[str, str] = {
    "alias-bomb-list.yaml": JOB_OK + f"description: {_bomb(40, False)}\n",
    "alias-bomb-map.yaml": HEAD
    + f"changes:\n  set_tags: {{a: b}}\n  remove_tags: {_bomb(40, True)}\n",
    "alias-bomb-tags.yaml": HEAD + "changes:\n  set_tags: &t {a: b, c: *t}\n",
    "alias-recursive.yaml": HEAD + "changes: &c\n  set_tags: {a: b}\n  x: *c\n",
    "merge-self.yaml": HEAD + "changes: &c\n  <<: *c\n",
    "deep-yaml.yaml": JOB_OK + "description: " + "[" * 50_000 + "]" * 50_000 + "\n",
    "deep-yaml-block.yaml": JOB_OK + "".join(" " * i + f"k{i}:\n" for i in range(3000)),
    "deep-json.json": JSON_HEAD + '"description": ' + "[" * 100_000 + "]" * 100_000 + "}",
    "python-tag.yaml": JOB_OK + "description: !!python/object/apply:os.system ['touch pwned']\n",
    "python-name.yaml": JOB_OK + "description: !!python/name:os.system\n",
    "big-int.yaml": JOB_OK + "options:\n  concurrency: " + "9" * 100_000 + "\n",
    "big-int.json": JSON_HEAD + '"changes": {"set_tags": {"a": "b"}}, "options": '
    '{"concurrency": ' + "9" * 100_000 + "}}",
    "inf.json": JSON_HEAD + '"changes": {"set_tags": {"a": "b"}}, "options": '
    '{"rate_per_second": 1e999}}',
    "nan.yaml": JOB_OK + "options:\n  rate_per_second: .nan\n  retry_budget_seconds: .inf\n",
    "nul.yaml": JOB_OK + "description: \"a\x00b\"\n",
    "surrogate.json": JSON_HEAD + '"changes": {"set_tags": {"a": "\\ud800"}}}',
    "bom-crlf.yaml": "\ufeff" + JOB_OK.replace("\n", "\r\n"),
    "many-unknown-keys.yaml": JOB_OK + "options:\n" + "".join(f"  k{i}: 1\n" for i in range(500)),
    "many-tags.yaml": HEAD
    + "changes:\n  set_tags:\n" + "".join(f"    k{i}: v\n" for i in range(3000)),
    "huge-tag-value.yaml": HEAD + "changes:\n  set_tags: {a: " + "v" * 1_000_000 + "}\n",
    "template-flood.yaml": HEAD + "changes:\n  set_tags: {a: '" + "{image.name}" * 20_000 + "'}\n",
    "regex-bad.yaml": HEAD.replace("regions: [2]}", "regions: [2], name_regex: '(a'}")
    + "changes:\n  set_tags: {a: b}\n",
    "only-comments.yaml": "# nothing\n" * 1000,
    "document-stream.yaml": JOB_OK + "---\n" + JOB_OK,
}

ROWS_HOST = "name: x\ntargets:\n  - file: {file}\nchanges:\n  set_tags: {{a: b}}\n"
ROW_ID = "00000000-0000-4000-8000-000000000001"
PATHOLOGICAL_ROWS: dict[str, str | bytes] = {
    "unterminated.csv": f'project_id,region_id,image_id,tag:a\n1,2,{ROW_ID},"b\n' + "x\n" * 10_000,
    "nul.csv": f"project_id,region_id,image_id,tag:a\n1,2,{ROW_ID},a\x00b\n",
    "wide.csv": "project_id,region_id,image_id," + ",".join(f"tag:k{i}" for i in range(5000))
    + f"\n1,2,{ROW_ID}," + ",".join("v" for _ in range(5000)) + "\n",
    "ragged.csv": f"project_id,region_id,image_id\n1,2,{ROW_ID},extra,cells\n",
    "no-header.csv": f"1,2,{ROW_ID}\n",
    "latin1.csv": f"project_id,region_id,image_id,tag:a\n1,2,{ROW_ID},caf\xe9\n".encode("latin-1"),
    "cr-only.csv": f"project_id,region_id,image_id,tag:a\r1,2,{ROW_ID},b\r",
    "huge-cell.csv": f"project_id,region_id,image_id,tag:a\n1,2,{ROW_ID}," + "v" * 3_000_000 + "\n",
    "deep.json": "[" * 100_000 + "]" * 100_000,
    "deep-row.json": '[{"project_id": 1, "region_id": 2, "image_id": "' + ROW_ID
    + '", "set_tags": ' + "[" * 50_000 + "]" * 50_000 + "}]",
    "truncated.json": '[{"project_id": 1, "region_id": 2, "image_id": "' + ROW_ID + '"',
    "not-a-list.json": '{"project_id": 1}',
    "deep.jsonl": "[" * 100_000 + "]" * 100_000 + "\n",
    "long-line.jsonl": '{"project_id": 1, "region_id": 2, "image_id": "' + ROW_ID
    + '", "set_tags": {"a": "' + "v" * 3_000_000 + '"}}\n',
    "big-int.jsonl": '{"project_id": ' + "9" * 100_000 + ', "region_id": 2, "image_id": "x"}\n',
    "nan.jsonl": '{"project_id": NaN, "region_id": 2, "image_id": "x"}\n',
    "surrogate.jsonl": '{"project_id": 1, "region_id": 2, "image_id": "' + ROW_ID
    + '", "set_tags": {"a": "\\udc80"}}\n',
    "dup-key.jsonl": '{"project_id": 1, "project_id": 2, "region_id": 2, "image_id": "x"}\n',
}


#: valid despite their looks (a NUL is no whitespace nor '=': the API's tag rules allow it;
#: YAML's own rules refuse it in a job file)
VALID_JOBS = frozenset({"bom-crlf.yaml", "many-tags.yaml"})
VALID_ROWS = frozenset({"wide.csv", "cr-only.csv", "nul.csv"})
#: a JSON escape of a lone UTF-16 surrogate ("\ud800") once passed `validate`, then `run`
#: died with exit 70 writing the journal: now a clean exit 2 naming file and line
@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", sorted(PATHOLOGICAL_JOBS))
def test_pathological_job_files(workdir: Path, name: str) -> None:
    path = workdir / name
    path.write_text(PATHOLOGICAL_JOBS[name], encoding="utf-8")
    job, _ = front_door(path)
    if name in VALID_JOBS:
        assert job is not None, name
    else:
        assert job is None, f"{name} was taken as a valid job"
    assert not (workdir / "pwned").exists()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", sorted(PATHOLOGICAL_ROWS))
def test_pathological_selector_files(workdir: Path, name: str) -> None:
    data = PATHOLOGICAL_ROWS[name]
    path = workdir / f"patho-{name}"
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data, encoding="utf-8")
    host = workdir / "patho-host.yaml"
    host.write_text(ROWS_HOST.format(file=path.name))
    job, rows = front_door(host)
    if name in VALID_ROWS:
        assert job is not None and rows == 1, name
    else:
        assert job is None, f"{name}: {rows} rows read from a broken file"


# -- through the real CLI: exit 2, one line, nothing sent --------------------------------------


def _cli(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GCORE_", "BULK_TAGGER_"))}
    env.update(ENV, GCORE_API_KEY="fuzz-key-0123456789", PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "worker", *map(str, args)], cwd=cwd, env=env,
        capture_output=True, text=True, timeout=90, check=False,
    )


def _invalid_mutants(workdir: Path, count: int) -> Iterator[Path]:
    """Seeded mutants of the example jobs that the front door refuses, one per message kind."""
    rng = random.Random(20261128)
    seen: set[str] = set()
    made = 0
    for n in range(2000):
        source = EXAMPLE_JOBS[n % len(EXAMPLE_JOBS)]
        mutations = [(rng.choice(OPS), rng.randrange(10**6), rng.randrange(10**6),
                      rng.choice(TOKENS)) for _ in range(rng.randint(1, 3))]
        path = workdir / f"cli-mutant-{n}{Path(source).suffix}"
        path.write_text(mutate((workdir / source).read_text(encoding="utf-8"), mutations),
                        encoding="utf-8")
        try:
            job = spec.load_job(path, env=ENV)
            spec.check_selector_files(job, env=ENV)
        except JobError as exc:
            kind = re.sub(r"[^a-z ]", "", exc.message.lower())[:25]
            if kind not in seen:
                seen.add(kind)
                made += 1
                yield path
                if made == count:
                    return
            continue
        path.unlink()


def test_cli_refuses_fuzzed_files_and_sends_nothing(workdir: Path) -> None:
    bad_row = workdir / "bad-deep-row.csv"
    with bad_row.open("w") as fh:
        fh.write("project_id,region_id,image_id,tag:owner\n")
        for i in range(3000):
            fh.write(f"1337,7,00000000-0000-4000-8000-{i:012d},o{i}\n")
        fh.write("1337,7,00000000-0000-4000-8000-999999999999,has space\n")
    bad_row_job = workdir / "bad-deep-row.yaml"
    bad_row_job.write_text(
        "name: deep-bad-row\ntargets:\n  - query: {projects: all, regions: all}\n"
        f"  - file: {bad_row.name}\nchanges:\n  set_tags: {{a: b}}\n"
    )
    mutants = list(_invalid_mutants(workdir, 5))
    assert len(mutants) == 5
    with SimulatorThread(SimConfig(images=30)) as sim:
        runs = [("plan", bad_row_job)] + [
            ("plan" if i % 2 == 0 else "validate", path) for i, path in enumerate(mutants)
        ]

        def one(run: tuple[str, Path]) -> subprocess.CompletedProcess[str]:
            command, path = run
            if command == "validate":
                return _cli(command, path.name, cwd=workdir)
            return _cli(command, path.name, "--base-url", sim.url,
                        "--state-dir", workdir / "state", cwd=workdir)

        with ThreadPoolExecutor(max_workers=3) as pool:
            procs = list(pool.map(one, runs))
        for (command, path), proc in zip(runs, procs, strict=True):
            where = f"{command} {path.name}: {proc.stderr!r}"
            assert proc.returncode == 2, where
            assert "Traceback" not in proc.stderr + proc.stdout, where
            assert proc.stderr.startswith("error: "), where
            assert len(proc.stderr.strip().splitlines()) == 1, where
            assert path.name in proc.stderr or "bad-deep-row.csv:3002" in proc.stderr, where
        assert sim.call(sim.sim.counters.total) == 0
        # the same simulator does see a valid plan: "nothing sent" above is not vacuous
        proc = _cli("plan", "demo.yaml", "--base-url", sim.url, "--state-dir", workdir / "state",
                    cwd=workdir)
        assert proc.returncode in (0, 1), proc.stderr  # 1: demo rows absent from 30 images
        assert sim.call(sim.sim.counters.total) > 0
