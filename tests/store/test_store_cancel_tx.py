"""A write transaction whose caller is cancelled must not stay open: it would hold the
database's write lock for good (every daemon of a fleet sharing the file then fails
"database is locked").  Every write is one call into the connection's thread
(tgdaemon/sqlitedb.py), so the transaction ends in that call whatever happens to the caller."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path

from tgdaemon.sqlitedb import SqliteThread, TxKind, WriteLockStats


async def test_cancelled_write_leaves_no_transaction(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    with sqlite3.connect(path) as setup:
        setup.execute("PRAGMA journal_mode=WAL")
        setup.execute("CREATE TABLE t (x INTEGER)")
    stats = WriteLockStats()
    db = await SqliteThread.open(path, name="test", busy_timeout=5.0, durable=False,
                                 stats=stats)
    other = sqlite3.connect(path, isolation_level=None, timeout=0)
    try:
        for i in range(20):  # cancel at whichever point the call is
            task = asyncio.create_task(db.write(
                lambda conn, i=i: conn.execute("INSERT INTO t VALUES (?)", (i,)), TxKind.ACCOUNTS))
            for _ in range(i % 3):
                await asyncio.sleep(0)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            assert not await db.call(lambda conn: conn.in_transaction)
            other.execute("BEGIN IMMEDIATE")  # the lock is free: no wait allowed (timeout=0)
            other.execute("ROLLBACK")
        await db.write(lambda conn: conn.execute("INSERT INTO t VALUES (99)"), TxKind.ACCOUNTS)
        assert other.execute("SELECT count(*) FROM t WHERE x = 99").fetchone() == (1,)
        times = stats.snapshot()[TxKind.ACCOUNTS]
        assert times.count >= 1
        assert times.hold_max < 5.0
    finally:
        other.close()
        await db.close()
