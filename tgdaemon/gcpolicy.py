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
  then a freeze;
* a *check* every :data:`CHECK_INTERVAL` seconds between waves: the frozen heap is counted,
  and when it has grown by :data:`RECLAIM_GROWTH` over its size after the last reclaim (the
  first: the start's end), a *reclaim*: an unfreeze, a full collection of everything, a
  freeze. The safety net for what the freezes hide (below).

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

The price of freezing: a frozen object that later dies in a reference cycle is not reclaimed
by the ticks, and neither is a cycle that straddles a tick (a part born before, frozen). A
wave's connections die in the next outage, so they must not be cyclic garbage:
tgdaemon.connection breaks the two cycles a dropped Telethon connection had (its packet codec,
its asyncio transport), tgdaemon.reaper those of an abandoned client, and the worker drops the
traceback of every failure it recovers from (tgdaemon.cycles: the error of a dropped
connection or a FLOOD_WAIT, raised through frames that refer back to it, was ~13 objects per
event, ~110,000 per outage at 10,000 accounts; bench/gcleak.py), and tgdaemon.updates' guard
refers to its client's MTProtoState weakly (the two were a cycle for every client replaced).
With that, a steady fleet with traffic, single reconnects and flood waits leaves no cyclic
garbage in the frozen heap, and an outage at 1,000 accounts 0-110 objects (a Telethon
connection whose send failed, status WebSocket connections aiohttp cut; ~11,000 before;
measured, bench/gcleak.py).

The reclaim bounds what a library (or a cycle we do not know of yet) may still leave there, at
a bounded cost: it walks the whole heap (~1 s at 10,000 accounts), but only once the frozen
heap has grown by a tenth, so the walk is paid at most once per tenth of the heap of growth,
garbage or live, and at most once per :data:`CHECK_INTERVAL`. With nothing leaking it
comes only from live growth (more accounts, caches filling): a few times in a daemon's life.
The heap is measured in allocated memory blocks (a sum over arenas, milliseconds), not by
counting the frozen objects (``gc.get_freeze_count()`` walks them: 0.34 s at 10,000 accounts,
measured as the connect wave's end's loop pass); the check keeps its own interval anyway.
"""

from __future__ import annotations

import asyncio
import enum
import gc
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import CollectorRegistry

from tgdaemon.tasks import cancel_and_wait

log = logging.getLogger("tgdaemon.gcpolicy")

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
#: Growth of the frozen heap (objects, live or dead) over its size after the last reclaim that
#: makes the next one: the whole heap is walked once per tenth of it that has accumulated.
RECLAIM_GROWTH = 0.1
#: Seconds between two checks of the frozen heap's size between waves (the first: after the
#: start's end), so at least between two reclaims: whatever the growth, the reclaim's pause
#: (~1 s at 10,000 accounts) costs at most 0.2 % of the time, the count's (~50 ms) 0.01 %.
CHECK_INTERVAL = 600.0


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
    #: Measure the heap; when grown by a tenth since the last reclaim, reclaim: unfreeze,
    #: full collection of everything, freeze (the safety net, between waves).
    CHECK = "check"


def reclaim_threshold(blocks: int) -> int:
    """Heap size (allocated blocks) beyond which a check reclaims, after a reclaim (or the
    start's end) that left ``blocks``."""
    return math.ceil(blocks * (1 + RECLAIM_GROWTH))


def heap_blocks() -> int:
    """The heap's size for the reclaim rule: the interpreter's allocated memory blocks, a sum
    over its arenas (~2 ms at 15 million blocks). Not ``gc.get_freeze_count()``, which walks
    the frozen list object by object: 0.34 s at 10,000 accounts (bench, diagnosis mode), a
    whole loop pass at the connect wave's end and at every check."""
    return sys.getallocatedblocks()


def next_step(*, in_wave: bool, connecting: int, accounts: int, since_freeze: float,
              idle_interval: float = IDLE_INTERVAL, since_check: float | None = None,
              check_interval: float = CHECK_INTERVAL) -> tuple[Step, bool]:
    """One tick's decision: (what to do, in a wave now). ``in_wave``: the last tick's answer;
    ``connecting``: accounts starting, connecting or reconnecting, of ``accounts``;
    ``since_freeze``: seconds since the last freeze of any kind; ``since_check``: since the
    last check (None: the start is not over). A wave freezes every tick and sweeps on the
    tick that finds it over; between waves, a check every ``check_interval``, else a young
    freeze every ``idle_interval``."""
    wave = connecting >= wave_threshold(accounts)
    if wave:
        return Step.YOUNG_FREEZE, wave
    if in_wave:
        return Step.SWEEP, wave
    if since_check is not None and since_check >= check_interval:
        return Step.CHECK, wave
    return (Step.YOUNG_FREEZE if since_freeze >= idle_interval else Step.NOTHING), wave


class GcPolicy:
    """Freezes the fleet's heap on its schedule (see module docstring).

    ``census`` tells (accounts starting, connecting or reconnecting now; all accounts).
    ``registry``: where the policy's fleet-wide series go (frozen objects, reclaims)."""

    def __init__(self, census: Callable[[], tuple[int, int]], *,
                 interval: float = FREEZE_INTERVAL, idle_interval: float = IDLE_INTERVAL,
                 check_interval: float = CHECK_INTERVAL,
                 registry: CollectorRegistry | None = None,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._census = census
        self._interval = interval
        self._idle_interval = idle_interval
        self._check_interval = check_interval
        self._monotonic = monotonic
        self._task: asyncio.Task[None] | None = None
        self._automatic_off = False
        self._swept = 0.0
        #: The heap size that makes a check reclaim, and when the last check (or reclaim, or
        #: the start's end) was (None until the start's end).
        self._reclaim_above = 0
        self._checked_at: float | None = None
        #: The heap's allocated blocks at the last look (the start's end, a check, a reclaim).
        self.blocks = 0
        #: Freezes done so far (the tests and the bench read it).
        self.freezes = 0
        #: Waves whose end was frozen (the first is the start).
        self.waves = 0
        #: Reclaims done so far, and the unreachable objects they found in the frozen heap.
        self.reclaims = 0
        self.reclaimed = 0
        if registry is not None:
            registry.register(self)

    def freeze(self, *, full: bool = True) -> None:
        """Collect everything unfrozen (only what was born or survived since the last
        freeze), then freeze what is left. ``full=False``: the young generations only (the
        first freeze of a process, whose old generation is the whole heap)."""
        gc.collect(2 if full else 1)
        gc.freeze()
        self.freezes += 1
        self._swept = self._monotonic()

    def check(self) -> bool:
        """Measure the heap; reclaim when it has grown by :data:`RECLAIM_GROWTH` since the
        last reclaim. Whether it reclaimed."""
        self.blocks = heap_blocks()
        self._checked_at = self._monotonic()
        if self.blocks <= self._reclaim_above:
            return False
        self.reclaim()
        return True

    def reclaim(self) -> int:
        """Hand the frozen heap back to the collector for one full collection, then freeze
        what lives: the cyclic garbage the freezes hid is freed. Returns the unreachable
        objects found."""
        began = self._monotonic()
        before = heap_blocks()
        gc.unfreeze()
        found = gc.collect()
        gc.freeze()
        self.freezes += 1
        self.reclaims += 1
        self.reclaimed += found
        now = self._swept = self._monotonic()
        self._rearm(now)
        log.info("frozen heap reclaimed: %d unreachable objects, %d -> %d allocated blocks, "
                 "in %.2f s", found, before, self.blocks, now - began)
        return found

    def _rearm(self, now: float) -> None:
        self.blocks = heap_blocks()
        self._reclaim_above = reclaim_threshold(self.blocks)
        self._checked_at = now

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
            now = self._monotonic()
            checked = self._checked_at
            step, wave = next_step(
                in_wave=in_wave, connecting=connecting, accounts=accounts,
                since_freeze=now - self._swept, idle_interval=self._idle_interval,
                since_check=None if checked is None else now - checked,
                check_interval=self._check_interval)
            if step is Step.CHECK:
                self.check()
            elif step is not Step.NOTHING:
                self.freeze(full=step is Step.SWEEP)
            if in_wave and not wave:
                self.waves += 1
                if self._checked_at is None:  # the start's end: the heap's first size
                    self._rearm(self._swept)
            in_wave = wave

    # -- prometheus_client Collector protocol ----------------------------------------------

    def describe(self) -> Iterator[Metric]:
        return self.collect()

    def collect(self) -> Iterator[Metric]:
        # The last look, not a new one (the policy's schedule: see CHECK_INTERVAL).
        yield GaugeMetricFamily(
            "tgdaemon_gc_heap_blocks",
            "Memory blocks the interpreter had allocated at the last look of the garbage "
            "collection policy (the start's end, then every check between waves): what its "
            "reclaim rule measures.",
            value=self.blocks)
        yield CounterMetricFamily(
            "tgdaemon_gc_reclaims", "Reclaims of the frozen heap (unfreeze, full collection).",
            value=self.reclaims)
        yield CounterMetricFamily(
            "tgdaemon_gc_reclaimed_objects",
            "Unreachable objects the reclaims found in the frozen heap.", value=self.reclaimed)
