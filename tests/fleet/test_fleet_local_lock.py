"""Daemons of one machine on PostgreSQL still share the local state database (account
metadata).  One paused inside a write transaction holds its write lock: the others must keep
their accounts, and never hold a lease they cannot run."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from pathlib import Path

import pytest

from tests.fleet.conftest import FLEET, connected, logged_in_fleet
from tgdaemon.daemon import Daemon
from tgdaemon.store import DB_NAME

NAMES = ["a0", "a1"]


async def test_local_write_lock_held_elsewhere_gives_back_what_cannot_run(
        make_config, login_account, localdc, wait_until, pg_url, state_dir: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    config = await logged_in_fleet(make_config, login_account, NAMES,
                                   {**FLEET, "database_url": pg_url, "instance_id": "one"})
    caplog.set_level(logging.WARNING, logger="tgdaemon.fleet")
    async with Daemon(config) as one:
        assert one.fleet is not None
        await wait_until(lambda: connected(one) == NAMES, 30, "all connected")
        # another daemon of the machine, paused inside a write transaction (taken in a
        # thread: the daemon under test shares this event loop and must finish its own)
        with contextlib.closing(sqlite3.connect(state_dir / DB_NAME, isolation_level=None,
                                                timeout=30, check_same_thread=False)) as paused:
            await asyncio.to_thread(paused.execute, "BEGIN IMMEDIATE")
            # `tgdaemon accounts add` on another machine: no row in this local database
            await one.fleet.leases.sync_accounts({"newbie": True})
            await wait_until(lambda: "given back" in caplog.text, 30, "adoption refused")
            # released (claimed again by the next round, and refused again while locked),
            # never kept among the leases this daemon renews and runs
            assert "newbie" not in one.fleet.owned
            assert connected(one) == NAMES  # the running accounts are untouched
            paused.execute("ROLLBACK")
        await wait_until(lambda: "newbie" in one.fleet.owned, 30, "adopted once writable")
        assert connected(one)[:2] == NAMES
