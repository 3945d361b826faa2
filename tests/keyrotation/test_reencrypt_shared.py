"""The shared store's re-encryption batch (LeaseStore.reencrypt) on both backends: daemons
re-encrypting at once never rewrite the same record twice, records under other keys and
accounts to skip are left alone, and the count of what is left is exact."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tgdaemon.crypto import KeyRing, generate_keyring, record_key_id
from tgdaemon.leasestore import LeaseStore, PgLeaseStore, SqliteLeaseStore
from tgdaemon.store import DB_NAME, SESSION_PURPOSE, Store

N = 120


@pytest.fixture(params=["sqlite", "postgresql"])
async def two_stores(request: pytest.FixtureRequest, state_dir: Path,
                     keyring: KeyRing) -> AsyncIterator[tuple[LeaseStore, LeaseStore]]:
    """Two connections to one shared store, as two daemons have."""
    stores: list[LeaseStore] = []
    if request.param == "sqlite":
        async with await Store.open(state_dir, keyring, lock=False):
            pass  # creates and migrates the database the lease stores share
        for _ in range(2):
            stores.append(await SqliteLeaseStore.open(state_dir / DB_NAME))
    else:
        url = request.getfixturevalue("pg_url")
        for _ in range(2):
            stores.append(await PgLeaseStore.open(url))
    try:
        yield stores[0], stores[1]
    finally:
        for s in stores:
            await s.close()


async def _seed(leases: LeaseStore, state_dir: Path, ring: KeyRing,
                records: dict[str, bytes]) -> None:
    await leases.sync_accounts(dict.fromkeys(records, False))
    if isinstance(leases, PgLeaseStore):
        assert await leases.seed_sessions(records) == len(records)
        return
    import sqlite3

    db = sqlite3.connect(state_dir / DB_NAME)
    with db:
        db.executemany("INSERT INTO sessions VALUES (?, ?, 0)", records.items())
    db.close()


async def test_concurrent_batches_rewrite_each_record_once(
        two_stores: tuple[LeaseStore, LeaseStore], state_dir: Path, keyring: KeyRing) -> None:
    old = keyring
    new = old.with_new_active()
    stranger = generate_keyring()  # a key no ring here holds: never touched
    records = {f"a{i:03d}": old.encrypt(b"plain %d" % i, account=f"a{i:03d}",
                                        purpose=SESSION_PURPOSE) for i in range(N)}
    records["zz-foreign"] = stranger.encrypt(b"x", account="zz-foreign", purpose=SESSION_PURPOSE)
    first, second = two_stores
    await _seed(first, state_dir, old, records)

    seen: Counter[str] = Counter()
    lock = threading.Lock()

    def convert(rows: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
        with lock:
            seen.update(name for name, _r in rows)
        time.sleep(0.05)  # hold the batch open: the other daemon's batch runs meanwhile
        return [(name, new.encrypt(new.decrypt(r, account=name, purpose=SESSION_PURPOSE),
                                   account=name, purpose=SESSION_PURPOSE)) for name, r in rows]

    skip = ["a000"]
    olds = [old.active.key_id]

    async def drain(leases: LeaseStore) -> list[int]:
        lefts = []
        while True:
            _done, left = await leases.reencrypt(olds, 7, skip, convert)
            lefts.append(left)
            if left == 0:
                return lefts

    one, two = await asyncio.gather(drain(first), drain(second))
    assert max(seen.values()) == 1, "a record was re-encrypted twice"
    assert set(seen) == set(records) - {"a000", "zz-foreign"}
    if isinstance(first, PgLeaseStore):  # SKIP LOCKED: both share the work
        assert len(one) > 1
        assert len(two) > 1
    stored = await first.read_sessions()
    assert {n: record_key_id(r) for n, r in stored.items()} == {
        **{n: new.active.key_id for n in records}, "a000": old.active.key_id,
        "zz-foreign": stranger.active.key_id}
    for n, r in stored.items():
        if n != "zz-foreign":
            assert new.decrypt(r, account=n, purpose=SESSION_PURPOSE) == old.decrypt(
                records[n], account=n, purpose=SESSION_PURPOSE)
    # what is left is counted, skipped accounts excepted
    assert await first.reencrypt(olds, 10, [], convert) == (1, 0)
