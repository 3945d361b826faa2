"""Cyclic garbage hidden in the frozen heap of a steady fleet: how much per account and hour,
and what it is (tgdaemon.gcpolicy freezes the heap; a frozen object that dies in a cycle is
only found by an unfreeze and a full collection).

``python -m bench.gcleak --accounts 500 --heartbeat 1 --window 60 --windows 3``: seeds a fleet
on one localdc process, runs tgdaemon in this process (the loop ``tgdaemon run`` serves on)
with the given heartbeat interval (time compression: the policy's idle freeze interval stays
the daemon's, so a heartbeat's chance to straddle a freeze is the real one), and a traffic
driver in a child process (so that its own garbage is not counted): pushed updates, account
API calls, /metrics and /status scrapes, a status WebSocket and an updates stream, single
accounts' connections dropped, flood waits. After each window it reclaims what the freezes
hid (unfreeze, ``gc.DEBUG_SAVEALL`` collection, attribution, collection, freeze) and prints
one JSON line: objects found, per account and hour of real time (heartbeats scaled to 30 s),
and the most frequent types, frame code locations and coroutines among them.

Diagnosis only (not part of ``make bench``)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import random
import socket
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

REAL_HEARTBEAT = 30.0


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def _where(o: Any) -> str | None:
    """A code location for the objects that name one (frames, coroutines, functions)."""
    import types

    t = type(o)  # not isinstance: a dead weak proxy raises on it
    if t is types.FrameType:
        return f"frame {os.path.basename(o.f_code.co_filename)}:{o.f_code.co_name}"
    if t is types.CoroutineType:
        return f"coro {o.__qualname__}"
    if t is types.FunctionType:
        return f"func {o.__module__}.{o.__qualname__}"
    if t is types.MethodType:
        return f"method {getattr(o.__func__, '__qualname__', '?')}"
    if issubclass(t, BaseException):
        return f"exc {t.__name__}"
    if issubclass(t, asyncio.Task):
        return f"task {getattr(o.get_coro(), '__qualname__', '?')}"
    return None


def reclaim(attribute: bool = True) -> dict[str, Any]:
    """Unfreeze, collect (saving the garbage to look at it), free it, freeze again."""
    frozen = gc.get_freeze_count()
    gc.unfreeze()
    t0 = time.perf_counter()
    if attribute:
        gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        found = gc.collect()
    finally:
        gc.set_debug(0)
    garbage, gc.garbage[:] = list(gc.garbage), []
    kinds = Counter(type(o).__qualname__ for o in garbage)
    where = Counter(w for w in map(_where, garbage) if w is not None)
    size = sum(sys.getsizeof(o) for o in garbage)
    transports = [_transport(o) for o in garbage
                  if isinstance(getattr(o, "_sock", None), socket.socket)
                  and isinstance(o, asyncio.BaseTransport)]
    del garbage
    gc.collect()
    took = time.perf_counter() - t0
    gc.freeze()
    return {"frozen_before": frozen, "found": found, "bytes": size, "seconds": round(took, 3),
            "types": kinds.most_common(25), "where": where.most_common(40),
            "open_transports": transports}


def _transport(t: Any) -> dict[str, Any]:
    """What an unreachable transport whose socket is still open was (its socket is closed
    only when the collector frees it: a file descriptor held meanwhile)."""
    return {"protocol": type(getattr(t, "_protocol", None)).__qualname__,
            "closing": getattr(t, "_closing", None), "conn_lost": getattr(t, "_conn_lost", None),
            "paused": getattr(t, "_paused", None), "port": (t.get_extra_info("sockname")
                                                          or ("", 0))[1],
            "peer_port": (t.get_extra_info("peername") or ("", 0))[1]}


# -- the traffic driver (child process) ---------------------------------------------------


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


async def drive(args: argparse.Namespace) -> None:
    import aiohttp

    rng = random.Random(1)
    spec = _read_json(args.spec)
    users: list[int] = spec["users"]
    names: list[str] = spec["names"]
    daemon, control = spec["daemon_url"], spec["control_url"]
    auth = {"Authorization": f"Bearer {spec['token']}"}
    done: Counter[str] = Counter()
    stop_at = time.monotonic() + args.seconds

    async def every(period: float, what: str, act: Any) -> None:
        while time.monotonic() < stop_at:
            with contextlib.suppress(Exception):
                await act()
                done[what] += 1
            await asyncio.sleep(period * rng.uniform(0.8, 1.2))

    async with aiohttp.ClientSession() as http:
        async def post(url: str, body: dict[str, Any], headers: Any = None) -> None:
            async with http.post(url, json=body, headers=headers) as r:
                await r.read()

        async def get(url: str, headers: Any = None) -> None:
            async with http.get(url, headers=headers) as r:
                await r.read()

        async def push() -> None:
            await post(f"{control}/push", {"user_id": rng.choice(users), "text": "hi"})

        async def api() -> None:
            name = rng.choice(names)
            if rng.random() < 0.5:
                await post(f"{daemon}/v1/accounts/{name}/messages",
                           {"peer": "me", "text": "note"}, auth)
            else:
                await get(f"{daemon}/v1/accounts/{name}/messages?peer=me&limit=5", auth)

        async def drop() -> None:
            await post(f"{control}/drop", {"user_id": rng.choice(users)})

        async def flood() -> None:
            await post(f"{control}/faults", {"kind": "rpc_error", "error": "FLOOD_WAIT_5",
                                             "method": "updates.getState", "times": 1,
                                             "user_id": rng.choice(users)})

        async def ws(path: str, what: str, protocols: tuple[str, ...] = ()) -> None:
            while time.monotonic() < stop_at:
                with contextlib.suppress(Exception):
                    async with http.ws_connect(daemon + path, headers=auth,
                                               protocols=protocols) as sock:
                        async for _msg in sock:
                            done[what] += 1
                            if time.monotonic() >= stop_at:
                                return
                await asyncio.sleep(1)

        async def report() -> None:
            while time.monotonic() < stop_at:
                _write_json(args.counts, done)
                await asyncio.sleep(1)

        rate = args.load
        await asyncio.gather(
            every(1 / (20 * rate), "pushes", push),
            every(1 / (2 * rate), "api_calls", api),
            every(5 / rate, "metrics_scrapes", lambda: get(f"{daemon}/metrics")),
            every(10 / rate, "status_reads", lambda: get(f"{daemon}/status")),
            every(2 / rate, "drops", drop),
            every(10 / rate, "floods", flood),
            ws("/status/ws", "status_pushes", ("tgdaemon.status.v1",)),
            report(),
            ws("/v1/updates", "stream_events"),
        )
    emit("driven", **done)


# -- the measured daemon -------------------------------------------------------------------


async def measure(args: argparse.Namespace, config_path: Path, spec: dict[str, Any],
                  spec_path: Path) -> None:
    from tgdaemon.config import load_config
    from tgdaemon.daemon import Daemon, _tick
    from tgdaemon.logs import setup_logging
    from tgdaemon.notify import Notifier
    from tgdaemon.status import State

    config = load_config(config_path)
    setup_logging("warning", "text")
    daemon = Daemon(config, env={})
    await daemon.start()
    tick = _tick(Notifier({}), config)

    async def check_loop() -> None:
        while True:
            await asyncio.sleep(tick)
            await daemon.check()

    checker = asyncio.create_task(check_loop())
    try:
        await all_connected(daemon, args.accounts)
        emit("start", **reclaim())
        spec["daemon_url"] = f"http://127.0.0.1:{daemon.http.port}"
        _write_json(spec_path, spec)
        counts = spec_path.with_name("counts.json")
        driver = None
        if args.load > 0:
            driver = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bench.gcleak", "drive", "--spec", str(spec_path),
                "--counts", str(counts),
                "--seconds", str(args.window * args.windows), "--load", str(args.load))
        before: Counter[str] = Counter()
        for i in range(args.windows):
            if args.outage_every and i % args.outage_every == args.outage_every - 1:
                await outage(spec["control_url"], daemon, args.accounts)
            await asyncio.sleep(args.window)
            heartbeats = args.accounts * args.window / args.heartbeat
            result = reclaim()
            real_hours = heartbeats * REAL_HEARTBEAT / args.accounts / 3600
            now = Counter(_read_json(counts))
            emit("window", i=i, heartbeats=int(heartbeats), driven=dict(now - before),
                 per_heartbeat=round(result["found"] / heartbeats, 4),
                 per_account_hour=round(result["found"] / args.accounts / real_hours, 1),
                 frozen_per_account=round(gc.get_freeze_count() / args.accounts),
                 connected=daemon.board.counts()[State.CONNECTED], **result)
            before = now
        if driver is not None:
            await driver.wait()
    finally:
        checker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await checker
        await daemon.stop()


async def all_connected(daemon: Any, n: int) -> None:
    """Wait until all ``n`` accounts are connected and the wave's freezes are over."""
    from tgdaemon.status import State

    t0 = time.monotonic()
    while daemon.board.counts()[State.CONNECTED] < n or not daemon.gc.settled:  # noqa: ASYNC110
        await asyncio.sleep(0.2)
    emit("connected", seconds=round(time.monotonic() - t0, 1))
    await asyncio.sleep(2)


async def outage(control: str, daemon: Any, n: int) -> None:
    """Every connection dropped at once (a fleet-wide reconnect wave), then all back."""
    import aiohttp

    from tgdaemon.status import State

    async with aiohttp.ClientSession() as http, http.post(f"{control}/drop", json={}) as r:
        await r.read()
    deadline = time.monotonic() + 10
    while daemon.board.counts()[State.CONNECTED] == n and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    await all_connected(daemon, n)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gcleak", description=__doc__)
    p.add_argument("mode", nargs="?", default="measure", choices=("measure", "drive"))
    p.add_argument("--accounts", type=int, default=300)
    p.add_argument("--heartbeat", type=float, default=1.0)
    p.add_argument("--window", type=float, default=60.0)
    p.add_argument("--windows", type=int, default=3)
    p.add_argument("--load", type=float, default=1.0,
                   help="traffic scale (0: heartbeats only)")
    p.add_argument("--work", type=Path)
    p.add_argument("--spec", type=Path)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--counts", type=Path)
    p.add_argument("--outage-every", type=int, default=0,
                   help="every N windows, a fleet-wide drop at the window's start")
    args = p.parse_args(argv)
    if args.mode == "drive":
        asyncio.run(drive(args))
        return 0

    import secrets

    from bench.procs import LocalDcProcess
    from bench.seed import render_config, seed_dir
    from tgdaemon.eventloop import run as run_daemon_loop

    work = args.work or Path(tempfile.mkdtemp(prefix="gcleak-"))
    work.mkdir(parents=True, exist_ok=True)
    seeded = seed_dir(args.accounts, work, 1)
    dc = LocalDcProcess(seeded.specs[0], work)
    dc.start()
    try:
        token = secrets.token_urlsafe(24)
        token_file = work / "api.token"
        token_file.write_text(token + "\n")
        os.chmod(token_file, 0o600)
        config_path = work / "tgdaemon.toml"
        config_path.write_text(render_config(
            state_dir=seeded.state, key_file=seeded.key_file, rsa_files=seeded.rsa_files,
            procs=seeded.specs, names=seeded.names,
            daemon={"connect_rate": 0.0, "log_level": "warning"},
            policy={"heartbeat_interval": args.heartbeat, "stale_after": 5 * args.heartbeat,
                    "connect_timeout": 10.0, "request_timeout": 10.0}) + "\n".join([
                "", "[api]", "max_rate = 1000", "[[api.clients]]", 'name = "bench"',
                f'token_file = "{token_file}"', 'accounts = ["*"]', 'methods = "all"', ""]))
        spec = {"users": seeded.users[0], "names": seeded.names,
                "control_url": dc.info["control_url"], "token": token}
        run_daemon_loop(measure(args, config_path, spec, work / "drive.json"))
    finally:
        dc.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
