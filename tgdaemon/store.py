"""The state database: accounts, encrypted Telethon sessions and the DC address cache.

Reads and migrations use one aiosqlite connection; every write transaction is ONE call into
a second connection's thread (tgdaemon/sqlitedb.py: ``BEGIN IMMEDIATE`` .. ``COMMIT`` in one
function), so SQLite's write lock, shared by the daemons of a fleet on one machine, is never
held across event-loop turns.  One asyncio lock keeps writes from interleaving.  Session writes go
through a queue drained by a single writer task: submissions for the same account coalesce,
and up to ``_BATCH`` accounts are written per transaction, which keeps 10,000 accounts at a
handful of fsyncs instead of one per change.  Session transactions run with
``synchronous=FULL`` (a lost auth key is a lost login); metadata uses ``NORMAL`` (WAL keeps it
consistent, at worst the last few updates of ``last_used`` are lost on power failure).

A ``flock`` on ``<state_dir>/tgdaemon.lock`` and on the database file keeps a second daemon
off the same state: two clients on one auth key end in AUTH_KEY_DUPLICATED and Telegram
revokes it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import fcntl
import itertools
import json
import logging
import os
import sqlite3
import stat
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import aiosqlite

from tgdaemon.crypto import KeyRing, record_key_id
from tgdaemon.exceptions import (
    AccountError,
    DecryptionError,
    StateAccessError,
    StateLockedError,
    StoreError,
    TgdaemonError,
)
from tgdaemon.migrations import LATEST, MIGRATIONS
from tgdaemon.sqlitedb import (
    BUSY_TIMEOUT,
    SqliteThread,
    TxKind,
    WriteLockStats,
    delete_sessions,
    json_list,
    upsert_sessions,
)
from tgdaemon.tasks import in_passes
from tgdaemon.wheel import WAKE_BATCH

if TYPE_CHECKING:
    from tgdaemon.leasestore import Reencrypt

log = logging.getLogger("tgdaemon.store")
_T = TypeVar("_T")

DB_NAME = "tgdaemon.sqlite3"
LOCK_NAME = "tgdaemon.lock"
#: Written beside the database once it holds a schema: evidence that a store exists here.
MARKER_NAME = "tgdaemon.store"
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
    # general update state (entity 0)
    pts: int | None = None
    qts: int | None = None
    date: int | None = None
    seq: int | None = None
    #: channel update states, (channel id, pts, access hash): a catch-up needs both
    channels: tuple[tuple[int, int, int], ...] = ()

    def __post_init__(self) -> None:
        # Telethon keeps the DH result as its shortest big-endian bytes: about one key in 256
        # is 255 bytes (a leading zero byte dropped) and its key id is computed over exactly
        # those bytes, so they are stored as they are.
        if self.auth_key is not None and not 0 < len(self.auth_key) <= _AUTH_KEY_SIZE:
            raise ValueError(f"auth key must be 1 to {_AUTH_KEY_SIZE} bytes")
        if not 0 <= self.port <= 65535:
            raise ValueError("port out of range")

    def to_bytes(self) -> bytes:
        doc: dict[str, Any] = {
            "v": 1, "dc": self.dc_id, "addr": self.server_address, "port": self.port,
            "key": None if self.auth_key is None else base64.b64encode(self.auth_key).decode(),
            "uid": self.user_id, "pts": self.pts, "qts": self.qts, "date": self.date,
            "seq": self.seq,
        }
        if self.channels:  # absent when empty: records without channels stay as they were
            doc["ch"] = [list(c) for c in self.channels]
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
            channels=tuple((int(c), int(p), int(h)) for c, p, h in doc.get("ch", ())),
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


#: Selects a session record without ever decoding it as text: a record that is not a BLOB
#: (written as TEXT by some other tool) comes back as None plus its SQLite type, instead of
#: making sqlite3 fail with an error message that quotes the record's bytes.
_RECORD_COLUMNS = "CASE typeof(record) WHEN 'blob' THEN record END, typeof(record)"


def _not_blob(name: str, kind: str) -> DecryptionError:
    return DecryptionError(
        f"session record of account {name!r} is stored as {kind.upper()}, not as an encrypted "
        "BLOB (written by another tool?); log the account in again"
    )


def _decode_session(name: str, record: bytes | None, ring: KeyRing, kind: str = "blob"
                    ) -> SessionData:
    if record is None:
        raise _not_blob(name, kind)
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

    async def reencrypt_records(self, old_key_ids: Sequence[str], limit: int,
                                skip: Sequence[str], convert: Reencrypt) -> tuple[int, int]:
        """:meth:`tgdaemon.leasestore.LeaseStore.reencrypt` on the shared records."""


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


def _state_error(what: str, path: Path, exc: OSError) -> StoreError:
    """A file-system refusal as one line; permissions and read-only mounts need an operator
    (exit 78: systemd stops restarting), anything else is an I/O error (exit 74)."""
    reason = exc.strerror or type(exc).__name__
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        owner = ""
        with contextlib.suppress(OSError):
            st = path.stat()
            owner = f" (owned by uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o})"
        return StateAccessError(
            f"cannot {what} {path}{owner}: {reason}; the state directory must be writable by "
            f"the user tgdaemon runs as (uid {os.geteuid()})")
    return StoreError(f"cannot {what} {path}: {reason}")


def _flock(fd: int, state_dir: Path, holder_fd: int, *, shared: bool = False) -> None:
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(holder_fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        raise StateLockedError(
            f"state directory {state_dir} is already in use by another tgdaemon (pid {holder}); "
            "two daemons on the same sessions would end in AUTH_KEY_DUPLICATED"
        ) from None


def _acquire_lock(state_dir: Path, name: str = LOCK_NAME) -> tuple[int, ...]:
    """Take the single-instance lock: ``flock`` on the lock file (which also names the pid)
    AND on the database file itself. The lock file alone is not enough: deleted by a
    clean-up script, the next daemon creates a new one and locks that, and two daemons run
    the same auth keys. The database cannot be replaced without losing the store, so its
    lock holds (a missing database is refused by the store marker, see ``_check_evidence``).

    ``flock`` and SQLite's own ``fcntl`` locks are independent; the database fd is kept open
    until after SQLite closes (closing an fd would drop SQLite's POSIX locks otherwise).

    A fleet daemon (tgdaemon/fleet.py) locks its own ``name`` (one daemon per instance id)
    and shares the database with the other instances: it takes the database's lock shared,
    which still keeps a single daemon (exclusive) off the fleet's database and vice versa."""
    path = state_dir / name
    shared = name != LOCK_NAME
    db_path = state_dir / DB_NAME
    fds: list[int] = []
    try:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise _state_error("open the lock file", path, exc) from None
        fds.append(fd)
        _flock(fd, state_dir, fd)
        try:
            db_fd = os.open(db_path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            db_fd = None  # a new store: created (and locked) below, after the evidence check
        except OSError as exc:
            raise _state_error("open the state database", db_path, exc) from None
        if db_fd is not None:
            fds.append(db_fd)
            _flock(db_fd, state_dir, fd, shared=shared)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except BaseException:
        _release_lock(tuple(fds))
        raise
    return tuple(fds)


def _lock_new_database(state_dir: Path, fds: tuple[int, ...], *, shared: bool = False
                       ) -> tuple[int, ...]:
    """Lock a database file created after :func:`_acquire_lock` (a brand-new store)."""
    if len(fds) != 1:
        return fds
    db_fd = os.open(state_dir / DB_NAME, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _flock(db_fd, state_dir, fds[0], shared=shared)
    except BaseException:
        os.close(db_fd)
        raise
    return (*fds, db_fd)


def _release_lock(fds: tuple[int, ...]) -> None:
    for fd in reversed(fds):
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _check_evidence(state_dir: Path) -> None:
    """Refuse a missing or zero-byte database where a store existed: it was truncated or
    deleted, and opening it would silently start an empty store (every account "no session"
    and, after new logins, the old records gone for good)."""
    db_path = state_dir / DB_NAME
    try:
        size: int | None = db_path.stat().st_size
    except FileNotFoundError:
        size = None
    if size:
        return
    evidence = []
    if (state_dir / MARKER_NAME).exists():
        evidence.append(f"{MARKER_NAME} marks a store created here")
    wal = state_dir / f"{DB_NAME}-wal"
    if wal.exists() and wal.stat().st_size:
        evidence.append(f"{wal.name} holds {wal.stat().st_size} bytes")
    if evidence:
        state = "missing" if size is None else "empty (0 bytes)"
        raise StateAccessError(
            f"state database {db_path} is {state} but this state directory held a tgdaemon "
            f"store ({'; '.join(evidence)}): restore the database from a backup; to really "
            f"start with an empty store, remove {state_dir / MARKER_NAME} and the -wal file")


def _write_marker(state_dir: Path) -> None:
    marker = state_dir / MARKER_NAME
    if not marker.exists():
        marker.write_text("tgdaemon state store: while this file exists, a missing or empty "
                          f"{DB_NAME} is refused (see README, troubleshooting)\n")


async def _probe_writable(conn: aiosqlite.Connection) -> bool:
    """Whether the database accepts writes (a read-only file or mount does not): one no-op
    write, rolled back."""
    try:
        await conn.execute("BEGIN IMMEDIATE")
        await conn.execute("UPDATE schema_migrations SET applied_at = applied_at")
    except sqlite3.OperationalError as exc:
        if _is_read_only(exc):
            return False
        raise
    finally:
        with contextlib.suppress(sqlite3.Error):
            await conn.execute("ROLLBACK")
    return True


def _is_read_only(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and "readonly" in str(exc).replace(
        "read-only", "readonly")


# -- schema ----------------------------------------------------------------------------------


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


@dataclass
class _Plan:
    """What one writer batch does to the database: session upserts (account, encrypted
    record, time), session deletes, and metadata updates grouped by their columns."""

    upserts: list[tuple[str, bytes, float]]
    deletes: list[tuple[str]]
    updates: dict[tuple[str, ...], list[tuple[Any, ...]]]


def _existing_sql(names: Sequence[str]) -> str:
    return f"SELECT name FROM accounts WHERE name IN ({','.join('?' * len(names))})"


async def _existing(conn: aiosqlite.Connection, names: Iterable[str]) -> set[str]:
    """Which of these accounts (at most ``_BATCH``) have a row."""
    names = list(names)
    return {r[0] for r in await conn.execute_fetchall(_existing_sql(names), names)}


def _existing_now(conn: sqlite3.Connection, names: Sequence[str]) -> set[str]:
    """:func:`_existing` inside a transaction, in the write thread: one row, not one per
    account (see tgdaemon/sqlitedb.py)."""
    (found,) = conn.execute(
        "SELECT json_group_array(name) FROM accounts WHERE name IN "
        "(SELECT value FROM json_each(?))", (json_list(names),)).fetchone()
    return set(json.loads(found))


def _plan_batch(batch: Mapping[str, _Pending], existing: set[str], ring: KeyRing, now: float,
                failed: dict[str, BaseException], quiet: dict[str, BaseException]) -> _Plan:
    """The batch as statements (records encrypted here); accounts without a row go to
    ``failed`` (a session) or ``quiet`` (metadata only)."""
    plan = _Plan([], [], {})
    for name, item in batch.items():
        if item.meta and name in existing:
            columns = tuple(item.meta)
            plan.updates.setdefault(columns, []).append((*item.meta.values(), name))
        if item.data is _NO_SESSION:
            if item.meta and name not in existing:
                quiet[name] = AccountError(f"no account named {name!r}")
            continue
        if item.data is None:
            plan.deletes.append((name,))
        elif name not in existing:
            failed[name] = AccountError(f"no account named {name!r}")
        else:
            record = ring.encrypt(item.data.to_bytes(), account=name, purpose=SESSION_PURPOSE)
            plan.upserts.append((name, record, now))
    return plan


def _apply_plan(conn: sqlite3.Connection, plan: _Plan) -> None:
    """The plan in a few set-wise statements, whatever its size (tgdaemon/sqlitedb.py)."""
    delete_sessions(conn, [n for (n,) in plan.deletes])
    upsert_sessions(conn, plan.upserts)
    for columns, rows in plan.updates.items():
        assignments = ", ".join(  # whitelisted names
            f"{c}=json_extract(j.value, '$[{i}]')" for i, c in enumerate(columns))
        conn.execute(f"UPDATE accounts SET {assignments} FROM json_each(?) AS j "
                     "WHERE accounts.name = j.key",
                     (json.dumps({row[-1]: row[:-1] for row in rows}),))


class _Pending:
    """One account's queued writes, coalesced until the writer takes them: a session write
    (``data``; None = delete; ``_NO_SESSION`` = none) and/or metadata columns (``meta``)."""

    __slots__ = ("data", "future", "meta")

    def __init__(self, data: SessionData | None, future: asyncio.Future[None],
                 meta: dict[str, Any] | None = None) -> None:
        self.data = data
        self.future = future
        self.meta = meta


async def _settle(outcomes: Iterable[tuple[asyncio.Future[None], BaseException | None]]) -> None:
    """Resolve a batch's futures, at most :data:`~tgdaemon.wheel.WAKE_BATCH` per loop pass: a
    batch is up to ``_BATCH`` accounts, and every future resolved wakes its worker (and its
    callbacks) in the next pass; 500 at once made one pass of a few thousand callbacks in a
    reconnect wave, which every other account's heartbeat waited behind. Cancelled between
    passes (the store closing), the rest are resolved at once."""
    await in_passes(outcomes, lambda outcome: _resolve(*outcome), WAKE_BATCH)


def _resolve(fut: asyncio.Future[None], exc: BaseException | None) -> bool:
    if fut.done():
        return False
    if exc is None:
        fut.set_result(None)
    else:
        fut.set_exception(exc)
    return True


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
        lock_fds: tuple[int, ...],
        db: SqliteThread,
    ) -> None:
        self._conn = conn
        self._db = db
        self.path = path
        self._keyring = keyring
        self._clock = clock
        self._lock_fds = lock_fds
        self._lock = asyncio.Lock()
        self._pending: dict[str, _Pending] = {}
        self._inflight: dict[str, _Pending] = {}
        self._outstanding: set[asyncio.Future[None]] = set()
        self._wake = asyncio.Event()
        self._closing = False
        self._closed = False
        self._route: SessionRoute | None = None
        #: Routed records a re-encryption could not decrypt: left alone from then on.
        self._reencrypt_skip: set[str] = set()
        #: The database refuses writes (read-only file or mount): the daemon reports not ready.
        self.read_only = False
        self._writer = asyncio.get_running_loop().create_task(
            self._write_loop(), name="tgdaemon-store-writer"
        )

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r})"

    def _mark_read_only(self, why: str) -> None:
        if not self.read_only:
            self.read_only = True
            log.error("state database %s refuses writes (%s): session changes cannot be saved "
                      "and the daemon reports not ready until it is writable and restarted",
                      self.path, why)

    @property
    def keyring(self) -> KeyRing:
        return self._keyring

    @property
    def lock_stats(self) -> WriteLockStats:
        """How long this process waited for and held the database's write lock."""
        return self._db.stats

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
            raise _state_error("use the state directory", state_dir, exc) from None
        lock_fds = _acquire_lock(state_dir, lock_name) if lock else ()
        db_path = state_dir / DB_NAME
        conn: aiosqlite.Connection | None = None
        db: SqliteThread | None = None
        try:
            _check_evidence(state_dir)
            try:
                _prepare_file(db_path)
            except OSError as exc:
                raise _state_error("create the state database", db_path, exc) from None
            if lock:
                lock_fds = _lock_new_database(state_dir, lock_fds,
                                              shared=lock_name != LOCK_NAME)
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
            # Beside a running daemon (lock=False) the probe could wait for its write lock;
            # that daemon has already checked (and reports) the database's writability.
            writable = await _probe_writable(conn) if lock else True
            if writable:
                _write_marker(state_dir)
            db = await SqliteThread.open(db_path, name="tgdaemon-store", busy_timeout=BUSY_TIMEOUT,
                                         durable=False, stats=WriteLockStats())
        except BaseException as exc:
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close()
            _release_lock(lock_fds)
            if _is_read_only(exc):
                raise StateAccessError(
                    f"state database {db_path} is read-only ({exc}); the state directory "
                    f"must be writable by the user tgdaemon runs as (uid {os.geteuid()})"
                ) from None
            if isinstance(exc, sqlite3.DatabaseError):
                raise StoreError(
                    f"cannot open state database {db_path}: {exc} (corrupt, or not a tgdaemon "
                    "database?)"
                ) from None
            if isinstance(exc, OSError):
                raise _state_error("open the state database", db_path, exc) from None
            raise
        store = cls(conn, db_path, keyring, clock, lock_fds, db)
        if not writable:
            store._mark_read_only("found at open")
        return store

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
                    try:
                        await self._db.close()
                    finally:
                        await self._conn.close()
                finally:
                    _release_lock(self._lock_fds)
                    self._lock_fds = ()

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

    async def _write_locked(self, fn: Callable[[sqlite3.Connection], _T], kind: TxKind, *,
                            durable: bool = False) -> _T:
        """``fn(conn)`` as one write transaction in the write thread; the caller holds
        ``self._lock``.  ``durable``: ``synchronous=FULL`` (session records)."""
        self._check_open()
        try:
            return await self._db.write(fn, kind, durable=durable)
        except sqlite3.Error as exc:
            raise StoreError(f"state database {self.path}: {exc}") from None

    async def _write(self, fn: Callable[[sqlite3.Connection], _T], kind: TxKind, *,
                     durable: bool = False) -> _T:
        async with self._lock:
            return await self._write_locked(fn, kind, durable=durable)

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
        now = self._clock()

        def tx(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO accounts (name, created_at) VALUES (?, ?) ON CONFLICT DO NOTHING",
                (name, now),
            )
            if device is not None:
                conn.execute(
                    "UPDATE accounts SET device_model=?, system_version=?, app_version=? "
                    "WHERE name=? AND device_model IS NULL",
                    (device.device_model, device.system_version, device.app_version, name),
                )

        await self._write(tx, TxKind.ACCOUNTS)
        record = await self.get_account(name)
        assert record is not None
        return record

    async def ensure_accounts(self, accounts: Mapping[str, DeviceInfo | None]) -> None:
        """:meth:`ensure_account` for many accounts in one transaction (start-up with 10,000)."""
        for name in accounts:
            _check_name(name)
        if not any(accounts.values()):
            # Nothing to write when every row exists (a fleet adopting accounts it has run
            # before): no write lock, which another daemon of the machine may hold.
            async with self._lock:
                self._check_open()
                try:
                    existing = set()
                    names = list(accounts)
                    for i in range(0, len(names), _BATCH):
                        existing |= await _existing(self._conn, names[i:i + _BATCH])
                except sqlite3.Error as exc:
                    raise StoreError(f"state database {self.path}: {exc}") from None
            accounts = {n: d for n, d in accounts.items() if n not in existing}
            if not accounts:
                return
        now = self._clock()
        inserts = [(name, now) for name in accounts]
        devices = [(d.device_model, d.system_version, d.app_version, n)
                   for n, d in accounts.items() if d is not None]

        def tx(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "INSERT INTO accounts (name, created_at) VALUES (?, ?) ON CONFLICT DO NOTHING",
                inserts)
            conn.executemany(
                "UPDATE accounts SET device_model=?, system_version=?, app_version=? "
                "WHERE name=? AND device_model IS NULL", devices)

        await self._write(tx, TxKind.ACCOUNTS)

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

        def tx(conn: sqlite3.Connection) -> None:
            cur = conn.execute(
                f"UPDATE accounts SET {assignments} WHERE name=?", (*values.values(), name)
            )
            if cur.rowcount == 0:
                raise AccountError(f"no account named {name!r}")

        await self._write(tx, TxKind.METADATA)

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
        await self._write(lambda conn: conn.execute("DELETE FROM accounts WHERE name=?", (name,)),
                          TxKind.ACCOUNTS, durable=True)

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
        rows = await self._read(f"SELECT account, {_RECORD_COLUMNS} FROM sessions")
        return {name: record for name, record, _kind in rows if record is not None}

    async def _records(self, names: Sequence[str] | None
                       ) -> list[tuple[str, bytes | None, str]]:
        """(account, record, SQLite type of the record) of ``names`` (all when None)."""
        if self._route is not None:
            routed = await self._route.read_records(names)
            return [(n, r, "blob") for n, r in sorted(routed.items())]
        if names is None:
            return list(await self._read(
                f"SELECT account, {_RECORD_COLUMNS} FROM sessions ORDER BY account"))
        if len(names) == 1:
            return list(await self._read(
                f"SELECT account, {_RECORD_COLUMNS} FROM sessions WHERE account=?", names))
        wanted = set(names)
        return [r for r in await self._records(None) if r[0] in wanted]

    async def load_session(self, name: str) -> SessionData | None:
        futures = [b[name].future for b in (self._pending, self._inflight) if name in b]
        if futures:
            await asyncio.wait(futures)
        rows = await self._records([name])
        if not rows:
            return None
        return _decode_session(name, rows[0][1], self._keyring, rows[0][2])

    async def load_sessions(self, names: Sequence[str] | None = None
                            ) -> dict[str, SessionData | DecryptionError]:
        """Every stored session (or those of ``names``), decrypted off the event loop;
        failures are returned per account."""
        await self.flush()
        rows = await self._records(names)
        ring = self._keyring

        def decode_all() -> dict[str, SessionData | DecryptionError]:
            out: dict[str, SessionData | DecryptionError] = {}
            for name, record, kind in rows:
                try:
                    out[name] = _decode_session(name, record, ring, kind)
                except DecryptionError as exc:
                    out[name] = exc
            return out

        return await asyncio.to_thread(decode_all)

    async def session_key_ids(self) -> dict[str, str | None]:
        """Key id of every stored session record (for rotation status; no decryption); in
        a fleet, of the fleet's records."""
        return {name: None if record is None else record_key_id(record)
                for name, record, _kind in await self._records(None)}

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
        refused: set[str] = set()  # refused by the route, which has said so once
        meta_error: BaseException | None = None  # routed: the metadata part failed
        try:
            async with self._lock:
                if self._route is None:
                    ring, now, names = self._keyring, self._clock(), list(batch)

                    def tx(conn: sqlite3.Connection) -> None:
                        # Planned (records encrypted) in the write thread: off the event loop,
                        # and against the rows as they are inside the transaction.
                        _apply_plan(conn, _plan_batch(batch, _existing_now(conn, names), ring,
                                                      now, failed, quiet))

                    sessions = any(item.data is not _NO_SESSION for item in batch.values())
                    await self._write_locked(
                        tx, TxKind.SESSIONS if sessions else TxKind.METADATA, durable=sessions)
                    routed: dict[str, bytes | None] = {}
                else:
                    # Session records go to the route; this database gets metadata only, and
                    # its write lock (shared by the daemons of a machine) is taken only for
                    # that: a paused daemon holding it cannot stop our session writes.
                    self._check_open()
                    plan = _plan_batch(batch, await _existing(self._conn, batch),
                                       self._keyring, self._clock(), failed, quiet)
                    routed = {n: r for n, r, _at in plan.upserts} | {
                        n: None for (n,) in plan.deletes}
                    if plan.updates:
                        meta = _Plan([], [], plan.updates)
                        try:
                            await self._write_locked(lambda conn: _apply_plan(conn, meta),
                                                     TxKind.METADATA)
                        except StoreError as exc:
                            meta_error = exc
            if routed:
                assert self._route is not None
                refusals = await self._route.write_records(routed)
                refused = set(refusals)
                failed.update(refusals)
        except Exception as exc:
            err = exc if isinstance(exc, TgdaemonError) else StoreError(
                f"writing sessions to {self.path} failed: {type(exc).__name__}: {exc}"
            )
            self._write_failed(len(batch), err)
            await _settle((item.future, err) for item in batch.values())
            return
        if meta_error is not None:  # metadata is best effort: said once, sessions written
            self._write_failed(len(batch), meta_error)

        def outcome(name: str, item: _Pending) -> BaseException | None:
            if name in failed:
                if name in refused:
                    log.debug("session write refused: %s", failed[name])
                else:
                    log.error("session write refused: %s", failed[name])
                return failed[name]
            if name in quiet:
                return quiet[name]
            if meta_error is not None and item.data is _NO_SESSION:
                return meta_error
            return None

        await _settle((item.future, outcome(name, item)) for name, item in batch.items())

    def _write_failed(self, accounts: int, err: BaseException) -> None:
        if _is_read_only(err) or "readonly" in str(err).replace("read-only", "readonly"):
            self._mark_read_only(str(err))
        if self.read_only:  # said once at ERROR by _mark_read_only; not per batch
            log.debug("write of %d account(s) failed: %s", accounts, err)
        else:
            log.error("write of %d account(s) failed: %s", accounts, err)

    # -- DC address cache ----------------------------------------------------------------

    async def dc_addresses(self, dc_id: int) -> list[tuple[str, int]]:
        rows = await self._read(
            "SELECT address, port FROM dc_addresses WHERE dc_id=? ORDER BY position", (dc_id,)
        )
        return [(a, p) for a, p in rows]

    async def save_dc_addresses(self, dc_id: int, addrs: Sequence[tuple[str, int]]) -> None:
        now = self._clock()
        rows = [(dc_id, i, a, p, now) for i, (a, p) in enumerate(addrs)]

        def tx(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM dc_addresses WHERE dc_id=?", (dc_id,))
            conn.executemany("INSERT INTO dc_addresses VALUES (?, ?, ?, ?, ?)", rows)

        await self._write(tx, TxKind.ACCOUNTS)

    # -- key rotation --------------------------------------------------------------------

    def set_keyring(self, ring: KeyRing) -> None:
        """Use ``ring`` from now on (a reload after ``tgdaemon rotate-key``). It must keep every
        key of the current ring: records under any of them must stay readable."""
        self._keyring.check_replacement(ring)
        self._keyring = ring

    async def reencrypt_some(self, limit: int) -> tuple[int, int]:
        """Re-encrypt up to ``limit`` session records that are not under the active key, in
        one durable transaction under the writer's lock (a worker's write can neither
        interleave nor be overwritten; each record is all old or all new, whatever kills the
        process). Returns (re-encrypted now, still under another key and readable).

        In a fleet the records live in the shared store: the batch is one transaction there
        that no other daemon's re-encryption or session write interleaves with."""
        ring = self._keyring
        target = ring.active.key_id
        if self._route is not None:
            skip = self._reencrypt_skip

            def convert(rows: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
                out = []
                for name, record in rows:
                    try:
                        plain = ring.decrypt(record, account=name, purpose=SESSION_PURPOSE)
                    except DecryptionError:  # tampered: left as it is (reported at start)
                        skip.add(name)
                        continue
                    out.append((name, ring.encrypt(plain, account=name,
                                                   purpose=SESSION_PURPOSE)))
                return out

            old = [k for k in ring.key_ids if k != target]
            return await self._route.reencrypt_records(old, limit, sorted(skip), convert)

        def tx(conn: sqlite3.Connection) -> tuple[int, int]:
            rows = conn.execute(f"SELECT account, {_RECORD_COLUMNS} FROM sessions").fetchall()
            stale = [(name, record) for name, record, _kind in rows
                     if record is not None and (kid := record_key_id(record)) != target
                     and kid in ring.key_ids]
            out: list[tuple[bytes, str]] = []
            bad = 0
            for name, record in stale:
                if len(out) == limit:
                    break
                try:
                    plain = ring.decrypt(record, account=name, purpose=SESSION_PURPOSE)
                except DecryptionError:  # tampered: left as it is (reported at start)
                    bad += 1
                    continue
                out.append((ring.encrypt(plain, account=name, purpose=SESSION_PURPOSE), name))
            conn.executemany("UPDATE sessions SET record=? WHERE account=?", out)
            return len(out), len(stale) - len(out) - bad

        return await self._write(tx, TxKind.REKEY, durable=True)

    async def rotate(self, new_ring: KeyRing) -> int:
        """Re-encrypt every session under ``new_ring.active`` in ONE transaction.

        ``new_ring`` must still hold the old keys (see :meth:`KeyRing.with_new_active`): each
        record is decrypted with it, so a missing key aborts the rotation with nothing
        changed.  Write the new key file *before* calling this, or a crash after the commit
        leaves records under a key only this process knew.
        """
        target = new_ring.active.key_id

        def tx(conn: sqlite3.Connection) -> int:
            rows = conn.execute(f"SELECT account, {_RECORD_COLUMNS} FROM sessions").fetchall()
            updates = []
            for name, record, kind in rows:
                if record is None:
                    raise _not_blob(name, kind)
                if record_key_id(record) == target:
                    continue
                plain = new_ring.decrypt(record, account=name, purpose=SESSION_PURPOSE)
                updates.append((new_ring.encrypt(plain, account=name, purpose=SESSION_PURPOSE),
                                name))
            conn.executemany("UPDATE sessions SET record=? WHERE account=?", updates)
            return len(updates)

        async with self._lock:
            done = await self._write_locked(tx, TxKind.REKEY, durable=True)
            self._keyring = new_ring
        log.info("re-encrypted %d session record(s) under key %s", done, target)
        return done
