"""The lifecycle against the local DC: the record follows the truth (DC after a migration the
client followed by itself, no live values when parked), flood_sleep_max, and a reload that
changes a running account's heartbeat without reconnecting it."""

from __future__ import annotations

import time

from tests.conftest import phone_for
from tgdaemon.daemon import Daemon
from tgdaemon.lifecycle import State
from tgdaemon.localdc import Fault


async def _one(make_config, login_account, **kw):
    config = make_config([{"name": "alice", "phone": phone_for("alice")}],
                         daemon={"http_listen": ""}, **kw)
    return config, await login_account(config, "alice")


def _state(daemon: Daemon) -> State | None:
    status = daemon.board.get("alice")
    return None if status is None else status.state


def _sample(daemon: Daemon, name: str) -> float | None:
    return daemon.registry.get_sample_value(name, {"account": "alice"})


def _dc_label(daemon: Daemon) -> str | None:
    """The ``dc`` label of alice's one ``tgdaemon_account_state`` series."""
    for family in daemon.registry.collect():
        for s in family.samples:
            if s.name == "tgdaemon_account_state" and s.labels["account"] == "alice":
                return s.labels.get("dc")
    return None


def _beats(localdc, uid: int) -> int:
    return localdc.counters(user_id=uid)["requests"].get("updates.getState", 0)


async def test_user_migrate_during_a_heartbeat_moves_the_record(
        make_config, login_account, localdc, wait_until):
    """Telethon follows USER_MIGRATE inside the heartbeat call: no error reaches the worker,
    yet /status, the metrics and the database must show the new DC."""
    config, uid = await _one(make_config, login_account, policy={"heartbeat_interval": 0.3})
    async with Daemon(config) as daemon:
        await wait_until(lambda: _state(daemon) is State.CONNECTED, 10, "connected")
        assert _dc_label(daemon) == "1"
        localdc.inject(Fault("rpc_error", user_id=uid, method="updates.getState",
                             error="USER_MIGRATE_2", times=1))
        await wait_until(lambda: localdc.counters(dc_id=2)["requests"].get(
            "updates.getState", 0) >= 2, 10, "heartbeats on DC 2")
        await wait_until(lambda: (s := daemon.board.get("alice")) is not None
                         and s.dc_id == 2, 5, "/status on DC 2")
        assert _state(daemon) is State.CONNECTED
        assert _dc_label(daemon) == "2"
        assert daemon.store is not None

        async def stored_dc() -> bool:
            record = await daemon.store.get_account("alice")
            return record is not None and record.dc_id == 2

        await wait_until(stored_dc, 5, "accounts.dc_id 2 in the database")
        session = await daemon.store.load_session("alice")
        assert session is not None
        assert session.dc_id == 2


async def test_parked_account_drops_its_live_values(
        make_config, login_account, localdc, wait_until):
    config, uid = await _one(make_config, login_account, policy={"heartbeat_interval": 0.2})
    async with Daemon(config) as daemon:
        await wait_until(lambda: _sample(daemon, "tgdaemon_heartbeat_timestamp_seconds")
                         is not None, 10, "a heartbeat")
        localdc.inject(Fault("rpc_error", user_id=uid, method="*", error="SESSION_REVOKED"))
        await wait_until(lambda: _state(daemon) is State.NEEDS_LOGIN, 10, "parked")
        status = daemon.board.get("alice")
        assert status is not None
        assert status.latency is None
        assert _sample(daemon, "tgdaemon_heartbeat_timestamp_seconds") is None
        assert _sample(daemon, "tgdaemon_account_up") == 0


async def test_flood_wait_beyond_sleep_max_closes_the_connection_until_the_deadline(
        make_config, login_account, localdc, wait_until):
    config, uid = await _one(make_config, login_account,
                             policy={"heartbeat_interval": 0.3, "flood_sleep_max": 1})
    async with Daemon(config) as daemon:
        await wait_until(lambda: _state(daemon) is State.CONNECTED, 10, "connected")
        assert localdc.connection_count() == 1
        accepted = localdc.counters()["connections_accepted"]
        localdc.inject(Fault("rpc_error", user_id=uid, method="updates.getState",
                             error="FLOOD_WAIT_3", times=1))
        await wait_until(lambda: _state(daemon) is State.FLOOD_WAIT, 5, "flood wait")
        status = daemon.board.get("alice")
        assert status is not None
        assert status.flood_wait_until is not None
        deadline = status.flood_wait_until
        assert deadline >= time.time() + 1  # 3 s asked, shown as a deadline
        # No socket held while waiting, and nothing sent before the deadline.
        await wait_until(lambda: localdc.connection_count() == 0, 5, "connection closed")
        requests = sum(localdc.counters(user_id=uid)["requests"].values())
        await wait_until(lambda: localdc.counters()["connections_accepted"] > accepted, 10,
                         "reconnected")
        assert time.time() >= deadline - 0.05, "reconnected before the flood-wait deadline"
        assert localdc.counters()["requests_during_flood_wait"] == 0
        await wait_until(lambda: _state(daemon) is State.CONNECTED, 10, "connected again")
        assert sum(localdc.counters(user_id=uid)["requests"].values()) > requests
        assert _sample(daemon, "tgdaemon_flood_wait_seconds_total") == 3


async def test_short_flood_wait_keeps_the_connection(
        make_config, login_account, localdc, wait_until):
    config, uid = await _one(make_config, login_account,
                             policy={"heartbeat_interval": 0.3, "flood_sleep_max": 5})
    async with Daemon(config) as daemon:
        await wait_until(lambda: _state(daemon) is State.CONNECTED, 10, "connected")
        accepted = localdc.counters()["connections_accepted"]
        localdc.inject(Fault("rpc_error", user_id=uid, method="updates.getState",
                             error="FLOOD_WAIT_1", times=1))
        await wait_until(lambda: _state(daemon) is State.FLOOD_WAIT, 5, "flood wait")
        assert localdc.connection_count() == 1
        before = _beats(localdc, uid)
        await wait_until(lambda: _beats(localdc, uid) >= before + 2, 10, "heartbeats resumed")
        assert _state(daemon) is State.CONNECTED
        assert localdc.counters()["connections_accepted"] == accepted
        # Never counted (one series for the fleet: metrics_counters = "fleet").
        assert daemon.registry.get_sample_value("tgdaemon_reconnects_total") == 0


async def test_reloaded_heartbeat_interval_applies_to_a_connected_account(
        make_config, login_account, localdc, wait_until):
    """A reload changes a running account's policy at once, on the same connection."""
    config, uid = await _one(make_config, login_account,
                             policy={"heartbeat_interval": 120, "stale_after": 300})
    async with Daemon(config) as daemon:
        await wait_until(lambda: _state(daemon) is State.CONNECTED, 10, "connected")
        before = _beats(localdc, uid)  # Telethon's own getState at connect; no heartbeat yet
        connections = localdc.counters(user_id=uid)["connections"]
        accepted = localdc.counters()["connections_accepted"]
        make_config([{"name": "alice", "phone": phone_for("alice")}],
                    daemon={"http_listen": ""}, policy={"heartbeat_interval": 0.3})
        assert await daemon.reload()
        assert daemon.config.policy.heartbeat_interval == 0.3
        await wait_until(lambda: _beats(localdc, uid) >= before + 3, 10,
                         "heartbeats at the new interval")
        assert _sample(daemon, "tgdaemon_heartbeat_interval_seconds") is None  # no label
        assert daemon.registry.get_sample_value("tgdaemon_heartbeat_interval_seconds") == 0.3
        assert localdc.counters(user_id=uid)["connections"] == connections
        assert localdc.counters()["connections_accepted"] == accepted
        # Never counted (one series for the fleet: metrics_counters = "fleet").
        assert daemon.registry.get_sample_value("tgdaemon_reconnects_total") == 0
        assert _state(daemon) is State.CONNECTED


async def test_recorded_device_follows_the_config(
        make_config, login_account, localdc, wait_until):
    config, _uid = await _one(make_config, login_account)
    async with Daemon(config) as daemon:
        await wait_until(lambda: _state(daemon) is State.CONNECTED, 10, "connected")
        make_config([{"name": "alice", "phone": phone_for("alice"), "device_model": "rack 7"}],
                    daemon={"http_listen": ""})
        assert await daemon.reload()
        assert daemon.store is not None

        async def recorded() -> bool:
            record = await daemon.store.get_account("alice")
            return record is not None and record.device is not None \
                and record.device.device_model == "rack 7"

        await wait_until(recorded, 10, "new device_model in the database")
        assert _state(daemon) is State.CONNECTED
