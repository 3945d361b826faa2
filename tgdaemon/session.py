"""A Telethon session persisted, encrypted, through :class:`tgdaemon.store.Store`.

Telethon drives sessions synchronously (property setters, ``save()``; an awaitable result
makes it warn on every call), so every change is *submitted* to the store's writer without
blocking and made durable in the background.  The daemon awaits :meth:`StoreSession.flush`
at the points where durability matters: after ``connect()`` (a new auth key) and before a
login binds the key to a user.

Built on :class:`~telethon.sessions.MemorySession` because its lookup logic
(``get_input_entity``) is what the client expects; only the entity cache is replaced, by a
bounded LRU, since MemorySession's unbounded set grows for the lifetime of a client.
Persisted: DC, address, port, auth key, own user id, the general update state and each
channel's update state with the channel's access hash (at most :data:`MAX_CHANNEL_STATES`):
what Telethon's catch-up on connect needs (``tgdaemon.updates``).
Not persisted: other entities, takeout id, file cache.

A change of DC, key or user is submitted at once. A change of the update state alone (Telethon
saves every 60 s, and a busy account's pts moves all the time) is written at most every
:data:`UPDATE_STATE_INTERVAL` and always on ``close()``/``flush()``: after a crash the
account catches up from a slightly older pts (updates seen twice, none lost), and 10,000 busy
accounts cost a few writes a second instead of one per account a minute.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

from telethon import utils
from telethon.crypto import AuthKey
from telethon.sessions import MemorySession
from telethon.tl import types
from telethon.tl.types import PeerChannel, PeerChat, PeerUser

from tgdaemon.exceptions import StoreError, TgdaemonError
from tgdaemon.store import SessionData, Store

log = logging.getLogger("tgdaemon.session")

_Row = tuple[int, int, Any, Any, Any]  # (marked id, access hash, username, phone, name)

#: Seconds between writes of a changed update state when nothing else changed (see above).
UPDATE_STATE_INTERVAL = 300.0
#: Channel update states kept per account (Telegram lets an account join at most 500
#: channels, 1,000 with Premium).
MAX_CHANNEL_STATES = 1000


class StoreSession(MemorySession):  # type: ignore[misc]  # Telethon is untyped (Any)
    """Telethon session for one account, saved through the store's single writer."""

    def __init__(
        self,
        store: Store,
        account: str,
        data: SessionData | None,
        *,
        entity_cache_size: int = 256,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        if entity_cache_size < 1:
            raise ValueError("entity_cache_size must be at least 1")
        self._store = store
        self._account = account
        self._entity_cache_size = entity_cache_size
        self._lru: OrderedDict[int, _Row] = OrderedDict()
        self._self_id: int | None = None
        #: Marked channel id -> access hash of every channel with an update state: pinned
        #: outside the LRU, since a catch-up cannot ask for a channel without its hash.
        self._channel_hashes: dict[int, int] = {}
        self._outstanding: set[asyncio.Future[None]] = set()
        self._last_submitted: SessionData | None = data
        self._error: BaseException | None = None
        self._holding = 0  # > 0 inside holding_writes()
        self._monotonic = monotonic
        #: When the update state last went to the store (a loaded one is as good as new).
        self._state_written_at = monotonic() if data is not None else -math.inf
        if data is not None:
            self._dc_id = data.dc_id
            self._server_address = data.server_address
            self._port = data.port
            self._auth_key = AuthKey(data.auth_key) if data.auth_key else None
            self._self_id = data.user_id
            if data.pts is not None:
                self._update_states[0] = types.updates.State(
                    pts=data.pts, qts=data.qts or 0, seq=data.seq or 0, unread_count=0,
                    date=datetime.datetime.fromtimestamp(data.date or 0, tz=datetime.UTC),
                )
            epoch = datetime.datetime.fromtimestamp(0, tz=datetime.UTC)
            for channel_id, pts, access_hash in data.channels:
                self._update_states[channel_id] = types.updates.State(
                    pts=pts, qts=0, date=epoch, seq=0, unread_count=0)
                self._channel_hashes[_marked_channel(channel_id)] = access_hash

    def __repr__(self) -> str:
        return f"StoreSession(account={self._account!r}, dc={self._dc_id})"

    @property
    def account(self) -> str:
        return self._account

    @property
    def user_id(self) -> int | None:
        return self._self_id

    # -- persistence -------------------------------------------------------------------

    def snapshot(self) -> SessionData | None:
        """The persistent part of the session now (None until a DC is known)."""
        if not self._server_address:
            return None
        key = self._auth_key.key if self._auth_key else None  # the sender may mutate it
        state = self._update_states.get(0)
        if state is not None and not state.pts and not state.qts:
            state = None  # Telethon's "no state yet" (NO_SEQ): loads back as an empty box
        return SessionData(
            dc_id=self._dc_id,
            server_address=self._server_address,
            port=self._port or 0,
            auth_key=bytes(key) if key else None,
            user_id=self._self_id,
            pts=state.pts if state else None,
            qts=state.qts if state else None,
            date=int(state.date.timestamp()) if state and state.date else None,
            seq=state.seq if state else None,
            channels=self._channel_snapshot(),
        )

    def _channel_snapshot(self) -> tuple[tuple[int, int, int], ...]:
        states = []
        for channel_id, state in self._update_states.items():
            if channel_id == 0:
                continue
            access_hash = self._channel_hashes.get(_marked_channel(channel_id))
            if access_hash is not None:
                states.append((channel_id, int(state.pts), access_hash))
        return tuple(sorted(states)[:MAX_CHANNEL_STATES])

    @contextlib.contextmanager
    def holding_writes(self) -> Iterator[None]:
        """Keep changes in memory only until the block ends (then submit the final state):
        a DC switch must not make its keyless intermediate state durable."""
        self._holding += 1
        try:
            yield
        finally:
            self._holding -= 1
            if not self._holding:
                self._submit()

    def _submit(self, *, force: bool = False) -> None:
        if self._holding:
            return
        data = self.snapshot()
        last = self._last_submitted
        if data is None or data == last:
            return
        now = self._monotonic()
        if (not force and last is not None and last.pts is not None
                and _same_login(data, last)
                and now - self._state_written_at < UPDATE_STATE_INTERVAL):
            return  # only a known state moved: written later, or on close()/flush()
        self._state_written_at = now
        try:
            fut = self._store.submit_session(self._account, data)
        except TgdaemonError as exc:
            # Called from inside Telethon: raising would break its flow; flush() reports it.
            if self._error is None:
                log.error("account %s: session change not saved: %s", self._account, exc)
            self._error = exc
            return
        self._last_submitted = data
        self._track(fut)

    def _track(self, fut: asyncio.Future[None]) -> None:
        if fut in self._outstanding:
            return
        self._outstanding.add(fut)
        fut.add_done_callback(self._done)

    def _done(self, fut: asyncio.Future[None]) -> None:
        self._outstanding.discard(fut)
        exc = None if fut.cancelled() else fut.exception()
        if exc is not None:
            self._error = exc
            self._last_submitted = None  # resubmit on the next save()/flush()

    async def flush(self) -> None:
        """Make the current session state durable; raise if it could not be written."""
        # An earlier failure cleared _last_submitted, so this resubmits; its fate decides.
        self._error = None
        self._submit(force=True)  # no-op unless something changed or an earlier write failed
        while self._outstanding:
            await asyncio.wait(list(self._outstanding))  # wait() never cancels them
        if self._error is not None:
            exc, self._error = self._error, None
            if isinstance(exc, TgdaemonError):
                raise exc
            raise StoreError(f"account {self._account}: session not saved: {exc}") from exc

    # -- Telethon's synchronous API ------------------------------------------------------

    def set_dc(self, dc_id: int, server_address: str, port: int) -> None:
        super().set_dc(dc_id, server_address, port)
        self._submit()

    @MemorySession.auth_key.setter  # type: ignore[untyped-decorator]  # Telethon is untyped
    def auth_key(self, value: AuthKey | None) -> None:
        self._auth_key = value
        self._submit()

    def set_update_state(self, entity_id: int, state: Any) -> None:
        # Written on the next save()/close(): Telethon sets states in bursts, then saves.
        if entity_id != 0:
            marked = _marked_channel(entity_id)
            row = self._lru.get(marked)
            if row is not None:
                self._channel_hashes[marked] = row[1]
            elif marked not in self._channel_hashes:
                return  # no access hash: a catch-up could not use this state anyway
        super().set_update_state(entity_id, state)

    def save(self) -> None:
        self._submit()

    def close(self) -> None:
        self._submit(force=True)

    def delete(self) -> None:
        """Called by ``log_out()``: the key is dead, drop the stored session."""
        self._auth_key = None
        self._self_id = None
        self._update_states.clear()
        self._channel_hashes.clear()
        self._lru.clear()
        try:
            fut = self._store.submit_delete(self._account)
        except TgdaemonError as exc:
            log.error("account %s: session not deleted: %s", self._account, exc)
            self._error = exc
            return
        self._last_submitted = self.snapshot()  # flush() must not resurrect the record
        self._track(fut)

    def clone(self, to_instance: Any = None) -> MemorySession:
        # Telethon clones for CDN/exported senders: those must never overwrite our record.
        return to_instance or MemorySession()

    # -- bounded entity cache ----------------------------------------------------------

    def process_entities(self, tlo: Any) -> None:
        changed_self = False
        for row in self._entities_to_rows(tlo):
            if row[0] == 0:  # Telethon's marker for the own user: InputPeerUser(0, self_id)
                if row[1] != self._self_id:
                    self._self_id = row[1]
                    changed_self = True
                continue
            self._lru[row[0]] = row
            self._lru.move_to_end(row[0])
        while len(self._lru) > self._entity_cache_size:
            self._lru.popitem(last=False)
        if changed_self:
            self._submit()  # the own user id is what makes the session "logged in"

    def get_input_entity(self, key: Any) -> Any:
        if isinstance(key, int) and not isinstance(key, bool) and key == 0:
            if self._self_id is None:
                raise ValueError("Could not find input entity with key ", key)
            return types.InputPeerUser(0, self._self_id)
        return super().get_input_entity(key)

    def _find(self, index: int, value: Any) -> tuple[int, int] | None:
        for row in reversed(self._lru.values()):
            if row[index] == value:
                self._lru.move_to_end(row[0])
                return row[0], row[1]
        return None

    def get_entity_rows_by_phone(self, phone: Any) -> tuple[int, int] | None:
        return self._find(3, phone)

    def get_entity_rows_by_username(self, username: Any) -> tuple[int, int] | None:
        return self._find(2, username)

    def get_entity_rows_by_name(self, name: Any) -> tuple[int, int] | None:
        return self._find(4, name)

    def get_entity_rows_by_id(self, id: int, exact: bool = True) -> tuple[int, int] | None:
        if exact:
            ids: tuple[int, ...] = (id,)
        else:
            ids = (utils.get_peer_id(PeerUser(id)), utils.get_peer_id(PeerChat(id)),
                   utils.get_peer_id(PeerChannel(id)))
        for i in ids:
            row = self._lru.get(i)
            if row is not None:
                self._lru.move_to_end(i)
                return row[0], row[1]
            access_hash = self._channel_hashes.get(i)
            if access_hash is not None:
                return i, access_hash
        return None

    @property
    def entity_count(self) -> int:
        return len(self._lru)


def _same_login(a: SessionData, b: SessionData) -> bool:
    """True when two snapshots differ at most in their update state."""
    return a == dataclasses.replace(b, pts=a.pts, qts=a.qts, date=a.date, seq=a.seq,
                                    channels=a.channels)


def _marked_channel(channel_id: int) -> int:
    """Telethon's marked id of a channel (how the entity cache keys it)."""
    return int(utils.get_peer_id(PeerChannel(channel_id)))
