"""Library use (``Daemon.client``), per-account plugins and the live WebSocket stream."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import aiohttp
import pytest
from telethon import events

from tests.conftest import phone_for
from tgdaemon.daemon import Daemon
from tgdaemon.exceptions import AccountError
from tgdaemon.localdc import Fault
from tgdaemon.status import State

PLUGIN = textwrap.dedent('''
    calls = []

    async def setup(client, account):
        calls.append((account.name, client.is_connected()))

    def broken(client, account):
        raise RuntimeError("plugin bug")
''')


async def test_client_returns_managed_connected_client(
        make_config, login_account, localdc, wait_until):
    config = make_config([{"name": "alice", "phone": phone_for("alice")}],
                         daemon={"http_listen": ""})
    uid = await login_account(config, "alice")
    async with Daemon(config) as daemon:
        client = await daemon.client("alice", timeout=10)
        assert client.is_connected()
        me = await client.get_me()
        assert me.id == uid
        received = []
        client.add_event_handler(lambda e: received.append(e.raw_text), events.NewMessage())
        localdc.push_update(uid, "hello from the local DC")
        await wait_until(lambda: received == ["hello from the local DC"], 5, "update delivered")
        with pytest.raises(AccountError):
            await daemon.client("nobody", timeout=1)


async def test_plugins_run_after_each_connect_and_failures_are_contained(
        make_config, login_account, localdc, wait_until, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "demo_plugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    config = make_config([{"name": "alice", "phone": phone_for("alice"),
                           "plugins": ["demo_plugin:broken", "demo_plugin:setup",
                                       "no_such_module:setup"]}],
                         daemon={"http_listen": ""})
    uid = await login_account(config, "alice")
    try:
        import demo_plugin

        async with Daemon(config) as daemon:
            await wait_until(lambda: demo_plugin.calls == [("alice", True)], 10, "plugin ran")
            localdc.drop_connections(user_id=uid)
            await wait_until(lambda: len(demo_plugin.calls) == 2, 10, "plugin ran on reconnect")
            assert daemon.board.get("alice").state is State.CONNECTED
            # alice is the fleet: counted once for it (metrics_counters = "fleet").
            errors = daemon.registry.get_sample_value("tgdaemon_plugin_errors_total")
            # one import failure + the broken plugin on each of the two connects
            assert errors == 3
    finally:
        sys.modules.pop("demo_plugin", None)


async def test_websocket_streams_transitions_in_order(
        make_config, login_account, localdc, wait_until):
    config = make_config([{"name": "alice", "phone": phone_for("alice")}],
                         policy={"heartbeat_interval": 0.3, "request_timeout": 0.5})
    await login_account(config, "alice")
    async with Daemon(config) as daemon:
        await wait_until(lambda: daemon.board.get("alice").state is State.CONNECTED, 10,
                         "connected")
        url = f"http://127.0.0.1:{daemon.http.port}/status/ws"
        async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
            first = json.loads((await ws.receive(timeout=5)).data)
            assert first["type"] == "snapshot"
            assert [a["state"] for a in first["accounts"]] == ["connected"]
            fault = localdc.inject(Fault("stall", method=None))
            states: list[str] = []
            cleared: list[bool] = []

            async def next_state() -> bool:
                message = json.loads((await ws.receive(timeout=10)).data)
                assert message["account"] == "alice"
                if not states or states[-1] != message["state"]:
                    states.append(message["state"])
                if message["state"] == "reconnecting" and not cleared:
                    localdc.clear(fault)
                    cleared.append(True)
                return states[-1] == "connected"

            await wait_until(next_state, 15, "back to connected")
        assert states[0] == "reconnecting"
        assert states[-1] == "connected"
