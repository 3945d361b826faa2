"""Store: files and permissions, migrations, lock, accounts, sessions, DC cache, rotation."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from storehelpers import SessionBackend, make_session

from tgdaemon.crypto import generate_keyring, record_key_id
from tgdaemon.exceptions import AccountError, DecryptionError, StateLockedError, StoreError
from tgdaemon.migrations import LATEST, MIGRATIONS
from tgdaemon.store import DB_NAME, DeviceInfo, SessionData, Store


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_open_creates_private_files_wal_and_schema(store: Store, state_dir: Path) -> None:
    assert mode(state_dir) == 0o700
    assert mode(state_dir / DB_NAME) == 0o600
    assert mode(state_dir / "tgdaemon.lock") == 0o600
    with sqlite3.connect(state_dir / DB_NAME) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA user_version").fetchone()[0] == LATEST
        rows = db.execute("SELECT version, checksum FROM schema_migrations").fetchall()
    assert rows == [(m.version, m.checksum) for m in MIGRATIONS]


async def test_loose_existing_permissions_are_tightened(state_dir: Path, ring) -> None:
    def loosen() -> None:
        state_dir.mkdir(mode=0o755)
        state_dir.chmod(0o755)
        (state_dir / DB_NAME).touch(mode=0o644)
        (state_dir / DB_NAME).chmod(0o644)

    loosen()
    async with await Store.open(state_dir, ring):
        assert mode(state_dir) == 0o700
        assert mode(state_dir / DB_NAME) == 0o600


def test_migrations_are_numbered_contiguously() -> None:
    assert [m.version for m in MIGRATIONS] == list(range(1, len(MIGRATIONS) + 1))
    assert len({m.checksum for m in MIGRATIONS}) == len(MIGRATIONS)


async def test_reopen_keeps_data_and_does_not_remigrate(state_dir: Path, ring) -> None:
    async with await Store.open(state_dir, ring) as s:
        await s.ensure_account("a")
    async with await Store.open(state_dir, ring) as s:
        assert [a.name for a in await s.list_accounts()] == ["a"]
    with sqlite3.connect(state_dir / DB_NAME) as db:
        assert db.execute("SELECT count(*) FROM schema_migrations").fetchone()[0] == LATEST


async def test_edited_migration_is_refused(state_dir: Path, ring) -> None:
    async with await Store.open(state_dir, ring):
        pass
    with sqlite3.connect(state_dir / DB_NAME) as db:
        db.execute("UPDATE schema_migrations SET checksum='x' WHERE version=1")
    with pytest.raises(StoreError, match="append-only"):
        await Store.open(state_dir, ring)
    # the lock was released on failure
    with sqlite3.connect(state_dir / DB_NAME) as db:
        db.execute("UPDATE schema_migrations SET checksum=? WHERE version=1",
                   (MIGRATIONS[0].checksum,))
    async with await Store.open(state_dir, ring):
        pass


async def test_newer_schema_is_refused(state_dir: Path, ring) -> None:
    async with await Store.open(state_dir, ring):
        pass
    with sqlite3.connect(state_dir / DB_NAME) as db:
        db.execute(f"PRAGMA user_version={LATEST + 1}")
    with pytest.raises(StoreError, match="newer than this tgdaemon"):
        await Store.open(state_dir, ring)


async def test_failed_migration_rolls_back(state_dir: Path, ring, monkeypatch) -> None:
    from tgdaemon import migrations
    from tgdaemon import store as store_mod

    bad = migrations.Migration(LATEST + 1, "broken", ("CREATE TABLE t (x)", "SELECT nonsense("))
    async with await Store.open(state_dir, ring):
        pass
    monkeypatch.setattr(store_mod, "MIGRATIONS", (*MIGRATIONS, bad))
    monkeypatch.setattr(store_mod, "LATEST", LATEST + 1)
    with pytest.raises(StoreError):
        await Store.open(state_dir, ring)
    with sqlite3.connect(state_dir / DB_NAME) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == LATEST
        assert db.execute("SELECT name FROM sqlite_master WHERE name='t'").fetchone() is None


def damage_file(db: Path, damage: str) -> None:
    raw = bytearray(db.read_bytes())
    if damage == "garbage":
        db.write_bytes(b"this is not a database at all" * 200)
    elif damage == "truncate":
        db.write_bytes(bytes(raw[:100]))
    else:
        page = int.from_bytes(raw[16:18], "big")
        for off in range(page * 2, len(raw), page):  # scribble over every b-tree page header
            raw[off:off + 12] = b"\xff" * 12
        db.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage", ["garbage", "truncate", "scribble"])
async def test_corrupt_database_gives_store_error(state_dir: Path, ring, damage: str) -> None:
    async with await Store.open(state_dir, ring) as s:
        for i in range(300):
            await s.ensure_account(f"acct{i:04d}")
    damage_file(state_dir / DB_NAME, damage)

    async def open_and_read() -> None:
        s = await Store.open(state_dir, ring)
        try:  # a damaged page may only show once it is read
            await s.list_accounts()
        finally:
            await s.close()

    with pytest.raises(StoreError, match=r"state database .*(corrupt|not a)") as info:
        await open_and_read()
    assert info.value.__traceback__ is not None
    assert not isinstance(info.value, StateLockedError)


async def test_lock_in_process(state_dir: Path, ring, store: Store) -> None:
    with pytest.raises(StateLockedError, match=r"already in use.*AUTH_KEY_DUPLICATED"):
        await Store.open(state_dir, ring)


async def test_lock_across_processes(state_dir: Path, ring) -> None:
    await asyncio.to_thread(state_dir.mkdir, mode=0o700)
    holder = textwrap.dedent(f"""
        import fcntl, os, sys
        fd = os.open({str(state_dir / "tgdaemon.lock")!r}, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, str(os.getpid()).encode())
        print("locked", flush=True)
        sys.stdin.readline()
    """)
    with subprocess.Popen(  # noqa: ASYNC220 - a plain child process is what is under test
        [sys.executable, "-c", holder], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as proc:
        try:
            assert proc.stdout is not None
            assert proc.stdin is not None
            assert await asyncio.to_thread(proc.stdout.readline) == "locked\n"
            with pytest.raises(StateLockedError, match=f"pid {proc.pid}"):
                await Store.open(state_dir, ring)
            proc.stdin.close()
            assert await asyncio.to_thread(proc.wait, 10) == 0
        finally:
            proc.kill()
    async with await Store.open(state_dir, ring):  # released when the holder exits
        pass


async def test_lock_false_skips_lock(state_dir: Path, ring, store: Store) -> None:
    """``store`` holds the lock: a second open without the lock (the CLI beside a running
    daemon) works on the same database."""
    await store.ensure_account("alice")
    s = await Store.open(state_dir, ring, lock=False)
    try:
        assert await s.get_account("alice") is not None
    finally:
        await s.close()
    with pytest.raises(StateLockedError):
        await Store.open(state_dir, ring)


async def test_accounts(state_dir: Path, ring) -> None:
    now = [1000.0]
    dev = DeviceInfo("Pixel 7", "Android 14", "10.1")
    async with await Store.open(state_dir, ring, clock=lambda: now[0]) as s:
        rec = await s.ensure_account("bob", dev)
        assert rec.name == "bob"
        assert rec.status == "new"
        assert rec.created_at == 1000.0
        assert rec.device == dev
        assert rec.user_id is None
        now[0] = 2000.0
        again = await s.ensure_account("bob", DeviceInfo("other", "x", "y"))
        assert again == rec  # ensure never overwrites
        await s.ensure_account("alice")
        await s.update_account(
            "bob", user_id=42, username="bobby", first_name="Bob", status="active",
            last_used=1500.0, last_checked=1600.0, dc_id=4, last_error_category="network",
        )
        await s.update_account("alice", device=dev)
        bob = await s.get_account("bob")
        assert bob is not None
        assert (bob.user_id, bob.username, bob.first_name, bob.status) == (42, "bobby", "Bob",
                                                                          "active")
        assert (bob.last_used, bob.last_checked, bob.dc_id) == (1500.0, 1600.0, 4)
        assert bob.last_error_category == "network"
        assert bob.created_at == 1000.0
        assert [a.name for a in await s.list_accounts()] == ["alice", "bob"]
        assert (await s.get_account("alice")).device == dev  # type: ignore[union-attr]
        assert await s.get_account("nobody") is None
        with pytest.raises(AccountError, match="nobody"):
            await s.update_account("nobody", status="x")
        with pytest.raises(TypeError, match="name"):
            await s.update_account("bob", name="evil")
        with pytest.raises(AccountError):
            await s.ensure_account("")
        await s.update_account("bob", device=None, last_error_category=None)
        bob = await s.get_account("bob")
        assert bob is not None
        assert bob.device is None
        assert bob.last_error_category is None


def test_session_data_repr_hides_auth_key() -> None:
    data = make_session()
    assert data.auth_key is not None
    assert data.auth_key.hex()[:16] not in repr(data)
    assert repr(data.auth_key)[2:20] not in repr(data)
    assert SessionData.from_bytes(data.to_bytes()) == data
    with pytest.raises(ValueError, match="256"):
        SessionData(2, "1.2.3.4", 443, b"x" * 257)
    with pytest.raises(ValueError, match="256"):
        SessionData(2, "1.2.3.4", 443, b"")
    # a 255-byte key (Telethon drops a leading zero byte of g^ab) is kept as it is
    short = SessionData(2, "1.2.3.4", 443, b"\x01" * 255)
    assert SessionData.from_bytes(short.to_bytes()).auth_key == b"\x01" * 255


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, state_dir: Path) -> SessionBackend:
    """Session records in the state database, or (a fleet) in a real PostgreSQL."""
    url = request.getfixturevalue("pg_url") if request.param == "postgresql" else ""
    return SessionBackend(state_dir, url)


def local_session_rows(state_dir: Path) -> int:
    with contextlib.closing(sqlite3.connect(state_dir / DB_NAME)) as db:
        return int(db.execute("SELECT count(*) FROM sessions").fetchone()[0])


async def test_session_round_trip_is_durable_and_encrypted(backend: SessionBackend,
                                                          ring) -> None:
    data = make_session(7, user_id=99)
    async with backend.open(ring) as s:
        await s.ensure_account("a")
        assert await s.load_session("a") is None
        await s.save_session("a", data)
        assert await s.load_session("a") == data
    assert data.auth_key is not None
    raw = await backend.raw()
    assert set(raw) == {"a"}
    assert data.auth_key[:32] not in raw["a"]
    files = await asyncio.to_thread(
        lambda: b"".join(p.read_bytes() for p in sorted(backend.state_dir.glob(f"{DB_NAME}*")))
    )
    assert data.auth_key[:32] not in files
    if backend.kind == "postgresql":  # the fleet's records never land in the local database
        assert local_session_rows(backend.state_dir) == 0
    async with backend.open(ring) as s:
        assert await s.load_session("a") == data
        await s.delete_session("a")
        assert await s.load_session("a") is None
    assert await backend.raw() == {}


async def test_submit_coalesces_per_account(backend: SessionBackend, ring) -> None:
    async with backend.open(ring) as store:
        await store.ensure_account("a")
        await store.ensure_account("b")
        futs = [store.submit_session("a", make_session(i)) for i in range(50)]
        fb = store.submit_session("b", make_session(1))
        assert all(f is futs[0] for f in futs)
        assert fb is not futs[0]
        await asyncio.wait_for(asyncio.gather(futs[0], fb), 10)
        loaded = await store.load_session("a")
    assert loaded is not None
    assert loaded.seq == 49


async def test_writes_are_batched(backend: SessionBackend, ring, monkeypatch) -> None:
    names = [f"acct{i:05d}" for i in range(1200)]
    async with backend.open(ring) as store:
        await store.ensure_accounts(dict.fromkeys(names))
        batches: list[int] = []
        original = store._write_batch

        async def counting(batch):
            batches.append(len(batch))
            await original(batch)

        monkeypatch.setattr(store, "_write_batch", counting)
        futs = [store.submit_session(n, make_session(i)) for i, n in enumerate(names)]
        await asyncio.wait_for(asyncio.gather(*futs), 30)
        assert sum(batches) == 1200
        assert len(batches) <= 4
        loaded = await store.load_sessions()
    assert len(loaded) == 1200
    assert all(isinstance(v, SessionData) for v in loaded.values())
    assert loaded["acct00042"].seq == 42  # type: ignore[union-attr]
    assert len(await backend.raw()) == 1200


async def test_a_batch_wakes_its_writers_a_slice_per_loop_pass(store: Store) -> None:
    """A batch of 500 written at once must not wake 500 waiters in one loop pass (every
    other account's heartbeat waits behind a pass): at most WAKE_BATCH per pass. A pass is
    counted by a marker that re-schedules itself with call_soon (once per pass)."""
    from tgdaemon.store import _BATCH
    from tgdaemon.wheel import WAKE_BATCH

    names = [f"acct{i:05d}" for i in range(_BATCH)]
    await store.ensure_accounts(dict.fromkeys(names))
    loop = asyncio.get_running_loop()
    passes = [0]
    woken: dict[int, int] = {}
    stop = False

    def mark() -> None:
        passes[0] += 1
        if not stop:
            loop.call_soon(mark)

    def count(_fut: asyncio.Future[None]) -> None:
        woken[passes[0]] = woken.get(passes[0], 0) + 1

    futs = [store.submit_session(n, make_session(i)) for i, n in enumerate(names)]
    for fut in futs:
        fut.add_done_callback(count)
    loop.call_soon(mark)
    try:
        await asyncio.wait_for(asyncio.gather(*futs), 30)
    finally:
        stop = True
    assert sum(woken.values()) == _BATCH
    assert max(woken.values()) <= WAKE_BATCH, woken


async def test_submit_for_unknown_account_fails_only_that_account(backend: SessionBackend,
                                                                 ring) -> None:
    async with backend.open(ring) as store:
        await store.ensure_account("a")
        good = store.submit_session("a", make_session(1))
        bad = store.submit_session("ghost", make_session(1))
        with pytest.raises(AccountError, match="ghost"):
            await asyncio.wait_for(bad, 10)
        await asyncio.wait_for(good, 10)
        assert await store.load_session("a") is not None
    assert set(await backend.raw()) == {"a"}


async def test_close_drains_pending_writes(backend: SessionBackend, ring) -> None:
    async with backend.open(ring) as s:
        await s.ensure_accounts({f"a{i}": None for i in range(20)})
        for i in range(20):
            s.submit_session(f"a{i}", make_session(i))
        await s.close()
        with pytest.raises(StoreError, match="clos"):
            s.submit_session("a1", make_session(1))
    async with backend.open(ring) as s:
        loaded = await s.load_sessions()
    assert {k: v.seq for k, v in loaded.items()} == {f"a{i}": i for i in range(20)}  # type: ignore[union-attr]


async def test_row_swap_wrong_key_and_tamper_are_reported_per_account(
    backend: SessionBackend, ring
) -> None:
    async with backend.open(ring) as s:
        for n in ("a", "b", "c"):
            await s.ensure_account(n)
            await s.save_session(n, make_session())
    raw = await backend.raw()
    await backend.put_raw("b", raw["a"])
    flipped = bytearray(raw["c"])
    flipped[-1] ^= 1
    await backend.put_raw("c", bytes(flipped))
    async with backend.open(ring) as s:
        loaded = await s.load_sessions()
        assert isinstance(loaded["a"], SessionData)
        assert isinstance(loaded["b"], DecryptionError)
        assert "'b'" in str(loaded["b"])
        assert isinstance(loaded["c"], DecryptionError)
        assert "'c'" in str(loaded["c"])
        with pytest.raises(DecryptionError, match=r"account 'b'.*authentication failed"):
            await s.load_session("b")
    # nothing was overwritten: the swapped-in record is still byte-identical
    assert (await backend.raw())["b"] == raw["a"]
    async with backend.open(generate_keyring()) as s:
        with pytest.raises(DecryptionError, match=r"account 'a'.*not in the key ring"):
            await s.load_session("a")


async def test_dc_address_cache(store: Store) -> None:
    assert await store.dc_addresses(2) == []
    await store.save_dc_addresses(2, [("149.154.167.51", 443), ("2001:67c:4e8::a", 443)])
    await store.save_dc_addresses(4, [("149.154.167.91", 443)])
    assert await store.dc_addresses(2) == [("149.154.167.51", 443), ("2001:67c:4e8::a", 443)]
    await store.save_dc_addresses(2, [("10.0.0.1", 80)])
    assert await store.dc_addresses(2) == [("10.0.0.1", 80)]
    assert await store.dc_addresses(4) == [("149.154.167.91", 443)]


async def test_rotate(state_dir: Path, ring) -> None:
    sessions = {f"a{i}": make_session(i) for i in range(30)}
    async with await Store.open(state_dir, ring) as s:
        for n, d in sessions.items():
            await s.ensure_account(n)
            await s.save_session(n, d)
        new_ring = ring.with_new_active()
        assert await s.rotate(new_ring) == 30
        assert set((await s.session_key_ids()).values()) == {new_ring.active.key_id}
        assert await s.rotate(new_ring) == 0  # idempotent
        # writes after rotation use the new key
        await s.save_session("a1", make_session(100))
        assert set((await s.session_key_ids()).values()) == {new_ring.active.key_id}
        sessions["a1"] = await s.load_session("a1")  # type: ignore[assignment]
    async with await Store.open(state_dir, new_ring.without(ring.active.key_id)) as s:
        assert await s.load_sessions() == sessions


async def test_rotate_without_old_key_changes_nothing(state_dir: Path, ring) -> None:
    async with await Store.open(state_dir, ring) as s:
        for i in range(5):
            await s.ensure_account(f"a{i}")
            await s.save_session(f"a{i}", make_session(i))
        unrelated = generate_keyring()
        with pytest.raises(DecryptionError, match="not in the key ring"):
            await s.rotate(unrelated)
        ids = await s.session_key_ids()
        assert set(ids.values()) == {ring.active.key_id}
        assert all(isinstance(v, SessionData) for v in (await s.load_sessions()).values())


async def test_record_key_id_helper(store: Store, ring) -> None:
    await store.ensure_account("a")
    await store.save_session("a", make_session())
    with sqlite3.connect(store.path) as db:
        (rec,) = db.execute("SELECT record FROM sessions").fetchone()
    assert record_key_id(rec) == ring.active.key_id


async def test_ensure_accounts_in_bulk(store: Store) -> None:
    dev = DeviceInfo("m", "s", "a")
    await store.ensure_account("existing", DeviceInfo("keep", "me", "1"))
    await store.ensure_accounts({f"n{i:05d}": dev for i in range(3000)} | {"existing": dev,
                                                                           "bare": None})
    accounts = {a.name: a for a in await store.list_accounts()}
    assert len(accounts) == 3002
    assert accounts["n00042"].device == dev
    assert accounts["bare"].device is None
    assert accounts["existing"].device == DeviceInfo("keep", "me", "1")


async def test_submitted_metadata_is_batched_with_sessions(state_dir: Path, ring) -> None:
    async with await Store.open(state_dir, ring) as s:
        await s.ensure_accounts({f"a{i}": None for i in range(300)})
        futures = [s.submit_account(f"a{i}", status="connected", user_id=i) for i in range(300)]
        session = make_session(7, user_id=7)
        futures.append(s.submit_session("a7", session))
        futures.append(s.submit_account("a7", username="seven"))  # merges into a7's write
        unknown = s.submit_account("nobody", status="connected")
        await asyncio.wait(futures)
        assert all(f.exception() is None for f in futures)
        with pytest.raises(AccountError):
            await unknown
        a7 = await s.get_account("a7")
        assert a7 is not None
        assert (a7.status, a7.user_id, a7.username) == ("connected", 7, "seven")
        assert (await s.load_session("a7")) == session
        a299 = await s.get_account("a299")
        assert a299 is not None
        assert a299.user_id == 299
