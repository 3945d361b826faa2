"""One SQLite connection in one thread; every write transaction is ONE call into that thread.

Why: the daemons of one machine share one database file (a fleet, tgdaemon/fleet.py) and with
it SQLite's single write lock.  A transaction whose statements are awaited one at a time holds
that lock across event-loop turns, which last seconds while a loop with 10,000 accounts lags,
and the other daemons' lease renewals time out behind it (their leases lapse, their accounts
close).  Here ``BEGIN IMMEDIATE`` .. ``COMMIT`` runs inside one function in the connection's
thread: the lock is held for the statements and the commit's fsync only, whatever the event
loop does meanwhile, and a cancelled caller cannot leave a transaction open.

Inside the transaction, statements work on whole sets (rows passed as one JSON text, session
records as one packed blob), never row by row: sqlite3 gives up the GIL around each step of
a statement and must take it back from the event loop's thread for the next row, which, while
that thread is busy, comes after Python's switch interval (5 ms).  An ``executemany`` of 500
rows, or a ``RETURNING`` of 10,000, held the lock for seconds that way.

How long the lock was held, and waited for, is recorded per kind of transaction
(:class:`WriteLockStats`, exported as metrics by tgdaemon/fleet.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric

_T = TypeVar("_T")

#: Seconds a write waits for another connection's transaction before "database is locked":
#: far beyond any transaction here (under a second on a loaded machine), so reaching it
#: means a paused daemon holds the lock (lease renewals wait less: tgdaemon/leasestore.py).
BUSY_TIMEOUT = 10.0

#: Upper bounds (seconds) of the lock-time histograms: from one fsync to a busy timeout.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class TxKind(enum.Enum):
    """What a write transaction is for (the ``tx`` label of the write-lock metrics)."""

    SESSIONS = "sessions"  # session records (a single daemon's batch, a fleet's fenced write)
    METADATA = "metadata"  # account metadata batches of the store's writer
    ACCOUNTS = "accounts"  # account rows, DC addresses, the fleet definition
    RENEW = "renew"  # one lease renewal
    LEASES = "leases"  # claims, releases, instance rows
    REKEY = "rekey"  # re-encryption of session records


@dataclass
class LockTimes:
    """Counts and sums of one kind of transaction (cumulative histograms, Prometheus style)."""

    count: int = 0
    hold_sum: float = 0.0
    hold_max: float = 0.0
    wait_sum: float = 0.0
    wait_max: float = 0.0

    def __post_init__(self) -> None:
        self.hold_buckets = [0] * len(BUCKETS)
        self.wait_buckets = [0] * len(BUCKETS)


def _count(buckets: list[int], value: float) -> None:
    for i, bound in enumerate(BUCKETS):
        if value <= bound:
            buckets[i] += 1


def quantile(times: LockTimes, q: float, *, hold: bool = True) -> float | None:
    """Upper bound of the bucket holding the ``q`` quantile, at most the maximum."""
    if not times.count:
        return None
    buckets = times.hold_buckets if hold else times.wait_buckets
    top = times.hold_max if hold else times.wait_max
    for bound, n in zip(BUCKETS, buckets, strict=True):
        if n >= q * times.count:
            return min(bound, top)
    return top


class WriteLockStats:
    """Per :class:`TxKind`: how long this process waited for the write lock and held it.
    Written from the database threads, read from the event loop."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._times = {kind: LockTimes() for kind in TxKind}

    def observe(self, kind: TxKind, wait: float, hold: float) -> None:
        with self._lock:
            t = self._times[kind]
            t.count += 1
            t.hold_sum += hold
            t.wait_sum += wait
            t.hold_max = max(t.hold_max, hold)
            t.wait_max = max(t.wait_max, wait)
            _count(t.hold_buckets, hold)
            _count(t.wait_buckets, wait)

    def snapshot(self) -> dict[TxKind, LockTimes]:
        with self._lock:
            out = {}
            for kind, t in self._times.items():
                copy = LockTimes(t.count, t.hold_sum, t.hold_max, t.wait_sum, t.wait_max)
                copy.hold_buckets = list(t.hold_buckets)
                copy.wait_buckets = list(t.wait_buckets)
                out[kind] = copy
            return out


class WriteLockCollector:
    """``tgdaemon_store_write_lock_{hold,wait}_seconds{tx}`` (histograms) and
    ``tgdaemon_store_write_lock_hold_max_seconds{tx}``: how long this process held the shared
    database's write lock, and waited for it, per kind of transaction (bounded: one series
    set per :class:`TxKind`)."""

    def __init__(self, registry: CollectorRegistry, stats: WriteLockStats) -> None:
        self._stats = stats
        registry.register(self)

    def collect(self) -> Iterator[Metric]:
        snapshot = self._stats.snapshot()
        hold = HistogramMetricFamily(
            "tgdaemon_store_write_lock_hold_seconds",
            "Time this process held the state database's write lock, per transaction",
            labels=["tx"])
        wait = HistogramMetricFamily(
            "tgdaemon_store_write_lock_wait_seconds",
            "Time this process waited for the state database's write lock, per transaction",
            labels=["tx"])
        longest = GaugeMetricFamily(
            "tgdaemon_store_write_lock_hold_max_seconds",
            "Longest hold of the state database's write lock since start", labels=["tx"])
        for kind, t in snapshot.items():
            for family, buckets, total in ((hold, t.hold_buckets, t.hold_sum),
                                           (wait, t.wait_buckets, t.wait_sum)):
                family.add_metric(
                    [kind.value],
                    [(str(b), n) for b, n in zip(BUCKETS, buckets, strict=True)]
                    + [("+Inf", t.count)], total)
            longest.add_metric([kind.value], t.hold_max)
        yield hold
        yield wait
        yield longest


def json_list(values: Iterable[Any]) -> str:
    """Values for ``... IN (SELECT value FROM json_each(?))``: one parameter, any count."""
    return json.dumps(list(values))


#: Upserts session records packed by :func:`upsert_sessions`: one statement, one step.
_UPSERT_PACKED = (
    "INSERT INTO sessions (account, record, updated_at) "
    "SELECT json_extract(j.value, '$[0]'), "
    "substr(?1, json_extract(j.value, '$[1]'), json_extract(j.value, '$[2]')), "
    "json_extract(j.value, '$[3]') FROM json_each(?2) AS j WHERE true "
    "ON CONFLICT(account) DO UPDATE SET record=excluded.record, updated_at=excluded.updated_at")


def upsert_sessions(conn: sqlite3.Connection, rows: Sequence[tuple[str, bytes, float]]) -> None:
    """Insert or replace (account, encrypted record, time) rows in one statement: the records
    travel as one blob, cut by SQLite (``substr`` counts bytes in a blob, from 1)."""
    if not rows:
        return
    index, offset = [], 1
    for name, record, at in rows:
        index.append((name, offset, len(record), at))
        offset += len(record)
    conn.execute(_UPSERT_PACKED, (b"".join(r for _n, r, _a in rows), json.dumps(index)))


def delete_sessions(conn: sqlite3.Connection, names: Sequence[str]) -> None:
    if names:
        conn.execute("DELETE FROM sessions WHERE account IN (SELECT value FROM json_each(?))",
                     (json_list(names),))


def is_busy(exc: BaseException) -> bool:
    """Whether SQLite gave up waiting for another connection's lock ("database is locked")."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return bool(code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED))
    return isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc)


class SqliteThread:
    """A ``sqlite3`` connection (autocommit mode) used only from its own single thread."""

    def __init__(self, conn: sqlite3.Connection, executor: ThreadPoolExecutor,
                 stats: WriteLockStats, durable: bool) -> None:
        self._conn = conn
        self._executor = executor
        self.stats = stats
        self._durable = durable

    @classmethod
    async def open(cls, path: Path, *, name: str, busy_timeout: float, durable: bool,
                   stats: WriteLockStats, pragmas: Sequence[str] = ("foreign_keys=ON",)
                   ) -> SqliteThread:
        """``busy_timeout``: seconds a statement waits for another connection's lock;
        ``durable``: ``synchronous=FULL`` (else NORMAL) until a write asks otherwise."""
        executor = ThreadPoolExecutor(1, thread_name_prefix=name)

        def connect() -> sqlite3.Connection:
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            try:
                conn.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
                conn.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
                for pragma in pragmas:
                    conn.execute(f"PRAGMA {pragma}")
            except BaseException:
                conn.close()
                raise
            return conn

        try:
            conn = await asyncio.get_running_loop().run_in_executor(executor, connect)
        except BaseException:
            executor.shutdown(wait=False)
            raise
        return cls(conn, executor, stats, durable)

    async def close(self) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._conn.close)
        finally:
            self._executor.shutdown(wait=False)

    async def call(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        """``fn(conn)`` in the thread, outside any transaction (reads)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, self._conn)

    async def write(self, fn: Callable[[sqlite3.Connection], _T], kind: TxKind, *,
                    durable: bool | None = None) -> _T:
        """``fn(conn)`` inside one ``BEGIN IMMEDIATE`` .. ``COMMIT`` in the thread (rolled back
        if it raises); ``durable`` switches ``synchronous`` first (None: as it is)."""
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, self._transaction, fn, kind, durable)

    def _transaction(self, fn: Callable[[sqlite3.Connection], _T], kind: TxKind,
                     durable: bool | None) -> _T:
        conn = self._conn
        if durable is not None and durable != self._durable:
            conn.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
            self._durable = durable
        asked = time.monotonic()
        conn.execute("BEGIN IMMEDIATE")
        locked = time.monotonic()
        try:
            result = fn(conn)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            raise
        finally:
            self.stats.observe(kind, locked - asked, time.monotonic() - locked)
        return result
