"""The state database: accounts, encrypted Telethon sessions and the DC address cache.

One aiosqlite connection does all the work, guarded by one asyncio lock, so every write is a
``BEGIN IMMEDIATE`` transaction that never interleaves with another.  Session writes go
through a queue drained by a single writer task: submissions for the same account coalesce,
and up to ``_BATCH`` accounts are written per transaction, which keeps 10,000 accounts at a
handful of fsyncs instead of one per change.  Session transactions run with
``synchronous=FULL`` (a lost auth key is a lost login); metadata uses ``NORMAL`` (WAL keeps it
consistent, at worst the last few updates of ``last_used`` are lost on power failure).

A ``flock`` on ``<state_dir>/tgdaemon.lock`` keeps a second daemon off the same state: two
clients on one auth key end in AUTH_KEY_DUPLICATED and Telegram revokes it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import itertools
import json
import logging
import os
import sqlite3
import stat
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import aiosqlite

from tgdaemon.crypto import KeyRing, record_key_id
from tgdaemon.exceptions import (
    AccountError,
    DecryptionError,
    StateLockedError,
    StoreError,
    TgdaemonError,
)
from tgdaemon.migrations import LATEST, MIGRATIONS

log = logging.getLogger("tgdaemon.store")

DB_NAME = "tgdaemon.sqlite3"
LOCK_NAME = "tgdaemon.lock"
SESSION_PURPOSE = "session"
_BATCH = 500
_AUTH_KEY_SIZE = 256


# -- values ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceInfo:
    device_model: str
    system_version: str
    app_version: str


@dataclass(frozen=True)
class AccountRecord:
    name: str
    user_id: int | None
    username: str | None
    first_name: str | None
    status: str
    created_at: float
    last_used: float | None
    last_checked: float | None
    device: DeviceInfo | None
    dc_id: int | None
    last_error_category: str | None


@dataclass(frozen=True)
class SessionData:
    """What a Telethon session needs to reconnect as the same authorised client."""

    dc_id: int
    server_address: str
    port: int
    auth_key: bytes | None = field(repr=False)
    user_id: int | None = None
    # general update state (entity 0); channel states are not persisted
    pts: int | None = None
    qts: int | None = None
    date: int | None = None
    seq: int | None = None

    def __post_init__(self) -> None:
        # Telethon keeps the DH result as its shortest big-endian bytes: about one key in 256
        # is 255 bytes (a leading zero byte dropped) and its key id is computed over exactly
        # those bytes, so they are stored as they are.
        if self.auth_key is not None and not 0 < len(self.auth_key) <= _AUTH_KEY_SIZE:
            raise ValueError(f"auth key must be 1 to {_AUTH_KEY_SIZE} bytes")
        if not 0 <= self.port <= 65535:
            raise ValueError("port out of range")

    @property
    def has_auth_key(self) -> bool:
        return self.auth_key is not None

    def to_bytes(self) -> bytes:
        doc: dict[str, Any] = {
            "v": 1, "dc": self.dc_id, "addr": self.server_address, "port": self.port,
            "key": None if self.auth_key is None else base64.b64encode(self.auth_key).decode(),
            "uid": self.user_id, "pts": self.pts, "qts": self.qts, "date": self.date,
            "seq": self.seq,
        }
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> SessionData:
        doc = json.loads(raw)
        if doc.get("v") != 1:
            raise ValueError(f"unknown session format {doc.get('v')!r}")
        key = doc["key"]
        return cls(
            dc_id=doc["dc"], server_address=doc["addr"], port=doc["port"],
            auth_key=None if key is None else base64.b64decode(key), user_id=doc["uid"],
            pts=doc["pts"], qts=doc["qts"], date=doc["date"], seq=doc["seq"],
        )


_ACCOUNT_COLUMNS = (
    "name, user_id, username, first_name, status, created_at, last_used, last_checked, "
    "device_model, system_version, app_version, dc_id, last_error_category"
)
_UPDATABLE = frozenset(
    {"user_id", "username", "first_name", "status", "last_used", "last_checked", "dc_id",
     "last_error_category"}
)


def _account_values(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Column values for ``fields`` (``device`` expands into its three columns)."""
    unknown = set(fields) - _UPDATABLE - {"device"}
    if unknown:
        raise TypeError(f"account update: unknown fields {sorted(unknown)}")
    values = {k: v for k, v in fields.items() if k != "device"}
    if "device" in fields:
        dev: DeviceInfo | None = fields["device"]
        values["device_model"] = dev.device_model if dev else None
        values["system_version"] = dev.system_version if dev else None
        values["app_version"] = dev.app_version if dev else None
    return values


def _account_from_row(row: Sequence[Any]) -> AccountRecord:
    (name, user_id, username, first_name, status, created_at, last_used, last_checked,
     model, system, app, dc_id, category) = row
    device = None if model is None else DeviceInfo(model, system, app)
    return AccountRecord(name, user_id, username, first_name, status, created_at, last_used,
                         last_checked, device, dc_id, category)


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not 0 < len(name) <= 128 or not name.isprintable():
        raise AccountError("account names must be 1-128 printable characters")


def _decode_session(name: str, record: bytes, ring: KeyRing) -> SessionData:
    plain = ring.decrypt(record, account=name, purpose=SESSION_PURPOSE)
    try:
        return SessionData.from_bytes(plain)
    except (ValueError, KeyError, TypeError) as exc:
        raise DecryptionError(
            f"session record of account {name!r} decrypted but is malformed ({type(exc).__name__})"
        ) from None


class SessionRoute(Protocol):
    """Where session records live when not in this database (see :meth:`Store.route_sessions`)."""

    async def write_records(self, records: Mapping[str, bytes | None]
                            ) -> dict[str, BaseException]:
        """Write (None: delete) encrypted records; returns the refused ones with the reason."""

    async def read_records(self, names: Sequence[str] | None) -> dict[str, bytes]:
        """Encrypted records of ``names`` (all when None)."""


# -- files and lock --------------------------------------------------------------------------


def _prepare_dir(state_dir: Path) -> None:
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    mode = stat.S_IMODE(state_dir.stat().st_mode)
    if mode & 0o077:
        log.warning("state directory %s had mode %04o; tightening to 0700", state_dir, mode)
        state_dir.chmod(0o700)


def _prepare_file(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            log.warning("%s had mode %04o; tightening to 0600", path, mode)
            path.chmod(0o600)
    else:
        os.close(fd)


def _acquire_lock(state_dir: Path, name: str = LOCK_NAME) -> int:
    path = state_dir / name
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise StateLockedError(
            f"state directory {state_dir} is already in use by another tgdaemon (pid {holder}); "
            "two daemons on the same sessions would end in AUTH_KEY_DUPLICATED"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _release_lock(fd: int | None) -> None:
    if fd is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


# -- schema ----------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def immediate_transaction(conn: aiosqlite.Connection,
                                what: str) -> AsyncIterator[aiosqlite.Connection]:
    """``BEGIN IMMEDIATE`` .. ``COMMIT`` (the write lock up front, so a transaction never
    fails half-way on a busy database), rolled back on any error; SQLite's errors become
    :class:`StoreError` naming ``what``."""
    try:
        await conn.execute("BEGIN IMMEDIATE")
    except sqlite3.Error as exc:
        raise StoreError(f"{what}: {exc}") from None
    try:
        yield conn
    except BaseException as exc:
        with contextlib.suppress(sqlite3.Error):
            await conn.execute("ROLLBACK")
        if isinstance(exc, sqlite3.Error):
            raise StoreError(f"{what}: {exc}") from None
        raise
    try:
        await conn.execute("COMMIT")
    except sqlite3.Error as exc:
        with contextlib.suppress(sqlite3.Error):
            await conn.execute("ROLLBACK")
        raise StoreError(f"{what}: commit failed: {exc}") from None


# -- migrations ------------------------------------------------------------------------------


async def _configure(conn: aiosqlite.Connection) -> None:
    (mode,) = await _one(conn, "PRAGMA journal_mode=WAL")
    if str(mode).lower() != "wal":
        raise StoreError(f"cannot switch the state database to WAL mode (got {mode!r})")
    await conn.execute("PRAGMA synchronous=NORMAL")
    await conn.execute("PRAGMA foreign_keys=ON")
    await conn.execute("PRAGMA busy_timeout=5000")


async def _one(conn: aiosqlite.Connection, sql: str, args: Sequence[Any] = ()) -> Any:
    async with conn.execute(sql, args) as cur:
        return await cur.fetchone()


async def _migrate(conn: aiosqlite.Connection, db_path: Path, clock: Callable[[], float]) -> None:
    (version,) = await _one(conn, "PRAGMA user_version")
    if version > LATEST:
        raise StoreError(
            f"state database {db_path} has schema version {version}, newer than this tgdaemon "
            f"supports ({LATEST}); upgrade tgdaemon"
        )
    if version:
        applied = await conn.execute_fetchall("SELECT version, checksum FROM schema_migrations")
        for v, checksum in applied:
            if v > LATEST or MIGRATIONS[v - 1].checksum != checksum:
                raise StoreError(
                    f"state database {db_path}: migration {v} differs from the one applied "
                    "(migrations are append-only; never edit a released one)"
                )
    for m in MIGRATIONS[version:]:
        await conn.execute("BEGIN IMMEDIATE")
        try:
            (now_at,) = await _one(conn, "PRAGMA user_version")
            if now_at >= m.version:  # another daemon sharing the file applied it meanwhile
                await conn.execute("COMMIT")
                continue
            for statement in m.statements:
                await conn.execute(statement)
            await conn.execute(
                "INSERT INTO schema_migrations VALUES (?, ?, ?, ?)",
                (m.version, m.description, m.checksum, clock()),
            )
            await conn.execute(f"PRAGMA user_version = {int(m.version)}")
            await conn.execute("COMMIT")
        except BaseException:
            await conn.execute("ROLLBACK")
            raise
        log.info("state database migrated to version %d (%s)", m.version, m.description)


# -- the store -------------------------------------------------------------------------------


_NO_SESSION: Any = object()  # a pending item that only updates account metadata


class _Pending:
    """One account's queued writes, coalesced until the writer takes them: a session write
    (``data``; None = delete; ``_NO_SESSION`` = none) and/or metadata columns (``meta``)."""

    __slots__ = ("data", "future", "meta")

    def __init__(self, data: SessionData | None, future: asyncio.Future[None],
                 meta: dict[str, Any] | None = None) -> None:
        self.data = data
        self.future = future
        self.meta = meta


def _consume(fut: asyncio.Future[None]) -> None:
    # Failures are logged by the writer; nobody may be awaiting a fire-and-forget submit.
    if not fut.cancelled():
        fut.exception()


class Store:
    """Async access to the state database. Create with :meth:`open`, end with :meth:`close`."""

    def __init__(
        self,
        conn: aiosqlite.Connection,
        path: Path,
        keyring: KeyRing,
        clock: Callable[[], float],
        lock_fd: int | None,
    ) -> None:
        self._conn = conn
        self.path = path
        self._keyring = keyring
        self._clock = clock
        self._lock_fd = lock_fd
        self._lock = asyncio.Lock()
        self._durable = False
        self._pending: dict[str, _Pending] = {}
        self._inflight: dict[str, _Pending] = {}
        self._outstanding: set[asyncio.Future[None]] = set()
        self._wake = asyncio.Event()
        self._closing = False
        self._closed = False
        self._route: SessionRoute | None = None
        self._writer = asyncio.get_running_loop().create_task(
            self._write_loop(), name="tgdaemon-store-writer"
        )

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r})"

    @property
    def keyring(self) -> KeyRing:
        return self._keyring

    @classmethod
    async def open(
        cls,
        state_dir: Path,
        keyring: KeyRing,
        *,
        clock: Callable[[], float] = time.time,
        lock: bool = True,
        lock_name: str = LOCK_NAME,
    ) -> Store:
        state_dir = Path(state_dir)
        try:
            _prepare_dir(state_dir)
        except OSError as exc:
            raise StoreError(f"cannot create state directory {state_dir}: {exc.strerror}") from None
        lock_fd = _acquire_lock(state_dir, lock_name) if lock else None
        db_path = state_dir / DB_NAME
        conn: aiosqlite.Connection | None = None
        try:
            _prepare_file(db_path)
            conn = await aiosqlite.connect(db_path, isolation_level=None)
            await _configure(conn)
            await _migrate(conn, db_path, clock)
            rows = await conn.execute_fetchall("PRAGMA quick_check")
            problems = [r[0] for r in rows if r[0] != "ok"]
            if problems:
                raise StoreError(
                    f"state database {db_path} is corrupt ({problems[0]}); restore it from a "
                    "backup"
                )
        except BaseException as exc:
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close()
            _release_lock(lock_fd)
            if isinstance(exc, sqlite3.DatabaseError):
                raise StoreError(
                    f"cannot open state database {db_path}: {exc} (corrupt, or not a tgdaemon "
                    "database?)"
                ) from None
            if isinstance(exc, OSError):
                raise StoreError(f"cannot open state database {db_path}: {exc.strerror}") from None
            raise
        return cls(conn, db_path, keyring, clock, lock_fd)

    async def close(self) -> None:
        """Write everything submitted so far, then close the database and release the lock."""
        if self._closed:
            return
        self._closing = True
        self._wake.set()
        try:
            await asyncio.shield(self._writer)
        finally:
            if not self._closed:
                self._closed = True
                try:
                    await self._conn.close()
                finally:
                    _release_lock(self._lock_fd)
                    self._lock_fd = None

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- transactions --------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"state database {self.path} is closed")

    @contextlib.asynccontextmanager
    async def _tx_locked(self, *, durable: bool) -> AsyncIterator[aiosqlite.Connection]:
        """A write transaction; the caller holds ``self._lock``."""
        self._check_open()
        conn = self._conn
        try:
            if durable != self._durable:
                await conn.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
                self._durable = durable
        except sqlite3.Error as exc:
            raise StoreError(f"state database {self.path}: {exc}") from None
        async with immediate_transaction(conn, f"state database {self.path}"):
            yield conn

    @contextlib.asynccontextmanager
    async def _transaction(self, *, durable: bool = False) -> AsyncIterator[aiosqlite.Connection]:
        async with self._lock, self._tx_locked(durable=durable) as conn:
            yield conn

    async def _read(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        async with self._lock:
            self._check_open()
            try:
                return list(await self._conn.execute_fetchall(sql, args))
            except sqlite3.Error as exc:
                raise StoreError(f"state database {self.path}: {exc}") from None

    # -- accounts ------------------------------------------------------------------------

    async def ensure_account(self, name: str, device: DeviceInfo | None = None) -> AccountRecord:
        """Create the account if missing; a device is only set where none is stored yet."""
        _check_name(name)
        async with self._transaction() as conn:
            await conn.execute(
                "INSERT INTO accounts (name, created_at) VALUES (?, ?) ON CONFLICT DO NOTHING",
                (name, self._clock()),
            )
            if device is not None:
                await conn.execute(
                    "UPDATE accounts SET device_model=?, system_version=?, app_version=? "
                    "WHERE name=? AND device_model IS NULL",
                    (device.device_model, device.system_version, device.app_version, name),
                )
        record = await self.get_account(name)
        assert record is not None
        return record

    async def ensure_accounts(self, accounts: Mapping[str, DeviceInfo | None]) -> None:
        """:meth:`ensure_account` for many accounts in one transaction (start-up with 10,000)."""
        for name in accounts:
            _check_name(name)
        now = self._clock()
        async with self._transaction() as conn:
            await conn.executemany(
                "INSERT INTO accounts (name, created_at) VALUES (?, ?) ON CONFLICT DO NOTHING",
                [(name, now) for name in accounts],
            )
            await conn.executemany(
                "UPDATE accounts SET device_model=?, system_version=?, app_version=? "
                "WHERE name=? AND device_model IS NULL",
                [(d.device_model, d.system_version, d.app_version, n)
                 for n, d in accounts.items() if d is not None],
            )

    async def get_account(self, name: str) -> AccountRecord | None:
        rows = await self._read(f"SELECT {_ACCOUNT_COLUMNS} FROM accounts WHERE name=?", (name,))
        return _account_from_row(rows[0]) if rows else None

    async def list_accounts(self) -> list[AccountRecord]:
        rows = await self._read(f"SELECT {_ACCOUNT_COLUMNS} FROM accounts ORDER BY name")
        return [_account_from_row(r) for r in rows]

    async def update_account(self, name: str, **fields: Any) -> None:
        """Update metadata columns now, in a transaction of its own (the CLI's path)."""
        values = _account_values(fields)
        if not values:
            return
        assignments = ", ".join(f"{column}=?" for column in values)  # whitelisted names only
        async with self._transaction() as conn:
            cur = await conn.execute(
                f"UPDATE accounts SET {assignments} WHERE name=?", (*values.values(), name)
            )
            if cur.rowcount == 0:
                raise AccountError(f"no account named {name!r}")

    def submit_account(self, name: str, **fields: Any) -> asyncio.Future[None]:
        """Queue a metadata update without blocking (the daemon's path): it is merged with
        any other write queued for the account and written in the writer's next batch, so
        10,000 accounts validating at start-up cost a few transactions, not 10,000."""
        values = _account_values(fields)
        item = self._pending.get(name)
        if item is not None:
            item.meta = {**(item.meta or {}), **values}
            return item.future
        return self._enqueue(name, _NO_SESSION, values)

    async def delete_account(self, name: str) -> None:
        """Remove an account and (by cascade) its session."""
        await self.flush()
        async with self._transaction(durable=True) as conn:
            await conn.execute("DELETE FROM accounts WHERE name=?", (name,))

    # -- sessions ------------------------------------------------------------------------

    def submit_session(self, name: str, data: SessionData) -> asyncio.Future[None]:
        """Queue a session write without blocking; the future resolves once it is durable.

        Safe to call from synchronous code on the event loop thread (Telethon's session API).
        A later submit for the same account before the write replaces the data and shares
        the future, so a burst of changes costs one write.
        """
        _check_name(name)
        return self._enqueue(name, data)

    def submit_delete(self, name: str) -> asyncio.Future[None]:
        """Queue removal of the stored session, ordered with submitted writes."""
        return self._enqueue(name, None)

    def _enqueue(self, name: str, data: SessionData | None,
                 meta: dict[str, Any] | None = None) -> asyncio.Future[None]:
        if self._closing or self._closed:
            raise StoreError(f"state database {self.path} is closing; write refused")
        item = self._pending.get(name)
        if item is not None:
            item.data = data
            return item.future
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        fut.add_done_callback(_consume)
        fut.add_done_callback(self._outstanding.discard)
        self._outstanding.add(fut)
        self._pending[name] = _Pending(data, fut, meta)
        self._wake.set()
        return fut

    async def save_session(self, name: str, data: SessionData) -> None:
        """Store ``data`` for ``name``; durable (fsynced) when this returns."""
        await asyncio.shield(self.submit_session(name, data))

    async def delete_session(self, name: str) -> None:
        await asyncio.shield(self.submit_delete(name))

    async def flush(self) -> None:
        """Wait until everything submitted so far is written (failures are not raised here)."""
        futures = list(self._outstanding)
        if futures:
            await asyncio.wait(futures)

    def route_sessions(self, route: SessionRoute) -> None:
        """Fleet mode: session records are written to and read from ``route`` (the lease
        store, which fences every write by its lease epoch) instead of this database's
        ``sessions`` table.  Account metadata stays here."""
        self._route = route

    async def session_records(self) -> dict[str, bytes]:
        """Every encrypted record of this database's ``sessions`` table, as stored."""
        rows = await self._read("SELECT account, record FROM sessions")
        return {name: record for name, record in rows}

    async def _records(self, names: Sequence[str] | None) -> list[tuple[str, bytes]]:
        if self._route is not None:
            return sorted((await self._route.read_records(names)).items())
        if names is None:
            return list(await self._read("SELECT account, record FROM sessions ORDER BY account"))
        return list(await self._read("SELECT account, record FROM sessions WHERE account=?",
                                     (names[0],)))

    async def load_session(self, name: str) -> SessionData | None:
        futures = [b[name].future for b in (self._pending, self._inflight) if name in b]
        if futures:
            await asyncio.wait(futures)
        rows = await self._records([name])
        if not rows:
            return None
        return _decode_session(name, rows[0][1], self._keyring)

    async def load_sessions(self, names: Sequence[str] | None = None
                            ) -> dict[str, SessionData | DecryptionError]:
        """Every stored session (or those of ``names``), decrypted off the event loop;
        failures are returned per account."""
        await self.flush()
        if names is None or self._route is not None:
            rows = await self._records(names)
        else:
            wanted = set(names)
            rows = [r for r in await self._records(None) if r[0] in wanted]
        ring = self._keyring

        def decode_all() -> dict[str, SessionData | DecryptionError]:
            out: dict[str, SessionData | DecryptionError] = {}
            for name, record in rows:
                try:
                    out[name] = _decode_session(name, record, ring)
                except DecryptionError as exc:
                    out[name] = exc
            return out

        return await asyncio.to_thread(decode_all)

    async def session_key_ids(self) -> dict[str, str | None]:
        """Key id of every stored session record (for rotation status; no decryption)."""
        rows = await self._read("SELECT account, record FROM sessions")
        return {name: record_key_id(record) for name, record in rows}

    async def _write_loop(self) -> None:
        while True:
            if not self._pending:
                if self._closing:
                    return
                await self._wake.wait()
                self._wake.clear()
                continue
            names = list(itertools.islice(self._pending, _BATCH))
            batch = {n: self._pending.pop(n) for n in names}
            self._inflight = batch
            try:
                await self._write_batch(batch)
            except Exception:  # never let the writer die: later submits must still resolve
                log.exception("session writer failed unexpectedly")
            finally:
                self._inflight = {}

    async def _write_batch(self, batch: dict[str, _Pending]) -> None:
        failed: dict[str, BaseException] = {}
        quiet: dict[str, BaseException] = {}  # metadata for an account without a row
        routed: dict[str, bytes | None] = {}
        try:
            async with self._lock, self._tx_locked(durable=True) as conn:
                names = list(batch)
                placeholders = ",".join("?" * len(names))
                existing = {
                    r[0] for r in await conn.execute_fetchall(
                        f"SELECT name FROM accounts WHERE name IN ({placeholders})", names
                    )
                }
                now = self._clock()
                upserts, deletes = [], []
                updates: dict[tuple[str, ...], list[tuple[Any, ...]]] = {}
                for name, item in batch.items():
                    if item.meta and name in existing:
                        columns = tuple(item.meta)
                        updates.setdefault(columns, []).append((*item.meta.values(), name))
                    if item.data is _NO_SESSION:
                        if item.meta and name not in existing:
                            quiet[name] = AccountError(f"no account named {name!r}")
                        continue
                    if item.data is None:
                        deletes.append((name,))
                    elif name not in existing:
                        failed[name] = AccountError(f"no account named {name!r}")
                    else:
                        record = self._keyring.encrypt(
                            item.data.to_bytes(), account=name, purpose=SESSION_PURPOSE
                        )
                        upserts.append((name, record, now))
                if self._route is not None:
                    routed = {n: r for n, r, _at in upserts} | {n: None for (n,) in deletes}
                    upserts, deletes = [], []
                if deletes:
                    await conn.executemany("DELETE FROM sessions WHERE account=?", deletes)
                if upserts:
                    await conn.executemany(
                        "INSERT INTO sessions (account, record, updated_at) VALUES (?, ?, ?) "
                        "ON CONFLICT(account) DO UPDATE SET record=excluded.record, "
                        "updated_at=excluded.updated_at",
                        upserts,
                    )
                for columns, rows in updates.items():
                    assignments = ", ".join(f"{c}=?" for c in columns)  # whitelisted names
                    await conn.executemany(
                        f"UPDATE accounts SET {assignments} WHERE name=?", rows)
            if routed:
                assert self._route is not None
                failed.update(await self._route.write_records(routed))
        except Exception as exc:
            err = exc if isinstance(exc, TgdaemonError) else StoreError(
                f"writing sessions to {self.path} failed: {type(exc).__name__}: {exc}"
            )
            log.error("write of %d account(s) failed: %s", len(batch), err)
            for item in batch.values():
                if not item.future.done():
                    item.future.set_exception(err)
            return
        for name, item in batch.items():
            if item.future.done():
                continue
            if name in failed:
                log.error("session write refused: %s", failed[name])
                item.future.set_exception(failed[name])
            elif name in quiet:
                item.future.set_exception(quiet[name])
            else:
                item.future.set_result(None)

    # -- DC address cache ----------------------------------------------------------------

    async def dc_addresses(self, dc_id: int) -> list[tuple[str, int]]:
        rows = await self._read(
            "SELECT address, port FROM dc_addresses WHERE dc_id=? ORDER BY position", (dc_id,)
        )
        return [(a, p) for a, p in rows]

    async def save_dc_addresses(self, dc_id: int, addrs: Sequence[tuple[str, int]]) -> None:
        now = self._clock()
        async with self._transaction() as conn:
            await conn.execute("DELETE FROM dc_addresses WHERE dc_id=?", (dc_id,))
            await conn.executemany(
                "INSERT INTO dc_addresses VALUES (?, ?, ?, ?, ?)",
                [(dc_id, i, a, p, now) for i, (a, p) in enumerate(addrs)],
            )

    # -- key rotation --------------------------------------------------------------------

    async def rotate(self, new_ring: KeyRing) -> int:
        """Re-encrypt every session under ``new_ring.active`` in ONE transaction.

        ``new_ring`` must still hold the old keys (see :meth:`KeyRing.with_new_active`): each
        record is decrypted with it, so a missing key aborts the rotation with nothing
        changed.  Write the new key file *before* calling this, or a crash after the commit
        leaves records under a key only this process knew.
        """
        async with self._lock:
            async with self._tx_locked(durable=True) as conn:
                rows = await conn.execute_fetchall("SELECT account, record FROM sessions")
                target = new_ring.active.key_id

                def reencrypt() -> list[tuple[bytes, str]]:
                    out = []
                    for name, record in rows:
                        if record_key_id(record) == target:
                            continue
                        plain = new_ring.decrypt(record, account=name, purpose=SESSION_PURPOSE)
                        out.append((
                            new_ring.encrypt(plain, account=name, purpose=SESSION_PURPOSE),
                            name,
                        ))
                    return out

                updates = await asyncio.to_thread(reencrypt)
                await conn.executemany("UPDATE sessions SET record=? WHERE account=?", updates)
            self._keyring = new_ring
        log.info("re-encrypted %d session record(s) under key %s", len(updates), target)
        return len(updates)
