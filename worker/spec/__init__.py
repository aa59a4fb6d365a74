"""The job file (README, "A job file"): pydantic models, and streaming selector-file readers.

Public API::

    load_job(path, *, env=None) -> Job              # YAML (.yaml/.yml) or JSON (.json), one schema
    iter_rows(job, selector, *, env=None) -> Iterator[Row]     # a FileSelector's rows, streamed
    check_selector_files(job, *, env=None) -> dict[str, int]   # rows per selector file
    template_fields(text) -> list[str]     # worker.templates.check, as a job-file problem
    job_schema() -> dict                   # the job file's JSON Schema (bulk-tagger schema)

Every problem is a ``worker.errors.JobError`` that names the file, the line (1-based; for CSV the
physical line, 1 = the header) and the field as a dotted path (``targets[1].query.visibility``,
``changes.set_tags.owner``), with a hint where one helps. Of several problems in a job file the
first in file order is reported (a missing key last). Nothing here touches the network.

YAML is read with YAML 1.2 core-schema scalars: only ``true``/``false`` are booleans (``no``,
``on``, ``yes`` stay text), ``12:30`` and ``2024-01-01`` stay text, ``010`` is ten. Duplicate keys
are errors; anchors, aliases and ``<<`` merge keys work.

Templates (tag values, ``set``'s text fields): ``{image.<field>}`` (a field an image has),
``{tags.<key>}``, ``{run.date}``, ``{run.id}``; ``{{`` and ``}}`` stand for literal braces; any
other brace is an error. The grammar is ``worker.templates``, which plans render with.

Rows: ``Row.changes`` holds the row's own changes; the target's changes are
``job.changes_model().merged(row.changes)`` (the row wins where both name the same key).

The modules, imported one way (each only from those above it):

- ``checks``: the shared problem type, tag/ID/field checks and hints, the template check;
- ``models``: ``Job``, ``Query``, ``FileSelector``, ``ChangesSpec``, ``Options``;
- ``source``: YAML/JSON text with every key's line;
- ``translate``: pydantic errors as file, line, field and hint;
- ``rows``, ``csv_rows``, ``json_rows``: the selector files' row streams;
- ``load``: ``load_job``, ``iter_rows``, ``check_selector_files``;
- ``schema``: ``job_schema``, the models' JSON Schema for editors.
"""

from worker.spec.checks import PROJECT_ENV, REGION_ENV, template_fields
from worker.spec.load import check_selector_files, iter_rows, load_job
from worker.spec.models import (
    ChangesSpec,
    FileSelector,
    Job,
    Options,
    Query,
    QuerySelector,
    SetFields,
)
from worker.spec.rows import Row
from worker.spec.schema import job_schema

__all__ = [
    "PROJECT_ENV",
    "REGION_ENV",
    "ChangesSpec",
    "FileSelector",
    "Job",
    "Options",
    "Query",
    "QuerySelector",
    "Row",
    "SetFields",
    "check_selector_files",
    "iter_rows",
    "job_schema",
    "load_job",
    "template_fields",
]
