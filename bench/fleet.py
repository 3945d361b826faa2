"""One measured fleet process: tgdaemon, or the plain-Telethon baseline, on the same sessions.

Run by ``bench/run.py`` (``python -m bench.fleet daemon|baseline ...``), one process each, so
resident memory and CPU time read from /proc belong to that fleet alone. The process reports
on stdout as JSON lines (``base`` once imported, ``http``, ``all_connected``, ``count`` on
every change), samples how many accounts are connected and counts TCP connect attempts per
wall-clock second (a wrapper around Telethon's ``Connection.connect``, the same in both
fleets), and writes that timeline to ``--timeline`` when SIGTERM stops it.

``--injected-lag S``: each SIGUSR2 blocks the event loop for S seconds (a stand-in for the
loop lag of a busy process, e.g. a takeover wave at 13,000 accounts; bench/cluster.py
``--lag``). Worker threads (the store's) go on meanwhile, as they would under a real lag.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import signal
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench.procfs import rss_kb

log = logging.getLogger("tgdaemon.bench.fleet")

#: Sampling period while accounts are still connecting (the connect time is read from it).
FAST_SAMPLE = 0.05


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


class AttemptProbe:
    """Counts Telethon TCP connection attempts per second (connects and reconnects alike)."""

    def __init__(self) -> None:
        self.per_second: Counter[int] = Counter()

    def install(self) -> None:
        from telethon.network.connection.connection import Connection

        original = Connection.connect
        per_second = self.per_second

        async def counting_connect(conn: Any, *args: Any, **kwargs: Any) -> Any:
            per_second[int(time.time())] += 1
            return await original(conn, *args, **kwargs)

        Connection.connect = counting_connect  # type: ignore[method-assign]


class GcProbe:
    """Every garbage collection's pause (``gc.callbacks``): (wall clock at start, seconds,
    generation, objects collected, CPU seconds: what the pause costs on an idle machine)."""

    def __init__(self, census: bool = False) -> None:
        self.pauses: list[tuple[float, float, int, int, float]] = []
        self._started = 0.0
        self._cpu = 0.0
        #: ``census``: before each full collection, (wall clock, objects it walks, the most
        #: frequent types among them when many); costs a walk of its own (diagnosis only).
        self._census = census
        self.census: list[tuple[float, int, list[tuple[str, int]]]] = []

    def install(self) -> None:
        import gc

        gc.callbacks.append(self._callback)

    @property
    def full(self) -> list[tuple[float, float]]:
        """(wall clock, seconds) of the full (generation 2) collections."""
        return [(p[0], p[1]) for p in self.pauses if p[2] == 2]

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start" and self._census and info.get("generation") == 2:
            import gc
            from collections import Counter

            objs = gc.get_objects(2)
            kinds = Counter(type(o).__qualname__ for o in objs).most_common(12) \
                if len(objs) > 50_000 and len(self.census) < 40 else []
            self.census.append((time.time(), len(objs), kinds))
            del objs
        if phase == "start":
            self._started = time.perf_counter()
            self._cpu = time.thread_time()
        else:
            self.pauses.append((time.time(), time.perf_counter() - self._started,
                                info.get("generation", -1), info.get("collected", 0),
                                time.thread_time() - self._cpu))


class PassProbe:
    """Loop passes (one ``_run_once``: the ready callbacks run back to back) whose callbacks
    took longer than :data:`SLOW_PASS` (the select wait excluded): (wall clock, seconds,
    callbacks run, the most frequent task-name prefixes among them, CPU seconds). Opt-in
    (``TGDAEMON_BENCH_PASSES=1``): it wraps private methods of asyncio's loop, for finding
    what a lag is made of."""

    SLOW_PASS = 0.02
    #: A single callback running this long has its stack sampled (by a thread, mid-callback):
    #: where a long pass spends its time, which the callbacks' kinds do not tell.
    SLOW_CALLBACK = 0.1
    MAX_STACKS = 40

    def __init__(self) -> None:
        self.slow: list[tuple[float, float, int, list[tuple[str, int]]]] = []
        #: (wall clock, seconds into the callback, its innermost frames) per slow callback.
        self.stacks: list[tuple[float, float, list[str]]] = []
        self._running = [0.0]  # perf_counter at the current callback's start; 0: none

    def install(self) -> None:
        base = asyncio.base_events.BaseEventLoop
        original = base._run_once  # type: ignore[attr-defined]
        handle_run = asyncio.events.Handle._run
        slow = self.slow
        ran: list[Any] = []
        running = self._running

        span = [0.0, 0.0, 0.0, 0.0]

        def counting_run(handle: Any) -> None:
            if not ran:
                span[0] = time.perf_counter()
                span[2] = time.thread_time()
            ran.append(handle)
            running[0] = time.perf_counter()
            handle_run(handle)
            running[0] = 0.0
            span[1] = time.perf_counter()
            span[3] = time.thread_time()

        threading.Thread(target=self._sample, args=(threading.get_ident(),), daemon=True,
                         name="bench-stack-sampler").start()

        def run_once(loop: Any) -> None:
            ran.clear()
            original(loop)
            took = span[1] - span[0] if ran else 0.0
            if took >= PassProbe.SLOW_PASS:
                kinds: Counter[str] = Counter()
                for handle in ran:
                    cb = getattr(handle, "_callback", None)
                    owner = getattr(cb, "__self__", None)
                    if isinstance(owner, asyncio.Task):
                        kinds["task:" + owner.get_name().split(":")[0]] += 1
                    else:
                        kinds[getattr(cb, "__qualname__", repr(cb))[:60]] += 1
                slow.append((time.time(), took, len(ran), kinds.most_common(4),
                             span[3] - span[2]))
            ran.clear()

        asyncio.events.Handle._run = counting_run  # type: ignore[method-assign]
        base._run_once = run_once  # type: ignore[attr-defined]

    def _sample(self, loop_thread: int) -> None:
        sampled = 0.0
        while len(self.stacks) < self.MAX_STACKS:
            time.sleep(0.02)
            began = self._running[0]
            if not began or began == sampled:
                continue
            into = time.perf_counter() - began
            frame = sys._current_frames().get(loop_thread)
            if into < self.SLOW_CALLBACK or frame is None or self._running[0] != began:
                continue
            sampled = began
            stack = [f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno} {f.name}"
                     for f in traceback.extract_stack(frame)[-14:]]
            self.stacks.append((time.time(), into, stack))


class LagProbe:
    """Event-loop lag of the fleet's process, the same probe for both fleets
    (``tgdaemon.looplag``): (wall clock, seconds late) of every wake-up >= 5 ms late."""

    def __init__(self) -> None:
        from tgdaemon.looplag import LoopLag

        self.late: list[tuple[float, float]] = []
        probe = self

        class _Recording(LoopLag):
            def observe(self, lag: float, now: float) -> None:
                super().observe(lag, now)
                if lag >= 0.005:
                    probe.late.append((time.time(), lag))

        self._lag = _Recording()

    def start(self) -> None:
        self._lag.start()

    async def stop(self) -> None:
        await self._lag.stop()


class Fleet:
    """What the sampling loop needs from either kind of fleet."""

    size: int

    async def start(self) -> None:
        raise NotImplementedError

    def connected(self) -> int:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError


class DaemonFleet(Fleet):
    """tgdaemon in-process, as ``serve()`` runs it: Daemon plus the supervisor's check tick."""

    def __init__(self, config_path: Path) -> None:
        from tgdaemon.config import load_config
        from tgdaemon.daemon import Daemon, raise_open_file_limit
        from tgdaemon.logs import setup_logging

        self.config = load_config(config_path)
        setup_logging(self.config.daemon.log_level, self.config.daemon.log_format)
        raise_open_file_limit()
        self.size = len(self.config.enabled_accounts)
        self.daemon = Daemon(self.config, env={})
        self._ticker: asyncio.Task[None] | None = None

    async def start(self) -> None:
        from tgdaemon.daemon import _tick
        from tgdaemon.notify import Notifier

        await self.daemon.start()
        emit("http", port=self.daemon.http.port)
        self._ticker = asyncio.create_task(self._check_loop(_tick(Notifier({}), self.config)))

    async def _check_loop(self, tick: float) -> None:
        while True:
            await asyncio.sleep(tick)
            await self.daemon.check()

    def connected(self) -> int:
        from tgdaemon.status import State

        return self.daemon.board.counts()[State.CONNECTED]

    async def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        await self.daemon.stop()


class BaselineFleet(Fleet):
    """N stock ``TelegramClient`` objects with default settings, plus what a script would add:
    one request per account every heartbeat interval (updates.getState, as tgdaemon sends)."""

    def __init__(self, state_dir: Path, key_file: Path, rsa_files: list[Path],
                 heartbeat: float, log_level: str) -> None:
        import resource

        from telethon import TelegramClient
        from telethon.crypto import rsa

        logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        for path in rsa_files:
            rsa.add_key(path.read_text(), old=False)
        self._client_cls = TelegramClient
        self._state_dir = state_dir
        self._key_file = key_file
        self._heartbeat = heartbeat
        self._clients: list[Any] = []
        #: Clients whose connect() returned (InitConnection answered): "connected"
        #: means the same as for tgdaemon, a session that has answered a request.
        self._up: list[Any] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._rng = random.Random()
        self.size = 0

    async def load(self) -> None:
        import datetime

        from telethon import types
        from telethon.crypto import AuthKey
        from telethon.sessions import MemorySession

        from tgdaemon.crypto import load_keyring
        from tgdaemon.store import SessionData, Store

        store = await Store.open(self._state_dir, load_keyring(key_file=self._key_file, env={}),
                                 lock=False)
        try:
            sessions = await store.load_sessions()
        finally:
            await store.close()
        for data in sessions.values():
            assert isinstance(data, SessionData)
            assert data.auth_key is not None
            session = MemorySession()
            session.set_dc(data.dc_id, data.server_address, data.port)
            session.auth_key = AuthKey(data.auth_key)
            if data.pts is not None:  # the update state the session was stored with
                session.set_update_state(0, types.updates.State(
                    pts=data.pts, qts=data.qts or 0, seq=data.seq or 0, unread_count=0,
                    date=datetime.datetime.fromtimestamp(data.date or 0, tz=datetime.UTC)))
            self._clients.append(self._client_cls(session, 1, "0123456789abcdef" * 2))
        self.size = len(self._clients)

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._run(c)) for c in self._clients]

    async def _run(self, client: Any) -> None:
        from telethon import functions

        try:
            await client.connect()
        except Exception as exc:
            log.warning("baseline client did not connect: %s", type(exc).__name__)
            return
        self._up.append(client)
        while True:
            await asyncio.sleep(self._heartbeat * self._rng.uniform(0.9, 1.1))
            with contextlib.suppress(Exception):
                await client(functions.updates.GetStateRequest())

    def connected(self) -> int:
        return sum(1 for c in self._up if c._sender._transport_connected())

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.wait_for(
            asyncio.gather(*(c.disconnect() for c in self._clients), return_exceptions=True), 30)


async def sample(fleet: Fleet, stop: asyncio.Event, interval: float,
                 clock: Callable[[], float] = time.time,
                 share: bool = False) -> list[tuple[float, int]]:
    """Connected-count samples until ``stop``; emits ``all_connected`` the first time all are.
    ``share``: a fleet instance, whose share of the accounts is not known in advance: sampled
    every ``interval`` from the start, never "all connected" (bench/cluster.py)."""
    samples: list[tuple[float, int]] = []
    started = time.monotonic()
    reported = share
    last = -1
    while not stop.is_set():
        count = fleet.connected()
        samples.append((clock(), count))
        if count != last:  # lets the orchestrator follow recovery live
            emit("count", n=count, at=clock())
            last = count
        if not reported and count >= fleet.size:
            reported = True
            emit("all_connected", seconds=time.monotonic() - started, n=count)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval if reported else FAST_SAMPLE)
    return samples


async def run(args: argparse.Namespace) -> int:
    probe = AttemptProbe()
    probe.install()
    diagnose = os.environ.get("TGDAEMON_BENCH_PASSES") == "1"
    gc_probe = GcProbe(census=diagnose)
    gc_probe.install()
    pass_probe = PassProbe()
    if diagnose:
        pass_probe.install()
    fleet: Fleet
    if args.mode == "daemon":
        import tgdaemon.http  # noqa: F401  (imported before the base mark, like the rest)

        fleet = DaemonFleet(args.config)
        base_rss = rss_kb(os.getpid())
    else:
        baseline = BaselineFleet(args.state_dir, args.key_file, args.rsa_file, args.heartbeat,
                                 args.log_level)
        # Before the N clients exist: they are the per-account cost being measured.
        base_rss = rss_kb(os.getpid())
        await baseline.load()
        fleet = baseline
    lag_probe = LagProbe()
    lag_probe.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    if args.injected_lag > 0:
        lag = args.injected_lag
        # Blocking the loop is the point: a stand-in for a loop lag.
        loop.add_signal_handler(signal.SIGUSR2, lambda: time.sleep(lag))
    emit("base", rss_kb=base_rss, n=fleet.size)
    sampler: Awaitable[list[tuple[float, int]]] = asyncio.create_task(
        sample(fleet, stop, args.sample_interval, share=args.fleet_instance))
    await fleet.start()
    samples = await sampler
    await fleet.stop()
    await lag_probe.stop()
    # What the daemon's freezes kept from the collector and died meanwhile (stop unfreezes),
    # and what the stop itself left in cycles; by type, to attribute it (bench/gcleak.py
    # measures the frozen garbage of a running fleet, without a stop).
    import gc

    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        garbage = gc.collect()
    finally:
        gc.set_debug(0)
    garbage_types = Counter(type(o).__qualname__ for o in gc.garbage).most_common(15)
    gc.garbage.clear()
    args.timeline.write_text(json.dumps({
        "loop_lag": lag_probe.late,
        "n": fleet.size,
        "samples": samples,
        "attempts": sorted(probe.per_second.items()),
        "gc_full": gc_probe.full,
        "gc_pauses": gc_probe.pauses,
        "slow_passes": pass_probe.slow,
        "slow_callback_stacks": pass_probe.stacks,
        "gc_census": gc_probe.census,
        "garbage_at_stop": garbage,
        "garbage_at_stop_types": garbage_types,
    }))
    emit("stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fleet", description=__doc__)
    p.add_argument("mode", choices=("daemon", "baseline"))
    p.add_argument("--config", type=Path, help="daemon: tgdaemon config file")
    p.add_argument("--state-dir", type=Path, help="baseline: tgdaemon state dir to read")
    p.add_argument("--key-file", type=Path, help="baseline: master key file")
    p.add_argument("--rsa-file", type=Path, action="append", default=[])
    p.add_argument("--heartbeat", type=float, default=30.0)
    p.add_argument("--log-level", default="info")
    p.add_argument("--sample-interval", type=float, default=1.0)
    p.add_argument("--timeline", type=Path, required=True)
    p.add_argument("--injected-lag", type=float, default=0.0,
                   help="each SIGUSR2 blocks the event loop for this many seconds")
    p.add_argument("--fleet-instance", action="store_true",
                   help="daemon: one instance of a fleet ($TGDAEMON_INSTANCE): holds a share")
    args = p.parse_args(argv)
    if args.mode == "daemon":  # the loop `tgdaemon run` serves on
        from tgdaemon.eventloop import run as run_daemon_loop

        return run_daemon_loop(run(args))
    return asyncio.run(run(args))


if __name__ == "__main__":
    raise SystemExit(main())
