"""One measured fleet run: start, connect, idle window, scrape, optional outage, stop.

Returns plain dicts (JSON-ready) so repeats can be aggregated and written as they are.
"""

from __future__ import annotations

import gzip
import statistics
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.procfs import cpu_mark, cpu_percent, rss_kb
from bench.procs import ChildError, FleetProcess, LocalDcProcess


@dataclass(frozen=True)
class RunPlan:
    """What one fleet run does after all accounts are connected."""

    settle: float  # seconds after all connected before the idle window
    window: float  # idle CPU window
    scrapes: int  # /metrics scrapes (daemon only)
    outage: float | None  # seconds of total localdc outage, or None
    recovery_timeout: float
    connect_timeout: float
    idle: bool = True  # False: no idle window and no scrape (connect time, outage)
    tail: float = 5.0  # seconds still sampled after recovery, for the plot
    flood: int | None = None  # FLOOD_WAIT_<flood> for a tenth of the accounts, or None
    heartbeat: float = 30.0  # the fleets' request interval (bounds the storm's waits)


def progress(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def scrape(port: int, times: int) -> dict[str, Any]:
    """Median wall time of GET /metrics (plain and gzip), body sizes and series counts."""
    url = f"http://127.0.0.1:{port}/metrics"
    plain_t, gzip_t = [], []
    body = b""
    gz_size = 0
    for _ in range(times):
        t0 = time.perf_counter()
        with urllib.request.urlopen(url, timeout=60) as r:
            body = r.read()
        plain_t.append(time.perf_counter() - t0)
        req = urllib.request.Request(url, headers={"Accept-Encoding": "gzip"})
        t0 = time.perf_counter()
        with urllib.request.urlopen(req, timeout=60) as r:
            gz = r.read()
        gzip_t.append(time.perf_counter() - t0)
        gz_size = len(gz)
    lines = [ln for ln in gzip.decompress(gz).decode().splitlines() if ln and ln[0] != "#"]
    return {
        "seconds": statistics.median(plain_t),
        "seconds_gzip": statistics.median(gzip_t),
        "bytes": len(body),
        "bytes_gzip": gz_size,
        "series": len(lines),
        "account_series": sum(1 for ln in lines if 'account="' in ln),
    }


def run_fleet(
    fleet: FleetProcess,
    n: int,
    dcs: Sequence[LocalDcProcess],
    plan: RunPlan,
) -> dict[str, Any]:
    """Drive one started fleet process through the plan; always stops it."""
    out: dict[str, Any] = {}
    try:
        base = fleet.wait_event("base", 300)
        out["rss_base_kb"] = base["rss_kb"]
        if base["n"] != n:
            raise RuntimeError(f"fleet has {base['n']} accounts, expected {n}")
        try:
            out["connect_s"] = fleet.wait_event("all_connected", plan.connect_timeout)["seconds"]
        except ChildError:
            # Not a harness failure: the fleet did not converge. Recorded, then stopped.
            fleet.drain()
            out["connect_s"] = None
            out["connected_at_timeout"] = fleet.last_count["n"]
            out["connect_timeout_s"] = plan.connect_timeout
            progress(f"  NOT all connected within {plan.connect_timeout:.0f}s: "
                     f"{out['connected_at_timeout']}/{n}")
            return out
        progress(f"  all {n} connected in {out['connect_s']:.2f}s")
        if plan.idle:
            _idle(fleet, n, dcs, plan, out)
        if plan.flood:
            out["flood"] = _flood_storm(dcs, plan)
        if plan.outage:
            out["outage"] = _outage(fleet, n, dcs, plan)
    finally:
        timeline = fleet.stop()
    if plan.outage and "outage" in out:
        out["outage"].update(_recovery_stats(timeline, n, out["outage"]))
    lags = timeline.get("loop_lag", [])
    # Every collection's pause (gc.callbacks in the fleet process), any generation.
    pauses = timeline.get("gc_pauses", [])
    out["gc_pause_max_s"] = max((p[1] for p in pauses), default=0.0)
    out["gc_full_total"] = sum(1 for p in pauses if p[2] == 2)
    if plan.outage and "outage" in out:
        o = out["outage"]
        end = o["t_back"] + (o["recovered_s"] if o.get("recovered_s") is not None
                             else plan.recovery_timeout)
        o["loop_lag_max_s"] = max((d for t, d in lags if o["t_back"] <= t <= end),
                                  default=0.0)
    if "window_wall" in out:
        a, b = out.pop("window_wall")
        out["loop_lag_idle_max_s"] = max((d for t, d in lags if a <= t <= b), default=0.0)
        out["loop_lag_connect_max_s"] = max((d for t, d in lags if t < a), default=0.0)
        full = [d for t, d in timeline.get("gc_full", []) if a <= t <= b]
        out["gc_full_count"] = len(full)
        out["gc_full_pct"] = 100.0 * sum(full) / (b - a) if b > a else 0.0
    return out


def _idle(fleet: FleetProcess, n: int, dcs: Sequence[LocalDcProcess], plan: RunPlan,
          out: dict[str, Any]) -> None:
    time.sleep(plan.settle)  # a measurement window, not a wait for a condition
    t0 = time.monotonic()
    out["window_wall"] = (time.time(), time.time() + plan.window)
    served = [d.requests() for d in dcs]
    marks = [cpu_mark(fleet.pid, t0)] + [cpu_mark(d.pid, t0) for d in dcs]
    time.sleep(plan.window)
    t1 = time.monotonic()
    ends = [cpu_mark(fleet.pid, t1)] + [cpu_mark(d.pid, t1) for d in dcs]
    # What the fleet asked of the servers in the window, per account and minute: the same
    # work for both fleets, or the CPU comparison is not like for like.
    per_min = 60.0 / (t1 - t0) / n
    requests: dict[str, float] = {}
    for d, before in zip(dcs, served, strict=True):
        for method, count in d.requests().items():
            delta = count - before.get(method, 0)
            if delta:
                requests[method] = requests.get(method, 0.0) + delta * per_min
    out["requests_per_account_min"] = requests
    out["cpu_pct"] = cpu_percent(marks[0], ends[0])
    out["dc_cpu_pct"] = [cpu_percent(a, b) for a, b in zip(marks[1:], ends[1:], strict=True)]
    out["rss_kb"] = rss_kb(fleet.pid)
    out["rss_per_account_kb"] = (out["rss_kb"] - out["rss_base_kb"]) / n
    fleet.drain()
    out["connected_after_window"] = fleet.last_count["n"]
    progress(f"  idle: {out['cpu_pct']:.2f}% CPU, "
             f"{out['rss_per_account_kb']:.1f} KB/account, localdc "
             + ", ".join(f"{c:.2f}%" for c in out["dc_cpu_pct"])
             + "; requests/account/min " + ", ".join(
                 f"{m} {v:.2f}" for m, v in sorted(requests.items())))
    if "http" in fleet.events and plan.scrapes:
        out["scrape"] = scrape(fleet.events["http"]["port"], plan.scrapes)
        progress(f"  /metrics {out['scrape']['seconds']:.3f}s "
                 f"{out['scrape']['bytes'] / 1024:.0f} KB")


def _flood_storm(dcs: Sequence[LocalDcProcess], plan: RunPlan) -> dict[str, Any]:
    """FLOOD_WAIT_<plan.flood> on the next updates.getState of every tenth account; the local
    DCs count any request from those accounts before their deadline, and the first one after
    it (the account resumed)."""
    assert plan.flood is not None
    picked = [d.users[::10] for d in dcs]
    total = sum(len(p) for p in picked)
    before = [d.counters() for d in dcs]

    def delta(key: str) -> int:
        return sum(d.counters()[key] - b[key] for d, b in zip(dcs, before, strict=True))

    t0 = time.monotonic()
    for d, users in zip(dcs, picked, strict=True):
        for uid in users:
            d.inject({"kind": "rpc_error", "user_id": uid, "method": "updates.getState",
                      "error": f"FLOOD_WAIT_{plan.flood}", "times": 1})
    progress(f"  flood storm: FLOOD_WAIT_{plan.flood} armed for {total} accounts "
             f"in {time.monotonic() - t0:.1f}s")
    # Every flooded account meets its error at its next request (one heartbeat at most),
    # then may resume once its deadline has passed.
    hit = _wait_for(lambda: delta("rpc_errors_injected") >= total, 1.2 * plan.heartbeat + 30)
    resumed = _wait_for(lambda: delta("flood_waits_resumed") >= total,
                        plan.flood + 1.2 * plan.heartbeat + 60)
    out = {
        "accounts": total, "seconds": plan.flood,
        "errors_served": delta("rpc_errors_injected"),
        "requests_during_wait": delta("requests_during_flood_wait"),
        "resumed": delta("flood_waits_resumed"),
        "all_hit_s": None if hit is None else hit - t0,
        "all_resumed_s": None if resumed is None else resumed - t0,
    }
    progress(f"  flood storm: {out['errors_served']}/{total} flooded, "
             f"{out['requests_during_wait']} requests before a deadline, "
             f"{out['resumed']} resumed")
    return out


def _wait_for(done: Callable[[], bool], timeout: float) -> float | None:
    """Poll ``done`` once a second; the monotonic time it held, or None after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            return None
        time.sleep(1.0)
    return time.monotonic()


def _outage(fleet: FleetProcess, n: int, dcs: Sequence[LocalDcProcess],
            plan: RunPlan) -> dict[str, Any]:
    assert plan.outage is not None
    progress(f"  outage: killing {len(dcs)} localdc process(es) for {plan.outage:.0f}s")
    t_kill = time.time()
    for d in dcs:
        d.kill()
    time.sleep(plan.outage)  # the outage itself
    for d in dcs:
        d.start()
    t_back = time.time()
    reached = fleet.wait_count(n, t_back, plan.recovery_timeout)
    fleet.drain()
    if reached is None:
        progress(f"  not recovered within {plan.recovery_timeout:.0f}s "
                 f"({fleet.last_count['n']}/{n} connected)")
    else:
        progress(f"  recovered {reached - t_back:.1f}s after the outage ended")
    # Keep sampling a little so the plot shows the tail.
    time.sleep(plan.tail)
    return {"t_kill": t_kill, "t_back": t_back, "seconds": plan.outage,
            "recovered_s": None if reached is None else reached - t_back,
            "connected_at_end": fleet.last_count["n"]}


def _recovery_stats(timeline: dict[str, Any], n: int, outage: dict[str, Any]) -> dict[str, Any]:
    t_kill = outage["t_kill"]
    attempts = {int(s): c for s, c in timeline["attempts"] if s >= int(t_kill)}
    peak = max(attempts.values(), default=0)
    return {
        "attempts_total": sum(attempts.values()),
        "attempts_peak_per_s": peak,
        "attempts_peak_fraction": peak / n if n else 0.0,
        "timeline": {
            "connected": [(t - t_kill, c) for t, c in timeline["samples"] if t >= t_kill - 5],
            "attempts": sorted((s - t_kill, c) for s, c in attempts.items()),
        },
    }


def start_fleet(mode: str, workdir: Path, tag: str, args: list[str]) -> FleetProcess:
    return FleetProcess([mode, *args], workdir / f"{tag}.log", workdir / f"{tag}.timeline.json")
