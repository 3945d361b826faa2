"""Daemon-wide limits on new connections, so a restart of thousands of accounts is polite.

The rate uses virtual scheduling (GCRA): each caller is given the next free slot and sleeps
until it. No background task and no polling: 10,000 waiting workers cost 10,000 sleeping
coroutines, which they are anyway. The concurrency cap bounds connects in flight even when the
rate is unlimited (measured: 10,000 unbounded connects on 2 cores took 277 s, every one of them
timing out and retrying; bench/RESULTS.md). A worker takes its rate slot before a concurrency
slot: one held while sleeping for its rate slot capped the rate at concurrency / that sleep.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


class ConnectRateLimiter:
    """``rate`` connections per second with bursts of up to ``burst``; rate 0 = unlimited."""

    def __init__(
        self,
        rate: float,
        burst: int = 1,
        *,
        concurrency: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate < 0 or burst < 1 or (concurrency is not None and concurrency < 1):
            raise ValueError("rate must be >= 0, burst and concurrency >= 1")
        #: Held for the duration of one connect, and of one close after a failure; None = no
        #: cap. Closes take slots because a fleet-wide drop wakes every worker at once: 10,000
        #: closes, each queued behind all the others on the event loop, each outlasted the
        #: worker's close timeout (and its client was rebuilt, doubling the work).
        self.in_flight = None if concurrency is None else asyncio.Semaphore(concurrency)
        self._interval = 0.0 if rate == 0 else 1.0 / rate
        self._tolerance = self._interval * (burst - 1)
        self._clock = clock
        self._tat = 0.0  # theoretical arrival time of the next request

    def reserve(self) -> float:
        """Take the next slot; return how long the caller must wait for it (pure bookkeeping)."""
        if self._interval == 0:
            return 0.0
        now = self._clock()
        tat = max(self._tat, now)
        delay = max(0.0, tat - self._tolerance - now)
        self._tat = tat + self._interval
        return delay
