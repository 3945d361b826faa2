"""What the watchdog sees of one worker: when it last made progress, and until when it waits
on purpose.

A worker that waits deliberately (a backoff, a flood wait, its connect-rate slot, its turn on a
route that is down, a connects-in-flight slot while thousands connect before it) must not be
mistaken for a stuck one and restarted (``lifecycle.watchdog_restarts``): every such wait goes
through here, so it is declared while it lasts and its end counts as progress.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Callable, Hashable

from tgdaemon.reachability import Reachability


class Progress:
    """One worker's progress and deliberate waits (see module docstring)."""

    __slots__ = ("_monotonic", "_reach", "last", "waiting_until")

    def __init__(self, monotonic: Callable[[], float], reach: Reachability) -> None:
        self._monotonic = monotonic
        self._reach = reach
        #: Monotonic time of the last proof of progress (a heartbeat, a finished connect).
        self.last = monotonic()
        #: Monotonic deadline of a deliberate wait (backoff, flood wait); the watchdog ignores
        #: a worker that is waiting on purpose.
        self.waiting_until: float | None = None

    def made(self) -> float:
        """Record progress now; return the (monotonic) time recorded."""
        self.last = self._monotonic()
        return self.last

    async def wait(self, delay: float, route: Hashable | None = None) -> None:
        """Sleep ``delay``; with a ``route``, until another account reaches it if sooner."""
        if delay <= 0:
            return
        self.waiting_until = self._monotonic() + delay
        try:
            if route is None:
                await asyncio.sleep(delay)
            else:
                await self._reach.sleep(route, delay)
        finally:
            self.waiting_until = None
            self.made()

    @contextlib.asynccontextmanager
    async def slot(self, slots: asyncio.Semaphore | None) -> AsyncIterator[None]:
        """Hold one of the daemon's connects-in-flight ``slots`` (if limited); queueing for it
        is a deliberate wait."""
        if slots is None:
            yield
            return
        self.waiting_until = math.inf
        try:
            await slots.acquire()
        finally:
            self.waiting_until = None
            self.made()
        try:
            yield
        finally:
            slots.release()
