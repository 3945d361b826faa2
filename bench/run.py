"""``make bench``: tgdaemon vs N plain Telethon clients on the local DC, written to RESULTS.md.

For each fleet size N: seed N users + bound auth keys in fresh localdc state and the same
keys as encrypted tgdaemon sessions (no key exchange anywhere), start the localdc process(es),
then per repeat run, one after the other and each in its own process:

* tgdaemon with ``connect_rate = 0`` (unlimited): connect time, idle window, /metrics
  scrapes, and (first repeat, outage sizes) a total outage of every localdc process;
* tgdaemon with the default connect rate (first repeat, N <= --default-rate-max): connect
  time only;
* the baseline (stock TelegramClient, default settings, getState every heartbeat): connect
  time, idle window, outage.

Run ``.venv/bin/python bench/run.py --help``; ``--smoke`` is the seconds-long variant the
test suite runs so the harness does not rot.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.measure import RunPlan, progress, run_fleet, start_fleet
from bench.procs import LocalDcProcess
from bench.report import machine_info, plot_outages, write_results
from bench.seed import render_config, seed_dir
from tgdaemon.config import DaemonConfig

HERE = Path(__file__).resolve().parent
#: Every localdc process serves only its own DC, but getConfig from one process names its
#: other (empty) DCs too; failover to such an address would reach a process without the key.
#: Real Telegram has no such split, so failover is disabled for the bench (see RESULTS.md).
BENCH_POLICY_EXTRA = {"failover_after": 1_000_000}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000])
    p.add_argument("--repeats", type=int, default=3, help="repeats for N < --large")
    p.add_argument("--large", type=int, default=10000)
    p.add_argument("--large-repeats", type=int, default=1)
    p.add_argument("--heartbeat", type=float, default=30.0)
    p.add_argument("--fast-rate", type=float, default=0.0,
                   help="connect_rate of the main tgdaemon run (0 = unlimited)")
    p.add_argument("--fast-burst", type=int, default=None,
                   help="connect_burst of the main tgdaemon run (default: the daemon's)")
    p.add_argument("--connect-timeout", type=float, default=None,
                   help="give up on 'all connected' after this long (default 120 + N/50 s)")
    p.add_argument("--fleets", nargs="+", default=["daemon", "baseline"],
                   choices=["daemon", "baseline"])
    p.add_argument("--note", action="append", default=[],
                   help="a sentence for RESULTS.md (e.g. what an earlier pass showed)")
    p.add_argument("--merge", action="store_true",
                   help="keep the other sizes already in --json (re-run some sizes only)")
    # 60 s: Telethon's keepalive (ping + session save) runs every 60 s per client; a shorter
    # window can miss it for one fleet and not the other.
    p.add_argument("--window", type=float, default=60.0, help="idle CPU window, seconds")
    p.add_argument("--settle", type=float, default=5.0)
    p.add_argument("--scrapes", type=int, default=5)
    p.add_argument("--default-rate-max", type=int, default=1000,
                   help="measure the default connect rate up to this N")
    # Issue 17's short outage: long enough for a per-account backoff to grow past it.
    p.add_argument("--outage", type=float, default=12.0)
    p.add_argument("--outage-sizes", type=int, nargs="*", default=[100, 10000])
    p.add_argument("--recovery-timeout", type=float, default=90.0)
    p.add_argument("--flood-sizes", type=int, nargs="*", default=[1000, 10000],
                   help="sizes with a flood-wait storm (a tenth of the accounts)")
    p.add_argument("--flood-wait", type=int, default=30, help="FLOOD_WAIT_N of the storm")
    p.add_argument("--no-default-rate-outage", action="store_true",
                   help="no outage in the default-rate run")
    p.add_argument("--tail", type=float, default=5.0, help="sampling after recovery")
    p.add_argument("--dc-procs", type=int, default=2, help="localdc processes")
    p.add_argument("--log-level", default="info", help="daemon and baseline log level")
    p.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    p.add_argument("--json", type=Path, default=HERE / "results.json")
    p.add_argument("--plot", type=Path, default=HERE / "outage.png")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--workdir", type=Path, default=None, help="keep state and logs here")
    p.add_argument("--smoke", action="store_true", help="N=20, seconds-long windows")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite --out (and the plot) from --json without measuring")
    args = p.parse_args(argv)
    if args.smoke:
        args.sizes, args.repeats, args.window, args.settle = [20], 1, 1.0, 0.2
        args.scrapes, args.outage, args.outage_sizes = 2, 1.0, [20]
        args.default_rate_max, args.dc_procs, args.recovery_timeout = 20, 1, 20.0
        args.no_plot, args.tail, args.no_default_rate_outage = True, 0.2, True
        args.flood_sizes, args.flood_wait, args.heartbeat = [20], 1, 1.0
    return args


def variant(args: argparse.Namespace) -> str | None:
    parts = [f"connect_rate {args.fast_rate:g}/s"] if args.fast_rate else []
    parts += [f"burst {args.fast_burst}"] if args.fast_burst is not None else []
    return ", ".join(parts) or None


def raise_nofile() -> None:
    """Children inherit it: each localdc holds up to N sockets."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def daemon_args(config: Path) -> list[str]:
    return ["--config", str(config)]


def bench_size(n: int, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """Every run for one fleet size; localdc processes live for all of them."""
    work = root / f"n{n}"
    work.mkdir(parents=True)
    t0 = time.monotonic()
    seeded = seed_dir(n, work, args.dc_procs)
    key_file, specs, state = seeded.key_file, seeded.specs, seeded.state
    names, rsa_files, users = seeded.names, seeded.rsa_files, seeded.users
    progress(f"N={n}: seeded {len(names)} users, keys and sessions in "
             f"{time.monotonic() - t0:.1f}s over {len(specs)} localdc process(es)")
    policy = {"heartbeat_interval": args.heartbeat, **BENCH_POLICY_EXTRA}
    configs = {}
    fast = {"connect_rate": args.fast_rate}
    if args.fast_burst is not None:
        fast["connect_burst"] = args.fast_burst
    for label, rate in (("unlimited", fast), ("default", {})):
        path = work / f"tgdaemon-{label}.toml"
        path.write_text(render_config(
            state_dir=state, key_file=key_file, rsa_files=rsa_files, procs=specs, names=names,
            daemon={"log_level": args.log_level, **rate}, policy=policy))
        configs[label] = path
    base_args = ["--state-dir", str(state), "--key-file", str(key_file),
                 "--heartbeat", str(args.heartbeat), "--log-level", args.log_level]
    for f in rsa_files:
        base_args += ["--rsa-file", str(f)]
    dcs = [LocalDcProcess(s, work) for s in specs]
    for dc, seeded in zip(dcs, users, strict=True):
        dc.users = seeded
    repeats = args.large_repeats if n >= args.large else args.repeats
    d = DaemonConfig()
    default_connect_budget = 120 + 2 * n / d.connect_rate
    result: dict[str, Any] = {"n": n, "repeats": repeats, "daemon": [], "baseline": [],
                              "daemon_default_rate": [], "fast_rate": args.fast_rate,
                              "fast_burst": args.fast_burst if args.fast_burst is not None
                              else d.connect_burst,
                              "variant": variant(args)}
    try:
        for dc in dcs:
            dc.start()
        for r in range(repeats):
            outage = args.outage if (r == 0 and n in args.outage_sizes) else None
            flood = args.flood_wait if (r == 0 and n in args.flood_sizes) else None
            plan = RunPlan(args.settle, args.window, args.scrapes, outage,
                           args.recovery_timeout, tail=args.tail,
                           connect_timeout=args.connect_timeout or 120 + n / 50,
                           flood=flood, heartbeat=args.heartbeat)
            if "daemon" in args.fleets:
                progress(f"N={n} repeat {r + 1}/{repeats}: tgdaemon, connect_rate "
                         f"{args.fast_rate:g} (0 = unlimited)")
                fleet = start_fleet("daemon", work, f"daemon-{r}",
                                    daemon_args(configs["unlimited"]))
                result["daemon"].append(run_fleet(fleet, n, dcs, plan))
            if r == 0 and n <= args.default_rate_max and "daemon" in args.fleets:
                progress(f"N={n}: tgdaemon, default connect_rate {d.connect_rate:g}/s "
                         f"(burst {d.connect_burst})")
                fleet = start_fleet("daemon", work, f"daemon-default-{r}",
                                    daemon_args(configs["default"]))
                # No idle window (the unlimited run has it); the outage again, since the
                # limiter is what keeps a fleet-wide reconnect from being a herd.
                quick = RunPlan(0, 0, 0, None if args.no_default_rate_outage else outage,
                                max(args.recovery_timeout, default_connect_budget),
                                connect_timeout=default_connect_budget, idle=False,
                                tail=args.tail)
                result["daemon_default_rate"].append(run_fleet(fleet, n, dcs, quick))
            if "baseline" in args.fleets:
                progress(f"N={n} repeat {r + 1}/{repeats}: baseline (plain Telethon)")
                fleet = start_fleet("baseline", work, f"baseline-{r}", base_args)
                result["baseline"].append(run_fleet(fleet, n, dcs, plan))
    finally:
        for dc in dcs:
            dc.stop()
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report_only:
        results = json.loads(args.json.read_text())
        if args.note:
            results["notes"] = results.get("notes", []) + args.note
            args.json.write_text(json.dumps(results, indent=1, default=str) + "\n")
        write_results(results, args.out, None if args.no_plot else plot_outages(results, args.plot))
        return 0
    raise_nofile()
    started = time.monotonic()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="tgdaemon-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"machine": machine_info(), "args": {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "sizes": [], "not_run": [], "failed": [], "notes": list(args.note)}
    d = DaemonConfig()
    for n in args.sizes:
        if n > args.default_rate_max:
            floor = (n - d.connect_burst) / d.connect_rate
            results["not_run"].append(
                f"N={n}: connect time at the default connect_rate not measured (budget): the "
                f"limiter alone needs (N - burst) / rate = {floor:.0f} s at the default "
                f"{d.connect_rate:g}/s, burst {d.connect_burst}")
        if n in args.outage_sizes and n > args.default_rate_max:
            results["not_run"].append(
                f"N={n}: outage with the default connect_rate not run, for the same reason")
    try:
        for n in args.sizes:
            try:
                results["sizes"].append(bench_size(n, args, root))
            except Exception as exc:  # report what ran; say what did not and why
                progress(f"N={n} failed: {exc}")
                results["failed"].append(f"N={n}: failed: {exc}")
                if args.smoke:
                    raise
    finally:
        results["wall_seconds"] = time.monotonic() - started
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    plot = None
    if not args.no_plot:
        plot = plot_outages(results, args.plot)
    # bench/metrics_scrape.py --prometheus is a run of its own: its section stays.
    if args.json.exists() and (kept := json.loads(args.json.read_text()).get(
            "prometheus_scrape")):
        results["prometheus_scrape"] = kept
    if args.merge and args.json.exists():
        old = json.loads(args.json.read_text())
        ran = {(s["n"], s.get("variant")) for s in results["sizes"]}
        results["sizes"] = sorted(
            [s for s in old["sizes"] if (s["n"], s.get("variant")) not in ran]
            + results["sizes"], key=lambda s: (s["n"], s.get("variant") or ""))
        results["not_run"] = old.get("not_run", []) + [
            x for x in results["not_run"] if x not in old.get("not_run", [])]
        results["failed"] = old.get("failed", []) + results["failed"]
        results["notes"] = old.get("notes", []) + results.get("notes", [])
        results["wall_seconds"] += old.get("wall_seconds", 0)
    args.json.write_text(json.dumps(results, indent=1, default=str) + "\n")
    write_results(results, args.out, plot)
    progress(f"done in {results['wall_seconds']:.0f}s: {args.out}")
    return 0 if not results["failed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
