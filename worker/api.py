"""The Gcore images API client: one aiohttp session, paths, auth, JSON, typed errors.

It knows nothing of retries (the pool's business). Every attempt goes through one narrow
seam, ``Client._request``, which takes a rate-limiter slot, sends, and maps the answer:

    200..299  -> parsed JSON
    401       -> AuthFailed                 403 on a read -> AuthFailed, on a write -> Rejected
    404       -> NotFound                   409 -> Locked(task_id)
    429       -> RateLimited(retry_after)   408, 5xx, connection lost, timeout -> Transient
    other     -> Rejected (the API's message kept; redirects are never followed)

Bodies are parsed only as far as needed: an error body may be an HTML page from a proxy.
The API key lives only in the session's Authorization header; no error message contains it.

The limiter hears of every answer: a 429 (with the time its request was sent) lowers the
rate, any other answer counts as accepted, and rate-limit headers (``worker.rate_headers``)
state the limit. After the first ``AuthFailed`` the client sends
nothing more: every later call raises ``AuthFailed`` at once (the run stops, exit 4).
``last_ok`` says when a request last got a 2xx (the pool's test for "the API is down").
"""

from __future__ import annotations

import ipaddress
import json
import re
import ssl
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Protocol
from urllib.parse import urlsplit

import aiohttp
import orjson

from worker import __version__, defaults, rate_headers
from worker.errors import (
    ApiError,
    AuthFailed,
    JobError,
    Locked,
    NotFound,
    RateLimited,
    Rejected,
    Transient,
)
from worker.models import Image

DEFAULT_BASE_URL = "https://api.gcore.com"
_JSON_BODY = {"Content-Type": "application/json"}


def _loads(raw: bytes) -> Any:
    """JSON of an answer: orjson, or json where orjson is stricter (a lone surrogate)."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(raw)


_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


class Limiter(Protocol):
    """What the client needs of a rate limiter (``worker.limiter.AdaptiveLimiter``)."""

    async def acquire(self) -> None: ...
    def success(self) -> None: ...
    def throttled(self, sent_at: float | None = None) -> None: ...
    def stated(self, headers: Mapping[str, str]) -> None: ...
    def cancel_waiting(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Settings:
    """How to reach the API. Timeouts in seconds."""

    base_url: str = DEFAULT_BASE_URL
    api_key: str = ""
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 30.0
    ca_bundle: str | None = None
    allow_insecure_http: bool = False
    connections: int = 64


@dataclass(slots=True)
class RequestCounts:
    """Requests sent, by kind (every attempt counts), and what came back."""

    by_kind: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(
            ("projects", "regions", "list", "get", "patch", "task"), 0
        )
    )
    rate_limited: int = 0
    transient: int = 0

    @property
    def total(self) -> int:
        return sum(self.by_kind.values())


def check_base_url(base_url: str, *, allow_insecure_http: bool = False) -> str:
    """The base URL without a trailing slash; plain http only to loopback unless allowed."""
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise JobError(
            f"not an http(s) URL: {base_url!r}", field="--base-url", hint="e.g. https://api.gcore.com"
        )
    if parts.scheme == "http" and not allow_insecure_http and not _is_loopback(parts.hostname):
        raise JobError(
            f"plain http to {parts.hostname} would send the API key unencrypted",
            field="--base-url",
            hint="use https, or pass --allow-insecure-http if you really mean it",
        )
    return base_url.rstrip("/")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait from ``retry-after-ms``, or ``Retry-After`` as seconds or an HTTP date."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _json_object(body: bytes, content_type: str) -> dict[str, Any] | None:
    if "json" not in content_type:
        return None
    try:
        data = json.loads(body)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _message(status: int, body: bytes, content_type: str, data: dict[str, Any] | None) -> str:
    if data is not None:
        for key in ("message", "detail", "error", "errors"):
            if data.get(key):
                return str(data[key])[:500]
    snippet = body[:200].decode("utf-8", "replace").strip()
    if content_type.startswith("text/html") or snippet.startswith("<"):
        media = content_type.split(";", 1)[0].strip()
        return f"HTTP {status} with a {media or 'non-JSON'} body"
    return f"HTTP {status}: {snippet}" if snippet else f"HTTP {status}"


def classify(status: int, body: bytes, headers: Mapping[str, str], *, write: bool) -> ApiError:
    """The typed error for a non-2xx answer (the one table of what each status means).

    ``write``: the request was a PATCH (a 403 then refuses that image, not the key).
    """
    content_type = headers.get("Content-Type", "")
    data = _json_object(body, content_type)
    msg = _message(status, body, content_type, data)
    if status == 401 or (status == 403 and not write):
        return AuthFailed(msg, status=status)
    if status == 404:
        return NotFound(msg, status=status)
    if status == 409:
        task_id = data.get("task_id") if data is not None else None
        if not isinstance(task_id, str) or not task_id:
            found = _UUID.search(msg)
            task_id = found.group(0) if found else None
        return Locked(msg, status=status, task_id=task_id)
    if status == 429:
        return RateLimited(msg, status=status, retry_after=retry_after_seconds(headers))
    if status == 408 or status >= 500:
        return Transient(msg, status=status)
    if 300 <= status < 400:
        return Rejected(f"HTTP {status}: redirects are not followed", status=status)
    return Rejected(msg, status=status)


class Client:
    """The API's calls. Build with ``Client.open(settings, limiter)`` (an async context)."""

    def __init__(
        self, session: aiohttp.ClientSession, base_url: str, limiter: Limiter
    ) -> None:
        self.session = session
        self.base_url = base_url
        self.limiter = limiter
        self.counts = RequestCounts()
        #: called with each answered request's latency in milliseconds
        self.observe_latency: Callable[[float], None] | None = None
        #: ``time.monotonic()`` when the last 2xx answer came (None: never)
        self.last_ok: float | None = None
        #: set by the first AuthFailed: from then on nothing more is sent
        self.refused: AuthFailed | None = None

    def limiter_rate(self) -> float:
        """The limiter's current rate (requests/s), for the summary."""
        return float(getattr(self.limiter, "rate", 0.0))

    @classmethod
    @asynccontextmanager
    async def open(cls, settings: Settings, limiter: Limiter) -> AsyncIterator[Client]:
        base_url = check_base_url(
            settings.base_url, allow_insecure_http=settings.allow_insecure_http
        )
        ssl_ctx: ssl.SSLContext | bool = True
        if base_url.startswith("https"):
            # created once at start-up: building an SSL context blocks the loop
            ssl_ctx = ssl.create_default_context(cafile=settings.ca_bundle)
        connector = aiohttp.TCPConnector(
            limit=settings.connections, ssl=ssl_ctx, ttl_dns_cache=300
        )
        timeout = aiohttp.ClientTimeout(
            total=None,
            connect=settings.connect_timeout_s,
            sock_connect=settings.connect_timeout_s,
            sock_read=settings.read_timeout_s,
        )
        headers = {
            "Authorization": f"APIKey {settings.api_key}",
            "Accept": "application/json",
            "User-Agent": f"bulk-tagger/{__version__}",
        }
        async with aiohttp.ClientSession(
            connector=connector, timeout=timeout, headers=headers, raise_for_status=False
        ) as session:
            yield cls(session, base_url, limiter)

    async def _request(
        self, method: str, kind: str, path: str, *, params: Any = None, body: Any = None
    ) -> Any:
        if self.refused is not None:
            raise self._refusal()
        await self.limiter.acquire()
        if self.refused is not None:  # refused while this one waited for its slot
            raise self._refusal()
        self.counts.by_kind[kind] += 1
        write = method != "GET"
        sent = time.monotonic()
        try:
            async with self.session.request(
                method,
                self.base_url + path,
                params=params,
                data=None if body is None else orjson.dumps(body),
                headers=_JSON_BODY if body is not None else None,
                allow_redirects=False,
            ) as resp:
                raw = await resp.read()
                status = resp.status
                answered = time.monotonic()
                if rate_headers.present(resp.headers):
                    self.limiter.stated(resp.headers)
                if self.observe_latency is not None:
                    self.observe_latency((answered - sent) * 1000)
                if 200 <= status < 300:
                    self.limiter.success()
                    self.last_ok = answered
                    return _loads(raw) if raw else None
                error = classify(status, raw, resp.headers, write=write)
                if status != 429:
                    self.limiter.success()  # answered: the rate was accepted
        except aiohttp.ClientConnectorCertificateError as exc:
            # not transient: retrying cannot make an untrusted certificate trusted
            raise JobError(
                f"the TLS certificate of {exc.host} is not trusted ({exc.certificate_error})",
                field="--base-url",
                hint="pass --ca-bundle with the CA that signed it (nothing was sent)",
            ) from None
        except (aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
            self.counts.transient += 1
            raise Transient(f"{type(exc).__name__}: connection lost or timed out") from None
        except ValueError:
            self.counts.transient += 1
            raise Transient("the answer was not valid JSON", status=200) from None
        if isinstance(error, RateLimited):
            self.counts.rate_limited += 1
            self.limiter.throttled(sent)
        elif isinstance(error, Transient):
            self.counts.transient += 1
        elif isinstance(error, AuthFailed):
            self.refused = error
        raise error

    def _refusal(self) -> AuthFailed:
        assert self.refused is not None
        return AuthFailed(self.refused.message, status=self.refused.status)

    # -- reads -----------------------------------------------------------------------------
    async def list_projects(self) -> list[dict[str, Any]]:
        data = await self._request("GET", "projects", "/cloud/v1/projects")
        return list(data.get("results", [])) if isinstance(data, dict) else []

    async def list_regions(self) -> list[dict[str, Any]]:
        data = await self._request("GET", "regions", "/cloud/v1/regions")
        return list(data.get("results", [])) if isinstance(data, dict) else []

    async def list_images(
        self,
        project_id: int,
        region_id: int,
        *,
        params: list[tuple[str, str]] | None = None,
        limit: int = defaults.PAGE_SIZE,
        offset: int = 0,
    ) -> tuple[list[Image], int | None]:
        """One page: the images and the API's ``count`` of all matches (None if absent)."""
        query = [*(params or ()), ("limit", str(limit)), ("offset", str(offset))]
        data = await self._request(
            "GET", "list", f"/cloud/v1/images/{project_id}/{region_id}", params=query
        )
        if isinstance(data, list):  # tolerate a bare list
            results, count = data, None
        else:
            results, count = data.get("results") or [], data.get("count")
        images = [
            Image.from_api(item, project_id=project_id, region_id=region_id) for item in results
        ]
        return images, int(count) if isinstance(count, int) else None

    async def get_image(self, project_id: int, region_id: int, image_id: str) -> Image:
        data = await self._request(
            "GET", "get", f"/cloud/v1/images/{project_id}/{region_id}/{image_id}"
        )
        return Image.from_api(data, project_id=project_id, region_id=region_id)

    async def get_task(self, task_id: str) -> dict[str, Any]:
        data = await self._request("GET", "task", f"/cloud/v1/tasks/{task_id}")
        return data if isinstance(data, dict) else {}

    # -- the write ---------------------------------------------------------------------------
    async def patch_image(
        self, project_id: int, region_id: int, image_id: str, body: Mapping[str, Any]
    ) -> Image:
        if "tags" in body and body["tags"] is None:
            # never: "tags": null wipes every user tag of the image
            raise ValueError("refusing to send 'tags': null")
        data = await self._request(
            "PATCH", "patch", f"/cloud/v1/images/{project_id}/{region_id}/{image_id}", body=body
        )
        return Image.from_api(data, project_id=project_id, region_id=region_id)

