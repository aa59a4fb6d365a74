"""A local Gcore Cloud images API (aiohttp.web), for ``--simulate``, tests and benchmarks.

Faithful to ``api/GCORE_IMAGES_API.md`` and the update endpoint's reference page::

    GET   /cloud/v1/projects                         {"count", "results": [Project]}
    GET   /cloud/v1/regions                          {"count", "results": [Region]}
    GET   /cloud/v1/images/{project_id}/{region_id}  {"count", "results": [Image]}
    GET   /cloud/v1/images/{project_id}/{region_id}/{image_id}       Image
    PATCH /cloud/v1/images/{project_id}/{region_id}/{image_id}       Image (updated)
    GET   /cloud/v1/tasks/{task_id}                  Task

Choices where the documents leave room (the stricter, more realistic reading):

- Auth: ``Authorization: APIKey <key>``, scheme case-insensitive; missing or wrong -> 401
  ``{"message"}``. With ``SimConfig.api_key`` None any non-empty key passes. No answer and no
  log line ever contains the key.
- Images carry their tags twice, as ``tags`` (the reference page) and ``tags_v2`` (the newer
  SDK), both lists of ``{"key", "value", "read_only"}``.
- List: ``limit`` defaults to ``page_max``; ``limit`` outside 1..page_max, a negative or
  non-integer ``offset``, an unknown ``visibility`` or ``architecture``, or a ``tag_key_value``
  that is not a JSON object of strings -> 400. ``name`` is a case-insensitive substring,
  ``os_distro``/``os_version`` case-insensitive equality, ``tag_key`` (repeatable) means every
  key present, ``tag_key_value`` every pair equal; ``private`` (any value) means visibility
  private; ``include_prices`` and unknown parameters are ignored. Order: created_at, then id;
  ``count`` is the number of matches. Pages are offsets into the matches at the time asked:
  a change that alters membership between two pages shifts them, as on a real server.
- PATCH checks, in order: 404 (unknown project, region or image), 415 unless the body is
  ``application/json``, 400 (not JSON, not an object, unknown field, wrong type, enum value
  off the reference page — ``hw_machine_type`` takes pc, q35 and the SDK's i440 — name empty
  or over 255 characters, a tag key or value that ``worker.models.tag_problem`` refuses),
  403 on a public image, 409 while the image's ``task_id`` names a RUNNING task (the body
  names the task in ``message`` and ``task_id``), then **400 ``ReadOnlyTagError``** for any
  read-only key in ``tags`` (set or null alike; chosen over 403). Errors are JSON
  ``{"message", "exception_class"}``. ``tags`` is an RFC 7386 merge patch. ``"tags": null``
  removes every tag that is not read-only (as the SDK documents it): the worker must never
  send it, and ``Counters.patch_bodies_with_tags_null`` counts those bodies. Every applied
  PATCH sets ``updated_at``; ``is_baremetal: null`` is taken as false.
- Tasks (``lock_image``): RUNNING until their time is up, then FINISHED or ERROR; the end is
  computed when next observed (any request or state call), not by a timer per lock. A task
  that ends clears the image's ``task_id`` and applies its ``set_tags`` (ERROR too).
- Faults: see ``Faults`` and ``Simulator._cloud``. A dropped connection is closed without a
  byte of answer; note that aiohttp's client retries an idempotent request (GET) once on a
  reused connection that was dropped, so a GET drop may be invisible unless both drop.

Public API: ``Simulator``, ``SimConfig``, ``Faults``, ``Counters``, ``SimulatorThread``,
``serve``, ``make_app``. Admin paths (no auth, not counted): ``GET /_sim/counters``,
``POST /_sim/counters/reset``, ``POST /_sim/faults``, ``GET /_sim/images/{p}/{r}/{id}``,
``POST /_sim/lock`` (``{project_id, region_id, image_id, seconds, end_state?, set_tags?}``).

Demo data (``SimConfig.images``, ``seed``) is a pure function of the image index: see
``worker.simulator.demo``. Projects 1337 demo, 1338 staging, 2001 ml; regions 7 Luxembourg 1,
76 Frankfurt, 38 Amsterdam; read-only tag keys ``gcore-source`` and ``billing-class``.
"""

from worker.simulator.config import Counters, Faults, SimConfig
from worker.simulator.runner import SimulatorThread, serve
from worker.simulator.server import Simulator, make_app

__all__ = [
    "Counters",
    "Faults",
    "SimConfig",
    "Simulator",
    "SimulatorThread",
    "make_app",
    "serve",
]
