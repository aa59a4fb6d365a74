"""Bad job and selector files: the real CLI refuses each with exit 2, naming file, line and field.

The corpus lives in tests/badinput/; CASES below says what each file must be refused for. The
fuzz tests feed load_job and iter_rows arbitrary text and bytes: a Job / rows or a JobError,
never another exception.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker import spec
from worker.errors import JobError

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "badinput"
REPO = HERE.parent


class Case(NamedTuple):
    job: str  # the file given to `validate`
    file: str  # the file the error must name
    line: int | None
    field: str | None
    fragment: str  # a piece of the message or hint
    cli: bool = True  # also run through the CLI (each costs a process start: keep ~30)


CASES: list[Case] = [
    # syntax and encoding
    Case("syntax-yaml.yaml", "syntax-yaml.yaml", 6, None, "YAML syntax error"),
    Case("syntax-tab.yaml", "syntax-tab.yaml", 4, None, "not tabs"),
    Case("syntax-json.json", "syntax-json.json", 6, None, "Expecting ',' delimiter"),
    Case("duplicate-key.yaml", "duplicate-key.yaml", 6, None, "duplicate key 'changes'"),
    Case("top-level-list.yaml", "top-level-list.yaml", 1, None, "must be a mapping", cli=False),
    Case("empty.yaml", "empty.yaml", None, None, "empty", cli=False),
    Case("not-utf8.yaml", "not-utf8.yaml", 4, None, "UTF-8"),
    Case("job-wrong-extension.txt", "job-wrong-extension.txt", None, None, ".yaml, .yml or .json"),
    # unknown keys, wrong types, bad values
    Case("unknown-top-key.yaml", "unknown-top-key.yaml", 2, "target", "did you mean 'targets'"),
    Case(
        "unknown-query-key.yaml",
        "unknown-query-key.yaml",
        6,
        "targets[0].query.visiblity",
        "did you mean 'visibility'",
    ),
    Case(
        "unknown-option.yaml",
        "unknown-option.yaml",
        5,
        "options.concurency",
        "did you mean 'concurrency'",
        cli=False,
    ),
    Case("misplaced-key.yaml", "misplaced-key.yaml", 3, "set_tags", "belongs under changes"),
    Case("bad-name.yaml", "bad-name.yaml", 1, "name", "a-z, 0-9"),
    Case(
        "wrong-type-concurrency.yaml",
        "wrong-type-concurrency.yaml",
        5,
        "options.concurrency",
        "whole number",
        cli=False,
    ),
    Case(
        "negative-rate.yaml",
        "negative-rate.yaml",
        5,
        "options.rate_per_second",
        "greater than 0",
        cli=False,
    ),
    Case(
        "max-percent.json",
        "max-percent.json",
        7,
        "options.max_changes_percent",
        "at most 100",
        cli=False,
    ),
    Case(
        "bad-visibility.yaml",
        "bad-visibility.yaml",
        6,
        "targets[0].query.visibility",
        "private, public, shared",
        cli=False,
    ),
    Case(
        "bad-architecture.json",
        "bad-architecture.json",
        7,
        "targets[0].query.architecture",
        "did you mean 'aarch64'",
    ),
    Case("bad-ssh-key.yaml", "bad-ssh-key.yaml", 5, "changes.set.ssh_key", "did you mean 'allow'"),
    Case(
        "bad-project-id.yaml",
        "bad-project-id.yaml",
        4,
        "targets[0].query.projects[1]",
        "positive whole number",
        cli=False,
    ),
    Case(
        "no-project-default.yaml",
        "no-project-default.yaml",
        3,
        "targets[0].query.projects",
        "GCORE_CLOUD_PROJECT_ID",
    ),
    Case(
        "bad-tag-key.yaml", "bad-tag-key.yaml", 5, 'changes.set_tags["cost centre"]', "whitespace"
    ),
    Case("bad-tag-value.yaml", "bad-tag-value.yaml", 5, "changes.set_tags.owner", "'='", cli=False),
    Case(
        "tag-value-too-long.yaml",
        "tag-value-too-long.yaml",
        5,
        "changes.set_tags.note",
        "at most 255",
        cli=False,
    ),
    Case(
        "tag-value-number.yaml",
        "tag-value-number.yaml",
        5,
        "changes.set_tags.cost-centre",
        'quote it: "4711"',
    ),
    # exclusive and conflicting changes, nothing to do
    Case(
        "replace-with-set.yaml",
        "replace-with-set.yaml",
        5,
        "changes.replace_tags",
        "cannot be combined with set_tags",
    ),
    Case(
        "set-and-remove.yaml",
        "set-and-remove.yaml",
        7,
        "changes.remove_tags[1]",
        "both set and removed",
    ),
    Case(
        "rename-conflict.yaml",
        "rename-conflict.yaml",
        6,
        "changes.rename_tags.team",
        "conflicts with set_tags",
        cli=False,
    ),
    Case("no-changes.yaml", "no-changes.yaml", 4, "changes", "nothing to do"),
    # targets
    Case("empty-targets.yaml", "empty-targets.yaml", 2, "targets", "must not be empty"),
    Case("missing-targets.yaml", "missing-targets.yaml", 1, "targets", "is required", cli=False),
    Case("target-both.yaml", "target-both.yaml", 3, "targets[0]", "not both"),
    Case("missing-file.yaml", "missing-file.yaml", 4, "targets[1].file", "not found"),
    Case("wrong-extension.yaml", "wrong-extension.yaml", 3, "targets[0].file", "extension"),
    # templates and regexes
    Case(
        "bad-template.yaml",
        "bad-template.yaml",
        5,
        "changes.set_tags.retagged-on",
        "did you mean {run.date}",
    ),
    # a field no image has: refused up front, not failed on every target
    Case(
        "bad-template-field.yaml",
        "bad-template-field.yaml",
        6,
        "changes.set_tags.built-from",
        "an image has no field 'nmae' (hint: did you mean {image.name}?)",
    ),
    Case(
        "csv-bad-template-field.yaml",
        "csv-bad-template-field.csv",
        3,
        "tag:owner",
        "did you mean {image.os_distro}?",
        cli=False,
    ),
    Case(
        "bad-template-brace.yaml",
        "bad-template-brace.yaml",
        5,
        "changes.set.name",
        "unmatched '{'",
        cli=False,
    ),
    Case(
        "bad-regex.yaml",
        "bad-regex.yaml",
        6,
        "targets[0].query.name_regex",
        "not a valid regular expression",
    ),
    # CSV selector files
    Case("csv-unknown-column.yaml", "csv-unknown-column.csv", 1, "tags:owner", "tag:owner"),
    Case("csv-bad-id.yaml", "csv-bad-id.csv", 3, "region_id", "positive whole number"),
    Case("csv-empty-image-id.yaml", "csv-empty-image-id.csv", 4, "image_id", "is empty", cli=False),
    Case("csv-bad-enum.yaml", "csv-bad-enum.csv", 3, "ssh_key", "allow, deny, required"),
    Case("csv-bad-tag-value.yaml", "csv-bad-tag-value.csv", 2, "tag:owner", "whitespace"),
    Case(
        "csv-missing-image-id.yaml",
        "csv-missing-image-id.csv",
        1,
        "id",
        "unknown column",
        cli=False,
    ),
    Case("csv-no-region.yaml", "csv-no-region.csv", 1, "region_id", "GCORE_CLOUD_REGION_ID"),
    Case("csv-ragged.yaml", "csv-ragged.csv", 4, "tag:owner", "3 cells", cli=False),
    Case("csv-empty.yaml", "csv-empty.csv", 1, None, "empty", cli=False),
    Case("csv-bad-baremetal.yaml", "csv-bad-baremetal.csv", 3, "is_baremetal", "yes/no", cli=False),
    Case("csv-row-no-changes.yaml", "csv-row-no-changes.csv", 3, "image_id", "nothing to do"),
    # JSON and JSON Lines selector files
    Case("json-rows-syntax.yaml", "json-rows-syntax.json", 4, None, "expected ',' or ']'"),
    Case(
        "json-rows-unknown-key.yaml",
        "json-rows-unknown-key.json",
        3,
        "tags",
        "did you mean 'set_tags'",
    ),
    Case(
        "json-rows-not-list.yaml",
        "json-rows-not-list.json",
        1,
        None,
        "list of row objects",
        cli=False,
    ),
    Case("jsonl-bad-id.yaml", "jsonl-bad-id.jsonl", 2, "project_id", "positive whole number"),
    Case("jsonl-syntax.yaml", "jsonl-syntax.ndjson", 3, None, "JSON syntax error"),
    Case(
        "jsonl-bad-set.yaml", "jsonl-bad-set.jsonl", 1, "set.hw_machine_type", "pc, q35", cli=False
    ),
]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GCORE_", "BULK_TAGGER_"))}
    env["PYTHONPATH"] = str(REPO)
    return env


def _validate(job: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker", "validate", job],
        cwd=CORPUS,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture(scope="module")
def results() -> dict[str, subprocess.CompletedProcess[str]]:
    """Every corpus case through the real CLI, a few at a time."""
    jobs = [case.job for case in CASES if case.cli]
    with ThreadPoolExecutor(max_workers=3) as pool:
        return dict(zip(jobs, pool.map(_validate, jobs), strict=True))


def test_corpus_is_big_and_every_file_is_used() -> None:
    assert len(CASES) >= 30 and len(CLI_CASES) >= 30
    named = {case.job for case in CASES} | {case.file for case in CASES}
    on_disk = {p.name for p in CORPUS.iterdir()}
    assert named <= on_disk, named - on_disk
    assert on_disk == named, on_disk - named


CLI_CASES = [case for case in CASES if case.cli]


@pytest.mark.parametrize("case", CLI_CASES, ids=[case.job for case in CLI_CASES])
def test_cli_refuses_bad_input(
    case: Case, results: dict[str, subprocess.CompletedProcess[str]]
) -> None:
    proc = results[case.job]
    err = proc.stderr
    assert proc.returncode == 2, (proc.returncode, err)
    assert "Traceback" not in err and "Traceback" not in proc.stdout
    assert err.startswith("error: "), err
    where = f"{case.file}: " if case.line is None else f"{case.file}:{case.line}: "
    assert where in err, err
    if case.field is not None:
        assert f": {case.field}: " in err, err
    assert case.fragment in err, err
    assert "pydantic" not in err and "errors.pydantic.dev" not in err
    # the case's mistake first; validate names every other one on a line of its own, no dump
    first, *others = err.strip().splitlines()
    assert where in first and case.fragment in first, err
    assert all(line.startswith("error: ") for line in others), err


def test_the_same_errors_through_the_api() -> None:
    """load_job + check_selector_files raise the JobError the CLI printed (no subprocess)."""
    for case in CASES:
        with pytest.raises(JobError) as info:
            job = spec.load_job(CORPUS / case.job, env={})
            spec.check_selector_files(job, env={})
        err = info.value
        assert err.file is not None and Path(err.file).name == case.file, (case, err)
        assert (err.line, err.field) == (case.line, case.field), (case, str(err))


def test_good_examples_pass_the_cli() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "worker", "validate", "jobs/demo.yaml"],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "valid" in proc.stdout


# --------------------------------------------------------------------------------------------
# Fuzzing: anything in, a Job / rows or a JobError out

FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def fuzzdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("fuzz")
    (folder / "rows.csv").write_text("project_id,region_id,image_id,tag:a\n1,2,x,b\n")
    return folder


def _load(path: Path) -> None:
    try:
        job = spec.load_job(path, env={"GCORE_CLOUD_PROJECT_ID": "1"})
        spec.check_selector_files(job, env={})
    except JobError as exc:
        assert str(exc)
        assert exc.file is not None


@FUZZ
@given(text=st.text(), suffix=st.sampled_from([".yaml", ".json"]))
def test_fuzz_job_text(fuzzdir: Path, text: str, suffix: str) -> None:
    path = fuzzdir / f"job{suffix}"
    path.write_text(text, encoding="utf-8")
    _load(path)


@FUZZ
@given(data=st.binary(), suffix=st.sampled_from([".yaml", ".yml", ".json"]))
def test_fuzz_job_bytes(fuzzdir: Path, data: bytes, suffix: str) -> None:
    path = fuzzdir / f"job{suffix}"
    path.write_bytes(data)
    _load(path)


YAMLISH = st.lists(
    st.sampled_from(
        [
            "name: x",
            "targets:",
            "  - query:",
            "      projects: all",
            "      regions: [1, 2]",
            "  - file: rows.csv",
            "changes:",
            "  set_tags: {a: b}",
            "  remove_tags: [a]",
            "  set: {ssh_key: allow}",
            "options:",
            "  concurrency: 0",
            "  page_size: 1000",
            "    visibility: private",
            "&a",
            "*a",
            "<<: *a",
            "- ",
            ": ",
            "{",
            "}",
            "[",
            "]",
            "'",
            '"',
            "#",
            "\t",
            "!!binary",
            "!!python/object:os.system",
            "2024-01-01",
            "010",
            "~",
            "? ",
            "---",
            "...",
            "%YAML 1.2",
            "{run.date}",
            "{x}",
            "=",
            "0x1F",
            ".inf",
        ]
    ),
    max_size=20,
).map("\n".join)


@FUZZ
@given(text=YAMLISH)
def test_fuzz_job_yaml_fragments(fuzzdir: Path, text: str) -> None:
    path = fuzzdir / "frag.yaml"
    path.write_text(text, encoding="utf-8")
    _load(path)


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=8)
    | st.sampled_from(["all", "private", "allow", "{run.date}", "rows.csv", "x" * 300]),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
PATHS = st.sampled_from(
    [
        ("name",),
        ("targets",),
        ("targets", 0),
        ("targets", 0, "query"),
        ("targets", 0, "query", "projects"),
        ("targets", 0, "query", "tag_key"),
        ("targets", 0, "query", "has_tags"),
        ("targets", 0, "query", "name_regex"),
        ("targets", 1, "file"),
        ("targets", 1, "format"),
        ("changes",),
        ("changes", "set_tags"),
        ("changes", "set_tags", "k"),
        ("changes", "remove_tags"),
        ("changes", "rename_tags"),
        ("changes", "replace_tags"),
        ("changes", "set"),
        ("changes", "set", "is_baremetal"),
        ("options",),
        ("options", "concurrency"),
        ("options", "rate_per_second"),
        ("extra",),
    ]
)


def _good_job() -> dict[str, Any]:
    return {
        "name": "fuzz",
        "targets": [{"query": {"projects": [1], "regions": "all"}}, {"file": "rows.csv"}],
        "changes": {"set_tags": {"a": "b"}, "set": {"ssh_key": "allow"}},
        "options": {"concurrency": 4},
    }


@FUZZ
@given(path=PATHS, value=JSON_VALUES, as_json=st.booleans())
def test_fuzz_job_structure(
    fuzzdir: Path, path: tuple[Any, ...], value: Any, as_json: bool
) -> None:
    job = _good_job()
    node: Any = job
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    if as_json:
        target = fuzzdir / "struct.json"
        target.write_text(json.dumps(job, indent=1))
    else:
        target = fuzzdir / "struct.yaml"
        target.write_text(yaml.safe_dump(job))
    _load(target)


def _rows(fuzzdir: Path, name: str) -> None:
    job_path = fuzzdir / "rowjob.yaml"
    job_path.write_text(f"name: rows\ntargets: [{{file: {name}}}]\nchanges: {{}}\n")
    job = spec.load_job(job_path, env={})
    try:
        for row in spec.iter_rows(job, job.file_selectors[0], env={"GCORE_CLOUD_REGION_ID": "3"}):
            assert row.image_id and row.project_id > 0 and row.region_id > 0 and row.line >= 1
            assert not row.changes.is_empty()
    except JobError as exc:
        assert exc.file is not None and exc.file.endswith(name)


@FUZZ
@given(text=st.text(), name=st.sampled_from(["f.csv", "f.json", "f.jsonl"]))
def test_fuzz_rows_text(fuzzdir: Path, text: str, name: str) -> None:
    (fuzzdir / name).write_text(text, encoding="utf-8")
    _rows(fuzzdir, name)


@FUZZ
@given(data=st.binary(), name=st.sampled_from(["f.csv", "f.json", "f.jsonl"]))
def test_fuzz_rows_bytes(fuzzdir: Path, data: bytes, name: str) -> None:
    (fuzzdir / name).write_bytes(data)
    _rows(fuzzdir, name)


CELLS = st.sampled_from(
    [
        "1",
        "2",
        "0",
        "-1",
        "x",
        "",
        " ",
        "a b",
        "allow",
        "yes",
        "maybe",
        "a;b",
        ";",
        "{run.id}",
        "{bad}",
        '"',
        "\n",
        "1.5",
        "=",
        "é",
    ]
)
HEADERS = st.lists(
    st.sampled_from(
        [
            "project_id",
            "region_id",
            "image_id",
            "tag:a",
            "tag:",
            "tag:a b",
            "remove_tags",
            "ssh_key",
            "is_baremetal",
            "name",
            "nope",
            "",
        ]
    ),
    min_size=1,
    max_size=6,
)


@FUZZ
@given(header=HEADERS, rows=st.lists(st.lists(CELLS, max_size=7), max_size=5))
def test_fuzz_csv_structure(fuzzdir: Path, header: list[str], rows: list[list[str]]) -> None:
    import csv
    import io

    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    writer.writerows(rows)
    (fuzzdir / "s.csv").write_text(out.getvalue(), encoding="utf-8")
    _rows(fuzzdir, "s.csv")


@FUZZ
@given(
    rows=st.lists(
        JSON_VALUES
        | st.fixed_dictionaries(
            {"image_id": st.text(max_size=5)},
            optional={
                "project_id": JSON_VALUES,
                "set_tags": JSON_VALUES,
                "remove_tags": JSON_VALUES,
                "set": JSON_VALUES,
                "region_id": st.integers(),
            },
        ),
        max_size=4,
    ),
    as_list=st.booleans(),
)
def test_fuzz_json_rows_structure(fuzzdir: Path, rows: list[Any], as_list: bool) -> None:
    if as_list:
        (fuzzdir / "s.json").write_text(json.dumps(rows, indent=1))
        _rows(fuzzdir, "s.json")
    else:
        (fuzzdir / "s.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
        _rows(fuzzdir, "s.jsonl")
