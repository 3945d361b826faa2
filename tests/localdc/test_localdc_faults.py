"""Fault injection seen through a stock TelegramClient."""

from __future__ import annotations

import asyncio
import random
import time

import pytest
from telethon import errors, events
from telethon.tl import functions, types

from tgdaemon.localdc import Fault
from tgdaemon.localdc.testing import login

GET_SELF = functions.users.GetUsersRequest([types.InputUserSelf()])


def ping() -> functions.PingRequest:
    return functions.PingRequest(ping_id=random.getrandbits(63))


async def test_flood_wait_raises_with_seconds(localdc, clients, phone):
    client = clients(localdc, flood_sleep_threshold=0)
    await login(client, localdc, phone)
    localdc.inject(Fault("rpc_error", method="users.getUsers", error="FLOOD_WAIT_120", times=1))
    with pytest.raises(errors.FloodWaitError) as info:
        await client(GET_SELF)
    assert info.value.seconds == 120
    assert localdc.counters()["rpc_errors_injected"] == 1
    # Like Telegram, the method stays refused until the deadline, with the time left; every
    # request inside the wait, of any method, is counted for the client that should not send.
    # Telethon refuses the same request locally until the deadline (client/users.py:47);
    # forget that, so the request reaches the server.
    client._flood_waited_requests.clear()
    with pytest.raises(errors.FloodWaitError) as again:
        await client(GET_SELF)
    assert 119 <= again.value.seconds <= 120
    await client(functions.updates.GetStateRequest())  # another method is answered...
    await client(ping())  # ...and a ping is no request
    counters = localdc.counters()
    assert counters["requests_during_flood_wait"] == 2
    assert counters["rpc_errors_injected"] == 1


async def test_flood_wait_ends_at_its_deadline(localdc, clients, phone, wait_until):
    client = clients(localdc, flood_sleep_threshold=0)
    await login(client, localdc, phone)
    localdc.inject(Fault("rpc_error", method="users.getUsers", error="FLOOD_WAIT_1", times=1))
    started = time.monotonic()
    with pytest.raises(errors.FloodWaitError):
        await client(GET_SELF)

    async def answered() -> bool:
        client._flood_waited_requests.clear()  # ask the server each time, not Telethon's cache
        try:
            await client(GET_SELF)
        except errors.FloodWaitError:
            return False
        return True

    await wait_until(answered, 5.0, "the flood wait to end")
    assert time.monotonic() - started >= 1.0
    assert localdc.counters()["flood_waits_resumed"] == 1


@pytest.mark.parametrize(
    ("error", "method", "exc"),
    [
        ("AUTH_KEY_UNREGISTERED", "GetUsersRequest", errors.AuthKeyUnregisteredError),
        ("SESSION_REVOKED", "users.GetUsersRequest", errors.SessionRevokedError),
        ("USER_DEACTIVATED_BAN", "*", errors.UserDeactivatedBanError),
        ("AUTH_KEY_DUPLICATED", "users.getUsers", errors.AuthKeyDuplicatedError),
    ],
)
async def test_rpc_errors_reach_client_as_telethon_errors(localdc, clients, phone, error,
                                                          method, exc):
    client = clients(localdc)
    user = await login(client, localdc, phone)
    fid = localdc.inject(Fault("rpc_error", user_id=user.id, method=method, error=error))
    with pytest.raises(exc):
        await client(GET_SELF)
    with pytest.raises(exc):  # until cleared
        await client(GET_SELF)
    await client(ping())  # "*" never matches pings
    localdc.clear(fid)
    assert (await client(GET_SELF))[0].id == user.id


async def test_rpc_call_fail_is_retried_then_succeeds(localdc, clients, phone, monkeypatch):
    client = clients(localdc)
    user = await login(client, localdc, phone)
    real_sleep = asyncio.sleep
    monkeypatch.setattr(asyncio, "sleep", lambda s, *a: real_sleep(min(s, 0.01), *a))
    before = localdc.counters()["requests"]["users.getUsers"]
    localdc.inject(Fault("rpc_error", method="users.getUsers", error="RPC_CALL_FAIL", times=1))
    assert (await client(GET_SELF))[0].id == user.id
    assert localdc.counters()["requests"]["users.getUsers"] == before + 2


async def test_forgotten_auth_key_gives_auth_key_not_found(localdc, clients, phone):
    client = clients(localdc)
    user = await login(client, localdc, phone)
    assert localdc.forget_auth_key(user_id=user.id) == 1
    with pytest.raises(errors.AuthKeyNotFound):
        await client(GET_SELF)
    assert localdc.counters()["auth_key_not_found"] >= 1


async def test_user_migrate_moves_client_to_other_dc(localdc, clients, phone):
    client = clients(localdc, 1)
    localdc.inject(Fault("rpc_error", dc_id=1, method="auth.sendCode", error="USER_MIGRATE_2"))
    user = await login(client, localdc, phone)
    assert client.session.dc_id == 2
    assert client.session.port == localdc.addresses[2][1]
    assert (await client.get_me()).id == user.id
    assert localdc.counters(dc_id=2)["key_exchanges"] == 1
    assert localdc.counters(dc_id=2)["requests"]["auth.signIn"] == 1


async def test_dropped_connection_reconnects_and_resends(localdc, clients, phone, wait_until):
    client = clients(localdc)
    user = await login(client, localdc, phone)
    before = localdc.counters(user_id=user.id)
    localdc.inject(Fault("stall", method="users.getUsers", times=1))
    task = asyncio.create_task(client(GET_SELF))
    await wait_until(lambda: localdc.counters()["stalled"] == 1)
    assert not task.done()
    assert localdc.drop_connections(user_id=user.id) == 1
    result = await asyncio.wait_for(task, 10)
    assert result[0].id == user.id
    after = localdc.counters(user_id=user.id)
    assert after["connections"] == before["connections"] + 1
    # stalled one + the re-sent one + Telethon's own get_me after an auto-reconnect
    assert after["requests"]["users.getUsers"] == before["requests"].get("users.getUsers",
                                                                          0) + 3


async def test_stall_makes_wait_for_time_out(localdc, clients, phone):
    client = clients(localdc)
    user = await login(client, localdc, phone)
    fid = localdc.inject(Fault("stall", user_id=user.id, method=None))
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(client(ping()), 0.3)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(client(GET_SELF), 0.3)
    localdc.clear(fid)
    assert (await asyncio.wait_for(client(GET_SELF), 5))[0].id == user.id


async def test_stall_mid_key_exchange(localdc, clients):
    localdc.inject(Fault("stall", method="req_DH_params"))
    client = clients(localdc)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(client.connect(), 0.5)
    c = localdc.counters()
    assert c["requests"]["req_pq_multi"] == 1
    assert c["requests"]["req_DH_params"] == 1
    assert c["key_exchanges"] == 0


async def test_refused_connections(localdc, clients):
    localdc.inject(Fault("refuse", dc_id=1))
    client = clients(localdc, connection_retries=1, retry_delay=0.01)
    with pytest.raises(ConnectionError):
        await asyncio.wait_for(client.connect(), 10)
    assert localdc.counters(dc_id=1)["connections_refused"] >= 1


async def test_latency_delays_answers(localdc, clients, phone):
    client = clients(localdc)
    await login(client, localdc, phone)
    localdc.inject(Fault("latency", method="ping", seconds=1.0))
    t0 = time.monotonic()
    await client(ping())
    assert time.monotonic() - t0 >= 0.99
    t0 = time.monotonic()
    await client(GET_SELF)
    assert time.monotonic() - t0 < 0.5  # other methods are not delayed (room for a loaded CI)


async def test_muted_updates_while_pings_answered(localdc, clients, phone, wait_until):
    client = clients(localdc)
    user = await login(client, localdc, phone)
    got: list[str] = []
    client.add_event_handler(lambda ev: got.append(ev.raw_text), events.NewMessage())
    fid = localdc.inject(Fault("mute_updates", user_id=user.id))
    localdc.push_update(user.id, "lost")
    await client(ping())
    assert localdc.counters()["updates_muted"] == 1
    assert got == []
    localdc.clear(fid)
    localdc.push_update(user.id, "found")  # the pts gap makes Telethon fetch the difference
    await wait_until(lambda: sorted(got) == ["found", "lost"])


async def test_clock_skew_makes_client_ignore_answers(localdc, clients, phone):
    client = clients(localdc)
    await login(client, localdc, phone)
    fid = localdc.inject(Fault("clock_skew", seconds=-600))
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(client(ping()), 0.3)
    localdc.clear(fid)
    localdc.inject(Fault("clock_skew", seconds=10))  # within Telethon's window
    await asyncio.wait_for(client(ping()), 5)


async def test_ping_delay_disconnect_is_honoured(localdc, clients, phone, wait_until):
    client = clients(localdc)
    user = await login(client, localdc, phone)
    before = localdc.counters()["connections"]
    await client(functions.PingDelayDisconnectRequest(ping_id=1, disconnect_delay=1))
    await wait_until(lambda: localdc.counters()["connections"] == before + 1, 5)
    assert (await client(GET_SELF))[0].id == user.id
