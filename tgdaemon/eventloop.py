"""The event loop the daemon runs on: at most :data:`IO_EVENTS_PER_PASS` ready sockets a pass.

asyncio's loop asks the selector for every ready file descriptor at once and runs their
callbacks, and whatever those schedule, back to back before it looks at a timer again. When a
data centre goes away, the kernel reports all of its connections ready (reset) in the same
``epoll_wait``: at 10,000 accounts one pass ran 10,000-16,000 callbacks (the transports'
``connection_lost``, the futures and tasks behind them) and held the loop 0.4-0.7 s; every
heartbeat, lease renewal and WebSocket push of every other account waited for it
(bench/RESULTS.md, diagnosis of the outage).

Here ``epoll_wait`` is asked for at most :data:`IO_EVENTS_PER_PASS` events. asyncio registers
sockets level-triggered, so what is not taken stays ready and is reported by the next call,
and the kernel moves the descriptors it reported to the end of its ready list: every socket
is served in turn, a storm is spread over passes a few milliseconds apart, and the timers in
between run on time. Nothing is lost or reordered within a socket; an idle daemon is never
near the bound (a pass at 10,000 accounts has a few dozen ready sockets).
"""

from __future__ import annotations

import asyncio
import math
import selectors
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["IO_EVENTS_PER_PASS", "BoundedEpollSelector", "new_event_loop", "run"]

#: Ready sockets handed to the loop per pass. One disconnect costs ~0.3 ms of callbacks over the
#: passes after it (measured: 10,000 resets, ~2.7 s of callbacks), so 64 keep a pass's share of
#: a storm near 20 ms. A timer that comes due waits for the rest of the pass under way and the
#: whole next one: at 128 the bench measured passes of 25-70 ms and lags of 0.10-0.13 s.
IO_EVENTS_PER_PASS = 64

_T = TypeVar("_T")


if hasattr(selectors, "EpollSelector"):

    class BoundedEpollSelector(selectors.EpollSelector):
        """An epoll selector whose :meth:`select` returns at most ``max_events`` events."""

        def __init__(self, max_events: int = IO_EVENTS_PER_PASS) -> None:
            if max_events < 1:
                raise ValueError("max_events must be at least 1")
            super().__init__()
            self.max_events = max_events

        def select(
            self, timeout: float | None = None
        ) -> list[tuple[selectors.SelectorKey, int]]:
            # selectors.EpollSelector.select with a bounded maxevents (CPython 3.11's code,
            # which has no parameter for it); the private names are the stdlib's own.
            if timeout is None:
                wait = -1.0
            elif timeout <= 0:
                wait = 0.0
            else:
                # epoll_wait's resolution is a millisecond: round up, wait at least timeout.
                wait = math.ceil(timeout * 1e3) * 1e-3
            fd_to_key = self._fd_to_key  # type: ignore[attr-defined]
            max_ev = max(1, min(len(fd_to_key), self.max_events))
            try:
                fd_events = self._selector.poll(wait, max_ev)  # type: ignore[attr-defined]
            except InterruptedError:
                return []
            ready: list[tuple[selectors.SelectorKey, int]] = []
            for fd, event in fd_events:
                events = 0
                if event & ~selectors.select.EPOLLIN:  # type: ignore[attr-defined]
                    events |= selectors.EVENT_WRITE
                if event & ~selectors.select.EPOLLOUT:  # type: ignore[attr-defined]
                    events |= selectors.EVENT_READ
                key = fd_to_key.get(fd)
                if key is not None:
                    ready.append((key, events & key.events))
            return ready


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A selector loop with the bounded epoll selector (the stock loop where there is no
    epoll)."""
    if hasattr(selectors, "EpollSelector"):
        return asyncio.SelectorEventLoop(BoundedEpollSelector())
    return asyncio.new_event_loop()


def run(main: Coroutine[Any, Any, _T]) -> _T:
    """``asyncio.run`` on :func:`new_event_loop`."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(main)
