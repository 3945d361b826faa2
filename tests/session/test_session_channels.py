"""Channel update states survive a restart with their access hashes (a catch-up needs both);
channels without a known hash are not kept, and the number kept is bounded."""

from __future__ import annotations

import datetime
from pathlib import Path

from telethon.tl import types

from tgdaemon.crypto import KeyRing
from tgdaemon.session import MAX_CHANNEL_STATES, StoreSession
from tgdaemon.store import SessionData, Store

EPOCH = datetime.datetime.fromtimestamp(0, tz=datetime.UTC)


def _state(pts: int) -> types.updates.State:
    return types.updates.State(pts=pts, qts=0, date=EPOCH, seq=0, unread_count=0)


def _channel(cid: int) -> types.Channel:
    return types.Channel(id=cid, title="c", photo=types.ChatPhotoEmpty(), date=EPOCH,
                         access_hash=cid * 3, broadcast=True)


async def test_channel_states_round_trip_with_their_hashes(store: Store, state_dir: Path,
                                                           ring: KeyRing) -> None:
    await store.ensure_account("a")
    data = SessionData(2, "127.0.0.1", 443, b"k" * 256, user_id=5, pts=7, qts=0, date=1, seq=0)
    sess = StoreSession(store, "a", data)
    sess.process_entities(types.contacts.ResolvedPeer(None, [], [_channel(1001)]))
    sess.set_update_state(1001, _state(40))  # hash known from the entity cache: kept
    sess.set_update_state(2002, _state(9))  # never seen: no hash, a catch-up could not use it
    sess.set_update_state(0, _state(8))
    await sess.flush()
    await store.close()
    async with await Store.open(state_dir, ring) as again:
        loaded = await again.load_session("a")
        assert loaded is not None
        assert loaded.channels == ((1001, 40, 1001 * 3),)
        assert loaded.pts == 8
        fresh = StoreSession(again, "a", loaded)
        states = dict(fresh.get_update_states())
        assert states[1001].pts == 40
        assert 2002 not in states
        # What Telethon's catch-up asks on connect: the channel's input entity by its id.
        entity = fresh.get_input_entity(1001)
        assert isinstance(entity, types.InputPeerChannel)
        assert entity.access_hash == 1001 * 3


def test_record_without_channels_is_unchanged_and_channels_are_bounded() -> None:
    plain = SessionData(2, "127.0.0.1", 443, b"k" * 256, pts=1)
    assert b'"ch"' not in plain.to_bytes()  # records written before stay byte-identical
    assert SessionData.from_bytes(plain.to_bytes()) == plain
    data = SessionData(2, "127.0.0.1", 443, b"k" * 256, pts=1,
                       channels=tuple((i, i, i) for i in range(1, MAX_CHANNEL_STATES + 50)))
    assert SessionData.from_bytes(data.to_bytes()) == data
    sess = StoreSession(None, "a", data)  # type: ignore[arg-type]  # snapshot only, no I/O
    assert len(sess.snapshot().channels) == MAX_CHANNEL_STATES  # type: ignore[union-attr]
