"""The rate limit an API states in its answers' headers, read into one ``Stated``.

Two families are read (names are case-insensitive, as HTTP's are):

- the IETF draft's structured fields (draft-ietf-httpapi-ratelimit-headers):
  ``RateLimit-Policy: "default";q=1200;w=300`` (a quota ``q`` per window of ``w`` seconds)
  and ``RateLimit: "default";r=1100;t=240`` (``r`` left, ``t`` seconds until the window
  resets); the draft's older single form ``RateLimit-Policy: 1200;w=300`` too, and
  ``RateLimit-Limit`` / ``RateLimit-Remaining`` / ``RateLimit-Reset`` where sent apart;
- the common ``X-RateLimit-Limit`` / ``X-RateLimit-Remaining`` / ``X-RateLimit-Reset`` (the
  reset as seconds, or as a Unix time when it is one). These name no window: the limiter
  takes the longest reset it has seen as the window's length.

When a field lists several policies, the tightest (least quota per second) counts. A value
that does not parse is ignored, as if the header were absent: a stated limit only ever
replaces probing, it is never required.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from dataclasses import dataclass

from multidict import istr

#: a Reset above this is a Unix time, not a number of seconds
_EPOCH = 1_000_000_000
_ITEM = re.compile(r"^\s*(?:\"[^\"]*\"|[A-Za-z*][\w.*:/%-]*|(\d+(?:\.\d+)?))?\s*((?:;[^;,]*)*)$")
_PARAM = re.compile(r"^\s*([a-z][\w-]*)\s*=\s*\"?([0-9]+(?:\.[0-9]+)?)\"?\s*$")


@dataclass(frozen=True, slots=True)
class Stated:
    """What the answer said: ``quota`` requests per ``window_s`` seconds (None: window not
    said), ``remaining`` of them left, the window resetting in ``reset_s`` (None: not said)."""

    quota: float
    window_s: float | None
    remaining: float | None = None
    reset_s: float | None = None


def _items(value: str) -> list[tuple[float | None, dict[str, float]]]:
    """A structured-field list: each item's bare number (if any) and numeric parameters."""
    out = []
    for raw in value.split(","):
        m = _ITEM.match(raw)
        if m is None:
            continue
        params: dict[str, float] = {}
        for part in m.group(2).split(";")[1:]:
            p = _PARAM.match(part)
            if p is not None:
                params[p.group(1)] = float(p.group(2))
        bare = float(m.group(1)) if m.group(1) else None
        out.append((bare, params))
    return out


def _number(value: str | None) -> float | None:
    if not value:
        return None
    try:
        number = float(value.split(",")[0].strip())
    except ValueError:
        return None
    return number if number >= 0 else None


def _reset(value: float | None, now: float) -> float | None:
    if value is None:
        return None
    return max(0.0, value - now) if value > _EPOCH else value


def _ietf(headers: Mapping[str, str]) -> Stated | None:
    policy = headers.get("RateLimit-Policy")
    if not policy:
        return None
    best: tuple[float, float] | None = None  # (quota, window) of the tightest policy
    for bare, params in _items(policy):
        quota = params.get("q", bare)
        window = params.get("w", 1.0)
        if quota is None or quota <= 0 or window <= 0:
            continue
        if best is None or quota / window < best[0] / best[1]:
            best = (quota, window)
    if best is None:
        return None
    remaining = reset = None
    current = headers.get("RateLimit")
    if current:
        for bare, params in _items(current):
            r = params.get("r", params.get("remaining", bare))
            if r is not None and (remaining is None or r < remaining):
                remaining, reset = r, params.get("t", params.get("reset"))
    remaining = remaining if remaining is not None else _number(headers.get("RateLimit-Remaining"))
    reset = reset if reset is not None else _number(headers.get("RateLimit-Reset"))
    return Stated(best[0], best[1], remaining, reset)


def stated(headers: Mapping[str, str], *, now: float | None = None) -> Stated | None:
    """The limit ``headers`` state, or None (no such headers, or none that parse).

    ``now``: the Unix time, for a Reset given as one (default: ``time.time()``)."""
    found = _ietf(headers)
    if found is not None:
        return found
    for prefix in ("X-RateLimit-", "RateLimit-"):
        quota = _number(headers.get(prefix + "Limit"))
        if quota:
            clock = time.time() if now is None else now
            return Stated(quota, None, _number(headers.get(prefix + "Remaining")),
                          _reset(_number(headers.get(prefix + "Reset")), clock))
    return None


# the names as ``istr``: a case-insensitive multidict (aiohttp's headers) looks them up
# without folding their case again on every answer (a fifth of the cost of plain ``str``)
_POLICY, _X_LIMIT, _LIMIT = istr("RateLimit-Policy"), istr("X-RateLimit-Limit"), istr(
    "RateLimit-Limit")


def present(headers: Mapping[str, str]) -> bool:
    """Whether ``headers`` carry any rate-limit field (a cheap test for every answer)."""
    return _POLICY in headers or _X_LIMIT in headers or _LIMIT in headers
