"""Garbage collection for a fleet: what lives as long as the fleet leaves the collector's sight.

CPython's full (generation 2) collection walks every tracked object, and 10,000 accounts are
millions of long-lived ones (clients, senders, sessions, workers): each full collection held
the event loop ~1.2 s at 10,000 accounts, 2-3 times a minute (bench/RESULTS.md), and every
heartbeat and WebSocket push waited for it. While a fleet connects the heap grows fast, and
each 25 % of growth starts another full collection over all of it.

``gc.freeze()`` moves every tracked object into a permanent generation that collections skip
(reference counting still frees what loses its last reference). The daemon freezes before its
workers start (imports, configuration, the store), right after they are spawned, and then every
:data:`FREEZE_INTERVAL` seconds during a *wave*: while at least :data:`WAVE_SHARE` of the
accounts (at least one) are starting, connecting or reconnecting, which is the start and every
fleet-wide reconnect after an outage. Each freeze follows a young collection
(``gc.collect(1)`` walks only what was born since the last one), so a connect's short-lived
garbage is collected rather than frozen, and one last freeze follows the wave's end. Between
waves nothing is frozen: the few accounts that reconnect on their own leave little for a full
collection to walk.

The price of freezing: a frozen object that later dies in a reference cycle is never
reclaimed (until :meth:`GcPolicy.stop` unfreezes). A wave's connections die in the next
outage, so they must not be cyclic garbage: tgdaemon.connection breaks the two cycles a dropped
Telethon connection had (its packet codec, its asyncio transport); with that, an unfreeze and
full collection after repeated outages finds no per-account garbage (measured), and memory
stays flat over outages.
"""

from __future__ import annotations

import asyncio
import gc
import math
from collections.abc import Callable

from tgdaemon.tasks import cancel_and_wait

#: Seconds between two freezes during a wave: a second's worth of new objects is what a full
#: collection may still have to walk (a young collection first costs a few ms).
FREEZE_INTERVAL = 1.0
#: Share of the accounts (re)connecting at once that makes a wave (at least one account): at
#: 10,000 accounts, 100. Fewer is an account or two reconnecting on their own.
WAVE_SHARE = 0.01


def wave_threshold(accounts: int) -> int:
    """How many accounts must be (re)connecting at once for a wave."""
    return max(1, math.ceil(accounts * WAVE_SHARE))


def should_freeze(*, in_wave: bool, connecting: int, accounts: int) -> tuple[bool, bool]:
    """One tick's decision: (freeze now, in a wave now). ``in_wave``: the last tick's answer;
    ``connecting``: accounts starting, connecting or reconnecting, of ``accounts``. A wave
    freezes every tick and once more on the tick that finds it over."""
    wave = connecting >= wave_threshold(accounts)
    return wave or in_wave, wave


class GcPolicy:
    """Freezes the fleet's long-lived heap during connect waves (see module docstring).

    ``census`` tells (accounts starting, connecting or reconnecting now; all accounts)."""

    def __init__(self, census: Callable[[], tuple[int, int]], *,
                 interval: float = FREEZE_INTERVAL) -> None:
        self._census = census
        self._interval = interval
        self._task: asyncio.Task[None] | None = None
        #: Freezes done so far (the tests and the bench read it).
        self.freezes = 0
        #: Waves whose end was frozen (the first is the start).
        self.waves = 0

    def freeze(self) -> None:
        """Collect the young generations, then freeze everything that is left."""
        gc.collect(1)
        gc.freeze()
        self.freezes += 1

    def start(self) -> None:
        """Freeze now (every account is starting: the first wave) and follow the waves."""
        self.freeze()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="gc-freeze")

    async def stop(self) -> None:
        """Stop following waves and hand the frozen objects back to the collector."""
        task, self._task = self._task, None
        await cancel_and_wait(task)
        gc.unfreeze()

    @property
    def settled(self) -> bool:
        """The start phase is over (the first wave's last freeze is done)."""
        return self.waves > 0

    async def _run(self) -> None:
        in_wave = True
        while True:
            await asyncio.sleep(self._interval)
            connecting, accounts = self._census()
            freeze, wave = should_freeze(in_wave=in_wave, connecting=connecting,
                                         accounts=accounts)
            if freeze:
                self.freeze()
            if in_wave and not wave:
                self.waves += 1
            in_wave = wave
