"""The security watch against the local DC: a stock Telethon client logs into a daemon
account's user; the daemon reports it (log, /status, /status/ws, metrics) within a heartbeat
or two, and with ``terminate`` logs it out while its own session keeps working."""

from __future__ import annotations

import asyncio
import json
import logging

import aiohttp
import pytest
from telethon import errors, functions

from tests.conftest import phone_for
from tgdaemon.daemon import Daemon
from tgdaemon.lifecycle import State
from tgdaemon.localdc.testing import login, make_client
from tgdaemon.security import EVENT_CHECK_GAP

HEARTBEAT = 0.3


def _sample(daemon: Daemon, name: str) -> float | None:
    return daemon.registry.get_sample_value(name, {"account": "alice"})


def _connected(daemon: Daemon) -> bool:
    status = daemon.board.get("alice")
    return status is not None and status.state is State.CONNECTED


@pytest.fixture
async def intruders(localdc):
    made = []

    async def sign_in(device: str, *, may_be_terminated: bool = False):
        client = make_client(localdc, device_model=device, app_version="6.6")
        made.append(client)
        try:
            await login(client, localdc, phone_for("alice"))
        except errors.AuthKeyUnregisteredError as e:
            # Telethon follows a successful auth.signIn with updates.getDifference: a daemon
            # that terminates new logins may have logged this one out in between (CI).
            if not (may_be_terminated
                    and isinstance(e.request, functions.updates.GetDifferenceRequest)):
                raise
        return client

    yield sign_in
    for client in made:
        await client.disconnect()


async def test_new_login_is_reported_within_a_heartbeat(
        make_config, login_account, localdc, wait_until, intruders, caplog):
    config = make_config([{"name": "alice", "phone": phone_for("alice")}],
                         policy={"heartbeat_interval": HEARTBEAT})
    await login_account(config, "alice")
    caplog.set_level(logging.WARNING, logger="tgdaemon")
    async with Daemon(config) as daemon:
        await wait_until(lambda: _connected(daemon), 10, "connected")
        port = daemon.http.port
        async with aiohttp.ClientSession() as http, http.ws_connect(
                f"http://127.0.0.1:{port}/status/ws") as ws:
            snapshot = json.loads((await ws.receive()).data)
            assert snapshot["type"] == "snapshot"
            assert _sample(daemon, "tgdaemon_new_authorizations_total") == 0
            lists_before = localdc.counters()["requests"].get("account.getAuthorizations", 0)
            await intruders("Evil Phone")
            # The update arrives at once; the look follows at the next heartbeat.
            await wait_until(
                lambda: _sample(daemon, "tgdaemon_new_authorizations_total") == 1,
                HEARTBEAT * 10, "new authorization counted")
            events = []
            while not any(e.get("lastNewAuthorization") for e in events):
                events.append(json.loads((await asyncio.wait_for(ws.receive(), 5)).data))
        login_event = next(e for e in events if e.get("lastNewAuthorization"))
        assert login_event["account"] == "alice"
        assert login_event["authorizations"] == 2
        assert login_event["lastNewAuthorization"]["device"].startswith("Evil Phone")
        assert login_event["lastNewAuthorization"]["terminated"] is False
        assert _sample(daemon, "tgdaemon_authorizations") == 2
        # one look, triggered by the update (the periodic first look is spread over hours)
        assert localdc.counters()["requests"]["account.getAuthorizations"] == lists_before + 1
        assert _connected(daemon)
    warnings = [r.getMessage() for r in caplog.records if "new login" in r.getMessage()]
    assert len(warnings) == 1
    assert "Evil Phone" in warnings[0]
    assert "127.0.0.1" not in warnings[0]  # no IP unless security.log_ip


async def test_terminate_logs_foreign_sessions_out_but_keeps_allowed_ones(
        make_config, login_account, localdc, wait_until, intruders):
    config = make_config([{"name": "alice", "phone": phone_for("alice")}],
                         policy={"heartbeat_interval": HEARTBEAT},
                         security={"on_new_authorization": "terminate",
                                   "allow": ["trusted*"]})
    await login_account(config, "alice")
    async with Daemon(config) as daemon:
        await wait_until(lambda: _connected(daemon), 10, "connected")
        trusted = await intruders("Trusted Laptop")
        signed_in = localdc.counters()["requests"].get("auth.signIn", 0)
        evil = await intruders("Evil Phone", may_be_terminated=True)
        assert localdc.counters()["requests"]["auth.signIn"] == signed_in + 1
        evil_key = localdc.store.auth_keys[evil.session.auth_key.key_id]

        def logged_out() -> bool:  # the server's record of the key: no user any more
            return localdc.store.auth_keys[evil_key.key_id].user_id is None

        await wait_until(logged_out, EVENT_CHECK_GAP + HEARTBEAT * 20,
                         "the foreign session terminated")
        status = daemon.board.get("alice")
        assert status is not None
        assert status.last_new_authorization is not None  # reported, whichever came last
        with pytest.raises(errors.AuthKeyUnregisteredError):
            await evil(functions.updates.GetStateRequest())
        assert await trusted(functions.updates.GetStateRequest())
        beats = localdc.counters()["requests"]["updates.getState"]
        await wait_until(lambda: localdc.counters()["requests"]["updates.getState"] > beats + 2,
                         HEARTBEAT * 20, "the daemon's own session keeps heartbeating")
        assert _connected(daemon)
        listed = await trusted(functions.account.GetAuthorizationsRequest())
        assert len(listed.authorizations) == 2  # trusted + the daemon's


async def test_young_session_refusal_is_reported_not_parked(
        make_config, login_account, localdc, wait_until, intruders, caplog):
    config = make_config([{"name": "alice", "phone": phone_for("alice")}],
                         policy={"heartbeat_interval": HEARTBEAT},
                         security={"on_new_authorization": "terminate"})
    await login_account(config, "alice")
    localdc.world.fresh_reset_after = 3600
    caplog.set_level(logging.WARNING, logger="tgdaemon")
    async with Daemon(config) as daemon:
        await wait_until(lambda: _connected(daemon), 10, "connected")
        evil = await intruders("Evil Phone")
        await wait_until(lambda: any("too new" in r.getMessage() for r in caplog.records),
                         HEARTBEAT * 20, "the refusal reported")
        beats = localdc.counters()["requests"]["updates.getState"]
        await wait_until(lambda: localdc.counters()["requests"]["updates.getState"] > beats + 2,
                         HEARTBEAT * 20, "still heartbeating")
        assert _connected(daemon)  # a 406 on a reset is not an auth failure of ours
        assert await evil(functions.updates.GetStateRequest())  # still logged in
