"""Daemon against the local DC: connect, validate, heartbeat, metrics, status."""

from __future__ import annotations

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import phone_for
from tgdaemon.daemon import Daemon
from tgdaemon.status import State


async def _at_least(value, minimum: float) -> bool:
    return (await value) >= minimum


def sample(text: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


async def test_connect_validate_heartbeat(make_config, login_account, localdc, wait_until):
    config = make_config([{"name": "alice", "phone": phone_for("alice")},
                          {"name": "bob", "phone": phone_for("bob")}])
    alice_id = await login_account(config, "alice")
    await login_account(config, "bob")

    before = localdc.counters()["requests"]
    async with Daemon(config) as daemon:
        await wait_until(lambda: daemon.board.counts()[State.CONNECTED] == 2, 15,
                         "both accounts connected")
        served = localdc.counters()["requests"]
        # Each connect's initConnection carried the validating users.getUsers: one call per
        # account, and help.getConfig once for the daemon (its DC list), not once per connect.
        assert {m: served.get(m, 0) - before.get(m, 0)
                for m in ("users.getUsers", "help.getConfig")} == {
            "users.getUsers": 2, "help.getConfig": 1}
        alice = daemon.board.get("alice")
        assert alice is not None
        assert alice.user is not None
        assert alice.user.id == alice_id
        assert alice.dc_id == 1

        url = f"http://127.0.0.1:{daemon.http.port}"
        async with aiohttp.ClientSession() as http:

            async def latency_count() -> float:
                async with http.get(f"{url}/metrics") as r:
                    text = await r.text()
                # The default fleet-wide histogram (no account label) and alice's heartbeat.
                if sample(text, "tgdaemon_heartbeat_timestamp_seconds", account="alice") is None:
                    return 0
                return sample(text, "tgdaemon_rpc_latency_seconds_count") or 0

            await wait_until(lambda: _at_least(latency_count(), 4), 10,
                             "two heartbeat latencies per account in /metrics")

            async with http.get(f"{url}/status") as r:
                body = await r.json()
        accounts = body["accounts"] if isinstance(body, dict) else body
        by_name = {a["account"]: a for a in accounts}
        assert by_name["alice"]["state"] == "connected"
        assert by_name["alice"]["user"]["id"] == str(alice_id)

    record = None
    from tgdaemon.crypto import load_keyring
    from tgdaemon.store import Store
    async with await Store.open(config.daemon.state_dir,
                                load_keyring(key_file=config.daemon.master_key_file)) as store:
        record = await store.get_account("alice")
    assert record is not None
    assert record.user_id == alice_id
    assert record.last_checked is not None


async def test_connects_in_flight_are_capped(make_config, login_account, localdc, wait_until,
                                             monkeypatch):
    """connect_concurrency bounds simultaneous connects even with an unlimited rate."""
    names = [f"c{i}" for i in range(4)]
    config = make_config([{"name": n, "phone": phone_for(n)} for n in names],
                         daemon={"http_listen": "", "connect_concurrency": 1})
    for n in names:
        await login_account(config, n)
    in_flight, peak = 0, 0
    from tgdaemon import worker as worker_module

    original = worker_module.AccountWorker._validate

    async def counting(self):
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        try:
            return await original(self)
        finally:
            in_flight -= 1

    monkeypatch.setattr(worker_module.AccountWorker, "_validate", counting)
    async with Daemon(config) as daemon:
        await wait_until(lambda: daemon.board.counts()[State.CONNECTED] == 4, 15,
                         "all connected")
    assert peak == 1
