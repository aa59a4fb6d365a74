"""The Gcore images API client: one aiohttp session, paths, auth, JSON, typed errors.

It knows nothing of retries (the pool's business). Every attempt goes through one narrow
seam, ``Client._request``, which takes a rate-limiter slot, sends, and maps the answer:

    200..299  -> parsed JSON
    401       -> AuthFailed                 403 on a read -> AuthFailed, on a write -> Rejected
    404       -> NotFound                   409 -> Locked(task_id)
    429       -> RateLimited(retry_after)   408, 5xx, connection lost, timeout -> Transient
    other     -> Rejected (the API's message kept; redirects are never followed)

Bodies are parsed only as far as needed: an error body may be an HTML page from a proxy.
An answer is not trusted (README: threat model): a body over ``MAX_BODY`` bytes or with more
than ``MAX_ITEMS`` JSON values (a list; ``MAX_BODY_ONE`` and ``MAX_ITEMS_ONE`` for an answer
about one image or task) is not read further, JSON nested deeper than orjson's limit is
refused, and a 2xx answer that is not JSON or not shaped as documented raises ``BadAnswer``
(never retried). Every request has a total deadline (``Settings.request_timeout_s``) on top
of the connect and read timeouts, so a body dripping a byte at a time cannot hold it. Bodies
are asked uncompressed and never decompressed (no gzip bomb). Ids that go into a path are
checked (``worker.safety``): each path segment holds only characters a URL keeps as they are
(an image id of another alphabet fails its target, ``bad_id``).
The API key lives only in the session's Authorization header; no error message contains it.

The limiter hears of every answer: a 429 (with the time its request was sent) lowers the
rate, any other answer counts as accepted, and rate-limit headers (``worker.rate_headers``)
state the limit. After the first ``AuthFailed`` the client sends
nothing more: every later call raises ``AuthFailed`` at once (the run stops, exit 4).
``last_ok`` says when a request last got a 2xx (the pool's test for "the API is down").
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
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
    BadAnswer,
    JobError,
    Locked,
    NotFound,
    RateLimited,
    Rejected,
    Transient,
)
from worker.models import Image
from worker.safety import UUID, image_id_problem, is_task_id

DEFAULT_BASE_URL = "https://api.gcore.com"
_JSON_BODY = {"Content-Type": "application/json"}
#: The largest answer read (bytes). A list page of 1,000 simulator images is about 1 MB.
MAX_BODY = 10 * 1024 * 1024
#: The same for an answer about one image or task (up to the concurrency of them are read at
#: once): an image of 255 tags of 255-character keys and values is about 130 KB, 800 values.
MAX_BODY_ONE = 1024 * 1024
MAX_ITEMS_ONE = 20_000
#: The most JSON values an answer may hold (a bound on the memory its parsed form takes: a
#: page of 1,000 simulator images holds about 39,000; 400,000 one-key objects take ~65 MB).
MAX_ITEMS = 400_000

#: the probe's budget: connect and read timeouts of its one request (seconds)
PROBE_TIMEOUT_S = 5.0
#: the API's own root paths: the probe reads the first, ``projects: all`` the second
REGIONS_PATH = "/cloud/v1/regions"
PROJECTS_PATH = "/cloud/v1/projects"


class NoAnswer(Transient):
    """No HTTP answer came: ``cause`` is ``refused``, ``dns``, ``dns_unknown`` (the name does
    not exist), ``tls``, ``timeout`` or ``lost``; the message names the host and what happened."""

    def __init__(self, message: str, *, cause: str) -> None:
        super().__init__(message)
        self.cause = cause


def no_answer(exc: BaseException, method: str, url: str) -> NoAnswer:
    """What went wrong, in words, for an attempt that got no HTTP answer."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    where = f"{host}:{parts.port}" if parts.port else host
    request = f"{method} {parts.path}"
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        errno = getattr(exc.os_error, "errno", None)
        unknown = errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME))
        why = getattr(exc.os_error, "strerror", None) or str(exc.os_error)
        return NoAnswer(f"{request}: cannot resolve host {host} ({why})",
                        cause="dns_unknown" if unknown else "dns")
    if isinstance(exc, aiohttp.ClientSSLError):
        return NoAnswer(f"{request}: the TLS handshake with {where} failed ({exc.os_error})",
                        cause="tls")
    if isinstance(exc, aiohttp.ClientConnectorError):
        if isinstance(exc.os_error, ConnectionRefusedError):
            return NoAnswer(f"{request}: connection refused by {where} (nothing listens there)",
                            cause="refused")
        why = exc.os_error.strerror or type(exc.os_error).__name__
        return NoAnswer(f"{request}: cannot connect to {where} ({why})", cause="lost")
    if isinstance(exc, TimeoutError | aiohttp.ServerTimeoutError):
        return NoAnswer(f"{request}: {where} did not answer in time (timeout)", cause="timeout")
    return NoAnswer(f"{request}: connection to {where} lost ({type(exc).__name__})", cause="lost")


def _loads(raw: bytes | bytearray, max_items: int = MAX_ITEMS) -> Any:
    """JSON of an answer: orjson, or json where orjson is stricter (a lone surrogate).

    ValueError for what is not JSON; ``BadAnswer`` for JSON nested too deep or holding too
    many values (retrying will not shrink it)."""
    # a value past the first is after a comma: an answer of at most max_items bytes fits
    if len(raw) > max_items and raw.count(b",") > max_items:
        raise BadAnswer(f"an answer of more than {max_items:,} JSON values", status=200)
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if "ecursion" in str(exc):
            raise BadAnswer("an answer of JSON nested too deep", status=200) from None
        try:
            return json.loads(raw)
        except RecursionError:
            raise BadAnswer("an answer of JSON nested too deep", status=200) from None


class Limiter(Protocol):
    """What the client needs of a rate limiter (``worker.pacer.AdaptiveLimiter``)."""

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
    #: the most one request may last, body included (the runner keeps it within the job's
    #: retry budget)
    request_timeout_s: float = 60.0


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


def _json_object(body: bytes | bytearray, content_type: str) -> dict[str, Any] | None:
    if "json" not in content_type:
        return None
    try:
        data = _loads(body)
    except (ValueError, BadAnswer):
        return None
    return data if isinstance(data, dict) else None


def _message(
    status: int, body: bytes | bytearray, content_type: str, data: dict[str, Any] | None
) -> str:
    if data is not None:
        for key in ("message", "detail", "error", "errors"):
            if data.get(key):
                return str(data[key])[:500]
    snippet = body[:200].decode("utf-8", "replace").strip()
    if content_type.startswith("text/html") or snippet.startswith("<"):
        media = content_type.split(";", 1)[0].strip()
        return f"HTTP {status} with a {media or 'non-JSON'} body"
    return f"HTTP {status}: {snippet}" if snippet else f"HTTP {status}"


def classify(
    status: int, body: bytes | bytearray, headers: Mapping[str, str], *, write: bool
) -> ApiError:
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
        if not is_task_id(task_id):
            found = UUID.search(msg)
            task_id = found.group(0) if found else None
        return Locked(msg, status=status, task_id=task_id)
    if status == 429:
        return RateLimited(msg, status=status, retry_after=retry_after_seconds(headers))
    if status == 408 or status >= 500:
        return Transient(msg, status=status)
    if 300 <= status < 400:
        return Rejected(f"HTTP {status}: redirects are not followed", status=status)
    return Rejected(msg, status=status)


class _Deadlines:
    """The requests' total deadline, kept by one timer for all of them: a request past its
    deadline has its task cancelled, which ``Client._request`` turns into a timeout (as
    aiohttp's own total timeout does, which sets a timer a request: ~2 us of CPU each on
    uvloop, 4% of a request's client CPU). The timer ticks every second while requests are
    in flight, so a request ends within a second of its deadline: aiohttp's own precision for
    a deadline of ``ceil_threshold`` (5 s) or more, which it rounds up to a whole second.
    A shorter deadline stays aiohttp's (exact)."""

    def __init__(self, total_s: float) -> None:
        self.total_s = total_s
        self.tick_s = 1.0
        self.ends: dict[asyncio.Task[Any], float] = {}  # in flight: when each must end
        self.expired: set[asyncio.Task[Any]] = set()
        self._timer: asyncio.TimerHandle | None = None

    def start(self, now: float) -> asyncio.Task[Any] | None:
        task = asyncio.current_task()
        if task is not None:
            self.ends[task] = now + self.total_s
            if self._timer is None:
                self._timer = asyncio.get_running_loop().call_later(self.tick_s, self._tick)
        return task

    def end(self, task: asyncio.Task[Any]) -> bool:
        """The request of ``task`` is over; whether its deadline cancelled it."""
        del self.ends[task]
        if task in self.expired:
            self.expired.discard(task)
            return True
        return False

    def _tick(self) -> None:
        self._timer = None
        now = time.monotonic()
        for task, ends in self.ends.items():
            if ends <= now and task not in self.expired:
                self.expired.add(task)
                task.cancel()
        if self.ends:
            self._timer = asyncio.get_running_loop().call_later(self.tick_s, self._tick)


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
        # the session's total deadline is kept by _Deadlines (one timer for all requests)
        # where aiohttp would round it to a second anyway; aiohttp keeps the connect and read
        # timeouts
        timeout = self._timeout = session.timeout
        self._deadlines: _Deadlines | None = None
        if timeout.total is not None and timeout.total >= timeout.ceil_threshold:
            self._deadlines = _Deadlines(timeout.total)
            self._timeout = aiohttp.ClientTimeout(
                total=None, connect=timeout.connect, sock_read=timeout.sock_read,
                sock_connect=timeout.sock_connect, ceil_threshold=timeout.ceil_threshold)

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
            total=settings.request_timeout_s,
            connect=settings.connect_timeout_s,
            sock_connect=settings.connect_timeout_s,
            sock_read=settings.read_timeout_s,
        )
        headers = {
            "Authorization": f"APIKey {settings.api_key}",
            "Accept": "application/json",
            "Accept-Encoding": "identity",
            "User-Agent": f"bulk-tagger/{__version__}",
        }
        async with aiohttp.ClientSession(
            connector=connector, timeout=timeout, headers=headers, raise_for_status=False,
            auto_decompress=False,
        ) as session:
            yield cls(session, base_url, limiter)

    async def _request(
        self, method: str, kind: str, path: str, *, params: Any = None, body: Any = None,
        deadline: aiohttp.ClientTimeout | None = None,
    ) -> Any:
        if self.refused is not None:
            raise self._refusal()
        await self.limiter.acquire()
        if self.refused is not None:  # refused while this one waited for its slot
            raise self._refusal()
        self.counts.by_kind[kind] += 1
        write = method != "GET"
        sent = time.monotonic()
        deadlines = self._deadlines if deadline is None else None
        task = deadlines.start(sent) if deadlines is not None else None
        try:
            async with self.session.request(
                method,
                self.base_url + path,
                params=params,
                data=None if body is None else orjson.dumps(body),
                headers=_JSON_BODY if body is not None else None,
                allow_redirects=False,
                timeout=self._timeout if deadline is None else deadline,
            ) as resp:
                status = resp.status
                one = kind not in _LISTS
                cap = MAX_BODY_ONE if one else MAX_BODY
                length = resp.content_length
                raw: bytes | bytearray
                if length is not None and length <= cap:  # aiohttp reads no more than that
                    raw = await resp.read()
                else:  # refused at once, or read in chunks up to the cap
                    raw = await _read_capped(resp, cap)
                answered = time.monotonic()
                if rate_headers.present(resp.headers):
                    self.limiter.stated(resp.headers)
                if self.observe_latency is not None:
                    self.observe_latency((answered - sent) * 1000)
                if 200 <= status < 300:
                    self.limiter.success()
                    self.last_ok = answered
                    try:
                        return _loads(raw, MAX_ITEMS_ONE if one else MAX_ITEMS) if raw else None
                    except ValueError:  # a proxy's page, say: it may pass
                        self.counts.transient += 1
                        raise Transient("the answer was not valid JSON", status=status) from None
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
            raise no_answer(exc, method, self.base_url + path) from None
        except asyncio.CancelledError:
            # the deadline's cancel alone is a timeout; the caller's (too) goes on
            if (deadlines is None or task is None or task not in deadlines.expired
                    or task.cancelling() > 1):
                raise
            self.counts.transient += 1
            raise no_answer(TimeoutError(), method, self.base_url + path) from None
        finally:
            if task is not None and deadlines is not None and deadlines.end(task):
                task.uncancel()  # the deadline's cancel is taken back: never the caller's
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
    async def probe(self, timeout_s: float = PROBE_TIMEOUT_S) -> list[dict[str, Any]] | None:
        """The run's first request: the regions list, once, within ``timeout_s``.

        Returns the regions, or None where the API answered but could not say (a 429 or
        5xx: the run's own retries take it from there). Raises ``JobError`` (exit 2) where
        the base URL is wrong: a 404 or a redirect on the API's own root path, an answer
        that is not the API's JSON, a host name that does not exist, an untrusted
        certificate. Raises ``NoAnswer`` (refused, timeout, a DNS failure that may pass)
        and ``AuthFailed`` as they come. Nothing is retried here.
        """
        timeout = aiohttp.ClientTimeout(
            total=None, connect=timeout_s, sock_connect=timeout_s, sock_read=timeout_s
        )
        url = self.base_url + REGIONS_PATH
        hint = f"the base URL must be the API's root (e.g. {DEFAULT_BASE_URL}), not a page under it"
        try:
            data = await self._request("GET", "regions", REGIONS_PATH, deadline=timeout)
        except NoAnswer as exc:
            if exc.cause in ("dns_unknown", "tls"):
                raise JobError(exc.message, field="--base-url",
                               hint="check the host name and scheme (nothing was sent)") from None
            raise
        except NotFound:
            raise JobError(f"GET {url} answered 404: there is no Gcore API at this base URL",
                           field="--base-url", hint=hint) from None
        except (Rejected, BadAnswer) as exc:
            raise JobError(f"GET {url} answered {exc.message}", field="--base-url",
                           hint=hint) from None
        except (RateLimited, Transient) as exc:
            if exc.status == 200:  # an answer, but not JSON: a web page, not the API
                raise JobError(f"GET {url} answered 200 with a body that is not JSON",
                               field="--base-url", hint=hint) from None
            return None
        if not isinstance(data, dict) or not isinstance(data.get("results"), list):
            raise JobError(f"GET {url} did not answer with the API's JSON (a list of regions)",
                           field="--base-url", hint=hint)
        return list(data["results"])

    async def list_projects(self) -> list[dict[str, Any]]:
        data = await self._request("GET", "projects", PROJECTS_PATH)
        return _objects(data.get("results", []) if isinstance(data, dict) else [])

    async def list_regions(self) -> list[dict[str, Any]]:
        data = await self._request("GET", "regions", REGIONS_PATH)
        return _objects(data.get("results", []) if isinstance(data, dict) else [])

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
            "GET", "list", f"/cloud/v1/images/{int(project_id):d}/{int(region_id):d}",
            params=query,
        )
        if isinstance(data, list):  # tolerate a bare list
            results, count = data, None
        elif isinstance(data, dict):
            results, count = data.get("results") or [], data.get("count")
        else:
            raise BadAnswer(f"a list page that is a JSON {type(data).__name__}", status=200)
        if isinstance(results, list) and len(results) > limit:
            raise BadAnswer(f"a list page of {len(results):,} images ({limit} were asked)",
                            status=200)
        images = [_image(item, project_id, region_id) for item in _objects(results)]
        return images, count if type(count) is int and count >= 0 else None

    async def get_image(self, project_id: int, region_id: int, image_id: str) -> Image:
        data = await self._request("GET", "get", _image_path(project_id, region_id, image_id))
        return _image(data, project_id, region_id)

    async def get_task(self, task_id: str) -> dict[str, Any]:
        if not is_task_id(task_id):
            raise BadAnswer(f"the task id {task_id!r:.60} is not a UUID", status=None)
        data = await self._request("GET", "task", f"/cloud/v1/tasks/{task_id}")  # a UUID
        return data if isinstance(data, dict) else {}

    # -- the write ---------------------------------------------------------------------------
    async def patch_image(
        self, project_id: int, region_id: int, image_id: str, body: Mapping[str, Any]
    ) -> Image:
        if "tags" in body and body["tags"] is None:
            # never: "tags": null wipes every user tag of the image
            raise ValueError("refusing to send 'tags': null")
        data = await self._request(
            "PATCH", "patch", _image_path(project_id, region_id, image_id), body=body
        )
        return _image(data, project_id, region_id)


_LISTS = frozenset(("list", "projects", "regions"))


async def _read_capped(resp: aiohttp.ClientResponse, cap: int) -> bytes | bytearray:
    """The body, refused (``BadAnswer``) past ``cap`` bytes without reading the rest."""
    length = resp.content_length
    if length is not None:  # aiohttp reads no more than the length said
        if length > cap:
            raise BadAnswer(f"an answer of {length:,} bytes (at most {cap:,} are read)",
                            status=resp.status)
        return await resp.read()
    body = bytearray()
    async for chunk in resp.content.iter_any():
        body += chunk
        if len(body) > cap:
            raise BadAnswer(f"an answer over {cap:,} bytes (the rest was not read)",
                            status=resp.status)
    return body


def _image_path(project_id: int, region_id: int, image_id: str) -> str:
    """The image's path. Each segment is safe as it is: ids are whole numbers, and an image
    id is checked to hold only characters that quoting leaves alone (``safety.segment`` would
    return it unchanged: a cost on every request for nothing)."""
    problem = image_id_problem(image_id)
    if problem is not None:  # the caller fails the target first; this is the last guard
        raise BadAnswer(problem)
    return f"/cloud/v1/images/{int(project_id):d}/{int(region_id):d}/{image_id}"


def _objects(items: Any) -> list[dict[str, Any]]:
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        raise BadAnswer("a list whose results are not JSON objects", status=200)
    return items


def _image(data: Any, project_id: int, region_id: int) -> Image:
    """An image of an answer, or ``BadAnswer`` if it is not shaped as one."""
    try:
        return Image.from_api(data, project_id=project_id, region_id=region_id)
    except (AttributeError, KeyError, TypeError, ValueError):
        raise BadAnswer("an image in the answer is malformed (it lacks an id, or its tags"
                        " are not objects)", status=200) from None

