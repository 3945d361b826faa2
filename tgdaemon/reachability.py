"""What the fleet knows about each route to a server: one probe while it is down, everyone
as soon as it is back.

A route is the way an account reaches its server: the DC address it uses, through its proxy
if any. When
connections on a route fail, every account retrying on its own would spend the daemon's
connect-rate budget on attempts that cannot succeed: 10,000 accounts retrying within a second
each keep the limiter saturated for the whole outage, and when the server returns they are
still queued behind one another at ``connect_rate``, with no burst left. So, as a circuit
breaker's half-open state does, a route that failed lets one account at a time try (the
probe, paced by the failing probe's own backoff but never further apart than ``probe_every``,
see :func:`probe_spacing`); the others wait. The first account that
reaches the route wakes every account waiting on it: they queue for the connect-rate limiter,
which then still has its burst, instead of sleeping out backoffs that grew during the outage.

No task and no polling: a wait is one future and one timer (the account's own fallback, in
case no probe ever succeeds: a growing backoff), as ``asyncio.sleep`` is; a success sets the
futures of its route.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from tgdaemon.connwatch import settle
from tgdaemon.wheel import WakeBatches


@dataclass(slots=True)
class _Route:
    #: A network failure was reported since the last success.
    down: bool = False
    #: Network failures reported since the last success (any account's).
    failures: int = 0
    #: Monotonic time before which no new probe starts (one is running, or failed recently).
    next_probe: float = 0.0
    sleepers: set[asyncio.Future[bool]] = field(default_factory=set)


def probe_spacing(retry_in: float, probe_every: float) -> float:
    """Seconds from a failed probe to the next one: the failing account's own backoff, but at
    most ``probe_every``. A probe is one connection attempt for the whole route, never a herd,
    while a backoff grows with the outage: paced by it alone, after a 12 s outage the next
    probe (and so the whole fleet's return) came up to ``backoff_cap`` seconds after the server
    did (issue 17, "Short outages")."""
    if retry_in < 0 or probe_every < 0:
        raise ValueError("retry_in and probe_every must be >= 0")
    return min(retry_in, probe_every)


def may_probe(down: bool, next_probe: float, now: float) -> bool:
    """Whether an account retrying on a route may attempt now: always when the route is not
    known to be down, else when no probe is running or due later."""
    return not down or now >= next_probe


class Reachability:
    """The routes of one daemon (see module docstring)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._routes: dict[Hashable, _Route] = {}
        #: Sleepers of routes that came back, not all woken yet: one batch a loop pass across
        #: every route (an outage of several DCs ends with several at once).
        self._wakes = WakeBatches()

    def failed(self, route: Hashable, retry_in: float, probe_every: float = math.inf) -> None:
        """A network failure on ``route``: it is down; the next probe may start in
        ``retry_in`` seconds (the failing account's own backoff), ``probe_every`` at most."""
        r = self._routes.setdefault(route, _Route())
        r.down = True
        r.failures += 1
        r.next_probe = self._clock() + probe_spacing(retry_in, probe_every)

    def claim(self, route: Hashable, hold: float) -> bool:
        """May an account that failed on ``route`` attempt now? When the route is down, this
        account becomes its probe: nobody else attempts for ``hold`` seconds unless it reports
        (:meth:`failed`, :meth:`reached`)."""
        r = self._routes.get(route)
        if r is None:
            return True
        now = self._clock()
        if not may_probe(r.down, r.next_probe, now):
            return False
        if r.down:
            r.next_probe = now + hold
        return True

    def reached(self, route: Hashable) -> int:
        """An account reached ``route``: it is up; wake its sleepers; how many were woken."""
        r = self._routes.pop(route, None)
        if r is None or not r.sleepers:
            return 0
        self._wakes.add(list(r.sleepers), False)
        return len(r.sleepers)

    async def sleep(self, route: Hashable, seconds: float) -> bool:
        """Sleep ``seconds``: True when the time ran out, False when :meth:`reached`
        ``route`` woke it first."""
        if seconds <= 0:
            return True
        loop = asyncio.get_running_loop()
        sleeper: asyncio.Future[bool] = loop.create_future()
        timer = loop.call_later(seconds, settle, sleeper, True)
        r = self._routes.setdefault(route, _Route())
        r.sleepers.add(sleeper)
        try:
            return await sleeper
        finally:
            timer.cancel()
            r.sleepers.discard(sleeper)
            if not r.down and not r.sleepers and self._routes.get(route) is r:
                del self._routes[route]

    def sleeping(self, route: Hashable) -> int:
        r = self._routes.get(route)
        return 0 if r is None else len(r.sleepers)

    def failures(self, route: Hashable) -> int:
        """Consecutive network failures on ``route`` (every account's) since a success."""
        r = self._routes.get(route)
        return 0 if r is None else r.failures

    def is_down(self, route: Hashable) -> bool:
        r = self._routes.get(route)
        return r is not None and r.down
