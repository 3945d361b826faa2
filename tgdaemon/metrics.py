"""Prometheus metrics for the whole fleet, from one custom collector.

Why one collector and not labelled ``Counter``/``Gauge`` objects: at 10,000 accounts the
labelled objects cost ~6 KB per account per ten metrics (a child object, a lock and a
``_created`` series each) and render ~2x the lines; here an account is one ``__slots__``
object of plain numbers, ``account_up``/``account_state`` are read from the
:class:`~tgdaemon.status.StatusBoard` at scrape time, and an update is an attribute increment
(numbers: ``bench/metrics_scrape.py``).

Labels: ``account`` is the config name only (never a phone number, username or secret);
``category`` is one of :data:`ERROR_CATEGORIES`; ``state`` is a :class:`State` value.

Threading: every mutator runs on the event loop; :meth:`Metrics.collect` may run in another
thread (the HTTP layer renders off-loop so a 10,000-account scrape does not stall
heartbeats). It therefore copies dicts with single C-level calls and tolerates an account
vanishing mid-scrape; a scrape may see an observation half-applied (sum before bucket), which
Prometheus tolerates; ``_count`` is derived from the buckets so the histogram stays coherent.
"""

from __future__ import annotations

import logging
import math
import platform
import re
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator
from importlib import metadata

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import CollectorRegistry
from prometheus_client.samples import Sample

import tgdaemon
from tgdaemon.status import State, StatusBoard

log = logging.getLogger("tgdaemon.metrics")

PREFIX = "tgdaemon_"

#: Values of the ``category`` label of ``tgdaemon_errors_total`` (see tgdaemon.errors).
ERROR_CATEGORIES: tuple[str, ...] = (
    "network",
    "flood_wait",
    "auth",
    "server",
    "migrate",
    "client",
    "unknown",
)
_CATEGORY_INDEX = {c: i for i, c in enumerate(ERROR_CATEGORIES)}

#: Upper bounds of the heartbeat round-trip histogram, seconds (``+Inf`` is implicit).
#: Telegram RTTs sit around 0.05-0.3 s; the tail buckets catch a stalled DC.
LATENCY_BUCKETS: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0)

HISTOGRAM_MODES = ("account", "fleet")

_STATES = tuple(State)
# A label that is only digits (optionally with +, spaces, dashes) is a phone number, not a name.
_PHONE_LIKE = re.compile(r"^\+?[\d\s().-]{7,}$")


class _Histogram:
    """Non-cumulative bucket counts (cumulated at scrape time) and a sum: O(log b) observe."""

    __slots__ = ("buckets", "total")

    def __init__(self, size: int) -> None:
        self.buckets = [0] * size
        self.total = 0.0

    def observe(self, bounds: tuple[float, ...], value: float) -> None:
        self.buckets[bisect_left(bounds, value)] += 1
        self.total += value


class _Slots:
    """Everything one account costs: plain numbers, no locks, no metric objects."""

    __slots__ = (
        "errors",
        "failovers",
        "flood_wait_seconds",
        "heartbeat",
        "histogram",
        "labels",
        "last_latency",
        "reconnects",
        "update_gaps",
        "worker_restarts",
    )

    def __init__(self, name: str, histogram: _Histogram | None) -> None:
        self.labels = {"account": name}  # shared by every sample of this account
        self.errors = [0] * len(ERROR_CATEGORIES)
        self.reconnects = 0
        self.flood_wait_seconds = 0.0
        self.failovers = 0
        self.worker_restarts = 0
        self.update_gaps = 0
        self.heartbeat: float | None = None
        self.last_latency: float | None = None
        self.histogram = histogram


def _versions() -> dict[str, str]:
    try:
        telethon = metadata.version("telethon")
    except metadata.PackageNotFoundError:  # pragma: no cover - telethon is a dependency
        telethon = "unknown"
    return {"python": platform.python_version(), "telethon": telethon}


class Metrics:
    """The daemon's metrics; registers itself as a collector in ``registry``.

    ``histograms="fleet"`` (the default) keeps ONE fleet-wide ``tgdaemon_rpc_latency_seconds``
    histogram plus a per-account ``tgdaemon_rpc_last_latency_seconds`` gauge;
    ``histograms="account"`` keeps one histogram per account (``account`` label).
    Default chosen by numbers (bench/metrics_scrape.py, 10,000 accounts, 2-core CI box):
    fleet ~26 samples/account, ~0.5 s and ~2.4 MB per scrape; account ~37 samples/account,
    ~0.8 s and ~3.6 MB, too close to the 1 s budget. Use "account" for small fleets when
    per-account quantiles matter.

    Calls naming an account that was never added (or was removed) are ignored: a late
    report from a stopping worker must not resurrect its series.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        board: StatusBoard,
        *,
        histograms: str = "fleet",
        version: str = tgdaemon.__version__,
        buckets: tuple[float, ...] = LATENCY_BUCKETS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if histograms not in HISTOGRAM_MODES:
            raise ValueError(f"histograms must be one of {HISTOGRAM_MODES}, not {histograms!r}")
        if list(buckets) != sorted(set(buckets)) or not buckets or math.inf in buckets:
            raise ValueError("buckets must be finite, strictly increasing and not empty")
        self._board = board
        self._per_account = histograms == "account"
        self._bounds = tuple(float(b) for b in buckets)
        self._le = [*(_fmt_le(b) for b in self._bounds), "+Inf"]
        self._fleet = None if self._per_account else _Histogram(len(self._bounds) + 1)
        self._slots: dict[str, _Slots] = {}
        self._build_labels = {"version": version, **_versions()}
        self._clock = clock
        # The daemon only runs with a valid configuration: the initial load counts as a success.
        self._reload_ok = True
        self._reload_ok_at = clock()
        registry.register(self)

    @property
    def histograms(self) -> str:
        return "account" if self._per_account else "fleet"

    # -- account lifecycle ----------------------------------------------------------------

    def add_account(self, name: str) -> None:
        """Start the account's series, every counter at 0 (no-op if already present)."""
        if name in self._slots:
            return
        if not name or _PHONE_LIKE.match(name):
            # The name itself is not repeated: it may be exactly what must not leak.
            raise ValueError("account label must be a config name, not empty or a phone number")
        hist = _Histogram(len(self._bounds) + 1) if self._per_account else None
        self._slots[name] = _Slots(name, hist)

    def remove_account(self, name: str) -> None:
        self._slots.pop(name, None)

    def accounts(self) -> list[str]:
        return sorted(self._slots)

    # -- observations (event loop only) ---------------------------------------------------

    def observe_latency(self, name: str, seconds: float) -> None:
        """One heartbeat round trip; negative or NaN values are dropped."""
        slot = self._slots.get(name)
        if slot is None or not seconds >= 0:
            return
        slot.last_latency = seconds
        hist = slot.histogram if slot.histogram is not None else self._fleet
        assert hist is not None
        hist.observe(self._bounds, seconds)

    def heartbeat(self, name: str, timestamp: float) -> None:
        if (slot := self._slots.get(name)) is not None:
            slot.heartbeat = timestamp

    def error(self, name: str, category: str) -> None:
        """Count one error; an unknown category is counted as ``unknown``."""
        if (slot := self._slots.get(name)) is None:
            return
        index = _CATEGORY_INDEX.get(category)
        if index is None:
            log.debug("unknown error category %r counted as 'unknown'", category)
            index = _CATEGORY_INDEX["unknown"]
        slot.errors[index] += 1

    def reconnect(self, name: str) -> None:
        if (slot := self._slots.get(name)) is not None:
            slot.reconnects += 1

    def flood_wait(self, name: str, seconds: float) -> None:
        """Add a FloodWait's duration; counters never decrease, so <= 0 and NaN are dropped."""
        if (slot := self._slots.get(name)) is not None and seconds > 0:
            slot.flood_wait_seconds += seconds

    def failover(self, name: str) -> None:
        if (slot := self._slots.get(name)) is not None:
            slot.failovers += 1

    def worker_restart(self, name: str) -> None:
        if (slot := self._slots.get(name)) is not None:
            slot.worker_restarts += 1

    def update_gap(self, name: str) -> None:
        if (slot := self._slots.get(name)) is not None:
            slot.update_gaps += 1

    def config_reload(self, ok: bool) -> None:
        self._reload_ok = ok
        if ok:
            self._reload_ok_at = self._clock()

    # -- prometheus_client Collector protocol ---------------------------------------------

    def describe(self) -> Iterator[Metric]:
        """Family names without samples, so a duplicate registration is refused."""
        return iter(self._families())

    def collect(self) -> Iterator[Metric]:
        fams = self._families()
        (up, state, latency, last_latency, errors, reconnects, flood, failovers, restarts, gaps,
         heartbeat, reload_ok, reload_at, build) = fams  # fmt: skip
        # One C-level copy: safe against the loop adding/removing accounts meanwhile.
        items = sorted(self._slots.items())
        board_get = self._board.get
        bounds_le = self._le

        up_s, state_s, hb_s = up.samples, state.samples, heartbeat.samples
        err_s, rec_s, flood_s = errors.samples, reconnects.samples, flood.samples
        fo_s, rs_s, gap_s = failovers.samples, restarts.samples, gaps.samples
        lat_s, last_s = latency.samples, last_latency.samples
        n_up, n_state, n_hb = up.name, state.name, heartbeat.name
        n_err, n_rec, n_flood = errors.name + "_total", reconnects.name + "_total", (
            flood.name + "_total"
        )
        n_fo, n_rs, n_gap = failovers.name + "_total", restarts.name + "_total", (
            gaps.name + "_total"
        )
        n_bucket, n_sum, n_count = latency.name + "_bucket", latency.name + "_sum", (
            latency.name + "_count"
        )
        n_last = last_latency.name

        for name, slot in items:
            labels = slot.labels
            status = board_get(name)
            current = None if status is None else status.state
            up_s.append(Sample(n_up, labels, 1.0 if current is State.CONNECTED else 0.0))
            for st in _STATES:
                state_s.append(
                    Sample(n_state, {"account": name, "state": st.value},
                           1.0 if st is current else 0.0)
                )  # fmt: skip
            for category, count in zip(ERROR_CATEGORIES, slot.errors, strict=True):
                err_s.append(Sample(n_err, {"account": name, "category": category}, count))
            rec_s.append(Sample(n_rec, labels, slot.reconnects))
            flood_s.append(Sample(n_flood, labels, slot.flood_wait_seconds))
            fo_s.append(Sample(n_fo, labels, slot.failovers))
            rs_s.append(Sample(n_rs, labels, slot.worker_restarts))
            gap_s.append(Sample(n_gap, labels, slot.update_gaps))
            if slot.heartbeat is not None:
                hb_s.append(Sample(n_hb, labels, slot.heartbeat))
            if slot.histogram is not None:
                _histogram_samples(lat_s, slot.histogram, bounds_le, name, labels,
                                   n_bucket, n_sum, n_count)  # fmt: skip
            elif slot.last_latency is not None:
                last_s.append(Sample(n_last, labels, slot.last_latency))
        if self._fleet is not None:
            _histogram_samples(lat_s, self._fleet, bounds_le, None, {}, n_bucket, n_sum, n_count)
        reload_ok.add_metric([], 1.0 if self._reload_ok else 0.0)
        reload_at.add_metric([], self._reload_ok_at)
        build.add_metric(list(self._build_labels.values()), 1.0)
        return iter(f for f in fams if f.samples)

    def _families(self) -> list[Metric]:
        account = ["account"]
        per_account = self._per_account
        p = PREFIX
        return [
            GaugeMetricFamily(
                p + "account_up",
                "1 when the account's worker is connected to Telegram, else 0.",
                labels=account,
            ),
            GaugeMetricFamily(
                p + "account_state",
                "The account worker's current state: 1 for the current state, 0 for the others.",
                labels=["account", "state"],
            ),
            HistogramMetricFamily(
                p + "rpc_latency_seconds",
                "Heartbeat RPC round-trip time to Telegram"
                + (" per account." if per_account else ", all accounts together."),
                labels=account if per_account else None,
            ),
            GaugeMetricFamily(
                p + "rpc_last_latency_seconds",
                "Round-trip time of the account's last successful heartbeat RPC.",
                labels=account,
            ),
            CounterMetricFamily(
                p + "errors_total",
                "Errors seen by the account's worker, by recovery category.",
                labels=["account", "category"],
            ),
            CounterMetricFamily(
                p + "reconnects_total", "Reconnections of the account's client.", labels=account
            ),
            CounterMetricFamily(
                p + "flood_wait_seconds_total",
                "Seconds the account was told to wait by Telegram FloodWait errors.",
                labels=account,
            ),
            CounterMetricFamily(
                p + "dc_failovers_total",
                "Switches of the account to another data-centre address.",
                labels=account,
            ),
            CounterMetricFamily(
                p + "worker_restarts_total",
                "Restarts of the account's worker task after it crashed.",
                labels=account,
            ),
            CounterMetricFamily(
                p + "update_gaps_total",
                "Gaps detected in the account's update sequence (updates were re-fetched).",
                labels=account,
            ),
            GaugeMetricFamily(
                p + "heartbeat_timestamp_seconds",
                "Unix time of the account's last successful heartbeat (absent before the first).",
                labels=account,
            ),
            GaugeMetricFamily(
                p + "config_reload_success",
                "1 if the last configuration (re)load succeeded, 0 if it failed.",
            ),
            GaugeMetricFamily(
                p + "config_last_reload_success_timestamp_seconds",
                "Unix time of the last successful configuration (re)load.",
            ),
            GaugeMetricFamily(
                p + "build_info",
                "Always 1; labels name the daemon, Python and Telethon versions.",
                labels=list(self._build_labels),
            ),
        ]


def _histogram_samples(
    out: list[Sample],
    hist: _Histogram,
    bounds_le: list[str],
    account: str | None,
    labels: dict[str, str],
    n_bucket: str,
    n_sum: str,
    n_count: str,
) -> None:
    cumulative = 0
    for le, count in zip(bounds_le, hist.buckets, strict=True):
        cumulative += count
        bucket_labels = {"le": le} if account is None else {"account": account, "le": le}
        out.append(Sample(n_bucket, bucket_labels, cumulative))
    out.append(Sample(n_count, labels, cumulative))
    out.append(Sample(n_sum, labels, hist.total))


def _fmt_le(bound: float) -> str:
    """Prometheus' canonical ``le`` text: 1.0 not 1, so series match other clients'."""
    return repr(float(bound))
