"""Recovery per error category, each against the local DC with real faults."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from telethon import errors as te
from telethon.tl.functions.updates import GetStateRequest

from tests.conftest import phone_for
from tgdaemon.daemon import Daemon
from tgdaemon.localdc import Fault
from tgdaemon.status import State


async def _fleet(make_config, login_account, names, **kw):
    config = make_config([{"name": n, "phone": phone_for(n)} for n in names],
                         daemon={"http_listen": ""}, **kw)
    ids = {n: await login_account(config, n) for n in names}
    return config, ids


def _state(daemon: Daemon, name: str) -> State | None:
    status = daemon.board.get(name)
    return None if status is None else status.state


def _metric(daemon: Daemon, name: str, account: str) -> float:
    value = daemon.registry.get_sample_value(name, {"account": account})
    assert value is not None, f"{name} has no series for {account}"
    return value


def _connected(daemon: Daemon, name: str) -> bool:
    return _state(daemon, name) is State.CONNECTED


async def test_stall_detected_within_two_heartbeats_and_recovered(
        make_config, login_account, localdc, wait_until):
    config, ids = await _fleet(make_config, login_account, ["alice"],
                               policy={"heartbeat_interval": 0.5, "request_timeout": 0.5})

    def heartbeats() -> int:
        return localdc.counters(user_id=ids["alice"])["requests"].get("updates.getState", 0)

    async with Daemon(config) as daemon:
        await wait_until(lambda: _connected(daemon, "alice"), 10, "connected")
        fault = localdc.inject(Fault("stall", method=None))
        before = heartbeats()
        await wait_until(lambda: not _connected(daemon, "alice"), 5, "stall detected")
        # Counted in heartbeats, not seconds (load-independent): the server saw at most two
        # unanswered heartbeats before the worker gave up on the connection.
        assert 1 <= heartbeats() - before <= 2
        localdc.clear(fault)
        await wait_until(lambda: _connected(daemon, "alice"), 10, "reconnected")
        # alice is the fleet: reconnects are counted once for it (metrics_counters).
        assert daemon.registry.get_sample_value("tgdaemon_reconnects_total") >= 1


async def test_flood_wait_is_honoured_exactly(make_config, login_account, localdc, wait_until):
    config, ids = await _fleet(make_config, login_account, ["alice"],
                               policy={"heartbeat_interval": 0.3})
    async with Daemon(config) as daemon:
        await wait_until(lambda: _connected(daemon, "alice"), 10, "connected")
        injected_at = time.time()
        localdc.inject(Fault("rpc_error", user_id=ids["alice"], method="updates.getState",
                             error="FLOOD_WAIT_2", times=1))
        await wait_until(lambda: _state(daemon, "alice") is State.FLOOD_WAIT, 5, "flood wait")
        status = daemon.board.get("alice")
        assert status is not None
        assert status.flood_wait_until is not None
        deadline = status.flood_wait_until
        # the server's 2 s, counted from when the error arrived, plus at most 1 s of jitter
        assert injected_at + 2 <= deadline <= time.time() + 2 + 1
        before = localdc.counters(user_id=ids["alice"])["requests"].get("updates.getState", 0)
        await wait_until(lambda: time.time() >= deadline - 0.05, 5, "deadline")
        during = localdc.counters(user_id=ids["alice"])["requests"].get("updates.getState", 0)
        assert during == before, "a request reached the server before the flood-wait deadline"
        await wait_until(lambda: _connected(daemon, "alice"), 5, "back after the wait")
        await wait_until(
            lambda: localdc.counters(user_id=ids["alice"])["requests"].get(
                "updates.getState", 0) > before, 5, "heartbeats resumed")
        assert _metric(daemon, "tgdaemon_flood_wait_seconds_total", "alice") == 2


async def test_revoked_session_is_parked_without_retry_storm(
        make_config, login_account, localdc, wait_until):
    config, ids = await _fleet(make_config, login_account, ["alice", "bob"])
    async with Daemon(config) as daemon:
        await wait_until(lambda: _connected(daemon, "alice") and _connected(daemon, "bob"),
                         10, "both connected")
        localdc.inject(Fault("rpc_error", user_id=ids["alice"], method="*",
                             error="SESSION_REVOKED"))
        await wait_until(lambda: _state(daemon, "alice") is State.NEEDS_LOGIN, 5, "parked")
        # Server-side attempts: every TCP accept on the DC (bob's connection is stable, so any
        # new one would be alice retrying) and the connections credited to alice's key.
        accepted = localdc.counters()["connections_accepted"]
        alice_connections = localdc.counters(user_id=ids["alice"])["connections"]
        requests = sum(localdc.counters(user_id=ids["alice"])["requests"].values())
        bob_before = localdc.counters(user_id=ids["bob"])["requests"].get("updates.getState", 0)
        # Bob keeps heartbeating while Alice sends nothing at all.
        await wait_until(
            lambda: localdc.counters(user_id=ids["bob"])["requests"].get(
                "updates.getState", 0) >= bob_before + 4, 10, "bob heartbeats")
        assert localdc.counters()["connections_accepted"] == accepted
        assert localdc.counters(user_id=ids["alice"])["connections"] == alice_connections
        assert sum(localdc.counters(user_id=ids["alice"])["requests"].values()) == requests
        assert _connected(daemon, "bob")
        status = daemon.board.get("alice")
        assert status is not None
        assert status.last_error_category == "auth"


async def test_forgotten_auth_key_parks_account(make_config, login_account, localdc, wait_until):
    config, ids = await _fleet(make_config, login_account, ["alice"])
    async with Daemon(config) as daemon:
        await wait_until(lambda: _connected(daemon, "alice"), 10, "connected")
        localdc.forget_auth_key(user_id=ids["alice"])
        await wait_until(lambda: _state(daemon, "alice") is State.NEEDS_LOGIN, 10, "parked")


async def test_mid_session_transport_404_parks_at_once(
        make_config, login_account, localdc, wait_until, caplog):
    """The server forgets the key of an established connection: the next packet, here another
    caller's request on the account's client (as the account API makes) while the worker waits
    for its next heartbeat, is answered with transport -404. The worker parks the account in
    needs_login from that connection's end, in one log line: no connect attempt more."""
    config, ids = await _fleet(make_config, login_account, ["alice"],
                               policy={"backoff_base": 0.1})  # heartbeats 27-33 s apart
    async with Daemon(config) as daemon:
        await wait_until(lambda: _connected(daemon, "alice"), 10, "connected")
        assert daemon.supervisor is not None
        client = daemon.supervisor.worker("alice").client
        assert client is not None
        accepted = localdc.counters()["connections_accepted"]
        caplog.set_level(logging.INFO, logger="tgdaemon.account")
        caplog.clear()
        localdc.inject(Fault("transport_error", user_id=ids["alice"], code=404))
        with pytest.raises(te.AuthKeyNotFound):
            async with asyncio.timeout(10):
                await client(GetStateRequest())
        await wait_until(lambda: _state(daemon, "alice") is State.NEEDS_LOGIN, 10, "parked")
        assert localdc.counters()["connections_accepted"] == accepted, "connected once more"
        status = daemon.board.get("alice")
        assert status is not None
        assert (status.last_error_category, status.reason) == ("auth", "AUTH_KEY_NOT_FOUND")
    lines = [r.getMessage() for r in caplog.records
             if r.name == "tgdaemon.account" and r.levelno >= logging.INFO]
    assert lines == ["[alice] state connected -> needs_login (AUTH_KEY_NOT_FOUND)"]


async def test_user_migrate_moves_account_and_persists_dc(
        make_config, login_account, localdc, wait_until):
    config, ids = await _fleet(make_config, login_account, ["alice"])
    async with Daemon(config) as daemon:
        await wait_until(lambda: _connected(daemon, "alice"), 10, "connected")
        localdc.inject(Fault("rpc_error", user_id=ids["alice"], method="users.getUsers",
                             error="USER_MIGRATE_2", times=1))
        localdc.drop_connections(user_id=ids["alice"])
        await wait_until(lambda: (s := daemon.board.get("alice")) is not None
                         and s.dc_id == 2 and s.state is State.CONNECTED, 10, "on DC 2")
        assert daemon.store is not None
        stored = await daemon.store.load_session("alice")
        assert stored is not None
        assert stored.dc_id == 2
        assert stored.port == localdc.addresses[2][1]
        # The switch replaced the connection under the worker: it follows it, heartbeats
        # go on over DC 2, and no extra reconnect is made (only the one the drop caused).
        await wait_until(lambda: localdc.counters(dc_id=2)["requests"].get(
            "updates.getState", 0) >= 3, 10, "heartbeats on DC 2")
        assert daemon.registry.get_sample_value("tgdaemon_reconnects_total") == 1  # the fleet's


async def test_failed_migration_keeps_the_old_login(
        make_config, login_account, localdc, wait_until):
    """The import on the new DC fails: the old DC and key stay the durable session and the
    account comes back there instead of being parked as needs_login."""
    config, ids = await _fleet(make_config, login_account, ["alice"])
    async with Daemon(config) as daemon:
        await wait_until(lambda: _connected(daemon, "alice"), 10, "connected")
        assert daemon.store is not None
        before = await daemon.store.load_session("alice")
        assert before is not None
        localdc.inject(Fault("rpc_error", method="auth.importAuthorization",
                             error="AUTH_BYTES_INVALID", times=1))
        localdc.inject(Fault("rpc_error", user_id=ids["alice"], method="users.getUsers",
                             error="USER_MIGRATE_2", times=1))
        localdc.drop_connections(user_id=ids["alice"])
        await wait_until(lambda: localdc.counters()["rpc_errors_injected"] >= 2, 10,
                         "both faults fired")
        await wait_until(lambda: _connected(daemon, "alice"), 10, "back on the old DC")
        status = daemon.board.get("alice")
        assert status is not None
        assert status.dc_id == 1
        after = await daemon.store.load_session("alice")
        assert after is not None
        assert (after.dc_id, after.auth_key) == (1, before.auth_key)


async def test_flood_wait_during_dc_switch_is_waited_exactly(
        make_config, login_account, localdc, wait_until):
    """The new DC answers the import of the login with FLOOD_WAIT_2: the account waits those
    2 s (state flood_wait, counted as one), not the network backoff (0.1 s here), and then
    switches. localdc refuses the user's imports until the deadline, as Telegram does."""
    config, ids = await _fleet(make_config, login_account, ["alice"],
                               policy={"backoff_base": 0.1})
    async with Daemon(config) as daemon:
        await wait_until(lambda: _connected(daemon, "alice"), 10, "connected")
        localdc.inject(Fault("rpc_error", dc_id=2, method="auth.importAuthorization",
                             error="FLOOD_WAIT_2", times=1))
        localdc.inject(Fault("rpc_error", user_id=ids["alice"], method="users.getUsers",
                             error="USER_MIGRATE_2", times=2))
        injected_at = time.time()
        localdc.drop_connections(user_id=ids["alice"])
        await wait_until(lambda: _state(daemon, "alice") is State.FLOOD_WAIT, 10, "flood wait")
        status = daemon.board.get("alice")
        assert status is not None
        assert status.flood_wait_until is not None
        deadline = status.flood_wait_until
        assert injected_at + 2 <= deadline <= time.time() + 2 + 1  # + at most 1 s of jitter

        def imports() -> int:
            return localdc.counters(dc_id=2)["requests"].get("auth.importAuthorization", 0)

        assert imports() == 1
        await wait_until(lambda: time.time() >= deadline - 0.05, 5, "deadline")
        assert imports() == 1, "the switch was retried before the flood wait's deadline"
        await wait_until(lambda: (s := daemon.board.get("alice")) is not None
                         and s.dc_id == 2 and s.state is State.CONNECTED, 10, "on DC 2")
        assert imports() == 2
        assert localdc.counters(user_id=ids["alice"], dc_id=2)[
            "requests_during_flood_wait"] == 0
        assert _metric(daemon, "tgdaemon_flood_wait_seconds_total", "alice") == 2


async def test_one_bad_session_does_not_stop_the_others(
        make_config, login_account, localdc, wait_until, keyring):
    config, _ = await _fleet(make_config, login_account, ["alice", "bob"])
    from tgdaemon.crypto import load_keyring
    from tgdaemon.store import DB_NAME, Store

    ring = load_keyring(key_file=config.daemon.master_key_file)
    async with await Store.open(config.daemon.state_dir, ring) as store:
        good = await store.load_session("bob")
        assert good is not None
    # Copy bob's encrypted record over alice's: it must fail to decrypt (bound to bob).
    import sqlite3

    db = sqlite3.connect(config.daemon.state_dir / DB_NAME)
    tables = [r[0] for r in db.execute("select name from sqlite_master where type='table'")]
    assert "sessions" in tables
    db.execute("update sessions set record = (select record from sessions where account = 'bob') "
               "where account = 'alice'")
    db.commit()
    db.close()
    async with Daemon(config) as daemon:
        await wait_until(lambda: _connected(daemon, "bob"), 10, "bob connected")
        assert _state(daemon, "alice") is State.NEEDS_LOGIN
        status = daemon.board.get("alice")
        assert status is not None
        assert "decrypt" in (status.reason + (status.last_error_message or "")).lower()


async def test_wrong_master_key_parks_accounts_and_overwrites_nothing(
        make_config, login_account, localdc, wait_until, tmp_path) -> None:
    from tgdaemon.crypto import generate_keyring, load_keyring, write_key_file
    from tgdaemon.store import DB_NAME

    config, _ = await _fleet(make_config, login_account, ["alice"])
    db_path = config.daemon.state_dir / DB_NAME

    def stored_record() -> bytes:
        import sqlite3

        db = sqlite3.connect(db_path)
        try:
            return db.execute("select record from sessions where account='alice'").fetchone()[0]
        finally:
            db.close()

    before = stored_record()
    accepted = localdc.counters()["connections_accepted"]
    wrong = tmp_path / "wrong.key"
    write_key_file(wrong, generate_keyring())
    async with Daemon(config, keyring=load_keyring(key_file=wrong)) as daemon:
        await wait_until(lambda: _state(daemon, "alice") is State.NEEDS_LOGIN, 5, "parked")
        status = daemon.board.get("alice")
        assert status is not None
        assert "decrypt" in status.reason
        assert "alice" in (status.last_error_message or "")
    assert stored_record() == before
    assert localdc.counters()["connections_accepted"] == accepted  # never even connected
