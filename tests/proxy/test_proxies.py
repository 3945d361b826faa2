"""Issue 12 part 1: per-account proxies through real proxy programs.

SOCKS5 with user/password (microsocks) and HTTP CONNECT (tinyproxy) carry the account's TCP
connection: localdc records each connection's TCP peer, and /proc shows that the peer socket
belongs to the proxy process, not to the daemon (this test process). MTProxy goes through
localdc's own obfuscated2 port behind a secret (dd = padded intermediate, plain = intermediate).
A dead proxy or a wrong MTProxy secret is a network fault with backoff; the account comes back
when the proxy does. Proxy passwords reach no log, status, metric or error message.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import phone_for
from tests.leakscan import secrets_found
from tests.proxy.conftest import (
    HTTP_PASSWORD,
    HTTP_USER,
    MTPROXY_KEY,
    SOCKS_PASSWORD,
    SOCKS_USER,
    ProxyProcess,
    free_port,
    socket_owner_pid,
)
from tgdaemon.daemon import Daemon
from tgdaemon.localdc import LocalDC
from tgdaemon.metrics import render
from tgdaemon.status import State


def _parent(pid: int) -> int | None:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("PPid:"):
            return int(line.split()[1])
    return None


def assert_connections_come_from(localdc: LocalDC, user_id: int, proxy: ProxyProcess) -> None:
    """Every live connection of the user reaches localdc from a socket of the proxy process
    (or a child it forked), and none from this process, which runs the daemon."""
    conns = localdc.connections(user_id)
    assert conns, "the account has no live connection"
    for conn in conns:
        assert conn.via == "dc"
        owner = socket_owner_pid(conn.peer[1], localdc.addresses[conn.dc_id][1])
        assert owner is not None, f"no process owns the peer socket {conn.peer}"
        assert owner != os.getpid(), "the daemon connected directly, bypassing the proxy"
        assert proxy.pid in (owner, _parent(owner)), (owner, proxy.pid)


def reconnects(daemon: Daemon, account: str) -> float:
    """The account's reconnects: with the default metrics_counters = "fleet" the fleet's one
    series (so only in a daemon of that one account), else the account's own."""
    if daemon.metrics.counters == "fleet":
        assert daemon.metrics.accounts() == [account], "per account: metrics_counters"
        return daemon.registry.get_sample_value("tgdaemon_reconnects_total") or 0.0
    text = render(daemon.registry).decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "tgdaemon_reconnects_total" and s.labels.get("account") == account:
                return s.value
    return 0.0


def connected(daemon: Daemon, account: str) -> bool:
    entry = daemon.board.get(account)
    return entry is not None and entry.state == State.CONNECTED


def state(daemon: Daemon, account: str) -> Any:
    entry = daemon.board.get(account)
    assert entry is not None
    return entry


def log_text(caplog: Any) -> str:
    return "\n".join(f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records)


def no_leaks(text: str, *passwords: str) -> None:
    from tgdaemon.crypto import generate_keyring

    found = secrets_found(text, phones=[], codes=[], keyring=generate_keyring(), auth_keys=[],
                          passwords=list(passwords))
    assert found == [], found


async def test_socks5_with_password_dead_proxy_backs_off_and_recovers(
        make_config, login_account, localdc, microsocks, wait_until, caplog):
    caplog.set_level(logging.DEBUG)
    proxy_url = f"socks5://{SOCKS_USER}:{SOCKS_PASSWORD}@127.0.0.1:{microsocks.port}"
    config = make_config([{"name": "alice", "phone": phone_for("alice"), "proxy": proxy_url}])
    user_id = await login_account(config, "alice")  # the CLI's login goes through it too
    async with Daemon(config) as daemon:
        await wait_until(lambda: connected(daemon, "alice"), 20,
                         "connected through SOCKS5")
        assert_connections_come_from(localdc, user_id, microsocks)

        # The proxy dies: a network fault, retried with backoff, never a stopped account.
        await microsocks.stop()
        await wait_until(lambda: reconnects(daemon, "alice") >= 3, 30,
                         "three reconnect attempts while the proxy is down")
        entry = state(daemon, "alice")
        assert entry.state in (State.RECONNECTING, State.CONNECTING), entry.state
        assert entry.last_error_category == "network", entry
        assert localdc.connections(user_id) == []

        await microsocks.start()  # same port: the account comes back by itself
        await wait_until(lambda: connected(daemon, "alice"), 30,
                         "reconnected once the proxy is back")
        assert_connections_come_from(localdc, user_id, microsocks)

        async with __import__("aiohttp").ClientSession() as http:
            base = f"http://127.0.0.1:{daemon.http.port}"
            async with http.get(f"{base}/status") as r:
                status_text = json.dumps(await r.json())
            async with http.get(f"{base}/metrics") as r:
                metrics_text = await r.text()
    logs = log_text(caplog)
    no_leaks("\n".join([logs, status_text, metrics_text, repr(config)]), SOCKS_PASSWORD)


async def test_socks5_wrong_password_is_a_network_fault(
        make_config, login_account, localdc, microsocks, wait_until, caplog):
    caplog.set_level(logging.DEBUG)
    good = f"socks5://{SOCKS_USER}:{SOCKS_PASSWORD}@127.0.0.1:{microsocks.port}"
    wrong_password = "Wr0ngPa55-k7x2"
    await login_account(make_config([{"name": "bob", "phone": phone_for("bob"),
                                      "proxy": good}]), "bob")
    config = make_config([{"name": "bob", "phone": phone_for("bob"),
                           "proxy": good.replace(SOCKS_PASSWORD, wrong_password)}],
                         daemon={"http_listen": ""})
    async with Daemon(config) as daemon:
        await wait_until(lambda: reconnects(daemon, "bob") >= 2, 30, "retried with backoff")
        entry = state(daemon, "bob")
        assert entry.state in (State.RECONNECTING, State.CONNECTING), entry.state
        assert entry.last_error_category == "network"
        messages = f"{entry.last_error_message} {entry.reason}"
    logs = log_text(caplog)
    no_leaks(logs + messages, wrong_password, SOCKS_PASSWORD)


@contextlib.asynccontextmanager
async def proxied_and_connected(make_config: Any, login_account: Any, wait_until: Any,
                                name: str, proxy_url: str) -> AsyncIterator[int]:
    """Log ``name`` in through ``proxy_url`` and run a daemon until it is connected; yields
    the account's user id."""
    config = make_config([{"name": name, "phone": phone_for(name), "proxy": proxy_url}],
                         daemon={"http_listen": ""})
    user_id = await login_account(config, name)
    async with Daemon(config) as daemon:
        await wait_until(lambda: connected(daemon, name), 20,
                         f"connected through {proxy_url.partition(':')[0]}")
        yield user_id


async def test_http_connect_with_password_through_tinyproxy(
        make_config, login_account, localdc, tinyproxy, wait_until, caplog):
    caplog.set_level(logging.DEBUG)
    proxy = await tinyproxy([port for _, port in localdc.addresses.values()])
    url = f"http://{HTTP_USER}:{HTTP_PASSWORD}@127.0.0.1:{proxy.port}"
    async with proxied_and_connected(make_config, login_account, wait_until, "carol",
                                     url) as user_id:
        assert_connections_come_from(localdc, user_id, proxy)
    no_leaks(log_text(caplog), HTTP_PASSWORD)


@pytest.mark.parametrize(("secret", "transport"), [
    ("dd" + MTPROXY_KEY, "obfuscated2/padded_intermediate"),
    (MTPROXY_KEY, "obfuscated2/intermediate"),
])
async def test_mtproxy_secret_kinds(make_config, login_account, localdc, wait_until,
                                    secret, transport, caplog):
    caplog.set_level(logging.DEBUG)
    host, port = localdc.mtproxy_address
    async with proxied_and_connected(make_config, login_account, wait_until, "dave",
                                     f"mtproxy://{secret}@{host}:{port}") as user_id:
        conns = localdc.connections(user_id)
        assert conns
        assert {(c.via, c.transport) for c in conns} == {("mtproxy", transport)}
    no_leaks(log_text(caplog), secret, MTPROXY_KEY)


async def test_mtproxy_wrong_secret_and_dead_proxy_are_network_faults(
        make_config, login_account, localdc, wait_until):
    host, port = localdc.mtproxy_address
    await login_account(make_config([{"name": "erin", "phone": phone_for("erin")}]), "erin")
    wrong = "dd" + "f" * 32
    config = make_config([
        {"name": "erin", "phone": phone_for("erin"), "proxy": f"mtproxy://{wrong}@{host}:{port}"},
        {"name": "frank", "phone": phone_for("frank"),
         "proxy": f"mtproxy://{wrong}@127.0.0.1:{free_port()}"},  # nothing listens there
    ], daemon={"http_listen": "", "metrics_counters": "account"})
    await login_account(make_config([{"name": "frank", "phone": phone_for("frank")}]), "frank")
    async with Daemon(config) as daemon:
        for name in ("erin", "frank"):
            await wait_until(lambda n=name: reconnects(daemon, n) >= 2, 30,
                             f"{name} retried with backoff")
            entry = state(daemon, name)
            assert entry.state in (State.RECONNECTING, State.CONNECTING), entry
            assert entry.last_error_category == "network", entry
