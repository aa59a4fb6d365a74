"""The job file and selector files: good jobs, defaults, line numbers, rows and their changes."""

from __future__ import annotations

import json
import textwrap
import tracemalloc
from pathlib import Path

import pytest

from worker import spec
from worker.errors import JobError
from worker.models import Changes, Image
from worker.spec import FileSelector, QuerySelector, Row, iter_rows, load_job

REPO = Path(__file__).resolve().parent.parent
NO_ENV: dict[str, str] = {}
ENV = {"GCORE_CLOUD_PROJECT_ID": "1337", "GCORE_CLOUD_REGION_ID": "7"}

FULL_YAML = """\
name: nightly-owner-tags
description: every option and change kind
targets:
  - query:
      projects: [1337, 1338]
      regions: all
      name: ubuntu
      os_distro: ubuntu
      os_version: "22.04"
      visibility: private
      architecture: x86_64
      tag_key: env
      tag_key_value: {env: prod}
      name_glob: "ubuntu-*"
      name_regex: "-v[0-9]+$"
      has_tags: {env: prod, team: "*"}
      missing_tags: [owner]
  - file: owners.csv
  - file: rows.data
    format: jsonl
changes:
  set_tags: {managed-by: bulk-tagger, retagged-on: "{run.date}", origin: "{tags.team}-{run.id}"}
  remove_tags: [legacy]
  rename_tags: {team: owner}
  set:
    name: "{image.name}-v2"
    os_type: linux
    ssh_key: allow
    hw_firmware_type: uefi
    hw_machine_type: q35
    is_baremetal: false
options:
  concurrency: 64
  rate_per_second: 12.5
  max_changes: 5000
  max_changes_percent: 50
  lock_timeout_seconds: 30
  retry_budget_seconds: 120
  on_read_only: partial
  page_size: 500
"""


def matches(query: spec.Query, image: Image) -> bool:
    """Whether ``query``'s client-side filters let ``image`` through."""
    match = query.matcher()
    return match is None or match(image)


def write(folder: Path, name: str, text: str | bytes) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def job_error(path: Path, env: dict[str, str] | None = None) -> JobError:
    with pytest.raises(JobError) as info:
        job = load_job(path, env=NO_ENV if env is None else env)
        spec.check_selector_files(job, env=NO_ENV if env is None else env)
    return info.value


@pytest.fixture
def full(tmp_path: Path) -> Path:
    write(tmp_path, "owners.csv", "project_id,region_id,image_id,tag:owner\n1,2,img-1,alice\n")
    write(tmp_path, "rows.data", '{"project_id": 1, "region_id": 2, "image_id": "img-2"}\n')
    return write(tmp_path, "job.yaml", FULL_YAML)


def test_full_yaml_job(full: Path) -> None:
    job = load_job(full, env=NO_ENV)
    assert job.name == "nightly-owner-tags"
    assert job.path == full.resolve()
    assert len(job.sha256) == 64
    query = job.targets[0]
    assert isinstance(query, QuerySelector)
    q = query.query
    assert q.projects == [1337, 1338]
    assert q.regions == "all"
    assert q.tag_key == ["env"]
    assert q.os_version == "22.04"
    csv_sel, jsonl_sel = job.targets[1], job.targets[2]
    assert isinstance(csv_sel, FileSelector) and isinstance(jsonl_sel, FileSelector)
    assert csv_sel.format == "csv" and csv_sel.path == (full.parent / "owners.csv").resolve()
    assert jsonl_sel.format == "jsonl"
    opts = job.options
    assert (opts.concurrency, opts.rate_per_second, opts.max_changes) == (64, 12.5, 5000)
    assert (opts.max_changes_percent, opts.lock_timeout_seconds) == (50, 30)
    assert (opts.retry_budget_seconds, opts.on_read_only, opts.page_size) == (120, "partial", 500)
    changes = job.changes_model()
    assert changes == Changes(
        set_tags={
            "managed-by": "bulk-tagger",
            "retagged-on": "{run.date}",
            "origin": "{tags.team}-{run.id}",
        },
        remove_tags=("legacy",),
        rename_tags={"team": "owner"},
        set_fields={
            "name": "{image.name}-v2",
            "os_type": "linux",
            "ssh_key": "allow",
            "hw_firmware_type": "uefi",
            "hw_machine_type": "q35",
            "is_baremetal": False,
        },
    )
    assert spec.check_selector_files(job, env=NO_ENV) == {"owners.csv": 1, "rows.data": 1}


def test_json_job_is_the_same_schema(full: Path) -> None:
    import yaml

    data = yaml.safe_load(full.read_text())
    json_path = write(full.parent, "job.json", json.dumps(data, indent=2))
    from_yaml, from_json = load_job(full, env=NO_ENV), load_job(json_path, env=NO_ENV)
    assert from_json.model_dump() == from_yaml.model_dump()
    assert from_json.sha256 != from_yaml.sha256


def test_defaults(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "job.yaml",
        """\
        name: minimal
        targets:
          - query: {}
        changes:
          set_tags: {a: b}
        options:
        """,
    )
    job = load_job(path, env=ENV)
    query = job.targets[0]
    assert isinstance(query, QuerySelector)
    assert (query.query.projects, query.query.regions) == ([1337], [7])
    opts = job.options
    assert (opts.concurrency, opts.rate_per_second, opts.max_changes) == (16, None, None)
    assert (opts.lock_timeout_seconds, opts.retry_budget_seconds) == (900, 600)
    assert (opts.on_read_only, opts.page_size, opts.max_changes_percent) == ("skip", 1000, None)
    assert job.changes.replace_tags is None


def test_env_defaults_missing_name_the_variable(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "job.yaml",
        """\
        name: minimal
        targets:
          - query:
              regions: [7]
        changes: {set_tags: {a: b}}
        """,
    )
    err = job_error(path)
    assert err.field == "targets[0].query.projects"
    assert err.line == 3
    assert "GCORE_CLOUD_PROJECT_ID" in str(err)
    err = job_error(path, env={"GCORE_CLOUD_PROJECT_ID": "twelve"})
    assert "GCORE_CLOUD_PROJECT_ID" in err.message and err.field == "targets[0].query.projects"
    job = load_job(path, env={"GCORE_CLOUD_PROJECT_ID": "42"})
    assert isinstance(job.targets[0], QuerySelector)
    assert job.targets[0].query.projects == [42]


def test_env_defaults_come_from_os_environ(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GCORE_CLOUD_PROJECT_ID", "5")
    monkeypatch.setenv("GCORE_CLOUD_REGION_ID", "6")
    path = write(
        tmp_path, "job.yaml", "name: x\ntargets: [{query: {}}]\nchanges: {remove_tags: [a]}\n"
    )
    target = load_job(path).targets[0]
    assert isinstance(target, QuerySelector)
    assert (target.query.projects, target.query.regions) == ([5], [6])


def test_yaml_12_scalars(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "job.yaml",
        """\
        name: scalars
        targets: [{query: {projects: [010], regions: [0x1F]}}]
        changes:
          set_tags: {country: no, at: "12:30", day: 2024-01-01, clock: 12:30}
        """,
    )
    job = load_job(path, env=NO_ENV)
    target = job.targets[0]
    assert isinstance(target, QuerySelector)
    assert (target.query.projects, target.query.regions) == ([10], [31])
    assert job.changes.set_tags == {
        "country": "no",
        "at": "12:30",
        "day": "2024-01-01",
        "clock": "12:30",
    }


def test_yaml_anchors_and_merge_keys(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "job.yaml",
        """\
        name: anchors
        targets:
          - query: &base {projects: [1], regions: [2], visibility: private}
          - query: {<<: *base, visibility: public}
        changes: {set_tags: {a: b}}
        """,
    )
    job = load_job(path, env=NO_ENV)
    queries = [t.query for t in job.targets if isinstance(t, QuerySelector)]
    assert [q.visibility for q in queries] == ["private", "public"]
    assert queries[1].projects == [1]


@pytest.mark.parametrize(
    ("text", "line", "field", "fragment"),
    [
        (
            "name: x\ntargets:\n  - query:\n      visiblity: private\n"
            "      projects: all\n      regions: all\n",
            4,
            "targets[0].query.visiblity",
            "did you mean 'visibility'",
        ),
        (
            "name: x\ntargets: [{query: {projects: all, regions: all}}]\n\n\nchanges:\n"
            "  set_tags:\n    ok: 1\n",
            7,
            "changes.set_tags.ok",
            'quote it: "1"',
        ),
        (
            "name: x\ntargets: [{query: {projects: all, regions: all}}]\nchanges:\n  set: {}\n"
            "options:\n  concurrency: 10\n  page_size: 5000\n",
            7,
            "options.page_size",
            "at most",
        ),
        (
            "name: x\ntargets: [{query: {projects: all, regions: all}}]\nchanges:\n  set: {}\n",
            3,
            "changes",
            "nothing to do",
        ),
        (
            "name: x\ntargets:\n- file: a.csv\n- query: {projects: all, regions: [1, -2]}\n"
            "changes: {set_tags: {a: b}}\n",
            3,
            "targets[0].file",
            "not found",
        ),
        (
            "name: x\ntargets:\n- {query: {projects: all, regions: all}}\n"
            "changes: {set_tags: {a: b}, remove_tags: [c, a]}\n",
            4,
            "changes.remove_tags[1]",
            "both set and removed",
        ),
        ("name: x\nname: y\n", 2, None, "duplicate key"),
        ("name: x\ntargets: [\n", 3, None, "YAML syntax error"),
        ("name: x\n\ttargets: []\n", 2, None, "tabs"),
        (
            "concurrency: 3\nname: x\ntargets: [{query: {projects: all, regions: all}}]\n"
            "changes: {set_tags: {a: b}}\n",
            1,
            "concurrency",
            "belongs under options",
        ),
    ],
)
def test_yaml_errors_name_line_and_field(
    tmp_path: Path, text: str, line: int, field: str | None, fragment: str
) -> None:
    err = job_error(write(tmp_path, "job.yaml", text))
    assert (err.line, err.field) == (line, field), str(err)
    assert fragment in str(err)
    assert str(err).startswith(f"{tmp_path / 'job.yaml'}:{line}: ")


def test_json_errors_name_line_and_field(tmp_path: Path) -> None:
    good = {
        "name": "x",
        "targets": [{"query": {"projects": "all", "regions": "all"}}],
        "changes": {"set_tags": {"a": "b"}},
    }
    text = json.dumps(good, indent=2)
    bad = text.replace('"regions": "all"', '"regions": "all",\n        "visibility": "secret"')
    err = job_error(write(tmp_path, "job.json", bad))
    assert (err.field, err.line) == ("targets[0].query.visibility", 8), str(err)
    assert "private, public, shared" in err.message
    broken = text.replace('"b"', '"b"\n,,')
    err = job_error(write(tmp_path, "job.json", broken))
    assert err.line == broken.splitlines().index(",,") + 1 and "JSON syntax error" in err.message
    twice = text.replace('"a": "b"', '"a": "b",\n "a": "c"')
    err = job_error(write(tmp_path, "job.json", twice))
    assert err.line == twice.splitlines().index(' "a": "c"') + 1 and "duplicate key" in err.message


def test_selector_format_from_extension(tmp_path: Path) -> None:
    for name in ("a.csv", "b.json", "c.jsonl", "d.NDJSON"):
        write(tmp_path, name, "")
    path = write(
        tmp_path,
        "job.yaml",
        """\
        name: formats
        targets: [{file: a.csv}, {file: b.json}, {file: c.jsonl}, {file: d.NDJSON}]
        changes: {set_tags: {a: b}}
        """,
    )
    job = load_job(path, env=NO_ENV)
    assert [t.format for t in job.file_selectors] == ["csv", "json", "jsonl", "jsonl"]


def test_query_server_params_and_matches(full: Path) -> None:
    job = load_job(full, env=NO_ENV)
    target = job.targets[0]
    assert isinstance(target, QuerySelector)
    q = target.query
    assert q.server_params() == [
        ("name", "ubuntu"),
        ("os_distro", "ubuntu"),
        ("os_version", "22.04"),
        ("visibility", "private"),
        ("architecture", "x86_64"),
        ("tag_key", "env"),
        ("tag_key_value", '{"env":"prod"}'),
    ]

    def image(name: str, **tags: str) -> Image:
        return Image.from_api(
            {"id": "i", "name": name, "tags": dict(tags)}, project_id=1, region_id=2
        )

    assert matches(q, image("ubuntu-22-v3", env="prod", team="core"))
    assert not matches(q, image("debian-22-v3", env="prod", team="core"))  # glob
    assert not matches(q, image("ubuntu-22-v3-beta", env="prod", team="core"))  # regex
    assert not matches(q, image("ubuntu-22-v3", env="dev", team="core"))  # has_tags value
    assert not matches(q, image("ubuntu-22-v3", env="prod"))  # has_tags "*"
    assert not matches(q, image("ubuntu-22-v3", env="prod", team="core", owner="x"))  # missing


def test_tag_key_list_repeats(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "job.yaml",
        "name: x\ntargets: [{query: {projects: all, regions: all, tag_key: [a, b]}}]\n"
        "changes: {set_tags: {a: b}}\n",
    )
    target = load_job(path).targets[0]
    assert isinstance(target, QuerySelector)
    assert target.query.server_params() == [("tag_key", "a"), ("tag_key", "b")]
    assert matches(target.query, Image.from_api({"id": "i", "name": "anything", "tags": []}))


def test_templates() -> None:
    assert spec.template_fields("{image.name}-{tags.k8s:cluster}-{{x}}-{run.id}") == [
        "image.name",
        "tags.k8s:cluster",
        "run.id",
    ]
    for bad in ("{run.time}", "{image}", "{image.a.b}", "{tags.}", "a}b", "{x", "{}"):
        with pytest.raises(ValueError):
            spec.template_fields(bad)


def test_is_baremetal_as_text_reads_by_the_one_rule(tmp_path: Path) -> None:
    """The job file reads is_baremetal text as a CSV cell is read (worker.templates)."""
    head = "name: x\ntargets: [{query: {projects: all, regions: all}}]\n"
    path = write(tmp_path, "job.yaml", head + 'changes: {set: {is_baremetal: "yes"}}\n')
    assert load_job(path, env={}).changes_model().set_fields == {"is_baremetal": True}
    path = write(tmp_path, "bad.yaml", head + "changes: {set: {is_baremetal: maybe}}\n")
    with pytest.raises(JobError, match="true/false, yes/no or 1/0") as info:
        load_job(path, env={})
    assert (info.value.line, info.value.field) == (3, "changes.set.is_baremetal")


# --------------------------------------------------------------------------------------------
# Rows


def rows_of(
    tmp_path: Path,
    name: str,
    text: str,
    *,
    changes: str = "{set_tags: {job: yes}}",
    env: dict[str, str] | None = None,
) -> list[Row]:
    write(tmp_path, name, text)
    path = write(
        tmp_path, "job.yaml", f"name: rows\ntargets: [{{file: {name}}}]\nchanges: {changes}\n"
    )
    job = load_job(path, env=NO_ENV)
    selector = job.file_selectors[0]
    return list(iter_rows(job, selector, env=NO_ENV if env is None else env))


def test_csv_rows(tmp_path: Path) -> None:
    rows = rows_of(
        tmp_path,
        "owners.csv",
        "project_id,region_id,image_id,tag:owner,tag:env,remove_tags,ssh_key,is_baremetal,name\n"
        "1337,7,img-1,alice,,legacy; old,allow,yes,\n"
        "\n"
        '1337,76,img-2,bob,prod,,,,"multi\nline name"\n'
        " 2001 ,38,img-3,,,,,0,{image.name}-x\n",
    )
    assert [(r.project_id, r.region_id, r.image_id, r.line) for r in rows] == [
        (1337, 7, "img-1", 2),
        (1337, 76, "img-2", 4),
        (2001, 38, "img-3", 6),
    ]
    assert rows[0].changes == Changes(
        set_tags={"owner": "alice"},
        remove_tags=("legacy", "old"),
        set_fields={"ssh_key": "allow", "is_baremetal": True},
    )
    assert rows[1].changes.set_fields == {"name": "multi\nline name"}
    assert rows[1].changes.set_tags == {"owner": "bob", "env": "prod"}
    assert rows[2].changes == Changes(set_fields={"is_baremetal": False, "name": "{image.name}-x"})
    assert rows[0].file == "owners.csv"


def test_csv_ids_from_env(tmp_path: Path) -> None:
    rows = rows_of(tmp_path, "ids.csv", "image_id\nimg-1\n", env=ENV)
    assert [(r.project_id, r.region_id, r.image_id) for r in rows] == [(1337, 7, "img-1")]
    with pytest.raises(JobError) as info:
        rows_of(tmp_path, "ids.csv", "image_id\nimg-1\n", env={"GCORE_CLOUD_PROJECT_ID": "1"})
    assert (info.value.line, info.value.field) == (1, "region_id")
    assert "GCORE_CLOUD_REGION_ID" in str(info.value)


@pytest.mark.parametrize(
    ("text", "line", "field", "fragment"),
    [
        ("project_id,region_id,image_id,tags:owner\n", 1, "tags:owner", "tag:owner"),
        ("project_id,region_id,image\n", 1, "image", "did you mean 'image_id'"),
        ("project_id,region_id,image_id\n1,2,a\n1.5,2,b\n", 3, "project_id", "whole number"),
        ("project_id,region_id,image_id\n1,2,\n", 2, "image_id", "empty"),
        ('project_id,region_id,image_id,ssh_key\n1,2,"a\nb",\n', 2, "image_id", "not an image ID"),
        ("project_id,region_id,image_id,ssh_key\n1,2,a,maybe\n", 2, "ssh_key", "allow, deny"),
        ("project_id,region_id,image_id,tag:env\n1,2,a,pro d\n", 2, "tag:env", "whitespace"),
        ("project_id,region_id,image_id,tag:a=b\n", 1, "tag:a=b", "'='"),
        ("project_id,region_id,image_id\n1,2\n", 2, "image_id", "2 cells"),
        ("project_id,region_id,image_id\n1,2,a,b\n", 2, "column 4", "4 cells"),
        ("project_id,region_id,image_id,is_baremetal\n1,2,a,maybe\n", 2, "is_baremetal", "yes/no"),
        ("project_id,region_id,image_id,tag:a,remove_tags\n1,2,x,1,a\n", 2, "remove_tags", "both"),
        ("project_id,region_id,image_id,tag:a\n1,2,x,{run.time}\n", 2, "tag:a", "template"),
        ("", 1, None, "empty"),
        ('project_id,region_id,image_id\n1,2,"a"b\n', 2, None, "CSV syntax error"),
    ],
)
def test_csv_errors(tmp_path: Path, text: str, line: int, field: str | None, fragment: str) -> None:
    with pytest.raises(JobError) as info:
        rows_of(tmp_path, "rows.csv", text)
    err = info.value
    assert (err.line, err.field) == (line, field), str(err)
    assert fragment in str(err)
    assert err.file == str(tmp_path / "rows.csv")


def test_json_rows_list_and_lines(tmp_path: Path) -> None:
    rows = [
        {"project_id": 1, "region_id": 2, "image_id": "a", "set_tags": {"o": "x"}},
        {
            "project_id": 1,
            "region_id": 3,
            "image_id": "b",
            "remove_tags": ["t"],
            "set": {"ssh_key": "deny", "is_baremetal": True},
        },
        {"project_id": 4, "region_id": 5, "image_id": "c", "set_tags": {}, "set": None},
    ]
    text = "[\n" + ",\n\n".join(json.dumps(r) for r in rows) + "\n]\n"
    got = rows_of(tmp_path, "rows.json", text)
    assert [(r.image_id, r.line) for r in got] == [("a", 2), ("b", 4), ("c", 6)]
    assert got[0].changes == Changes(set_tags={"o": "x"})
    assert got[1].changes == Changes(
        remove_tags=("t",), set_fields={"ssh_key": "deny", "is_baremetal": True}
    )
    assert got[2].changes.is_empty()
    lines = "\n".join(json.dumps(r) for r in rows) + "\n\n"
    got_l = rows_of(tmp_path, "rows.jsonl", lines)
    assert [(r.image_id, r.line, r.changes) for r in got_l] == [
        (r.image_id, i + 1, r.changes) for i, r in enumerate(got)
    ]
    assert rows_of(tmp_path, "empty.json", " [ ] ") == []


@pytest.mark.parametrize(
    ("name", "text", "line", "field", "fragment"),
    [
        (
            "r.json",
            '[\n{"image_id": "a", "project_id": 1, "region_id": 2}\n{"image_id": "b"}]',
            3,
            None,
            "expected ',' or ']'",
        ),
        (
            "r.json",
            '[\n  {"image_id": "a", "project_id": 1, "region_id": 2, "tags": {}}\n]',
            2,
            "tags",
            "unknown key",
        ),
        ("r.json", '{"image_id": "a"}', 1, None, "list of row objects"),
        ("r.json", '[{"image_id": "a", "project_id": 1, "region_id": 2},]', 1, None, "comma"),
        ("r.json", '[{"image_id": "a", "project_id": 1, "region_id": 2}', 1, None, "not closed"),
        ("r.json", '[{"image_id": "a", "project_id": 1, "region_id": 2}] x', 1, None, "after"),
        (
            "r.jsonl",
            '{"image_id": "a", "project_id": 1, "region_id": 2}\n\n{"image_id": "b", '
            '"project_id": "1", "region_id": 2}\n',
            3,
            "project_id",
            "positive whole number",
        ),
        (
            "r.jsonl",
            '{"image_id": "a", "project_id": 1, "region_id": 2, "set": {"os_type": "macos"}}\n',
            1,
            "set.os_type",
            "linux, windows",
        ),
        (
            "r.jsonl",
            '{"image_id": "a", "project_id": 1, "region_id": 2, "set_tags": {"k": 1}}',
            1,
            "set_tags.k",
            "must be text",
        ),
        (
            "r.jsonl",
            '{"image_id": "a", "project_id": 1, "region_id": 2, "set": {"nam": "x"}}',
            1,
            "set.nam",
            "did you mean 'name'",
        ),
        (
            "r.jsonl",
            '{"image_id": "a", "image_id": "b", "project_id": 1, "region_id": 2}',
            1,
            "image_id",
            "duplicate",
        ),
        ("r.jsonl", '{"image_id": "a", "project_id": 1}', 1, "region_id", "GCORE_CLOUD_REGION_ID"),
        (
            "r.jsonl",
            '{"image_id": "a", "project_id": 1, "region_id": 2, "remove_tags": ["a b"]}',
            1,
            "remove_tags[0]",
            "whitespace",
        ),
        ("r.jsonl", "\n\n", 1, None, "empty"),
        ("r.jsonl", '{"image_id": "a",\n', 1, None, "JSON syntax error"),
    ],
)
def test_json_row_errors(  # noqa: PLR0917
    tmp_path: Path, name: str, text: str, line: int, field: str | None, fragment: str
) -> None:
    with pytest.raises(JobError) as info:
        rows_of(tmp_path, name, text)
    err = info.value
    assert (err.line, err.field) == (line, field), str(err)
    assert fragment in str(err)


def test_rows_must_carry_changes_when_the_job_has_none(tmp_path: Path) -> None:
    text = "project_id,region_id,image_id,tag:owner\n1,2,a,alice\n1,2,b,\n"
    with pytest.raises(JobError) as info:
        rows_of(tmp_path, "rows.csv", text, changes="{}")
    assert info.value.line == 3 and "nothing to do" in info.value.message
    rows = rows_of(tmp_path, "rows.csv", text)  # the job's changes cover row b
    assert [r.image_id for r in rows] == ["a", "b"]


def test_row_changes_merge_with_the_job(tmp_path: Path) -> None:
    """The row wins where both name the same key (models.Changes.merged)."""
    rows = rows_of(
        tmp_path,
        "rows.csv",
        "project_id,region_id,image_id,tag:env,tag:legacy,remove_tags,ssh_key\n"
        "1,2,a,prod,,owner,deny\n"
        "1,2,b,,keep,,\n",
        changes="{set_tags: {env: dev, owner: x}, remove_tags: [legacy], "
        "rename_tags: {team: squad}, set: {ssh_key: allow, os_type: linux}}",
    )
    path = tmp_path / "job.yaml"
    job_changes = load_job(path).changes_model()
    a = job_changes.merged(rows[0].changes)
    assert a == Changes(
        set_tags={"env": "prod"},
        remove_tags=("legacy", "owner"),
        rename_tags={"team": "squad"},
        set_fields={"ssh_key": "deny", "os_type": "linux"},
    )
    b = job_changes.merged(rows[1].changes)
    assert b.set_tags == {"env": "dev", "owner": "x", "legacy": "keep"}
    assert b.remove_tags == ()
    assert job_changes.merged(Changes()) is job_changes


def test_replace_tags_job_with_rows(tmp_path: Path) -> None:
    rows = rows_of(
        tmp_path,
        "rows.jsonl",
        '{"project_id": 1, "region_id": 2, "image_id": "a", "set_tags": {"owner": "al"}, '
        '"remove_tags": ["env"]}\n',
        changes="{replace_tags: {env: prod, team: core}, set: {ssh_key: allow}}",
    )
    job_changes = load_job(tmp_path / "job.yaml").changes_model()
    assert job_changes.merged(rows[0].changes) == Changes(
        replace_tags={"team": "core", "owner": "al"}, set_fields={"ssh_key": "allow"}
    )


def test_missing_selector_file_at_read_time(tmp_path: Path) -> None:
    write(tmp_path, "rows.csv", "image_id\n")
    path = write(tmp_path, "job.yaml", "name: x\ntargets: [{file: rows.csv}]\nchanges: {}\n")
    job = load_job(path, env=ENV)
    (tmp_path / "rows.csv").unlink()
    with pytest.raises(JobError) as info:
        list(iter_rows(job, job.file_selectors[0], env=ENV))
    assert "no such file" in str(info.value)


def _big_json(path: Path, n: int, *, one_line: bool) -> None:
    sep = "," if one_line else ",\n"
    with path.open("w") as fh:
        fh.write("[")
        for i in range(n):
            if i:
                fh.write(sep)
            fh.write(
                f'{{"project_id": 1, "region_id": 2, "image_id": "img-{i}", '
                f'"set_tags": {{"owner": "o{i % 97}"}}}}'
            )
        fh.write("]")


@pytest.mark.parametrize("one_line", [False, True])
def test_json_list_streams_in_flat_memory(tmp_path: Path, one_line: bool) -> None:
    path = write(tmp_path, "job.yaml", "name: x\ntargets: [{file: big.json}]\nchanges: {}\n")
    peaks = []
    for n in (3_000, 12_000):
        _big_json(tmp_path / "big.json", n, one_line=one_line)
        job = load_job(path, env=NO_ENV)
        tracemalloc.start()
        count = last = 0
        for row in iter_rows(job, job.file_selectors[0], env=NO_ENV):
            count += 1
            last = row.line
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert count == n
        assert last == (1 if one_line else n)
    assert peaks[1] < peaks[0] + 64 * 1024, peaks  # 4x the rows (both past the buffer), same memory
    assert peaks[1] < 2 * 1024 * 1024


def test_csv_and_jsonl_stream_in_flat_memory(tmp_path: Path) -> None:
    n = 12_000
    with (tmp_path / "big.csv").open("w") as fh:
        fh.write("project_id,region_id,image_id,tag:owner\n")
        fh.writelines(f"1,2,img-{i},o{i % 7}\n" for i in range(n))
    with (tmp_path / "big.jsonl").open("w") as fh:
        fh.writelines(
            f'{{"project_id": 1, "region_id": 2, "image_id": "i{i}"}}\n' for i in range(n)
        )
    path = write(
        tmp_path,
        "job.yaml",
        "name: x\ntargets: [{file: big.csv}, {file: big.jsonl}]\nchanges: {set_tags: {a: b}}\n",
    )
    job = load_job(path, env=NO_ENV)
    tracemalloc.start()
    counts = spec.check_selector_files(job, env=NO_ENV)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert counts == {"big.csv": n, "big.jsonl": n}
    assert peak < 2 * 1024 * 1024


def test_example_jobs_validate() -> None:
    jobs = sorted((REPO / "jobs").glob("*.yaml")) + sorted((REPO / "jobs").glob("*.json"))
    assert REPO / "jobs" / "demo.yaml" in jobs
    for path in jobs:
        job = load_job(path, env=ENV)
        counts = spec.check_selector_files(job, env=ENV)
        assert all(n > 0 for n in counts.values()), (path, counts)


def test_demo_job() -> None:
    job = load_job(REPO / "jobs" / "demo.yaml", env=NO_ENV)
    query = job.targets[0]
    assert isinstance(query, QuerySelector)
    assert (query.query.projects, query.query.regions) == ("all", "all")
    changes = job.changes_model()
    assert changes.set_tags == {"managed-by": "bulk-tagger", "retagged-on": "{run.date}"}
    assert changes.remove_tags == ("legacy",)
    assert changes.rename_tags == {"team": "owner"}
    assert changes.set_fields == {"ssh_key": "allow"}
    assert job.options.concurrency == 16 and (job.options.max_changes or 0) >= 10_000
    assert spec.check_selector_files(job, env=NO_ENV)["demo-owners.csv"] >= 3
