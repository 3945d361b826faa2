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
    """``asyncio.Queue`` (all of its logic is the standard library's) on lists."""

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
