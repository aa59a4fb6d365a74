"""The simulator's settings (``SimConfig``, ``Faults``) and what it counts (``Counters``).

Units: seconds unless a name says ``_ms``; probabilities are in [0, 1] and drawn per request
from one RNG seeded with ``Faults.seed``, so a run with the same requests in the same order
sees the same faults.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from worker import defaults

#: Request kinds counted in ``Counters.requests`` (admin paths are never counted).
KINDS: tuple[str, ...] = ("projects", "regions", "list", "get", "patch", "task", "other")
#: Fault kinds counted in ``Counters.faults``.
FAULT_KINDS: tuple[str, ...] = ("429", "5xx", "drop_before", "drop_after", "401", "latency")
RETRY_AFTER_FORMS: tuple[str, ...] = ("seconds", "date", "ms")
RATE_HEADER_STYLES: tuple[str, ...] = ("none", "ietf", "x")


@dataclass
class Faults:
    """Faults injected on ``/cloud/`` requests.

    ``p_*`` faults hit only requests whose method is in ``methods``; latency, the token bucket
    (``rate_limit``/``rate_burst``) and ``auth_fail_after`` hit every ``/cloud/`` request.
    ``auth_fail_after`` counts ``/cloud/`` requests from the start, or from the
    ``set_faults`` call that set it. ``retry_after`` is the form of a ``p_429`` answer's
    ``Retry-After``: whole seconds (rounded up), an HTTP date, or seconds plus
    ``retry-after-ms``; the token bucket always sends seconds (at least 1) plus
    ``retry-after-ms``. ``rate_schedule`` (the bucket's rate over time, 0: refuse all),
    ``quota`` per ``quota_window_s`` and ``rate_headers`` (how answers state the limit):
    see ``worker.simulator.limits``.
    """

    seed: int = 0
    p_429: float = 0.0
    retry_after: str = "seconds"
    retry_after_s: float = 1.0
    p_5xx: float = 0.0
    p_drop_before: float = 0.0
    p_drop_after: float = 0.0
    latency_ms: float = 0.0
    latency_jitter_ms: float = 0.0
    rate_limit: float | None = None
    rate_burst: float | None = None
    rate_schedule: tuple[tuple[float, float], ...] = ()
    quota: int | None = None
    quota_window_s: float = 60.0
    rate_headers: str = "none"
    methods: frozenset[str] = frozenset({"GET", "PATCH"})
    auth_fail_after: int | None = None

    def __post_init__(self) -> None:
        self.methods = frozenset(m.upper() for m in self.methods)
        for name in ("p_429", "p_5xx", "p_drop_before", "p_drop_after"):
            p = getattr(self, name)
            if not isinstance(p, int | float) or not 0.0 <= p <= 1.0:
                raise ValueError(f"Faults.{name} must be a probability in [0, 1], not {p!r}")
        if self.retry_after not in RETRY_AFTER_FORMS:
            raise ValueError(
                f"Faults.retry_after must be one of {', '.join(RETRY_AFTER_FORMS)}, "
                f"not {self.retry_after!r}"
            )
        for name in ("retry_after_s", "latency_ms", "latency_jitter_ms"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or value < 0:
                raise ValueError(f"Faults.{name} must be a number >= 0, not {value!r}")
        for name in ("rate_limit", "rate_burst"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int | float) or value <= 0):
                raise ValueError(
                    f"Faults.{name} must be > 0 or None, not {value!r} "
                    "(HINT: None switches the server-side token bucket off)"
                )
        self.rate_schedule = tuple((float(at), float(limit)) for at, limit in self.rate_schedule)
        if any(at < 0 or limit < 0 for at, limit in self.rate_schedule):
            raise ValueError("Faults.rate_schedule: times and limits must be >= 0")
        if list(self.rate_schedule) != sorted(self.rate_schedule):
            raise ValueError("Faults.rate_schedule must be in time order")
        if self.quota is not None and (self.quota < 1 or self.quota_window_s <= 0):
            raise ValueError("Faults.quota must be >= 1 and quota_window_s > 0")
        if self.rate_headers not in RATE_HEADER_STYLES:
            raise ValueError(
                f"Faults.rate_headers must be one of {', '.join(RATE_HEADER_STYLES)}, "
                f"not {self.rate_headers!r}"
            )
        if self.auth_fail_after is not None and self.auth_fail_after < 0:
            raise ValueError("Faults.auth_fail_after must be >= 0 or None")

    def replace(self, **changes: Any) -> Faults:
        """A copy with ``changes``; unknown names raise ``TypeError`` naming them."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise TypeError(
                f"unknown Faults field(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})"
            )
        if "methods" in changes:
            changes["methods"] = frozenset(changes["methods"])
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["methods"] = sorted(self.methods)
        out["rate_schedule"] = [list(step) for step in self.rate_schedule]
        return out


@dataclass
class SimConfig:
    """How the simulator starts: demo data (``images`` spread over projects x regions, from
    ``seed``), the accepted key (None: any non-empty key), the largest page, and faults."""

    images: int = defaults.SIMULATE_IMAGES
    seed: int = 0
    api_key: str | None = None
    page_max: int = defaults.PAGE_SIZE
    faults: Faults = field(default_factory=Faults)

    def __post_init__(self) -> None:
        if self.images < 0:
            raise ValueError(f"SimConfig.images must be >= 0, not {self.images}")
        if self.page_max < 1:
            raise ValueError(f"SimConfig.page_max must be >= 1, not {self.page_max}")

    def __repr__(self) -> str:  # never show the key
        key = None if self.api_key is None else "***"
        return (
            f"SimConfig(images={self.images}, seed={self.seed}, api_key={key}, "
            f"page_max={self.page_max}, faults={self.faults!r})"
        )


ImageKey = tuple[int, int, str]


@dataclass
class Counters:
    """What the simulator saw; reset in place by ``Simulator.reset_counters``.

    ``requests``, ``faults``, ``statuses``, ``patches_per_image``, ``applied_per_image`` and
    ``per_second`` are ``collections.Counter`` objects: a missing key reads as 0.
    Dropped connections have no status: they are counted in ``faults`` only.
    """

    requests: Counter[str] = field(default_factory=lambda: Counter(dict.fromkeys(KINDS, 0)))
    statuses: Counter[int] = field(default_factory=Counter)
    patches_per_image: Counter[ImageKey] = field(default_factory=Counter)
    applied_per_image: Counter[ImageKey] = field(default_factory=Counter)
    patch_bodies_with_tags_null: int = 0
    rate_limited: int = 0
    faults: Counter[str] = field(default_factory=lambda: Counter(dict.fromkeys(FAULT_KINDS, 0)))
    max_in_flight: int = 0
    max_per_second: int = 0
    per_second: Counter[int] = field(default_factory=Counter)
    # the sliding one-second window and the time of the first request (monotonic seconds)
    _window: deque[float] = field(default_factory=deque, repr=False)
    _t0: float | None = field(default=None, repr=False)

    def total(self) -> int:
        """Every ``/cloud/`` request received."""
        return sum(self.requests.values())

    def arrived(self, kind: str, now: float, in_flight: int) -> None:
        """Count one ``/cloud/`` request arriving at ``now`` with ``in_flight`` open."""
        self.requests[kind] += 1
        self.max_in_flight = max(self.max_in_flight, in_flight)
        if self._t0 is None:
            self._t0 = now
        self.per_second[math.floor(now - self._t0)] += 1
        window = self._window
        window.append(now)
        edge = now - 1.0
        while window[0] <= edge:
            window.popleft()
        self.max_per_second = max(self.max_per_second, len(window))

    def clear(self, in_flight: int = 0) -> None:
        fresh = Counters()
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(fresh, f.name))
        self.max_in_flight = in_flight

    def as_dict(self) -> dict[str, Any]:
        """JSON-able: image keys become ``"project/region/image_id"``, int keys strings."""

        def keyed(counter: Counter[ImageKey]) -> dict[str, int]:
            return {f"{p}/{r}/{i}": n for (p, r, i), n in counter.items()}

        return {
            "total": self.total(),
            "requests": dict(self.requests),
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "patches_per_image": keyed(self.patches_per_image),
            "applied_per_image": keyed(self.applied_per_image),
            "patch_bodies_with_tags_null": self.patch_bodies_with_tags_null,
            "rate_limited": self.rate_limited,
            "faults": dict(self.faults),
            "max_in_flight": self.max_in_flight,
            "max_per_second": self.max_per_second,
            "per_second": {str(k): v for k, v in sorted(self.per_second.items())},
        }
