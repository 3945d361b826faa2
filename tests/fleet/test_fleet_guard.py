"""The lease guard: it closes every worker when the leases' deadline passes unrenewed, also
right after a claim; a worker that ignores its stop is not reopened beside itself."""

from __future__ import annotations

import asyncio
import logging
import sqlite3

import pytest

import tgdaemon.supervisor
from tests.fleet.conftest import FLEET, connected, logged_in_fleet
from tgdaemon.daemon import Daemon
from tgdaemon.exceptions import AccountError

NAMES = ["alice", "bob"]


async def test_leases_claimed_after_the_guard_last_looked_are_closed_in_time(
        make_config, login_account, localdc, wait_until, caplog) -> None:
    """The first renewal after start finds no lease, so the guard waits without a deadline;
    the leases claimed next must still be closed when their deadline passes unrenewed (here:
    another writer takes SQLite's write lock at the claim, before the next renewal)."""
    config = await logged_in_fleet(make_config, login_account, NAMES,
                                   {**FLEET, "instance_id": "one"})
    async with Daemon(config) as daemon:
        fleet = daemon.fleet
        assert fleet is not None
        await wait_until(lambda: bool(fleet.owned), 30, "leases claimed", 0.005)
        locker = sqlite3.connect(fleet.leases.path,  # type: ignore[attr-defined]
                                 isolation_level=None)
        try:
            locker.execute("BEGIN IMMEDIATE")
            await wait_until(lambda: any("could not be renewed" in r.getMessage()
                                         for r in caplog.records), fleet.timing.ttl,
                             "the guard closes before the TTL")
        finally:
            locker.execute("ROLLBACK")
            locker.close()


async def test_a_worker_ignoring_its_stop_is_not_reopened_beside_itself(
        make_config, login_account, localdc, wait_until, caplog, monkeypatch) -> None:
    # The supervisor's extra wait for stragglers (2 x CLOSE_TIMEOUT + 5 s) kept short.
    monkeypatch.setattr(tgdaemon.supervisor, "CLOSE_TIMEOUT", 0.1)
    config = await logged_in_fleet(make_config, login_account, NAMES,
                                   {**FLEET, "instance_id": "one", "drain_timeout": 0.5})
    async with Daemon(config) as daemon:
        fleet, supervisor = daemon.fleet, daemon.supervisor
        assert fleet is not None
        await wait_until(lambda: connected(daemon) == NAMES, 30, "both connected")
        # alice's client close hangs and swallows the cancellation (a wedged disconnect).
        released = asyncio.Event()
        stuck_worker = supervisor.worker("alice")

        async def wedged_close() -> None:
            while not released.is_set():
                try:
                    await released.wait()
                except asyncio.CancelledError:
                    continue

        stuck_worker._close_client = wedged_close  # type: ignore[method-assign]
        try:
            caplog.set_level(logging.WARNING)

            def guard_fired() -> bool:
                if any("could not be renewed" in r.getMessage() for r in caplog.records):
                    return True
                fleet._set_deadline(-1.0)  # as if the renewal had not answered in time
                return False

            await wait_until(guard_fired, 10, "the lease guard closes everything")
            await wait_until(lambda: supervisor.stuck() == {"alice"}, 30, "alice stuck")
            # Renewals go on: bob is reopened; alice is not, while her worker may be connected.
            await wait_until(lambda: "bob" in connected(daemon), 30, "bob reopened")
            rounds = fleet.rounds
            await wait_until(lambda: fleet.rounds >= rounds + 3, 20, "three more rounds")
            assert connected(daemon) == ["bob"]
            with pytest.raises(AccountError, match="not running"):
                supervisor.worker("alice")
            assert "alice" not in fleet.owned
            lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING
                     and r.name in ("tgdaemon.supervisor", "tgdaemon.fleet")]
            assert not any("alice" in line for line in lines), lines
            assert sum("ignore cancellation" in line for line in lines) == 1, lines
        finally:  # a worker ignoring cancellation would hang the loop's teardown
            released.set()

        # Once it has ended, its lease is given back and claimed again: alice runs once more.
        await wait_until(lambda: not supervisor.stuck(), 10, "the stuck worker ended")
        await wait_until(lambda: connected(daemon) == NAMES, 30, "alice back")
        assert supervisor.worker("alice") is not stuck_worker
