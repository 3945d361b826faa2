"""Garbage collection for a fleet: what lives as long as the fleet leaves the collector's sight.

CPython's full (generation 2) collection walks every tracked object, and 10,000 accounts are
millions of long-lived ones (clients, senders, sessions, workers): each full collection held
the event loop ~1.2 s at 10,000 accounts, 2-3 times a minute (bench/RESULTS.md), and every
heartbeat and WebSocket push waited for it.

``gc.freeze()`` moves every tracked object into a permanent generation that collections skip
(reference counting still frees what loses its last reference), in constant time. So while
the policy runs the collector's automatic full collections are off, its automatic young ones
are rare (:data:`YOUNG_THRESHOLD`), and on its ticks the policy does one of two things
(:class:`Step`, decided by :func:`next_step`):

* a *young freeze* (a young collection, then a freeze of everything: what survived since the
  last tick is walked once and frozen) every :data:`FREEZE_INTERVAL` seconds during a *wave*
  (while at least :data:`WAVE_SHARE` of the accounts, at least one, are starting, connecting
  or reconnecting: the start, from before the workers are spawned, and every fleet-wide
  reconnect after an outage), and every :data:`IDLE_INTERVAL` seconds between waves;
* a *sweep* on the tick that finds a wave over: a full collection (``gc.collect(2)``: the
  young generations and what reached the old one since the last tick, never the frozen heap),
  then a freeze.

Why the young collections are the policy's too: what a fleet allocates mostly lives on (a
reconnect builds a connection that lasts until the next outage), and every object the
collector walks costs a cache miss per reference into a heap of gigabytes. With CPython's
thresholds (a young collection every 700 allocations, a middle one every tenth) each survivor
was walked twice; measured at 10,000 accounts (bench, diagnosis mode), an outage's reconnect
wave spent 6.3 s of its 32.6 s in 1,900 young collections (middle ones of 15-80 ms) that
collected nothing, and the idle window 3 % of a core the same way. On the policy's ticks a
survivor is walked once, and what dies within a tick (most temporaries) never.

Earlier measurements: full sweeps every second of a reconnect wave walked 30-140 thousand
objects each (up to 0.25 s) and collected 0-54; between waves, full collections of what
outlived a few young collections took 0.4 s and collected nothing.

The price of freezing: a frozen object that later dies in a reference cycle is never
reclaimed (until :meth:`GcPolicy.stop` unfreezes), and so is a cycle that straddles a tick (a
part born before, frozen). A wave's connections die in the next outage, so they must not be
cyclic garbage: tgdaemon.connection breaks the two cycles a dropped Telethon connection had
(its packet codec, its asyncio transport) and tgdaemon.reaper those of an abandoned client;
with that, an unfreeze and full collection after repeated outages finds no per-account
garbage (measured), and memory stays flat over outages.
"""

from __future__ import annotations

import asyncio
import enum
import gc
import math
import time
from collections.abc import Callable

from tgdaemon.tasks import cancel_and_wait

#: Seconds between two young freezes during a wave: at 0.1 s a 10,000-account reconnect wave's
#: survivors were walks of 16-46 ms (bench, diagnosis mode), half of the longest loop passes.
FREEZE_INTERVAL = 0.05
#: Seconds between two young freezes between waves (an idle second's survivors).
IDLE_INTERVAL = 1.0
#: The collector's own young threshold while the policy runs (CPython: 700): only a burst of
#: this many net allocations within a tick (a large API answer) collects before the tick.
YOUNG_THRESHOLD = 10_000
#: Share of the accounts (re)connecting at once that makes a wave (at least one account): at
#: 10,000 accounts, 100. Fewer is an account or two reconnecting on their own.
WAVE_SHARE = 0.01
#: Generation 2's threshold while the policy runs: never reached, so the only full
#: collections are the sweeps (a full collection after a burst of allocations otherwise
#: walks whatever is unfrozen, at a moment nobody chose).
NO_AUTOMATIC_FULL = 2**31 - 1


class _Automatic:
    """The collector's automatic collections of the process: full ones off and young ones
    rare while any policy runs (a process may run several daemons: tests, library use); the
    last one to stop puts the thresholds back."""

    running = 0
    saved = (0, 0)

    @classmethod
    def off(cls) -> None:
        t0, t1, t2 = gc.get_threshold()
        if cls.running == 0:
            cls.saved = (t0, t2)
        cls.running += 1
        gc.set_threshold(max(t0, YOUNG_THRESHOLD), t1, NO_AUTOMATIC_FULL)

    @classmethod
    def on(cls) -> None:
        cls.running -= 1
        if cls.running == 0:
            _t0, t1, _t2 = gc.get_threshold()
            gc.set_threshold(cls.saved[0], t1, cls.saved[1])


def wave_threshold(accounts: int) -> int:
    """How many accounts must be (re)connecting at once for a wave."""
    return max(1, math.ceil(accounts * WAVE_SHARE))


class Step(enum.Enum):
    """What a tick of the policy does."""

    NOTHING = "nothing"
    #: Young collection, then freeze (during waves and between them).
    YOUNG_FREEZE = "young_freeze"
    #: Full collection of the unfrozen, then freeze (a wave's end).
    SWEEP = "sweep"


def next_step(*, in_wave: bool, connecting: int, accounts: int, since_freeze: float,
              idle_interval: float = IDLE_INTERVAL) -> tuple[Step, bool]:
    """One tick's decision: (what to do, in a wave now). ``in_wave``: the last tick's answer;
    ``connecting``: accounts starting, connecting or reconnecting, of ``accounts``;
    ``since_freeze``: seconds since the last freeze of any kind. A wave freezes every tick
    and sweeps on the tick that finds it over; between waves, a young freeze every
    ``idle_interval``."""
    wave = connecting >= wave_threshold(accounts)
    if wave:
        return Step.YOUNG_FREEZE, wave
    if in_wave:
        return Step.SWEEP, wave
    return (Step.YOUNG_FREEZE if since_freeze >= idle_interval else Step.NOTHING), wave


class GcPolicy:
    """Freezes the fleet's heap on its schedule (see module docstring).

    ``census`` tells (accounts starting, connecting or reconnecting now; all accounts)."""

    def __init__(self, census: Callable[[], tuple[int, int]], *,
                 interval: float = FREEZE_INTERVAL, idle_interval: float = IDLE_INTERVAL,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._census = census
        self._interval = interval
        self._idle_interval = idle_interval
        self._monotonic = monotonic
        self._task: asyncio.Task[None] | None = None
        self._automatic_off = False
        self._swept = 0.0
        #: Freezes done so far (the tests and the bench read it).
        self.freezes = 0
        #: Waves whose end was frozen (the first is the start).
        self.waves = 0

    def freeze(self, *, full: bool = True) -> None:
        """Collect everything unfrozen (only what was born or survived since the last
        freeze), then freeze what is left. ``full=False``: the young generations only (the
        first freeze of a process, whose old generation is the whole heap)."""
        gc.collect(2 if full else 1)
        gc.freeze()
        self.freezes += 1
        self._swept = self._monotonic()

    def start(self) -> None:
        """Freeze now (the accounts are about to start: the first wave), take the collector's
        automatic collections over (full ones off, young ones rare) and follow the waves."""
        self.freeze()
        if self._task is None:
            _Automatic.off()
            self._automatic_off = True
            self._task = asyncio.get_running_loop().create_task(self._run(), name="gc-freeze")

    async def stop(self) -> None:
        """Stop following waves and hand the frozen objects back to the collector."""
        task, self._task = self._task, None
        await cancel_and_wait(task)
        if self._automatic_off:
            self._automatic_off = False
            _Automatic.on()
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
            step, wave = next_step(
                in_wave=in_wave, connecting=connecting, accounts=accounts,
                since_freeze=self._monotonic() - self._swept, idle_interval=self._idle_interval)
            if step is not Step.NOTHING:
                self.freeze(full=step is Step.SWEEP)
            if in_wave and not wave:
                self.waves += 1
            in_wave = wave
