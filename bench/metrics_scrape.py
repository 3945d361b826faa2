"""Scrape cost of tgdaemon.metrics: in-process at fleet sizes, and a real Prometheus.

In-process (the default): median render time and body size of the registry filled with N
synthetic accounts, ``.venv/bin/python bench/metrics_scrape.py [--labelled] [--repeat 5]``.
``--labelled`` also measures the rejected design (prometheus_client labelled metric objects,
one child per account per metric) for comparison.

``--prometheus``: the daemon itself (``bench/fleet.py``, N accounts connected to the local DC
from pre-seeded sessions, as ``make bench`` runs it) scraped by the real Prometheus (Debian's
``/usr/bin/prometheus``) with the shipped ``config/prometheus-scrape.yml`` and alert rules,
every ``--interval`` seconds for ``--duration`` seconds, once per ``metrics_histograms``
setting. Reported per setting: scrape duration (median, max), samples per scrape, body size,
series in Prometheus' head block, Prometheus' RSS (VmRSS, end and max) and CPU; written into
``bench/results.json`` (key ``prometheus_scrape``) and ``bench/RESULTS.md``. The issue-17 run::

    .venv/bin/python bench/metrics_scrape.py --prometheus --accounts 10000 --duration 300

Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import http.client
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from bench.measure import progress, start_fleet
from bench.procfs import cpu_mark, cpu_percent, rss_kb
from bench.procs import ChildError, FleetProcess, LocalDcProcess
from bench.report import prometheus_lines, with_prometheus_section
from bench.run import BENCH_POLICY_EXTRA, daemon_args, raise_nofile
from bench.seed import free_port_block, render_config, seed_dir
from tgdaemon.lifecycle import Category, State
from tgdaemon.metrics import HISTOGRAM_MODES, LATENCY_BUCKETS, Metrics, render
from tgdaemon.status import StatusBoard

HERE = Path(__file__).resolve().parent
CONFIG = HERE.parent / "config"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
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


# -- a real Prometheus against the daemon's /metrics -------------------------------------


def prometheus_config(target: str, interval: float) -> str:
    """The shipped scrape example, aimed at ``target`` every ``interval`` seconds, its alert
    rules loaded from the repository (evaluating them is part of what Prometheus pays)."""
    text = (CONFIG / "prometheus-scrape.yml").read_text()
    text = text.replace('"127.0.0.1:9464"', f'"{target}"')
    text = text.replace("- prometheus-alerts.yml",
                        f"- {json.dumps(str(CONFIG / 'prometheus-alerts.yml'))}")
    iv = f"{interval:g}s"
    text = re.sub(r"(scrape_interval|evaluation_interval): 15s", rf"\1: {iv}", text)
    return re.sub(r"scrape_timeout: \S+", f"scrape_timeout: {min(interval, 10):g}s", text)


class PrometheusProcess:
    """Debian's Prometheus as a child in its own session, stopped by its pid."""

    def __init__(self, config: Path, data_dir: Path, log: Path) -> None:
        self.port = free_port_block(1)
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = log
        with log.open("ab") as out:
            # extra-scrape-metrics: scrape_body_size_bytes, the body as Prometheus read it.
            self.proc = subprocess.Popen(
                [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={data_dir}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn",
                 "--enable-feature=extra-scrape-metrics"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def get(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=30) as r:
            return json.loads(r.read()) if path.startswith("/api/") else r.read()

    def query(self, expr: str) -> float | None:
        """The value of a one-series instant query (None when it returns nothing)."""
        body = self.get("/api/v1/query", query=expr)
        result = body["data"]["result"]
        return float(result[0]["value"][1]) if result else None

    def wait(self, done: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited; see {self._log}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"prometheus: {what} not within {timeout:g}s; see {self._log}")
            time.sleep(0.2)

    def ready(self) -> bool:
        with contextlib.suppress(urllib.error.URLError, ConnectionError):
            self.get("/-/ready")
            return True
        return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def scrape_with_prometheus(target: str, duration: float, interval: float,
                           work: Path) -> dict[str, Any]:
    """Start Prometheus on ``target``, let it scrape for ``duration`` s, report its view."""
    work.mkdir(parents=True, exist_ok=True)
    config = work / "prometheus.yml"
    config.write_text(prometheus_config(target, interval))
    prom = PrometheusProcess(config, work / "tsdb", work / "prometheus.log")
    try:
        prom.wait(prom.ready, 60, "ready")
        job = '{job="tgdaemon"}'
        prom.wait(lambda: prom.query(f"scrape_samples_scraped{job}") is not None,
                  interval + 30, "a first scrape")
        t0 = time.monotonic()
        start = cpu_mark(prom.pid, t0)
        rss_start = rss_max = rss_kb(prom.pid)
        loads: list[float] = []
        while (now := time.monotonic()) < t0 + duration:  # the measurement window itself
            rss_max = max(rss_max, rss_kb(prom.pid))
            loads.append(os.getloadavg()[0])
            time.sleep(min(1.0, t0 + duration - now))
        end = cpu_mark(prom.pid, time.monotonic())
        rss_end = rss_kb(prom.pid)
        window = f"[{duration + interval:g}s]"  # the first scrape is just before t0

        def over(fn: str, metric: str) -> float | None:
            return prom.query(f"{fn}({metric}{job}{window})")

        head = prom.get("/api/v1/status/tsdb")["data"]["headStats"]
        scrapes = over("count_over_time", "up")
        return {
            "scrapes": scrapes,
            "failed_scrapes": None if scrapes is None else scrapes - (over("sum_over_time",
                                                                          "up") or 0),
            "duration_median_s": prom.query(
                f"quantile_over_time(0.5, scrape_duration_seconds{job}{window})"),
            "duration_max_s": over("max_over_time", "scrape_duration_seconds"),
            "samples_per_scrape": over("max_over_time", "scrape_samples_scraped"),
            "body_bytes": over("max_over_time", "scrape_body_size_bytes"),
            "head_series": head["numSeries"],
            "rss_start_kb": rss_start,
            "rss_end_kb": rss_end,
            "rss_max_kb": max(rss_max, rss_end),
            "cpu_pct": cpu_percent(start, end),
            "loadavg_median": statistics.median(loads) if loads else None,
            "loadavg_max": max(loads, default=None),
        }
    finally:
        prom.stop()


def wait_for_sessions_gauges(port: int, n: int, timeout: float) -> int:
    """Wait (bounded) until every account exports its sessions gauge, the steady state's
    fifth series; returns how many do."""
    deadline = time.monotonic() + timeout
    count = 0
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=60) as r:
                count = r.read().count(b"\ntgdaemon_authorizations{")
        except (OSError, http.client.HTTPException) as exc:
            # A starved daemon cuts off an answer that does not leave within its send
            # deadline (tgdaemon.http): that poll is lost, not the run.
            progress(f"  /metrics poll failed: {exc!r}")
        if count >= n or time.monotonic() > deadline:
            return count
        time.sleep(5)  # a poll of a multi-megabyte body, not a wait for a race


def connect_settings(rate: float, n: int) -> dict[str, float]:
    """``connect_rate``/``connect_burst`` of the run: ``rate`` (0: unlimited), burst 2x rate
    (README's advice for a large fleet). A scrape run measures the exposition, not the start:
    on a loaded machine an unlimited start of 10,000 herds into connect timeouts."""
    return {"connect_rate": rate, "connect_burst": max(1, round(2 * rate))} if rate else {
        "connect_rate": 0}


def wait_connected(fleet: FleetProcess, n: int, budget: float) -> int:
    """Wait up to ``budget`` s for all ``n`` accounts; returns how many are connected (a fleet
    short of all is measured as it is: every configured account is exported either way)."""
    with contextlib.suppress(ChildError):
        fleet.wait_event("all_connected", budget)
    fleet.drain()
    return n if "all_connected" in fleet.events else int(fleet.last_count["n"])


def prometheus_bench(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """Seed N accounts once; per histogram setting run the daemon, scrape it, stop it."""
    n = args.accounts
    t0 = time.monotonic()
    seeded = seed_dir(n, root, args.dc_procs)
    progress(f"N={n}: seeded in {time.monotonic() - t0:.1f}s")
    dcs = [LocalDcProcess(s, root) for s in seeded.specs]
    out: dict[str, Any] = {"accounts": n, "duration_s": args.duration,
                           "interval_s": args.interval, "date": _now(),
                           "loadavg": os.getloadavg()[0], "nproc": os.cpu_count(),
                           "sessions_look_s": args.sessions_look,
                           "connect_rate": args.connect_rate,
                           "settings": {}}
    try:
        for dc in dcs:
            dc.start()
        for mode in args.histograms:
            path = root / f"tgdaemon-{mode}.toml"
            path.write_text(render_config(
                state_dir=seeded.state, key_file=seeded.key_file, rsa_files=seeded.rsa_files,
                procs=seeded.specs, names=seeded.names,
                policy={"heartbeat_interval": args.heartbeat, **BENCH_POLICY_EXTRA},
                daemon={"log_level": "warning", "metrics_histograms": mode,
                        **connect_settings(args.connect_rate, n)},
                security={"check_interval": args.sessions_look} if args.sessions_look else None))
            fleet = start_fleet("daemon", root, f"daemon-{mode}", daemon_args(path))
            try:
                port = fleet.wait_event("http", 300)["port"]
                connected = wait_connected(fleet, n, args.connect_budget or 120 + n / 20)
                progress(f"metrics_histograms = {mode!r}: {connected} of {n} connected")
                looked = wait_for_sessions_gauges(port, connected, args.sessions_look + 120 if
                                                  args.sessions_look else 0)
                progress(f"  {looked} sessions gauges; Prometheus scrapes every "
                         f"{args.interval:g}s for {args.duration:g}s")
                result = scrape_with_prometheus(f"127.0.0.1:{port}", args.duration,
                                                args.interval, root / f"prometheus-{mode}")
                fleet.drain()
                result["connected_end"] = fleet.last_count["n"]
            finally:
                try:  # a slow stop of a big fleet on a loaded machine spoils no measurement
                    fleet.stop(300)
                except ChildError as exc:
                    progress(f"  {exc}")
            out["settings"][mode] = {**result, "sessions_gauges": looked, "connected": connected}
            progress(f"  {json.dumps(result)}")
    finally:
        for dc in dcs:
            dc.stop()
    return out


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def record(measured: dict[str, Any], json_path: Path, md_path: Path) -> None:
    """Into the bench's results (``make bench`` keeps the key and renders the section) and
    RESULTS.md, whose other sections stay as their own run wrote them."""
    results = json.loads(json_path.read_text()) if json_path.exists() else {}
    results["prometheus_scrape"] = measured
    json_path.write_text(json.dumps(results, indent=1, default=str) + "\n")
    old = md_path.read_text() if md_path.exists() else "# Benchmarks\n"
    md_path.write_text(with_prometheus_section(old, prometheus_lines(measured)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--labelled", action="store_true", help="also measure labelled objects")
    parser.add_argument("--sizes", type=int, nargs="*", default=SIZES)
    real = parser.add_argument_group("--prometheus: the daemon scraped by a real Prometheus")
    real.add_argument("--prometheus", action="store_true")
    real.add_argument("--accounts", type=int, default=10000)
    real.add_argument("--duration", type=float, default=300.0, help="seconds of scraping")
    real.add_argument("--interval", type=float, default=15.0, help="scrape interval, s")
    real.add_argument("--histograms", nargs="+", default=["fleet", "account"],
                      choices=HISTOGRAM_MODES, help="metrics_histograms settings to run")
    real.add_argument("--heartbeat", type=float, default=30.0)
    real.add_argument("--sessions-look", type=float, default=60.0,
                      help="security.check_interval (>= 60): every account's first look at "
                           "its sessions (its fifth series) lands before the window; 0 keeps "
                           "the default (hours) and does not wait")
    real.add_argument("--connect-rate", type=float, default=None,
                      help="daemon.connect_rate, burst 2x (default N/40, README's advice for a "
                           "large fleet, at least 50; 0 = unlimited)")
    real.add_argument("--connect-budget", type=float, default=0,
                      help="seconds to wait for all accounts before scraping what is "
                           "connected (default 120 + N/20)")
    real.add_argument("--dc-procs", type=int, default=2)
    real.add_argument("--json", type=Path, default=HERE / "results.json")
    real.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    real.add_argument("--no-record", action="store_true", help="print only")
    real.add_argument("--workdir", type=Path, default=None, help="keep state and logs here")
    args = parser.parse_args(argv)
    if args.prometheus:
        if args.connect_rate is None:
            args.connect_rate = max(50.0, args.accounts / 40)
        return prometheus_main(args)
    in_process(args)
    return 0


def prometheus_main(args: argparse.Namespace) -> int:
    if not Path(PROMETHEUS).exists():
        print(f"metrics_scrape: no Prometheus at {PROMETHEUS} "
              "(scripts/install-system-deps.sh installs it)", file=sys.stderr)
        return 69  # EX_UNAVAILABLE
    raise_nofile()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="tgdaemon-promscrape-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        measured = prometheus_bench(args, root)
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(measured, indent=1))
    if not args.no_record:
        record(measured, args.json, args.out)
        progress(f"recorded in {args.json} and {args.out}")
    return 0


def in_process(args: argparse.Namespace) -> None:
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
    raise SystemExit(main())
