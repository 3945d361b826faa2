"""Issue 17: the daemon's clients send no Telethon keep-alive ping on top of the heartbeat.

Telethon's ``_keepalive_loop`` pings every 60 s; a test cannot wait a minute, so it calls the
sender's hook the loop calls (``_keepalive_ping``) and lets the local DC count what arrives.
The dead-peer detection the heartbeat keeps is covered by tests/daemon/test_failover.py
(stalls) and tests/lifecycle (``longest_heartbeat_gap``).
"""

from __future__ import annotations

import asyncio
import random

from telethon.tl.functions.updates import GetStateRequest

import tgdaemon.worker
from tests.conftest import phone_for
from tgdaemon.crypto import load_keyring
from tgdaemon.daemon import Daemon
from tgdaemon.lifecycle import State
from tgdaemon.rekey import memory_session
from tgdaemon.store import Store
from tgdaemon.telegram import build_client, client_class, local_update_pts, trust_server_keys
from tgdaemon.worker import AccountWorker


def _pings(localdc, uid: int) -> int:
    return localdc.counters(user_id=uid)["requests"].get("ping", 0)


async def _connected_worker(daemon: Daemon, wait_until) -> AccountWorker:
    """alice's worker once her account is connected."""
    await wait_until(lambda: daemon.board.get("alice") is not None
                     and daemon.board.get("alice").state is State.CONNECTED, 15, "connected")
    assert daemon.supervisor is not None
    return daemon.supervisor.worker("alice")


async def test_daemon_clients_skip_telethons_keepalive_ping(make_config, login_account,
                                                            localdc, wait_until):
    config = make_config([{"name": "alice", "phone": phone_for("alice")}])
    uid = await login_account(config, "alice")
    async with Daemon(config) as daemon:
        client = (await _connected_worker(daemon, wait_until)).client
        assert client is not None
        assert type(client).keepalive_ping is False
        before = _pings(localdc, uid)
        client._sender._keepalive_ping(random.randrange(2**62))  # what the 60 s loop calls
        # A request after it: the send loop keeps order, so a ping would have arrived first.
        await client(GetStateRequest())
        assert _pings(localdc, uid) == before
        assert client.is_connected()


async def test_stock_behaviour_when_not_turned_off(make_config, login_account, localdc,
                                                   wait_until):
    """The contrast (and the CLI's clients): the hook sends Telethon's ping."""
    config = make_config([{"name": "alice", "phone": phone_for("alice")}])
    uid = await login_account(config, "alice")
    async with await Store.open(config.daemon.state_dir,
                                load_keyring(key_file=config.daemon.master_key_file)) as store:
        data = await store.load_session("alice")
    assert data is not None
    trust_server_keys(config)
    cls = client_class()
    assert cls.keepalive_ping is True
    client = build_client(cls, memory_session(data, with_key=True), config,
                          config.account("alice"))
    await client.connect()
    try:
        before = _pings(localdc, uid)
        client._sender._keepalive_ping(random.randrange(2**62))
        await client(GetStateRequest())
        await wait_until(lambda: _pings(localdc, uid) == before + 1, 10, "the ping counted")
    finally:
        await client.disconnect()


async def test_no_keepalive_task_the_heartbeat_keeps_house(make_config, login_account, localdc,
                                                           wait_until, monkeypatch):
    """No Telethon keep-alive loop per daemon client; its bookkeeping (the update state
    copied into the session) runs between heartbeats instead."""
    monkeypatch.setattr(tgdaemon.worker, "HOUSEKEEPING_INTERVAL", 0.0)  # every heartbeat
    config = make_config([{"name": "alice", "phone": phone_for("alice")}],
                         policy={"heartbeat_interval": 0.3})
    uid = await login_account(config, "alice")
    async with Daemon(config) as daemon:
        worker = await _connected_worker(daemon, wait_until)
        client, session = worker.client, worker.session
        assert client is not None
        assert session is not None
        assert client._keepalive_handle.done()  # returned at once: no loop per client
        start = session.get_update_state(0).pts
        localdc.push_update(uid, "moves the pts")
        await wait_until(lambda: (local_update_pts(client) or 0) > start, 10, "update seen")
        await wait_until(lambda: session.get_update_state(0).pts == local_update_pts(client),
                         10, "the session follows the client's update state")


async def test_a_heartbeat_is_one_packet_with_its_acknowledgement(make_config, login_account,
                                                                   localdc, wait_until):
    """Issue 17: Telethon queues the acknowledgement of an answer only when its send loop
    comes round after the *next* request, so each heartbeat left as two packets (the request,
    then the ack of the previous answer). The daemon's clients put the ack in the request's
    container: at most one packet per request reaches the server."""
    config = make_config([{"name": "alice", "phone": phone_for("alice")}],
                         policy={"heartbeat_interval": 0.2})
    uid = await login_account(config, "alice")

    def sent() -> tuple[int, int]:
        c = localdc.counters(user_id=uid)
        return c["packets"], sum(c["requests"].values())

    async with Daemon(config) as daemon:
        await _connected_worker(daemon, wait_until)
        packets, requests = sent()
        await wait_until(lambda: sent()[1] >= requests + 6, 20, "six more requests")
        now_packets, now_requests = sent()
        assert now_packets - packets <= now_requests - requests, (
            f"{now_packets - packets} packets for {now_requests - requests} requests")


async def test_a_daemon_connection_runs_no_io_tasks_of_its_own(make_config, login_account,
                                                               localdc, wait_until):
    """Telethon's Connection starts a send task and a receive task per connection that only
    hand packets through one-item queues to the sender's loops (two more wake-ups per
    heartbeat). The daemon's connections are written and read by the sender's loops: no
    ``Connection`` task runs, and requests still go through."""
    config = make_config([{"name": "alice", "phone": phone_for("alice")}],
                         policy={"heartbeat_interval": 0.2})
    uid = await login_account(config, "alice")
    async with Daemon(config) as daemon:
        client = (await _connected_worker(daemon, wait_until)).client
        assert client is not None
        io_tasks = [t for t in asyncio.all_tasks()
                    if getattr(t.get_coro(), "__qualname__", "").startswith("Connection.")]
        assert io_tasks == []
        before = sum(localdc.counters(user_id=uid)["requests"].values())
        await wait_until(lambda: sum(localdc.counters(user_id=uid)["requests"].values())
                         >= before + 3, 10, "heartbeats answered")
        assert (await client(GetStateRequest())).pts >= 0
