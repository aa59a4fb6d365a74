"""The pool's rate: where it should be, from what the API answered (429s, everything else,
and any limit its headers state), in pure arithmetic over an injectable clock, so it is tested
without sleeping. ``worker.pacer.AdaptiveLimiter`` hands out the slots at this rate: every HTTP
attempt, retries and task polls included, takes one.

``RateController``, in short:

  * A known ceiling (``--rate``) is run at 98% of itself and never exceeded. A limit the
    API states (``RateLimit-Policy``/``RateLimit``, ``X-RateLimit-*``: ``worker.rate_headers``)
    is run at 99% of itself from its first answer: no probing, no 429. A windowed quota
    (say 1,200 per 5 minutes) is paced evenly across its window: never faster than 99% of
    the quota per second, nor than what is left of the window's quota over the time left to
    its reset. One of N shards takes 1/N of a stated limit (``share``).
  * Without either it finds the limit: it starts at ``start`` and doubles every ``step_s``
    while demand exceeds it (slow start), but never past twice the rate the answers come
    back at. The run's first 429 cuts to 95% of what the API has just been accepting (the
    busiest recent 100 ms); a server's burst can hide its limit, so one second look 50 ms
    later cuts again, to 95% of what it accepted since, if 429s still come.
  * Later, a congestion episode (429s once the rate is back where the last cut aimed, or
    after a calm second) cuts to 95% of what the API accepted in the last half second (to
    half at once when most answers of the last 200 ms were 429s), then (a second look, as
    above) to 95% of what it accepted since the cut if 429s still come, then once per
    ``epoch_s`` while they last. A cut takes off at least a tenth, and at most half when
    fewer than 3 answers measure it (the requests may be waiting out a Retry-After); in a storm
    (the API accepting almost nothing since the last cut) it halves, every 50 ms down to a
    tenth of what the API accepted before, then once an epoch: a storm says nothing of the
    limit and does not drop the rate to its floor. When the API refuses the same share of
    answers after a cut as before it, it refuses a share, not a rate (a proxy's storm of
    429s): the rate holds, and afterwards climbs back to what the API accepted as the episode
    began, or before it (within ``memory_s``) if that was more. A 429 to a request sent
    before the last cut says nothing new.
  * Recovery (CUBIC's shape, with memory): after a cut the rate climbs back, concave, in
    ``climb_s`` to 98% of what the API accepted at the cut; if it had accepted more than
    that before the episode (within ``memory_s``), it climbs on to that rate along an
    S-curve over ``probe_s`` (slow near both ends, where the API may be limiting, fast in
    between; three times slower when that rate is less than 1.5 times the present one: more
    likely a server's burst than a limit that came back); then it probes above, convex and
    slowly (+1% after a second, +8% after two).
    One rate is remembered apart: the busiest 200 ms the API accepted before the run's first
    429. That episode's cuts may have measured a storm, a slow spell or the run's own requests
    waiting out a Retry-After, not a limit; after a calm second (no cut) at less than half of
    it, the rate climbs back to it along the S-curve, once.
    Where the rate is above what the API last accepted, the first 429 is the answer to that
    probe and cuts at once; elsewhere a 429 counts only when the last second holds at least
    ``noise_count`` and they are more than ``noise_share`` of its answers (a stray 429 among
    hundreds of accepted requests does not slow a run). The climb advances only while
    demand exceeds the rate (an idle spell earns nothing).
  * Retry-After is not applied here: it delays only its own request's retry (``worker.retry``).

Why a known ceiling is run at 98% of itself, with a bucket of at most 1% of it: a bucket
admits its capacity on top of its rate in any window (98% + 1%), and jitter on the way bunches
arrivals; the last 1% keeps every one-second window the server sees at or below the ceiling.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from worker.rate_headers import Stated

Clock = Callable[[], float]

#: A known ceiling is run at this share of itself (see the module docstring).
CEILING_SHARE = 0.98
#: A limit the API states, at this share: its own bucket enforces it, and any burst it
#: allows covers the pacer's jitter
STATED_SHARE = 0.99
#: The bucket under a known ceiling holds at most this share of it (see above).
CEILING_BURST_SHARE = 0.01
_BINS = 10  # the last second, in 100 ms bins
_BIN_S = 1.0 / _BINS
_SLOW_START_WINDOW_S = 0.2
_EPISODE_GAP_S = 1.0  # cuts closer than this belong to one congestion episode
_LOOK_GAP_S = 0.05  # the second look after an episode's first cut comes this soon
_LAND = 0.95  # a cut lands at this share of what the API accepted
_CUT_MOST = 0.5  # a cut in a storm keeps this share of the rate
_CUT_LEAST = 0.9  # any cut keeps at most this share
_PLATEAU = 0.98  # the climb after a cut aims at this share of what the API accepted
_ABOVE = 1.02  # a rate this far above what the API last accepted is a probe
_STORM_SHARE = 0.1  # accepting less than this share of the rate since a cut is a storm
_FEW_ANSWERS = 3  # a cut measured on fewer answers halves at most
_SHARE_ANSWERS = 10  # a share is measured over at least this many answers
_SHARE_ROSE = 1.25  # shares within this factor of each other are about the same
_FAR = 1.1  # what the API accepted before counts as a goal of its own this far above
_NEAR = 1.5  # a remembered rate less than this far above is climbed to over 3 x probe_s
_GROW = 0.01  # the probe above the top: +_GROW * t**3 of it, t in seconds
_KNOWN_FAR = 2.0  # a rate the API accepted this far above the present one is climbed to
_STATED_WINDOW_S = 2.0  # a stated window this long or longer is paced by what is left of it


class RateController:
    """Where the rate should be, from what the API answered. Rates are requests per second,
    times in seconds of ``clock``."""

    def __init__(
        self,
        ceiling: float | None = None,
        *,
        start: float = 20.0,
        floor: float = 1.0,
        maximum: float = 20_000.0,
        step_s: float = 0.05,
        epoch_s: float = 0.25,
        climb_s: float = 0.3,
        probe_s: float = 1.0,
        memory_s: float = 10.0,
        noise_share: float = 0.02,
        noise_count: int = 3,
        share: float = 1.0,
        clock: Clock = time.monotonic,
    ) -> None:
        if ceiling is not None and ceiling <= 0:
            raise ValueError(f"ceiling must be > 0 requests/s, got {ceiling!r}")
        if start <= 0 or floor <= 0 or maximum <= 0:
            raise ValueError("start, floor and maximum must be > 0 requests/s")
        if min(step_s, epoch_s, climb_s, probe_s, memory_s) <= 0:
            raise ValueError("step_s, epoch_s, climb_s, probe_s and memory_s must be > 0")
        if not 0 < share <= 1:
            raise ValueError(f"share must be in (0, 1], got {share!r}")
        self.clock = clock
        self.ceiling = ceiling
        self._top_limit = ceiling * CEILING_SHARE if ceiling is not None else maximum
        self.maximum = self._top_limit
        self.floor = min(floor, self.maximum)
        self.slow_start = ceiling is None
        self.rate = self.maximum if ceiling is not None else max(self.floor, min(start, maximum))
        self.step_s = step_s
        self.epoch_s = epoch_s
        self.climb_s = climb_s
        self.probe_s = probe_s
        self.memory_s = memory_s
        self.noise_share = noise_share
        self.noise_count = noise_count
        self.share = share  # of a stated limit: 1/N for one of N shards
        now = clock()
        self._started = now
        self._last_step = now
        self._last_decrease: float | None = None
        self._pressed_at = -math.inf  # when a request last waited for a slot
        # answers in the last second, in 100 ms bins: accepted (not 429) and throttled (429)
        self._ok = [0] * _BINS
        self._no = [0] * _BINS
        self._bin_at = int(now / _BIN_S)
        self._ok_since_cut = 0
        self._no_since_cut = 0
        # the accepted share of the answers between the last two cuts, and the rate then
        self._share: tuple[float | None, float] | None = None
        self._shares = False  # this episode's API refuses a share of requests, not a rate
        self._pre = self.rate  # what the API accepted as the episode began
        self._second_look = False  # an episode's first cut was made: one quick second look
        self._first_episode = True
        # the recovery curve: from ``_from`` (just after the cut) up to ``_w`` (what the API
        # accepted at the cut), on to ``_top`` (what it accepted before the episode), then
        # above; ``_t`` is the curve's time, which runs only while demand exceeds the rate
        self._from = self._w = self._top = self.rate
        self._t = 0.0
        self._prev = 0.0  # what the API accepted before the last episode...
        self._prev_at = now  # ... and when it was seen
        # the busiest rate the API accepted before the run's first 429, and when: climbed
        # back to once, after a calm second far below it
        self._known = 0.0
        self._known_at = now
        #: a limit the API states, in requests/s (None: none stated)
        self.stated: float | None = None
        self._window_guess = 1.0  # the longest Reset seen (headers that name no window)
        #: 429s seen, and how many of them lowered the rate
        self.throttled = 0
        self.decreases = 0

    # -- the last second's answers ----------------------------------------------------------
    def _roll(self, now: float) -> int:
        slot = int(now / _BIN_S)
        gap = slot - self._bin_at
        if gap > 0:
            ok, no = self._ok, self._no
            for i in range(1, min(gap, _BINS) + 1):
                j = (self._bin_at + i) % _BINS
                ok[j] = no[j] = 0
            self._bin_at = slot
        return slot % _BINS

    def accepted_last_second(self) -> int:
        """Answers other than 429 in the last second."""
        self._roll(self.clock())
        return sum(self._ok)

    def _accepted_rate(self, now: float, span_s: float) -> float:
        """Accepted answers per second over the last ``span_s`` (whole bins, up to a second),
        counting only time since the controller started."""
        current = self._roll(now)
        bins = max(1, min(_BINS, round(span_s / _BIN_S)))
        total = sum(self._ok[(current - i) % _BINS] for i in range(bins))
        # the current bin is only partly over: count the time it has run, not all of it
        covered = (bins - 1) * _BIN_S + (now - self._bin_at * _BIN_S)
        return total / max(_BIN_S, min(covered, now - self._started))

    def _peak_accepted_rate(self, now: float) -> float:
        """The busiest 200 ms of accepted answers in the last second (whole bins), per second."""
        current = self._roll(now)
        ok = self._ok
        return max(ok[(current - i) % _BINS] + ok[(current - i - 1) % _BINS]
                   for i in range(1, _BINS - 1)) / (2 * _BIN_S)

    def _recent_accepted_rate(self, now: float) -> float:
        """The API's acceptance rate just now: the busier of the last whole 100 ms bin and the
        current one (if it has run 50 ms). While the rate ramps up, a longer look would
        average in the slower past."""
        current = self._roll(now)
        best = self._ok[(current - 1) % _BINS] / _BIN_S
        ran = now - self._bin_at * _BIN_S
        if ran >= _BIN_S / 2:
            best = max(best, self._ok[current] / ran)
        return best

    # -- signals ------------------------------------------------------------------------------
    def on_wait(self) -> None:
        """Demand exceeded the rate: an acquisition had to wait."""
        self._pressed_at = self.clock()

    def on_success(self) -> None:
        """The API answered, other than with a 429 (it accepted the request's rate)."""
        self._ok[self._roll(self.clock())] += 1
        self._ok_since_cut += 1

    def _probing(self) -> bool:
        return not self.slow_start and self.rate > self._w * _ABOVE

    def on_throttled(self, sent_at: float | None = None) -> bool:
        """A 429 came back to a request sent at ``sent_at`` (the clock's time; None: unknown).

        Returns True when that lowered the rate (see the module docstring for when)."""
        self.throttled += 1
        now = self.clock()
        self._no[self._roll(now)] += 1
        self._no_since_cut += 1
        last = self._last_decrease
        if last is not None and sent_at is not None and sent_at < last:
            return False  # sent at the old rate: nothing new
        if self._second_look and last is not None and now - last > _EPISODE_GAP_S:
            self._second_look = False  # the episode's first cut was enough
        probing = self._probing()
        if last is not None:
            since = now - last
            # nearly all refused since the last cut (a storm): no need to wait an epoch
            storm = (self._ok_since_cut < _STORM_SHARE * self.rate * since
                     and self.rate > _STORM_SHARE * self._prev)
            gap = _LOOK_GAP_S if self._second_look or probing or storm else self.epoch_s
            if since < gap:
                return False
        if not probing:
            throttled = sum(self._no)
            if throttled < self.noise_count or throttled <= self.noise_share * (
                throttled + sum(self._ok)
            ):
                return False  # a stray 429, not a limit
        self._cut(now, last)
        return True

    def _cut(self, now: float, last: float | None) -> None:
        rate = self.rate
        if last is None:
            # the run's first cut (it ends slow start): down to what the API has just been
            # accepting, then a second look soon: its own burst may have hidden the limit
            accepted = min(rate, self._recent_accepted_rate(now))
            target = _LAND * accepted if accepted else rate / 2
            if self._pressed_at < now - _BIN_S:
                # no request waited for a slot just now: the answers measure how much the
                # run asked (its requests waiting out a Retry-After, a slow spell), not what
                # the API accepts; halve at most, as a later cut does
                target = max(target, rate * _CUT_MOST)
            self._remember(max(target, accepted), now, force=True)
            self._pre = accepted
            self._known = self._peak_accepted_rate(now)
            self._known_at = now
            self.slow_start = False
            self._second_look = True
        elif now - last > _EPISODE_GAP_S or self._t >= self.climb_s:
            # a new episode: remember what the API accepted before it, cut to 95% of what
            # it accepted in the last half second (at once to half if most answers of the
            # last 200 ms were 429s) and take a second look soon
            self._pre = min(rate, self._accepted_rate(now, 1.0))
            self._remember(self._pre, now)
            accepted = min(rate, self._accepted_rate(now, 0.5))
            target = max(rate * _CUT_MOST, min(rate * _CUT_LEAST, _LAND * accepted))
            current = self._roll(now)
            refused = self._no[current] + self._no[current - 1]
            if refused > self._ok[current] + self._ok[current - 1]:
                target = rate * _CUT_MOST
            self._second_look = True
            self._first_episode = False
            self._share = None
            self._shares = False
        else:
            # still refused after a cut: what the API accepted since is the truth to cut to
            accepted = self._ok_since_cut / max(now - last, _LOOK_GAP_S)
            target = min(rate * _CUT_LEAST, _LAND * accepted)
            answers = self._ok_since_cut + self._no_since_cut
            share = self._ok_since_cut / answers if answers >= _SHARE_ANSWERS else None
            earlier, self._share = self._share, (share, rate)
            storm = accepted < _STORM_SHARE * rate
            if not storm and share is not None and earlier is not None and earlier[0] is not None:
                # the API refuses about the same share at a rate cut by a fifth: it refuses
                # a share, not a rate (a proxy's storm of 429s); slower would not help
                low, high = earlier[0] / _SHARE_ROSE - 0.02, earlier[0] * _SHARE_ROSE + 0.02
                self._shares = self._shares or (rate <= 0.8 * earlier[1] and low <= share <= high)
            if self._shares and not storm:
                target = accepted = rate  # hold, and aim back at what it accepted before
                self._remember(self._pre, now)
            elif storm or answers < _FEW_ANSWERS or self._pressed_at < last:
                # a storm says nothing of the limit, nor do two answers, nor the answers to a
                # run none of whose requests waited for a slot since the cut (they may be
                # waiting out their Retry-After): halve at most; in a storm, every 50 ms down
                # to a tenth of what the API accepted before it, then once an epoch
                target = max(target, rate * _CUT_MOST)
            elif self._second_look and self._first_episode:
                # the run's first limit, measured past the server's burst
                self._remember(max(target, accepted), now, force=True)
            self._second_look = self._first_episode = False
        self.rate = max(self.floor, min(self.maximum, target))
        self._from = self.rate
        self._w = max(self.rate, min(self.maximum, _PLATEAU * accepted, rate))
        fresh = now - self._prev_at <= self.memory_s
        # a rate well above what the API accepts now (not the noise of measuring it)
        far = fresh and self._prev > self._w * _FAR
        self._top = min(self.maximum, self._prev) if far else self._w
        self._t = 0.0
        self._last_decrease = now
        self._last_step = now
        self._ok_since_cut = self._no_since_cut = 0
        self.decreases += 1

    def _remember(self, accepted: float, now: float, *, force: bool = False) -> None:
        """What the API accepted before an episode: kept for ``memory_s`` while lower rates
        are all it accepts, replaced by any within 10% of it, or by anything after that."""
        if force or accepted >= 0.9 * self._prev or now - self._prev_at > self.memory_s:
            self._prev = accepted
            self._prev_at = now

    def _curve(self, t: float) -> float:
        """The rate ``t`` seconds (of demand) after the last cut."""
        w = self._w
        if w > self._from and t < self.climb_s:
            x = 1.0 - t / self.climb_s
            return w - (w - self._from) * x * x * x
        if w > self._from:
            t -= self.climb_s
        top = self._top
        if top > w:
            # a near goal is more likely the server's burst than a limit that came back
            span = self.probe_s if top > _NEAR * w else 3.0 * self.probe_s
            if t < span:
                x = t / span
                return w + (top - w) * x * x * (3.0 - 2.0 * x)
            t -= span
        return top * (1.0 + _GROW * t * t * t)

    def tick(self) -> bool:
        """Move the rate up if demand kept exceeding it; True when it changed."""
        now = self.clock()
        elapsed = now - self._last_step
        if elapsed < self.step_s:
            return False
        # demand exceeded the rate since the last step: a request waited for a slot
        saturated = self._pressed_at >= self._last_step
        self._last_step = now
        if not saturated or self.rate >= self.maximum:
            return False
        # an idle spell earns nothing: credit at most a few steps of climbing
        elapsed = min(elapsed, 4 * self.step_s)
        if self.slow_start:
            # double, but no faster than the answers come back: twice the rate the API has
            # been answering at, so a slow API (long round trips) is not flooded before its
            # first 429 can arrive (TCP's slow start grows by acknowledgements the same way)
            answered = self._accepted_rate(now, _SLOW_START_WINDOW_S)
            grown = min(self.rate * 2, self.maximum, 2 * answered)
        else:
            known, last = self._known, self._last_decrease
            if (known > _KNOWN_FAR * self.rate and last is not None
                    and now - last > _EPISODE_GAP_S and now - self._known_at <= self.memory_s):
                # a calm second, far below a rate the API accepted before the run's first
                # 429 (that episode's cuts may have measured a storm or the run's own
                # Retry-After waits, not a limit): climb back to it, once
                self._from = self._w = self.rate
                self._top = min(self.maximum, known)
                self._t = 0.0
                self._known = 0.0
            self._t += elapsed
            grown = min(self.maximum, self._curve(self._t))
        if grown <= self.rate:
            return False
        self.rate = grown
        return True

    # -- a limit the API states -------------------------------------------------------------
    def on_stated(self, said: Stated) -> bool:
        """An answer stated the limit (``worker.rate_headers``); True when the rate moved.

        The pace: 99% of the quota per second, and for a window of 2 s or more, no faster
        than 99% of what is left of its quota over the time left to its reset; of both, this
        process's ``share`` (one of N shards: 1/N)."""
        window = said.window_s
        if window is None:  # X-RateLimit-*: the window is the longest Reset seen
            if said.reset_s is not None:
                self._window_guess = max(self._window_guess, float(said.reset_s))
            window = self._window_guess
        per_s = said.quota / window * self.share
        pace = STATED_SHARE * per_s
        if window >= _STATED_WINDOW_S and said.remaining is not None and said.reset_s:
            pace = min(pace, STATED_SHARE * said.remaining * self.share / said.reset_s)
        cap = max(self.floor, min(self._top_limit, pace))
        first = self.stated is None
        self.stated = per_s
        if not first and abs(cap - self.maximum) <= 0.005 * self.maximum:
            return False
        self.maximum = cap
        self.slow_start = False
        last = self._last_decrease
        calm = last is None or self.clock() - last > _EPISODE_GAP_S
        before = self.rate
        if calm:  # trusted at once
            self.rate = self._from = self._w = self._top = cap
            self._t = 0.0
        else:  # 429s came lately: the climb gets there
            self.rate = min(self.rate, cap)
            self._w = min(self._w, cap)
            self._top = min(self._top, cap)
        return self.rate != before

