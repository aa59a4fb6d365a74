"""The user's reference (docs/job-file.md) and the job file's JSON Schema against the models,
and every example in jobs/ through the real CLI (validate, plan and run under --simulate)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml
from pydantic import BaseModel

from tests.helpers import markdown_table, results, run_cli, run_dirs
from worker import spec
from worker.errors import ExitCode

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "job-file.md"
EXAMPLES = sorted(p for p in (ROOT / "jobs").iterdir() if p.suffix in (".yaml", ".json"))
MODELS: tuple[type[BaseModel], ...] = (
    spec.Job, spec.QuerySelector, spec.Query, spec.FileSelector, spec.ChangesSpec,
    spec.SetFields, spec.Options,
)


def test_every_job_file_field_is_in_the_user_docs() -> None:
    text = DOCS.read_text()
    documented = set(re.findall(r"`([a-z_]+)`", text))
    fields = {name for model in MODELS for name in model.model_fields}
    assert len(fields) > 40  # the walk found the models' fields
    assert fields - documented == set()
    # and the README sends people there, not to a contract the project does not ship
    readme = (ROOT / "README.md").read_text()
    assert "docs/job-file.md" in readme and "project's contract" not in readme


def _validator() -> jsonschema.protocols.Validator:
    schema = spec.job_schema()
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_the_schema_validates_every_example(example: Path) -> None:
    _validator().validate(yaml.safe_load(example.read_text()))


def test_the_schema_refuses_what_the_loader_refuses() -> None:
    validator = _validator()
    job = yaml.safe_load((ROOT / "jobs" / "demo.yaml").read_text())
    for bad in (
        {**job, "optoins": {}},  # an unknown field
        {**job, "targets": []},
        {**job, "targets": [{"query": {"projects": [0], "regions": "all"}}]},
        {**job, "changes": {"set": {"ssh_key": "sometimes"}}},
        {**job, "options": {"concurrency": 0}},
    ):
        assert not validator.is_valid(bad), bad
    # the shorthand the loader takes, the schema takes too
    assert validator.is_valid(
        {**job, "targets": [{"query": {"projects": 1337, "regions": 7, "tag_key": "env"}}]})


def test_the_schema_command_prints_it() -> None:
    proc = run_cli("schema")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == spec.job_schema()


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_every_example_validates_plans_and_runs_cleanly(example: Path, tmp_path: Path) -> None:
    # run_cli leaves out every GCORE_ variable: no example leans on the defaults
    proc = run_cli("validate", example)
    assert proc.returncode == 0, proc.stderr
    assert "valid" in proc.stdout
    for command in ("plan", "run"):
        proc = run_cli(command, example, "--simulate", "--state-dir", tmp_path / command)
        assert proc.returncode == 0, (command, proc.stdout[-2000:], proc.stderr[-2000:])
        (run_dir,) = run_dirs(tmp_path / command)
        rows = results(run_dir)
        wanted = "planned" if command == "plan" else "updated"
        assert any(r["status"] == wanted for r in rows), rows[:3]  # it does something
        assert not [r for r in rows if r["status"] == "failed"]


#: The exit-code tables of README.md and docs/job-file.md, and the codes each must list: every
#: one of ExitCode's, but a pod's table leaves out 130 (a pod has no prompt to Ctrl-C at).
EXIT_TABLES = [
    (ROOT / "README.md", "### Exit codes", set(ExitCode)),
    (ROOT / "README.md", "### 9. Exit codes, and what the CronJob does with them",
     set(ExitCode) - {ExitCode.ABORTED}),
    (DOCS, "## Exit codes", set(ExitCode)),
]


@pytest.mark.parametrize(("doc", "heading", "codes"), EXIT_TABLES,
                         ids=["README", "README-cronjob", "job-file"])
def test_the_exit_code_tables_say_what_exit_code_says(
    doc: Path, heading: str, codes: set[ExitCode]
) -> None:
    header, rows = markdown_table(doc.read_text(), heading)
    assert header[1] == "meaning", header
    ours = [row for row in rows if row[0].isdigit()]  # not "137, 143" nor "any": the pod's
    listed = [(int(row[0]), row[1]) for row in ours]
    wanted = [(int(code), code.meaning) for code in sorted(codes)]
    assert listed == wanted, (
        f"{doc.name}, {heading!r}: the rows should begin, as worker/errors.py has them:\n"
        + "\n".join(f"| {code} | {meaning} |" for code, meaning in wanted))
