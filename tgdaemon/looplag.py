"""Event-loop lag: one probe for the whole loop, no per-account cost.

Every callback of every account runs on one event loop, so a long pause anywhere (a full
garbage collection over millions of objects, a burst of connects, a slow callback) delays all
heartbeats and every WebSocket push. A single task sleeps :data:`PROBE_INTERVAL` and measures
how late it woke up: that lateness is how long something else held the loop.

Exported as ``tgdaemon_event_loop_lag_seconds`` (a histogram: rates and quantiles over any
window) and ``tgdaemon_event_loop_lag_max_seconds`` (the largest lag of the last
:data:`MAX_WINDOW` seconds: a histogram cannot tell a maximum, and the bench reads this one).
"""

from __future__ import annotations

import asyncio
import threading
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterator

from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import CollectorRegistry

from tgdaemon.metrics import go_float
from tgdaemon.tasks import cancel_and_wait

#: Seconds between two probes: 4 wake-ups a second cost nothing and catch pauses of >= 0.25 s
#: to within their length (a shorter pause is caught when the probe's wake-up falls into it).
PROBE_INTERVAL = 0.25
#: Seconds over which ``tgdaemon_event_loop_lag_max_seconds`` is the maximum.
MAX_WINDOW = 60.0
#: Upper bounds of the lag histogram, seconds; the issue's target is 0.1 s.
LAG_BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class LoopLag:
    """The lag numbers (pure: observations in, families out) and the probe task's owner."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        interval: float = PROBE_INTERVAL,
        window: float = MAX_WINDOW,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._interval = interval
        self._window = window
        self._monotonic = monotonic
        self._buckets = [0] * (len(LAG_BUCKETS) + 1)
        self._sum = 0.0
        # (time, lag) of the last window; bounded by window / interval entries.
        self._recent: deque[tuple[float, float]] = deque()
        # The scrape renders in another thread: it copies the deque under this lock.
        self._lock = threading.Lock()
        self._task: asyncio.Task[None] | None = None
        if registry is not None:
            registry.register(self)

    # -- numbers ---------------------------------------------------------------------------

    def observe(self, lag: float, now: float) -> None:
        """One probe woke ``lag`` seconds late at ``now`` (monotonic)."""
        lag = max(0.0, lag)
        self._buckets[bisect_left(LAG_BUCKETS, lag)] += 1
        self._sum += lag
        with self._lock:
            self._recent.append((now, lag))
            while self._recent and self._recent[0][0] < now - self._window:
                self._recent.popleft()

    def max_recent(self, now: float | None = None) -> float:
        """The largest lag observed in the last window (0 when none)."""
        now = self._monotonic() if now is None else now
        with self._lock:
            recent = list(self._recent)
        return max((lag for t, lag in recent if t >= now - self._window), default=0.0)

    # -- the probe task --------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="loop-lag")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def _run(self) -> None:
        while True:
            before = self._monotonic()
            await asyncio.sleep(self._interval)
            now = self._monotonic()
            self.observe(now - before - self._interval, now)

    # -- prometheus_client Collector protocol ----------------------------------------------

    def describe(self) -> Iterator[Metric]:
        return self.collect()

    def collect(self) -> Iterator[Metric]:
        hist = HistogramMetricFamily(
            "tgdaemon_event_loop_lag_seconds",
            "How late the event loop's probe woke up (every account waits that long).")
        cumulative, buckets = 0, []
        for bound, count in zip((*LAG_BUCKETS, float("inf")), list(self._buckets),
                                strict=True):
            cumulative += count
            buckets.append((go_float(bound), float(cumulative)))
        hist.add_metric([], buckets, self._sum)
        yield hist
        yield GaugeMetricFamily(
            "tgdaemon_event_loop_lag_max_seconds",
            f"The largest event-loop lag of the last {self._window:g} seconds.",
            value=self.max_recent())
