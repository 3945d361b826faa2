"""tgdaemon.http through aiohttp's test server: endpoints, auth, WebSocket stream, page, server.

No __init__.py in this folder on purpose: with one, pytest imports it as the top-level package
``http`` and shadows the standard library (aiohttp then fails to import).
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import logging
import re
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import wait_for_condition
from tgdaemon.exceptions import ConfigError
from tgdaemon.http import (
    CLOSE_OVERFLOW,
    CLOSE_SHUTDOWN,
    LOOP_LAG,
    SUBSCRIPTIONS,
    WS_PROTOCOL,
    HttpServer,
    build_app,
)
from tgdaemon.metrics import Metrics
from tgdaemon.status import State, StatusBoard, UserInfo

TOKEN = "s3cret-Tok3n/with+odd=chars"
T0 = 1_700_000_000.0


class Env:
    """One app under test plus the objects behind it."""

    def __init__(self, client: TestClient, board: StatusBoard, metrics: Metrics) -> None:
        self.client = client
        self.board = board
        self.metrics = metrics
        self.ready = True

    @property
    def app(self) -> Any:
        return self.client.server.app


Factory = Callable[..., Awaitable[Env]]


@pytest.fixture
async def make_env() -> AsyncIterator[Factory]:
    envs: list[Env] = []

    async def make(**kwargs: Any) -> Env:
        board = StatusBoard(clock=lambda: T0)
        registry = CollectorRegistry()
        metrics = Metrics(registry, board)
        env: Env
        app = build_app(board=board, registry=registry, ready=lambda: env.ready, **kwargs)
        env = Env(TestClient(TestServer(app)), board, metrics)
        await env.client.start_server()
        envs.append(env)
        return env

    yield make
    for env in reversed(envs):
        await env.client.close()


@pytest.fixture
async def env(make_env: Factory) -> Env:
    return await make_env()


@pytest.fixture
async def secured(make_env: Factory) -> Env:
    return await make_env(token=TOKEN)


def bearer(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def token_protocol(token: str = TOKEN) -> str:
    return "bearer." + base64.urlsafe_b64encode(token.encode()).decode().rstrip("=")


async def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    await wait_for_condition(predicate, timeout)


# -- /status ----------------------------------------------------------------------------------


async def test_status_json_is_one_to_json_per_account(env: Env):
    env.board.update(
        "bob",
        state=State.FLOOD_WAIT,
        user=UserInfo(id=42, username="bobby", first_name="Bob"),
        dc_id=2,
        latency=0.125,
        last_checked=T0,
        last_error_category="flood_wait",
        last_error_message="A wait of 30 seconds is required",
        flood_wait_until=T0 + 30,
    )
    env.board.update("alice", state=State.CONNECTED)
    resp = await env.client.get("/status")
    assert resp.status == 200
    assert resp.headers["Cache-Control"] == "no-store"
    body = await resp.json()
    assert body["accounts"] == [s.to_json() for s in env.board.snapshot()]
    assert [a["account"] for a in body["accounts"]] == ["alice", "bob"]
    bob = body["accounts"][1]
    assert bob["user"] == {"id": "42", "username": "bobby", "firstName": "Bob"}
    assert bob["dc"] == 2
    assert bob["lastError"]["category"] == "flood_wait"
    assert bob["floodWaitUntil"].startswith("2023-11-14T22:13:50")
    assert body["summary"] == "2 accounts: 1 connected, 1 flood_wait"


async def test_status_requires_the_token_when_configured(secured: Env):
    client = secured.client
    missing = await client.get("/status")
    assert missing.status == 401
    assert missing.headers["WWW-Authenticate"].startswith("Bearer")
    assert (await client.get("/status", headers=bearer("wrong"))).status == 401
    assert (await client.get("/status", headers={"Authorization": f"Basic {TOKEN}"})).status == 401
    # Query-string tokens would land in access logs: not accepted.
    assert (await client.get("/status", params={"token": TOKEN})).status == 401
    assert (await client.get("/status", headers=bearer())).status == 200
    lower = {"Authorization": f"bearer {TOKEN}"}
    assert (await client.get("/status", headers=lower)).status == 200


async def test_public_endpoints_need_no_token(secured: Env):
    for path in ("/metrics", "/healthz", "/readyz", "/"):
        assert (await secured.client.get(path)).status == 200, path


async def test_empty_token_is_a_config_error():
    with pytest.raises(ConfigError, match="empty"):
        build_app(board=StatusBoard(), registry=CollectorRegistry(), ready=lambda: True,
                  token="  ")  # fmt: skip


# -- /status/ws -------------------------------------------------------------------------------


async def test_ws_sends_snapshot_then_every_change_in_order(env: Env):
    env.board.update("alice", state=State.CONNECTED)
    env.board.update("bob", state=State.NEEDS_LOGIN)
    async with env.client.ws_connect("/status/ws") as ws:
        snapshot = await ws.receive_json(timeout=5)
        assert snapshot == {
            "type": "snapshot",
            "accounts": [s.to_json() for s in env.board.snapshot()],
        }
        sequence = [State.RECONNECTING, State.CONNECTING, State.CONNECTED, State.FLOOD_WAIT]
        expected = [env.board.update("alice", state=s).to_json() for s in sequence]
        expected.append(env.board.update("carol", state=State.STARTING).to_json())
        received = [await ws.receive_json(timeout=5) for _ in expected]
        assert received == expected
        assert all(m["type"] == "status" for m in received)


async def test_ws_token_by_header_or_subprotocol(secured: Env):
    client = secured.client
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await client.ws_connect("/status/ws")
    assert info.value.status == 401
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await client.ws_connect("/status/ws", protocols=(WS_PROTOCOL, token_protocol("nope")))
    assert info.value.status == 401
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await client.ws_connect("/status/ws", protocols=(WS_PROTOCOL, "bearer.%%%"))
    assert info.value.status == 401

    async with client.ws_connect("/status/ws", headers=bearer()) as ws:
        assert (await ws.receive_json(timeout=5))["type"] == "snapshot"
    # What the page does: token as a subprotocol; the server echoes only the real protocol.
    async with client.ws_connect("/status/ws", protocols=(WS_PROTOCOL, token_protocol())) as ws:
        assert ws.protocol == WS_PROTOCOL
        assert (await ws.receive_json(timeout=5))["type"] == "snapshot"


async def test_ws_refuses_other_origins(env: Env):
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await env.client.ws_connect("/status/ws", origin="http://evil.example")
    assert info.value.status == 403
    own = f"http://{env.client.host}:{env.client.port}"
    async with env.client.ws_connect("/status/ws", origin=own) as ws:
        assert (await ws.receive_json(timeout=5))["type"] == "snapshot"


async def test_slow_subscriber_is_closed_with_overflow_code(make_env: Factory):
    env = await make_env(ws_queue_size=4)
    async with env.client.ws_connect("/status/ws") as ws:
        assert (await ws.receive_json(timeout=5))["type"] == "snapshot"
        # No await between updates: the server cannot drain, the queue overflows.
        for i in range(50):
            env.board.update("alice", reason=f"change {i}")
        reasons = []
        while True:
            msg = await ws.receive(timeout=5)
            if msg.type is not WSMsgType.TEXT:
                break
            reasons.append(msg.json()["reason"])
        assert msg.type is WSMsgType.CLOSE
        assert msg.data == CLOSE_OVERFLOW
        assert "reconnect" in msg.extra
        assert len(reasons) < 50
        assert reasons == sorted(reasons, key=lambda r: int(r.split()[1]))  # still in order
    await wait_for(lambda: not env.app[SUBSCRIPTIONS])


async def test_subscription_is_released_when_the_client_leaves(env: Env):
    async with env.client.ws_connect("/status/ws") as ws:
        await ws.receive_json(timeout=5)
        assert len(env.app[SUBSCRIPTIONS]) == 1
    await wait_for(lambda: not env.app[SUBSCRIPTIONS])
    env.board.update("alice", state=State.CONNECTED)  # nobody left to feed: no error


async def test_shutdown_closes_websockets_with_going_away(env: Env):
    ws = await env.client.ws_connect("/status/ws")
    await ws.receive_json(timeout=5)
    started = time.monotonic()
    closing = asyncio.create_task(env.client.server.close())
    msg = await ws.receive(timeout=5)
    assert msg.type is WSMsgType.CLOSE
    assert msg.data == CLOSE_SHUTDOWN
    await asyncio.wait_for(closing, 5)
    assert time.monotonic() - started < 3  # did not sit out a shutdown timeout
    await ws.close()
    assert not env.app[LOOP_LAG].running  # cleanup_ctx ran


# -- /metrics ---------------------------------------------------------------------------------


async def test_metrics_endpoint(env: Env):
    env.metrics.add_account("alice")
    env.board.update("alice", state=State.CONNECTED)
    env.metrics.error("alice", "network")
    resp = await env.client.get("/metrics", headers={"Accept-Encoding": "identity"})
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert "Content-Encoding" not in resp.headers
    families = {f.name: f for f in text_string_to_metric_families(await resp.text())}
    (up,) = families["tgdaemon_account_up"].samples
    assert up.labels == {"account": "alice"}
    assert up.value == 1
    # Errors are the fleet's by default (issue 17: a fleet-wide event costs no series per
    # account), every category from 0.
    errors = {s.labels["category"]: s.value for s in families["tgdaemon_errors"].samples
              if "account" not in s.labels}
    assert errors["network"] == 1
    assert errors["auth"] == 0


async def test_metrics_are_gzipped_when_asked(env: Env):
    env.metrics.add_account("alice")
    resp = await env.client.get(
        "/metrics", headers={"Accept-Encoding": "gzip"}, auto_decompress=False
    )
    assert resp.headers["Content-Encoding"] == "gzip"
    text = gzip.decompress(await resp.read()).decode()
    assert 'tgdaemon_account_up{account="alice"} 0' in text
    refused = await env.client.get("/metrics", headers={"Accept-Encoding": "gzip;q=0"})
    assert "Content-Encoding" not in refused.headers


# -- /healthz, /readyz ------------------------------------------------------------------------


async def test_healthz_reports_loop_lag(make_env: Factory):
    env = await make_env(loop_lag_interval=0.01)
    monitor = env.app[LOOP_LAG]
    await wait_for(lambda: monitor.samples >= 2)
    resp = await env.client.get("/healthz")
    assert resp.status == 200
    body = await resp.json()
    assert body["status"] == "ok"
    assert 0 <= body["loopLagSeconds"] < 1
    # Block the loop on purpose: the monitor must see it.
    asyncio.get_running_loop().call_soon(time.sleep, 0.2)
    await wait_for(lambda: monitor.worst_recent >= 0.15)
    body = await (await env.client.get("/healthz")).json()
    assert body["loopLagWorstRecentSeconds"] >= 0.15


async def test_healthz_fails_when_the_monitor_is_gone(env: Env):
    await env.app[LOOP_LAG].stop()
    resp = await env.client.get("/healthz")
    assert resp.status == 503


async def test_readyz_follows_the_callable(env: Env):
    resp = await env.client.get("/readyz")
    assert (resp.status, await resp.json()) == (200, {"ready": True})
    env.ready = False
    resp = await env.client.get("/readyz")
    assert (resp.status, await resp.json()) == (503, {"ready": False})


async def test_readyz_treats_a_raising_check_as_not_ready(make_env: Factory, caplog):
    board = StatusBoard()

    def broken() -> bool:
        raise RuntimeError("boom")

    app = build_app(board=board, registry=CollectorRegistry(), ready=broken)
    async with TestClient(TestServer(app)) as client:
        resp = await client.get("/readyz")
        assert resp.status == 503
    assert "RuntimeError" in caplog.text


# -- / (status page) --------------------------------------------------------------------------


async def test_page_is_served_self_contained_with_a_strict_csp(env: Env):
    resp = await env.client.get("/")
    assert resp.status == 200
    assert resp.content_type == "text/html"
    html = await resp.text()
    assert "data-account" in html
    assert "data-field" in html
    assert "/status/ws" in html
    for external in ("src=", "<link rel=\"stylesheet\"", "http://", "https://", "@import"):
        assert external not in html, external
    csp = resp.headers["Content-Security-Policy"]
    assert "unsafe-inline" not in csp
    assert "default-src 'none'" in csp
    (script,) = re.findall(r"<script>(.*?)</script>", html, flags=re.DOTALL)
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert f"'sha256-{digest}'" in csp
    assert resp.headers["Referrer-Policy"] == "no-referrer"


# -- HttpServer -------------------------------------------------------------------------------


def _app() -> Any:
    board = StatusBoard()
    registry = CollectorRegistry()
    Metrics(registry, board)
    return build_app(board=board, registry=registry, ready=lambda: True, token=TOKEN)


async def test_http_server_binds_port_zero_and_stops(caplog):
    caplog.set_level(logging.DEBUG)
    app = _app()
    server = HttpServer(app, "127.0.0.1", 0)
    await server.start()
    try:
        assert server.port != 0
        base = f"http://127.0.0.1:{server.port}"
        async with aiohttp.ClientSession() as session:
            async with session.get(base + "/status") as resp:
                assert resp.status == 401
            async with session.get(base + "/status", headers=bearer()) as resp:
                assert resp.status == 200
            async with session.get(base + "/healthz") as resp:
                assert resp.status == 200
        assert app[LOOP_LAG].running
    finally:
        await server.stop()
    await server.stop()  # idempotent
    assert not app[LOOP_LAG].running
    assert "/healthz" in caplog.text  # the access log works...
    assert TOKEN not in caplog.text  # ...and never carries the token
    with pytest.raises(aiohttp.ClientConnectionError):
        async with aiohttp.ClientSession() as session:
            await session.get(f"http://127.0.0.1:{server.port}/healthz")


async def test_http_server_cleans_up_when_the_port_is_taken():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        app = _app()
        server = HttpServer(app, "127.0.0.1", port)
        with pytest.raises(ConfigError,
                           match=f"cannot listen on 127.0.0.1:{port}: the port is in use"):
            await server.start()
        assert not app[LOOP_LAG].running  # the started cleanup context was unwound
        await server.stop()  # nothing to do, no error
