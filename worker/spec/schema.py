"""The job file's JSON Schema (``bulk-tagger schema``), made from the models ``load_job``
validates with, so an editor checks a job as it is typed (docs/job-file.md).

The schema checks shapes and ranges; what only the loader can check (templates, regular
expressions, tag key rules, selector files) is ``bulk-tagger validate``'s. Where the loader
takes a shorthand the models' own schema does not show (one ID for ``projects``/``regions``,
one key for ``tag_key``), the schema takes it too; the enumerated fields of ``set`` list their
values.
"""

from __future__ import annotations

from typing import Any

from worker.models import ENUMS
from worker.spec.models import Job

DIALECT = "https://json-schema.org/draft/2020-12/schema"


def job_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a job file."""
    schema = Job.model_json_schema()
    defs = schema["$defs"]
    query = defs["Query"]["properties"]
    for name in ("projects", "regions"):
        query[name]["anyOf"].append({"type": "integer", "exclusiveMinimum": 0})
    query["tag_key"] = {"anyOf": [query["tag_key"], {"type": "string"}], "title": "Tag Key"}
    fields = defs["SetFields"]["properties"]
    for name, values in ENUMS.items():
        fields[name]["anyOf"] = [{"enum": list(values)}, {"type": "null"}]
    return {**schema, "$schema": DIALECT, "title": "bulk-tagger job file"}
