"""A transaction cancelled while its BEGIN runs in aiosqlite's thread must not stay open:
it would hold the database's write lock for good (every daemon of a fleet sharing the file
then fails "database is locked")."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import aiosqlite

from tgdaemon.store import immediate_transaction


async def test_cancelled_begin_leaves_no_transaction(tmp_path: Path) -> None:
    async with aiosqlite.connect(tmp_path / "db.sqlite3", isolation_level=None) as conn:
        await conn.execute("CREATE TABLE t (x INTEGER)")
        entered = False

        async def body() -> None:
            nonlocal entered
            async with immediate_transaction(conn, "test database"):
                entered = True

        for _ in range(20):  # cancel at the BEGIN, whichever turn it is queued on
            task = asyncio.create_task(body())
            await asyncio.sleep(0)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await conn.execute("SELECT 1")  # runs after anything queued before it
            assert not conn.in_transaction
        assert not entered
        async with immediate_transaction(conn, "test database"):
            await conn.execute("INSERT INTO t VALUES (1)")
        assert not conn.in_transaction
