"""Update history of the local DC: what a client missed while it was away.

The model is deliberately plain: every pts-bearing update the server produces for a user is
appended to **one ordered log per user** (the account "box"), and every update of a channel to
one log per channel. A log entry is the update object itself (it carries its own ``pts`` and
``pts_count``), persisted in the localdc SQLite file, so a restarted localdc still answers
``updates.getDifference`` for updates made before the restart. Logs keep the newest
``history_limit`` entries; a client whose pts is older than that gets the "too long" answers,
as from Telegram.

Other localdc modules build on this: :meth:`UpdateHistory.record` is how any server-side change
(a new message, an edit, a read mark, a deletion) enters a user's box; it bumps the user's pts by
the update's ``pts_count``, logs it and returns it, and :meth:`World.deliver` pushes it.

Behaviour follows https://core.telegram.org/api/updates and the method pages:

* ``updates.getDifference``: ``differenceEmpty`` when up to date; ``differenceTooLong`` when
  the client's pts is older than the log or more than ``pts_total_limit`` behind; otherwise at
  most ``slice_limit`` (or the client's ``pts_limit``) updates per answer: ``differenceSlice``
  with an ``intermediate_state``
  while more remain, ``difference`` with the final state. New messages go to ``new_messages``,
  every other update to ``other_updates``. Channels the user is in that changed at or after the
  client's ``date`` are announced with ``updateChannelTooLong`` (the client then asks
  ``updates.getChannelDifference`` from its own channel pts).
* ``updates.getChannelDifference``: ``channelDifferenceEmpty`` when up to date;
  ``channelDifferenceTooLong`` when ``pts + limit`` is behind the channel or the client's pts
  is older than the log; otherwise ``channelDifference`` (``final`` unless more than
  ``slice_limit`` remain).

One channel type is modelled: broadcast channels (posts come from the channel itself), with a
member list; members get each post pushed as ``updateNewChannelMessage``.

Note for builders on top: Telethon 1.45 drops account-box ``other_updates`` of a difference
(its MessageBox sees them as already covered by the difference's state), so edits, read marks
and deletions made while a client was away reach it through history calls, not handlers.
"""

from __future__ import annotations

import sqlite3
import struct
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from telethon.errors import TypeNotFoundError
from telethon.extensions import BinaryReader
from telethon.tl import functions as fn
from telethon.tl import types as tl
from telethon.tl.types import updates as tl_updates

from tgdaemon.localdc.rpc import Ctx, RpcFail, World, _handles

if TYPE_CHECKING:
    from tgdaemon.localdc.store import Store

#: Entries kept per log; older ones are forgotten and a client that far behind gets "too long".
HISTORY_LIMIT = 1000
#: Updates per difference answer (Telegram caps a difference too; clients loop on slices).
SLICE_LIMIT = 100
#: getChannelDifference's limit for user accounts (Telegram: at most 100 for users).
CHANNEL_DIFF_TIMEOUT = 30
FIRST_CHANNEL_ID = 1_000_000_001

_SCHEMA = """
CREATE TABLE IF NOT EXISTS update_log (
    box INTEGER NOT NULL, pts INTEGER NOT NULL, body BLOB NOT NULL, PRIMARY KEY (box, pts)
);
CREATE TABLE IF NOT EXISTS channel_log (
    box INTEGER NOT NULL, pts INTEGER NOT NULL, body BLOB NOT NULL, PRIMARY KEY (box, pts)
);
CREATE TABLE IF NOT EXISTS message_ids (box INTEGER PRIMARY KEY, last INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS channels (
    id INTEGER PRIMARY KEY, access_hash INTEGER NOT NULL, title TEXT NOT NULL,
    pts INTEGER NOT NULL, changed INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS channel_members (
    channel INTEGER NOT NULL, user INTEGER NOT NULL, PRIMARY KEY (channel, user)
);
"""


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


class OpaqueUpdate:
    """An update of a layer newer than the client's: a constructor id Telethon does not know
    and a body, carrying a pts like any other (what a real server rolling out a new layer
    sends). Serialises as its raw bytes."""

    def __init__(self, raw: bytes, pts: int, pts_count: int = 1) -> None:
        self.raw = raw
        self.pts = pts
        self.pts_count = pts_count

    def _bytes(self) -> bytes:
        return self.raw

    def __bytes__(self) -> bytes:
        return self.raw


def _parse(body: bytes, pts: int) -> Any:
    try:
        return BinaryReader(body).tgread_object()
    except TypeNotFoundError:
        return OpaqueUpdate(body, pts)


def pts_of(update: Any) -> tuple[int, int]:
    """(pts, pts_count) of a pts-bearing update."""
    return int(update.pts), int(getattr(update, "pts_count", 1) or 0)


class PtsLog:
    """Ordered pts-bearing updates per box (a user's account box, or a channel), bounded and
    written through to one table. ``floor(box)`` is the pts the retained entries start from:
    a difference from any pts >= floor can be answered exactly."""

    def __init__(self, db: sqlite3.Connection | None, table: str, limit: int) -> None:
        self._db = db
        self._table = table
        self._limit = limit
        self._logs: dict[int, deque[Any]] = {}
        self._floor: dict[int, int] = {}
        if db is not None:
            for box, pts, body in db.execute(
                    f"SELECT box, pts, body FROM {table} ORDER BY box, pts"):
                self._keep(box, _parse(bytes(body), pts), persist=False)

    def append(self, box: int, update: Any) -> None:
        self._keep(box, update, persist=True)

    def _keep(self, box: int, update: Any, *, persist: bool) -> None:
        log = self._logs.get(box)
        if log is None:
            log = self._logs[box] = deque()
            pts, count = pts_of(update)
            self._floor[box] = pts - count
        log.append(update)
        if persist and self._db is not None:
            self._db.execute(f"INSERT OR REPLACE INTO {self._table} VALUES (?, ?, ?)",
                             (box, pts_of(update)[0], bytes(update)))
        while len(log) > self._limit:
            dropped = log.popleft()
            self._floor[box] = pts_of(dropped)[0]
            if self._db is not None:
                self._db.execute(f"DELETE FROM {self._table} WHERE box=? AND pts<=?",
                                 (box, self._floor[box]))

    def floor(self, box: int, current_pts: int) -> int:
        """Oldest pts a difference can start from (the current pts when nothing is logged)."""
        return self._floor.get(box, current_pts)

    def after(self, box: int, pts: int) -> list[Any]:
        """Logged updates newer than ``pts``, oldest first."""
        return [u for u in self._logs.get(box, ()) if pts_of(u)[0] > pts]

    def entries(self, box: int) -> list[Any]:
        return list(self._logs.get(box, ()))


@dataclass(frozen=True)
class ChannelRecord:
    id: int
    access_hash: int
    title: str
    pts: int
    changed: int  # unix time of the last update, for getDifference's updateChannelTooLong
    members: frozenset[int]

    def tl(self) -> tl.Channel:
        return tl.Channel(id=self.id, title=self.title, photo=tl.ChatPhotoEmpty(),
                          date=datetime.fromtimestamp(self.changed, UTC),
                          access_hash=self.access_hash, broadcast=True)


class UpdateHistory:
    """Every user's and channel's update log, message ids and channels (see module doc)."""

    def __init__(self, store: Store, *, history_limit: int = HISTORY_LIMIT,
                 slice_limit: int = SLICE_LIMIT) -> None:
        self.store = store
        self.slice_limit = slice_limit
        db = store.db
        if db is not None:
            db.executescript(_SCHEMA)
        self._db = db
        self.account = PtsLog(db, "update_log", history_limit)
        self.channel_log = PtsLog(db, "channel_log", history_limit)
        self._message_ids: dict[int, int] = {}
        self.channels: dict[int, ChannelRecord] = {}
        if db is not None:
            self._message_ids.update(db.execute("SELECT box, last FROM message_ids"))
            members: dict[int, set[int]] = {}
            for channel, user in db.execute("SELECT channel, user FROM channel_members"):
                members.setdefault(channel, set()).add(user)
            for cid, ah, title, pts, changed in db.execute(
                    "SELECT id, access_hash, title, pts, changed FROM channels"):
                self.channels[cid] = ChannelRecord(cid, ah, title, pts, changed,
                                                   frozenset(members.get(cid, ())))

    def _exec(self, sql: str, args: tuple[object, ...]) -> None:
        if self._db is not None:
            self._db.execute(sql, args)

    # -- account boxes -----------------------------------------------------------------------

    def next_message_id(self, box: int) -> int:
        """The next message id of a user's private box (or a channel): 1, 2, 3..."""
        last = self._message_ids.get(box, 0) + 1
        self._message_ids[box] = last
        self._exec("INSERT OR REPLACE INTO message_ids VALUES (?, ?)", (box, last))
        return last

    def record(self, user_id: int, make: Callable[[int], Any], pts_count: int = 1) -> Any:
        """Bump the user's pts by ``pts_count``, build the update with the new pts
        (``make(pts)``), log it and return it (the caller pushes it)."""
        pts = self.store.bump_pts(user_id, pts_count)
        update = make(pts)
        self.account.append(user_id, update)
        return update

    # -- channels ----------------------------------------------------------------------------

    def create_channel(self, title: str, members: Iterable[int], access_hash: int) -> ChannelRecord:
        cid = max(self.channels, default=FIRST_CHANNEL_ID - 1) + 1
        rec = ChannelRecord(cid, access_hash, title, 1, int(_now().timestamp()),
                            frozenset(members))
        self._save_channel(rec)
        for user in rec.members:
            self._exec("INSERT OR REPLACE INTO channel_members VALUES (?, ?)", (cid, user))
        return rec

    def _save_channel(self, rec: ChannelRecord) -> None:
        self.channels[rec.id] = rec
        self._exec("INSERT OR REPLACE INTO channels VALUES (?, ?, ?, ?, ?)",
                   (rec.id, rec.access_hash, rec.title, rec.pts, rec.changed))

    def record_channel(self, channel_id: int, make: Callable[[int], Any],
                       pts_count: int = 1) -> Any:
        rec = self.channels[channel_id]
        rec = replace(rec, pts=rec.pts + pts_count, changed=int(_now().timestamp()))
        self._save_channel(rec)
        update = make(rec.pts)
        self.channel_log.append(channel_id, update)
        return update

    def channels_of(self, user_id: int) -> list[ChannelRecord]:
        return [c for c in self.channels.values() if user_id in c.members]


# -- World operations built on the history ------------------------------------------------------


def new_channel_post(w: World, channel_id: int, text: str) -> tl.Message:
    """Post ``text`` in a broadcast channel and push it to every member's sessions."""
    history = w.history
    if channel_id not in history.channels:
        raise KeyError(f"unknown channel {channel_id}")
    msg_id = history.next_message_id(-channel_id)
    msg = tl.Message(id=msg_id, peer_id=tl.PeerChannel(channel_id), date=_now(), message=text,
                     post=True)
    upd = history.record_channel(
        channel_id, lambda pts: tl.UpdateNewChannelMessage(message=msg, pts=pts, pts_count=1))
    chats = [history.channels[channel_id].tl()]
    for user in history.channels[channel_id].members:
        w.push(user, tl.Updates(updates=[upd], users=[], chats=chats, date=_now(), seq=0), None)
    return msg


def new_unknown_update(w: World, user_id: int, constructor_id: int, body: bytes) -> None:
    """Record an update whose constructor the client's layer does not know (see
    :class:`OpaqueUpdate`) in the user's box and push it, inside an ``updates``."""
    raw = struct.pack("<I", constructor_id) + body
    upd = w.history.record(user_id, lambda pts: OpaqueUpdate(raw, pts))
    w.deliver(user_id, [upd])


def _split(updates: list[Any]) -> tuple[list[Any], list[Any]]:
    """(new messages, other updates) of a stretch of a log, as a difference carries them."""
    messages = [u.message for u in updates
                if isinstance(u, (tl.UpdateNewMessage, tl.UpdateNewChannelMessage))]
    others = [u for u in updates
              if not isinstance(u, (tl.UpdateNewMessage, tl.UpdateNewChannelMessage))]
    return messages, others


@_handles(fn.updates.GetDifferenceRequest)
def _get_difference(w: World, ctx: Ctx, req: Any) -> Any:
    me = w.user(ctx)
    history = w.history
    now = _now()
    if req.pts < 1:
        raise RpcFail(400, "PERSISTENT_TIMESTAMP_EMPTY")
    if req.pts > me.pts:
        raise RpcFail(400, "PERSISTENT_TIMESTAMP_INVALID")
    since = int(req.date.timestamp()) if req.date else 0
    changed = [c for c in history.channels_of(me.id) if c.changed >= since]
    if req.pts == me.pts and not changed:
        return tl_updates.DifferenceEmpty(date=now, seq=0)
    limit = req.pts_total_limit
    if req.pts < history.account.floor(me.id, me.pts) or (limit and me.pts - req.pts > limit):
        return tl_updates.DifferenceTooLong(pts=me.pts)
    pending = history.account.after(me.id, req.pts)
    chunk = pending[:min(history.slice_limit, req.pts_limit or history.slice_limit)]
    messages, others = _split(chunk)
    users = [w.tl_user(me, me.id), w.service_user()]
    if len(chunk) < len(pending):
        last = pts_of(chunk[-1])[0]
        state = tl_updates.State(pts=last, qts=0, date=now, seq=0, unread_count=0)
        return tl_updates.DifferenceSlice(new_messages=messages, new_encrypted_messages=[],
                                          other_updates=others, chats=[], users=users,
                                          intermediate_state=state)
    others += [tl.UpdateChannelTooLong(channel_id=c.id, pts=c.pts) for c in changed]
    return tl_updates.Difference(new_messages=messages, new_encrypted_messages=[],
                                 other_updates=others, chats=[c.tl() for c in changed],
                                 users=users, state=w.state(me))


def _channel_for(w: World, me_id: int, inp: Any) -> ChannelRecord:
    channel_id = getattr(inp, "channel_id", None)
    rec = w.history.channels.get(channel_id) if isinstance(channel_id, int) else None
    if rec is None or rec.access_hash != getattr(inp, "access_hash", None):
        raise RpcFail(400, "CHANNEL_INVALID")
    if me_id not in rec.members:
        raise RpcFail(400, "CHANNEL_PRIVATE")
    return rec


@_handles(fn.updates.GetChannelDifferenceRequest)
def _get_channel_difference(w: World, ctx: Ctx, req: Any) -> Any:
    me = w.user(ctx)
    rec = _channel_for(w, me.id, req.channel)
    history = w.history
    if req.pts < 1 or req.pts > rec.pts:
        raise RpcFail(400, "PERSISTENT_TIMESTAMP_INVALID")
    if req.pts == rec.pts:
        return tl_updates.ChannelDifferenceEmpty(pts=rec.pts, final=True,
                                                 timeout=CHANNEL_DIFF_TIMEOUT)
    logged = history.channel_log.entries(rec.id)
    if req.pts < history.channel_log.floor(rec.id, rec.pts) or req.pts + req.limit < rec.pts:
        top = logged[-1].message.id if logged else 0
        dialog = tl.Dialog(peer=tl.PeerChannel(rec.id), top_message=top, read_inbox_max_id=0,
                           read_outbox_max_id=0, unread_count=0, unread_mentions_count=0,
                           unread_reactions_count=0, unread_poll_votes_count=0,
                           notify_settings=tl.PeerNotifySettings(),
                           pts=rec.pts)
        recent = [u.message for u in logged[-req.limit:]
                  if isinstance(u, tl.UpdateNewChannelMessage)]
        return tl_updates.ChannelDifferenceTooLong(
            dialog=dialog, messages=recent, chats=[rec.tl()], users=[], final=True,
            timeout=CHANNEL_DIFF_TIMEOUT)
    pending = history.channel_log.after(rec.id, req.pts)
    chunk = pending[:min(req.limit, history.slice_limit)]
    messages, others = _split(chunk)
    return tl_updates.ChannelDifference(
        pts=pts_of(chunk[-1])[0], new_messages=messages, other_updates=others,
        chats=[rec.tl()], users=[], final=len(chunk) == len(pending),
        timeout=CHANNEL_DIFF_TIMEOUT)


@_handles(fn.channels.GetChannelsRequest)
def _get_channels(w: World, ctx: Ctx, req: Any) -> Any:
    from telethon.tl.types import messages as tl_messages

    me = w.user(ctx)
    return tl_messages.Chats(chats=[_channel_for(w, me.id, c).tl() for c in req.id])
