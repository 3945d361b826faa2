"""Account updates as JSON events, in a bounded, persisted, resumable buffer.

Every event gets one daemon-wide sequence number; a consumer's cursor is that number plus the
buffer's epoch (a random id of the database, so a cursor from another state directory is
refused rather than misread), base64url-encoded and opaque to clients. A consumer that
reconnects with its last cursor gets every event after it that is still held: the newest
``updates_buffer`` events of each account, kept in SQLite (``api-updates.sqlite3`` in the
state directory, event bodies encrypted with the daemon's key ring: they hold message text).
When an account's older events were dropped past a consumer's cursor, it gets one ``gap``
event for that account instead of silence.

Writes are batched by one writer task in a thread (one commit per ~100 ms of events), so a
burst of updates costs the event loop a list append per event.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import os
import secrets
import sqlite3
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Container, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from telethon import events as tevents
from telethon.tl import types as tl

from tgdaemon.httpsend import Refusals

if TYPE_CHECKING:
    from tgdaemon.crypto import KeyRing
    from tgdaemon.telegram import ManagedClient

log = logging.getLogger("tgdaemon.api.events")

DB_NAME = "api-updates.sqlite3"
PURPOSE = "api-event"
FLUSH_INTERVAL = 0.1
#: Pending events that start a write without waiting for FLUSH_INTERVAL.
FLUSH_BATCH = 1000
#: Events a live subscriber may fall behind before it is closed (it resumes by cursor).
SUBSCRIBER_QUEUE = 4096
#: Held events a resuming consumer's backlog reads (and decrypts, in the buffer's thread) at a
#: time: what it costs does not grow with what is held (up to ``updates_buffer`` per account,
#: 10 million at 10,000 accounts), and the loop only forwards them.
BACKLOG_PAGE = 256
#: Up to this many named accounts, a backlog page is read by account (SQLite's index); more
#: (a URL holds up to ~4,000 names) are filtered while reading every account's rows.
NAMED_QUERY = 500


#: The accounts a consumer gets events of (``name in accounts``; None: every account): a set
#: of names, or a client's patterns matched as events come (no set of the whole fleet per
#: stream).
Accounts = Container[str] | None


class EventKind(StrEnum):
    MESSAGE = "message"
    EDIT = "edit"
    DELETE = "delete"
    READ = "read"
    GAP = "gap"  # events of this account after the cursor were dropped from the buffer


# -- cursors ------------------------------------------------------------------------------------


class CursorError(ValueError):
    """A cursor this daemon did not issue (another state directory, or garbage)."""


def encode_cursor(epoch: str, seq: int) -> str:
    return base64.urlsafe_b64encode(f"{epoch}:{seq}".encode()).decode().rstrip("=")


def decode_cursor(epoch: str, cursor: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
        got_epoch, _, seq = raw.partition(":")
        value = int(seq)
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise CursorError("not a cursor issued by this daemon") from None
    if got_epoch != epoch or value < 0:
        raise CursorError("cursor from another daemon state: start without one")
    return value


# -- Telegram updates -> event bodies (pure) --------------------------------------------------


def peer_json(peer: Any) -> dict[str, Any] | None:
    if isinstance(peer, tl.PeerUser):
        return {"type": "user", "id": peer.user_id}
    if isinstance(peer, tl.PeerChat):
        return {"type": "chat", "id": peer.chat_id}
    if isinstance(peer, tl.PeerChannel):
        return {"type": "channel", "id": peer.channel_id}
    return None


def _ts(value: Any) -> int | None:
    return int(value.timestamp()) if isinstance(value, datetime) else None


def message_json(msg: Any) -> dict[str, Any]:
    """The fields every consumer needs; the whole object is one ``invoke`` away."""
    reply = getattr(msg, "reply_to", None)
    return {
        "id": msg.id,
        "peer": peer_json(msg.peer_id),
        "from": peer_json(getattr(msg, "from_id", None)),
        "date": _ts(getattr(msg, "date", None)),
        "out": bool(getattr(msg, "out", False)),
        "text": getattr(msg, "message", None),
        "replyTo": getattr(reply, "reply_to_msg_id", None),
        "editDate": _ts(getattr(msg, "edit_date", None)),
        "service": isinstance(msg, tl.MessageService),
    }


def event_from_update(update: Any) -> tuple[EventKind, dict[str, Any]] | None:
    """The event for one Telegram update, or None for updates the stream does not carry."""
    match update:
        case tl.UpdateNewMessage() | tl.UpdateNewChannelMessage():
            if isinstance(update.message, tl.MessageEmpty):
                return None
            return EventKind.MESSAGE, {"message": message_json(update.message)}
        case tl.UpdateEditMessage() | tl.UpdateEditChannelMessage():
            if isinstance(update.message, tl.MessageEmpty):
                return None
            return EventKind.EDIT, {"message": message_json(update.message)}
        case tl.UpdateDeleteMessages():
            return EventKind.DELETE, {"peer": None, "messageIds": list(update.messages)}
        case tl.UpdateDeleteChannelMessages():
            return EventKind.DELETE, {"peer": {"type": "channel", "id": update.channel_id},
                                      "messageIds": list(update.messages)}
        case tl.UpdateReadHistoryInbox():
            return EventKind.READ, {"direction": "inbox", "peer": peer_json(update.peer),
                                    "maxId": update.max_id}
        case tl.UpdateReadHistoryOutbox():
            return EventKind.READ, {"direction": "outbox", "peer": peer_json(update.peer),
                                    "maxId": update.max_id}
        case tl.UpdateReadChannelInbox():
            return EventKind.READ, {"direction": "inbox", "maxId": update.max_id,
                                    "peer": {"type": "channel", "id": update.channel_id}}
        case tl.UpdateReadChannelOutbox():
            return EventKind.READ, {"direction": "outbox", "maxId": update.max_id,
                                    "peer": {"type": "channel", "id": update.channel_id}}
    return None


# -- the buffer -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Event:
    seq: int
    account: str
    kind: EventKind
    body: dict[str, Any]

    def to_json(self, epoch: str) -> dict[str, Any]:
        return {"cursor": encode_cursor(epoch, self.seq), "account": self.account,
                "type": self.kind.value, **self.body}


class EventEncoder:
    """Each live event becomes its JSON text once, however many streams send it (64 streams
    of every account encoded every event 64 times on the loop). The newest ``size``
    encodings are kept: a stream further behind than that is closed anyway."""

    def __init__(self, size: int = SUBSCRIBER_QUEUE) -> None:
        self._size = size
        self._cache: OrderedDict[int, bytes] = OrderedDict()

    def encode(self, event: Event, epoch: str) -> bytes:
        text = self._cache.get(event.seq)
        if text is None:
            text = self._cache[event.seq] = json.dumps(event.to_json(epoch)).encode()
            if len(self._cache) > self._size:
                self._cache.popitem(last=False)
        return text


class Subscriber:
    """A live consumer's queue; closed (``overflowed``) when it falls too far behind. What it
    got is always a prefix of what it was offered (no hole), so resuming from the last cursor
    it received loses nothing."""

    def __init__(self, accounts: Accounts, maxsize: int = SUBSCRIBER_QUEUE) -> None:
        self.accounts = accounts
        self.overflowed = False
        self.closed = False
        self._maxsize = maxsize
        # One slot more than the limit: the end marker always fits.
        self._queue: asyncio.Queue[Event | None] = asyncio.Queue(maxsize + 1)

    def wants(self, account: str) -> bool:
        return self.accounts is None or account in self.accounts

    def offer(self, event: Event) -> None:
        if self.closed:
            return
        if self._queue.qsize() >= self._maxsize:
            self.overflowed = True
            self.close()
            return
        self._queue.put_nowait(event)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._queue.put_nowait(None)

    async def __aiter__(self) -> AsyncIterator[Event]:
        while (event := await self._queue.get()) is not None:
            yield event


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY, account TEXT NOT NULL, kind TEXT NOT NULL, body BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS events_account ON events (account, seq);
CREATE TABLE IF NOT EXISTS dropped (account TEXT PRIMARY KEY, seq INTEGER NOT NULL);
"""


class UpdateBuffer:
    """See module docstring. ``open()`` does the I/O; the constructor only stores settings."""

    def __init__(self, state_dir: Path, keyring: KeyRing, size: int) -> None:
        self._path = state_dir / DB_NAME
        self._keyring = keyring
        self.size = size
        self.epoch = ""
        self._db: sqlite3.Connection | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._next_seq = 1
        self._pending: list[Event] = []
        self._dropped: dict[str, int] = {}
        self._subscribers: set[Subscriber] = set()
        self._writer: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._flushed = asyncio.Condition()
        self._written_seq = 0
        self._attached: dict[int, str] = {}
        #: Live events' JSON, shared by the streams (backlogs are encoded per stream).
        self.encoder = EventEncoder()
        self.undecryptable = Refusals("held update event", "it could not be decrypted (its "
                                      "key left the ring)", verb="skipped", logger=log)

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tgdaemon-events")
        await self._in_thread(self._open_db)
        self._writer = asyncio.create_task(self._write_loop(), name="api-events-writer")

    def _open_db(self) -> None:
        db = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        os.chmod(self._path, 0o600)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(_SCHEMA)
        row = db.execute("SELECT v FROM meta WHERE k='epoch'").fetchone()
        if row is None:
            self.epoch = secrets.token_hex(8)
            db.execute("INSERT INTO meta VALUES ('epoch', ?)", (self.epoch,))
        else:
            self.epoch = str(row[0])
        (last,) = db.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()
        (dropped_max,) = db.execute("SELECT COALESCE(MAX(seq), 0) FROM dropped").fetchone()
        self._next_seq = max(int(last), int(dropped_max)) + 1
        self._written_seq = self._next_seq - 1
        self._dropped = {str(a): int(s) for a, s in db.execute("SELECT account, seq FROM dropped")}
        self._db = db

    async def close(self) -> None:
        for sub in tuple(self._subscribers):
            sub.close()
        if self._writer is not None:
            self._writer.cancel()
            await asyncio.wait([self._writer])
            self._writer = None
        if self._executor is not None:
            with contextlib.suppress(Exception):
                await self._in_thread(self._write, self._take_pending())
            await self._in_thread(self._close_db)
            self._executor.shutdown(wait=True)
            self._executor = None

    def _close_db(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    async def _in_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        assert self._executor is not None
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # -- Telethon side ---------------------------------------------------------------------

    def attach(self, account: str, client: ManagedClient) -> None:
        """Listen to ``client``'s updates (a worker hook: once per client object)."""

        async def on_update(update: Any) -> None:
            self.add_update(account, update)

        client.add_event_handler(on_update, tevents.Raw())

    def add_update(self, account: str, update: Any) -> Event | None:
        converted = event_from_update(update)
        if converted is None:
            return None
        return self.append(account, *converted)

    def append(self, account: str, kind: EventKind, body: dict[str, Any]) -> Event:
        event = Event(self._next_seq, account, kind, body)
        self._next_seq += 1
        self._pending.append(event)
        self._wake.set()
        for sub in tuple(self._subscribers):
            if sub.wants(account):
                sub.offer(event)
        return event

    # -- consumers -------------------------------------------------------------------------

    @property
    def last_seq(self) -> int:
        return self._next_seq - 1

    def subscribe(self, accounts: Accounts) -> Subscriber:
        sub = Subscriber(accounts)
        self._subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        sub.close()
        self._subscribers.discard(sub)

    async def backlog(self, accounts: Accounts, after: int,
                      upto: int) -> AsyncIterator[Event]:
        """Held events with ``after < seq <= upto``, gap events first, read
        :data:`BACKLOG_PAGE` at a time as the consumer takes them."""
        await self.flush(upto)
        for account, seq in sorted(self._dropped.items()):
            if seq > after and (accounts is None or account in accounts):
                yield Event(after, account, EventKind.GAP, {"droppedThrough": seq})
        while after < upto:
            page: tuple[int, list[Event]] = await self._in_thread(self._read, accounts, after,
                                                                  upto)
            after, events = page
            for event in events:
                yield event

    def _read(self, accounts: Accounts, after: int, upto: int
              ) -> tuple[int, list[Event]]:
        """In the buffer's thread: the next page after ``after``, decrypted; returns the last
        sequence number read (``upto`` when nothing is left) and the page's events."""
        assert self._db is not None
        if isinstance(accounts, frozenset) and 0 < len(accounts) <= NAMED_QUERY:
            # Named accounts: their rows alone, through the (account, seq) index. Filtering
            # every account's rows here cost a consumer of one account a scan of the whole
            # buffer (10 million rows at 10,000 accounts) for its up to updates_buffer events.
            marks = ",".join("?" * len(accounts))
            rows = self._db.execute(
                f"SELECT seq, account, kind, body FROM events WHERE account IN ({marks}) "
                "AND seq > ? AND seq <= ? ORDER BY seq LIMIT ?",
                (*sorted(accounts), after, upto, BACKLOG_PAGE)).fetchall()
        else:
            rows = self._db.execute(
                "SELECT seq, account, kind, body FROM events WHERE seq > ? AND seq <= ? "
                "ORDER BY seq LIMIT ?", (after, upto, BACKLOG_PAGE)).fetchall()
        events = []
        for seq, account, kind, blob in rows:
            if accounts is not None and account not in accounts:
                continue
            try:
                body = json.loads(self._keyring.decrypt(bytes(blob), account=str(account),
                                                        purpose=f"{PURPOSE}:{seq}"))
            except Exception:  # a key removed from the ring: the event is lost
                self.undecryptable.note()  # every resume reads them again: summarised
                continue
            events.append(Event(int(seq), str(account), EventKind(kind), body))
        return (int(rows[-1][0]) if len(rows) == BACKLOG_PAGE else upto), events

    # -- writer ----------------------------------------------------------------------------

    async def flush(self, upto: int | None = None) -> None:
        """Wait until every event up to ``upto`` (default: all so far) is on disk."""
        target = self.last_seq if upto is None else upto
        async with self._flushed:
            self._wake.set()
            await self._flushed.wait_for(lambda: self._written_seq >= target)

    def _take_pending(self) -> list[Event]:
        batch, self._pending = self._pending, []
        return batch

    async def _write_loop(self) -> None:
        while True:
            await self._wake.wait()
            if len(self._pending) < FLUSH_BATCH:
                await asyncio.sleep(FLUSH_INTERVAL)  # batch what arrives meanwhile
            self._wake.clear()
            batch = self._take_pending()
            if batch:
                try:
                    self._dropped.update(await self._in_thread(self._write, batch))
                except Exception as exc:
                    log.error("update events could not be written: %s", type(exc).__name__)
            async with self._flushed:
                if batch:
                    self._written_seq = max(self._written_seq, batch[-1].seq)
                self._written_seq = max(self._written_seq, self.last_seq - len(self._pending))
                self._flushed.notify_all()

    def _write(self, batch: list[Event]) -> dict[str, int]:
        """Runs in the writer thread: insert, then trim each touched account to ``size``.
        Returns, per trimmed account, the newest sequence number dropped."""
        if not batch or self._db is None:
            return {}
        rows = [(e.seq, e.account, e.kind.value,
                 self._keyring.encrypt(json.dumps(e.body).encode(), account=e.account,
                                       purpose=f"{PURPOSE}:{e.seq}")) for e in batch]
        db = self._db
        db.execute("BEGIN")
        try:
            db.executemany("INSERT INTO events VALUES (?, ?, ?, ?)", rows)
            dropped = {}
            for account in _unique(e.account for e in batch):
                cut = self._trim(db, account)
                if cut is not None:
                    dropped[account] = cut
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return dropped

    def _trim(self, db: sqlite3.Connection, account: str) -> int | None:
        row = db.execute("SELECT seq FROM events WHERE account = ? ORDER BY seq DESC "
                         "LIMIT 1 OFFSET ?", (account, self.size)).fetchone()
        if row is None:
            return None
        cut = int(row[0])
        db.execute("DELETE FROM events WHERE account = ? AND seq <= ?", (account, cut))
        db.execute("INSERT OR REPLACE INTO dropped VALUES (?, ?)", (account, cut))
        return cut


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))
