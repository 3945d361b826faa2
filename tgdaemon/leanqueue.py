"""``asyncio.Queue`` without its four up-front deques, for the queues every client holds.

An empty ``collections.deque`` is ~760 bytes (one 64-slot block), and ``asyncio.Queue``
allocates three (getters, putters, items) plus an ``asyncio.Event`` with a fourth: ~3 KB per
queue. Each Telethon client holds three queues (its update queue and its connection's send and
receive queues, ``Queue(1)`` each) that are empty nearly all the time: ~9 KB of the ~55 KB an
account cost (gc census at 1,000 and 2,000 accounts), more than the daemon adds over plain
Telethon. The connection's two have no user in the daemon's connections
(``tgdaemon.connection._DirectIO`` drops them); the update queue is this one.
:class:`LeanQueue` is the standard queue (same methods, same code) holding its
waiters and items in lists and its "all done" flag in a :class:`~tgdaemon.flag.Flag`.
"""

from __future__ import annotations

import asyncio
from typing import Any, TypeVar

from tgdaemon.flag import Flag

T = TypeVar("T")


class _Fifo(list[Any]):
    """The one deque method ``asyncio.Queue`` uses beyond a list's (``popleft``). The lists
    stay short (a ``Queue(1)``'s one item, a waiting getter), so ``pop(0)`` is cheap."""

    __slots__ = ()

    def popleft(self) -> Any:
        return self.pop(0)


class LeanQueue(asyncio.Queue[T]):
    """``asyncio.Queue`` on lists, whose :meth:`get` is a future rather than a coroutine.

    Telethon's update loop waits with ``asyncio.wait_for(queue.get(), deadline)``, which wraps
    a coroutine in a Task of its own (its creation, its first step, its end: three more
    callbacks on the loop) and takes a future as it is: three such waits a connect (the
    catch-up's first item, the difference, the wait that lasts until the next update) and one
    per batch of updates. An item goes straight to the oldest waiting getter; a getter that
    timed out or was cancelled is skipped, so an item is never lost to it."""

    def __init__(self, maxsize: int = 0) -> None:
        super().__init__(maxsize)
        # The deques and the Event the base just made are freed at once (no cycle).
        self._getters: Any = _Fifo()
        self._putters: Any = _Fifo()
        self._finished: Any = Flag(True)

    def _init(self, maxsize: int) -> None:
        self._queue: Any = _Fifo()

    def _get(self) -> T:
        item: T = self._queue.popleft()
        return item

    def _put(self, item: T) -> None:
        self._queue.append(item)

    def get(self) -> asyncio.Future[T]:  # type: ignore[override]  # awaited the same way
        """A future of the next item (see the class docstring)."""
        fut: asyncio.Future[T] = self._get_loop().create_future()  # type: ignore[attr-defined]
        if self._queue:
            fut.set_result(self._get())
            self._wakeup_next(self._putters)  # type: ignore[attr-defined]
        else:
            getters = self._getters
            if getters and getters[0].done():  # left by waits that timed out
                getters[:] = [g for g in getters if not g.done()]
            getters.append(fut)
        return fut

    def put_nowait(self, item: T) -> None:
        getters = self._getters
        while getters:
            getter = getters.popleft()
            if not getter.done():
                getter.set_result(item)  # the queue itself stays empty
                self._unfinished_tasks += 1  # type: ignore[attr-defined]
                self._finished.clear()
                return
        super().put_nowait(item)
