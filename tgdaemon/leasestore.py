"""The lease store: one contract, two databases (SQLite on one machine, PostgreSQL across).

What several daemons share: the fleet's accounts (name, enabled), one lease row per account
(owner instance, epoch, expiry), one row per instance (capacity, last renewal) and the
encrypted session records.  Records are encrypted by the daemon before they reach either
database (tgdaemon/store.py's key ring): PostgreSQL never sees a key.

Fencing: every session write carries the epoch of the lease it was made under and is applied
only while that lease is still ours with that epoch, checked in the same transaction, so a
paused-then-resumed owner cannot overwrite what the new owner wrote.

Time: expiries are seconds since the epoch on the *database's* clock for PostgreSQL (daemons
on several machines agree on one clock) and on the machine's clock for SQLite (one machine).
A daemon never compares them with its own clock: it keeps its own, earlier, monotonic
deadline (tgdaemon/leases.py).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import json
import os
import socket
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from tgdaemon.exceptions import StoreError
from tgdaemon.migrations import PG_MIGRATIONS, unapplied
from tgdaemon.sqlitedb import (
    BUSY_TIMEOUT,
    SqliteThread,
    TxKind,
    WriteLockStats,
    delete_sessions,
    is_busy,
    json_list,
    upsert_sessions,
)

_T = TypeVar("_T")

#: Seconds one renewal attempt waits for another daemon's write lock before it is tried
#: again (SQLite's busy handler polls meanwhile; the retry re-reads the clock).
RENEW_BUSY_TIMEOUT = 2.0

#: Placeholder epoch meaning "no lease": never equal to a stored one (those start at 1).
NO_EPOCH = -1

#: Turns (account, record) pairs into re-encrypted ones (those it could not decrypt left out).
Reencrypt = Callable[[list[tuple[str, bytes]]], list[tuple[str, bytes]]]
#: Where a record's key id sits (tgdaemon/crypto.py's layout: version byte, then 4 bytes).
_KEY_ID_AT, _KEY_ID_LEN = 2, 4  # SQL's substr()/substring() count from 1


@dataclass(frozen=True)
class FleetAccount:
    name: str
    enabled: bool
    owner: str | None
    epoch: int
    #: Seconds until the lease expires (negative: expired); None without an owner.
    expires_in: float | None


@dataclass(frozen=True)
class InstanceInfo:
    id: str
    capacity: int
    host: str
    pid: int
    started_at: float
    #: Seconds since its last renewal on the store's clock (its lag).
    renewed_ago: float
    owned: int
    #: The key ids of its master key ring, and the one it writes records under (published
    #: by the instance, tgdaemon/keyrotation.py; empty/None until it has).
    key_ids: tuple[str, ...] = ()
    write_key: str | None = None


@dataclass(frozen=True)
class ForgetResult:
    """What ``forget`` found: the instance's lag, and whether its row and leases went."""

    renewed_ago: float
    forgotten: bool
    released: int = 0


@dataclass(frozen=True)
class FleetCounts:
    """Counts over enabled accounts, as of one read."""

    accounts: int
    live_instances: int
    claimable: int  # without a valid lease (nobody owns them, or the lease expired)
    lost_instances: int = 0  # registered, not renewed within the TTL, not stopped cleanly


class LeaseStore(abc.ABC):
    """What the fleet manager, the CLI and the tests need from a database (see module doc)."""

    kind: str

    @abc.abstractmethod
    async def close(self) -> None: ...

    # -- the fleet definition ---------------------------------------------------------------

    @abc.abstractmethod
    async def sync_accounts(self, accounts: Mapping[str, bool]) -> int:
        """Add the accounts that are missing (name -> enabled); existing ones are left as
        they are (the store, edited by ``tgdaemon accounts``, is authoritative).  Returns
        how many were added."""

    @abc.abstractmethod
    async def remove_account(self, name: str) -> bool:
        """Delete the account, its lease and its session; False when it did not exist."""

    @abc.abstractmethod
    async def set_enabled(self, name: str, enabled: bool) -> bool:
        """False when there is no such account.  A disabled account is released by its
        owner at the next renewal and claimed by nobody."""

    @abc.abstractmethod
    async def fleet(self) -> list[FleetAccount]: ...

    # -- instances --------------------------------------------------------------------------

    @abc.abstractmethod
    async def register(self, instance: str, capacity: int) -> None:
        """Create or refresh the instance's row (a restart keeps its id)."""

    @abc.abstractmethod
    async def unregister(self, instance: str) -> None:
        """Release every lease of the instance and delete its row (a clean stop)."""

    @abc.abstractmethod
    async def forget(self, instance: str, ttl: float, *, force: bool) -> ForgetResult | None:
        """An operator removes a dead instance (``tgdaemon cluster forget``): its row goes and
        its leases are released, all in one transaction, unless it renewed within ``ttl``
        and not ``force``.  The leases keep their epochs, so its writes stay refused; if it
        still runs, its next renewal finds no lease and registers it again.  None when there
        is no such instance."""

    @abc.abstractmethod
    async def instances(self) -> list[InstanceInfo]: ...

    @abc.abstractmethod
    async def counts(self, ttl: float) -> FleetCounts: ...

    # -- leases -----------------------------------------------------------------------------

    @abc.abstractmethod
    async def renew(self, instance: str, ttl: float) -> dict[str, int]:
        """Extend every unexpired lease of ``instance`` by ``ttl`` in one statement and mark
        the instance alive; returns the leases still held (account -> epoch).  Leases of
        disabled accounts are released instead."""

    @abc.abstractmethod
    async def claim(self, instance: str, n: int, ttl: float) -> dict[str, int]:
        """Take up to ``n`` enabled accounts whose lease is free or expired, each with a new
        epoch; returns them (account -> epoch)."""

    @abc.abstractmethod
    async def release(self, instance: str, names: Iterable[str]) -> None:
        """Give up these leases (only those still ours): claimable at once by anybody."""

    # -- sessions (fenced) ------------------------------------------------------------------

    @abc.abstractmethod
    async def write_sessions(
        self, instance: str, writes: Mapping[str, tuple[int, bytes | None]]
    ) -> set[str]:
        """Apply ``account -> (epoch, record or None to delete)`` for the accounts whose lease
        ``instance`` holds with that epoch, in one transaction; returns the rejected names."""

    @abc.abstractmethod
    async def read_sessions(self, names: Sequence[str] | None = None) -> dict[str, bytes]:
        """Encrypted records of ``names`` (all when None)."""

    @abc.abstractmethod
    async def seed_sessions(self, records: Mapping[str, bytes]) -> int:
        """Store records for accounts that have none yet (moving a single daemon's sessions
        into a fleet); never overwrites.  Returns how many were stored."""

    # -- master key rotation (tgdaemon/keyrotation.py) --------------------------------------

    @abc.abstractmethod
    async def publish_keys(self, instance: str, key_ids: Sequence[str], write_key: str
                           ) -> None:
        """Record which keys the instance's ring holds and which one it writes under."""

    @abc.abstractmethod
    async def reencrypt(self, old_key_ids: Sequence[str], limit: int, skip: Sequence[str],
                        convert: Reencrypt) -> tuple[int, int]:
        """Rewrite up to ``limit`` records under one of ``old_key_ids`` (accounts in ``skip``
        excepted) with ``convert``, in one transaction that no other daemon's re-encryption
        or session write can interleave with; returns (rewritten, still under those keys).
        The plaintext does not change, so no lease is needed: whoever writes next wins."""


def _host() -> str:
    return socket.gethostname()[:64]


def _split_keys(text: str | None) -> tuple[str, ...]:
    return tuple(text.split(",")) if text else ()


# -- SQLite ---------------------------------------------------------------------------------


class SqliteLeaseStore(LeaseStore):
    """Leases in the daemon's own state database (``tgdaemon.sqlite3``), shared by the
    daemons of one machine.  The schema is created by :class:`tgdaemon.store.Store`
    (migration 2), which must have opened it first.

    Every operation is ONE call into a dedicated thread that runs the whole
    ``BEGIN IMMEDIATE`` .. ``COMMIT`` (tgdaemon/sqlitedb.py): the write lock every daemon of
    the machine shares is held for the milliseconds of the SQL only, never across event-loop
    turns.  Renewals have a connection and thread of their own: they never queue behind this
    daemon's session writes, claims or reads, and each attempt waits for another daemon's
    lock at most :data:`RENEW_BUSY_TIMEOUT`, retried until ``renew_patience`` has passed (the
    next renewal is due then; the lease timings leave room for a second one).  (A daemon
    paused while it holds the lock — SIGSTOP mid-transaction — still blocks the others' writes
    until it resumes; their leases then lapse safely: README, Scaling out.)"""

    kind = "sqlite"

    def __init__(self, db: SqliteThread, renewals: SqliteThread, path: Path,
                 clock: Callable[[], float], renew_patience: float) -> None:
        self._db = db
        self._renewals = renewals
        self.path = path
        self._clock = clock
        self._renew_patience = renew_patience
        #: Capacity of the instances registered through this store: a renewal registers an
        #: instance again whose row an operator removed (``forget``) while it ran.
        self._capacities: dict[str, int] = {}
        #: Renewal attempts that found the write lock busy and were tried again.
        self.renew_retries = 0

    @property
    def lock_stats(self) -> WriteLockStats:
        return self._db.stats

    @classmethod
    async def open(cls, db_path: Path, *, clock: Callable[[], float] = time.time,
                   renew_patience: float = 10.0, lock_stats: WriteLockStats | None = None
                   ) -> SqliteLeaseStore:
        """``renew_patience``: how long a renewal keeps trying while other daemons hold the
        write lock (the renewal interval); ``lock_stats``: where write-lock times go (the
        state database's, so one process reports them together)."""
        stats = lock_stats if lock_stats is not None else WriteLockStats()
        opened: list[SqliteThread] = []
        try:
            for name, busy in (("tgdaemon-leases", BUSY_TIMEOUT), ("tgdaemon-renewals", min(
                    RENEW_BUSY_TIMEOUT, renew_patience / 4))):
                opened.append(await SqliteThread.open(db_path, name=name, busy_timeout=busy,
                                                      durable=True, stats=stats))
        except sqlite3.Error as exc:
            for db in opened:
                await db.close()
            raise StoreError(f"cannot open lease store {db_path}: {exc}") from None
        return cls(opened[0], opened[1], Path(db_path), clock, renew_patience)

    async def close(self) -> None:
        try:
            await self._renewals.close()
        finally:
            await self._db.close()

    async def _run(self, fn: Callable[[sqlite3.Connection], _T],
                   kind: TxKind | None = TxKind.LEASES) -> _T:
        """``fn(conn)`` in the lease thread, inside one immediate transaction unless ``kind``
        is None (a read)."""
        try:
            if kind is None:
                return await self._db.call(fn)
            return await self._db.write(fn, kind)
        except sqlite3.Error as exc:
            raise StoreError(f"lease store {self.path}: {exc}") from None

    async def sync_accounts(self, accounts: Mapping[str, bool]) -> int:
        now = self._clock()

        rows = json.dumps({n: int(e) for n, e in accounts.items()})

        def tx(conn: sqlite3.Connection) -> int:
            count = "SELECT count(*) FROM accounts"
            (before,) = conn.execute(count).fetchone()
            conn.execute(
                "INSERT INTO accounts (name, created_at, enabled) SELECT key, ?, value "
                "FROM json_each(?) WHERE true ON CONFLICT DO NOTHING", (now, rows))
            (after,) = conn.execute(count).fetchone()
            return int(after - before)

        return await self._run(tx, TxKind.ACCOUNTS)

    async def remove_account(self, name: str) -> bool:
        return await self._run(lambda conn: conn.execute(
            "DELETE FROM accounts WHERE name=?", (name,)).rowcount > 0, TxKind.ACCOUNTS)

    async def set_enabled(self, name: str, enabled: bool) -> bool:
        return await self._run(lambda conn: conn.execute(
            "UPDATE accounts SET enabled=? WHERE name=?", (int(enabled), name)).rowcount > 0,
            TxKind.ACCOUNTS)

    async def fleet(self) -> list[FleetAccount]:
        now = self._clock()
        rows = await self._run(lambda conn: conn.execute(
            "SELECT a.name, a.enabled, l.owner, l.epoch, l.expires_at FROM accounts a "
            "JOIN leases l ON l.account = a.name ORDER BY a.name").fetchall(), None)
        return [FleetAccount(n, bool(e), o, ep, None if o is None else x - now)
                for n, e, o, ep, x in rows]

    async def register(self, instance: str, capacity: int) -> None:
        now = self._clock()
        self._capacities[instance] = capacity
        await self._run(lambda conn: conn.execute(
            "INSERT INTO instances (id, capacity, host, pid, started_at, renewed_at) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET "
            "capacity=excluded.capacity, host=excluded.host, pid=excluded.pid, "
            "started_at=excluded.started_at, renewed_at=excluded.renewed_at",
            (instance, capacity, _host(), os.getpid(), now, now)))

    async def unregister(self, instance: str) -> None:
        def tx(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE leases SET owner=NULL, expires_at=0 WHERE owner=?", (instance,))
            conn.execute("DELETE FROM instances WHERE id=?", (instance,))

        await self._run(tx)

    async def forget(self, instance: str, ttl: float, *, force: bool) -> ForgetResult | None:
        now = self._clock()

        def tx(conn: sqlite3.Connection) -> ForgetResult | None:
            row = conn.execute("SELECT renewed_at FROM instances WHERE id=?",
                               (instance,)).fetchone()
            if row is None:
                return None
            ago = now - row[0]
            if ago < ttl and not force:
                return ForgetResult(ago, forgotten=False)
            released = conn.execute("UPDATE leases SET owner=NULL, expires_at=0 WHERE owner=?",
                                    (instance,)).rowcount
            conn.execute("DELETE FROM instances WHERE id=?", (instance,))
            return ForgetResult(ago, forgotten=True, released=released)

        return await self._run(tx)

    async def instances(self) -> list[InstanceInfo]:
        now = self._clock()
        rows = await self._run(lambda conn: conn.execute(
            "SELECT i.id, i.capacity, i.host, i.pid, i.started_at, i.renewed_at, "
            "(SELECT count(*) FROM leases l WHERE l.owner = i.id AND l.expires_at > ?), "
            "i.key_ids, i.write_key FROM instances i ORDER BY i.id", (now,)).fetchall(),
            None)
        return [InstanceInfo(i, c, h, p, s, now - r, o, _split_keys(k), w)
                for i, c, h, p, s, r, o, k, w in rows]

    async def counts(self, ttl: float) -> FleetCounts:
        now = self._clock()
        row = await self._run(lambda conn: conn.execute(
            "SELECT (SELECT count(*) FROM accounts WHERE enabled=1), "
            "(SELECT count(*) FROM instances WHERE renewed_at > ?), "
            "(SELECT count(*) FROM leases l JOIN accounts a ON a.name = l.account "
            " WHERE a.enabled=1 AND (l.owner IS NULL OR l.expires_at <= ?)), "
            "(SELECT count(*) FROM instances WHERE renewed_at <= ?)",
            (now - ttl, now, now - ttl)).fetchone(), None)
        return FleetCounts(*row)

    async def renew(self, instance: str, ttl: float) -> dict[str, int]:
        capacity = self._capacities.get(instance)

        def tx(conn: sqlite3.Connection) -> dict[str, int]:
            now = self._clock()  # per attempt, inside the lock: the expiry is from now on
            alive = conn.execute("UPDATE instances SET renewed_at=? WHERE id=?", (now, instance))
            if alive.rowcount == 0 and capacity is not None:  # forgotten while running
                conn.execute(
                    "INSERT INTO instances (id, capacity, host, pid, started_at, renewed_at) "
                    "VALUES (?, ?, ?, ?, ?, ?)", (instance, capacity, _host(), os.getpid(),
                                                  now, now))
            conn.execute(
                "UPDATE leases SET owner=NULL, expires_at=0 WHERE owner=? AND account IN "
                "(SELECT name FROM accounts WHERE enabled=0)", (instance,))
            conn.execute("UPDATE leases SET expires_at=? WHERE owner=? AND expires_at > ?",
                         (now + ttl, instance, now))
            # One row, not one per lease (RETURNING would take the GIL back per row).
            (held,) = conn.execute(
                "SELECT json_group_object(account, epoch) FROM leases WHERE owner=? "
                "AND expires_at > ?", (instance, now)).fetchone()
            return dict(json.loads(held))

        # Another daemon's transaction is milliseconds long: a busy attempt is tried again
        # (each waits at most RENEW_BUSY_TIMEOUT) until the patience is spent.
        give_up = time.monotonic() + self._renew_patience
        while True:
            try:
                return await self._renewals.write(tx, TxKind.RENEW)
            except sqlite3.Error as exc:
                if not is_busy(exc) or time.monotonic() >= give_up:
                    raise StoreError(f"lease store {self.path}: {exc}") from None
                self.renew_retries += 1

    async def claim(self, instance: str, n: int, ttl: float) -> dict[str, int]:
        if n <= 0:
            return {}
        now = self._clock()

        def tx(conn: sqlite3.Connection) -> dict[str, int]:
            # Set-wise, a few statements whatever n is (see tgdaemon/sqlitedb.py).
            (chosen,) = conn.execute(
                "SELECT json_group_array(account) FROM ("
                " SELECT l.account FROM leases l JOIN accounts a ON a.name = l.account"
                " WHERE a.enabled=1 AND (l.owner IS NULL OR l.expires_at <= ?)"
                " ORDER BY random() LIMIT ?)", (now, n)).fetchone()
            conn.execute("UPDATE leases SET owner=?, epoch=epoch+1, expires_at=? WHERE account "
                         "IN (SELECT value FROM json_each(?))", (instance, now + ttl, chosen))
            (claimed,) = conn.execute(
                "SELECT json_group_object(account, epoch) FROM leases WHERE account IN "
                "(SELECT value FROM json_each(?))", (chosen,)).fetchone()
            return dict(json.loads(claimed))

        return await self._run(tx)

    async def release(self, instance: str, names: Iterable[str]) -> None:
        args = (instance, json_list(names))
        await self._run(lambda conn: conn.execute(
            "UPDATE leases SET owner=NULL, expires_at=0 WHERE owner=? AND account IN "
            "(SELECT value FROM json_each(?))", args))

    async def write_sessions(
        self, instance: str, writes: Mapping[str, tuple[int, bytes | None]]
    ) -> set[str]:
        if not writes:
            return set()
        now = self._clock()
        names = json_list(writes)

        def tx(conn: sqlite3.Connection) -> set[str]:
            (doc,) = conn.execute(
                "SELECT json_group_object(account, epoch) FROM leases WHERE owner=? AND "
                "account IN (SELECT value FROM json_each(?))", (instance, names)).fetchone()
            held = json.loads(doc)
            rejected = {n for n, (epoch, _r) in writes.items() if held.get(n) != epoch}
            ok = [(n, r) for n, (_e, r) in writes.items() if n not in rejected]
            delete_sessions(conn, [n for n, r in ok if r is None])
            upsert_sessions(conn, [(n, r, now) for n, r in ok if r is not None])
            return rejected

        return await self._run(tx, TxKind.SESSIONS)

    async def read_sessions(self, names: Sequence[str] | None = None) -> dict[str, bytes]:
        wanted = None if names is None else list(names)

        def read(conn: sqlite3.Connection) -> dict[str, bytes]:
            if wanted is None:
                return dict(conn.execute("SELECT account, record FROM sessions").fetchall())
            out: dict[str, bytes] = {}
            for i in range(0, len(wanted), 500):
                chunk = wanted[i:i + 500]
                out.update(conn.execute(
                    f"SELECT account, record FROM sessions WHERE account IN "
                    f"({','.join('?' * len(chunk))})", chunk).fetchall())
            return out

        return await self._run(read, None)

    async def seed_sessions(self, records: Mapping[str, bytes]) -> int:
        # The sessions already live in this database: nothing to move.
        return 0

    async def publish_keys(self, instance: str, key_ids: Sequence[str], write_key: str
                           ) -> None:
        await self._run(lambda conn: conn.execute(
            "UPDATE instances SET key_ids=?, write_key=? WHERE id=?",
            (",".join(key_ids), write_key, instance)))

    async def reencrypt(self, old_key_ids: Sequence[str], limit: int, skip: Sequence[str],
                        convert: Reencrypt) -> tuple[int, int]:
        if not old_key_ids:
            return 0, 0
        # The whole batch in one BEGIN IMMEDIATE: the database's write lock keeps every
        # other writer of the machine (re-encrypting or not) out until it commits.
        old = [bytes.fromhex(k) for k in old_key_ids]
        where = (f"substr(record, {_KEY_ID_AT}, {_KEY_ID_LEN}) IN "
                 f"({','.join('?' * len(old))}) AND account NOT IN "
                 f"(SELECT value FROM json_each(?))")
        args = (*old, json.dumps(list(skip)))

        def tx(conn: sqlite3.Connection) -> tuple[int, int]:
            rows = conn.execute(f"SELECT account, record FROM sessions WHERE {where} LIMIT ?",
                                (*args, limit)).fetchall()
            updates = convert([(a, bytes(r)) for a, r in rows])
            conn.executemany("UPDATE sessions SET record=? WHERE account=?",
                             [(r, a) for a, r in updates])
            (left,) = conn.execute(f"SELECT count(*) FROM sessions WHERE {where}",
                                   args).fetchone()
            return len(updates), int(left)

        return await self._run(tx, TxKind.REKEY)


# -- PostgreSQL -----------------------------------------------------------------------------

_PG_NOW = "extract(epoch from clock_timestamp())::double precision"
#: Serialises migrations of daemons starting together (any constant shared by all).
_PG_MIGRATION_LOCK = 0x7467_6461_656D_6F6E & 0x7FFF_FFFF_FFFF_FFFF


def redact_url(url: str) -> str:
    """The database URL without its password, for messages."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[-1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


class PgLeaseStore(LeaseStore):
    """Leases and sessions in PostgreSQL (asyncpg), for daemons on several machines.  Every
    statement has a timeout (``command_timeout``): an unreachable database is an error the
    fleet manager handles, never a hang."""

    kind = "postgresql"

    def __init__(self, pool: Any, url: str) -> None:
        self._pool = pool
        self.url = redact_url(url)
        #: As for SQLite: a renewal registers an instance again that was forgotten.
        self._capacities: dict[str, int] = {}

    @classmethod
    async def open(cls, url: str, *, timeout: float = 10.0,
                   idle_in_transaction: float = 5.0) -> PgLeaseStore:
        """``idle_in_transaction``: PostgreSQL ends a session of ours that sits in a
        transaction this long (a paused daemon), so its row locks cannot keep the other
        instances from claiming its expired leases."""
        import asyncpg

        settings = {"idle_in_transaction_session_timeout": str(int(idle_in_transaction * 1000))}
        # No connection floor: the pool connects when a statement needs one (a renewal each
        # renew interval keeps one open). With a floor, asyncpg retries it on its own while
        # the database is down and logs a traceback per try; the renewals already notice the
        # outage, once per round.
        pool = asyncpg.create_pool(url, min_size=0, max_size=4, timeout=timeout,
                                   command_timeout=timeout, server_settings=settings)
        try:
            await pool
            async with pool.acquire():  # the first connection: reachable, credentials good
                pass
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            await pool.close()
            raise StoreError(f"cannot connect to {redact_url(url)}: {type(exc).__name__}: "
                             f"{exc}") from None
        store = cls(pool, url)
        try:
            await store._migrate()
        except BaseException:
            await pool.close()
            raise
        return store

    async def close(self) -> None:
        await self._pool.close()

    async def _migrate(self) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _PG_MIGRATION_LOCK)
            exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
            applied: dict[int, str] = {}
            if exists:
                applied = {r[0]: r[1] for r in await conn.fetch(
                    "SELECT version, checksum FROM schema_migrations")}
            try:
                todo = unapplied(applied, PG_MIGRATIONS, f"database {self.url}")
            except ValueError as exc:
                raise StoreError(str(exc)) from None
            for m in todo:
                for statement in m.statements:
                    await conn.execute(statement)
                await conn.execute(
                    f"INSERT INTO schema_migrations VALUES ($1, $2, $3, {_PG_NOW})",
                    m.version, m.description, m.checksum)

    @contextlib.asynccontextmanager
    async def _conn(self) -> AsyncIterator[Any]:
        import asyncpg

        try:
            async with self._pool.acquire() as conn:
                yield conn
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise StoreError(f"lease store {self.url}: {type(exc).__name__}: {exc}") from None

    async def sync_accounts(self, accounts: Mapping[str, bool]) -> int:
        async with self._conn() as conn, conn.transaction():
            added = await conn.fetch(
                f"INSERT INTO accounts (name, created_at, enabled) SELECT n, {_PG_NOW}, e "
                "FROM unnest($1::text[], $2::boolean[]) AS t(n, e) ON CONFLICT DO NOTHING "
                "RETURNING name", list(accounts), list(accounts.values()))
            await conn.execute(
                "INSERT INTO leases (account) SELECT unnest($1::text[]) ON CONFLICT DO NOTHING",
                [r[0] for r in added])
        return len(added)

    async def remove_account(self, name: str) -> bool:
        async with self._conn() as conn:
            status = await conn.execute("DELETE FROM accounts WHERE name=$1", name)
        return bool(status != "DELETE 0")

    async def set_enabled(self, name: str, enabled: bool) -> bool:
        async with self._conn() as conn:
            status = await conn.execute("UPDATE accounts SET enabled=$2 WHERE name=$1",
                                        name, enabled)
        return bool(status != "UPDATE 0")

    async def fleet(self) -> list[FleetAccount]:
        async with self._conn() as conn:
            rows = await conn.fetch(
                f"SELECT a.name, a.enabled, l.owner, l.epoch, l.expires_at - {_PG_NOW} "
                "FROM accounts a JOIN leases l ON l.account = a.name ORDER BY a.name")
        return [FleetAccount(n, e, o, ep, None if o is None else x) for n, e, o, ep, x in rows]

    async def register(self, instance: str, capacity: int) -> None:
        self._capacities[instance] = capacity
        async with self._conn() as conn:
            await conn.execute(
                "INSERT INTO instances (id, capacity, host, pid, started_at, renewed_at) "
                f"VALUES ($1, $2, $3, $4, {_PG_NOW}, {_PG_NOW}) "
                "ON CONFLICT(id) DO UPDATE SET capacity=excluded.capacity, host=excluded.host, "
                "pid=excluded.pid, started_at=excluded.started_at, "
                "renewed_at=excluded.renewed_at", instance, capacity, _host(), os.getpid())

    async def unregister(self, instance: str) -> None:
        async with self._conn() as conn, conn.transaction():
            await conn.execute(
                "UPDATE leases SET owner=NULL, expires_at=0 WHERE owner=$1", instance)
            await conn.execute("DELETE FROM instances WHERE id=$1", instance)

    async def forget(self, instance: str, ttl: float, *, force: bool) -> ForgetResult | None:
        async with self._conn() as conn, conn.transaction():
            # FOR UPDATE: a renewal of the instance waits for this decision.
            ago = await conn.fetchval(f"SELECT {_PG_NOW} - renewed_at FROM instances "
                                      "WHERE id=$1 FOR UPDATE", instance)
            if ago is None:
                return None
            if ago < ttl and not force:
                return ForgetResult(ago, forgotten=False)
            status = await conn.execute(
                "UPDATE leases SET owner=NULL, expires_at=0 WHERE owner=$1", instance)
            await conn.execute("DELETE FROM instances WHERE id=$1", instance)
        return ForgetResult(ago, forgotten=True, released=int(status.split()[-1]))

    async def instances(self) -> list[InstanceInfo]:
        async with self._conn() as conn:
            rows = await conn.fetch(
                f"SELECT i.id, i.capacity, i.host, i.pid, i.started_at, "
                f"{_PG_NOW} - i.renewed_at, (SELECT count(*) FROM leases l WHERE "
                f"l.owner = i.id AND l.expires_at > {_PG_NOW}), i.key_ids, i.write_key "
                "FROM instances i ORDER BY i.id")
        return [InstanceInfo(i, c, h, p, s, ago, o, _split_keys(k), w)
                for i, c, h, p, s, ago, o, k, w in rows]

    async def counts(self, ttl: float) -> FleetCounts:
        async with self._conn() as conn:
            row = await conn.fetchrow(
                "SELECT (SELECT count(*) FROM accounts WHERE enabled), "
                f"(SELECT count(*) FROM instances WHERE renewed_at > {_PG_NOW} - $1), "
                "(SELECT count(*) FROM leases l JOIN accounts a ON a.name = l.account "
                f" WHERE a.enabled AND (l.owner IS NULL OR l.expires_at <= {_PG_NOW})), "
                f"(SELECT count(*) FROM instances WHERE renewed_at <= {_PG_NOW} - $1)", ttl)
        return FleetCounts(*row)

    async def renew(self, instance: str, ttl: float) -> dict[str, int]:
        # One statement, one round trip: the instance's heartbeat, the release of disabled
        # accounts and the renewal of everything else (disjoint rows).
        capacity = self._capacities.get(instance)
        alive = f"UPDATE instances SET renewed_at={_PG_NOW} WHERE id=$1"
        args: tuple[Any, ...] = (instance, ttl)
        if capacity is not None:  # registers it again if it was forgotten while running
            alive = ("INSERT INTO instances (id, capacity, host, pid, started_at, renewed_at) "
                     f"VALUES ($1, $3, $4, $5, {_PG_NOW}, {_PG_NOW}) ON CONFLICT (id) DO "
                     "UPDATE SET renewed_at=excluded.renewed_at")
            args = (*args, capacity, _host(), os.getpid())
        async with self._conn() as conn:
            rows = await conn.fetch(
                f"WITH alive AS ({alive}), "
                "disabled AS (SELECT name FROM accounts WHERE NOT enabled), "
                "dropped AS (UPDATE leases SET owner=NULL, expires_at=0 WHERE owner=$1 AND "
                "account IN (SELECT name FROM disabled)) "
                f"UPDATE leases SET expires_at={_PG_NOW} + $2 WHERE owner=$1 "
                f"AND expires_at > {_PG_NOW} AND account NOT IN (SELECT name FROM disabled) "
                "RETURNING account, epoch", *args)
        return {a: e for a, e in rows}

    async def claim(self, instance: str, n: int, ttl: float) -> dict[str, int]:
        if n <= 0:
            return {}
        async with self._conn() as conn:
            rows = await conn.fetch(
                f"UPDATE leases SET owner=$1, epoch=epoch+1, expires_at={_PG_NOW} + $2 "
                "WHERE account IN (SELECT l.account FROM leases l JOIN accounts a "
                f"ON a.name = l.account WHERE a.enabled AND (l.owner IS NULL OR "
                f"l.expires_at <= {_PG_NOW}) ORDER BY random() LIMIT $3 "
                "FOR UPDATE OF l SKIP LOCKED) RETURNING account, epoch", instance, ttl, n)
        return {a: e for a, e in rows}

    async def release(self, instance: str, names: Iterable[str]) -> None:
        async with self._conn() as conn:
            await conn.execute(
                "UPDATE leases SET owner=NULL, expires_at=0 WHERE owner=$1 "
                "AND account = ANY($2::text[])", instance, list(names))

    async def write_sessions(
        self, instance: str, writes: Mapping[str, tuple[int, bytes | None]]
    ) -> set[str]:
        if not writes:
            return set()
        async with self._conn() as conn, conn.transaction():
            # FOR SHARE: a concurrent claim (an UPDATE of the lease) waits for this commit.
            rows = await conn.fetch(
                "SELECT account, epoch FROM leases WHERE owner=$1 AND account = ANY($2::text[]) "
                "FOR SHARE", instance, list(writes))
            held = {a: e for a, e in rows}
            rejected = {n for n, (epoch, _r) in writes.items() if held.get(n) != epoch}
            ok = [(n, r) for n, (_e, r) in writes.items() if n not in rejected]
            deletes = [n for n, r in ok if r is None]
            if deletes:
                await conn.execute("DELETE FROM sessions WHERE account = ANY($1::text[])",
                                   deletes)
            upserts = [(n, r) for n, r in ok if r is not None]
            if upserts:
                await conn.executemany(
                    f"INSERT INTO sessions (account, record, updated_at) VALUES ($1, $2, "
                    f"{_PG_NOW}) ON CONFLICT(account) DO UPDATE SET record=excluded.record, "
                    "updated_at=excluded.updated_at", upserts)
        return rejected

    async def read_sessions(self, names: Sequence[str] | None = None) -> dict[str, bytes]:
        async with self._conn() as conn:
            if names is None:
                rows = await conn.fetch("SELECT account, record FROM sessions")
            else:
                rows = await conn.fetch(
                    "SELECT account, record FROM sessions WHERE account = ANY($1::text[])",
                    list(names))
        return {a: bytes(r) for a, r in rows}

    async def seed_sessions(self, records: Mapping[str, bytes]) -> int:
        if not records:
            return 0
        async with self._conn() as conn, conn.transaction():
            rows = await conn.fetch(
                f"INSERT INTO sessions (account, record, updated_at) SELECT a, r, {_PG_NOW} "
                "FROM unnest($1::text[], $2::bytea[]) AS t(a, r) "
                "WHERE EXISTS (SELECT 1 FROM accounts WHERE name = t.a) "
                "ON CONFLICT DO NOTHING RETURNING account",
                list(records), list(records.values()))
        return len(rows)

    async def publish_keys(self, instance: str, key_ids: Sequence[str], write_key: str
                           ) -> None:
        async with self._conn() as conn:
            await conn.execute("UPDATE instances SET key_ids=$2, write_key=$3 WHERE id=$1",
                               instance, ",".join(key_ids), write_key)

    async def reencrypt(self, old_key_ids: Sequence[str], limit: int, skip: Sequence[str],
                        convert: Reencrypt) -> tuple[int, int]:
        if not old_key_ids:
            return 0, 0
        old = [bytes.fromhex(k) for k in old_key_ids]
        where = (f"substring(record from {_KEY_ID_AT} for {_KEY_ID_LEN}) = ANY($1::bytea[]) "
                 "AND account <> ALL($2::text[])")
        async with self._conn() as conn, conn.transaction():
            # FOR UPDATE SKIP LOCKED: daemons re-encrypting at once take disjoint rows, and
            # an owner's session write to a row waits for this commit (then overwrites it).
            rows = await conn.fetch(
                f"SELECT account, record FROM sessions WHERE {where} LIMIT $3 "
                "FOR UPDATE SKIP LOCKED", old, list(skip), limit)
            updates = await asyncio.to_thread(convert, [(a, bytes(r)) for a, r in rows])
            if updates:
                await conn.executemany("UPDATE sessions SET record=$2 WHERE account=$1",
                                       updates)
            left = await conn.fetchval(f"SELECT count(*) FROM sessions WHERE {where}",
                                       old, list(skip))
        return len(updates), int(left)


async def open_lease_store(database_url: str | None, sqlite_path: Path,
                           ttl: float = 60.0, renew_interval: float = 10.0,
                           lock_stats: WriteLockStats | None = None) -> LeaseStore:
    """PostgreSQL when ``database_url`` is set, else the SQLite state database."""
    if database_url:
        return await PgLeaseStore.open(database_url,
                                       idle_in_transaction=max(1.0, min(5.0, ttl / 4)))
    return await SqliteLeaseStore.open(sqlite_path, renew_patience=renew_interval,
                                       lock_stats=lock_stats)
