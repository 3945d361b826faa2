"""CPU per connect and per reconnect: connect N stored sessions, then a total outage and back.

Seeds N accounts (no key exchange: bench.seed), starts the localdc process(es), runs the
daemon in this process as ``serve()`` does (its event loop, the supervisor's check tick, log
level info to a file, /metrics on) with ``connect_rate = 0``, and measures this process's CPU
(user + system, every thread) and wall time for four phases: connect all; reconnect (every
connection reset by the localdc processes, which stay up, until all are connected again); the
outage (every localdc SIGKILLed, restarted after ``--outage`` s, until they listen again);
recovery (from then until all are connected again). Reported as one JSON line, CPU also in
microseconds per account.

``--profile DIR``: each phase also runs under cProfile, timed by this thread's CPU clock (the
event loop's; not wall time, which on a machine shared with the localdc processes counts the
time the loop was not running); its stats go to ``DIR/<phase>.prof`` and the top functions, in
microseconds per account, to stderr. The profiler's own overhead roughly doubles the CPU and
weighs most on functions called most: compare CPU between unprofiled runs, read the profile
for where it goes.

    .venv/bin/python bench/connectcpu.py --n 2000 --profile /tmp/prof
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import json
import pstats
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.procs import LocalDcProcess
from bench.seed import render_config, seed_dir
from tgdaemon.config import load_config
from tgdaemon.daemon import Daemon, _tick, raise_open_file_limit
from tgdaemon.eventloop import run as run_daemon_loop
from tgdaemon.logs import setup_logging
from tgdaemon.notify import Notifier
from tgdaemon.status import State

#: How often the connected count is read while waiting for all (the bench's fast sampling).
SAMPLE = 0.05


class Phases:
    """CPU and wall time per phase, optionally each under its own cProfile."""

    def __init__(self, n: int, profile_dir: Path | None) -> None:
        self.n = n
        self.profile_dir = profile_dir
        self.results: dict[str, dict[str, float]] = {}
        self.profiles: dict[str, pstats.Stats] = {}

    @contextlib.asynccontextmanager
    async def phase(self, name: str) -> Any:
        # CPU time of this thread, not wall time: a profile on a machine shared with the localdc
        # processes would otherwise count the time the loop was not running.
        prof = (cProfile.Profile(time.thread_time) if self.profile_dir is not None else None)
        cpu, loop_cpu, wall = time.process_time(), time.thread_time(), time.monotonic()
        if prof is not None:
            prof.enable()
        try:
            yield
        finally:
            if prof is not None:
                prof.disable()
            spent = time.process_time() - cpu
            self.results[name] = {"cpu_s": round(spent, 3),
                                  # the event loop's thread alone (the rest: the store's
                                  # writer, the to_thread calls)
                                  "loop_cpu_s": round(time.thread_time() - loop_cpu, 3),
                                  "wall_s": round(time.monotonic() - wall, 2),
                                  "cpu_us_per_account": round(spent / self.n * 1e6)}
            if prof is not None and self.profile_dir is not None:
                path = self.profile_dir / f"{name}.prof"
                prof.dump_stats(path)
                self.profiles[name] = pstats.Stats(str(path))


async def until_connected(daemon: Daemon, n: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while True:  # sampled, as bench/fleet.py does (no event to wait on for a count)
        up = daemon.board.counts()[State.CONNECTED]
        if up >= n or time.monotonic() > deadline:
            return up
        await asyncio.sleep(SAMPLE)


async def until_reconnected(daemon: Daemon, since: float, n: int, timeout: float) -> int:
    """Accounts connected again after losing their connection at wall time ``since``."""
    deadline = time.monotonic() + timeout
    while True:
        back = sum(1 for s in daemon.board.snapshot()
                   if s.state is State.CONNECTED and s.changed_at > since)
        if back >= n or time.monotonic() > deadline:
            return back
        await asyncio.sleep(SAMPLE)


async def measure(config_path: Path, n: int, dcs: list[LocalDcProcess], outage: float,
                  log_path: Path, phases: Phases, drops: int = 1) -> dict[str, Any]:
    config = load_config(config_path)
    with log_path.open("a") as log_stream:
        setup_logging(config.daemon.log_level, config.daemon.log_format, stream=log_stream)
        daemon = Daemon(config, env={})
        timeout = 120 + n / 20
        ticker: asyncio.Task[None] | None = None

        async def check_loop(tick: float) -> None:
            while True:
                await asyncio.sleep(tick)
                await daemon.check()

        try:
            async with phases.phase("connect"):
                await daemon.start()
                ticker = asyncio.create_task(check_loop(_tick(Notifier({}), config)))
                connected = await until_connected(daemon, n, timeout)
            await asyncio.sleep(2.0)  # settle: the last store writes, the first heartbeats
            for i in range(drops):
                name = "reconnect" if i == 0 else f"reconnect{i + 1}"
                async with phases.phase(name):  # every connection reset, the servers stay up
                    since = time.time()
                    dropped = sum([await asyncio.to_thread(dc.drop) for dc in dcs])
                    reconnected = await until_reconnected(daemon, since, n, timeout)
                await asyncio.sleep(2.0)
            async with phases.phase("outage"):  # until the localdc processes listen again
                for dc in dcs:
                    await asyncio.to_thread(dc.kill)
                await asyncio.sleep(outage)
                await asyncio.gather(*(asyncio.to_thread(dc.start) for dc in dcs))
            async with phases.phase("recovery"):
                recovered = await until_connected(daemon, n, timeout)
        finally:
            if ticker is not None:
                ticker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ticker
            await daemon.stop()
    return {"n": n, "connected": connected, "dropped": dropped, "reconnected": reconnected,
            "recovered": recovered,
            "outage_s": outage, **phases.results}


def top(stats: pstats.Stats, n: int, limit: int, key: str) -> str:
    """The ``limit`` functions with the most ``key`` time ("tottime" or "cumtime"), in
    microseconds per account."""
    rows = []
    entries = stats.stats.items()  # type: ignore[attr-defined]  # pstats' documented table
    for (file, line, func), (_cc, calls, tt, ct, _callers) in entries:
        where = f"{Path(file).name}:{line}({func})"
        rows.append((tt if key == "tottime" else ct, tt, ct, calls, where))
    rows.sort(reverse=True)
    out = io.StringIO()
    out.write(f"{'self us/acct':>12} {'cum us/acct':>12} {'calls/acct':>10}  function\n")
    for _k, tt, ct, calls, where in rows[:limit]:
        out.write(f"{tt / n * 1e6:12.1f} {ct / n * 1e6:12.1f} {calls / n:10.1f}  {where}\n")
    return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--dc-procs", type=int, default=2)
    p.add_argument("--outage", type=float, default=12.0)
    p.add_argument("--drops", type=int, default=1,
                   help="reconnect phases (reconnect, reconnect2, ...), 2 s apart")
    p.add_argument("--heartbeat", type=float, default=30.0)
    p.add_argument("--log-level", default="info")
    p.add_argument("--profile", type=Path, default=None, help="cProfile each phase into DIR")
    p.add_argument("--top", type=int, default=30, help="functions listed per phase")
    p.add_argument("--workdir", type=Path, default=None, help="keep state and logs here")
    args = p.parse_args(argv)
    raise_open_file_limit()
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="connectcpu-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        seeded = seed_dir(args.n, work, args.dc_procs)
        config = work / "tgdaemon.toml"
        config.write_text(render_config(
            state_dir=seeded.state, key_file=seeded.key_file, rsa_files=seeded.rsa_files,
            procs=seeded.specs, names=seeded.names,
            daemon={"log_level": args.log_level, "connect_rate": 0.0},
            policy={"heartbeat_interval": args.heartbeat, "failover_after": 1_000_000}))
        dcs = [LocalDcProcess(spec, work) for spec in seeded.specs]
        phases = Phases(args.n, args.profile)
        try:
            for dc in dcs:
                dc.start()
            result = run_daemon_loop(measure(config, args.n, dcs, args.outage,
                                             work / "daemon.log", phases, args.drops))
        finally:
            for dc in dcs:
                dc.stop()
        for name, stats in phases.profiles.items():
            for key in ("tottime", "cumtime"):
                print(f"== {name}: top {args.top} by {key} ==", file=sys.stderr)
                print(top(stats, args.n, args.top, key), file=sys.stderr)
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
