"""``make bench-cluster``: one fleet split over several daemons on one SQLite store (issue 15,
"Measure"), written to bench/CLUSTER.md.

N accounts are seeded as in ``bench/run.py`` (users and bound auth keys in the localdc stores,
the same keys as encrypted sessions in one tgdaemon state directory), then D daemon processes
start together as instances of one fleet (``bench/fleet.py daemon --fleet-instance``, i.e.
``Daemon`` as ``serve()`` runs it, with ``$TGDAEMON_INSTANCE``).  Measured:

* time from the start of the D processes until every account's key has a connection open on
  its localdc (``live_keys`` of localdc's control API) and how the leases spread;
* per instance, after a settle time, over an idle window: CPU (utime+stime from /proc) and
  RSS (VmRSS; incremental = after the window minus once imported, per account it holds),
  set against the single-daemon figures of ``bench/results.json``;
* one instance SIGKILLed: time until all its accounts are connected on the survivors (the
  takeover), then until the fleet has *settled* (every account connected, and no connection
  closed by a server's ``ping_delay_disconnect`` deadline, for ``--stable`` seconds); over
  the takeover: the servers' deadline closes (localdc's ``deadline_closes``), each survivor's
  errors by category and its largest event-loop lag; localdc's overlap counter (connections
  of one key open at once from two client processes) over the whole run, which must stay 0.

The config holds no ``[[accounts]]``: the fleet's accounts live in the store (seeded there),
so no instance sizes its file-descriptor budget for the whole fleet.

``--smoke`` is the seconds-long variant the test suite runs (tests/bench) so the harness does
not rot.  The lead's run: ``make bench-cluster`` (N = 40,000, 4 daemons, 4 localdc processes).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.measure import progress
from bench.procfs import cpu_mark, cpu_percent, rss_kb
from bench.procs import ChildError, FleetProcess, LocalDcProcess
from bench.report import machine_info
from bench.seed import render_config, seed_dir
from tgdaemon.store import DB_NAME

HERE = Path(__file__).resolve().parent
#: As in bench/run.py: each localdc process serves one DC; failover would reach one without
#: the key (a bench artefact, see RESULTS.md).
POLICY_EXTRA = {"failover_after": 1_000_000}
#: Sockets one localdc process should hold at most (the machine's hard RLIMIT_NOFILE is 20,000).
PER_DC = 10_000
#: Lines of a daemon's log worth counting in the report: the fleet's trouble, fleet-wide.
LOG_EVENTS = {
    "closed_all": "leases could not be renewed in time",
    "leases_lost": "lease(s) lost",
    "renewal_failed": "lease renewal failed",
    "database_locked": "database is locked",
    "fenced_writes": "session write(s) refused",
    "errors": "ERROR ",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--accounts", type=int, default=40_000)
    p.add_argument("--daemons", type=int, default=4)
    p.add_argument("--dc-procs", type=int, default=None,
                   help=f"localdc processes (default: one per {PER_DC:,} accounts)")
    p.add_argument("--lease-ttl", type=float, default=60.0, help="the default")
    p.add_argument("--renew", type=float, default=10.0, help="lease_renew_interval (default)")
    p.add_argument("--heartbeat", type=float, default=30.0)
    p.add_argument("--connect-rate", type=float, default=0.0,
                   help="each daemon's connect_rate (0 = unlimited, as bench/run.py's main run)")
    p.add_argument("--settle", type=float, default=5.0)
    p.add_argument("--window", type=float, default=60.0, help="idle CPU window, seconds")
    p.add_argument("--connect-timeout", type=float, default=None,
                   help="give up on 'all connected' after this long (default 120 + N/50 s)")
    p.add_argument("--takeover-timeout", type=float, default=None,
                   help="give up on the takeover after this long (default TTL + renew + "
                        "60 + N/200 s)")
    p.add_argument("--stable", type=float, default=None,
                   help="after the takeover, how long the fleet must stay whole, with no "
                        "deadline close, to count as settled (default: the TTL)")
    p.add_argument("--lag", type=float, default=0.0,
                   help="block each survivor's event loop for this many seconds, once, "
                        "--lag-at seconds after the kill (a stand-in for the loop lag of a "
                        "takeover at a larger scale)")
    p.add_argument("--lag-at", type=float, default=None,
                   help="seconds after the kill (default: the TTL, when the claims begin)")
    p.add_argument("--log-level", default="info")
    p.add_argument("--single", type=Path, default=HERE / "results.json",
                   help="bench/run.py's results: the single-daemon figures to compare with")
    p.add_argument("--out", type=Path, default=HERE / "CLUSTER.md")
    p.add_argument("--json", type=Path, default=HERE / "cluster.json")
    p.add_argument("--workdir", type=Path, default=None, help="keep state and logs here")
    p.add_argument("--smoke", action="store_true", help="N=40, seconds-long windows")
    p.add_argument("--note", action="append", default=[],
                   help="a sentence for the report (e.g. under what load it ran)")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite --out from --json (adding --note) without measuring")
    args = p.parse_args(argv)
    if args.smoke:
        args.accounts, args.dc_procs, args.lease_ttl, args.renew = 40, 1, 4.0, 0.5
        args.heartbeat, args.settle, args.window = 1.0, 0.2, 1.0
    if args.dc_procs is None:
        args.dc_procs = max(1, math.ceil(args.accounts / PER_DC))
    if args.daemons < 2:
        p.error("--daemons: at least 2 (one of them is killed)")
    return args


class Leases:
    """Read-only look at the fleet's leases in the shared SQLite database."""

    def __init__(self, db: Path) -> None:
        self._db = db

    def owned(self) -> dict[str, int]:
        """Valid leases per instance (the SQLite fleet's expiries are this machine's clock)."""
        conn = sqlite3.connect(f"file:{self._db}?mode=ro", uri=True, timeout=30)
        try:
            rows = conn.execute("SELECT owner, count(*) FROM leases WHERE owner IS NOT NULL "
                                "AND expires_at > ? GROUP BY owner", (time.time(),)).fetchall()
        finally:
            conn.close()
        return {owner: int(n) for owner, n in rows}


#: The write-lock histograms every instance exports (tgdaemon/sqlitedb.py).
LOCK_HOLD = "tgdaemon_store_write_lock_hold_seconds"
LOCK_WAIT = "tgdaemon_store_write_lock_wait_seconds"
LOCK_MAX = "tgdaemon_store_write_lock_hold_max_seconds"
RENEWALS = "tgdaemon_lease_renewals_total"
ERRORS = "tgdaemon_errors_total"


def scrape_fleet(port: int) -> dict[str, Any]:
    """One instance's write-lock times (per transaction kind: count, p50/p99 as bucket upper
    bounds, max) and its renewal counts by result, from its /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=60) as resp:
        text = resp.read().decode()
    buckets: dict[tuple[str, str], list[tuple[float, float]]] = {}
    counts: dict[tuple[str, str], float] = {}
    longest: dict[str, float] = {}
    renewals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name, labels = sample.name, sample.labels
            for base, short in ((LOCK_HOLD, "hold"), (LOCK_WAIT, "wait")):
                if name == f"{base}_bucket":
                    buckets.setdefault((labels["tx"], short), []).append(
                        (float(labels["le"]), sample.value))
                elif name == f"{base}_count":
                    counts[(labels["tx"], short)] = sample.value
            if name == LOCK_MAX:
                longest[labels["tx"]] = sample.value
            elif name == RENEWALS:
                renewals[labels["result"]] = sample.value

    def quantile(key: tuple[str, str], q: float) -> float | None:
        total = counts.get(key, 0)
        if not total:
            return None
        top = longest.get(key[0]) if key[1] == "hold" else None
        for bound, n in sorted(buckets.get(key, [])):
            if n >= q * total:
                return bound if top is None else min(bound, top)
        return top

    lock = {}
    for (tx, short), total in counts.items():
        if short != "hold" or not total:
            continue
        lock[tx] = {"count": int(total), "hold_p50": quantile((tx, "hold"), 0.5),
                    "hold_p99": quantile((tx, "hold"), 0.99), "hold_max": longest.get(tx),
                    "wait_p99": quantile((tx, "wait"), 0.99)}
    return {"lock": lock, "renewals": renewals}


def scrape_errors(port: int) -> dict[str, int]:
    """One instance's worker errors so far, summed over its accounts, by category."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=120) as resp:
        text = resp.read().decode()
    errors: dict[str, int] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == ERRORS:
                category = sample.labels["category"]
                errors[category] = errors.get(category, 0) + int(sample.value)
    return errors


def _sum(dcs: Sequence[LocalDcProcess], key: str) -> int:
    return sum(int(d.overlaps()[key]) for d in dcs)


def _deadline_closes(dcs: Sequence[LocalDcProcess]) -> int:
    """Connections the servers closed because a ``ping_delay_disconnect`` deadline passed."""
    return sum(int(d.counters().get("deadline_closes", 0)) for d in dcs)


def _errors(fleets: dict[str, FleetProcess]) -> dict[str, dict[str, int]]:
    out = {}
    for i, f in fleets.items():
        if f.proc.poll() is None:
            try:
                out[i] = scrape_errors(f.wait_event("http", 60)["port"])
            except (OSError, ChildError) as exc:
                progress(f"{i}: no metrics ({exc})")
    return out


def _wait(done: Callable[[], bool], timeout: float, poll: float = 1.0) -> float | None:
    """Poll ``done``; the monotonic time it first held, or None after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            return None
        time.sleep(poll)
    return time.monotonic()


def run(args: argparse.Namespace, work: Path, out: dict[str, Any]) -> None:
    """Fills ``out`` as it goes: a failed run still reports what it measured."""
    n, d = args.accounts, args.daemons
    t0 = time.monotonic()
    seeded = seed_dir(n, work, args.dc_procs)
    progress(f"seeded {n} accounts in {time.monotonic() - t0:.1f}s over "
             f"{len(seeded.specs)} localdc process(es)")
    key_file, specs, state, rsa_files = (seeded.key_file, seeded.specs, seeded.state,
                                         seeded.rsa_files)
    config = work / "tgdaemon.toml"
    config.write_text(render_config(
        state_dir=state, key_file=key_file, rsa_files=rsa_files, procs=specs, names=[],
        daemon={"log_level": args.log_level, "connect_rate": args.connect_rate,
                "lease_ttl": args.lease_ttl, "lease_renew_interval": args.renew,
                "capacity": n, "instance_id": "bench"},
        policy={"heartbeat_interval": args.heartbeat, **POLICY_EXTRA}))
    leases = Leases(state / DB_NAME)
    dcs = [LocalDcProcess(s, work) for s in specs]
    instances = [f"d{i + 1}" for i in range(d)]
    fleets: dict[str, FleetProcess] = {}
    out.update({"n": n, "daemons": d, "dc_procs": len(specs), "lease_ttl": args.lease_ttl,
                "renew": args.renew, "heartbeat": args.heartbeat,
                "connect_rate": args.connect_rate, "injected_lag": args.lag})
    try:
        for dc in dcs:
            dc.start()
        started = time.monotonic()
        for i in instances:
            fleets[i] = FleetProcess(
                ["daemon", "--config", str(config), "--fleet-instance",
                 "--injected-lag", str(args.lag)],
                work / f"{i}.log", work / f"{i}.timeline.json", env={"TGDAEMON_INSTANCE": i})
        base = {i: f.wait_event("base", 300)["rss_kb"] for i, f in fleets.items()}
        connect_timeout = args.connect_timeout or 120 + n / 50
        first: dict[str, float] = {}  # when each instance had its first account connected

        def all_connected() -> bool:
            for i, f in fleets.items():
                f.drain()
                if i not in first and f.last_count["n"] > 0:
                    first[i] = time.monotonic() - started
            return _sum(dcs, "live_keys") >= n

        said = [time.monotonic()]

        def all_connected_said() -> bool:
            done = all_connected()
            if not done and time.monotonic() - said[0] >= 30:  # a long wait says how it goes
                said[0] = time.monotonic()
                progress(f"{time.monotonic() - started:.0f}s: {_sum(dcs, 'live_keys')}/{n} "
                         f"connected; leases {leases.owned()}; load "
                         f"{os.getloadavg()[0]:.1f}; " + "; ".join(
                             f"{i} {_brief(log_events(f.log_path))}" for i, f in fleets.items()))
            return done

        reached = _wait(all_connected_said, connect_timeout)
        out["first_connected_s"] = first
        if reached is None:
            out["connected_at_timeout"] = _sum(dcs, "live_keys")
            raise ChildError(f"not all connected within {connect_timeout:.0f}s "
                             f"({out['connected_at_timeout']}/{n}); see {work}/d*.log")
        out["connect_s"] = reached - started
        out["owned_at_connect"] = leases.owned()
        progress(f"all {n} connected {out['connect_s']:.1f}s after starting {d} daemons "
                 f"(first connected per instance at {first}); leases {out['owned_at_connect']}")
        out["instances"] = _idle(args, fleets, dcs, base, leases, out)
        _write_lock(fleets, out)

        victim = instances[-1]
        lost = leases.owned().get(victim, 0)
        closes_before = _deadline_closes(dcs)
        errors_before = _errors(fleets)
        out["deadline_closes_before_kill"] = closes_before
        progress(f"SIGKILL {victim} ({lost} accounts); deadline closes so far {closes_before}")
        t_kill = time.monotonic()
        out["kill_wall"] = time.time()
        fleets[victim].kill()
        takeover_timeout = args.takeover_timeout or (
            args.lease_ttl + args.renew + 60 + n / 200)

        lag_at = t_kill + (args.lease_ttl if args.lag_at is None else args.lag_at)
        lagged: list[str] = []

        def taken_over() -> bool:
            if args.lag > 0 and not lagged and time.monotonic() >= lag_at:
                lagged.extend(i for i in instances if i != victim)
                for i in lagged:
                    os.kill(fleets[i].pid, signal.SIGUSR2)
                progress(f"event loops of {lagged} blocked for {args.lag:g} s "
                         f"({time.monotonic() - t_kill:.1f} s after the kill)")
            return victim not in leases.owned() and _sum(dcs, "live_keys") >= n

        back = _wait(taken_over, takeover_timeout, poll=0.5)
        stable = args.lease_ttl if args.stable is None else args.stable
        settled = None if back is None else _settle(
            dcs, n, stable, t_kill + takeover_timeout + stable)
        closes_after = _deadline_closes(dcs)
        errors_after = _errors(fleets)
        out["takeover"] = {
            "victim": victim, "accounts": lost,
            "seconds": None if back is None else back - t_kill,
            "budget_s": takeover_timeout,
            "bound_s": args.lease_ttl + args.renew + 15,
            "settled_s": None if settled is None else settled - t_kill,
            "stable_s": stable,
            "deadline_closes": closes_after - closes_before,
            "errors": {i: {c: v - errors_before.get(i, {}).get(c, 0) for c, v in e.items()
                           if v - errors_before.get(i, {}).get(c, 0)}
                       for i, e in errors_after.items()},
            "owned_after": leases.owned(),
            "live_keys_at_end": _sum(dcs, "live_keys"),
            "injected_lag_s": args.lag if lagged else 0.0,
        }
        progress("takeover: " + ("NOT complete" if back is None else
                                 f"{back - t_kill:.1f}s") + ", settled: "
                 + ("NO" if settled is None else f"{settled - t_kill:.1f}s")
                 + f", deadline closes {closes_after - closes_before}, errors "
                 f"{out['takeover']['errors']}, leases {leases.owned()}")
        out["overlaps"] = _sum(dcs, "total")
        out["open_twice_at_end"] = _sum(dcs, "open_twice")
        progress(f"overlapping connections (localdc): {out['overlaps']}")
    finally:
        if "write_lock" not in out:  # failed before the idle window: how the lock fared
            _write_lock(fleets, out)
        with contextlib.suppress(OSError):
            out["deadline_closes_total"] = _deadline_closes(dcs)
        out["loop_lag_max_s"] = {}
        # All at once (one by one, the last ones would claim what the others release), and
        # one SIGTERM each: a second one during the stop ends a daemon without its timeline.
        stopping = [i for i, f in fleets.items() if f.proc.poll() is None]
        for i in stopping:
            os.kill(fleets[i].pid, signal.SIGTERM)
        for i in stopping:
            f = fleets[i]
            try:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    f.proc.wait(90)
                timeline = f.stop()  # reads the timeline (signals only one still running)
                lags = timeline.get("loop_lag", [])
                out["loop_lag_max_s"][i] = max((lag for _t, lag in lags), default=0.0)
                if "instances" in out and i in out["instances"]:
                    out["instances"][i]["loop_lag_max_s"] = max(
                        (lag for _t, lag in lags), default=0.0)
                if "takeover" in out:
                    out["takeover"].setdefault("loop_lag_max_s", {})[i] = max(
                        (lag for t, lag in lags if t >= out["kill_wall"]), default=0.0)
            except ChildError as exc:
                progress(f"{i}: {exc}")
        for dc in dcs:
            dc.stop()
        out["log_events"] = {i: log_events(f.log_path) for i, f in fleets.items()}


def _settle(dcs: Sequence[LocalDcProcess], n: int, stable: float, deadline: float
            ) -> float | None:
    """The monotonic time from which every account stayed connected and no server closed a
    connection on its ``ping_delay_disconnect`` deadline for ``stable`` seconds; None when
    that did not happen by ``deadline`` (monotonic)."""
    since: float | None = None
    closes = _deadline_closes(dcs)
    while True:
        now = time.monotonic()
        whole = _sum(dcs, "live_keys") >= n
        now_closes = _deadline_closes(dcs)
        if not whole or now_closes != closes:
            since, closes = None, now_closes
        elif since is None:
            since = now
        if since is not None and now - since >= stable:
            return since
        if now > deadline:
            return None
        time.sleep(0.5)


def _write_lock(fleets: dict[str, FleetProcess], out: dict[str, Any]) -> None:
    """Every live instance's write-lock times and renewal counts into ``out``."""
    out["write_lock"] = {}
    for i, f in fleets.items():
        if f.proc.poll() is not None:
            continue
        try:
            out["write_lock"][i] = scrape_fleet(f.wait_event("http", 60)["port"])
        except (OSError, ChildError) as exc:
            progress(f"{i}: no metrics ({exc})")
    progress("write lock held (p50/p99/max ms, transactions): " + "; ".join(
        f"{i} " + ", ".join(f"{tx} {_ms(x['hold_p50'])}/{_ms(x['hold_p99'])}/"
                            f"{_ms(x['hold_max'])} ({x['count']})"
                            for tx, x in sorted(w["lock"].items()))
        for i, w in sorted(out["write_lock"].items())))


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f}"


def _brief(events: dict[str, int]) -> str:
    """The log counts that are not zero, for a progress line."""
    return ", ".join(f"{k} {v}" for k, v in events.items() if v) or "no trouble logged"


def log_events(path: Path) -> dict[str, int]:
    """How often each of ``LOG_EVENTS`` appears in a daemon's log."""
    counts = dict.fromkeys(LOG_EVENTS, 0)
    try:
        with path.open(errors="replace") as log:
            for line in log:
                for key, text in LOG_EVENTS.items():
                    if text in line:
                        counts[key] += 1
    except OSError:
        pass
    return counts


def _idle(args: argparse.Namespace, fleets: dict[str, FleetProcess],
          dcs: Sequence[LocalDcProcess], base: dict[str, int], leases: Leases,
          out: dict[str, Any]) -> dict[str, dict[str, Any]]:
    time.sleep(args.settle)  # a measurement window, not a wait for a condition
    t0 = time.monotonic()
    marks = {i: cpu_mark(f.pid, t0) for i, f in fleets.items()}
    dc_marks = [cpu_mark(dc.pid, t0) for dc in dcs]
    served = [dc.requests() for dc in dcs]
    owned_before = leases.owned()
    time.sleep(args.window)
    t1 = time.monotonic()
    # What the fleet asked of the servers, per account and minute (bench/measure.py's measure).
    per_min = 60.0 / (t1 - t0) / args.accounts
    requests: dict[str, float] = {}
    for dc, before in zip(dcs, served, strict=True):
        for method, count in dc.requests().items():
            if count - before.get(method, 0):
                requests[method] = requests.get(method, 0.0) + (
                    count - before.get(method, 0)) * per_min
    out["requests_per_account_min"] = requests
    owned = leases.owned()
    result: dict[str, dict[str, Any]] = {}
    for i, f in fleets.items():
        cpu = cpu_percent(marks[i], cpu_mark(f.pid, t1))
        rss = rss_kb(f.pid)
        held = owned.get(i, 0)
        result[i] = {
            "owned": held, "moved_in_window": held - owned_before.get(i, 0),
            "rss_base_kb": base[i], "rss_kb": rss, "cpu_pct": cpu,
            "rss_per_account_kb": (rss - base[i]) / held if held else None,
            "cpu_pct_per_1000": 1000 * cpu / held if held else None,
        }
    out["dc_cpu_pct"] = [cpu_percent(m, cpu_mark(dc.pid, t1)) for m, dc in zip(
        dc_marks, dcs, strict=True)]
    total_cpu = sum(r["cpu_pct"] for r in result.values())
    out["total"] = {
        "cpu_pct": total_cpu,
        "cpu_pct_per_1000": 1000 * total_cpu / args.accounts,
        "rss_kb": sum(r["rss_kb"] for r in result.values()),
        "rss_per_account_kb": sum(r["rss_kb"] - r["rss_base_kb"] for r in result.values())
        / args.accounts,
    }
    progress(f"idle: {total_cpu:.1f}% CPU in all, "
             f"{out['total']['rss_per_account_kb']:.1f} KB/account; localdc "
             + ", ".join(f"{c:.1f}%" for c in out["dc_cpu_pct"]))
    return result


def single_daemon(path: Path) -> dict[str, Any] | None:
    """The largest plain (no variant) tgdaemon size of bench/run.py's results, as medians."""
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    sizes = [s for s in results.get("sizes", []) if not s.get("variant") and s.get("daemon")]
    if not sizes:
        return None
    size = max(sizes, key=lambda s: s["n"])

    def median(key: str) -> float | None:
        vals = sorted(r[key] for r in size["daemon"] if r.get(key) is not None)
        return vals[len(vals) // 2] if vals else None

    cpu = median("cpu_pct")
    return {"n": size["n"], "rss_per_account_kb": median("rss_per_account_kb"),
            "cpu_pct": cpu, "cpu_pct_per_1000": None if cpu is None else 1000 * cpu / size["n"],
            "connect_s": median("connect_s"), "date": results.get("machine", {}).get("date")}


def _f(value: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if value is None else fmt.format(value)


#: What follows this line in the report is written by hand and kept when a run rewrites it.
KEPT = "<!-- kept by bench/cluster.py when it rewrites this file -->"


def kept_section(path: Path) -> list[str]:
    """The hand-written tail of an existing report (from :data:`KEPT` on), if any."""
    try:
        text = path.read_text()
    except OSError:
        return []
    at = text.find(KEPT)
    return [] if at < 0 else ["", *text[at:].rstrip("\n").split("\n"), ""]


def write_report(results: dict[str, Any], path: Path) -> None:
    kept = kept_section(path)
    r = results["run"]
    m = results["machine"]
    single = results.get("single")
    if "n" not in r:  # failed before the daemons started
        path.write_text("\n".join([
            "# Benchmark: one fleet, several daemons on one SQLite store", "",
            f"**Run failed:** {results.get('error')}", *kept]) + "\n")
        return
    lines = [
        "# Benchmark: one fleet, several daemons on one SQLite store",
        "",
        "Generated by `make bench-cluster` (`bench/cluster.py`); raw numbers in "
        "`bench/cluster.json`. The local DC is a stand-in (`tgdaemon.localdc`): its cost is on "
        "the same machine.",
        "",
        f"- {m['nproc']} CPUs ({m['cpu']}), {m['ram_gb']} GB RAM, Python {m['python']}, "
        f"tgdaemon {m['tgdaemon']}; {m['date']}; whole run {results['wall_seconds'] / 60:.1f} "
        "min; load average (1 min) at start "
        + (f"{results['loadavg_start'][0]:.1f}, at end {results['loadavg_end'][0]:.1f}"
           if "loadavg_start" in results else "not recorded"),
        f"- {r['n']:,} accounts, {r['daemons']} daemon processes (instances of one fleet, "
        f"SQLite in one state directory), {r['dc_procs']} localdc process(es); lease_ttl "
        f"{r['lease_ttl']:g} s, lease_renew_interval {r['renew']:g} s, heartbeat "
        f"{r['heartbeat']:g} s, connect_rate {r['connect_rate']:g} (0 = unlimited) per daemon.",
        "- Connected = the account's auth key has a connection open on its localdc. Per "
        "instance: RSS and CPU from /proc over the idle window; incremental RSS per account = "
        "(RSS after the window - RSS once imported) / accounts it holds.",
        "",
    ]
    for note in results.get("notes", []):
        lines += [f"> {note}", ""]
    if "error" in results:
        lines += [f"**Run failed:** {results['error']}", ""]
    if "deadline_closes_total" in r:
        lags = r.get("loop_lag_max_s", {})
        lines += ["Whole run: connections closed by a server's `ping_delay_disconnect` deadline "
                  f"**{r['deadline_closes_total']:,}**; largest event-loop lag per instance "
                  "that stopped cleanly: " + (", ".join(
                      f"{i} {v:.2f} s" for i, v in sorted(lags.items())) or "-") + ".", ""]
    if "connect_s" in r:
        owned = r.get("owned_at_connect", {})
        first = r.get("first_connected_s")
        lines += [f"All {r['n']:,} connected **{r['connect_s']:.1f} s** after the daemons "
                  "were started (imports, store, first claims included"
                  + ("; each instance's first account connected after " + ", ".join(
                      f"{i} {t:.1f} s" for i, t in sorted(first.items())) if first else "")
                  + "); leases then: "
                  + ", ".join(f"{i} {c:,}" for i, c in sorted(owned.items())) + ".", ""]
    if "instances" in r:
        lines += ["| instance | accounts held | RSS, MB | RSS per account, KB | idle CPU, % "
                  "of one core | CPU per 1,000 accounts, % |", "|---|---|---|---|---|---|"]
        for i, x in sorted(r["instances"].items()):
            lines.append(f"| {i} | {x['owned']:,} | {x['rss_kb'] / 1024:.0f} | "
                         f"{_f(x['rss_per_account_kb'], '{:.1f}')} | {x['cpu_pct']:.2f} | "
                         f"{_f(x['cpu_pct_per_1000'])} |")
        t = r["total"]
        lines.append(f"| all {r['daemons']} | {r['n']:,} | {t['rss_kb'] / 1024:.0f} | "
                     f"{t['rss_per_account_kb']:.1f} | {t['cpu_pct']:.2f} | "
                     f"{t['cpu_pct_per_1000']:.2f} |")
        if single:
            lines.append(f"| one daemon (bench/RESULTS.md, N = {single['n']:,}) | "
                         f"{single['n']:,} | - | {_f(single['rss_per_account_kb'], '{:.1f}')} "
                         f"| {_f(single['cpu_pct'])} | {_f(single['cpu_pct_per_1000'])} |")
        lines += ["", "localdc CPU in the window, % per process: "
                  + " / ".join(f"{c:.1f}" for c in r.get("dc_cpu_pct", [])), ""]
        requests = r.get("requests_per_account_min")
        if requests:
            lines += ["Requests served per account and minute in the window: "
                      + ", ".join(f"{m} {v:.2f}" for m, v in sorted(requests.items()))
                      + f" (total {sum(requests.values()):.2f}).", ""]
    tk = r.get("takeover")
    if tk:
        seconds = tk["seconds"]
        budget = tk.get("budget_s")
        when = (f"after **{seconds:.1f} s**" if seconds is not None else
                "**NOT within the run's budget**" + (f" of {budget:.0f} s" if budget else ""))
        lines += [
            f"SIGKILL of {tk['victim']} ({tk['accounts']:,} accounts): all of them connected "
            f"on the survivors {when} (documented bound "
            f"TTL + renewal + 15 s = {tk['bound_s']:g} s); then {tk['live_keys_at_end']:,} of "
            f"{r['n']:,} accounts connected, leases: "
            + ", ".join(f"{i} {c:,}" for i, c in sorted(tk["owned_after"].items())) + ".",
            "",
            f"Overlapping connections of one auth key from two processes (localdc's counter, "
            f"whole run): **{r.get('overlaps', '-')}**.",
            "",
        ]
        if "deadline_closes" in tk:
            if tk.get("injected_lag_s"):
                lines += [f"Injected: each survivor's event loop blocked once for "
                          f"{tk['injected_lag_s']:g} s during the takeover (`--lag`).", ""]
            settled = tk.get("settled_s")
            errors = tk.get("errors", {})
            lags = tk.get("loop_lag_max_s", {})
            lines += [
                "Settled (every account connected and no server deadline close for "
                f"{tk['stable_s']:g} s): "
                + (f"**{settled:.1f} s** after the kill" if settled is not None else "**NO**")
                + f". Connections closed by a server's `ping_delay_disconnect` deadline: "
                f"{r.get('deadline_closes_before_kill', '-')} before the kill, "
                f"**{tk['deadline_closes']:,}** from the kill to the end of the takeover.", "",
                "| survivor | errors after the kill (by category) | largest event-loop lag "
                "after the kill, s |", "|---|---|---|"]
            for i in sorted(set(errors) | set(lags)):
                e = errors.get(i, {})
                lines.append(f"| {i} | " + (", ".join(f"{c} {v:,}" for c, v in sorted(
                    e.items())) or "none") + f" | {_f(lags.get(i))} |")
            lines.append("")
    write_lock = r.get("write_lock")
    if write_lock:
        lines += ["Write lock of the shared SQLite database, per instance and kind of "
                  "transaction, from start to the end of the idle window "
                  "(`tgdaemon_store_write_lock_*`; p50/p99 are histogram bucket upper bounds; "
                  "the other instances' renewals wait for these holds):", "",
                  "| instance | transaction | count | held p50, ms | held p99, ms | held max, "
                  "ms | waited p99, ms |", "|---|---|---|---|---|---|---|"]
        for i, w in sorted(write_lock.items()):
            for tx, x in sorted(w["lock"].items()):
                lines.append(f"| {i} | {tx} | {x['count']:,} | {_ms(x['hold_p50'])} | "
                             f"{_ms(x['hold_p99'])} | {_ms(x['hold_max'])} | "
                             f"{_ms(x['wait_p99'])} |")
        lines += ["", "Lease renewals by result (same period): " + "; ".join(
            f"{i} " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(w["renewals"].items()))
            for i, w in sorted(write_lock.items())) + ".", ""]
    events = r.get("log_events")
    if events:
        lines += ["Counted in the daemons' logs over the run (fleet-wide trouble):", "",
                  "| instance | " + " | ".join(LOG_EVENTS) + " |",
                  "|---|" + "---|" * len(LOG_EVENTS)]
        lines += [f"| {i} | " + " | ".join(str(c[k]) for k in LOG_EVENTS) + " |"
                  for i, c in sorted(events.items())]
        lines.append("")
    path.write_text("\n".join(lines + kept))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report_only:
        results = json.loads(args.json.read_text())
        results["notes"] = results.get("notes", []) + args.note
        args.json.write_text(json.dumps(results, indent=1, default=str) + "\n")
        write_report(results, args.out)
        return 0
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # children inherit it
    started = time.monotonic()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="tgdaemon-bench-cluster-"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"machine": machine_info(), "args": {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "single": single_daemon(args.single), "run": {}, "loadavg_start": os.getloadavg(),
        "notes": list(args.note)}
    failed = False
    try:
        run(args, work, results["run"])
    except Exception as exc:  # report what ran, say what did not
        progress(f"failed: {exc}")
        results["error"] = str(exc)
        failed = True
    finally:
        results["wall_seconds"] = time.monotonic() - started
        results["loadavg_end"] = os.getloadavg()
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    args.json.write_text(json.dumps(results, indent=1, default=str) + "\n")
    write_report(results, args.out)
    progress(f"done in {results['wall_seconds']:.0f}s: {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
