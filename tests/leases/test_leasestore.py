"""The lease store contract, run against both backends: SQLite and a real PostgreSQL."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import WaitUntil
from tgdaemon.crypto import KeyRing
from tgdaemon.exceptions import StoreError
from tgdaemon.leasestore import NO_EPOCH, FleetCounts, LeaseStore, PgLeaseStore, SqliteLeaseStore
from tgdaemon.store import DB_NAME, Store

TTL = 30.0


@pytest.fixture(params=["sqlite", "postgresql"])
async def leases(request: pytest.FixtureRequest, state_dir: Path,
                 keyring: KeyRing) -> AsyncIterator[LeaseStore]:
    store: LeaseStore
    if request.param == "sqlite":
        async with await Store.open(state_dir, keyring, lock=False):
            pass  # creates and migrates the database the lease store shares
        store = await SqliteLeaseStore.open(state_dir / DB_NAME)
    else:
        store = await PgLeaseStore.open(request.getfixturevalue("pg_url"))
    try:
        yield store
    finally:
        await store.close()


async def test_sync_adds_missing_accounts_once(leases: LeaseStore) -> None:
    assert await leases.sync_accounts(dict.fromkeys(["a", "b", "c"], True)) == 3
    assert await leases.sync_accounts({"b": False, "c": True, "d": False}) == 1
    fleet = await leases.fleet()
    assert [(f.name, f.enabled, f.owner) for f in fleet] == [
        ("a", True, None), ("b", True, None), ("c", True, None), ("d", False, None)]


async def test_claims_never_overlap_and_renew_keeps_them(leases: LeaseStore) -> None:
    await leases.sync_accounts(dict.fromkeys([f"a{i}" for i in range(10)], True))
    await leases.register("one", 100)
    await leases.register("two", 100)
    first = await leases.claim("one", 6, TTL)
    second = await leases.claim("two", 6, TTL)
    assert len(first) == 6
    assert len(second) == 4  # only what is left
    assert not set(first) & set(second)
    assert all(e == 1 for e in (*first.values(), *second.values()))
    assert await leases.claim("two", 5, TTL) == {}
    assert await leases.renew("one", TTL) == first
    counts = await leases.counts(TTL)
    assert counts == FleetCounts(accounts=10, live_instances=2, claimable=0, lost_instances=0)
    owned = {i.id: i.owned for i in await leases.instances()}
    assert owned == {"one": 6, "two": 4}


async def test_expired_lease_is_claimed_with_a_new_epoch_and_old_owner_fenced(
        leases: LeaseStore, wait_until: WaitUntil) -> None:
    await leases.sync_accounts(dict.fromkeys(["a"], True))
    await leases.register("old", 10)
    await leases.register("new", 10)
    assert await leases.claim("old", 1, 0.3) == {"a": 1}
    assert await leases.write_sessions("old", {"a": (1, b"v1")}) == set()
    assert await leases.claim("new", 1, TTL) == {}  # still valid: not claimable

    got: dict[str, int] = {}

    async def claimed() -> bool:
        got.update(await leases.claim("new", 1, TTL))
        return bool(got)

    await wait_until(claimed, timeout=10, message="expired lease claimable")
    assert got == {"a": 2}
    # the old owner neither renews it nor writes over the new owner's session
    assert await leases.renew("old", TTL) == {}
    assert await leases.write_sessions("new", {"a": (2, b"v2")}) == set()
    assert await leases.write_sessions("old", {"a": (1, b"stale")}) == {"a"}
    assert await leases.read_sessions(["a"]) == {"a": b"v2"}


async def test_write_needs_the_current_epoch_and_ownership(leases: LeaseStore) -> None:
    await leases.sync_accounts(dict.fromkeys(["a", "b"], True))
    await leases.register("me", 10)
    lease = await leases.claim("me", 1, TTL)
    (name, epoch), = lease.items()
    other = "b" if name == "a" else "a"
    rejected = await leases.write_sessions("me", {
        name: (epoch, b"ok"), other: (NO_EPOCH, b"not mine")})
    assert rejected == {other}
    assert await leases.write_sessions("me", {name: (epoch + 1, b"future")}) == {name}
    assert await leases.read_sessions() == {name: b"ok"}
    assert await leases.write_sessions("me", {name: (epoch, None)}) == set()
    assert await leases.read_sessions() == {}


async def test_release_makes_claimable_at_once_and_unregister_frees_all(
        leases: LeaseStore) -> None:
    await leases.sync_accounts(dict.fromkeys(["a", "b", "c"], True))
    await leases.register("x", 10)
    held = await leases.claim("x", 3, TTL)
    await leases.release("x", ["a"])
    assert await leases.renew("x", TTL) == {k: v for k, v in held.items() if k != "a"}
    await leases.register("y", 10)
    assert await leases.claim("y", 3, TTL) == {"a": 2}
    await leases.unregister("x")
    assert [i.id for i in await leases.instances()] == ["y"]
    assert set(await leases.claim("y", 3, TTL)) == {"b", "c"}


async def test_disabled_accounts_are_released_and_never_claimed(leases: LeaseStore) -> None:
    await leases.sync_accounts(dict.fromkeys(["a", "b"], True))
    await leases.register("x", 10)
    assert set(await leases.claim("x", 2, TTL)) == {"a", "b"}
    assert await leases.set_enabled("a", False)
    assert set(await leases.renew("x", TTL)) == {"b"}
    assert await leases.claim("x", 2, TTL) == {}
    assert (await leases.counts(TTL)).accounts == 1
    assert not await leases.set_enabled("nobody", True)


async def test_remove_account_drops_lease_and_session(leases: LeaseStore) -> None:
    await leases.sync_accounts(dict.fromkeys(["a"], True))
    await leases.register("x", 10)
    epoch = (await leases.claim("x", 1, TTL))["a"]
    await leases.write_sessions("x", {"a": (epoch, b"rec")})
    assert await leases.remove_account("a")
    assert not await leases.remove_account("a")
    assert await leases.fleet() == []
    assert await leases.read_sessions() == {}
    assert await leases.renew("x", TTL) == {}


async def test_concurrent_claims_from_many_instances_are_disjoint(leases: LeaseStore) -> None:
    await leases.sync_accounts(dict.fromkeys([f"a{i}" for i in range(60)], True))
    ids = [f"i{k}" for k in range(4)]
    for i in ids:
        await leases.register(i, 100)
    results = await asyncio.gather(*(leases.claim(i, 20, TTL) for i in ids))
    claimed = [name for r in results for name in r]
    assert len(claimed) == len(set(claimed)) == 60


async def test_postgres_migrations_are_checksummed(pg_url: str) -> None:
    import asyncpg

    await (await PgLeaseStore.open(pg_url)).close()  # creates the schema
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute("UPDATE schema_migrations SET checksum='edited' WHERE version=1")
    finally:
        await conn.close()
    with pytest.raises(StoreError, match="migration 1 differs"):
        await PgLeaseStore.open(pg_url)


async def test_postgres_unreachable_is_a_store_error() -> None:
    with pytest.raises(StoreError, match="cannot connect"):
        await PgLeaseStore.open("postgresql://nobody:secret@127.0.0.1:9/x", timeout=2)


async def test_an_instance_that_stops_renewing_is_counted_lost(
        leases: LeaseStore, wait_until: WaitUntil) -> None:
    await leases.register("quiet", 10)
    await leases.register("busy", 10)

    async def one_lost() -> bool:
        await leases.renew("busy", TTL)
        return (await leases.counts(0.3)) == FleetCounts(0, 1, 0, 1)

    await wait_until(one_lost, timeout=10, message="quiet instance lost")
    await leases.unregister("quiet")  # a clean stop is not a loss: its row is gone
    assert [i.id for i in await leases.instances()] == ["busy"]


async def _sqlite_leases(state_dir: Path, keyring: KeyRing, **kwargs: float
                         ) -> SqliteLeaseStore:
    async with await Store.open(state_dir, keyring, lock=False):
        pass
    leases = await SqliteLeaseStore.open(state_dir / DB_NAME, **kwargs)
    await leases.sync_accounts({"a": True})
    await leases.register("one", 10)
    assert await leases.claim("one", 1, TTL) == {"a": 1}
    return leases


async def test_sqlite_renewal_does_not_queue_behind_other_lease_work(
        state_dir: Path, keyring: KeyRing) -> None:
    """Renewals have their own connection and thread: a slow claim, read or session write of
    this daemon (here: the lease thread kept busy) does not delay them."""
    leases = await _sqlite_leases(state_dir, keyring)
    busy = threading.Event()
    blocked = asyncio.ensure_future(leases._run(lambda conn: busy.wait(60), None))
    try:
        assert await asyncio.wait_for(leases.renew("one", TTL), 20) == {"a": 1}
        assert not blocked.done()
    finally:
        busy.set()
        await blocked
        await leases.close()


async def test_sqlite_renewal_retries_while_another_daemon_holds_the_lock(
        state_dir: Path, keyring: KeyRing, wait_until: WaitUntil) -> None:
    """A renewal that finds the write lock busy is tried again within its patience (each
    attempt waits at most a quarter of it), and fails as a StoreError once it is spent."""
    leases = await _sqlite_leases(state_dir, keyring, renew_patience=2.0)
    other = sqlite3.connect(state_dir / DB_NAME, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # another daemon's transaction
        renewal = asyncio.ensure_future(leases.renew("one", TTL))
        await wait_until(lambda: leases.renew_retries >= 1, timeout=20,
                         message="renewal tried again")
        other.execute("COMMIT")
        assert await asyncio.wait_for(renewal, 20) == {"a": 1}
        other.execute("BEGIN IMMEDIATE")  # now held beyond the patience
        with pytest.raises(StoreError, match="locked"):
            await asyncio.wait_for(leases.renew("one", TTL), 20)
        other.execute("COMMIT")
    finally:
        other.close()
        await leases.close()
