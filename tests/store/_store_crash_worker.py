"""Child process for the crash tests: writes sessions (or rotates) until SIGKILLed.

Usage: _store_crash_worker.py write STATE_DIR KEY_FILE N_ACCOUNTS [POSTGRESQL_URL]
       _store_crash_worker.py rotate STATE_DIR KEY_FILE
       _store_crash_worker.py online STATE_DIR KEY_FILE BATCH [POSTGRESQL_URL]

``write`` prints ``ok NAME SEQ`` only after the store reported the write durable, so the
parent knows exactly which writes must survive the kill; with a URL the session records go to
that PostgreSQL database, the way a fleet's daemon writes them (storehelpers.LeaseRoute).
``online`` re-encrypts in small batches until nothing is left (or it is SIGKILLed); with a URL,
a fleet's shared records (tests/keyrotation/test_pg_rotation_crash.py).
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
from pathlib import Path

from storehelpers import SessionBackend

from tgdaemon.cluster_cli import FleetRecords
from tgdaemon.crypto import load_keyring
from tgdaemon.leasestore import PgLeaseStore
from tgdaemon.store import DeviceInfo, SessionData, Store


async def write(state_dir: Path, key_file: Path, n: int, url: str) -> None:
    async with SessionBackend(state_dir, url).open(
            load_keyring(key_file=key_file, env={})) as store:
        await write_forever(store, n)


async def write_forever(store: Store, n: int) -> None:
    names = [f"acct{i:03d}" for i in range(n)]
    existing = {a.name for a in await store.list_accounts()}
    for name in names:
        if name not in existing:
            await store.ensure_account(name, DeviceInfo("crash", "test", "1"))
    loaded = await store.load_sessions()
    seq = 1 + max((d.pts or 0 for d in loaded.values() if isinstance(d, SessionData)), default=0)
    rng = random.Random()
    out = sys.stdout
    while True:
        batch = rng.sample(names, rng.randint(1, n))
        futs = []
        for name in batch:
            data = SessionData(2, "149.154.167.51", 443, os.urandom(256), user_id=seq, pts=seq)
            futs.append((name, seq, store.submit_session(name, data)))
            seq += 1
        if rng.random() < 0.2:
            await store.update_account(batch[0], last_used=float(seq), status="active")
        await asyncio.gather(*(f for _, _, f in futs))
        out.write("".join(f"ok {name} {s}\n" for name, s, _ in futs))
        out.flush()


async def rotate(state_dir: Path, key_file: Path) -> None:
    ring = load_keyring(key_file=key_file, env={})
    store = await Store.open(state_dir, ring)
    print("ready", flush=True)
    count = await store.rotate(ring)
    print(f"done {count}", flush=True)
    await store.close()


async def online(state_dir: Path, key_file: Path, batch: int, url: str) -> None:
    """What the daemon's key rotation does (tgdaemon.keyrotation): small batches, each one
    durable transaction, until no record is left under an older key.  With a ``url``, a fleet
    instance's re-encryption: the store routed to the shared records in that PostgreSQL
    database, as in a daemon of the fleet."""
    leases = await PgLeaseStore.open(url) if url else None
    store = await Store.open(state_dir, load_keyring(key_file=key_file, env={}),
                             lock=leases is None)
    if leases is not None:
        store.route_sessions(FleetRecords(leases))
    while True:
        _done, left = await store.reencrypt_some(batch)
        print(f"batch {left}", flush=True)
        if left == 0:
            break
    print("done", flush=True)
    await store.close()
    if leases is not None:
        await leases.close()


def main() -> None:
    mode, state_dir, key_file = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    url = sys.argv[5] if len(sys.argv) > 5 else ""
    if mode == "write":
        asyncio.run(write(state_dir, key_file, int(sys.argv[4]), url))
    elif mode == "online":
        asyncio.run(online(state_dir, key_file, int(sys.argv[4]), url))
    else:
        asyncio.run(rotate(state_dir, key_file))


if __name__ == "__main__":
    main()
