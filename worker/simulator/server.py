"""The HTTP side of the simulator: routes, auth, fault injection and counting.

Every ``/cloud/`` request goes through ``Simulator._cloud`` in this order: count it, add the
latency, 401 once ``auth_fail_after`` requests have come, check the key (401), pass the rate
limits (429; ``worker.simulator.limits``), draw the 429 / 5xx / drop-before faults, run the
handler, draw the drop-after fault. ``/_sim/`` admin paths skip all of it and are never counted.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import math
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from worker.log import get_logger
from worker.simulator.config import Counters, SimConfig
from worker.simulator.demo import PROJECTS, REGIONS, project_json, region_json
from worker.simulator.limits import Limits
from worker.simulator.store import (
    ARCHITECTURES,
    VISIBILITY_VALUES,
    ApiFault,
    Filter,
    Store,
)

log = get_logger("simulator")

JSON = "application/json"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_HTML_5XX = {
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Temporarily Unavailable",
}


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=json.dumps(data, separators=(",", ":")).encode(),
        status=status,
        content_type=JSON,
        headers=headers,
    )


def _text_json(text: str) -> web.Response:
    return web.Response(body=text.encode(), content_type=JSON)


def _fault(exc: ApiFault) -> web.Response:
    return _json(exc.body(), exc.status)


class Simulator:
    """The local Gcore images API: ``async with Simulator(config) as sim:`` then ``sim.url``."""

    def __init__(self, config: SimConfig | None = None) -> None:
        self.config = config or SimConfig()
        self.store = Store(self.config.images, self.config.seed)
        self.counters = Counters()
        self.faults = self.config.faults
        self._rng = random.Random(self.faults.seed)
        self._limits = Limits(self.faults, time.monotonic())
        self._cloud_requests = 0
        self._in_flight = 0
        self.url = ""
        self.app = make_app(self)
        self._runner: web.AppRunner | None = None

    # -- life -----------------------------------------------------------------------------
    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on ``host:port`` (0: any free port); returns the base URL."""
        runner = web.AppRunner(
            self.app, access_log=None, handle_signals=False, shutdown_timeout=1.0
        )
        await runner.setup()
        site = web.TCPSite(runner, host, port, backlog=1024)
        await site.start()
        self._runner = runner
        bound = runner.addresses[0]
        shown = f"[{bound[0]}]" if ":" in str(bound[0]) else bound[0]
        self.url = f"http://{shown}:{bound[1]}"
        log.info("simulator.started", url=self.url, images=self.config.images)
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
            log.info("simulator.stopped", url=self.url, requests=self.counters.total())

    async def __aenter__(self) -> Simulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- state, for tests and the demo ----------------------------------------------------
    def image(self, project_id: int, region_id: int, image_id: str) -> dict[str, Any]:
        """A copy of the image as the API shows it; KeyError if there is none."""
        self.store.settle()
        try:
            i = self.store.index(project_id, region_id, image_id)
        except ApiFault as exc:
            raise KeyError((project_id, region_id, image_id)) from exc
        return self.store.rec(i).api()

    def images(self) -> list[dict[str, Any]]:
        """Copies of every image, in list order (all of them: mind ``images=`` large)."""
        self.store.settle()
        return [self.store.rec(i).api() for _, i in self.store.entries()]

    def add_image(
        self,
        project_id: int,
        region_id: int,
        *,
        name: str,
        tags: dict[str, str],
        read_only: dict[str, str] | None = None,
        **fields: Any,
    ) -> str:
        """Add an image (newest of its region); ``fields`` override any API field. Its id."""
        try:
            return self.store.add(
                project_id, region_id, name=name, tags=tags, read_only=read_only, **fields
            )
        except ApiFault as exc:
            raise ValueError(exc.message) from exc

    def delete_image(self, project_id: int, region_id: int, image_id: str) -> None:
        """Remove an image: later GETs and PATCHes answer 404."""
        try:
            i = self.store.index(project_id, region_id, image_id)
        except ApiFault as exc:
            raise KeyError((project_id, region_id, image_id)) from exc
        self.store.delete(i)

    def lock_image(
        self,
        project_id: int,
        region_id: int,
        image_id: str,
        seconds: float | None,
        *,
        end_state: str = "FINISHED",
        set_tags: dict[str, str] | None = None,
    ) -> str:
        """Lock an image with a RUNNING task for ``seconds`` (None: for ever); the task id.

        When the time is up the task becomes ``end_state`` (FINISHED or ERROR), the image's
        ``task_id`` becomes null and ``set_tags`` (if any) are applied to it, in both cases.
        """
        self.store.settle()
        try:
            i = self.store.index(project_id, region_id, image_id)
        except ApiFault as exc:
            raise KeyError((project_id, region_id, image_id)) from exc
        return self.store.lock(i, seconds, end_state=end_state, set_tags=set_tags)

    def end_task(self, task_id: str) -> None:
        """End a RUNNING task now, as if its time had come (a lock taken for ever, too)."""
        self.store.settle()
        try:
            self.store.finish_now(task_id)
        except ApiFault as exc:
            raise KeyError(task_id) from exc

    def set_faults(self, **changes: Any) -> None:
        """Change some ``Faults`` fields; a new ``seed`` reseeds, new limits start afresh."""
        self.faults = self.faults.replace(**changes)
        if "seed" in changes:
            self._rng = random.Random(self.faults.seed)
        if {"rate_limit", "rate_burst", "rate_schedule", "quota", "quota_window_s"} & set(changes):
            self._limits = Limits(self.faults, time.monotonic())
        else:
            self._limits.faults = self.faults
        if "auth_fail_after" in changes:
            self._cloud_requests = 0

    def reset_counters(self) -> None:
        """Zero every counter in place (``sim.counters`` stays the same object)."""
        self.counters.clear(self._in_flight)

    # -- the /cloud/ pipeline -------------------------------------------------------------
    def cloud(self, kind: str, handler: Handler) -> Handler:
        async def wrapped(request: web.Request) -> web.StreamResponse:
            self._in_flight += 1
            self.counters.arrived(kind, time.monotonic(), self._in_flight)
            try:
                response = await self._cloud(handler, request)
            finally:
                self._in_flight -= 1
            if not isinstance(response, _Dropped):
                self.counters.statuses[response.status] += 1
            return response

        return wrapped

    async def _cloud(self, handler: Handler, request: web.Request) -> web.StreamResponse:
        f = self.faults
        counters = self.counters
        if f.latency_ms or f.latency_jitter_ms:
            delay = f.latency_ms + f.latency_jitter_ms * (2.0 * self._rng.random() - 1.0)
            counters.faults["latency"] += 1
            await asyncio.sleep(max(0.0, delay) / 1000.0)
        self._cloud_requests += 1
        if f.auth_fail_after is not None and self._cloud_requests > f.auth_fail_after:
            counters.faults["401"] += 1
            return _json({"message": "Invalid API key: the key was revoked"}, 401)
        problem = self._auth_problem(request.headers.get("Authorization"))
        if problem is not None:
            return _json({"message": problem}, 401)
        wait, stated = self._limits.take(time.monotonic())
        if wait > 0.0:
            counters.rate_limited += 1
            stated["Retry-After"] = str(max(1, math.ceil(wait)))
            stated["retry-after-ms"] = str(max(1, math.ceil(wait * 1000.0)))
            return _json(
                {"message": "Too many requests", "exception_class": "TooManyRequests"},
                429,
                stated,
            )
        faulty = request.method in f.methods
        if faulty:
            rng = self._rng
            if f.p_429 and rng.random() < f.p_429:
                counters.faults["429"] += 1
                counters.rate_limited += 1
                return self._fault_429()
            if f.p_5xx and rng.random() < f.p_5xx:
                counters.faults["5xx"] += 1
                status = rng.choice((500, 502, 503))
                reason = _HTML_5XX[status]
                html = (
                    f"<html>\r\n<head><title>{status} {reason}</title></head>\r\n<body>\r\n"
                    f"<center><h1>{status} {reason}</h1></center>\r\n"
                    "<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
                )
                return web.Response(text=html, status=status, content_type="text/html")
            if f.p_drop_before and rng.random() < f.p_drop_before:
                counters.faults["drop_before"] += 1
                return _drop(request)
        self.store.settle()
        try:
            response = await handler(request)
        except ApiFault as exc:
            response = _fault(exc)
        if faulty and f.p_drop_after and self._rng.random() < f.p_drop_after:
            counters.faults["drop_after"] += 1
            return _drop(request)
        if stated:
            response.headers.update(stated)
        return response

    def _fault_429(self) -> web.Response:
        f = self.faults
        headers: dict[str, str] = {}
        if f.retry_after == "date":
            headers["Retry-After"] = email.utils.formatdate(
                time.time() + f.retry_after_s, usegmt=True
            )
        else:
            headers["Retry-After"] = str(math.ceil(f.retry_after_s))
            if f.retry_after == "ms":
                headers["retry-after-ms"] = str(math.ceil(f.retry_after_s * 1000.0))
        return _json(
            {"message": "Too many requests", "exception_class": "TooManyRequests"}, 429, headers
        )

    def _auth_problem(self, header: str | None) -> str | None:
        """Why the Authorization header is refused (never quoting it), or None."""
        if not header:
            return "Authentication credentials were not provided"
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "apikey" or not token.strip():
            return "Invalid authorization header: expected 'APIKey <token>'"
        expected = self.config.api_key
        if expected is not None and token.strip() != expected:
            return "Invalid API key"
        return None

    # -- handlers -------------------------------------------------------------------------
    async def projects(self, request: web.Request) -> web.StreamResponse:
        items = [project_json(*p) for p in PROJECTS]
        return _json(_page(items, request, self.config.page_max))

    async def regions(self, request: web.Request) -> web.StreamResponse:
        items = [region_json(r) for r in REGIONS]
        return _json(_page(items, request, self.config.page_max))

    async def list_images(self, request: web.Request) -> web.StreamResponse:
        project_id, region_id = _scope(request)
        store = self.store
        store.check_scope(project_id, region_id)
        flt, limit, offset = _list_query(request, self.config.page_max)
        found = store.matching(project_id, region_id, flt)
        texts = [store.rec(i).text() for i in found[offset : offset + limit]]
        return _text_json(f'{{"count":{len(found)},"results":[{",".join(texts)}]}}')

    async def get_image(self, request: web.Request) -> web.StreamResponse:
        project_id, region_id = _scope(request)
        image_id = request.match_info["image_id"]
        store = self.store
        return _text_json(store.rec(store.index(project_id, region_id, image_id)).text())

    async def patch_image(self, request: web.Request) -> web.StreamResponse:
        project_id, region_id = _scope(request)
        image_id = request.match_info["image_id"]
        key = (project_id, region_id, image_id)
        counters = self.counters
        counters.patches_per_image[key] += 1
        store = self.store
        i = store.index(project_id, region_id, image_id)
        if request.content_type != JSON:
            raise ApiFault(
                415,
                f"Unsupported media type {request.content_type!r}: send application/json",
                "UnsupportedMediaType",
            )
        try:
            body = json.loads(await request.read())
        except ValueError as exc:
            raise ApiFault(400, f"JSON parse error: {exc}", "ParseError") from exc
        if isinstance(body, dict) and "tags" in body and body["tags"] is None:
            counters.patch_bodies_with_tags_null += 1
        rec = store.patch(i, body)
        counters.applied_per_image[key] += 1
        return _text_json(rec.text())

    async def get_task(self, request: web.Request) -> web.StreamResponse:
        return _json(self.store.task(request.match_info["task_id"]).api())

    async def not_found(self, request: web.Request) -> web.StreamResponse:
        return _json({"message": f"Not found: {request.path}", "exception_class": "NotFound"}, 404)

    # -- admin (no auth, not counted) -----------------------------------------------------
    async def admin_counters(self, request: web.Request) -> web.StreamResponse:
        return _json(self.counters.as_dict())

    async def admin_reset(self, request: web.Request) -> web.StreamResponse:
        self.reset_counters()
        return _json({"ok": True})

    async def admin_faults(self, request: web.Request) -> web.StreamResponse:
        try:
            changes = await request.json()
            if not isinstance(changes, dict):
                raise TypeError("send a JSON object of Faults fields")
            self.set_faults(**changes)
        except (ValueError, TypeError) as exc:
            return _json({"message": str(exc), "exception_class": "ValidationError"}, 400)
        return _json(self.faults.as_dict())

    async def admin_image(self, request: web.Request) -> web.StreamResponse:
        try:
            project_id, region_id = _scope(request)
            return _json(self.image(project_id, region_id, request.match_info["image_id"]))
        except (KeyError, ApiFault):
            return _json({"message": "Image not found", "exception_class": "NotFound"}, 404)

    async def admin_lock(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
            task_id = self.lock_image(
                int(body["project_id"]),
                int(body["region_id"]),
                str(body["image_id"]),
                None if body.get("seconds") is None else float(body["seconds"]),
                end_state=body.get("end_state", "FINISHED"),
                set_tags=body.get("set_tags"),
            )
        except KeyError as exc:
            return _json({"message": f"not found or missing: {exc}"}, 404)
        except (ValueError, TypeError) as exc:
            return _json({"message": str(exc), "exception_class": "ValidationError"}, 400)
        return _json({"task_id": task_id})


class _Dropped(web.Response):
    """The answer of a dropped connection: never written (the transport is closed)."""


def _drop(request: web.Request) -> web.StreamResponse:
    transport = request.transport
    if transport is not None:
        transport.close()
    # aiohttp's attempt to write a response to the closed transport ends the connection
    # quietly; a fresh object per drop, as a response is prepared once.
    return _Dropped(status=599)


def _scope(request: web.Request) -> tuple[int, int]:
    info = request.match_info
    try:
        return int(info["project_id"]), int(info["region_id"])
    except ValueError:
        raise ApiFault(404, "Project and region ids must be integers", "NotFound") from None


def _int_param(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiFault(
            400, f"Query parameter {name}: {raw!r} is not an integer", "ValidationError"
        ) from None
    if not low <= value <= high:
        raise ApiFault(
            400, f"Query parameter {name}: must be between {low} and {high}", "ValidationError"
        )
    return value


def _page(items: list[dict[str, Any]], request: web.Request, page_max: int) -> dict[str, Any]:
    limit = _int_param(request, "limit", page_max, 1, page_max)
    offset = _int_param(request, "offset", 0, 0, 2**31)
    return {"count": len(items), "results": items[offset : offset + limit]}


def _list_query(request: web.Request, page_max: int) -> tuple[Filter, int, int]:
    q = request.query
    limit = _int_param(request, "limit", page_max, 1, page_max)
    offset = _int_param(request, "offset", 0, 0, 2**63)
    visibility = q.get("visibility")
    if visibility is not None and visibility not in VISIBILITY_VALUES:
        raise ApiFault(
            400,
            f"Query parameter visibility: must be one of {', '.join(sorted(VISIBILITY_VALUES))}",
            "ValidationError",
        )
    if "private" in q:
        if visibility not in (None, "private"):
            raise ApiFault(
                400, "Query parameters private and visibility disagree", "ValidationError"
            )
        visibility = "private"
    architecture = q.get("architecture")
    if architecture is not None and architecture not in ARCHITECTURES:
        raise ApiFault(
            400,
            f"Query parameter architecture: must be one of {', '.join(sorted(ARCHITECTURES))}",
            "ValidationError",
        )
    tag_values: tuple[tuple[str, str], ...] = ()
    raw_kv = q.get("tag_key_value")
    if raw_kv is not None:
        try:
            parsed = json.loads(raw_kv)
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in parsed.items()
        ):
            raise ApiFault(
                400,
                "Query parameter tag_key_value: must be a JSON object of strings, "
                'e.g. {"env":"prod"}',
                "ValidationError",
            )
        tag_values = tuple(sorted(parsed.items()))
    name = q.get("name")
    os_distro = q.get("os_distro")
    os_version = q.get("os_version")
    flt = Filter(
        os_distro=os_distro.lower() if os_distro else None,
        os_version=os_version.lower() if os_version else None,
        visibility=visibility,
        architecture=architecture,
        name=name.lower() if name else None,
        tag_keys=tuple(sorted(set(q.getall("tag_key", [])))),
        tag_values=tag_values,
    )
    return flt, limit, offset


def make_app(sim: Simulator) -> web.Application:
    """The aiohttp application of ``sim``: the API under ``/cloud/v1``, admin under ``/_sim``."""
    app = web.Application(client_max_size=1024**2)
    images = "/cloud/v1/images/{project_id}/{region_id}"
    r = app.router
    r.add_get("/cloud/v1/projects", sim.cloud("projects", sim.projects), allow_head=False)
    r.add_get("/cloud/v1/regions", sim.cloud("regions", sim.regions), allow_head=False)
    r.add_get(images, sim.cloud("list", sim.list_images), allow_head=False)
    r.add_get(images + "/{image_id}", sim.cloud("get", sim.get_image), allow_head=False)
    r.add_patch(images + "/{image_id}", sim.cloud("patch", sim.patch_image))
    r.add_get("/cloud/v1/tasks/{task_id}", sim.cloud("task", sim.get_task), allow_head=False)
    r.add_route("*", "/cloud/{tail:.*}", sim.cloud("other", sim.not_found))
    r.add_get("/_sim/counters", sim.admin_counters)
    r.add_post("/_sim/counters/reset", sim.admin_reset)
    r.add_post("/_sim/faults", sim.admin_faults)
    r.add_get("/_sim/images/{project_id}/{region_id}/{image_id}", sim.admin_image)
    r.add_post("/_sim/lock", sim.admin_lock)
    return app
