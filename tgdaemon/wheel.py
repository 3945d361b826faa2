"""Shared coarse timers for the heartbeats of a whole fleet.

A timer per account (``call_later`` for each heartbeat wait) puts 10,000 entries in the event
loop's heap and wakes the loop once per heartbeat: at 10,000 accounts, 333 wake-ups a second,
each one a full loop turn (an ``epoll_wait``, the ready queue, the heap) for a single account,
and the send, the server's read and its answer spread out just as thinly. Measured at 2,000
accounts on the local DC: 365 loop turns a second for 67 heartbeats.

Here a wait ends on the next multiple of a ``tick`` (loop time): every wait ending in the
same tick shares one loop timer, and those accounts send in the same loop turn, so their
packets, the server's reads and the answers come in batches (30 loop turns a second instead
of 365; the daemon's idle CPU halved, the local DC's by 60 %). A wait is at most one tick
longer than asked; a tick is a small fraction of the heartbeat interval (see
:func:`tgdaemon.lifecycle.heartbeat_tick`).

The boundaries and early wakes due in a loop pass wake at most :data:`WAKE_BATCH` sleepers
in all per pass, the rest in the passes after (a few milliseconds later, in order): every
woken account sends in the pass after, and when the loop falls behind (a burst of connects,
a starved process) several boundaries come due at once, thousands of heartbeats sent in one
pass (a pass of 2,136 worker steps, 4.3 s, was measured at 10,000 accounts on a loaded
machine); every timer and read waited behind them.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque

__all__ = ["WAKE_BATCH", "TimerWheel", "WakeBatches"]

#: Sleepers woken per loop pass: 64 heartbeats are sent in ~20 ms (a due timer waits for a pass
#: and the next: 128 made passes of up to 70 ms in the bench's connect waves); at 10,000
#: accounts and the default 30 s interval a tick has ~170 due.
WAKE_BATCH = 64


class TimerWheel:
    """Sleeps that end on tick boundaries, one loop timer per boundary with sleepers."""

    __slots__ = ("_batch", "_buckets", "_loop", "_wakes")

    def __init__(self, batch: int = WAKE_BATCH) -> None:
        #: Loop time of a boundary -> the futures that end there (set True when it passes).
        self._buckets: dict[float, list[asyncio.Future[bool]]] = {}
        self._batch = batch
        #: Boundaries passed (and early wakes) whose sleepers are not all woken yet.
        self._wakes = WakeBatches(batch)
        self._loop: asyncio.AbstractEventLoop | None = None

    def sleeper(self, seconds: float, tick: float) -> asyncio.Future[bool]:
        """A future set to True on the first multiple of ``tick`` at least ``seconds`` from
        now; whoever holds it may settle it sooner (a woken sleep), or cancel it."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # boundaries (and their timers) belong to one loop
            self._loop, self._buckets, self._wakes = loop, {}, WakeBatches(self._batch)
        fut: asyncio.Future[bool] = loop.create_future()
        when = loop.time() + max(0.0, seconds)
        if tick > 0:
            when = math.ceil(when / tick) * tick
        bucket = self._buckets.get(when)
        if bucket is None:
            bucket = self._buckets[when] = []
            loop.call_at(when, self._fire, when)
        bucket.append(fut)
        return fut

    async def sleep(self, seconds: float, tick: float) -> None:
        """``asyncio.sleep`` rounded up to the next tick boundary."""
        await self.sleeper(seconds, tick)

    def wake(self, fut: asyncio.Future[bool]) -> None:
        """End the sleep ``fut`` now (as if it ran out), in the wake-up batches: a fleet-wide
        connection drop ends every account's sleep in one loop pass (10,000 worker steps in
        the next)."""
        self._wakes.add([fut], True)

    def _fire(self, when: float) -> None:
        bucket = self._buckets.pop(when, None)
        if bucket:
            bucket.reverse()  # popped from the end: woken in the order they went to sleep
            self._wakes.add(bucket, True)

    @property
    def pending(self) -> int:
        """Boundaries with a loop timer armed (tests; at most one per tick ahead)."""
        return len(self._buckets)


class WakeBatches:
    """Futures to end, at most ``batch`` per loop pass: what comes due in one pass (several
    boundaries when the loop fell behind, a fleet's dropped connections, the sleepers of a
    route that came back) shares that pass's batch, the rest go in the passes after. (Waking
    each bucket at once would give every bucket due in a pass a batch of its own.)"""

    __slots__ = ("_batch", "_due", "_scheduled")

    def __init__(self, batch: int = WAKE_BATCH) -> None:
        self._batch = batch
        #: (futures, the result they end with); each list is taken from its end.
        self._due: deque[tuple[list[asyncio.Future[bool]], bool]] = deque()
        #: A wake-up pass is scheduled (``call_soon``) for what is due.
        self._scheduled = False

    def add(self, bucket: list[asyncio.Future[bool]], result: bool) -> None:
        """End the futures of ``bucket`` (taken from its end) with ``result``, in the batches;
        one already done (woken early, cancelled) is skipped and costs no batch."""
        self._due.append((bucket, result))
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._wake)

    def _wake(self) -> None:
        """End up to a batch of the due futures; schedule the next pass's if more are."""
        self._scheduled = False
        due, budget = self._due, self._batch
        while due and budget:
            bucket, result = due[0]
            while bucket and budget:
                fut = bucket.pop()
                if not fut.done():
                    fut.set_result(result)
                    budget -= 1
            if not bucket:
                due.popleft()
        if due:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._wake)
