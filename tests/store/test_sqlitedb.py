"""A write transaction whose caller is cancelled must not stay open: it would hold the
database's write lock for good (every daemon of a fleet sharing the file then fails
"database is locked").  Every write is one call into the connection's thread
(tgdaemon/sqlitedb.py), so the transaction ends in that call whatever happens to the caller."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tgdaemon.sqlitedb import (
    SqliteThread,
    TxKind,
    WriteLockCollector,
    WriteLockStats,
    quantile,
)


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


def test_write_lock_metrics_per_transaction_kind() -> None:
    stats = WriteLockStats()
    registry = CollectorRegistry()
    WriteLockCollector(registry, stats)
    stats.observe(TxKind.RENEW, wait=0.003, hold=0.004)
    stats.observe(TxKind.RENEW, wait=0.0, hold=0.2)
    stats.observe(TxKind.SESSIONS, wait=1.5, hold=0.02)
    samples = {(s.name, s.labels.get("tx"), s.labels.get("le")): s.value
               for family in text_string_to_metric_families(generate_latest(registry).decode())
               for s in family.samples}
    hold = "tgdaemon_store_write_lock_hold_seconds"
    assert samples[(f"{hold}_count", "renew", None)] == 2
    assert samples[(f"{hold}_bucket", "renew", "0.005")] == 1
    assert samples[(f"{hold}_bucket", "renew", "0.25")] == 2
    assert samples[(f"{hold}_sum", "renew", None)] == pytest.approx(0.204)
    assert samples[("tgdaemon_store_write_lock_hold_max_seconds", "renew", None)] == 0.2
    assert samples[("tgdaemon_store_write_lock_wait_seconds_bucket", "sessions", "1.0")] == 0
    assert samples[("tgdaemon_store_write_lock_wait_seconds_bucket", "sessions", "2.5")] == 1
    assert samples[(f"{hold}_count", "metadata", None)] == 0
    times = stats.snapshot()[TxKind.RENEW]
    assert quantile(times, 0.5) == 0.005
    assert quantile(times, 0.99) == 0.2  # the maximum, below its bucket bound
