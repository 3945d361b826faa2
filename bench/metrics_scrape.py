"""Scrape cost of tgdaemon.metrics at fleet sizes: median render time and body size.

Run: ``.venv/bin/python bench/metrics_scrape.py [--labelled] [--repeat 5]``.
``--labelled`` also measures the rejected design (prometheus_client labelled metric objects,
one child per account per metric) for comparison. Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import time
import tracemalloc
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from tgdaemon.lifecycle import Category
from tgdaemon.metrics import LATENCY_BUCKETS, Metrics, render
from tgdaemon.status import State, StatusBoard

SIZES = (100, 1000, 10000)


def _populate(n: int, histograms: str) -> tuple[CollectorRegistry, Metrics]:
    rnd = random.Random(n)
    board = StatusBoard()
    registry = CollectorRegistry()
    metrics = Metrics(registry, board, histograms=histograms)
    states = list(State)
    for i in range(n):
        name = f"account-{i:05d}"
        metrics.add_account(name)
        board.update(name, state=rnd.choice(states))
        for _ in range(5):
            metrics.observe_latency(name, rnd.uniform(0.02, 3.0))
        metrics.heartbeat(name, time.time())
        metrics.error(name, rnd.choice(list(Category)))
        metrics.reconnect(name)
    return registry, metrics


def _labelled(n: int) -> CollectorRegistry:
    """The alternative: 10 labelled metric objects with n children each."""
    registry = CollectorRegistry()
    lab = ["account"]
    up = Gauge("tgdaemon_account_up", "up", lab, registry=registry)
    state = Gauge("tgdaemon_account_state", "state", ["account", "state"], registry=registry)
    lat = Histogram(
        "tgdaemon_rpc_latency_seconds", "lat", lab, buckets=LATENCY_BUCKETS, registry=registry
    )
    errors = Counter("tgdaemon_errors", "e", ["account", "category"], registry=registry)
    counters = [
        Counter(f"tgdaemon_{c}", c, lab, registry=registry)
        for c in ("reconnects", "flood_wait_seconds", "dc_failovers", "worker_restarts",
                  "update_gaps")
    ]  # fmt: skip
    hb = Gauge("tgdaemon_heartbeat_timestamp_seconds", "hb", lab, registry=registry)
    for i in range(n):
        name = f"account-{i:05d}"
        up.labels(name).set(1)
        for s in State:
            state.labels(name, s.value).set(0)
        lat.labels(name).observe(0.1)
        for c in Category:
            errors.labels(name, c)
        for counter in counters:
            counter.labels(name)
        hb.labels(name).set(time.time())
    return registry


def _median_scrape(
    registry: CollectorRegistry, repeat: int, fn: Callable[[CollectorRegistry], bytes] = render
) -> tuple[float, int]:
    times, size = [], 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        size = len(fn(registry))
        times.append(time.perf_counter() - t0)
    return statistics.median(times), size


def _memory_per_account(build: Callable[[int], object], n: int) -> float:
    gc.collect()
    tracemalloc.start()
    keep = build(n)
    current, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del keep
    return current / n


def _update_cost(metrics: Metrics, calls: int = 200_000) -> float:
    t0 = time.perf_counter()
    for _ in range(calls // 2):
        metrics.observe_latency("account-00001", 0.1)
        metrics.reconnect("account-00001")
    return (time.perf_counter() - t0) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--labelled", action="store_true", help="also measure labelled objects")
    parser.add_argument("--sizes", type=int, nargs="*", default=SIZES)
    args = parser.parse_args()
    print("median s: tgdaemon.metrics.render (what /metrics serves); generate_latest: the same")
    print("registry through prometheus_client's formatter. B/account includes the StatusBoard")
    print("entry. us/update: one observe_latency or reconnect call.")
    print(f"{'design':<18}{'N':>7}{'median s':>10}{'gen_latest':>11}{'size KB':>9}"
          f"{'B/account':>11}{'us/update':>11}")
    for n in args.sizes:
        for mode in ("fleet", "account"):
            registry, metrics = _populate(n, mode)
            median, size = _median_scrape(registry, args.repeat)
            slow, _ = _median_scrape(registry, max(1, args.repeat // 2), generate_latest)
            mem = _memory_per_account(lambda k, m=mode: _populate(k, m), min(n, 2000))
            upd = _update_cost(metrics) * 1e6
            print(f"{'collector/' + mode:<18}{n:>7}{median:>10.3f}{slow:>11.3f}{size / 1024:>9.0f}"
                  f"{mem:>11.0f}{upd:>11.2f}")  # fmt: skip
        if args.labelled:
            registry = _labelled(n)
            slow, size = _median_scrape(registry, max(1, args.repeat // 2), generate_latest)
            mem = _memory_per_account(_labelled, min(n, 2000))
            print(f"{'labelled/account':<18}{n:>7}{'':>10}{slow:>11.3f}{size / 1024:>9.0f}"
                  f"{mem:>11.0f}{'':>11}")  # fmt: skip


if __name__ == "__main__":
    main()
