"""A per-account asyncio flag that costs nothing while nobody waits on it.

``asyncio.Event`` allocates its waiter deque up front: an empty ``collections.deque`` is
~760 bytes (one 64-slot block), and every account held two Events (its reporter's
``connected``, its client's update gate): about 1.5 KB of the ~57 KB an account costs
(measured with a gc census at 1,000 accounts). :class:`Flag` keeps the same semantics
(``set`` wakes every waiter, ``wait`` returns at once when set) with a list of waiters that
exists only while someone waits.
"""

from __future__ import annotations

import asyncio


class Flag:
    """``asyncio.Event``'s ``set``/``clear``/``is_set``/``wait``, lazily allocated."""

    __slots__ = ("_set", "_waiters")

    def __init__(self, value: bool = False) -> None:
        self._set = value
        self._waiters: list[asyncio.Future[None]] | None = None

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        if self._set:
            return
        self._set = True
        waiters, self._waiters = self._waiters, None
        for fut in waiters or ():
            if not fut.done():
                fut.set_result(None)

    def clear(self) -> None:
        self._set = False

    async def wait(self) -> None:
        if self._set:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(fut)
        try:
            await fut
        finally:
            waiters = self._waiters
            if waiters is not None and fut in waiters:  # cancelled or timed out: forget it
                waiters.remove(fut)
                if not waiters:
                    self._waiters = None
