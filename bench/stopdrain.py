"""How long a stop of N connected accounts takes, and how many client closes time out in it.

Seeds N accounts (no key exchange: bench.seed), starts the localdc process(es), runs the
daemon in this process with the connect rate unlimited until every account is connected, then
stops it as SIGTERM does (``Daemon.stop``) and reports, as one JSON line: the seconds the stop
took, the documented bound it has (``drain_timeout``), the closes that outlasted the close
timeout (the ``close_timeout`` log kind), the clients dropped while still connected (no close
slot in time, or their close timed out: their connections aborted), and whether the drain
reported stragglers.

    .venv/bin/python bench/stopdrain.py --n 3000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.procs import LocalDcProcess
from bench.seed import render_config, seed_dir
from tgdaemon.config import load_config
from tgdaemon.daemon import Daemon, raise_open_file_limit
from tgdaemon.logs import setup_logging
from tgdaemon.logvolume import COUNTS, Noise
from tgdaemon.status import State


class _Lines(logging.Handler):
    """Counts WARNING-or-worse lines containing given phrases."""

    def __init__(self, *phrases: str) -> None:
        super().__init__(logging.WARNING)
        self.seen = dict.fromkeys(phrases, 0)

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        for phrase in self.seen:
            if phrase in message:
                self.seen[phrase] += 1


async def measure(config_path: Path, n: int, settle: float) -> dict[str, object]:
    config = load_config(config_path)
    setup_logging("warning", config.daemon.log_format)
    lines = _Lines("did not stop within", "ignore cancellation", "could not be flushed")
    logging.getLogger().addHandler(lines)
    daemon = Daemon(config, env={})
    started = time.monotonic()
    await daemon.start()
    # Every account connected, or (a loaded machine) as many as there are by the deadline.
    deadline = started + 120 + n / 20
    while True:
        up = daemon.board.counts()[State.CONNECTED]
        if up >= n or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    connected = time.monotonic() - started
    await asyncio.sleep(settle)
    before = COUNTS[Noise.CLOSE_TIMEOUT]
    phases: dict[str, float] = {}
    assert daemon.supervisor is not None
    _timed(daemon.supervisor, "stop", "workers_s", phases)
    reaper = daemon.supervisor.deps.reaper
    t0 = time.monotonic()
    await daemon.stop()
    took = time.monotonic() - t0
    return {"n": n, "connected": up, "connect_s": round(connected, 1),
            "stop_s": round(took, 2), **phases,
            "drain_timeout_s": config.daemon.drain_timeout,
            "close_timeouts": COUNTS[Noise.CLOSE_TIMEOUT] - before,
            "dropped_connected": reaper.aborted, **lines.seen}


def _timed(obj: object, method: str, label: str, into: dict[str, float]) -> None:
    """Record how long ``obj.method`` (a coroutine method) takes, under ``label``."""
    original = getattr(obj, method)

    async def timed(*args: object, **kwargs: object) -> object:
        t0 = time.monotonic()
        try:
            return await original(*args, **kwargs)
        finally:
            into[label] = round(time.monotonic() - t0, 2)

    setattr(obj, method, timed)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--dc-procs", type=int, default=1)
    p.add_argument("--settle", type=float, default=5.0, help="seconds connected before the stop")
    p.add_argument("--heartbeat", type=float, default=30.0)
    args = p.parse_args(argv)
    raise_open_file_limit()
    with tempfile.TemporaryDirectory(prefix="stopdrain-") as tmp:
        work = Path(tmp)
        seeded = seed_dir(args.n, work, args.dc_procs)
        config = work / "tgdaemon.toml"
        config.write_text(render_config(
            state_dir=seeded.state, key_file=seeded.key_file, rsa_files=seeded.rsa_files,
            procs=seeded.specs, names=seeded.names,
            daemon={"log_level": "warning", "connect_rate": 0.0, "http_listen": ""},
            policy={"heartbeat_interval": args.heartbeat, "failover_after": 1_000_000}))
        dcs = [LocalDcProcess(spec, work) for spec in seeded.specs]
        try:
            for dc in dcs:
                dc.start()
            print(json.dumps(asyncio.run(measure(config, args.n, args.settle))), flush=True)
        finally:
            for dc in dcs:
                dc.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
