"""Child process for tests/store/test_shared_write_lock.py: one daemon's use of a state
database that several daemons of a fleet share.

Usage: _write_lock_worker.py writer STATE_DIR KEY_FILE ACCOUNTS CYCLES LAG
       _write_lock_worker.py renewer STATE_DIR INSTANCE ACCOUNTS INTERVAL

Both print ``ready`` once their leases are claimed and start on a ``go`` line on stdin.

``writer`` is a daemon with many accounts and a lagging event loop (each loop turn blocked for
LAG seconds of computing, as 10,000 accounts do): CYCLES rounds of a metadata update and a
session write for every account, through the store's writer (session records fenced in the
lease store, as a fleet routes them); then it prints its write-lock times as JSON and exits.

``renewer`` renews its leases every INTERVAL seconds until a ``stop`` line (or EOF), then
prints how long each renewal took, how many failed and how many came back short, as JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from pathlib import Path

from storehelpers import LEASE_TTL, LeaseRoute, make_session

from tgdaemon.crypto import load_keyring
from tgdaemon.exceptions import StoreError
from tgdaemon.leasestore import SqliteLeaseStore
from tgdaemon.store import DB_NAME, Store


def names(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i:05d}" for i in range(n)]


async def line() -> str:
    return (await asyncio.to_thread(sys.stdin.readline)).strip()


class LaggingLoop:
    """A load generator, not a wait: every turn of the loop is busy for ``lag`` seconds,
    computing (holding the GIL, as 10,000 accounts' callbacks do), not sleeping."""

    def __init__(self, lag: float) -> None:
        self.lag = lag
        self.handle = asyncio.get_running_loop().call_soon(self._block)

    def _block(self) -> None:
        until = time.monotonic() + self.lag
        while time.monotonic() < until:
            pass
        self.handle = asyncio.get_running_loop().call_soon(self._block)

    def stop(self) -> None:
        self.handle.cancel()


async def writer(state_dir: Path, key_file: Path, n: int, cycles: int, lag: float) -> None:
    store = await Store.open(state_dir, load_keyring(key_file=key_file, env={}),
                             lock_name="tgdaemon.writer.lock")
    shared = {"lock_stats": store.lock_stats} if hasattr(store, "lock_stats") else {}
    leases = await SqliteLeaseStore.open(state_dir / DB_NAME, **shared)
    route = LeaseRoute(leases, "writer")
    accounts = names("w", n)
    await store.ensure_accounts(dict.fromkeys(accounts))
    await route.own(accounts)
    store.route_sessions(route)
    print("ready", flush=True)
    assert await line() == "go"
    lagger = LaggingLoop(lag)
    started = time.monotonic()
    failures = 0
    for cycle in range(cycles):
        futures = []
        for name in accounts:
            futures.append(store.submit_account(name, last_used=time.time(), status="ok"))
            futures.append(store.submit_session(name, make_session(cycle)))
        done = await asyncio.gather(*futures, return_exceptions=True)
        failures += sum(isinstance(r, BaseException) for r in done)
    seconds = time.monotonic() - started
    lagger.stop()
    stats = getattr(store, "lock_stats", None)
    times = {} if stats is None else {
        k.value: {"count": t.count, "hold_max": t.hold_max, "wait_max": t.wait_max}
        for k, t in stats.snapshot().items() if t.count}
    await store.close()
    await leases.close()
    print(json.dumps({"seconds": seconds, "failures": failures, "lock": times}), flush=True)


async def renewer(state_dir: Path, instance: str, n: int, interval: float) -> None:
    leases = await SqliteLeaseStore.open(state_dir / DB_NAME)
    await leases.sync_accounts(dict.fromkeys(names(instance, n), True))
    await leases.register(instance, n)
    held = await leases.claim(instance, n, LEASE_TTL)
    assert len(held) == n, held
    print("ready", flush=True)
    assert await line() == "go"
    stop = asyncio.Event()
    stopper = asyncio.create_task(line())
    stopper.add_done_callback(lambda _t: stop.set())
    latencies: list[float] = []
    failed = short = 0
    while not stop.is_set():
        started = time.monotonic()
        try:
            renewed = await leases.renew(instance, LEASE_TTL)
        except StoreError:
            failed += 1
        else:
            short += renewed != held
        latencies.append(time.monotonic() - started)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)  # the renewal period
    await leases.close()
    print(json.dumps({"renewals": len(latencies), "max": max(latencies), "failed": failed,
                      "short": short}), flush=True)


def main() -> None:
    mode, state_dir, *rest = sys.argv[1:]
    if mode == "writer":
        key_file, n, cycles, lag = rest
        asyncio.run(writer(Path(state_dir), Path(key_file), int(n), int(cycles), float(lag)))
    else:
        instance, n, interval = rest
        asyncio.run(renewer(Path(state_dir), instance, int(n), float(interval)))


if __name__ == "__main__":
    main()
