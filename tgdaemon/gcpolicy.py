"""Garbage collection for a fleet: what lives as long as the fleet leaves the collector's sight.

CPython's full (generation 2) collection walks every tracked object, and 10,000 accounts are
millions of long-lived ones (clients, senders, sessions, workers): each full collection held
the event loop ~1.2 s at 10,000 accounts, 2-3 times a minute (bench/RESULTS.md), and every
heartbeat and WebSocket push waited for it. While a fleet connects the heap grows fast, and
each 25 % of growth starts another full collection over all of it (5 of 0.1-0.9 s while 1,000
accounts connected on a loaded 2-core machine).

``gc.freeze()`` moves every tracked object into a permanent generation that collections skip
(reference counting still frees what loses its last reference). The daemon freezes before its
workers start (imports, configuration, the store), right after they are spawned, and then every
:data:`FREEZE_INTERVAL` seconds while accounts are still on their first connect, each time
after a young collection (``gc.collect(1)`` walks only what was born since the last one) so
that a connect's short-lived garbage is collected rather than frozen. The last freeze follows
the first moment no account is starting or connecting. Frozen objects that later become
cyclic garbage are not reclaimed until :meth:`GcPolicy.stop` unfreezes: the cost is bounded by
one start-up's objects, and nothing created after the start phase is ever frozen.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable

from tgdaemon.tasks import cancel_and_wait

#: Seconds between two freezes while accounts connect: a second's worth of new objects is what
#: a full collection may still have to walk (a young collection first costs a few ms).
FREEZE_INTERVAL = 1.0


class GcPolicy:
    """Freezes the fleet's long-lived heap during the start phase (see module docstring).

    ``connecting`` tells whether any account is still on its first connect; the phase ends
    the first time it says no."""

    def __init__(self, connecting: Callable[[], bool], *,
                 interval: float = FREEZE_INTERVAL) -> None:
        self._connecting = connecting
        self._interval = interval
        self._task: asyncio.Task[None] | None = None
        #: Freezes done so far (the tests and the bench read it).
        self.freezes = 0

    def freeze(self) -> None:
        """Collect the young generations, then freeze everything that is left."""
        gc.collect(1)
        gc.freeze()
        self.freezes += 1

    def start(self) -> None:
        """Freeze now and follow the start phase until no account is connecting."""
        self.freeze()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="gc-freeze")

    async def stop(self) -> None:
        """End the start phase and hand the frozen objects back to the collector."""
        task, self._task = self._task, None
        await cancel_and_wait(task)
        gc.unfreeze()

    @property
    def settled(self) -> bool:
        """The start phase is over (the last freeze is done)."""
        return self._task is not None and self._task.done()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            done = not self._connecting()
            self.freeze()
            if done:
                return
