"""StoreSession: Telethon's synchronous session API, durability via flush, bounded entities."""

from __future__ import annotations

import asyncio
import datetime
import os
from pathlib import Path

import pytest
from telethon import TelegramClient
from telethon.crypto import AuthKey
from telethon.sessions import MemorySession
from telethon.tl import types

from tgdaemon.crypto import KeyRing
from tgdaemon.exceptions import AccountError, StoreError
from tgdaemon.session import StoreSession
from tgdaemon.store import Store


async def reopen(state_dir: Path, ring: KeyRing, store: Store, name: str = "a"):
    await store.close()
    async with await Store.open(state_dir, ring) as s:
        return await s.load_session(name)


def user(uid: int, username: str | None = None) -> types.User:
    return types.User(id=uid, access_hash=uid * 7, username=username, first_name=f"u{uid}")


async def test_new_key_is_durable_after_flush(store: Store, state_dir: Path, ring) -> None:
    await store.ensure_account("a")
    sess = StoreSession(store, "a", None)
    assert sess.auth_key is None
    assert sess.snapshot() is None
    sess.set_dc(2, "149.154.167.51", 443)
    key = AuthKey(os.urandom(256))
    sess.auth_key = key
    sess.save()
    await asyncio.wait_for(sess.flush(), 10)
    loaded = await reopen(state_dir, ring, store)
    assert loaded is not None
    assert (loaded.dc_id, loaded.server_address, loaded.port) == (2, "149.154.167.51", 443)
    assert loaded.auth_key == key.key


async def test_loaded_session_restores_state(store: Store) -> None:
    await store.ensure_account("a")
    s1 = StoreSession(store, "a", None)
    s1.set_dc(4, "149.154.167.91", 443)
    s1.auth_key = AuthKey(os.urandom(256))
    s1.process_entities(types.contacts.ResolvedPeer(None, [types.InputPeerUser(0, 555)], []))
    when = datetime.datetime(2024, 5, 1, tzinfo=datetime.UTC)
    s1.set_update_state(0, types.updates.State(10, 20, when, 30, unread_count=0))
    s1.close()
    await s1.flush()
    s2 = StoreSession(store, "a", await store.load_session("a"))
    assert (s2.dc_id, s2.server_address, s2.port) == (4, "149.154.167.91", 443)
    assert s2.auth_key.key == s1.auth_key.key
    assert s2.get_input_entity(0) == types.InputPeerUser(0, 555)
    st = s2.get_update_state(0)
    assert (st.pts, st.qts, st.seq, st.date) == (10, 20, 30, when)
    assert list(dict(s2.get_update_states())) == [0]


async def test_update_state_waits_for_save(store: Store) -> None:
    await store.ensure_account("a")
    sess = StoreSession(store, "a", None)
    sess.set_dc(2, "1.2.3.4", 443)
    await sess.flush()
    now = datetime.datetime.now(tz=datetime.UTC)
    sess.set_update_state(0, types.updates.State(1, 2, now, 3, unread_count=0))
    assert not store._pending  # no write per state change
    sess.save()
    assert store._pending
    await sess.flush()
    assert (await store.load_session("a")).pts == 1  # type: ignore[union-attr]
    sess.set_update_state(0, types.updates.State(5, 2, now, 3, unread_count=0))
    await sess.flush()  # flush also writes what changed since the last save
    assert (await store.load_session("a")).pts == 5  # type: ignore[union-attr]


async def test_unchanged_save_does_not_write(store: Store) -> None:
    await store.ensure_account("a")
    sess = StoreSession(store, "a", None)
    sess.set_dc(2, "1.2.3.4", 443)
    await sess.flush()
    sess.save()
    sess.save()
    assert not sess._outstanding
    assert not store._pending


async def test_sender_mutating_the_shared_key_is_saved_as_no_key(store: Store) -> None:
    # _switch_dc does `sender.auth_key.key = None` then `session.auth_key = None`
    await store.ensure_account("a")
    sess = StoreSession(store, "a", None)
    sess.set_dc(2, "1.2.3.4", 443)
    shared = AuthKey(os.urandom(256))
    sess.auth_key = shared
    await sess.flush()
    shared.key = None
    sess.set_dc(4, "5.6.7.8", 443)
    sess.auth_key = None
    await sess.flush()
    loaded = await store.load_session("a")
    assert loaded is not None
    assert loaded.auth_key is None
    assert loaded.dc_id == 4


async def test_own_user_id_and_bounded_lru(store: Store) -> None:
    await store.ensure_account("a")
    sess = StoreSession(store, "a", None, entity_cache_size=10)
    sess.set_dc(2, "1.2.3.4", 443)
    with pytest.raises(ValueError, match="Could not find"):
        sess.get_input_entity(0)
    sess.process_entities(types.contacts.ResolvedPeer(None, [types.InputPeerUser(0, 4242)], []))
    assert sess.get_input_entity(0) == types.InputPeerUser(0, 4242)
    await sess.flush()
    assert (await store.load_session("a")).user_id == 4242  # type: ignore[union-attr]
    for start in range(1, 1000, 50):
        sess.process_entities(types.contacts.ResolvedPeer(
            None, [], [user(i, f"name{i}") for i in range(start, start + 50)]
        ))
    assert sess.entity_count == 10
    assert sess.get_input_entity(999) == types.InputPeerUser(999, 999 * 7)
    assert sess.get_input_entity("name995") == types.InputPeerUser(995, 995 * 7)
    with pytest.raises(ValueError, match="Could not find"):
        sess.get_input_entity(5)
    # a lookup refreshes recency: 991 survives the next 9 inserts, 992 does not
    assert sess.get_input_entity(991) == types.InputPeerUser(991, 991 * 7)
    sess.process_entities(types.contacts.ResolvedPeer(
        None, [], [user(i) for i in range(2000, 2009)]
    ))
    assert sess.get_input_entity(991) == types.InputPeerUser(991, 991 * 7)
    with pytest.raises(ValueError, match="Could not find"):
        sess.get_input_entity(992)
    assert sess.get_input_entity(0) == types.InputPeerUser(0, 4242)  # never evicted


async def test_delete_removes_stored_session(store: Store) -> None:
    await store.ensure_account("a")
    sess = StoreSession(store, "a", None)
    sess.set_dc(2, "1.2.3.4", 443)
    sess.auth_key = AuthKey(os.urandom(256))
    sess.delete()  # coalesces with the pending write: the delete wins
    await sess.flush()
    assert await store.load_session("a") is None
    assert sess.auth_key is None


async def test_flush_reports_failure_then_retries(store: Store) -> None:
    sess = StoreSession(store, "late", None)
    sess.set_dc(2, "1.2.3.4", 443)
    sess.auth_key = AuthKey(os.urandom(256))
    with pytest.raises(AccountError, match="late"):
        await sess.flush()
    await store.ensure_account("late")
    await sess.flush()  # the failed state is submitted again
    loaded = await store.load_session("late")
    assert loaded is not None
    assert loaded.auth_key == sess.auth_key.key


async def test_closed_store_is_reported_by_flush(store: Store) -> None:
    await store.ensure_account("a")
    sess = StoreSession(store, "a", None)
    await store.close()
    sess.set_dc(2, "1.2.3.4", 443)  # must not raise inside Telethon
    with pytest.raises(StoreError, match="clos"):
        await sess.flush()


async def test_clone_is_not_persisted(store: Store) -> None:
    await store.ensure_account("a")
    sess = StoreSession(store, "a", None)
    clone = sess.clone()
    assert type(clone) is MemorySession
    clone.set_dc(5, "9.9.9.9", 443)
    assert sess.snapshot() is None


def test_repr_has_no_key(tmp_path: Path) -> None:
    sess = StoreSession.__new__(StoreSession)
    MemorySession.__init__(sess)
    sess._account, sess._auth_key = "a", AuthKey(os.urandom(256))
    assert sess._auth_key.key.hex()[:16] not in repr(sess)


async def test_telethon_client_uses_session_without_warnings(store: Store, state_dir, ring):
    """The client's own code paths (key callback, state save, disconnect) on our session.

    pytest runs with filterwarnings=error, so an awaitable result anywhere would fail here.
    """
    await store.ensure_account("a")
    sess = StoreSession(store, "a", None)
    sess.set_dc(2, "127.0.0.1", 1)
    client = TelegramClient(sess, 1, "0" * 32, receive_updates=False)
    assert client.session is sess
    key = AuthKey(os.urandom(256))
    client._sender.auth_key.key = key.key
    await client._auth_key_callback(client._sender.auth_key)  # as after a key exchange
    assert sess.auth_key is client._sender.auth_key
    await sess.flush()
    assert (await store.load_session("a")).auth_key == key.key  # type: ignore[union-attr]
    client._mb_entity_cache.set_self_user(31337, False, 99)
    await client.disconnect()  # saves states/entities and closes the session
    await sess.flush()
    loaded = await store.load_session("a")
    assert loaded is not None
    assert loaded.user_id == 31337
    # a fresh client from the stored data shares the key object with its sender
    client2 = TelegramClient(StoreSession(store, "a", loaded), 1, "0" * 32)
    assert client2._sender.auth_key.key == key.key
    assert client2.session.get_input_entity(0) == types.InputPeerUser(0, 31337)
    await client2.disconnect()
    await client2.session.flush()


def state(pts: int, qts: int = 0) -> types.updates.State:
    when = datetime.datetime(2024, 5, 1, tzinfo=datetime.UTC)
    return types.updates.State(pts, qts, when, 1, unread_count=0)


async def test_update_state_alone_is_written_at_most_every_interval(store: Store) -> None:
    from tgdaemon.session import UPDATE_STATE_INTERVAL

    await store.ensure_account("a")
    clock = [1000.0]
    sess = StoreSession(store, "a", None, monotonic=lambda: clock[0])
    sess.set_dc(2, "1.2.3.4", 443)
    sess.set_update_state(0, state(1))
    await sess.flush()
    sess.set_update_state(0, state(2))
    sess.save()  # Telethon's 60-second save: too soon for a state-only change
    assert not store._pending
    clock[0] += UPDATE_STATE_INTERVAL
    sess.save()
    assert store._pending
    await sess.flush()
    assert (await store.load_session("a")).pts == 2  # type: ignore[union-attr]
    # A key change is written at once, whatever the state's schedule.
    sess.set_update_state(0, state(3))
    sess.auth_key = AuthKey(os.urandom(256))
    assert store._pending
    await sess.flush()
    assert (await store.load_session("a")).pts == 3  # type: ignore[union-attr]
    # close() (a clean stop) writes a pending state change at once.
    sess.set_update_state(0, state(4))
    sess.save()
    assert not store._pending
    sess.close()
    await sess.flush()
    assert (await store.load_session("a")).pts == 4  # type: ignore[union-attr]


async def test_telethon_empty_state_is_no_change(store: Store) -> None:
    """Telethon saves pts=0/qts=0 for "no state yet"; that is not worth a write."""
    await store.ensure_account("a")
    sess = StoreSession(store, "a", None)
    sess.set_dc(2, "1.2.3.4", 443)
    await sess.flush()
    sess.set_update_state(0, state(0))
    sess.save()
    assert not store._pending
    assert sess.snapshot().pts is None  # type: ignore[union-attr]
